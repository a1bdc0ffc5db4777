"""with_gc, gc_sgd, gc_adam, gc_adamw and gc_fraction."""

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
)

REF = Reference()
LAYOUT_AXES = {"flax": -1, "torch": 0}


def _alias_for(config, output_axes):
    cfg = REF.meta["configs"][config]
    gc = {"output_axes": output_axes, "conv_only": cfg["gc_conv_only"]}
    if cfg["class"] == "SGD":
        return optax_gc.gc_sgd(
            cfg["lr"],
            momentum=cfg["momentum"],
            nesterov=cfg.get("nesterov", False),
            weight_decay=cfg["weight_decay"],
            **gc,
        )
    b1, b2 = cfg.get("betas", (0.9, 0.999))
    location = "gradient" if cfg["gc_loc"] else "update"
    return optax_gc.gc_adam(
        cfg["lr"], b1, b2, 1e-8, cfg["weight_decay"], location=location, **gc
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
        cfg["lr"],
        cfg["momentum"],
        weight_decay=cfg["weight_decay"],
        output_axes=lambda p, x: None,
    )
    got = replay(REF, tx, "flax")
    assert max_relative_error(got, REF.trajectory("sgd_plain", "flax")) <= 1e-5


# --- with_gc(location="update") keeps each unit's mean weight ----------------


def _problem():
    keys = jax.random.split(jax.random.key(0), 8)
    params = {
        "conv": jax.random.normal(keys[0], (3, 3, 4, 8)),
        "dense": jax.random.normal(keys[1], (8, 5)),
        "bias": jax.random.normal(keys[2], (5,)),
    }
    target = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape),
        params,
        {"conv": keys[3], "dense": keys[4], "bias": keys[5]},
    )

    def loss(p):
        # Separable across leaves: the bias gradient never sees the kernels.
        return sum(
            jnp.sum(jnp.cosh(p[k] - target[k]) + 0.1 * (p[k] - target[k]) ** 4)
            for k in p
        )

    return params, loss


def _run(tx, steps=100):
    params, loss = _problem()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


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
    init, _ = _problem()
    final = _run(optax_gc.with_gc(OPTIMIZERS[name](), location="update"))
    plain = _run(OPTIMIZERS[name]())
    for leaf in ("conv", "dense"):
        start, end = fan_in_means(init)[leaf], fan_in_means(final)[leaf]
        np.testing.assert_allclose(end, start, atol=2e-5, err_msg=leaf)
        # The check can fail: without GC the means move.
        assert np.abs(fan_in_means(plain)[leaf] - start).max() > 1e-2
    np.testing.assert_array_equal(final["bias"], plain["bias"])


def test_gradient_location_does_not_pin_adam_means():
    init, _ = _problem()
    final = _run(optax_gc.with_gc(optax.adam(0.01), location="gradient"))
    drift = np.abs(fan_in_means(final)["dense"] - fan_in_means(init)["dense"]).max()
    assert drift > 1e-3


def test_with_gc_state_is_inner_state():
    params, _ = _problem()
    tx = optax.adam(0.1)
    assert jax.tree.structure(optax_gc.with_gc(tx).init(params)) == jax.tree.structure(
        tx.init(params)
    )


def test_with_gc_passes_extra_args():
    params, loss = _problem()
    grads = jax.grad(loss)(params)
    tx = optax_gc.with_gc(optax.contrib.reduce_on_plateau(), location="gradient")
    out, _ = tx.update(grads, tx.init(params), params, value=jnp.asarray(1.0))
    np.testing.assert_allclose(fan_in_means(out)["dense"], 0.0, atol=1e-5)


def test_with_gc_under_multi_steps():
    params, loss = _problem()
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


# --- with GC masked off, each alias is its optax counterpart, bit for bit -------

NO_GC = {"output_axes": lambda path, leaf: None}
SCHEDULE = optax.linear_schedule(0.1, 0.01, 10)
COUNTERPARTS = {
    "gc_sgd": (
        lambda: optax_gc.gc_sgd(0.1, **NO_GC),
        lambda: optax.sgd(0.1),
    ),
    "gc_sgd_momentum_wd": (
        lambda: optax_gc.gc_sgd(SCHEDULE, 0.9, True, 5e-4, **NO_GC),
        lambda: optax.chain(
            optax.add_decayed_weights(5e-4), optax.sgd(SCHEDULE, 0.9, True)
        ),
    ),
    "gc_adam": (
        lambda: optax_gc.gc_adam(SCHEDULE, **NO_GC),
        lambda: optax.adam(SCHEDULE),
    ),
    "gc_adam_gradient_wd": (
        lambda: optax_gc.gc_adam(
            1e-2, 0.8, 0.99, 1e-7, 1e-3, location="gradient", **NO_GC
        ),
        lambda: optax.chain(
            optax.add_decayed_weights(1e-3), optax.adam(1e-2, 0.8, 0.99, 1e-7)
        ),
    ),
    "gc_adamw": (
        lambda: optax_gc.gc_adamw(SCHEDULE, weight_decay=0.1, **NO_GC),
        lambda: optax.adamw(SCHEDULE, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("name", list(COUNTERPARTS))
def test_masked_off_equals_optax(name):
    ours, theirs = COUNTERPARTS[name]
    assert_trees_equal(_run(ours(), steps=10), _run(theirs(), steps=10))


@pytest.mark.parametrize(
    "alias", [optax_gc.gc_sgd, optax_gc.gc_adam, optax_gc.gc_adamw]
)
def test_aliases_accept_schedules(alias):
    sched = optax.exponential_decay(0.01, 10, 0.5)
    init, _ = _problem()
    final = _run(alias(sched), steps=20)
    assert np.isfinite(final["dense"]).all()
    assert not np.allclose(final["dense"], init["dense"])


def test_gc_adamw_update_location_centralizes_the_decay():
    # Zero gradient: the step is the decay term alone, -lr * wd * w.
    w = jnp.array([[1.0, 0.0], [3.0, 4.0]])
    tx = optax_gc.gc_adamw(0.1, weight_decay=0.5)
    out, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init({"w": w}), {"w": w})
    np.testing.assert_allclose(
        out["w"], -0.05 * (w - w.mean(0, keepdims=True)), atol=1e-7
    )
    tx = optax_gc.gc_adamw(0.1, weight_decay=0.5, location="gradient")
    out, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init({"w": w}), {"w": w})
    np.testing.assert_allclose(out["w"], -0.05 * w, atol=1e-7)


# --- hyperparameters ----------------------------------------------------------


@pytest.mark.parametrize("location", ["gradient", "update"])
def test_inject_hyperparams(location):
    params, loss = _problem()
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


def test_inject_hyperparams_rejects_traced_axes_clearly():
    params, _ = _problem()
    tx = optax.inject_hyperparams(optax_gc.gc_adam)(learning_rate=0.1, output_axes=0)
    with pytest.raises(ValueError, match="static_args"):
        tx.init(params)
    tx = optax.inject_hyperparams(optax_gc.gc_adam)(learning_rate=0.1, output_axes=(0,))
    tx.init(params)


# --- bad arguments ----------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: optax_gc.with_gc(optax.sgd(1.0), location="before"), "location"),
        (lambda: optax_gc.with_gc(optax.sgd(1.0), location=None), "location"),
        (lambda: optax_gc.with_gc(optax.sgd, location="update"), "tx"),
        (lambda: optax_gc.with_gc(optax.sgd(1.0), output_axes="last"), "output_axes"),
        (lambda: optax_gc.gc_adam(1e-3, location="grad"), "location"),
        (lambda: optax_gc.gc_adamw(1e-3, location=True), "location"),
        (lambda: optax_gc.gc_sgd(0.1, output_axes=1.0), "output_axes"),
        (lambda: optax_gc.gc_sgd(0.1, conv_only="yes"), "conv_only"),
        (lambda: optax_gc.gc_sgd(0.1, weight_decay=-1.0), "weight_decay"),
        (lambda: optax_gc.gc_adam(0.1, weight_decay=-1e-4), "weight_decay"),
        (lambda: optax_gc.gc_adamw(0.1, weight_decay=-1e-4), "weight_decay"),
    ],
)
def test_bad_arguments_raise_at_construction(make, name):
    with pytest.raises(ValueError, match=name):
        make()


# --- gc_fraction ------------------------------------------------------------


def test_gc_fraction_values():
    grads = {
        "constant": jnp.ones((3, 2)),  # all of it is removed
        "centred": jnp.array([[1.0, 2.0], [-1.0, -2.0]]),  # nothing removed
        "half": jnp.array([[2.0], [0.0]]),  # mean [1]: ||[1,1]|| / ||[2,0]||
        "bias": jnp.ones(3),
        "zeros": jnp.zeros((2, 2)),
        "none": None,
    }
    out = jax.jit(optax_gc.gc_fraction)(grads)
    np.testing.assert_allclose(out["constant"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["centred"], 0.0, atol=1e-7)
    np.testing.assert_allclose(out["half"], np.sqrt(2) / 2, rtol=1e-6)
    assert out["bias"] == 0.0 and out["zeros"] == 0.0 and out["none"] is None
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))


def test_gc_fraction_follows_the_same_rules():
    g = jax.random.normal(jax.random.key(3), (4, 6))
    flax = optax_gc.gc_fraction({"g": g})["g"]
    torch = optax_gc.gc_fraction({"g": g}, output_axes=0)["g"]
    gcc = optax_gc.gc_fraction({"g": g}, conv_only=True)["g"]
    phi = optax_gc.centralize_array(g)
    np.testing.assert_allclose(
        flax, np.linalg.norm(g - phi) / np.linalg.norm(g), rtol=1e-5
    )
    assert torch != flax and gcc == 0.0
    with pytest.raises(ValueError, match="output_axes"):
        optax_gc.gc_fraction({"g": g}, output_axes=(0, 1))
