"""Blocked fan-in means against numpy: every view, ragged tails, shared loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gc import _blocked


@pytest.mark.parametrize(
    ("shape", "axes", "view"),
    [
        ((3, 3, 16, 8), (3,), (144, 8, True)),
        ((12, 4, 6), (1, 2), (12, 24, True)),
        ((8, 16, 3, 3), (0,), (8, 144, False)),
        ((5, 7), (0, 1), (1, 35, True)),
        ((4, 6, 8), (0, 2), None),
    ],
)
def test_matrix_view(shape, axes, view):
    assert _blocked.matrix_view(shape, axes) == view


def _job(shape, axes, fn, inputs, scalars=(), dtype=jnp.float32):
    return _blocked.MeanJob(fn, inputs, list(scalars), shape, axes, dtype)


def _numpy_means(values, shape, axes):
    reduce = tuple(d for d in range(len(shape)) if d not in axes)
    return np.asarray(values, np.float64).mean(reduce, keepdims=True)


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((1037, 24), (1,)),  # units are columns; 1037 = 17 * 61: a ragged tail
        ((7, 5, 301, 16), (3,)),
        ((97, 3000), (0,)),  # units are rows
        ((53, 41, 3, 3), (0,)),
        ((400, 12, 8), (1, 2)),
        ((64, 32), (1,)),  # two blocks: summed in one piece, no loop
    ],
)
def test_blocked_means_match_numpy(monkeypatch, shape, axes):
    monkeypatch.setattr(_blocked, "ROW_BLOCK_ELEMENTS", 512)  # many iterations
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))

    def fn(blocks, scalars):
        x, y = blocks
        (c,) = scalars
        return x * jnp.abs(y) + c

    got = jax.jit(
        lambda x, y, c: _blocked.blocked_fan_in_means(
            [_job(shape, axes, fn, [x, y], [c])]
        )[0]
    )(a, b, jnp.float32(1.0))
    expected = _numpy_means(a * np.abs(b) + 1.0, shape, axes)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def test_leaves_with_equal_iteration_counts_share_one_loop(monkeypatch):
    monkeypatch.setattr(_blocked, "ROW_BLOCK_ELEMENTS", 256)
    shapes = [(512, 16), (512, 16), (512, 16), (2048, 16)]

    def means(*xs):
        jobs = [_job(x.shape, (1,), lambda b, s: b[0] * 2.0, [x]) for x in xs]
        return _blocked.blocked_fan_in_means(jobs)

    xs = [jnp.full(s, float(i + 1)) for i, s in enumerate(shapes)]
    jaxpr = jax.make_jaxpr(means)(*xs)
    loops = [e for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
    assert len(loops) == 2  # the three alike leaves share one
    for i, mean in enumerate(jax.jit(means)(*xs)):
        np.testing.assert_allclose(mean, 2.0 * (i + 1), rtol=1e-6)


@pytest.mark.parametrize(
    ("rows", "cols"), [(4608, 512), (1152, 128), (147, 64), (2048, 1000)]
)
def test_cut_needs_no_ragged_tail_where_rows_allow(rows, cols):
    r, u = _blocked._cut(rows, cols)
    assert rows % (r * u) == 0 and r * cols <= _blocked.ROW_BLOCK_ELEMENTS
    assert 1 <= u <= _blocked.UNROLL


def test_cut_prefers_a_power_of_two_of_iterations():
    r, u = _blocked._cut(4608, 512)  # 4608 = 2**9 * 9
    trips = 4608 // (r * u)
    assert trips & (trips - 1) == 0


def test_no_view_is_refused():
    x = jnp.ones((4, 6, 8))
    with pytest.raises(ValueError, match="matrix view"):
        _blocked.blocked_fan_in_means([_job(x.shape, (0, 2), lambda b, s: b[0], [x])])
