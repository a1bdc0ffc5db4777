"""Tests for the shared jaxpr plumbing (``optax_gc._jaxpr``)."""

import functools

import jax
import jax.extend.core.primitives as primitives
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gc import _jaxpr

# Primitives that exist in some supported jax versions (0.4.35 to the newest)
# and not in others.
_OTHER_VERSIONS = frozenset(
    """mesh_cast reshard pvary pbroadcast psum_invariant optimization_barrier
    square""".split()
)


def _known_names() -> set[str]:
    names = {getattr(primitives, n).name for n in dir(primitives) if n.endswith("_p")}
    for module in (jax.lax, jax._src.lax.parallel, jax._src.pjit, jax._src.core):  # noqa: SLF001
        for n in dir(module):
            p = getattr(module, n, None)
            if isinstance(p, jax.extend.core.Primitive):
                names.add(p.name)
    return names


@pytest.mark.parametrize(
    "table", ["ENTRYWISE", "CROSS_DEVICE_ENTRYWISE", "PLACEMENT", "LOOPS"]
)
def test_every_table_name_is_a_primitive(table):
    unknown = getattr(_jaxpr, table) - _known_names() - _OTHER_VERSIONS
    assert not unknown, f"{table} names no primitive of this jax: {sorted(unknown)}"


def test_tables_are_disjoint():
    tables = [_jaxpr.ENTRYWISE, _jaxpr.CROSS_DEVICE_ENTRYWISE, _jaxpr.PLACEMENT]
    for i, a in enumerate(tables):
        for b in tables[i + 1 :]:
            assert not a & b


@pytest.mark.parametrize(
    "fn",
    [
        jnp.tanh,
        jnp.sqrt,
        lambda x: jnp.where(x > 0, x, 2 * x),
        lambda x: jnp.clip(x, -1.0, 1.0) ** 3,
        lambda x: jax.nn.sigmoid(x) * jnp.exp(-x) / (1 + jnp.abs(x)),
        lambda x: jax.lax.rsqrt(x * x + 1e-8).astype(jnp.bfloat16),
    ],
)
def test_entrywise_functions_trace_to_entrywise_primitives(fn):
    """What jnp writes for an entrywise function is in the table, and on a
    block of the input the equations give the same block of the output."""
    x = jnp.linspace(-2.0, 2.0, 24).reshape(4, 6)
    closed = jax.make_jaxpr(fn)(x)
    names = {e.primitive.name for e in closed.jaxpr.eqns}
    assert names <= _jaxpr.ENTRYWISE | {"broadcast_in_dim", "pjit", "jit"}, names
    block = x[1:3, 2:5]
    full = _jaxpr.evaluate(closed, [x])
    part = _jaxpr.evaluate(jax.make_jaxpr(fn)(block), [block])
    out_full = _jaxpr.read(full, closed.jaxpr.outvars[0])
    out_part = _jaxpr.read(part, jax.make_jaxpr(fn)(block).jaxpr.outvars[0])
    np.testing.assert_array_equal(np.asarray(out_full)[1:3, 2:5], out_part)


def test_literal_test():
    closed = jax.make_jaxpr(lambda x: x * 2.0 + 1.0)(jnp.ones(3))
    operands = [v for e in closed.jaxpr.eqns for v in e.invars]
    literals = [v for v in operands if _jaxpr.is_literal(v)]
    assert literals and all(np.ndim(v.val) == 0 for v in literals)
    assert not _jaxpr.is_literal(closed.jaxpr.invars[0])


def _model(x, w):
    @jax.jit
    def inner(x):
        return jnp.tanh(x @ w)

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda primals, tangents: (f(*primals), jnp.cos(*primals) * tangents[0]))
    y = jax.checkpoint(lambda x: f(inner(x)))(x)
    return jax.lax.scan(lambda c, r: (c + r.sum(), r * c), 0.0, y)


def test_evaluate_equals_the_function_and_keeps_every_variable():
    x, w = jnp.arange(6.0).reshape(2, 3) / 6, jnp.ones((3, 4)) / 3
    closed = jax.make_jaxpr(_model)(x, w)
    env = _jaxpr.evaluate(closed, [x, w])
    got = [_jaxpr.read(env, v) for v in closed.jaxpr.outvars]
    want = jax.tree.leaves(_model(x, w))
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6)
    for eqn in closed.jaxpr.eqns:
        assert all(v in env for v in eqn.outvars)


def test_evaluate_under_jit_traces():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    closed = jax.make_jaxpr(_model)(x, w)

    @jax.jit
    def run(x, w):
        env = _jaxpr.evaluate(closed, [x, w])
        return [_jaxpr.read(env, v) for v in closed.jaxpr.outvars]

    for g, e in zip(run(x, w), jax.tree.leaves(_model(x, w)), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6)


def test_call_body_finds_calls_and_not_loops():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    found = {}

    def walk(jaxpr):
        for eqn in _jaxpr.jaxpr_of(jaxpr).eqns:
            body = _jaxpr.call_body(eqn)
            found[eqn.primitive.name] = body is not None
            if body is not None:
                walk(body)

    walk(jax.make_jaxpr(_model)(x, w))
    calls = {n for n, has in found.items() if has}
    assert "custom_jvp_call" in calls, found
    assert calls & {"checkpoint", "remat", "remat2"}, found
    assert calls & {"pjit", "jit"}, found
    assert found["scan"] is False


def test_bind_params_rebinds_to_the_same_result():
    fn = functools.partial(jnp.einsum, "ij,jk->ik")
    x, w = jnp.arange(6.0).reshape(2, 3), jnp.arange(12.0).reshape(3, 4)
    closed = jax.make_jaxpr(jax.jit(fn))(x, w)
    (eqn,) = closed.jaxpr.eqns
    subfuns, params = _jaxpr.bind_params(eqn)
    assert isinstance(subfuns, tuple) and isinstance(params, dict)
    (out,) = _jaxpr.bind(eqn, [x, w])
    np.testing.assert_allclose(out, fn(x, w))
