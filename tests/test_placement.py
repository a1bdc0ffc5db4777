"""optax_gc.with_gc: GC on the gradient or on the final update of an optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from tests.helpers import fan_in_means, run_problem, separable_problem

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.01, momentum=0.9),
    "adam": lambda: optax.adam(0.01),
    "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
    "lion": lambda: optax.lion(0.003, weight_decay=0.1),
    "adafactor": lambda: optax.adafactor(0.01),
    "schedule": lambda: optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, 0.02, 10, 100)
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_location_keeps_mean_weights(name):
    init, _ = separable_problem()
    final = run_problem(optax_gc.with_gc(OPTIMIZERS[name](), location="update"))
    plain = run_problem(OPTIMIZERS[name]())
    for leaf in ("conv", "dense"):
        start, end = fan_in_means(init)[leaf], fan_in_means(final)[leaf]
        np.testing.assert_allclose(end, start, atol=2e-5, err_msg=leaf)
        # The check can fail: without GC the means move.
        assert np.abs(fan_in_means(plain)[leaf] - start).max() > 1e-2
    np.testing.assert_array_equal(final["bias"], plain["bias"])


def test_gradient_location_does_not_pin_adam_means():
    init, _ = separable_problem()
    final = run_problem(optax_gc.with_gc(optax.adam(0.01), location="gradient"))
    drift = np.abs(fan_in_means(final)["dense"] - fan_in_means(init)["dense"]).max()
    assert drift > 1e-3


@pytest.mark.parametrize("location", ["gradient", "update"])
def test_placements_are_the_two_chains(location):
    params, loss = separable_problem()
    grads = jax.grad(loss)(params)
    gc, adam = optax_gc.centralize(), optax.adam(0.1)
    chain = optax.chain(gc, adam) if location == "gradient" else optax.chain(adam, gc)
    ours = optax_gc.with_gc(optax.adam(0.1), location=location)
    got, _ = ours.update(grads, ours.init(params), params)
    expected, _ = chain.update(grads, chain.init(params), params)
    for k in got:
        np.testing.assert_array_equal(got[k], expected[k])


def test_state_is_inner_state():
    params, _ = separable_problem()
    tx = optax.adam(0.1)
    assert jax.tree.structure(optax_gc.with_gc(tx).init(params)) == jax.tree.structure(
        tx.init(params)
    )


def test_passes_extra_args():
    params, loss = separable_problem()
    grads = jax.grad(loss)(params)
    tx = optax_gc.with_gc(optax.contrib.reduce_on_plateau(), location="gradient")
    out, _ = tx.update(grads, tx.init(params), params, value=jnp.asarray(1.0))
    np.testing.assert_allclose(fan_in_means(out)["dense"], 0.0, atol=1e-5)


def test_under_multi_steps():
    params, loss = separable_problem()
    tx = optax.MultiSteps(optax_gc.with_gc(optax.sgd(1.0)), every_k_schedule=2)
    state = tx.init(params)
    g1 = jax.grad(loss)(params)
    g2 = jax.tree.map(lambda g: 2 * g, g1)
    _, state = tx.update(g1, state, params)
    out, _ = tx.update(g2, state, params)
    expected = optax_gc.centralize().update(
        jax.tree.map(lambda a, b: -(a + b) / 2, g1, g2), None
    )[0]
    for k in out:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-6)


# --- line searches ----------------------------------------------------------------


def _quadratic():
    w0 = {"w": jnp.arange(12.0).reshape(4, 3) / 10}
    target = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def value_fn(p):
        return jnp.sum((p["w"] - target) ** 2 * jnp.arange(1.0, 13.0).reshape(4, 3))

    return w0, value_fn


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.lbfgs(),
        lambda: optax.chain(
            optax.sgd(1.0),
            optax.scale_by_backtracking_linesearch(max_backtracking_steps=5),
        ),
    ],
    ids=["lbfgs", "backtracking"],
)
def test_line_search_with_update_location_is_refused(make):
    params, value_fn = _quadratic()
    tx = optax_gc.with_gc(make(), location="update")
    with pytest.raises(ValueError, match="line search.*location='gradient'"):
        tx.init(params)
    # A state made without GC is refused at update too.
    state = make().init(params)
    value, grad = jax.value_and_grad(value_fn)(params)
    with pytest.raises(ValueError, match="line search"):
        tx.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)


def test_lbfgs_with_gradient_location_descends_and_keeps_means():
    params, value_fn = _quadratic()
    start_means = fan_in_means(params)["w"]
    tx = optax_gc.with_gc(optax.lbfgs(), location="gradient")
    state = tx.init(params)
    start = value_fn(params)
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, state=state)
        updates, state = tx.update(
            grad, state, params, value=value, grad=grad, value_fn=value_fn
        )
        return optax.apply_updates(params, updates), state

    plain = optax.lbfgs()
    plain_params, plain_state = params, plain.init(params)
    for _ in range(8):
        params, state = step(params, state)
        # Every L-BFGS direction combines centred gradients and centred steps,
        # so the per-unit mean weights never move.
        np.testing.assert_allclose(fan_in_means(params)["w"], start_means, atol=1e-5)
        value, grad = jax.value_and_grad(value_fn)(plain_params)
        updates, plain_state = plain.update(
            grad, plain_state, plain_params, value=value, grad=grad, value_fn=value_fn
        )
        plain_params = optax.apply_updates(plain_params, updates)
    # It converges on the constraint set: the centred gradient vanishes.
    assert value_fn(params) < start
    projected = optax_gc.centralize_array(jax.grad(value_fn)(params)["w"])
    first = optax_gc.centralize_array(jax.grad(value_fn)(_quadratic()[0])["w"])
    assert np.linalg.norm(projected) < 1e-2 * np.linalg.norm(first)
    moved = fan_in_means(plain_params)["w"] - start_means
    assert np.abs(moved).max() > 1e-2  # without GC the means do move


# --- bad arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"location": "before"}, "location"),
        ({"location": None}, "location"),
        ({"output_axes": "last"}, "output_axes"),
        ({"conv_only": 1}, "conv_only"),
        ({"partition_specs": "model"}, "partition_specs"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optax_gc.with_gc(optax.sgd(1.0), **kwargs)


def test_tx_must_be_a_transformation():
    with pytest.raises(ValueError, match="tx"):
        optax_gc.with_gc(optax.sgd)


@pytest.mark.parametrize(
    "default, explicit",
    [
        (
            lambda: optax_gc.with_gc(optax.adam(0.01)),
            lambda: optax.chain(optax_gc.centralize(), optax.adam(0.01)),
        ),
        (
            lambda: optax_gc.gc_adam(0.01),
            lambda: optax_gc.gc_adam(0.01, location="gradient"),
        ),
        (
            lambda: optax_gc.gc_adamw(0.01, weight_decay=0.1),
            lambda: optax_gc.gc_adamw(0.01, weight_decay=0.1, location="gradient"),
        ),
    ],
    ids=["with_gc", "gc_adam", "gc_adamw"],
)
def test_the_default_placement_is_the_gradient(default, explicit):
    final = run_problem(default())
    expected = run_problem(explicit())
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    # The check can fail: GC on the update ends elsewhere.
    moved = run_problem(optax_gc.with_gc(optax.adam(0.01), location="update"))
    assert not np.allclose(
        moved["dense"], run_problem(optax_gc.with_gc(optax.adam(0.01)))["dense"]
    )


def test_optax_multisteps_is_accepted_as_optax_chain_accepts_it():
    init, loss = separable_problem()

    def run(tx):
        state, params = tx.init(init), init
        for _ in range(4):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, updates)
        return params

    ours = run(optax_gc.with_gc(optax.MultiSteps(optax.adam(0.1), every_k_schedule=2)))
    chain = run(
        optax.chain(
            optax_gc.centralize(), optax.MultiSteps(optax.adam(0.1), every_k_schedule=2)
        )
    )
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(chain), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(init), strict=True)
    )


@pytest.mark.parametrize("location", ["gradient", "update"])
def test_multisteps_passes_extra_args_on(location):
    seen = []

    def update_fn(updates, state, params=None, **extra_args):
        seen.append(sorted(extra_args))
        return updates, state

    spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
    tx = optax_gc.with_gc(optax.MultiSteps(spy, every_k_schedule=1), location=location)
    params = {"w": jnp.ones((3, 4))}
    tx.update(params, tx.init(params), params, value=1.0)
    assert seen and all(s == ["value"] for s in seen)


def test_what_is_not_an_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="tx must be an optax optimizer"):
        optax_gc.with_gc(optax.adam)  # the factory, not the optimizer


def test_schedule_free_warns_with_gc_on_the_update_only():
    params = {"w": jnp.ones((3, 4))}
    free = optax.contrib.schedule_free_adamw
    tx = optax_gc.with_gc(free(1e-3), location="update")
    with pytest.warns(optax_gc.ScheduleFreeWarning, match="evaluation parameters"):
        tx.init(params)
    # filterwarnings=error: these must not warn.
    optax_gc.with_gc(free(1e-3)).init(params)  # every sequence from centred g
    optax_gc.with_gc(optax.adamw(1e-3), location="update").init(params)
