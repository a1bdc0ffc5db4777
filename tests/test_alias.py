"""gc_sgd, gc_adam, gc_adamw: optax's signatures, the authors' trajectories."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from tests.helpers import (
    Reference,
    assert_trees_equal,
    fan_in_means,
    max_relative_error,
    replay,
    run_problem,
    separable_problem,
)

REF = Reference()
LAYOUT_AXES = {"flax": -1, "torch": 0}
NO_GC = {"output_axes": optax_gc.per_leaf(lambda path, leaf: None)}
ALIASES = {
    optax_gc.gc_sgd: optax.sgd,
    optax_gc.gc_adam: optax.adam,
    optax_gc.gc_adamw: optax.adamw,
}


# --- optax's own signatures ----------------------------------------------------


def _positional(fn):
    return [
        (p.name, p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    ]


@pytest.mark.parametrize("ours", list(ALIASES), ids=lambda f: f.__name__)
def test_positional_parameters_are_optax(ours):
    theirs = ALIASES[ours]
    assert _positional(ours) == _positional(theirs)
    ours_kw = {
        n: p.default
        for n, p in inspect.signature(ours).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    for name, param in inspect.signature(theirs).parameters.items():
        if param.kind is param.KEYWORD_ONLY:  # e.g. nesterov
            assert ours_kw[name] == param.default, name
    gc_options = set(ours_kw) - set(inspect.signature(theirs).parameters)
    assert {"output_axes", "conv_only", "partition_specs"} <= gc_options


SCHEDULE = optax.linear_schedule(0.1, 0.01, 10)
POSITIONAL_CALLS = {
    "sgd": (optax_gc.gc_sgd, optax.sgd, (SCHEDULE, 0.9, True, jnp.float32)),
    "sgd_plain": (optax_gc.gc_sgd, optax.sgd, (0.1,)),
    "adam": (
        optax_gc.gc_adam,
        optax.adam,
        (SCHEDULE, 0.8, 0.99, 1e-7, 1e-9, jnp.float32),
    ),
    "adamw": (
        optax_gc.gc_adamw,
        optax.adamw,
        (
            SCHEDULE,
            0.8,
            0.99,
            1e-7,
            1e-9,
            None,
            0.1,
            {"conv": True, "dense": False, "bias": False},
        ),
    ),
}


@pytest.mark.parametrize("name", list(POSITIONAL_CALLS))
def test_same_positional_call_without_gc_equals_optax(name):
    ours, theirs, args = POSITIONAL_CALLS[name]
    assert_trees_equal(
        run_problem(ours(*args, **NO_GC), steps=10),
        run_problem(theirs(*args), steps=10),
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_nesterov_is_passed_to_optax(nesterov):
    assert_trees_equal(
        run_problem(optax_gc.gc_adam(0.01, nesterov=nesterov, **NO_GC), steps=5),
        run_problem(optax.adam(0.01, nesterov=nesterov), steps=5),
    )
    assert_trees_equal(
        run_problem(optax_gc.gc_adamw(0.01, nesterov=nesterov, **NO_GC), steps=5),
        run_problem(optax.adamw(0.01, nesterov=nesterov), steps=5),
    )


COUPLED_L2 = {
    "gc_sgd": (
        lambda: optax_gc.gc_sgd(SCHEDULE, 0.9, True, weight_decay=5e-4, **NO_GC),
        lambda: optax.chain(
            optax.add_decayed_weights(5e-4), optax.sgd(SCHEDULE, 0.9, True)
        ),
    ),
    "gc_adam": (
        lambda: optax_gc.gc_adam(
            1e-2, 0.8, 0.99, 1e-7, weight_decay=1e-3, location="gradient", **NO_GC
        ),
        lambda: optax.chain(
            optax.add_decayed_weights(1e-3), optax.adam(1e-2, 0.8, 0.99, 1e-7)
        ),
    ),
}


@pytest.mark.parametrize("name", list(COUPLED_L2))
def test_coupled_l2_without_gc_equals_optax_chain(name):
    ours, theirs = COUPLED_L2[name]
    assert_trees_equal(run_problem(ours(), steps=10), run_problem(theirs(), steps=10))


# --- the authors' trajectories ---------------------------------------------------


def _alias_for(config, output_axes):
    cfg = REF.meta["configs"][config]
    gc = {"output_axes": output_axes, "conv_only": cfg["gc_conv_only"]}
    if cfg["class"] == "SGD":
        return optax_gc.gc_sgd(
            cfg["lr"],
            cfg["momentum"],
            cfg.get("nesterov", False),
            weight_decay=cfg["weight_decay"],
            **gc,
        )
    b1, b2 = cfg.get("betas", (0.9, 0.999))
    location = "gradient" if cfg["gc_loc"] else "update"
    return optax_gc.gc_adam(
        cfg["lr"],
        b1,
        b2,
        1e-8,
        weight_decay=cfg["weight_decay"],
        location=location,
        **gc,
    )


ALIAS_CONFIGS = [
    "sgd_gc",
    "sgd_gcc_nesterov",
    "adam_gc_grad",
    "adam_gc_grad_b2",
    "adam_gc_update",
    "adam_gcc_update",
]


@pytest.mark.parametrize("layout", ["flax", "torch"])
@pytest.mark.parametrize("config", ALIAS_CONFIGS)
def test_alias_matches_reference(config, layout):
    got = replay(REF, _alias_for(config, LAYOUT_AXES[layout]), layout)
    err = max_relative_error(got, REF.trajectory(config, layout))
    assert err <= 1e-5, f"{config}/{layout}: relative error {err:.2e}"


def test_gc_sgd_without_gc_matches_authors_plain_sgd():
    cfg = REF.meta["configs"]["sgd_plain"]
    tx = optax_gc.gc_sgd(
        cfg["lr"], cfg["momentum"], weight_decay=cfg["weight_decay"], **NO_GC
    )
    got = replay(REF, tx, "flax")
    assert max_relative_error(got, REF.trajectory("sgd_plain", "flax")) <= 1e-5


def test_gc_adamw_update_location_centralizes_the_decay():
    # Zero gradient: the step is the decay term alone, -lr * wd * w.
    w = jnp.array([[1.0, 0.0], [3.0, 4.0]])
    tx = optax_gc.gc_adamw(0.1, weight_decay=0.5, location="update")
    out, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init({"w": w}), {"w": w})
    np.testing.assert_allclose(
        out["w"], -0.05 * (w - w.mean(0, keepdims=True)), atol=1e-7
    )
    tx = optax_gc.gc_adamw(0.1, weight_decay=0.5, location="gradient")
    out, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init({"w": w}), {"w": w})
    np.testing.assert_allclose(out["w"], -0.05 * w, atol=1e-7)


@pytest.mark.parametrize("alias", list(ALIASES), ids=lambda f: f.__name__)
def test_aliases_accept_schedules(alias):
    sched = optax.exponential_decay(0.01, 10, 0.5)
    init, _ = separable_problem()
    final = run_problem(alias(sched), steps=20)
    assert np.isfinite(final["dense"]).all()
    assert not np.allclose(final["dense"], init["dense"])


# --- inject_hyperparams ---------------------------------------------------------------


@pytest.mark.parametrize("location", ["gradient", "update"])
def test_inject_hyperparams(location):
    params, loss = separable_problem()
    grads = jax.grad(loss)(params)
    tx = optax.inject_hyperparams(optax_gc.gc_adam)(
        learning_rate=0.1, weight_decay=1e-3, location=location
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    first, _ = step(grads, state, params)
    plain = optax_gc.gc_adam(0.1, weight_decay=1e-3, location=location)
    expected, _ = plain.update(grads, plain.init(params), params)
    for k in first:
        np.testing.assert_allclose(first[k], expected[k], rtol=1e-5, atol=1e-7)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    second, _ = step(grads, state, params)
    np.testing.assert_allclose(second["dense"], first["dense"] / 2, rtol=1e-5)


@pytest.mark.parametrize("alias", [optax_gc.gc_sgd, optax_gc.gc_adam])
@pytest.mark.parametrize("jit", [False, True])
def test_inject_hyperparams_needs_no_params_without_decay(alias, jit):
    # Regression: the injected weight_decay=0 became an array and the L2 step,
    # which needs params, was always chained.
    params, loss = separable_problem()
    grads = jax.grad(loss)(params)
    kwargs = {"location": "update"} if alias is optax_gc.gc_adam else {}
    tx = optax.inject_hyperparams(alias)(learning_rate=1e-2, **kwargs)
    update = jax.jit(tx.update) if jit else tx.update
    got, _ = update(grads, tx.init(params))
    np.testing.assert_allclose(fan_in_means(got)["dense"], 0.0, atol=1e-7)
    # With GC off it is the injected optax optimizer, bit for bit (both sides
    # jitted, or both eager).
    no_gc = optax.inject_hyperparams(alias, static_args=("output_axes",))(
        learning_rate=1e-2, **NO_GC
    )
    theirs = optax.inject_hyperparams(ALIASES[alias])(learning_rate=1e-2)
    ours_update, theirs_update = no_gc.update, theirs.update
    if jit:
        ours_update, theirs_update = jax.jit(ours_update), jax.jit(theirs_update)
    assert_trees_equal(
        ours_update(grads, no_gc.init(params))[0],
        theirs_update(grads, theirs.init(params))[0],
    )


def test_injected_decay_changed_to_nonzero_without_params_is_not_silent():
    params, loss = separable_problem()
    grads = jax.grad(loss)(params)
    tx = optax.inject_hyperparams(optax_gc.gc_adam)(learning_rate=1e-2)
    state = tx.init(params)
    state.hyperparams["weight_decay"] = jnp.asarray(0.1)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state)  # eager: the value is known
    out, _ = jax.jit(tx.update)(grads, state)  # traced: NaN, never a dropped decay
    assert all(np.isnan(x).all() for x in jax.tree.leaves(out))
    with_params, _ = jax.jit(tx.update)(grads, state, params)
    ref = optax.inject_hyperparams(optax_gc.gc_adam)(1e-2, weight_decay=0.1)
    expected, _ = jax.jit(ref.update)(grads, ref.init(params), params)
    assert_trees_equal(with_params, expected)


def test_inject_hyperparams_rejects_traced_axes_clearly():
    params, _ = separable_problem()
    tx = optax.inject_hyperparams(optax_gc.gc_adam)(learning_rate=0.1, output_axes=0)
    with pytest.raises(ValueError, match="static_args"):
        tx.init(params)
    tx = optax.inject_hyperparams(optax_gc.gc_adam)(learning_rate=0.1, output_axes=(0,))
    tx.init(params)


# --- bad arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        -1.0,
        True,
        np.float32(-0.1),
        np.bool_(True),
        jnp.asarray(-0.5),
        np.array([0.1, 0.2]),
        float("nan"),
        float("inf"),
        "0.1",
        None,
        1 + 1j,
    ],
    ids=repr,
)
@pytest.mark.parametrize("alias", list(ALIASES), ids=lambda f: f.__name__)
def test_bad_weight_decay_rejected_at_construction(alias, bad):
    kwargs = {"weight_decay": bad}
    with pytest.raises(ValueError, match="weight_decay"):
        alias(0.1, **kwargs)


@pytest.mark.parametrize("alias", list(ALIASES), ids=lambda f: f.__name__)
def test_good_weight_decay_accepted(alias):
    for good in (0, 0.0, 5e-4, np.float32(1e-3), jnp.asarray(1e-3), np.int64(0)):
        alias(0.1, weight_decay=good)
    for dtype in (jnp.bfloat16, jnp.float16):
        alias(0.1, weight_decay=jnp.asarray(1e-3, dtype))


@pytest.mark.parametrize("alias", list(ALIASES), ids=lambda f: f.__name__)
def test_inject_hyperparams_with_bf16_params_eagerly(alias):
    # Regression: the injected bf16 weight_decay failed validation.
    params = {"kernel": jnp.ones((4, 3), jnp.bfloat16)}
    tx = optax.inject_hyperparams(alias)(learning_rate=1e-3)
    updates, _ = tx.update(params, tx.init(params), params)
    assert updates["kernel"].dtype == jnp.bfloat16


def test_gc_adamw_accepts_a_decay_schedule_where_optax_does():
    sched = optax.linear_schedule(0.1, 0.0, 10)
    theirs, p = optax.adamw(0.01, weight_decay=sched), {"p": jnp.ones(2)}
    try:
        theirs.update(p, theirs.init(p), p)
    except TypeError:  # older optax: a clear error at construction instead
        with pytest.raises(ValueError, match="weight_decay is a schedule"):
            optax_gc.gc_adamw(0.01, weight_decay=sched)
        return
    assert_trees_equal(
        run_problem(optax_gc.gc_adamw(0.01, weight_decay=sched, **NO_GC), steps=5),
        run_problem(optax.adamw(0.01, weight_decay=sched), steps=5),
    )


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: optax_gc.gc_adam(1e-3, location="grad"), "location"),
        (lambda: optax_gc.gc_adamw(1e-3, location=True), "location"),
        (lambda: optax_gc.gc_sgd(0.1, output_axes=1.0), "output_axes"),
        (lambda: optax_gc.gc_sgd(0.1, conv_only="yes"), "conv_only"),
        (lambda: optax_gc.gc_adam(0.1, partition_specs=3), "partition_specs"),
    ],
)
def test_bad_arguments_raise_at_construction(make, name):
    with pytest.raises(ValueError, match=name) as info:
        make()
    assert str(info.value).startswith("gc_")  # the function the user called
