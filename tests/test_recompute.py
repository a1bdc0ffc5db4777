"""GC on the final update, recomputed blockwise: same numbers, no stored update."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from optax_gc import _blocked, _recompute

SHAPES = {
    "conv": (3, 3, 32, 40),  # 11,520 entries: blocked
    "dense": (1031, 24),  # blocked, ragged tail
    "heads": (96, 4, 32),  # DenseGeneral (in, H, D)
    "eqx": (40, 300),  # (out, in)
    "stack": (3, 64, 48),  # (L, in, out): no matrix view, summed whole
    "small": (8, 5),
    "bias": (24,),
}
AXES = {
    "conv": (-1,),
    "dense": (-1,),
    "heads": (1, 2),
    "eqx": (0,),
    "stack": (0, -1),
    "small": (-1,),
    "bias": None,
}
OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adafactor": lambda: optax.adafactor(1e-2),  # factored: not entry by entry
    "clip_adam": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
    "schedule": lambda: optax.adam(optax.cosine_decay_schedule(1e-2, 10)),
    "inject": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
}


rule = optax_gc.per_leaf(lambda path, leaf: AXES[path[-1].key])


def tree(seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES))
    return {
        k: jax.random.normal(key, s, dtype)
        for key, (k, s) in zip(keys, SHAPES.items(), strict=True)
    }


def run(tx, steps=3, dtype=jnp.float32):
    params = tree(0, dtype)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(steps):
        updates, state = step(tree(i + 1, dtype), state, params)
        params = optax.apply_updates(params, updates)
    return updates, params


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Loops of many iterations on test-sized leaves.
    monkeypatch.setattr(_blocked, "ROW_BLOCK_ELEMENTS", 256)
    monkeypatch.setattr("optax_gc._recompute.MIN_BLOCKED_ELEMENTS", 1024)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_with_gc_equals_the_plain_chain(name):
    ours, p_ours = run(
        optax_gc.with_gc(OPTIMIZERS[name](), location="update", output_axes=rule)
    )
    plain, p_plain = run(
        optax.chain(OPTIMIZERS[name](), optax_gc.centralize(output_axes=rule))
    )
    for k in SHAPES:
        scale = float(jnp.abs(plain[k]).max())
        np.testing.assert_allclose(
            ours[k], plain[k], rtol=0, atol=1e-5 * scale, err_msg=k
        )
        np.testing.assert_allclose(
            p_ours[k], p_plain[k], rtol=1e-6, atol=1e-6, err_msg=k
        )
    np.testing.assert_array_equal(ours["bias"], plain["bias"])


@pytest.mark.parametrize("name", ["adam", "lion"])
def test_centred_leaves_have_zero_fan_in_mean(name):
    updates, _ = run(
        optax_gc.with_gc(OPTIMIZERS[name](), location="update", output_axes=rule)
    )
    for k, axes in AXES.items():
        if axes is None:
            continue
        kept = {a % updates[k].ndim for a in axes}
        reduce = tuple(d for d in range(updates[k].ndim) if d not in kept)
        mean = np.asarray(updates[k], np.float64).mean(reduce)
        assert np.abs(mean).max() <= 1e-6 * np.abs(updates[k]).max(), k


def test_bf16_leaves_round_once_from_float32_means():
    ours, _ = run(
        optax_gc.with_gc(optax.adam(1e-2), location="update", output_axes=rule),
        1,
        jnp.bfloat16,
    )
    plain, _ = run(
        optax.chain(optax.adam(1e-2), optax_gc.centralize(output_axes=rule)),
        1,
        jnp.bfloat16,
    )
    for k in SHAPES:
        assert ours[k].dtype == jnp.bfloat16
        diff = np.abs(
            np.asarray(ours[k], np.float32) - np.asarray(plain[k], np.float32)
        )
        ulp = np.abs(np.asarray(plain[k], np.float32)) * 2.0**-7 + 1e-30
        assert (diff <= ulp).all(), k  # at most one bf16 rounding step apart


MEMORY_SHAPES = {"a": (2048, 256), "b": (3, 3, 128, 128)}


def donated_step(tx):
    """A jitted update + apply step that donates the parameters and state."""

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def step(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def temp_bytes(tx, params, grads):
    compiled = donated_step(tx).lower(params, grads, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["adam", "clip_adam", "schedule", "inject"])
def test_update_is_not_stored_in_full(name):
    """XLA's temporary memory stays near the bare optimizer's, unlike the chain.

    ``clip_adam``'s update reads the global norm, a reduction over every
    gradient that the step does not output, and the schedules read a learning
    rate computed from the step count: the blocked sums compute these scalars
    again, and XLA merges the copies.
    """
    params = {k: jnp.ones(s) for k, s in MEMORY_SHAPES.items()}
    param_bytes = sum(x.size * 4 for x in params.values())

    def temp(tx):
        return temp_bytes(tx, params, params)

    make = OPTIMIZERS[name]
    base = temp(make())
    plain = temp(optax.chain(make(), optax_gc.centralize()))
    ours = temp(optax_gc.with_gc(make(), location="update"))
    assert plain - ours >= 0.75 * param_bytes  # the check can fail: plain stores u
    assert ours - base <= 0.05 * param_bytes


def test_an_update_closing_over_tracers_is_blocked_too():
    """``inject_hyperparams(gc_adam)`` builds the inner optimizer from traced
    hyperparameters, so the update GC wraps closes over tracers of the outer
    trace. Their values must reach the recomputed sums (a wrong learning rate
    would show in the values) and the update must still not be stored."""

    def fresh():  # the steps donate their parameters
        return {k: jnp.ones(s) for k, s in MEMORY_SHAPES.items()}

    params = fresh()
    keys = jax.random.split(jax.random.key(3), len(MEMORY_SHAPES))
    grads = {
        k: jax.random.normal(key, s)
        for key, (k, s) in zip(keys, MEMORY_SHAPES.items(), strict=True)
    }
    param_bytes = sum(x.size * 4 for x in params.values())

    ours = optax.inject_hyperparams(optax_gc.gc_adam)(
        learning_rate=0.02, location="update"
    )
    base = optax.inject_hyperparams(optax.adam)(learning_rate=0.02)
    assert (
        temp_bytes(ours, params, grads) - temp_bytes(base, params, grads)
        <= 0.05 * param_bytes
    )
    got, _ = donated_step(ours)(fresh(), grads, ours.init(params))
    plain = optax.chain(optax.adam(0.02), optax_gc.centralize())
    want, _ = donated_step(plain)(fresh(), grads, plain.init(params))
    for k in MEMORY_SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_the_inner_update_is_traced_once():
    calls = []
    inner = optax.adam(1e-2)

    def update(updates, state, params=None):
        calls.append(1)
        return inner.update(updates, state, params)

    tx = optax_gc.with_gc(
        optax.GradientTransformation(inner.init, update), location="update"
    )
    params = {"w": jnp.ones((2048, 64))}
    jax.jit(tx.update).lower(params, tx.init(params), params)
    assert len(calls) == 1


def test_traced_arguments_it_cannot_trace_fall_back():
    class Tagged(optax.GradientTransformationExtraArgs):
        pass

    inner = optax.adam(1e-2)

    def update(updates, state, params=None, *, tag=None):
        assert tag == "step"
        return inner.update(updates, state, params)

    tx = optax_gc.with_gc(
        Tagged(inner.init, update), location="update", output_axes=rule
    )
    params = tree(0)
    got, _ = jax.jit(functools.partial(tx.update, tag="step"))(
        tree(1), tx.init(params), params
    )
    plain = optax.chain(inner, optax_gc.centralize(output_axes=rule))
    expected, _ = jax.jit(plain.update)(tree(1), plain.init(params), params)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-8)


def test_grad_through_the_update():
    tx = optax_gc.with_gc(
        optax.sgd(0.1, momentum=0.9), location="update", output_axes=rule
    )
    params = tree(0)

    def loss(scale):
        g = jax.tree.map(lambda x: scale * x, tree(1))
        u, _ = tx.update(g, tx.init(params), params)
        return sum(
            jnp.sum(v * w)
            for v, w in zip(jax.tree.leaves(u), jax.tree.leaves(tree(2)), strict=True)
        )

    got = jax.jit(jax.grad(loss))(1.0)
    expected = jax.grad(loss)(1.0)  # eager: the plain formulation
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_constant_update_reads_nothing():
    def update(updates, state, params=None):
        return jax.tree.map(lambda x: jnp.full_like(x, 0.5), updates), state

    const = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
    tx = optax_gc.with_gc(const, location="update", output_axes=rule)
    params = tree(0)
    got, _ = jax.jit(tx.update)(tree(1), tx.init(params), params)
    for k, axes in AXES.items():
        expected = 0.5 if axes is None else 0.0  # every unit's entries are equal
        np.testing.assert_allclose(got[k], expected, atol=1e-7, err_msg=k)


# --- what the fast path recomputes ------------------------------------------

BIG = {"w": (256, 64), "k": (3, 3, 16, 32)}  # above MIN_BLOCKED_ELEMENTS (1024 here)
CONES = {
    # optimizer: (primitives its update needs, the values it is recomputed from)
    "adam": ({"div", "sqrt", "add", "mul"}, {"new mu", "new nu"}),
    "adamw": ({"div", "sqrt", "add", "mul"}, {"new mu", "new nu", "param"}),
    "lion": ({"sign", "add", "mul"}, {"grad", "mu", "param"}),  # weight decay
}


def _named_roles(tx, params, key, cone):
    """What the cone of leaf ``key`` reads: "grad", "param", "mu", "new mu"..."""
    args = (params, tx.init(params), params)
    outs = jax.eval_shape(tx.update, *args)
    paths = {
        kind: [
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)
        ]
        for kind, t in (("argument", args), ("output", outs))
    }
    names = set()
    for kind, i in cone.roles:
        path = paths[kind][i]
        assert path.endswith(f"['{key}']"), path
        head = path[: -len(f"['{key}']")]
        if kind == "argument" and head == "[0]":
            names.add("grad")
        elif kind == "argument" and head == "[2]":
            names.add("param")
        else:  # a state field, e.g. [1][0].mu
            field = head.rsplit(".", 1)[-1]
            names.add(f"new {field}" if kind == "output" else field)
    return names


def _cones(name):
    tx = OPTIMIZERS[name]()
    params = {k: jnp.ones(s) for k, s in BIG.items()}
    rule = optax_gc._axes.LeafRule(-1, False, "test")
    args = (params, tx.init(params), params)
    return tx, params, _recompute.leaf_cones(tx.update, args, rule)


@pytest.mark.parametrize("name", sorted(CONES))
def test_the_recomputed_update_is_the_optimizers_own_arithmetic(name):
    """The blocked sums recompute the update from the moments, not read it."""
    needed, roles = CONES[name]
    tx, params, cones = _cones(name)
    for key in BIG:
        cone = cones[key]
        assert cone is not None, key
        assert needed <= {e.primitive.name for e in cone.eqns}, key
        assert _named_roles(tx, params, key, cone) == roles, key


@pytest.mark.parametrize("name", sorted(CONES))
def test_every_needed_primitive_must_stay_recomputable(monkeypatch, name):
    # Without any one of them, the update is no longer recomputed from the
    # moments: the fast path gives up on the leaf (and the step would store it).
    needed, roles = CONES[name]
    for primitive in sorted(needed):
        with monkeypatch.context() as m:
            m.setattr(_recompute, "RECOMPUTABLE", _recompute.RECOMPUTABLE - {primitive})
            tx, params, cones = _cones(name)
            for key in BIG:
                cone = cones[key]
                assert cone is None or _named_roles(tx, params, key, cone) != roles, (
                    primitive
                )


def test_recomputable_names_real_primitives():
    # A renamed primitive would leave a name here that nothing binds.
    x = jnp.ones((2, 2))
    names = {
        e.primitive.name
        for e in jax.make_jaxpr(
            lambda x: jnp.sign(x) + jnp.sqrt(x) / x * x - jax.lax.rsqrt(x)
        )(x).eqns
    }
    assert {"sign", "sqrt", "div", "mul", "add", "sub", "rsqrt"} <= names
    assert names <= _recompute.RECOMPUTABLE


# --- where the fast path cannot win: Adafactor --------------------------------


def _temp(tx, params):
    def step(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 2))
    compiled = jitted.lower(params, params, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_adafactor_updates_are_summed_whole():
    # Factored (both dims >= 128) or not, Adafactor clips each update by its
    # own RMS, a reduction over the unclipped update: XLA stores that anyway,
    # so recomputing it would only add the loop's accumulators.
    tx = optax.adafactor(1e-2)
    params = {"factored": jnp.ones((256, 512)), "plain": jnp.ones((100, 120))}
    rule = optax_gc._axes.LeafRule(-1, False, "test")
    cones = _recompute.leaf_cones(tx.update, (params, tx.init(params), params), rule)
    assert cones == {"factored": None, "plain": None}
    # ... while adam's are recomputed.
    adam = optax.adam(1e-3)
    cones = _recompute.leaf_cones(
        adam.update, (params, adam.init(params), params), rule
    )
    assert all(c is not None for c in cones.values())


def test_adafactor_needs_no_more_memory_than_the_plain_chain():
    params = {
        "a": jnp.ones((512, 256)),
        "b": jnp.ones((3, 3, 128, 128)),
        "c": jnp.ones((100, 120)),
    }
    ours = _temp(optax_gc.with_gc(optax.adafactor(1e-2), location="update"), params)
    plain = _temp(optax.chain(optax.adafactor(1e-2), optax_gc.centralize()), params)
    assert ours <= plain


# --- the platform is decided at trace time ----------------------------------


def _primitives(tx, params):
    """Every primitive in the jaxpr of ``tx.update``, nested bodies included."""
    closed = jax.make_jaxpr(tx.update)(params, tx.init(params), params)

    def walk(jaxpr):
        for e in jaxpr.eqns:
            yield e.primitive.name
            for value in e.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        yield from walk(sub.jaxpr)

    return list(walk(closed.jaxpr))


def test_cpu_traces_the_loops_only(monkeypatch):
    params = {"w": jnp.ones((2048, 64))}
    tx = optax_gc.with_gc(optax.adam(1e-3), location="update")
    names = _primitives(tx, params)
    assert {"scan", "while"} & set(names)
    assert "platform_index" not in names and "cond" not in names


def test_another_platform_traces_the_plain_chain(monkeypatch):
    from optax_gc import _transform

    monkeypatch.setattr(_transform, "lowering_platform", lambda: "gpu")
    params = {"w": jnp.ones((2048, 64))}
    ours = optax_gc.with_gc(optax.adam(1e-3), location="update")
    chain = optax.chain(optax.adam(1e-3), optax_gc.centralize())
    assert _primitives(ours, params) == _primitives(chain, params)
    # A wrong guess changes the cost only: this runs here, on CPU, and agrees.
    got, _ = jax.jit(ours.update)(params, ours.init(params), params)
    expected, _ = jax.jit(chain.update)(params, chain.init(params), params)
    np.testing.assert_array_equal(got["w"], expected["w"])


def test_the_platform_guess_reads_the_default_device(monkeypatch):
    from optax_gc import _transform

    with jax.default_device(jax.devices("cpu")[0]):
        assert _transform.lowering_platform() == "cpu" and _transform.for_cpu()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert _transform.lowering_platform() == "tpu" and not _transform.for_cpu()
    with jax.default_device(jax.devices("cpu")[0]):
        assert _transform.lowering_platform() == "cpu"
