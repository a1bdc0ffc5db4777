"""Recipe docs/recipes/ranger.md: Lookahead around with_gc(RAdam)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from tests.helpers import assert_trees_close, fan_in_means


def _problem():
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = jnp.tanh(x @ jax.random.normal(jax.random.key(1), (8, 4)))
    params = {
        "kernel": jax.random.normal(jax.random.key(2), (8, 4)) * 0.5,
        "bias": jnp.zeros(4),
    }

    def loss_fn(p):
        return jnp.mean((jnp.tanh(x @ p["kernel"] + p["bias"][None]) - y) ** 2)

    return optax.LookaheadParams.init_synced(params), loss_fn


def _train(tx, steps=60):
    params, loss_fn = _problem()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params.fast)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, loss_fn


def _ranger(inner):
    return optax.lookahead(inner, sync_period=6, slow_step_size=0.5)


def test_ranger_is_lookahead_of_radam_on_centred_gradients():
    ours, loss_fn = _train(
        _ranger(optax_gc.with_gc(optax.radam(3e-2), location="gradient")), steps=13
    )
    # Oracle: plain Lookahead(RAdam) fed gradients centred by hand (numpy
    # float64 column means of the (in, out) kernel; the bias is left alone).
    params, _ = _problem()
    tx = _ranger(optax.radam(3e-2))
    state = tx.init(params)

    def centre(g):
        k = np.asarray(g["kernel"], np.float64)
        return {**g, "kernel": jnp.asarray(k - k.mean(0, keepdims=True), jnp.float32)}

    update = jax.jit(tx.update)  # jitted like _train (eager RAdam rounds differently)
    for _ in range(13):  # two syncs
        grads = centre(jax.grad(loss_fn)(params.fast))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert_trees_close(ours, params, rtol=1e-5, atol=1e-6)
    trained, _ = _train(
        _ranger(optax_gc.with_gc(optax.radam(3e-2), location="gradient"))
    )
    start, _ = _problem()
    assert loss_fn(trained.slow) < 0.8 * loss_fn(start.slow)


@pytest.mark.parametrize("steps", [5, 6, 13])  # before, at and after a sync
def test_update_location_keeps_fast_and_slow_means(steps):
    start, _ = _problem()
    final, _ = _train(
        _ranger(optax_gc.with_gc(optax.radam(3e-2), location="update")), steps
    )
    for weights in (final.fast, final.slow):
        np.testing.assert_allclose(
            fan_in_means(weights)["kernel"],
            fan_in_means(start.fast)["kernel"],
            atol=1e-6,
        )
    plain, _ = _train(_ranger(optax.radam(3e-2)), steps)
    moved = fan_in_means(plain.fast)["kernel"] - fan_in_means(start.fast)["kernel"]
    assert np.abs(moved).max() > 1e-3  # the check can fail
