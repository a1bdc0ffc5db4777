"""GC in the places JAX users train: Flax linen and NNX, Equinox, transformers,
optax combinators, Orbax checkpoints and mixed precision (single device)."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_gc
from tests.helpers import assert_trees_close, assert_trees_equal


def _fan_in_mean(x, output_axes):
    x = np.asarray(x, np.float64)
    keep = {a % x.ndim for a in output_axes}
    return x.mean(axis=tuple(a for a in range(x.ndim) if a not in keep))


def _leaves(tree):
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): x
        for p, x in jax.tree.leaves_with_path(tree)
    }


# --- Flax linen: Conv + BatchNorm + Dense with TrainState --------------------


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)  # BatchNorm carries the bias
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3), strides=2)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
    batch_stats: dict


def _batch(seed=0, n=16):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n, 8, 8, 1)), jax.random.randint(k2, (n,), 0, 10)


def _linen_state(tx):
    variables = CNN().init(jax.random.key(0), _batch()[0], train=False)
    return TrainState.create(
        apply_fn=CNN().apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
    )


def _linen_grads(state, batch):
    x, y = batch

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    return jax.grad(loss_fn, has_aux=True)(state.params)


@jax.jit
def _linen_step(state, batch):
    grads, batch_stats = _linen_grads(state, batch)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats)


def test_flax_linen_real_gradients():
    state = _linen_state(optax.chain(optax_gc.centralize(), optax.adam(1e-3)))
    grads, _ = _linen_grads(state, _batch())
    gc_grads, _ = optax_gc.centralize().update(grads, None)
    raw, out = _leaves(grads), _leaves(gc_grads)
    kernels = [k for k in raw if k.endswith("kernel")]
    assert sorted(kernels) == ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]
    for k in kernels:
        # (kh, kw, in) for Conv, (in,) for Dense: one mean per output unit.
        np.testing.assert_allclose(_fan_in_mean(out[k], (-1,)), 0.0, atol=1e-7)
        assert np.abs(_fan_in_mean(raw[k], (-1,))).max() > 1e-4  # GC did work
    untouched = [k for k in raw if k not in kernels]
    assert sorted(untouched) == [
        "BatchNorm_0/bias",
        "BatchNorm_0/scale",
        "Conv_1/bias",
        "Dense_0/bias",
    ]
    for k in untouched:
        np.testing.assert_array_equal(out[k], raw[k])


def test_flax_linen_train_state_step():
    gc_state = _linen_state(optax.chain(optax_gc.centralize(), optax.adam(1e-2)))
    plain_state = _linen_state(optax.adam(1e-2))
    batch = _batch()
    gc_next, plain_next = _linen_step(gc_state, batch), _linen_step(plain_state, batch)
    # The step is adam on the centralized gradient ...
    grads, _ = _linen_grads(gc_state, batch)
    expected, _ = optax.adam(1e-2).update(
        optax_gc.centralize().update(grads, None)[0],
        optax.adam(1e-2).init(gc_state.params),
    )
    delta = jax.tree.map(lambda a, b: a - b, gc_next.params, gc_state.params)
    assert_trees_close(delta, expected, rtol=1e-5, atol=1e-8)
    # ... so BatchNorm scale/bias and biases move exactly as without GC.
    new, ref = _leaves(gc_next.params), _leaves(plain_next.params)
    for k in new:
        if not k.endswith("kernel"):
            np.testing.assert_array_equal(new[k], ref[k])
        else:
            assert not np.allclose(new[k], ref[k])


def test_flax_linen_update_location_keeps_kernel_means():
    state = _linen_state(optax_gc.with_gc(optax.adam(1e-2)))
    start = _leaves(state.params)
    for seed in range(5):
        state = _linen_step(state, _batch(seed))
    end = _leaves(state.params)
    for k in start:
        if k.endswith("kernel"):
            np.testing.assert_allclose(
                _fan_in_mean(end[k], (-1,)), _fan_in_mean(start[k], (-1,)), atol=1e-6
            )


def test_flax_linen_training_reduces_loss():
    state = _linen_state(optax.chain(optax_gc.centralize(), optax.adam(1e-2)))
    batch = _batch(0, 64)

    def loss(state):
        logits = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats},
            batch[0],
            train=False,
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    before = loss(state)
    for _ in range(30):
        state = _linen_step(state, batch)
    assert loss(state) < 0.8 * before


# --- Flax NNX ------------------------------------------------------------------


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.linear = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.linear(x.mean(axis=(1, 2)))


def _nnx_loss(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_flax_nnx_optimizer():
    model = NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax_gc.with_gc(optax.adam(1e-2)), wrt=nnx.Param)
    x, y = _batch()
    grads = nnx.grad(_nnx_loss)(model, x, y)
    gc_grads = optax_gc.centralize().update(grads, None)[0]
    raw, out = _leaves(grads), _leaves(gc_grads)
    for k in raw:
        if "kernel" in k:
            np.testing.assert_allclose(_fan_in_mean(out[k], (-1,)), 0.0, atol=1e-7)
        else:
            np.testing.assert_array_equal(out[k], raw[k])
    assert sum("kernel" in k for k in raw) == 2

    before = _leaves(nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = _leaves(nnx.state(model, nnx.Param))
    for k in before:
        if "kernel" in k:  # GC on the final update: unit means do not move
            np.testing.assert_allclose(
                _fan_in_mean(after[k], (-1,)), _fan_in_mean(before[k], (-1,)), atol=1e-6
            )
        assert not np.array_equal(after[k], before[k]), k


def test_flax_nnx_chain_centralize_matches_manual():
    model = NNXNet(nnx.Rngs(0))
    tx = optax.chain(optax_gc.centralize(), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = _batch()
    grads = nnx.grad(_nnx_loss)(model, x, y)
    before = _leaves(nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = _leaves(nnx.state(model, nnx.Param))
    gc_grads = _leaves(optax_gc.centralize().update(grads, None)[0])
    for k in before:
        np.testing.assert_allclose(
            after[k] - before[k], -0.1 * gc_grads[k], rtol=1e-5, atol=1e-7
        )


# --- Equinox: output-first weights ---------------------------------------------


class EqxNet(eqx.Module):
    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 8, 3, key=k1)
        self.linear = eqx.nn.Linear(8, 10, key=k2)

    def __call__(self, x):  # x: (1, H, W)
        return self.linear(jax.nn.relu(self.conv(x)).mean(axis=(1, 2)))


def _eqx_grads(model):
    x, y = _batch()
    x = jnp.moveaxis(x, -1, 1)

    @eqx.filter_grad
    def grads(model):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return grads(model)


def test_equinox_output_first_layout():
    model = EqxNet(jax.random.key(0))
    assert model.conv.weight.shape == (8, 1, 3, 3)
    assert model.linear.weight.shape == (10, 8)
    tx = optax.chain(optax_gc.centralize(output_axes=0), optax.adam(1e-2))
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    grads = _eqx_grads(model)
    gc_grads = optax_gc.centralize(output_axes=0).update(grads, None)[0]
    for w in ("conv", "linear"):
        g = getattr(gc_grads, w).weight
        np.testing.assert_allclose(_fan_in_mean(g, (0,)), 0.0, atol=1e-7)
        b = getattr(gc_grads, w).bias
        np.testing.assert_array_equal(b, getattr(grads, w).bias)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    new_model = eqx.apply_updates(model, updates)
    assert not np.allclose(new_model.linear.weight, model.linear.weight)


def test_equinox_with_default_axes_is_the_documented_mistake():
    """output_axes=-1 on (out, in) weights centres each input across outputs."""
    grads = _eqx_grads(EqxNet(jax.random.key(0)))
    wrong = optax_gc.centralize().update(grads, None)[0].linear.weight
    right = optax_gc.centralize(output_axes=0).update(grads, None)[0].linear.weight
    assert np.abs(_fan_in_mean(wrong, (0,))).max() > 1e-4  # fan-in not centred
    np.testing.assert_allclose(_fan_in_mean(wrong, (-1,)), 0.0, atol=1e-7)
    assert not np.allclose(wrong, right)


# --- attention kernels and scan-stacked layers ------------------------------------

TRANSFORMER_RULES = optax_gc.path_rules(
    {
        r"embedding$": None,
        r"bias$": None,  # DenseGeneral biases (H, D) are 2-D but not weights
        r"layers/.*kernel$": (0, -1),
        r"(query|key|value)/kernel$": (1, 2),
        r"out/kernel$": (2,),
    }
)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.relu(nn.Dense(12)(x))
        return x + nn.Dense(6)(h), None


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(20, 6)(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6)(x)
        layers = nn.scan(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = layers(name="layers")(x, None)
        return nn.Dense(20)(x)


def test_attention_and_scan_rules():
    tokens = jax.random.randint(jax.random.key(1), (4, 5), 0, 20)
    model = Transformer()
    params = model.init(jax.random.key(0), tokens)["params"]

    def loss(params):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    grads = jax.grad(loss)(params)
    out = _leaves(
        optax_gc.centralize(output_axes=TRANSFORMER_RULES).update(grads, None)[0]
    )
    raw = _leaves(grads)
    shapes = {k: v.shape for k, v in raw.items() if "kernel" in k or "embedding" in k}
    assert shapes == {
        "Embed_0/embedding": (20, 6),
        "MultiHeadDotProductAttention_0/query/kernel": (6, 2, 3),
        "MultiHeadDotProductAttention_0/key/kernel": (6, 2, 3),
        "MultiHeadDotProductAttention_0/value/kernel": (6, 2, 3),
        "MultiHeadDotProductAttention_0/out/kernel": (2, 3, 6),
        "layers/Dense_0/kernel": (3, 6, 12),
        "layers/Dense_1/kernel": (3, 12, 6),
        "Dense_0/kernel": (6, 20),
    }
    np.testing.assert_array_equal(out["Embed_0/embedding"], raw["Embed_0/embedding"])
    for name in ("query", "key", "value"):
        k = f"MultiHeadDotProductAttention_0/{name}/kernel"
        # Each (head, dim) unit is centred over its own `in` fan-in only.
        expected = raw[k] - raw[k].mean(axis=0, keepdims=True)
        np.testing.assert_allclose(out[k], expected, atol=1e-7)
    k = "MultiHeadDotProductAttention_0/out/kernel"
    expected = raw[k] - raw[k].mean(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(out[k], expected, atol=1e-7)
    for k in ("layers/Dense_0/kernel", "layers/Dense_1/kernel"):
        for layer in range(3):  # layer by layer, never across the stack
            g = raw[k][layer]
            np.testing.assert_allclose(
                out[k][layer], g - g.mean(0, keepdims=True), atol=1e-7
            )
    k = "Dense_0/kernel"
    np.testing.assert_allclose(
        out[k], raw[k] - raw[k].mean(0, keepdims=True), atol=1e-7
    )
    for k in raw:
        if "bias" in k or "scale" in k:
            np.testing.assert_array_equal(out[k], raw[k])


def test_default_axes_mix_heads_on_attention_kernels():
    """Without the rule, (in, H, D) kernels are averaged over in and H."""
    g = jax.random.normal(jax.random.key(0), (6, 2, 3))
    wrong = optax_gc.centralize_array(g)
    right = optax_gc.centralize_array(g, (1, 2))
    assert np.abs(_fan_in_mean(wrong, (1, 2))).max() > 1e-3
    np.testing.assert_allclose(_fan_in_mean(right, (1, 2)), 0.0, atol=1e-7)


# --- optax combinators ------------------------------------------------------------


def _grads(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)), "bias": jnp.ones(4)},
        "head": {"kernel": jax.random.normal(k[1], (4, 3)), "bias": jnp.ones(3)},
    }


def test_multi_transform_gc_on_one_label():
    labels = {"conv": {"kernel": "gc", "bias": "plain"}, "head": "plain"}
    tx = optax.multi_transform(
        {
            "gc": optax.chain(optax_gc.centralize(), optax.sgd(1.0)),
            "plain": optax.sgd(1.0),
        },
        labels,
    )
    grads = _grads()
    out, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
    np.testing.assert_allclose(_fan_in_mean(out["conv"]["kernel"], (-1,)), 0, atol=1e-6)
    assert_trees_equal(out["head"], jax.tree.map(lambda g: -g, grads["head"]))


def test_masked_by_function():
    mask = lambda params: jax.tree.map_with_path(  # noqa: E731
        lambda p, x: "conv" in jax.tree_util.keystr(p), params
    )
    tx = optax.masked(optax_gc.centralize(), mask)
    grads = _grads()
    out, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
    np.testing.assert_allclose(_fan_in_mean(out["conv"]["kernel"], (-1,)), 0, atol=1e-6)
    np.testing.assert_array_equal(out["head"]["kernel"], grads["head"]["kernel"])


def test_multi_steps_gc_of_accumulated_equals_gc_of_sum():
    inner = optax.chain(optax_gc.centralize(), optax.sgd(1.0))
    tx = optax.MultiSteps(inner, every_k_schedule=3, use_grad_mean=False)
    params = _grads(9)
    state = tx.init(params)
    step = jax.jit(tx.update)
    gs = [_grads(s) for s in range(3)]
    for g in gs:
        out, state = step(g, state, params)
    total = jax.tree.map(lambda *x: sum(x), *gs)
    expected = jax.tree.map(lambda g: -g, optax_gc.centralize().update(total, None)[0])
    assert_trees_close(out, expected, rtol=1e-5, atol=1e-6)


def test_apply_if_finite_skips_nan_steps():
    tx = optax.apply_if_finite(optax.chain(optax_gc.centralize(), optax.sgd(1.0)), 3)
    grads = _grads()
    state = tx.init(grads)
    out, state = jax.jit(tx.update)(grads, state, grads)
    np.testing.assert_allclose(_fan_in_mean(out["conv"]["kernel"], (-1,)), 0, atol=1e-6)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    out, state = jax.jit(tx.update)(bad, state, grads)
    assert int(state.notfinite_count) == 1
    assert all(not np.isnan(np.asarray(x)).any() for x in jax.tree.leaves(out))
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))


def test_clip_by_global_norm_before_gc():
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax_gc.centralize())
    grads = _grads()
    out, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
    clipped, _ = optax.clip_by_global_norm(0.5).update(grads, None)
    expected, _ = optax_gc.centralize().update(clipped, None)
    assert_trees_close(out, expected, rtol=1e-5, atol=1e-7)
    assert float(optax.tree.norm(out)) <= 0.5 + 1e-6  # Φ never grows the norm


# --- Orbax checkpoint round trip --------------------------------------------------


def test_orbax_checkpoint_resume(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = optax_gc.gc_adam(1e-2, weight_decay=1e-4)
    batches = [_batch(s) for s in range(10)]
    state = _linen_state(tx)
    for b in batches[:5]:
        state = _linen_step(state, b)

    ckpt = ocp.StandardCheckpointer()
    saveable = {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "step": state.step,
    }
    ckpt.save(tmp_path / "ckpt", saveable)
    ckpt.wait_until_finished()

    uninterrupted = state
    for b in batches[5:]:
        uninterrupted = _linen_step(uninterrupted, b)

    fresh = _linen_state(tx)
    target = {
        "params": fresh.params,
        "batch_stats": fresh.batch_stats,
        "opt_state": fresh.opt_state,
        "step": fresh.step,
    }
    restored = ckpt.restore(tmp_path / "ckpt", target)
    ckpt.close()
    resumed = fresh.replace(**restored)
    for b in batches[5:]:
        resumed = _linen_step(resumed, b)
    assert_trees_equal(resumed.params, uninterrupted.params)
    assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)


# --- mixed precision ------------------------------------------------------------------


def test_bf16_params_and_grads_through_a_flax_step():
    class BF16Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}
            x = nn.relu(nn.Conv(8, (3, 3), **kw)(x))
            return nn.Dense(10, **kw)(x.mean(axis=(1, 2)))

    x, y = _batch()
    model = BF16Net()
    params = model.init(jax.random.key(0), x.astype(jnp.bfloat16))["params"]
    tx = optax.chain(optax_gc.centralize(), optax.sgd(0.1))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = model.apply({"params": p}, x.astype(jnp.bfloat16))
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), y
            ).mean()

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    new_params, _, grads = step(params, state)
    # GC on its own (inside the step XLA may keep excess f32 precision).
    gc_grads = jax.jit(lambda g: optax_gc.centralize().update(g, None)[0])(grads)
    for tree in (new_params, grads, gc_grads):
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(tree))
    raw, out = _leaves(grads), _leaves(gc_grads)
    for k in raw:
        if k.endswith("kernel"):
            g = out[k]
            # Zero within bf16 rounding of each element.
            scale = np.abs(np.asarray(raw[k], np.float32)).max()
            np.testing.assert_allclose(_fan_in_mean(g, (-1,)), 0.0, atol=8e-3 * scale)
            # Computed in float32, rounded once to bf16.
            g32 = np.asarray(raw[k], np.float32)
            keep = g32.ndim - 1
            ref = g32 - g32.mean(axis=tuple(range(keep)), keepdims=True)
            np.testing.assert_array_equal(
                np.asarray(g, np.float32),
                np.asarray(jnp.asarray(ref).astype(jnp.bfloat16), np.float32),
            )
        else:
            np.testing.assert_array_equal(out[k], raw[k])
