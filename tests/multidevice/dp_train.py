"""Data-parallel Flax training with GC over a global mesh (one or more processes).

    python tests/multidevice/dp_train.py --process-id 0 --num-processes 2 \
        --port 12355 --out params.npz

Every process runs this with its own --process-id and 2 local CPU devices;
with --num-processes 1 it runs alone on 4 local devices. Process 0 writes the
final parameters to --out.
"""

import argparse
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    local_devices = 4 // args.num_processes
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    import flax.linen as nn
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_gc

    assert jax.device_count() == 4 and jax.local_device_count() == local_devices
    mesh = jax.make_mesh((4,), ("data",))
    replicated = NamedSharding(mesh, P())
    data_sharded = NamedSharding(mesh, P("data"))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(x)

    # The same global data in every process; each feeds its own rows.
    rng = np.random.default_rng(0)
    global_batch = 32
    xs = rng.normal(size=(args.steps, global_batch, 6, 6, 1)).astype(np.float32)
    ys = rng.integers(0, 10, size=(args.steps, global_batch))
    per_process = global_batch // args.num_processes
    rows = slice(args.process_id * per_process, (args.process_id + 1) * per_process)

    model = Net()
    # GC on the final update: unit means stay put.
    tx = optax_gc.gc_adam(1e-2, location="update")
    params = model.init(jax.random.key(0), xs[0, :1])["params"]
    init = params
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for s in range(args.steps):
        x = jax.make_array_from_process_local_data(
            data_sharded, xs[s, rows], xs[s].shape
        )
        y = jax.make_array_from_process_local_data(
            data_sharded, ys[s, rows], ys[s].shape
        )
        params, opt_state, loss = step(params, opt_state, x, y)

    def flat(tree, prefix):
        return {
            prefix + jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(
                leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
            )
            for p, leaf in jax.tree.leaves_with_path(tree)
        }

    if args.process_id == 0:
        np.savez(args.out, **flat(params, "final/"), **flat(init, "init/"))
    print(f"process {args.process_id}: final loss {float(loss):.6f}", flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
