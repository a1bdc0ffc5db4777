"""Properties of Φ over random shapes, axes, dtypes and pytrees (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optax_gc

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
ELEMENTS = st.floats(-100, 100, width=32, allow_subnormal=False)


@st.composite
def arrays_and_axes(draw):
    """A float32 array of ndim 2..5 and a proper, non-empty set of kept axes."""
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=5, min_side=1, max_side=5))
    g = draw(hnp.arrays(np.float32, shape, elements=ELEMENTS))
    ndim = len(shape)
    kept = draw(st.sets(st.integers(0, ndim - 1), min_size=1, max_size=ndim - 1))
    # Mix positive and negative spellings of the same axes.
    axes = tuple(a - ndim if draw(st.booleans()) else a for a in sorted(kept))
    return g, axes


def _fan_in(g, axes):
    keep = {a % g.ndim for a in axes}
    return tuple(a for a in range(g.ndim) if a not in keep)


def _tol(g):
    return 1e-5 * (1.0 + float(np.abs(g).max()))


@SETTINGS
@given(arrays_and_axes())
def test_fan_in_means_are_zero(case):
    g, axes = case
    out = np.asarray(optax_gc.centralize_array(g, axes), np.float64)
    fan_in = _fan_in(g, axes)
    if np.prod([g.shape[a] for a in fan_in]) == 1:
        np.testing.assert_array_equal(out, g)  # single fan-in: untouched
    else:
        np.testing.assert_allclose(out.mean(axis=fan_in), 0.0, atol=_tol(g))


@SETTINGS
@given(arrays_and_axes())
def test_idempotent(case):
    g, axes = case
    once = optax_gc.centralize_array(g, axes)
    twice = optax_gc.centralize_array(once, axes)
    np.testing.assert_allclose(twice, once, atol=_tol(g))


@SETTINGS
@given(arrays_and_axes())
def test_orthogonal_projection_and_norm(case):
    g, axes = case
    phi = np.asarray(optax_gc.centralize_array(g, axes), np.float64)
    g64 = g.astype(np.float64)
    scale = 1.0 + float(np.sum(g64**2))
    assert abs(np.vdot(phi, g64 - phi)) <= 1e-5 * scale
    assert np.linalg.norm(phi) <= np.linalg.norm(g64) * (1 + 1e-6) + 1e-6


@SETTINGS
@given(arrays_and_axes(), st.floats(-3, 3), st.floats(-3, 3), st.integers(0, 2**31))
def test_linear(case, a, b, seed):
    g, axes = case
    h = np.random.default_rng(seed).normal(size=g.shape).astype(np.float32)
    lhs = optax_gc.centralize_array(a * g + b * h, axes)
    rhs = a * optax_gc.centralize_array(g, axes) + b * optax_gc.centralize_array(
        h, axes
    )
    np.testing.assert_allclose(lhs, rhs, atol=10 * _tol(g) * (1 + abs(a) + abs(b)))


@SETTINGS
@given(
    hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=4),
    st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64]),
    st.integers(0, 2**31),
)
def test_dtypes_kept_and_means_zero(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=shape)
    if dtype == jnp.complex64:
        g = g + 1j * rng.normal(size=shape)
    g = jnp.asarray(g).astype(dtype)
    out = optax_gc.centralize_array(g)
    assert out.dtype == dtype and out.shape == g.shape
    means = np.asarray(out.astype(jnp.complex64)).mean(
        axis=tuple(range(len(shape) - 1))
    )
    atol = 1e-5 if dtype in (jnp.float32, jnp.complex64) else 2e-2
    np.testing.assert_allclose(means, 0.0, atol=atol)


LEAVES = st.one_of(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=1), elements=ELEMENTS),
    hnp.arrays(np.int32, hnp.array_shapes(min_dims=0, max_dims=4, max_side=3)),
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=4, max_side=3),
        elements=ELEMENTS,
    ),
    st.just(None),
    st.just(optax.MaskedNode()),
)
TREES = st.recursive(
    LEAVES,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.dictionaries(st.text("abcdef", min_size=1, max_size=3), kids, max_size=3),
    ),
    max_leaves=8,
)


@SETTINGS
@given(TREES, st.booleans())
def test_random_pytrees(tree, conv_only):
    """Eligible leaves are centred; every other leaf comes back bit-identical."""
    tx = optax_gc.centralize(conv_only=conv_only)
    out, _ = tx.update(tree, tx.init(tree))
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    min_ndim = 4 if conv_only else 2
    for g, o in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        fan_in = g.shape[:-1] if g.ndim else ()
        eligible = (
            g.dtype == np.float32
            and g.ndim >= min_ndim
            and g.size > 0
            and int(np.prod(fan_in)) > 1
        )
        if eligible:
            means = np.asarray(o, np.float64).mean(axis=tuple(range(g.ndim - 1)))
            np.testing.assert_allclose(means, 0.0, atol=_tol(g))
        else:
            assert o is g or (o.dtype == g.dtype and np.array_equal(o, g))
