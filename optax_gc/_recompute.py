"""GC on an optimizer's final update without materializing the update.

``with_gc(tx, location="update")`` needs each output unit's mean update before
it can write the centred update. Written naively (``u - mean(u)``), XLA on
CPU stores ``u`` in full because two computations read it, and the step costs
two to three times the bare optimizer's. Here ``tx.update`` is traced once to
a jaxpr and evaluated as is; for each centred leaf, the entry-by-entry computation that
produces its update from values the step writes or reads anyway (the new
moments, the gradient, scalars such as the bias correction) is found in that
jaxpr, and the fan-in sums are recomputed from those values block by block
(:mod:`optax_gc._blocked`). The update itself is then written once, centred,
straight into whatever consumes it (``optax.apply_updates`` under ``jit``).

Any optimizer works: where the update is not an entry-by-entry function of
such values (an orthogonalized or factored update), the values it comes from
are the update itself, and the blocked sums read it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import core as jax_core
from jax import lax

from optax_gc._axes import LeafRule, fan_in_axes, map_leaves
from optax_gc._blocked import MIN_BLOCKED_ELEMENTS, blocked_fan_in_sums, on_cpu
from optax_gc._jaxpr import ENTRYWISE, evaluate, is_literal, read
from optax_gc._transform import centralize_tree, centring_dtype

RECOMPUTABLE: frozenset[str] = ENTRYWISE
"""What a recomputed computation may hold besides scalar broadcasts: every
entry-by-entry primitive. Not the collectives
(:data:`~optax_gc._jaxpr.CROSS_DEVICE_ENTRYWISE`: run per block they would
communicate once per block) nor the placement primitives
(:data:`~optax_gc._jaxpr.PLACEMENT`: their shardings describe the whole array)."""


class _Job(int):
    """The index of a centred leaf in the list of jobs (a tree leaf)."""


class _Cone:
    """The entry-by-entry computation of one output from values already there.

    ``eqns``: the equations to recompute, in jaxpr order; ``inputs``: the
    leaf-shaped variables they start from (inputs or outputs of the step, or
    results of other operations); the rest of what they read is scalars.
    """

    def __init__(self, jaxpr: Any, out: Any, producers: dict[Any, Any]):
        shape = tuple(out.aval.shape)
        outputs = {v for v in jaxpr.outvars if not is_literal(v)}
        self.inputs: list[Any] = []
        picked: set[int] = set()
        seen: set[Any] = set()
        stack = [out]
        while stack:
            v = stack.pop()
            if is_literal(v) or v in seen or tuple(v.aval.shape) == ():
                continue
            seen.add(v)
            eqn = producers.get(v)
            if (
                eqn is None
                or (v is not out and v in outputs)
                or not self._recomputable(eqn, shape)
            ):
                self.inputs.append(v)
                continue
            picked.add(id(eqn))
            stack.extend(eqn.invars)
        self.eqns = [e for e in jaxpr.eqns if id(e) in picked]
        self.out = out

    @staticmethod
    def _recomputable(eqn: Any, shape: tuple[int, ...]) -> bool:
        name = eqn.primitive.name
        if name == "broadcast_in_dim":
            return tuple(eqn.invars[0].aval.shape) == () and not eqn.params.get(
                "sharding"
            )
        if name not in RECOMPUTABLE or eqn.primitive.multiple_results:
            return False
        if name == "convert_element_type" and eqn.params.get("sharding"):
            return False
        shapes = [tuple(v.aval.shape) for v in eqn.invars]
        return all(s in ((), shape) for s in shapes)

    def __call__(self, env: dict[Any, Any], blocks: list[jax.Array]) -> jax.Array:
        """The output on one block, given the same block of every input."""
        local = dict(zip(self.inputs, blocks, strict=True))
        block_shape = tuple(blocks[0].shape) if blocks else ()

        def value(v):
            return read(local, v) if is_literal(v) or v in local else read(env, v)

        for eqn in self.eqns:
            if eqn.primitive.name == "broadcast_in_dim":
                out = lax.broadcast_in_dim(value(eqn.invars[0]), block_shape, ())
            else:
                out = eqn.primitive.bind(*map(value, eqn.invars), **eqn.params)
            local[eqn.outvars[0]] = out
        return local[self.out]


def centralized_update(
    update: Any,
    args: tuple[Any, ...],
    rule: LeafRule,
) -> tuple[Any, Any]:
    """``update(*args)`` = ``(updates, state)``, with Φ on the updates' leaves."""

    def plain():
        updates, state = update(*args)
        return centralize_tree(updates, rule, None), state

    if not any(isinstance(x, jax_core.Tracer) for x in jax.tree.leaves(args)):
        return plain()  # eager, op by op: nothing is fused, nothing to avoid
    try:
        closed, shapes = jax.make_jaxpr(update, return_shape=True)(*args)
    except TypeError:  # an argument JAX cannot trace (a string, a callable)
        return plain()
    jaxpr = closed.jaxpr
    env = evaluate(closed, jax.tree.leaves(args))
    flat = [read(env, v) for v in jaxpr.outvars]
    updates, state = jax.tree.unflatten(jax.tree.structure(shapes), flat)
    out_vars = jax.tree.unflatten(
        jax.tree.structure(updates), jaxpr.outvars[: len(jax.tree.leaves(updates))]
    )
    producers = {v: e for e in jaxpr.eqns for v in e.outvars}

    jobs = []  # (cone or None, axes, update leaf), one per centred leaf

    def collect(path, u, var):
        axes = rule(path, u).axes
        if axes is None:
            return u
        cone = None
        if u.size >= MIN_BLOCKED_ELEMENTS and not is_literal(var):
            cone = _Cone(jaxpr, var, producers)
            cone = cone if cone.inputs else None  # a constant: nothing to read
        jobs.append((cone, axes, u))
        return _Job(len(jobs) - 1)

    marks = map_leaves(collect, rule, updates, out_vars)
    if not jobs:
        return updates, state

    def sums_blocked():
        out = []
        for cone, axes, u in jobs:
            dtype = centring_dtype(u.dtype)
            s = None
            if cone is not None:
                inputs = [env[v] for v in cone.inputs]
                s = blocked_fan_in_sums(
                    lambda *b, c=cone: c(env, list(b)), inputs, u.shape, axes, dtype
                )
            out.append(s if s is not None else _sums(u, axes, dtype))
        return out

    def sums_plain():
        return [_sums(u, axes, centring_dtype(u.dtype)) for _, axes, u in jobs]

    big = any(cone is not None for cone, _, _ in jobs)
    sums = on_cpu(sums_blocked, sums_plain) if big else sums_plain()

    def centre(i):
        _, axes, u = jobs[i]
        count = u.size // sums[i].size
        x = u.astype(sums[i].dtype)
        return (x - sums[i] / count).astype(u.dtype)

    centred = jax.tree.map(
        lambda m, u: centre(m) if isinstance(m, _Job) else u, marks, updates
    )
    return centred, state


def _sums(u: jax.Array, axes: tuple[int, ...], dtype: Any) -> jax.Array:
    reduce = fan_in_axes(u.ndim, axes)
    return jnp.sum(u.astype(dtype), axis=reduce, keepdims=True)
