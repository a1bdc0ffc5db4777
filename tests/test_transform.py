"""centralize() and centralize_array(): values, leaf rules, errors, contract."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_gc
from tests.helpers import assert_trees_equal, fan_in_means


def _update(tx, grads, params=None, **extra):
    """One jitted update (the default way the tests run transforms)."""
    params = grads if params is None else params
    state = tx.init(params)
    return jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state, params)


def _gc(grads, **kwargs):
    return _update(optax_gc.centralize(**kwargs), grads)[0]


# --- hand-computed values ----------------------------------------------------

DENSE = np.array([[1.0, 10.0, 0.0], [3.0, 30.0, 6.0]], np.float32)  # (in=2, out=3)


def test_dense_flax_layout():
    # Column means over the fan-in (axis 0): [2, 20, 3].
    expected = np.array([[-1.0, -10.0, -3.0], [1.0, 10.0, 3.0]])
    np.testing.assert_allclose(_gc({"k": DENSE})["k"], expected, rtol=1e-6)


def test_dense_torch_layout():
    # Row means over the fan-in (axis 1): [11/3, 13].
    expected = np.array([[1 - 11 / 3, 10 - 11 / 3, -11 / 3], [-10.0, 17.0, -7.0]])
    np.testing.assert_allclose(
        _gc({"k": DENSE}, output_axes=0)["k"], expected, rtol=1e-6
    )


def test_conv_flax_and_torch_layouts_agree():
    # (kh, kw, in, out) = (2, 1, 2, 2): output unit 0 has fan-in [1, 2, 3, 6]
    # (mean 3), unit 1 has [0, 4, 8, 4] (mean 4).
    flax = np.zeros((2, 1, 2, 2), np.float32)
    flax[..., 0] = np.array([[1.0, 2.0], [3.0, 6.0]])[:, None, :]
    flax[..., 1] = np.array([[0.0, 4.0], [8.0, 4.0]])[:, None, :]
    expected = flax - np.array([3.0, 4.0])
    np.testing.assert_allclose(_gc({"k": flax})["k"], expected, rtol=1e-6)
    torch = np.transpose(flax, (3, 2, 0, 1))  # (out, in, kh, kw)
    got = _gc({"k": torch}, output_axes=0)["k"]
    np.testing.assert_allclose(got, np.transpose(expected, (3, 2, 0, 1)), rtol=1e-6)


def test_multi_axis_attention_kernel():
    # DenseGeneral q/k/v kernel (in=2, H=2, D=1): each (head, dim) unit has its
    # own 2-element fan-in; nothing is averaged across heads.
    k = np.array([[[1.0], [10.0]], [[5.0], [30.0]]], np.float32)
    expected = np.array([[[-2.0], [-10.0]], [[2.0], [10.0]]])
    np.testing.assert_allclose(_gc({"k": k}, output_axes=(1, 2))["k"], expected)


def test_stacked_layers_are_not_mixed():
    # scan-stacked (L=2, in=2, out=1): layer 1 is centred by its own mean.
    k = np.array([[[1.0], [3.0]], [[100.0], [300.0]]], np.float32)
    expected = np.array([[[-1.0], [1.0]], [[-100.0], [100.0]]])
    np.testing.assert_allclose(_gc({"k": k}, output_axes=(0, -1))["k"], expected)


def test_per_leaf_callable():
    grads = {
        "embed": np.array([[1.0, 2.0], [3.0, 5.0]], np.float32),
        "dense": DENSE,
        "eqx": DENSE.T.copy(),
    }
    seen = []

    def rule(path, leaf):
        name = path[-1].key
        seen.append((name, leaf.shape))
        return {"embed": None, "dense": -1, "eqx": 0}[name]

    out = _gc(grads, output_axes=optax_gc.per_leaf(rule))
    np.testing.assert_array_equal(out["embed"], grads["embed"])
    np.testing.assert_allclose(out["dense"], _gc({"k": DENSE})["k"], rtol=1e-6)
    np.testing.assert_allclose(out["eqx"], out["dense"].T, rtol=1e-6)
    assert sorted(seen) == [("dense", (2, 3)), ("embed", (2, 2)), ("eqx", (3, 2))]


def test_callable_sees_only_eligible_leaves():
    seen = []
    grads = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "i": jnp.ones((2, 2), jnp.int32)}
    _gc(grads, output_axes=optax_gc.per_leaf(lambda p, x: seen.append(p) or -1))
    assert [jax.tree_util.keystr(p) for p in seen] == ["['w']"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(4, 3), (5, 3, 2), (3, 3, 4, 6), (2, 3, 3, 2, 5)])
def test_output_axes_0_equals_optax_centralize_bit_for_bit(shape, seed, dtype):
    # Where the docstring says they agree: float/complex, ndim >= 2, fan-in >= 2.
    g = jax.random.normal(jax.random.key(seed), shape).astype(dtype)
    ours = _gc({"g": g}, output_axes=0)["g"]
    theirs = _update(optax.centralize(), {"g": g})[0]["g"]
    np.testing.assert_array_equal(ours, theirs)


def test_output_axes_0_equals_optax_centralize_in_float64():
    code = (
        "import jax, jax.numpy as jnp, numpy as np, optax, optax_gc\n"
        "g = {'g': jax.random.normal(jax.random.key(0), (3, 3, 4, 6), jnp.float64)}\n"
        "ours = optax_gc.centralize(output_axes=0).update(g, None)[0]['g']\n"
        "theirs = optax.centralize().update(g, None)[0]['g']\n"
        "assert ours.dtype == jnp.float64, ours.dtype\n"
        "np.testing.assert_array_equal(ours, theirs)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_output_axes_0_differs_from_optax_centralize_where_documented():
    def both(g):
        return (
            np.asarray(_gc({"g": g}, output_axes=0)["g"], np.float32),
            np.asarray(_update(optax.centralize(), {"g": g})[0]["g"], np.float32),
        )

    ours, theirs = both(jnp.arange(1.0, 4.0).reshape(3, 1))  # fan-in 1
    np.testing.assert_array_equal(ours, [[1.0], [2.0], [3.0]])
    np.testing.assert_array_equal(theirs, 0.0)
    # bf16: one rounding of the float32 result here, a bf16 subtraction there.
    g = (jax.random.normal(jax.random.key(0), (4, 64)) * 3 + 1).astype(jnp.bfloat16)
    ours, theirs = both(g)
    g32 = np.asarray(g, np.float32)
    expected = np.asarray((g32 - g32.mean(1, keepdims=True)).astype(jnp.bfloat16))
    np.testing.assert_array_equal(ours, np.asarray(expected, np.float32))
    assert not np.array_equal(ours, theirs)


def test_default_differs_from_optax_centralize_on_flax_kernels():
    g = jax.random.normal(jax.random.key(0), (8, 4))
    ours = _gc({"g": g})["g"]
    theirs = _update(optax.centralize(), {"g": g})[0]["g"]
    assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() > 0.1
    np.testing.assert_allclose(np.asarray(ours).mean(0), 0.0, atol=1e-6)


def test_centralize_array_matches_transform():
    g = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    for axes in (-1, 0, (2, 3)):
        np.testing.assert_allclose(
            optax_gc.centralize_array(g, output_axes=axes),
            _gc({"g": g}, output_axes=axes)["g"],
            rtol=1e-6,
            atol=1e-6,
        )


def test_centralize_array_leaves_single_fan_in_alone():
    g = jnp.arange(3.0).reshape(1, 3)
    np.testing.assert_array_equal(optax_gc.centralize_array(g), g)


# --- which leaves are touched -------------------------------------------------


def test_untouched_leaves_are_bit_identical():
    grads = {
        "bias": jnp.arange(3.0),
        "scalar": jnp.float32(2.5),
        "ints": jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
        "bools": jnp.ones((2, 3), bool),
        "empty": jnp.zeros((0, 3)),
        "one_input": jnp.arange(4.0).reshape(1, 4),  # Dense with in=1
        "depthwise_1x1": jnp.arange(4.0).reshape(1, 1, 1, 4),
        "none": None,
        "masked": optax.MaskedNode(),
    }
    out = _gc(grads)
    assert_trees_equal(out, grads)
    assert out["none"] is None and isinstance(out["masked"], optax.MaskedNode)


def test_no_nan_on_empty_and_single_fan_in():
    out = _gc({"a": jnp.zeros((0, 3)), "b": jnp.ones((1, 3)), "c": jnp.ones((3, 0))})
    assert all(not np.isnan(np.asarray(x)).any() for x in jax.tree.leaves(out))


def test_conv_only_skips_dense_and_conv1d():
    grads = {
        "dense": DENSE,
        "conv1d": np.ones((3, 2, 4), np.float32) * np.arange(3.0)[:, None, None],
        "conv2d": np.arange(16.0, dtype=np.float32).reshape(2, 2, 2, 2),
    }
    out = _gc(grads, conv_only=True)
    np.testing.assert_array_equal(out["dense"], DENSE)
    np.testing.assert_array_equal(out["conv1d"], grads["conv1d"])
    np.testing.assert_allclose(fan_in_means(out)["conv2d"], 0.0, atol=1e-6)
    out_all = _gc(grads)
    np.testing.assert_allclose(fan_in_means(out_all)["conv1d"], 0.0, atol=1e-6)


def test_complex_leaves_are_centred_as_complex():
    g = jnp.array([[1 + 2j, 0j], [3 - 4j, 2j]], jnp.complex64)
    expected = np.array([[-1 + 3j, -1j], [1 - 3j, 1j]])
    out = _gc({"g": g})["g"]
    assert out.dtype == jnp.complex64
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64]
)
def test_dtype_and_shape_kept(dtype):
    g = jax.random.normal(jax.random.key(0), (3, 3, 8, 4)).astype(dtype)
    out = _gc({"g": g})["g"]
    assert out.dtype == dtype and out.shape == g.shape


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_mean_accumulated_in_float32(dtype):
    # 4096 fan-in entries of 1 + tiny offset: a bf16/f16 running sum would lose
    # them; the f32 mean gives the exact centred values, rounded once.
    g = (jnp.ones((4096, 2)) + jnp.linspace(0, 1, 4096)[:, None]).astype(dtype)
    out = _gc({"g": g})["g"]
    g32 = np.asarray(g, np.float32)
    expected = (g32 - g32.mean(0)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["-1", 1.5, True, (), (0, 0), (0, "a"), {"a": "x"}, {"a": 1.5}, {}, [], None],
)
def test_bad_output_axes_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="output_axes"):
        optax_gc.centralize(output_axes=bad)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_conv_only_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="conv_only"):
        optax_gc.centralize(conv_only=bad)


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        (2, "out of range"),
        (-3, "out of range"),
        ((0, -2), "same axis twice"),
        ((0, 1), "keeps every axis"),
    ],
)
def test_axes_that_do_not_fit_a_leaf_name_its_path(axes, message):
    tx = optax_gc.centralize(output_axes=axes)
    grads = {"params": {"Dense_0": {"kernel": jnp.ones((3, 4))}}}
    with pytest.raises(ValueError, match=message) as info:
        _update(tx, grads)
    assert '"params/Dense_0/kernel"' in str(info.value)  # the path_rules form
    assert "output_axes" in str(info.value)


@pytest.mark.parametrize("bad", [1.0, (0, 0), "x", (3,)])
def test_bad_callable_result_names_the_path(bad):
    tx = optax_gc.centralize(output_axes=optax_gc.per_leaf(lambda p, x: bad))
    with pytest.raises(ValueError, match="output_axes") as info:
        _update(tx, {"layer": {"w": jnp.ones((2, 3))}})
    assert '"layer/w"' in str(info.value)


def test_centralize_array_rejects_integers_and_bad_axes():
    with pytest.raises(ValueError, match="floating or complex"):
        optax_gc.centralize_array(jnp.ones((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="keeps every axis"):
        optax_gc.centralize_array(jnp.ones(3))
    with pytest.raises(ValueError, match="output_axes"):
        optax_gc.centralize_array(jnp.ones((2, 2)), output_axes=(0.5,))


@pytest.mark.parametrize("bad", ["model", 3, {"w": "model"}, [P("a"), 1]])
def test_bad_partition_specs_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="partition_specs"):
        optax_gc.centralize(partition_specs=bad)


def test_partition_specs_outside_shard_map_is_a_clear_error():
    tx = optax_gc.centralize(partition_specs={"w": P("model", None)})
    with pytest.raises(ValueError, match='"w".*shard_map'):
        _update(tx, {"w": jnp.ones((4, 3))})


def test_partition_specs_structure_mismatch_is_a_clear_error():
    tx = optax_gc.centralize(partition_specs={"v": P(), "w": P()})
    with pytest.raises(ValueError, match="partition_specs.*structure"):
        _update(tx, {"w": jnp.ones((4, 3))})


def test_replicated_partition_specs_change_nothing():
    grads = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
    tx = optax_gc.centralize(partition_specs={"w": P(None, None), "b": P()})
    assert_trees_equal(_update(tx, grads)[0], _gc(grads))
