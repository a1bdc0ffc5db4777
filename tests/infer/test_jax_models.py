"""`infer_output_axes` on models written with jax.numpy and lax only.

Each case is a small model, the shapes of its parameters, example inputs and
the output axes of every leaf derived by hand from the model's own code (the
comment on each entry gives the derivation). Then real gradients centred with
the inferred rule, and a few steps of ``gc_adamw`` that keep every kernel's
per-output-unit mean weight where it started.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_gc
from optax_gc._axes import path_str
from tests.helpers import fan_in_means

F32 = jnp.float32
_STACKED = "dot_general contracts axis 1; stacked axis 0 kept"


def _spec(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


class Case(NamedTuple):
    fn: Any  # fn(params, *args)
    params: Any  # tree of ShapeDtypeStruct (or None)
    args: tuple  # example inputs, ShapeDtypeStruct
    expected: dict  # {path: axes or None}, every leaf
    reasons: dict  # {path: reason}: exact, or a prefix for _EW / "uses disagree"


# --- the models -------------------------------------------------------------------


def _fori(p, x):  # (a) a stack indexed by the loop counter
    def body(i, h):
        return jnp.tanh(h @ p["w"][i] + p["b"][i][None, :])

    return jax.lax.fori_loop(0, 3, body, x)


def _while(p, x):  # (a) the same with an explicit while_loop
    def body(carry):
        i, h = carry
        return i + 1, jnp.tanh(h @ p["w"][i] + p["b"][i][None, :])

    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]


def _remat(p, x):  # (b)
    layer = jax.checkpoint(lambda w, b, h: jnp.tanh(h @ w + b[None, :]))
    return layer(p["w1"], p["b1"], x) @ p["w2"]


@jax.custom_vjp
def _matmul(x, w):
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _custom_vjp(p, x):  # (c)
    return jnp.tanh(_matmul(x, p["w"])) @ p["head"]


def _weight_norm(p, x):  # (d) w = g * v / ||v||, norm over the fan-in axis 0
    v = p["v"]
    w = p["g"][None, :] * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
    return x @ w


def _torch_conv(p, x):  # (e) x: NCHW; w: (out, in, kh, kw) as in PyTorch
    patches = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "VALID")
    w = p["w"].reshape(p["w"].shape[0], -1)  # (out, in * kh * kw)
    y = jnp.einsum("nphw,op->nohw", patches, w)  # patches: (N, in*kh*kw, H, W)
    return y + p["b"][None, :, None, None]


def _transposed(p, x):  # (f)
    return jnp.tanh(x @ p["w"].T + p["b"][None, :]) @ p["head"].T


def _member(p, x):
    return jnp.tanh(x @ p["w"] + p["b"][None, :]) @ p["head"]


def _ensemble(p, x):  # (g) E stacked members, each with its own data
    return jax.vmap(_member)(p, x)


def _ensemble_shared(p, x):  # (g) E stacked members, the same data
    return jax.vmap(_member, in_axes=(0, None))(p, x)


def _scan(p, x):  # (h)
    def layer(h, lp):
        return jnp.tanh(h @ lp["w"] + lp["b"][None, :]), None

    return jax.lax.scan(layer, x, p["layers"])[0] @ p["head"]


def _cond_same(p, x):  # (i) both branches use w as a (in, out) kernel
    return jax.lax.cond(
        x.sum() > 0,
        lambda x: jnp.tanh(x @ p["w"]),
        lambda x: jax.nn.relu(x @ p["w"]),
        x,
    )


def _cond_disagree(p, x):  # (i) one branch applies w, the other w.T
    return (
        jax.lax.cond(x.sum() > 0, lambda x: x @ p["w"], lambda x: x @ p["w"].T, x)
        @ p["head"]
    )


def _tied(p, tokens):  # (j)
    h = p["table"][tokens] + p["pos"][None]  # (B, T, D)
    h = jnp.tanh(h @ p["w"])
    return h @ p["table"].T  # logits over the vocabulary


def _misc(p, x):  # (k) p["none"] is None
    decay = 0.5 ** p["step"].astype(F32)  # data-independent scalar
    h = jnp.tanh(x @ (p["w"] * decay))
    return h @ jax.lax.stop_gradient(p["frozen"])


def _qr(p, x):  # (l)
    q, _ = jnp.linalg.qr(p["w"])
    return jnp.tanh(x @ q) @ p["head"]


def _callback(p, x):  # (l)
    w = jax.pure_callback(
        lambda a: np.asarray(a), jax.ShapeDtypeStruct(p["w"].shape, F32), p["w"]
    )
    return jnp.tanh(x @ w) @ p["head"]


_dense = jax.jit(lambda w, b, x: jnp.tanh(x @ w + b[None, :]))


def _jit(p, x):  # (m)
    return _dense(p["w2"], p["b2"], _dense(p["w1"], p["b1"], x))


def _shard_map(p, x):  # (m)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # jax < 0.6
        from jax.experimental.shard_map import shard_map
    f = shard_map(
        lambda w, x: jnp.tanh(x @ w),
        mesh=mesh,
        in_specs=(P(), P("d")),
        out_specs=P("d"),
    )
    return f(p["w"], x) @ p["head"]


_EW = "elementwise only"  # prefix
_LIN0 = "dot_general contracts axis 0"
_LIN1 = "dot_general contracts axis 1"

CASES = {
    "fori_loop": Case(
        _fori,
        {"w": _spec(3, 4, 4), "b": _spec(3, 4)},
        (_spec(2, 4),),
        # w[i]: (in, out) per layer, contracts axis 1 of the (L, in, out) stack
        {"w": (0, 2), "b": None},
        {"w": _STACKED, "b": _EW},
    ),
    "while_loop": Case(
        _while,
        {"w": _spec(3, 4, 4), "b": _spec(3, 4)},
        (_spec(2, 4),),
        {"w": (0, 2), "b": None},
        {"w": _STACKED, "b": _EW},
    ),
    "checkpoint": Case(
        _remat,
        {"w1": _spec(3, 5), "b1": _spec(5), "w2": _spec(5, 2)},
        (_spec(2, 3),),
        {"w1": (1,), "b1": None, "w2": (1,)},
        {"w1": _LIN0, "b1": _EW, "w2": _LIN0},
    ),
    "custom_vjp": Case(
        _custom_vjp,
        {"w": _spec(3, 5), "head": _spec(5, 2)},
        (_spec(2, 3),),
        {"w": (1,), "head": (1,)},  # x @ w inside the custom_vjp primal
        {"w": _LIN0, "head": _LIN0},
    ),
    "weight_norm": Case(
        _weight_norm,
        {"v": _spec(3, 5), "g": _spec(5)},
        (_spec(2, 3),),
        # v: (in, out), the normalized w contracts axis 0 with x.
        # g: one scale per output unit; its only axis is an output axis, so
        # it has no fan-in at all: GC must leave it alone.
        {"v": (1,), "g": None},
        {"v": _LIN0},
    ),
    "torch_conv_patches": Case(
        _torch_conv,
        {"w": _spec(4, 2, 3, 3), "b": _spec(4)},
        (_spec(2, 2, 6, 6),),
        # reshape merges (in, kh, kw) into the contracted patch axis
        {"w": (0,), "b": None},
        {"w": "dot_general contracts axes (1, 2, 3)", "b": _EW},
    ),
    "x_at_w_T": Case(
        _transposed,
        {"w": _spec(5, 3), "b": _spec(5), "head": _spec(2, 5)},
        (_spec(4, 3),),
        {"w": (0,), "b": None, "head": (0,)},  # (out, in), x @ w.T contracts in
        {"w": _LIN1, "b": _EW, "head": _LIN1},
    ),
    "vmap_ensemble": Case(
        _ensemble,
        {"w": _spec(3, 4, 5), "b": _spec(3, 5), "head": _spec(3, 5, 2)},
        (_spec(3, 6, 4),),
        # member axis 0 is mapped (a batch dim of the dot): kept, not stacked
        {"w": (0, 2), "b": None, "head": (0, 2)},
        {"w": _LIN1, "b": _EW, "head": _LIN1},
    ),
    "vmap_ensemble_shared_data": Case(
        _ensemble_shared,
        {"w": _spec(3, 4, 5), "b": _spec(3, 5), "head": _spec(3, 5, 2)},
        (_spec(6, 4),),
        {"w": (0, 2), "b": None, "head": (0, 2)},
        {"w": _LIN1, "b": _EW, "head": _LIN1},
    ),
    "scan_layers": Case(
        _scan,
        {
            "layers": {"w": _spec(3, 4, 4), "b": _spec(3, 4)},
            "head": _spec(4, 2),
        },
        (_spec(2, 4),),
        {"layers/w": (0, 2), "layers/b": None, "head": (1,)},
        {"layers/w": _STACKED, "layers/b": _EW, "head": _LIN0},
    ),
    "cond_same_use": Case(
        _cond_same,
        {"w": _spec(4, 4)},
        (_spec(2, 4),),
        {"w": (1,)},
        {"w": _LIN0 + " (2 uses)"},  # one use per branch
    ),
    "cond_disagree": Case(
        _cond_disagree,
        {"w": _spec(4, 4), "head": _spec(4, 2)},
        (_spec(2, 4),),
        {"w": None, "head": (1,)},  # axis 0 in one branch, axis 1 in the other
        {"w": "uses disagree", "head": _LIN0},
    ),
    "tied_embedding": Case(
        _tied,
        {"table": _spec(7, 4), "pos": _spec(5, 4), "w": _spec(4, 4)},
        (_spec(2, 5, dtype=jnp.int32),),
        {"table": None, "pos": None, "w": (1,)},
        {"table": "tied lookup and matmul", "pos": _EW, "w": _LIN0},
    ),
    "none_int_frozen": Case(
        _misc,
        {
            "w": _spec(3, 4),
            "none": None,
            "step": _spec(dtype=jnp.int32),
            "frozen": _spec(4, 2),
        },
        (_spec(2, 3),),
        # None is no leaf; the step scalar has no axis to keep or average;
        # frozen is used under stop_gradient only: its gradient is zero, and
        # nothing of it reaches a use.
        {"w": (1,), "step": None, "frozen": None},
        {"w": _LIN0, "frozen": "used only under stop_gradient: no gradient reaches it"},
    ),
    "qr": Case(
        _qr,
        {"w": _spec(4, 4), "head": _spec(4, 2)},
        (_spec(2, 4),),
        {"w": None, "head": (1,)},
        {"w": "unsupported op: qr", "head": _LIN0},
    ),
    "pure_callback": Case(
        _callback,
        {"w": _spec(4, 4), "head": _spec(4, 2)},
        (_spec(2, 4),),
        {"w": None, "head": (1,)},
        {"w": "unsupported op: pure_callback", "head": _LIN0},
    ),
    "jit_subfunction": Case(
        _jit,
        {"w1": _spec(3, 5), "b1": _spec(5), "w2": _spec(5, 4), "b2": _spec(4)},
        (_spec(2, 3),),
        {"w1": (1,), "b1": None, "w2": (1,), "b2": None},
        {"w1": _LIN0, "b1": _EW, "w2": _LIN0, "b2": _EW},
    ),
    "shard_map": Case(
        _shard_map,
        {"w": _spec(3, 5), "head": _spec(5, 2)},
        (_spec(2, 3),),
        {"w": (1,), "head": (1,)},
        {"w": _LIN0, "head": _LIN0},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inferred_axes_match_hand_derivation(name):
    case = CASES[name]
    rule = optax_gc.infer_output_axes(case.fn, case.params, *case.args)
    assert {path: axes for path, (axes, _) in rule.decisions.items()} == (case.expected)
    for path, want in case.reasons.items():
        got = rule.decisions[path][1]
        if want in (_EW, "uses disagree"):
            assert got.startswith(want), (path, got)
        else:
            assert got == want, (path, got)


def test_fori_loop_with_data_dependent_index_is_a_lookup():
    """Indexing the stack with data (not the loop counter) is a lookup."""

    def fn(p, x, layer):
        return jnp.tanh(x @ p["w"][layer])

    with pytest.warns(optax_gc.InferenceWarning, match="none of the 1 leaf"):
        rule = optax_gc.infer_output_axes(
            fn, {"w": _spec(3, 4, 4)}, _spec(2, 4), _spec(dtype=jnp.int32)
        )
    assert rule.decisions == {"w": (None, "lookup")}


def test_torch_conv_patches_model_is_a_convolution():
    """Case (e) computes the OIHW convolution (the oracle's premise)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4, 2, 3, 3)), F32)
    x = jnp.asarray(rng.standard_normal((2, 2, 6, 6)), F32)
    y = _torch_conv({"w": w, "b": jnp.zeros(4)}, x)
    ref = jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# --- real gradients -----------------------------------------------------------------


def _random(tree, seed):
    """Normal(0, 0.5) arrays (NumPy: no per-shape jax.random compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(
            rng.integers(0, 7, s.shape)
            if jnp.issubdtype(s.dtype, jnp.integer)
            else 0.5 * rng.standard_normal(s.shape),
            s.dtype,
        ),
        tree,
    )


def _flat(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]  # paths as "a/b"
    return [(path_str(p), x) for p, x in flat]


# No gradient through pure_callback or a while_loop (reverse mode); the
# integer leaf is differentiated apart, below.
_NO_GRAD = ("pure_callback", "while_loop", "none_int_frozen")


@pytest.mark.parametrize("name", sorted(set(CASES) - set(_NO_GRAD)))
def test_real_gradients_centred_over_inferred_fan_in(name):
    case = CASES[name]
    params, args = _random(case.params, 0), _random(case.args, 1)
    rule = optax_gc.infer_output_axes(case.fn, params, *args)

    def loss(p):
        out = case.fn(p, *args)
        return jnp.mean(jnp.sin(3.0 * out) + out**2)

    grads = jax.jit(jax.grad(loss))(params)
    gc, _ = optax_gc.centralize(output_axes=rule).update(grads, None)
    raw = dict(_flat(grads))
    out = dict(_flat(gc))
    for path, (axes, _) in rule.decisions.items():
        if axes is None:
            np.testing.assert_array_equal(out[path], raw[path])
            continue
        scale = float(np.abs(raw[path]).max())
        mean = fan_in_means(out[path], axes, min_ndim=0)
        np.testing.assert_allclose(mean, 0.0, atol=1e-5 * scale, err_msg=path)
        raw_mean = fan_in_means(raw[path], axes, min_ndim=0)
        assert np.abs(raw_mean).max() > 1e-4 * scale, path  # GC did work


def test_frozen_and_integer_leaves_under_real_gradients():
    """Case (k): gradients of the float leaves; frozen's is zero and stays so."""
    case = CASES["none_int_frozen"]
    params, (x,) = _random(case.params, 0), _random(case.args, 1)
    rule = optax_gc.infer_output_axes(case.fn, params, x)
    floats = {k: params[k] for k in ("w", "frozen")}
    rest = {k: params[k] for k in ("none", "step")}
    grads = jax.grad(lambda f: jnp.sum(case.fn({**f, **rest}, x) ** 2))(floats)
    gc, _ = optax_gc.centralize(output_axes=rule).update(grads, None)
    np.testing.assert_array_equal(gc["frozen"], np.zeros((4, 2)))
    np.testing.assert_allclose(fan_in_means(gc["w"], (1,)), 0.0, atol=1e-6)


# --- training with gc_adamw -----------------------------------------------------------


def _train_model(p, x):
    h = jnp.tanh(x @ p["proj"].T + p["proj_b"][None, :])  # proj: (out, in)
    h = jnp.einsum("bi,ihd->bhd", h, p["heads"])  # heads: (in, H, D)
    h = jnp.tanh(h.reshape(h.shape[0], -1))
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"])
    return h @ p["out"]


_TRAIN_PARAMS = {
    "proj": _spec(8, 4),
    "proj_b": _spec(8),
    "heads": _spec(8, 2, 3),
    "stack": _spec(3, 6, 6),
    "out": _spec(6, 2),
}
_TRAIN_AXES = {
    "proj": (0,),  # x @ proj.T contracts axis 1
    "proj_b": None,
    "heads": (1, 2),  # einsum contracts i, keeps (H, D)
    "stack": (0, 2),  # scan slices L, each (in, out) contracts in
    "out": (1,),
}


def _train(tx, steps=5):
    params = _random(_TRAIN_PARAMS, 0)
    x = _random(_spec(16, 4), 1)
    y = _random(_spec(16, 2), 2)

    def loss(p):
        return jnp.mean((_train_model(p, x) - y) ** 2)

    @jax.jit
    def step(p, state):
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for _ in range(steps):
        p, state = step(p, state)
    return params, p


def test_gc_adamw_keeps_each_output_unit_mean_weight():
    rule = optax_gc.infer_output_axes(_train_model, _TRAIN_PARAMS, _spec(16, 4))
    assert {k: a for k, (a, _) in rule.decisions.items()} == _TRAIN_AXES
    kernels = {k: a for k, a in _TRAIN_AXES.items() if a is not None}

    init, gc_final = _train(
        optax_gc.gc_adamw(1e-2, weight_decay=1e-2, location="update", output_axes=rule)
    )
    for k, axes in kernels.items():
        assert np.abs(gc_final[k] - init[k]).max() > 1e-3, k  # it trained
        np.testing.assert_allclose(
            fan_in_means(gc_final[k], axes, min_ndim=0),
            fan_in_means(init[k], axes, min_ndim=0),
            atol=1e-5,
            err_msg=k,
        )
    # the bias is not centralized: it moves like any adamw parameter
    assert np.abs(gc_final["proj_b"] - init["proj_b"]).max() > 1e-3

    _, plain_final = _train(optax.adamw(1e-2, weight_decay=1e-2))
    for k, axes in kernels.items():
        moved = fan_in_means(plain_final[k], axes, min_ndim=0) - fan_in_means(
            init[k], axes, min_ndim=0
        )
        assert np.abs(moved).max() > 1e-3, k
