"""docs/recipes/combinators.md: GC inside optax combinators (`multi_transform`,
`masked`, `MultiSteps`, `apply_if_finite`, `clip_by_global_norm`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gc
from tests.helpers import assert_trees_close, assert_trees_equal
from tests.integrations.common import fan_in_mean


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
    np.testing.assert_allclose(fan_in_mean(out["conv"]["kernel"], (-1,)), 0, atol=1e-6)
    assert_trees_equal(out["head"], jax.tree.map(lambda g: -g, grads["head"]))


def test_masked_by_function():
    mask = lambda params: jax.tree.map_with_path(  # noqa: E731
        lambda p, x: "conv" in jax.tree_util.keystr(p), params
    )
    tx = optax.masked(optax_gc.centralize(), mask)
    grads = _grads()
    out, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
    np.testing.assert_allclose(fan_in_mean(out["conv"]["kernel"], (-1,)), 0, atol=1e-6)
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
    np.testing.assert_allclose(fan_in_mean(out["conv"]["kernel"], (-1,)), 0, atol=1e-6)
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
