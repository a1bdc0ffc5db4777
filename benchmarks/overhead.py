"""What GC costs: time against a memory-roofline proxy, against the alternatives
users would pick, inside optimizers and a full train step; compile time; memory.

    python -m benchmarks.overhead                 # full run, a few minutes
    python -m benchmarks.overhead --tiny          # seconds: smoke test

Run it from the repository root.

Every timing is a jitted function, warmed up, timed with
``jax.block_until_ready``, median of ``--repeats`` runs, and the variants of one
table are interleaved call by call in one process, so that their ratios
survive a noisy machine. Gradient trees have real shapes in Flax layout with
random values: ResNet-50 (25.6M parameters, 161 leaves), a GPT-2-small-like
transformer (124M, DenseGeneral attention kernels), both from
``benchmarks.models``, and 1,000 small kernels. The train-step table times
``benchmarks.models.CNN``.
Writes the table and a JSON file (device, versions, shapes, every sample)
under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gc
from benchmarks.models import CNN, GPT2_RULES, gpt2_small_shapes, resnet50_shapes

# --- gradient trees (real models' shapes are in benchmarks.models) ---------------


def small_kernels_shapes(n=1000):
    cycle = [(3, 3, 8, 8), (16, 16), (16,), (1, 1, 8, 16), (32, 8)]
    return {f"layer_{i:04d}/w": cycle[i % len(cycle)] for i in range(n)}


def tiny_shapes():
    return {"conv/kernel": (3, 3, 8, 16), "dense/kernel": (64, 10), "dense/bias": (10,)}


def make_tree(shapes, seed=0, dtype=jnp.float32):
    """A nested dict of random arrays with the given {"a/b": shape}."""
    rng = np.random.default_rng(seed)
    tree = {}
    for path, shape in shapes.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return tree


def tree_bytes(tree):
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# --- GC formulations ----------------------------------------------------------


def _fan_in(x, output_axes=(-1,)):
    keep = {a % x.ndim for a in output_axes}
    return tuple(a for a in range(x.ndim) if a not in keep)


def copy_tree(tree):
    """Roofline proxy: one elementwise pass, 1 read + 1 write per element."""
    return jax.tree.map(lambda x: -x, tree)


def naive_tree(tree, output_axes=(-1,)):
    def f(x):
        if x.ndim < 2:
            return x
        return x - x.mean(axis=_fan_in(x, output_axes), keepdims=True)

    return jax.tree.map(f, tree)


def optax_centralize_tree(tree):
    return optax.centralize().update(tree, optax.EmptyState())[0]


def optax_gc_tree(tree, output_axes=-1):
    return optax_gc.centralize(output_axes=output_axes).update(tree, None)[0]


# --- timing -----------------------------------------------------------------------


def interleaved(fns: dict, make_args, repeats: int, warmup: int = 3):
    """Median seconds per call of each fn, calls interleaved round-robin.

    ``make_args(name)`` returns the argument tuple for a call; for donated
    steps each fn keeps and threads its own state (see ``stateful``).
    """
    for name, fn in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(fn(*make_args(name)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            args = make_args(name)
            jax.block_until_ready(args)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}, samples


def stateful(step, init):
    """Wraps a donated ``state -> state`` step so each call consumes the last."""
    holder = {"state": init}

    def call():
        holder["state"] = step(*holder["state"])
        return holder["state"]

    return call


# --- the tables ---------------------------------------------------------------


def table_transforms(name, shapes, repeats, output_axes=-1):
    tree = make_tree(shapes)
    axes = (output_axes,) if isinstance(output_axes, int) else None
    fns = {
        "copy (roofline proxy)": jax.jit(copy_tree),
        "optax.centralize": jax.jit(optax_centralize_tree),
        "naive g - g.mean(fan_in)": jax.jit(
            functools.partial(naive_tree, output_axes=axes or (-1,))
        ),
        "optax_gc.centralize": jax.jit(
            functools.partial(optax_gc_tree, output_axes=output_axes)
        ),
    }
    medians, samples = interleaved(fns, lambda _: (tree,), repeats)
    base = medians["copy (roofline proxy)"]
    rows = [(k, v, v / base) for k, v in medians.items()]
    return {
        "tree": name,
        "leaves": len(shapes),
        "params": sum(math.prod(s) for s in shapes.values()),
        "rows": rows,
        "baseline": "copy (roofline proxy)",
        "samples": samples,
    }


OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3),
    "lion": lambda: optax.lion(1e-4),
}


def _optimizer_steps(base, gc_rules):
    """The bare optimizer and its three GC variants, each a donated step."""
    lr = {"adam": 1e-3, "adamw": 1e-3, "lion": 1e-4}[base]

    def make(tx):
        @functools.partial(jax.jit, donate_argnums=(0, 2))
        def step(params, grads, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return tx, step

    tx = OPTIMIZERS[base]
    gc = functools.partial(optax_gc.centralize, output_axes=gc_rules)
    update = (
        optax_gc.gc_adamw(lr, output_axes=gc_rules)
        if base == "adamw"
        else optax_gc.with_gc(tx(), output_axes=gc_rules)
    )
    return {
        f"optax.{base}": make(tx()),
        f"chain(centralize(), {base}) [gradient]": make(optax.chain(gc(), tx())),
        f"chain({base}, centralize()) [update, plain]": make(optax.chain(tx(), gc())),
        ("gc_adamw [update]" if base == "adamw" else f"with_gc({base}) [update]"): make(
            update
        ),
    }


def table_optimizer(name, shapes, repeats, gc_rules=-1, base="adam"):
    """One optimizer step (update + apply); params and state donated, grads fixed."""
    steps = _optimizer_steps(base, gc_rules)
    grads = make_tree(shapes, 1)
    calls, memory = {}, {}
    for label, (tx, step) in steps.items():
        params = make_tree(shapes, 0)
        state = tx.init(params)
        compiled = step.lower(params, grads, state).compile()
        memory[label] = memory_stats(compiled, state)
        calls[label] = stateful(
            lambda p, s, step=step: step(p, grads, s), (params, state)
        )
    medians, samples = interleaved(
        {k: (lambda c=c: c()) for k, c in calls.items()}, lambda _: (), repeats
    )
    base_label = f"optax.{base}"
    rows = [(k, v, v / medians[base_label]) for k, v in medians.items()]
    return {
        "tree": name,
        "rows": rows,
        "baseline": base_label,
        "memory": memory,
        "samples": samples,
    }


def table_update_only(name, shapes, repeats):
    """GC on the gradient, the update alone (no apply, nothing donated)."""
    tree, grads = make_tree(shapes, 0), make_tree(shapes, 1)
    fns, states = {}, {}
    for label, tx in {
        "optax.adam": optax.adam(1e-3),
        "chain(centralize(), adam) [gradient]": optax.chain(
            optax_gc.centralize(), optax.adam(1e-3)
        ),
    }.items():
        states[label] = tx.init(tree)
        fns[label] = jax.jit(tx.update)
    medians, samples = interleaved(
        fns, lambda label: (grads, states[label], tree), repeats
    )
    base = medians["optax.adam"]
    return {
        "tree": name,
        "rows": [(k, v, v / base) for k, v in medians.items()],
        "baseline": "optax.adam",
        "samples": samples,
    }


def memory_stats(compiled, opt_state):
    stats = {"opt_state_bytes": tree_bytes(opt_state)}
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - backends without memory analysis
        stats["error"] = repr(e)
        return stats
    if m is None:
        return stats
    for key in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    ):
        stats[key] = int(getattr(m, key, 0))
    stats["peak_estimate_bytes"] = (
        stats["argument_size_in_bytes"]
        + stats["output_size_in_bytes"]
        + stats["temp_size_in_bytes"]
        - stats["alias_size_in_bytes"]
    )
    return stats


def table_train_step(repeats, tiny):
    """A full Flax CNN train step (forward + backward + adam) with and without GC."""
    width, batch, size = (4, 8, 8) if tiny else (16, 128, 28)
    model = CNN(width=width, stem_stride=1)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 1))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def make(tx):
        @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
        def step(params, batch_stats, opt_state):
            def loss_fn(p):
                logits, upd = model.apply(
                    {"params": p, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
                return loss.mean(), upd["batch_stats"]

            grads, stats = jax.grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state

        return tx, step

    variants = {
        "adam": make(optax.adam(1e-3)),
        "chain(centralize(), adam)": make(
            optax.chain(optax_gc.centralize(), optax.adam(1e-3))
        ),
        "gc_adam (update)": make(optax_gc.gc_adam(1e-3)),
    }
    calls, memory = {}, {}
    for label, (tx, step) in variants.items():
        params = jax.tree.map(jnp.copy, variables["params"])
        stats = jax.tree.map(jnp.copy, variables["batch_stats"])
        state = tx.init(params)
        memory[label] = memory_stats(step.lower(params, stats, state).compile(), state)
        calls[label] = stateful(step, (params, stats, state))
    medians, samples = interleaved(
        {k: (lambda c=c: c()) for k, c in calls.items()}, lambda _: (), repeats
    )
    base = medians["adam"]
    return {
        "param_bytes": tree_bytes(variables["params"]),
        "tree": f"Flax CNN train step, batch {batch}x{size}x{size}, width {width}",
        "rows": [(k, v, v / base) for k, v in medians.items()],
        "baseline": "adam",
        "memory": memory,
        "samples": samples,
    }


def table_compile(shapes, repeats):
    """Trace + compile seconds of a fresh jit of each transform (no caching)."""
    tree = make_tree(shapes)

    def fresh(fn):
        # A new function object each time: jax caches on function identity.
        return lambda: jax.jit(lambda t: fn(t)).lower(tree).compile()

    fns = {
        "optax.centralize": fresh(optax_centralize_tree),
        "optax_gc.centralize": fresh(optax_gc_tree),
    }
    medians, samples = interleaved(
        {k: (lambda f=f: f() and 0) for k, f in fns.items()},
        lambda _: (),
        repeats,
        warmup=1,
    )
    base = medians["optax.centralize"]
    return {
        "tree": f"{len(shapes)} small kernels: trace + compile",
        "rows": [(k, v, v / base) for k, v in medians.items()],
        "baseline": "optax.centralize",
        "samples": samples,
    }


# --- targets ------------------------------------------------------------------


def _ratio(result, label, over):
    rows = {name: seconds for name, seconds, _ in result["rows"]}
    return rows[label] / rows[over]


def targets(results):
    """Every target of the overhead issue: (what, measured, target)."""
    out = []
    for res in results:
        kind, tree = res.get("kind"), res["tree"].split(":")[0]
        if kind == "transforms":
            gc = "optax_gc.centralize"
            naive, copy = "naive g - g.mean(fan_in)", "copy (roofline proxy)"
            out.append((f"{tree}: centralize / naive", _ratio(res, gc, naive), 1.0))
            out.append(
                (f"{tree}: centralize / copy (stretch)", _ratio(res, gc, copy), 1.25)
            )
        elif kind == "optimizer":
            base = res["baseline"]
            for label, _, ratio in res["rows"]:
                if "[update]" in label:
                    out.append((f"{tree}: {label} / {base}", ratio, 1.35))
                if "[gradient]" in label and base == "optax.adam":
                    out.append((f"{tree}: {label} / {base}, step", ratio, 1.05))
        elif kind == "update_only":
            label = "chain(centralize(), adam) [gradient]"
            out.append(
                (
                    f"{tree}: {label} / adam, update only",
                    _ratio(res, label, "optax.adam"),
                    1.05,
                )
            )
        elif kind == "train_step":
            label = "gc_adam (update)"
            out.append(
                (f"train step: {label} / adam, time", _ratio(res, label, "adam"), 1.05)
            )
            mem = res["memory"]
            extra = mem[label].get("temp_size_in_bytes")
            if extra is not None:
                extra = (extra - mem["adam"]["temp_size_in_bytes"]) / res["param_bytes"]
                out.append(
                    (f"train step: {label} temp - adam's, x param bytes", extra, 0.05)
                )
    return out


def fmt_targets(rows):
    lines = [
        "\n## Targets",
        "",
        "| ratio | measured | target | met |",
        "|---|---:|---:|---|",
    ]
    for what, value, target in rows:
        met = "yes" if value <= target else "**no**"
        lines.append(f"| {what} | {value:.3f} | ≤ {target:.2f} | {met} |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------


def fmt_table(result):
    lines = [
        f"\n## {result['tree']}",
        "",
        f"| variant | median | x {result['baseline']} |",
        "|---|---:|---:|",
    ]
    for name, seconds, ratio in result["rows"]:
        unit = f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"
        lines.append(f"| {name} | {unit} | {ratio:.3f} |")
    if "memory" in result:
        lines += [
            "",
            "| variant | peak (args+out+temp-alias) | temp | opt state |",
            "|---|---:|---:|---:|",
        ]
        for name, m in result["memory"].items():
            peak = m.get("peak_estimate_bytes")
            temp = m.get("temp_size_in_bytes")
            lines.append(
                f"| {name} | {peak / 2**20:.2f} MiB | {temp / 2**20:.2f} MiB "
                f"| {m['opt_state_bytes'] / 2**20:.2f} MiB |"
                if peak is not None
                else f"| {name} | n/a | n/a | {m['opt_state_bytes'] / 2**20:.2f} MiB |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--tiny", action="store_true", help="tiny trees, few repeats")
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    repeats = 3 if args.tiny else args.repeats

    if args.tiny:
        trees = {"tiny": (tiny_shapes(), -1)}
        compile_shapes = small_kernels_shapes(20)
    else:
        trees = {"ResNet-50": (resnet50_shapes(), -1)}
        if not args.skip_gpt2:
            trees["GPT-2 small"] = (gpt2_small_shapes(), GPT2_RULES)
        compile_shapes = small_kernels_shapes(1000)

    device = jax.devices()[0]
    header = (
        f"device: {device.device_kind} ({jax.default_backend()}), "
        f"{jax.device_count()} device(s); jax {jax.__version__}, "
        f"optax {optax.__version__}, optax_gc {optax_gc.__version__}; "
        f"{platform.machine()}, {repeats} repeats, median"
    )
    print(header, flush=True)
    results = []
    first = next(iter(trees))
    for name, (shapes, axes) in trees.items():
        n = sum(math.prod(s) for s in shapes.values())
        label = f"{name}: {n / 1e6:.1f}M params, {len(shapes)} leaves"
        transform_axes = -1 if callable(axes) else axes
        res = table_transforms(label, shapes, repeats, transform_axes)
        res["kind"] = "transforms"
        if callable(axes):  # GPT-2: our per-leaf rules vs plain -1
            tree = make_tree(shapes)
            rules_fn = jax.jit(functools.partial(optax_gc_tree, output_axes=axes))
            med, _ = interleaved(
                {"copy": jax.jit(copy_tree), "rules": rules_fn},
                lambda _, tree=tree: (tree,),
                repeats,
            )
            res["rows"].append(
                (
                    "optax_gc.centralize (transformer path_rules)",
                    med["rules"],
                    med["rules"] / med["copy"],
                )
            )
        results.append(res)
        print(fmt_table(res), flush=True)
        for base in ("adam", "adamw", "lion"):
            res = table_optimizer(
                f"{name}: {base} update + apply, donated buffers",
                shapes,
                repeats,
                axes,
                base,
            )
            res["kind"] = "optimizer"
            results.append(res)
            print(fmt_table(res), flush=True)
        if name == first:
            res = table_update_only(f"{name}: adam update alone", shapes, repeats)
            res["kind"] = "update_only"
            results.append(res)
            print(fmt_table(res), flush=True)
    res = table_train_step(repeats, args.tiny)
    res["kind"] = "train_step"
    results.append(res)
    print(fmt_table(res), flush=True)
    state = optax_gc.centralize().init(make_tree(trees[next(iter(trees))][0]))
    print(f"\noptax_gc.centralize() state: {state!r}, {tree_bytes(state)} bytes")
    res = table_compile(compile_shapes, 1 if args.tiny else max(5, repeats // 3))
    results.append(res)
    print(fmt_table(res), flush=True)

    goals = targets(results)
    print(fmt_targets(goals), flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"overhead-{jax.default_backend()}{'-tiny' if args.tiny else ''}.json"
    path.write_text(
        json.dumps(
            {
                "header": header,
                "device": str(device),
                "device_kind": device.device_kind,
                "backend": jax.default_backend(),
                "versions": {
                    "jax": jax.__version__,
                    "optax": optax.__version__,
                    "optax_gc": optax_gc.__version__,
                    "python": platform.python_version(),
                },
                "argv": sys.argv[1:] if argv is None else argv,
                "shapes": {
                    name: {k: list(v) for k, v in s.items()}
                    for name, (s, _) in trees.items()
                },
                "tables": [{k: v for k, v in r.items()} for r in results],
                "targets": [
                    {"ratio": w, "measured": v, "target": t, "met": v <= t}
                    for w, v, t in goals
                ],
            },
            indent=1,
        )
    )
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
