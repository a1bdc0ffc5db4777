"""The optax contract, for every public transform and alias (optax's common tests).

Each entry is a factory ``learning_rate -> GradientTransformation``, so the
same checks cover schedules and ``optax.inject_hyperparams``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from tests.helpers import assert_trees_close, assert_trees_equal

# One pattern that matches in every tree below (unmatched patterns warn).
RULES = optax_gc.path_rules({r"(conv|kernel|w)$": (-1,)})
FACTORIES = {
    "centralize": lambda learning_rate: optax.chain(
        optax_gc.centralize(), optax.sgd(learning_rate)
    ),
    "centralize_rules": lambda learning_rate: optax.chain(
        optax_gc.centralize(output_axes=RULES), optax.sgd(learning_rate)
    ),
    "with_gc_update": lambda learning_rate: optax_gc.with_gc(
        optax.adam(learning_rate), location="update"
    ),
    "with_gc_gradient": lambda learning_rate: optax_gc.with_gc(
        optax.adam(learning_rate), location="gradient"
    ),
    "gc_sgd": lambda learning_rate: optax_gc.gc_sgd(
        learning_rate, 0.9, weight_decay=1e-4
    ),
    "gc_adam_update": lambda learning_rate: optax_gc.gc_adam(
        learning_rate, location="update"
    ),
    "gc_adam": lambda learning_rate: optax_gc.gc_adam(learning_rate),
    "gc_adamw_update": lambda learning_rate: optax_gc.gc_adamw(
        learning_rate, weight_decay=1e-4, location="update"
    ),
    "gc_adamw": lambda learning_rate: optax_gc.gc_adamw(
        learning_rate, weight_decay=1e-4
    ),
}
NAMES = list(FACTORIES)


def _tree(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 3)
    tree = {
        "conv": jax.random.normal(k[0], (3, 3, 4, 8)),
        "dense": {"kernel": jax.random.normal(k[1], (8, 5)), "bias": jnp.ones(5)},
        "scale": jax.random.normal(k[2], (8,)),
    }
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def _update(tx, grads, params, jit=True, **extra):
    update = jax.jit(tx.update) if jit else tx.update
    return update(grads, tx.init(params), params, **extra)[0]


@pytest.mark.parametrize("name", NAMES)
def test_is_an_extra_args_transformation(name):
    assert isinstance(FACTORIES[name](0.1), optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name):
    tx, params, grads = FACTORIES[name](0.1), _tree(0), _tree(1)
    assert_trees_close(
        _update(tx, grads, params), _update(tx, grads, params, jit=False), atol=1e-7
    )


@pytest.mark.parametrize("name", NAMES)
def test_no_retrace_on_new_values(name):
    tx = FACTORIES[name](0.1)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state, params):
        return tx.update(grads, state, params)

    params = _tree(0)
    state = tx.init(params)
    for seed in range(1, 4):
        _, state = step(_tree(seed), state, params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_kept(name, dtype):
    tx, params, grads = FACTORIES[name](0.1), _tree(0, dtype), _tree(1, dtype)
    out = _update(tx, grads, params)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(
        lambda x: x.dtype, grads
    )
    # In float16, optax's Adam turns an exactly-zero gradient entry into 0/0
    # (eps=1e-8 underflows), and centred gradients can have exact zeros.
    if dtype != jnp.float16:
        leaves = jax.tree.leaves(out)
        assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in leaves)


@pytest.mark.parametrize("name", NAMES)
def test_schedules(name):
    sched = optax.linear_schedule(0.1, 0.0, 4)
    params, grads = _tree(0), _tree(1)
    with_sched, const = FACTORIES[name](sched), FACTORIES[name](0.1)
    # Step 0 of the schedule is the constant; by step 4 it has reached zero.
    assert_trees_close(
        _update(with_sched, grads, params), _update(const, grads, params)
    )
    state = with_sched.init(params)
    for _ in range(5):
        out, state = jax.jit(with_sched.update)(grads, state, params)
    assert_trees_equal(out, jax.tree.map(jnp.zeros_like, out))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
    params, grads = _tree(0), _tree(1)
    tx = optax.inject_hyperparams(FACTORIES[name])(learning_rate=0.1)
    state = tx.init(params)
    out, _ = jax.jit(tx.update)(grads, state, params)
    assert_trees_close(out, _update(FACTORIES[name](0.1), grads, params), rtol=1e-5)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    half, _ = jax.jit(tx.update)(grads, state, params)
    assert_trees_close(half, jax.tree.map(lambda x: x / 2, out), rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_passed_through(name):
    tx, params, grads = FACTORIES[name](0.1), _tree(0), _tree(1)
    out = _update(tx, grads, params, unexpected=3, loss=jnp.asarray(1.0))
    assert_trees_equal(out, _update(tx, grads, params))


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps(name):
    params, g1, g2 = _tree(0), _tree(1), _tree(2)
    tx = optax.MultiSteps(FACTORIES[name](0.1), every_k_schedule=2)
    state = tx.init(params)
    step = jax.jit(tx.update)
    u1, state = step(g1, state, params)
    assert_trees_equal(u1, jax.tree.map(jnp.zeros_like, g1))
    u2, _ = step(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    assert_trees_close(u2, _update(FACTORIES[name](0.1), mean, params), rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_masked(name):
    params, grads = _tree(0), _tree(1)
    mask = {"conv": True, "dense": {"kernel": False, "bias": True}, "scale": False}
    out = _update(optax.masked(FACTORIES[name](0.1), mask), grads, params)
    np.testing.assert_array_equal(out["dense"]["kernel"], grads["dense"]["kernel"])
    np.testing.assert_array_equal(out["scale"], grads["scale"])
    sub = lambda t: {"conv": t["conv"], "dense": {"bias": t["dense"]["bias"]}}  # noqa: E731
    alone = _update(FACTORIES[name](0.1), sub(grads), sub(params))
    assert_trees_close(sub(out), alone, rtol=1e-6)


STRICT_SAFE = {  # optax.adam itself needs the standard promotion rules
    "centralize": lambda: optax_gc.centralize(),
    "centralize_rules": lambda: optax_gc.centralize(output_axes=RULES),
    "with_gc_update": lambda: optax_gc.with_gc(optax.sgd(0.1), location="update"),
    "with_gc_gradient": lambda: optax_gc.with_gc(optax.sgd(0.1), location="gradient"),
    "gc_sgd": lambda: optax_gc.gc_sgd(0.1, 0.9, weight_decay=1e-4),
}


@pytest.mark.parametrize("name", list(STRICT_SAFE))
def test_strict_dtype_promotion(name):
    params, grads = _tree(0, jnp.bfloat16), _tree(1, jnp.bfloat16)
    tx = STRICT_SAFE[name]()
    with jax.numpy_dtype_promotion("strict"):
        out = _update(tx, grads, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


@pytest.mark.parametrize(
    "alias", [optax_gc.gc_sgd, optax_gc.gc_adam, optax_gc.gc_adamw]
)
def test_inject_hyperparams_on_the_aliases_themselves(alias):
    # Every numeric default (b1, b2, eps, weight_decay, ...) becomes an array.
    params, grads = _tree(0), _tree(1)
    tx = optax.inject_hyperparams(alias)(learning_rate=0.1)
    state = tx.init(params)
    assert set(state.hyperparams) >= {"learning_rate", "weight_decay"}
    out, _ = jax.jit(tx.update)(grads, state, params)
    assert_trees_close(out, _update(alias(0.1), grads, params), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_a_quadratic(name):
    target = {"w": jax.random.normal(jax.random.key(0), (6, 4))}
    # GC keeps each column's mean weight at its start: start at the target's.
    params = {"w": jnp.broadcast_to(target["w"].mean(0), (6, 4))}
    tx = FACTORIES[name](0.02)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.sum((p["w"] - target["w"]) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(400):
        params, state = step(params, state)
    # Every placement reaches a stationary point of the projected problem ...
    residual = optax_gc.centralize_array(params["w"] - target["w"])
    np.testing.assert_allclose(residual, 0.0, atol=3e-2)
    # ... and those that keep the column means fixed reach the target itself
    # (Adam with GC on the gradient, the aliases' default, lets the means drift).
    if name not in ("with_gc_gradient", "gc_adam", "gc_adamw"):
        np.testing.assert_allclose(params["w"], target["w"], atol=3e-2, rtol=3e-2)
