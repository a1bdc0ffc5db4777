"""Shared jaxpr plumbing: literals, bind parameters, evaluation, primitive tables.

Two parts of the library read jaxprs: :func:`optax_gc.infer_output_axes`
interprets a model's jaxpr abstractly (:mod:`optax_gc._infer`), and the
update-placement fast path evaluates an optimizer's jaxpr and recomputes parts
of it (:mod:`optax_gc._recompute`). What touches JAX's jaxpr internals lives
here, once, typed with the ``jax.extend.core`` types (all present from jax
0.4.35 on).

The primitive tables are sets of primitive *names* (``eqn.primitive.name``),
so that they hold across jax versions that rename or move primitive objects.
Each user derives its own set from them and states every exclusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from jax.extend import core as jex

Literal: TypeAlias = jex.Literal
Jaxpr: TypeAlias = jex.Jaxpr
ClosedJaxpr: TypeAlias = jex.ClosedJaxpr
JaxprEqn: TypeAlias = jex.JaxprEqn

ENTRYWISE: frozenset[str] = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e
    bessel_i1e cbrt ceil clamp clz complex conj convert_element_type copy cos
    cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma
    igammac imag integer_pow is_finite le lgamma log log1p logistic lt max min
    mul ne neg nextafter not or polygamma population_count pow real
    reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh xor
    zeta""".split()
)
"""Primitives that compute each output entry from the same entry of their
operands (scalars broadcast), with no shape among their parameters: evaluated
on any block of their operands, they give the same block of their output."""

CROSS_DEVICE_ENTRYWISE: frozenset[str] = frozenset(
    "psum pmax pmin ppermute pbroadcast psum_invariant pvary".split()
)
"""Collectives that combine the same entry across devices (inside
``shard_map``): entry by entry in the array's own axes, but they communicate."""

PLACEMENT: frozenset[str] = frozenset(
    "sharding_constraint mesh_cast reshard device_put optimization_barrier".split()
)
"""Primitives that leave values unchanged and only say where they live (their
parameters describe the whole array, so a block of it does not fit them)."""

LOOPS: frozenset[str] = frozenset({"scan", "while", "cond"})
"""Control flow whose sub-jaxprs take other operands than the equation's."""

_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def is_literal(atom: Any) -> bool:
    """Whether a jaxpr operand is a literal (a constant written in the jaxpr)."""
    return isinstance(atom, jex.Literal)


def shape_of(atom: Any) -> tuple[int, ...]:
    """The shape of a jaxpr operand (``()`` for tokens and other non-arrays)."""
    return tuple(getattr(atom.aval, "shape", ()))


def jaxpr_of(jaxpr: Jaxpr | ClosedJaxpr) -> Jaxpr:
    """The open jaxpr of a closed one (or the jaxpr itself)."""
    return jaxpr.jaxpr if isinstance(jaxpr, jex.ClosedJaxpr) else jaxpr


def call_body(eqn: JaxprEqn) -> Jaxpr | ClosedJaxpr | None:
    """The body of a call-like equation, taking the equation's own operands.

    ``jit`` (``pjit``), ``custom_jvp_call``, ``custom_vjp_call``,
    ``checkpoint`` (``remat``), ``shard_map``, ``closed_call``: ``None`` for
    every other equation, control flow (:data:`LOOPS`) included.
    """
    if eqn.primitive.name in LOOPS or eqn.primitive.name == "xla_pmap":
        return None  # xla_pmap's body drops the mapped axis (jax < 0.5)
    for name in _CALL_PARAMS:
        sub = eqn.params.get(name)
        inner = jaxpr_of(sub) if isinstance(sub, (jex.Jaxpr, jex.ClosedJaxpr)) else None
        if inner is not None and len(inner.invars) == len(eqn.invars):
            return sub
    return None


def bind_params(eqn: JaxprEqn) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(subfuns, params)`` to re-bind ``eqn.primitive`` with.

    ``get_bind_params`` returns the pair up to jax 0.4.x and the params alone
    since; this gives the pair on every version.
    """
    bind = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bind, tuple):
        subfuns, params = bind
        return tuple(subfuns), params
    return (), bind


def bind(eqn: JaxprEqn, operands: Sequence[Any]) -> list[Any]:
    """Binds ``eqn``'s primitive to ``operands`` in the current trace.

    Returns its outputs as a list (one per ``eqn.outvars``), in the equation's
    context (e.g. its ``jax.named_scope``) where it has one.
    """
    subfuns, params = bind_params(eqn)
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
        out = eqn.primitive.bind(*subfuns, *operands, **params)
    else:
        with ctx:
            out = eqn.primitive.bind(*subfuns, *operands, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(closed: ClosedJaxpr, args: Sequence[Any]) -> dict[Any, Any]:
    """Evaluates a closed jaxpr in the current trace: every variable's value.

    Unlike ``jax.core.eval_jaxpr``, which returns the outputs only, this keeps
    the value of every intermediate variable, for recomputing parts of it.
    """
    jaxpr = closed.jaxpr
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        operands = [read(env, v) for v in eqn.invars]
        env.update(zip(eqn.outvars, bind(eqn, operands), strict=True))
    return env


def read(env: dict[Any, Any], atom: Any) -> Any:
    """An operand's value: a literal's own, else the variable's in ``env``."""
    return atom.val if is_literal(atom) else env[atom]
