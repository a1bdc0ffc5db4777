"""Blocked fan-in sums against numpy, on every view and with ragged tails."""

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


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((1037, 24), (1,)),  # units are columns; loop plus a ragged tail
        ((7, 5, 301, 16), (3,)),
        ((97, 3000), (0,)),  # units are rows
        ((53, 41, 3, 3), (0,)),
        ((400, 12, 8), (1, 2)),
    ],
)
def test_blocked_sums_match_numpy(monkeypatch, shape, axes):
    monkeypatch.setattr(_blocked, "ROW_BLOCK_ELEMENTS", 512)  # many iterations
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))

    def fn(x, y):
        return x * jnp.abs(y) + 1.0

    got = jax.jit(
        lambda x, y: _blocked.blocked_fan_in_sums(fn, [x, y], shape, axes, jnp.float32)
    )(a, b)
    reduce = tuple(d for d in range(len(shape)) if d not in axes)
    expected = (a * np.abs(b) + 1.0).astype(np.float64).sum(reduce, keepdims=True)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-3)


def test_no_view_gives_none():
    x = jnp.ones((4, 6, 8))
    assert (
        _blocked.blocked_fan_in_sums(lambda v: v, [x], x.shape, (0, 2), x.dtype) is None
    )


def test_on_cpu_picks_the_cpu_branch_here():
    out = jax.jit(lambda: _blocked.on_cpu(lambda: jnp.int32(1), lambda: jnp.int32(2)))()
    assert int(out) == (1 if jax.default_backend() == "cpu" else 2)
