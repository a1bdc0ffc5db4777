"""GC on an optimizer's final update without materializing the update.

``with_gc(tx, location="update")`` needs each output unit's mean update before
it can write the centred update. Written naively (``u - mean(u)``), XLA on CPU
stores ``u`` in full because two computations read it, and the step costs two
to three times the bare optimizer's. Here ``tx.update`` is traced once, by
``jax.make_jaxpr``, and called as one nested ``jit`` (from jit's cache, which
``make_jaxpr`` shares: nothing is traced twice). For each centred leaf, the
entry-by-entry computation that produces its update from values the step reads
or outputs (the new moments, the gradient, the parameters) is found in that
jaxpr, with the scalars it reads (a bias correction, a schedule's learning
rate, a global norm), and the fan-in sums are recomputed from those values
block by block (:mod:`optax_gc._blocked`). The scalars the step does not
output are computed again beside the call, and XLA merges the two copies. The
update itself is then written once, centred, straight into whatever consumes
it (``optax.apply_updates`` under ``jit``).

Which formulation a computation gets is decided at trace time, from the
platform it is traced for (:func:`optax_gc._transform.lowering_platform`):
the blocked sums for CPU, nothing but ``centralize_tree(update(...))`` (the
plain chain's computation, which GPUs and TPUs fuse themselves) for any other.
Only one of the two is traced and compiled.

Any optimizer works. A leaf is summed whole, as the plain chain does, where
blocking cannot save memory: small leaves, leaves that are no matrix of
units, and leaves whose update is not an entry-by-entry function of stored
values (an orthogonalized or factored update, Adafactor's update clipped by
its own RMS), where XLA stores a leaf-sized value anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax import core as jax_core
from jax import lax

from optax_gc._axes import LeafRule, map_leaves, path_str
from optax_gc._blocked import (
    MIN_BLOCKED_ELEMENTS,
    MeanJob,
    blocked_fan_in_means,
    matrix_view,
)
from optax_gc._jaxpr import ENTRYWISE, bind, is_literal, read
from optax_gc._transform import (
    centralize_tree,
    centring_dtype,
    for_cpu,
    subtract_fan_in_mean,
)

RECOMPUTABLE: frozenset[str] = ENTRYWISE
"""What a recomputed computation may hold besides scalar broadcasts: every
entry-by-entry primitive. Not the collectives
(:data:`~optax_gc._jaxpr.CROSS_DEVICE_ENTRYWISE`: run per block they would
communicate once per block) nor the placement primitives
(:data:`~optax_gc._jaxpr.PLACEMENT`: their shardings describe the whole array)."""


class _Job(int):
    """The index of a leaf centred from blocked sums (stands in the tree for it)."""


class _Cone:
    """The entry-by-entry computation of one output from values already there.

    ``eqns``: the equations to recompute, in jaxpr order; ``inputs``: the
    leaf-shaped variables they start from (inputs or outputs of the step, or
    results of other operations); ``scalars``: the scalar variables they
    read (the rest is literals); ``roles``: what each input is in the step
    (set by :meth:`_Step.cone`).
    """

    def __init__(self, step: _Step, out: Any):
        producers, outputs = step.producers, step.outputs
        shape = tuple(out.aval.shape)
        self.inputs: list[Any] = []
        picked: dict[int, Any] = {}
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
            picked[id(eqn)] = eqn
            stack.extend(eqn.invars)
        self.eqns = sorted(picked.values(), key=lambda e: step.order[id(e)])
        self.out = out
        scalars = {
            v: None
            for e in self.eqns
            for v in e.invars
            if not is_literal(v) and tuple(v.aval.shape) == ()
        }
        self.scalars: list[Any] = list(scalars)
        self.roles: list[tuple[str, int]] = []  # set by _Step.cone
        self.prelude: list[Any] = []  # set by _Step.cone

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

    def __call__(
        self, blocks: Sequence[jax.Array], scalars: Sequence[jax.Array]
    ) -> jax.Array:
        """The output on one block, given the same block of every input."""
        local = dict(zip(self.inputs, blocks, strict=True))
        local.update(zip(self.scalars, scalars, strict=True))
        block_shape = tuple(blocks[0].shape) if blocks else ()

        def value(v):
            return read(local, v)

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
    """``update(*args)`` = ``(updates, state)``, with Φ on the updates' leaves.

    The blocked sums are for CPU only: :func:`optax_gc._transform.for_cpu`
    decides at trace time, from the default device, the mesh in context and
    the default backend. For any other platform, and when called eagerly,
    this is ``centralize_tree(update(*args))``, traced as it is, nothing
    else: the same computation as ``optax.chain(tx, centralize())``. A wrong
    guess changes the cost, never the values (both formulations give the same
    results to float rounding).
    """

    def plain():
        updates, state = update(*args)
        return centralize_tree(updates, rule, None), state

    if not any(isinstance(x, jax_core.Tracer) for x in jax.tree.leaves(args)):
        return plain()  # eager, op by op: nothing is fused, nothing to avoid
    if not for_cpu():
        return plain()  # XLA fuses the plain sums with their producers there
    try:
        # Tracers ``update`` closes over (``inject_hyperparams``'s injected
        # values) are the jaxpr's constants here, with their values.
        closed = jax.make_jaxpr(update)(*args)
    except TypeError:  # an argument JAX cannot trace (a string, a callable)
        return plain()
    # The same trace again, from jit's cache: one call in this computation.
    updates, state = jax.jit(update)(*args)
    step = _Step(closed, jax.tree.structure(updates))
    env = step.stored_values(jax.tree.leaves(args), jax.tree.leaves((updates, state)))
    jobs: list[tuple[MeanJob, jax.Array]] = []  # one per leaf from blocked sums

    def collect(path, u, var):
        axes = rule(path, u).axes
        if axes is None:
            return u
        cone = step.cone(var, u, axes)
        if cone is None:
            return subtract_fan_in_mean(u, axes)  # summed whole
        for eqn in cone.prelude:  # shared by the leaves: each runs once
            if eqn.outvars[0] not in env:
                operands = [read(env, v) for v in eqn.invars]
                env.update(zip(eqn.outvars, bind(eqn, operands), strict=True))
        inputs = [env[v] for v in cone.inputs]
        scalars = [env[v] for v in cone.scalars]
        dtype = centring_dtype(u.dtype)
        job = MeanJob(cone, inputs, scalars, tuple(u.shape), axes, dtype)
        jobs.append((job, u))
        return _Job(len(jobs) - 1)

    marks = map_leaves(collect, rule, updates, step.update_vars)
    means = blocked_fan_in_means([job for job, _ in jobs])

    def centre(i):
        u, mean = jobs[i][1], means[i]
        return (u.astype(mean.dtype) - mean).astype(u.dtype)

    centred = jax.tree.map(
        lambda m: centre(m) if isinstance(m, _Job) else m,
        marks,
        is_leaf=lambda m: isinstance(m, _Job),
    )
    return centred, state


class _Step:
    """The traced ``tx.update``: its jaxpr, outputs and what each leaf reads.

    ``stored``: the variables whose values the step has without computing
    anything more: its arguments, constants and outputs.
    """

    def __init__(self, closed: Any, updates_tree: Any):
        self.closed = closed
        self.jaxpr = jaxpr = closed.jaxpr
        n = updates_tree.num_leaves
        self.update_vars = jax.tree.unflatten(updates_tree, jaxpr.outvars[:n])
        self.producers = {v: e for e in jaxpr.eqns for v in e.outvars}
        self.order = {id(e): i for i, e in enumerate(jaxpr.eqns)}
        self.outputs = {v for v in jaxpr.outvars if not is_literal(v)}
        self.readers: dict[Any, list[Any]] = {}
        for e in jaxpr.eqns:
            for v in e.invars:
                if not is_literal(v):
                    self.readers.setdefault(v, []).append(e)
        self.roles: dict[Any, tuple[str, int]] = {}
        for kind, atoms in (
            ("output", jaxpr.outvars),
            ("const", jaxpr.constvars),
            ("argument", jaxpr.invars),
        ):
            self.roles.update(
                (v, (kind, i)) for i, v in enumerate(atoms) if not is_literal(v)
            )
        self.stored = set(self.roles)

    def stored_values(self, args: list[Any], outs: list[Any]) -> dict[Any, Any]:
        """The value of every stored variable, from the step's flat arguments
        and flat outputs."""
        jaxpr = self.jaxpr
        env: dict[Any, Any] = dict(zip(jaxpr.invars, args, strict=True))
        env.update(zip(jaxpr.constvars, self.closed.consts, strict=True))
        pairs = zip(jaxpr.outvars, outs, strict=True)
        env.update((v, x) for v, x in pairs if not is_literal(v))
        return env

    def prelude(self, scalars: list[Any]) -> list[Any] | None:
        """The equations that compute ``scalars`` from stored values, in order.

        Bias corrections, learning-rate schedules, a global norm: the scalars
        a recomputed update reads that the step does not output. ``None``
        where one comes from an equation with effects (a callback), which
        must not run twice.
        """
        picked: dict[int, Any] = {}
        stack = [v for v in scalars if v not in self.stored]
        seen: set[Any] = set()
        while stack:
            v = stack.pop()
            if is_literal(v) or v in self.stored or v in seen:
                continue
            seen.add(v)
            eqn = self.producers[v]
            if eqn.effects:
                return None
            picked[id(eqn)] = eqn
            stack.extend(eqn.invars)
        return sorted(picked.values(), key=lambda e: self.order[id(e)])

    def cone(self, var: Any, u: Any, axes: tuple[int, ...]) -> _Cone | None:
        """What ``u``'s blocked sums recompute, or ``None`` to sum ``u`` whole.

        Whole: leaves under :data:`~optax_gc._blocked.MIN_BLOCKED_ELEMENTS`
        (they fit in cache), leaves that are no matrix of units
        (:func:`~optax_gc._blocked.matrix_view`), constants, and leaves whose
        recomputation would read a leaf-sized value the step does not store
        anyway: an intermediate (Adafactor's factored second moment, an
        orthogonalized update) or the update itself; and leaves whose
        recomputed values the step also uses elsewhere (Adafactor clips each
        update by its own RMS, a reduction over the unclipped update). In
        both cases XLA stores a leaf-sized value anyway, so blocking saves
        nothing, and where the value is an intermediate it costs more than
        the update would: the plain chain stores one leaf, the loop would
        make XLA store the intermediate and keep its accumulators besides.
        """
        if u.size < MIN_BLOCKED_ELEMENTS or is_literal(var):
            return None
        if matrix_view(tuple(u.shape), axes) is None:
            return None
        cone = _Cone(self, var)
        if not cone.inputs:  # a constant: nothing to read
            return None
        if any(v is var or v not in self.stored for v in cone.inputs):
            return None
        picked = {id(e) for e in cone.eqns}
        for e in cone.eqns:
            for v in e.outvars:
                if v is not var and any(
                    id(r) not in picked for r in self.readers.get(v, ())
                ):
                    return None  # the step computes it anyway (and may store it)
        prelude = self.prelude(cone.scalars)
        if prelude is None:
            return None
        cone.prelude = prelude
        cone.roles = [self.roles[v] for v in cone.inputs]
        return cone


def leaf_cones(update: Any, args: tuple[Any, ...], rule: LeafRule) -> dict[str, Any]:
    """Each centred leaf's :class:`_Cone`, or ``None`` where it is summed whole.

    Keyed by key path (``optax_gc._axes.path_str``); for tests and for
    reading what the fast path does with an optimizer. Each cone's ``roles``
    say what its inputs are: ``("argument", i)`` is the ``i``-th leaf of
    ``args``, ``("output", i)`` the ``i``-th leaf of ``(updates, state)``,
    ``("const", i)`` the ``i``-th value ``update`` closes over.
    Traces ``update`` once and evaluates nothing.
    """
    closed, shapes = jax.make_jaxpr(update, return_shape=True)(*args)
    step = _Step(closed, jax.tree.structure(shapes[0]))
    out: dict[str, Any] = {}

    def visit(path, u, var):
        axes = rule(path, u).axes
        if axes is not None:
            out[path_str(path)] = step.cone(var, u, axes)
        return u

    map_leaves(visit, rule, shapes[0], step.update_vars)
    return out
