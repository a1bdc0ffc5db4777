"""The abstract interpreter: one rule per primitive, in an explicit registry.

:class:`Interpreter` walks a jaxpr equation by equation. An equation with a
weight-derived operand goes to its primitive's rule in :data:`RULES` (or, for
the entry-by-entry primitives, to :meth:`Interpreter.elementwise`); one with
data operands only goes to :meth:`Interpreter.data_equation`, which tracks
one-hot indicators, the tokens of stack slices and the footprints of uses;
one with constants only yields a constant, computed on demand. A primitive
with no rule is *unsupported*: every leaf that reaches it is left alone,
with that reason.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from optax_gc._infer._values import (
    CONST,
    DATA,
    EMPTY,
    Const,
    Data,
    Footprint,
    Lineage,
    Use,
    Weight,
    describe,
    join,
    merge,
    reshape_axes,
    reshape_groups,
    stacked_axes,
    union,
)
from optax_gc._jaxpr import (
    CROSS_DEVICE_ENTRYWISE,
    ENTRYWISE,
    LOOPS,
    PLACEMENT,
    JaxprEqn,
    bind,
    call_body,
    is_literal,
    jaxpr_of,
    shape_of,
)

Rule = Callable[["Interpreter", JaxprEqn, list[Any]], list[Any]]
"""A primitive's rule: ``rule(interpreter, eqn, operands) -> outputs``."""

RULES: dict[str, Rule] = {}
"""``primitive name -> rule`` for equations with a weight-derived operand."""


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Registers a function as the rule of the primitives ``names``."""

    def register(fn: Rule) -> Rule:
        for name in names:
            if name in RULES:
                raise ValueError(f"two rules for primitive {name!r}")
            RULES[name] = fn
        return fn

    return register


ELEMENTWISE = ENTRYWISE | CROSS_DEVICE_ENTRYWISE
"""Entry-by-entry primitives, collectives included: across devices the same
entry is combined, and the analysis sees one device's axes."""

IGNORED = frozenset({"debug_callback", "debug_print"})
"""Primitives with no effect on the computation's values."""

ONEHOT_KEEPS = (
    frozenset(
        "convert_element_type broadcast_in_dim reshape transpose squeeze copy".split()
    )
    | PLACEMENT
)
"""Primitives after which a one-hot indicator is still one."""

LINEAR = (
    frozenset(
        """add sub add_any neg convert_element_type reshape transpose
        broadcast_in_dim squeeze slice pad concatenate rev reduce_sum copy cumsum
        dynamic_slice dynamic_update_slice gather split reduce_precision psum
        real imag conj pvary""".split()
    )
    | PLACEMENT
)
"""Data ops through which a value stays a linear function of its inputs."""

SUMS = frozenset({"add", "sub", "add_any"})

FOOTPRINT_KEEPS = (
    frozenset("convert_element_type copy reduce_precision neg real imag conj".split())
    | PLACEMENT
)
"""Entry-by-entry data ops after which a use's output is still its output."""

_CONST_FOLD_LIMIT = 1 << 16
"""Constants computed on demand (gather indices, one-hot tables) up to this
many entries; bigger ones are unknown."""

_MAX_ITERATIONS = 256
"""Iterations of a loop body before its analysis gives up on the loop (every
leaf it reaches is then left alone)."""


class _NoFixpoint(Exception):
    """A loop's carry did not settle within ``_MAX_ITERATIONS``."""


def _earlier(x: Any) -> Any:
    """A loop carry fed back: its tokens come from an earlier iteration."""
    if not isinstance(x, Data) or not (x.tokens or x.ancestors):
        return x

    def mark(tokens: frozenset) -> frozenset:
        return frozenset((leaf, a, index, True) for leaf, a, index, _ in tokens)

    return x._replace(tokens=mark(x.tokens), ancestors=mark(x.ancestors))


class Interpreter:
    """Abstract interpretation of a jaxpr; collects each parameter's uses.

    Args:
      shapes: the shape of each parameter leaf, by leaf index.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        self.shapes = shapes
        self.nontrivial = [
            frozenset(a for a, n in enumerate(s) if n != 1) for s in shapes
        ]
        """Per leaf, its axes longer than 1: only they can conflict."""
        self.uses: dict[int, dict[Use, int]] = {}
        self.context: list[int] = []
        """The enclosing loops and calls of the equation being interpreted."""
        self.warm: dict[tuple[int, ...], list[Any]] = {}
        """Per loop (in its context), the carry it last reached."""
        self.broadcasts: dict[Any, JaxprEqn] = {}
        """The ``broadcast_in_dim`` equation that produced a variable."""

    # -- bookkeeping -----------------------------------------------------------

    def record(self, leaf: int, use: Use) -> None:
        counts = self.uses.setdefault(leaf, {})
        counts[use] = counts.get(use, 0) + 1

    def record_each(self, value: Any, make_use: Callable[[int, Lineage], Use]) -> None:
        """Records ``make_use(leaf, lineage)`` for every leaf ``value`` holds."""
        if isinstance(value, Weight):
            for leaf, lineage in value.lineages.items():
                self.record(leaf, make_use(leaf, lineage))

    def is_whole_scalar(self, leaf: int, lineage: Lineage) -> bool:
        """The whole leaf reduced to numbers with none of its axes (an L2
        term): every axis combined, none sliced, picked or cut."""
        nontrivial = self.nontrivial[leaf]
        return (
            bool(nontrivial)
            and not (union(lineage.axes) & nontrivial)
            and nontrivial <= lineage.mixed
            and not (lineage.stacked or lineage.picked or lineage.partial)
        )

    def mix(self, values: Sequence[Any], what: str) -> None:
        """Weight-derived values meet data with no fan-in."""
        for value in values:
            self.record_each(
                value,
                lambda leaf, lineage: (
                    Use("scalar", what)
                    if self.is_whole_scalar(leaf, lineage)
                    else Use("reduced", what, lineage.mixed & self.nontrivial[leaf])
                    if lineage.mixed & self.nontrivial[leaf]
                    else Use("elementwise", what)
                ),
            )

    def data_out(
        self,
        ins: Sequence[Any],
        tokens: frozenset = EMPTY,
        footprints: frozenset = EMPTY,
        onehot: bool = False,
    ) -> Data:
        """A data output of operands ``ins``: ancestors and dependences kept."""
        datas = [x for x in ins if isinstance(x, Data)]
        ancestors = union(x.tokens | x.ancestors for x in datas)
        depends = 0
        for x in datas:
            depends |= x.depends
        for fp in footprints:
            depends |= 1 << fp.leaf
        if not (tokens or ancestors or footprints or depends or onehot):
            return DATA
        return Data(tokens, ancestors, onehot, footprints, depends)

    def contract(
        self,
        value: Any,
        fan_dims: Sequence[int],
        what: str,
        site: int,
        batch_dims: Sequence[int] = (),
    ) -> tuple[frozenset, dict[int, Lineage]]:
        """``value``'s axes ``fan_dims`` are contracted with data.

        Returns the tokens of the stack slices used, and the lineages of the
        leaves whose use is clean (for the footprints of the output).
        """
        tokens = set()
        clean: dict[int, Lineage] = {}

        def make_use(leaf: int, lineage: Lineage) -> Use:
            if self.is_whole_scalar(leaf, lineage):
                return Use("scalar", what)
            fan = union(lineage.axes[d] for d in fan_dims)
            kept = union(a for d, a in enumerate(lineage.axes) if d not in fan_dims)
            nontrivial = self.nontrivial[leaf]
            stacked = frozenset(p for p in lineage.stacked if p[0] in nontrivial)
            kept |= stacked_axes(lineage.stacked)
            both = fan & kept & nontrivial  # size-1 axes: never a conflict
            if both:
                return Use(
                    "conflict", f"{describe(both)} both contracted and kept by {what}"
                )
            mixed = lineage.mixed & kept & nontrivial
            if mixed:
                return Use(
                    "conflict",
                    f"{describe(mixed)} mixed across its entries before {what}",
                )
            # Axes summed (or contracted with other parameters) before the
            # use feed every unit they reach: fan-in.
            fan |= nontrivial - fan - kept
            part = lineage.partial & fan & nontrivial
            if part:
                return Use("conflict", f"{describe(part)} only partly used by {what}")
            units = kept - lineage.spread
            if nontrivial and not (units & nontrivial) and lineage.spread & kept:
                return Use(
                    "conflict",
                    f"{describe(lineage.spread & kept)} of size 1 shared by every "
                    f"output unit of {what} (a gain, not units)",
                )
            tokens.update((leaf, a, index, False) for a, index in stacked)
            batched = union(lineage.axes[d] for d in batch_dims) & nontrivial
            clean[leaf] = lineage
            if lineage.added:
                return Use("bias", what, partners=lineage.added)
            return Use(
                "contract",
                what,
                fan - kept,
                stacked,
                site=site,
                batched=batched - fan,
            )

        self.record_each(value, make_use)
        return frozenset(tokens), clean

    # -- evaluation ------------------------------------------------------------

    def run(self, jaxpr: Any, inputs: Sequence[Any]) -> list[Any]:
        """Interprets ``jaxpr`` (open or closed) on abstract ``inputs``."""
        open_jaxpr = jaxpr_of(jaxpr)
        consts = getattr(jaxpr, "consts", None)
        env: dict[Any, Any] = {}
        for i, v in enumerate(open_jaxpr.constvars):
            value = consts[i] if consts is not None else None
            env[v] = Const(lambda value=value: _small(value))
        env.update(zip(open_jaxpr.invars, inputs, strict=True))

        def read(v: Any) -> Any:
            if is_literal(v):
                return Const(lambda v=v: np.asarray(v.val))
            return env[v]

        for eqn in open_jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if any(isinstance(x, Weight) for x in ins):
                outs = self.equation(eqn, ins)
            elif any(isinstance(x, Data) for x in ins):
                outs = self.data_equation(eqn, ins)
            else:
                outs = self.constant_equation(eqn, ins)
            env.update(zip(eqn.outvars, outs, strict=True))
            if eqn.primitive.name == "broadcast_in_dim":
                self.broadcasts[eqn.outvars[0]] = eqn
        return [read(v) for v in open_jaxpr.outvars]

    def constant_equation(self, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
        """Constants in, constants out: computed only if someone asks."""
        n_out = len(eqn.outvars)
        name = eqn.primitive.name
        if name in LOOPS or call_body(eqn) is not None:
            return [CONST] * n_out
        kind = _shape_kind(eqn, ins)
        size = max((math.prod(shape_of(v)) for v in eqn.outvars), default=0)
        if size > _CONST_FOLD_LIMIT or eqn.effects:
            return [Const(shape_kind=kind)] + [CONST] * (n_out - 1)
        results: list[list[Any]] = []

        def compute() -> list[Any]:
            if not results:
                values = [x.value() for x in ins]
                if any(v is None for v in values):
                    results.append([None] * n_out)
                else:
                    # Concrete even under an enclosing jit (a rule built at
                    # trace time): the operands are numpy constants.
                    with jax.ensure_compile_time_eval():
                        outs = bind(eqn, values)
                    results.append([np.asarray(o) for o in outs])
            return results[0]

        def output(i: int) -> Const:
            return Const(lambda: compute()[i], kind if i == 0 else None)

        return [output(i) for i in range(n_out)]

    def equation(self, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
        """An equation with a weight-derived operand: its primitive's rule."""
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if name in IGNORED:
            return [CONST] * n_out
        if name == "stop_gradient":  # no gradient reaches the leaf through it
            self.record_each(ins[0], lambda leaf, lineage: Use("stopped", name))
            return [CONST] * n_out
        primitive_rule = RULES.get(name)
        if primitive_rule is not None:
            return primitive_rule(self, eqn, ins)
        if name in ELEMENTWISE and n_out == 1:
            out = shape_of(eqn.outvars[0])
            ins = [
                self.broadcast_entries(x, v, out)
                for x, v in zip(ins, eqn.invars, strict=True)
            ]
            return [self.elementwise(name, ins, len(out))]
        if name in PLACEMENT:
            return list(ins)
        body = call_body(eqn)
        if body is not None:
            return self.call(eqn, body, ins)
        return self.unsupported(eqn, ins)

    def call(self, eqn: JaxprEqn, body: Any, ins: list[Any]) -> list[Any]:
        """Follows a call into its body (the call site is part of the context
        in which loops inside it remember their carries)."""
        self.context.append(id(eqn))
        try:
            return self.run(body, ins)
        finally:
            self.context.pop()

    def broadcast_entries(self, x: Any, var: Any, out: Sequence[int]) -> Any:
        """An operand whose size-1 axes a binary op broadcasts: entries copied."""
        shape = shape_of(var) if hasattr(var, "aval") else ()
        if not isinstance(x, Weight) or len(shape) != len(out):
            return x
        dims = [
            d for d, (n, m) in enumerate(zip(shape, out, strict=True)) if n == 1 != m
        ]
        if not dims:
            return x

        def copy_entries(leaf: int, lineage: Lineage) -> Lineage:
            copied = union(lineage.axes[d] for d in dims)
            return lineage._replace(
                mixed=lineage.mixed | (copied & self.nontrivial[leaf]),
                spread=lineage.spread | (copied - self.nontrivial[leaf]),
            )

        return self.structural(x, copy_entries)

    def elementwise(self, what: str, ins: Sequence[Any], rank: int) -> Any:
        datas = [x for x in ins if isinstance(x, Data)]
        if datas:
            self.mix(ins, what)
            tokens = EMPTY
            if what in SUMS or (what in ("mul", "div") and len(datas) == 1):
                tokens = union(x.tokens for x in datas)
            footprints = EMPTY
            if what in SUMS | {"mul", "div"}:
                footprints = self.linear_footprints(what, ins)
            return self.data_out(ins, tokens, footprints)
        if what in SUMS:
            ins = self.mark_added(ins)
        return merge(ins, rank)

    def mark_added(self, ins: Sequence[Any]) -> list[Any]:
        """Summed weight-derived values: a leaf added to a product or a
        reduction of parameters (``probe @ w``, ``A @ B``) learns their leaves:
        it is a bias of that computation."""
        weights = [x for x in ins if isinstance(x, Weight)]
        if len(weights) < 2:
            return list(ins)
        products = [w for w in weights if self.is_product(w)]
        if not products:
            return list(ins)
        out = []
        for x in ins:
            if isinstance(x, Weight):
                others = union(frozenset(w.lineages) for w in products if w is not x)
                x = self.structural(
                    x,
                    lambda leaf, lineage, others=others: lineage._replace(
                        added=lineage.added | (others - {leaf})
                    ),
                )
            out.append(x)
        return out

    def is_product(self, value: Weight) -> bool:
        """Some leaf's entries were combined (contracted or reduced) in it."""
        return any(
            lineage.mixed & self.nontrivial[leaf]
            for leaf, lineage in value.lineages.items()
        )

    def unsupported(self, eqn: JaxprEqn, ins: Sequence[Any]) -> list[Any]:
        for x in ins:
            self.record_each(
                x, lambda leaf, lineage: Use("unsupported", eqn.primitive.name)
            )
        return [self.data_out(ins)] * len(eqn.outvars)

    # -- data ------------------------------------------------------------------

    def data_equation(self, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
        """No parameter in: one-hots, tokens of stack slices, footprints."""
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        datas = [x for x in ins if isinstance(x, Data)]
        plain = all(_is_plain(x) for x in datas)
        if name == "eq" and plain and any(isinstance(x, Const) for x in ins):
            # ids == arange(n): the constant adds the class axis (ids == 0 does not)
            operand = eqn.invars[0] if isinstance(ins[0], Data) else eqn.invars[1]
            if math.prod(shape_of(eqn.outvars[0])) > math.prod(shape_of(operand)):
                return [self.data_out(ins, onehot=True)]
        if isinstance(ins[0], Data) and ins[0].onehot and name in ONEHOT_KEEPS:
            return [ins[0]]
        if name == "mul" and any(x.onehot for x in datas):
            onehot = [i for i, x in enumerate(ins) if isinstance(x, Data) and x.onehot]
            others = [v for i, v in enumerate(eqn.invars) if i not in onehot]
            classes = len(shape_of(eqn.outvars[0])) - 1
            if all(self.constant_along(v, classes) for v in others):
                return [self.data_out(ins, onehot=True)]  # scaled, or masked
        if name == "select_n" and self.is_indicator_select(ins):
            return [self.data_out(ins, onehot=True)]
        if name == "gather" and isinstance(ins[0], Const) and _is_onehot_table(ins[0]):
            return [self.data_out(ins, onehot=True)]  # eye(n)[ids]
        if name == "cond":  # a one-hot built in a branch stays one
            return cond_rule(self, eqn, ins)
        body = call_body(eqn)  # e.g. jax.nn.one_hot is a jitted function
        if body is not None:
            return self.call(eqn, body, ins)
        if plain:
            return [self.data_out(ins)] * n_out
        footprints = self.data_footprints(eqn, ins)
        linear = name in LINEAR or (
            name in ("mul", "div", "dot_general", "conv_general_dilated")
            and len(datas) == 1
            and (name != "div" or ins[0] is datas[0])
        )
        if not linear:
            return [self.data_out(ins, footprints=footprints)] * n_out
        if name in SUMS and len(datas) == 2:
            self.check_sum(datas[0], datas[1])
        tokens = union(x.tokens for x in datas)
        return [self.data_out(ins, tokens, footprints)] * n_out

    def constant_along(self, atom: Any, dim: int) -> bool:
        """An operand whose entries do not change along ``dim``: a scalar, a
        literal, or a broadcast along it (a mask of the rows of a one-hot)."""
        if is_literal(atom) or shape_of(atom) == ():
            return True
        producer = self.broadcasts.get(atom)
        if producer is None:
            return shape_of(atom)[dim] == 1 if dim < len(shape_of(atom)) else True
        dims = producer.params["broadcast_dimensions"]
        if dim not in dims:
            return True
        return shape_of(producer.invars[0])[dims.index(dim)] == 1

    def is_indicator_select(self, ins: Sequence[Any]) -> bool:
        """``where(onehot, 1, 0)``: the cases are constants 0 (false) and nonzero."""
        if not (isinstance(ins[0], Data) and ins[0].onehot) or len(ins) != 3:
            return False
        false, true = ins[1], ins[2]
        if not (isinstance(false, Const) and isinstance(true, Const)):
            return False
        false_value = false.value()
        return false_value is not None and not np.any(false_value)

    def check_sum(self, a: Data, b: Data) -> None:
        """Outputs of different slices of one stack added into the same units.

        Then the stack is not a stack of independent layers (a convolution
        written as shifted matmuls over a ``(taps, in, out)`` kernel), and the
        leaf is left alone. Not when one's input depends on the other's output
        (successive layers on a residual stream), nor for the same slice (the
        same model applied twice); the same slice from an earlier loop
        iteration counts only for slices taken per iteration (not an int
        index).
        """
        mine = a.tokens - b.tokens - b.ancestors
        theirs = b.tokens - a.tokens - a.ancestors
        if not mine or not theirs:
            return
        by_axis: dict[tuple, list] = {}
        for token in theirs:
            by_axis.setdefault(token[:2], []).append(token[2])
        for leaf, axis, index, _ in mine:
            for other in by_axis.get((leaf, axis), ()):
                if other != index or isinstance(other, str):
                    self.record(leaf, Use("summed", "", summed=frozenset({axis})))

    # -- footprints: a use's output, followed through linear data ops ------------

    def data_footprints(self, eqn: JaxprEqn, ins: Sequence[Any]) -> frozenset:
        """The footprints of a data-only equation's output."""
        name = eqn.primitive.name
        carriers = [x for x in ins if isinstance(x, Data) and x.footprints]
        if not carriers or len(eqn.outvars) != 1:
            return EMPTY
        if name == "dot_general":
            return self.second_contraction(eqn, ins)
        if name in SUMS | {"mul", "div"}:
            return self.linear_footprints(name, ins)
        x = ins[0]
        if not (isinstance(x, Data) and x.footprints) or len(carriers) != 1:
            return EMPTY
        out = set()
        for fp in x.footprints:
            axes = _remap(eqn, fp.axes)
            if axes is not None:
                out.add(fp._replace(axes=axes))
        return frozenset(out)

    def linear_footprints(self, name: str, ins: Sequence[Any]) -> frozenset:
        """``+``, ``-``, ``*``, ``/`` keep a footprint when the other operands
        do not depend on its leaf (a bias, a residual, a data mask)."""
        out = set()
        for i, x in enumerate(ins):
            if not (isinstance(x, Data) and x.footprints):
                continue
            if name == "div" and i != 0:
                continue
            others = [y for j, y in enumerate(ins) if j != i]
            if name in ("mul", "div") and any(isinstance(y, Weight) for y in others):
                continue  # scaled by a weight: a product of two weights' terms
            depends = 0
            for y in others:
                depends |= _depends(y)
            rank = max(len(fp.axes) for fp in x.footprints)
            for fp in x.footprints:
                if depends >> fp.leaf & 1:
                    continue
                pad = rank - len(fp.axes)
                out.add(fp._replace(axes=(EMPTY,) * pad + fp.axes))
        return frozenset(out)

    def second_contraction(self, eqn: JaxprEqn, ins: Sequence[Any]) -> frozenset:
        """A use's output contracted with plain data: that use's fan-in grows.

        A bilinear layer ``einsum("bi,oij,bj->bo", x, W, z)`` contracts ``W``
        with ``x`` and then with ``z``: both ``i`` and ``j`` are its fan-in.
        Only against data that no weight's use produced (attention's
        ``q @ k.T`` multiplies two layers' outputs, each with its own units).
        """
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        lhs_rank = len(shape_of(eqn.invars[0]))
        rhs_rank = len(shape_of(eqn.invars[1]))
        lf = [d for d in range(lhs_rank) if d not in lc and d not in lb]
        rf = [d for d in range(rhs_rank) if d not in rc and d not in rb]
        out = set()
        sides = ((lhs, rhs, lc, lb, lf, 0), (rhs, lhs, rc, rb, rf, len(lf)))
        for carrier, other, contracted, batch, free, before in sides:
            if not (isinstance(carrier, Data) and carrier.footprints):
                continue
            if not isinstance(other, Data) or other.onehot:
                continue  # a one-hot selects: a readout
            plain = not (other.depends or other.footprints)
            for fp in carrier.footprints:
                if union(fp.axes[d] for d in batch) & self.nontrivial[fp.leaf]:
                    continue  # batched over the units: a per-unit readout
                summed = union(fp.axes[d] for d in contracted)
                nontrivial = self.nontrivial[fp.leaf]
                # Against data from another use (attention weights, another
                # layer's output), only what the first use kept as a batch
                # dimension may still be summed (an einsum done in two steps).
                if not plain and not (summed & nontrivial <= fp.batched):
                    continue
                rest = [d for d in range(len(fp.axes)) if d not in contracted]
                remaining = union(fp.axes[d] for d in rest)
                if summed & nontrivial:
                    both = summed & remaining & nontrivial
                    if both:
                        what = (
                            f"{describe(both)} both contracted and kept by dot_general"
                        )
                        self.record(fp.leaf, Use("conflict", what))
                    else:
                        self.record(
                            fp.leaf, Use("extend", "dot_general", summed, site=fp.site)
                        )
                axes = [EMPTY] * (len(lb) + len(lf) + len(rf))
                for i, d in enumerate(batch):
                    axes[i] = fp.axes[d]
                for i, d in enumerate(free):
                    axes[len(lb) + before + i] = fp.axes[d]
                out.add(fp._replace(axes=tuple(axes)))
        return frozenset(out)

    # -- structural rules (one weight-derived operand) ---------------------------

    def structural(self, x: Any, fn: Callable[[int, Lineage], Lineage | None]) -> Any:
        """``x`` with each leaf's lineage mapped by ``fn`` (``None``: dropped)."""
        if not isinstance(x, Weight):
            return x
        lineages = {}
        for leaf, lineage in x.lineages.items():
            new = fn(leaf, lineage)
            if new is not None:
                lineages[leaf] = new
        return Weight(lineages) if lineages else CONST

    def drop(
        self, leaf: int, lineage: Lineage, dims: Sequence[int], kind: Any
    ) -> Lineage:
        """Removes value axes ``dims``: sliced off (by ``kind`` of index, or the
        static index picked before) or reduced (``kind=None``)."""
        gone = union(lineage.axes[d] for d in dims) & self.nontrivial[leaf]
        axes = tuple(a for d, a in enumerate(lineage.axes) if d not in dims)
        span = lineage.span
        if span is not None:
            span = (
                None
                if span[0] in dims
                else (span[0] - sum(d < span[0] for d in dims),) + span[1:]
            )
        if kind is None:
            return lineage._replace(axes=axes, mixed=lineage.mixed | gone, span=span)
        return lineage._replace(
            axes=axes,
            stacked=lineage.stacked | self.slices(lineage, gone, kind),
            span=span,
        )

    def slices(self, lineage: Lineage, axes: frozenset, kind: str) -> frozenset:
        """``(axis, index)`` of parameter axes sliced off: the static index if
        one entry was picked, else the kind of slicing."""
        picked = dict(lineage.picked)
        return frozenset((a, picked.get(a, kind)) for a in axes)

    def narrow(self, x: Any, dim: int, start: int, stop: int, size: int) -> Any:
        """A part ``[start, stop)`` of axis ``dim`` (of ``size``): only the
        sources in it, and those cut short are marked partly used."""

        def take_part(leaf: int, lineage: Lineage) -> Lineage | None:
            cut = lineage.axes[dim] & self.nontrivial[leaf]
            span = lineage.span
            offset = span[1] if span is not None and span[0] == dim else 0
            if stop - start == 1:
                lineage = lineage._replace(
                    picked=lineage.picked | {(a, start - offset) for a in cut}
                )
            if span is None or span[0] != dim:
                if stop - start < size:
                    lineage = lineage._replace(
                        partial=lineage.partial | cut,
                        pieces=lineage.pieces
                        | self.piece(leaf, cut, start, stop, size),
                    )
                return lineage
            lo, hi = max(span[1], start), min(span[2], stop)
            if lo >= hi:
                return None
            if hi - lo < span[2] - span[1]:
                lineage = lineage._replace(
                    partial=lineage.partial | cut,
                    pieces=lineage.pieces
                    | self.piece(
                        leaf, cut, lo - span[1], hi - span[1], span[2] - span[1]
                    ),
                )
            return lineage._replace(span=(dim, lo - start, hi - start))

        return self.structural(x, take_part)

    def partly(self, x: Any, dims: Sequence[int]) -> Any:
        """``x`` with the parameter axes along value axes ``dims`` only partly
        kept (a slice, negative padding), and no concatenation span."""

        def cut(leaf: int, lineage: Lineage) -> Lineage:
            part = union(lineage.axes[d] for d in dims) & self.nontrivial[leaf]
            return lineage._replace(span=None, partial=lineage.partial | part)

        return self.structural(x, cut)

    def piece(
        self, leaf: int, cut: frozenset, lo: int, hi: int, size: int
    ) -> frozenset:
        """``{(axis, lo, hi)}`` when the cut axis is one whole parameter axis."""
        if len(cut) != 1:
            return EMPTY
        (axis,) = cut
        if self.shapes[leaf][axis] != size:
            return EMPTY
        return frozenset({(axis, lo, hi)})


def _remap(eqn: JaxprEqn, axes: tuple) -> tuple | None:
    """Per-axis entries ``axes`` of an operand through a data op that moves
    entries without combining them; ``None`` for any other op."""
    name, params = eqn.primitive.name, eqn.params
    in_shape, out_shape = shape_of(eqn.invars[0]), shape_of(eqn.outvars[0])
    if name in FOOTPRINT_KEEPS:
        return axes
    if name == "transpose":
        return tuple(axes[p] for p in params["permutation"])
    if name == "reshape":
        dims = params.get("dimensions")
        if dims is not None:
            axes = tuple(axes[d] for d in dims)
            in_shape = tuple(in_shape[d] for d in dims)
        return reshape_axes(axes, in_shape, out_shape)
    if name == "broadcast_in_dim":
        new = [EMPTY] * len(out_shape)
        for i, d in enumerate(params["broadcast_dimensions"]):
            new[d] = axes[i]
        return tuple(new)
    if name == "squeeze":
        return tuple(a for d, a in enumerate(axes) if d not in params["dimensions"])
    return None


def _is_plain(x: Data) -> bool:
    """Data that is nothing but data (whatever it depends on)."""
    return not (x.tokens or x.ancestors or x.onehot or x.footprints)


def _depends(x: Any) -> int:
    """The leaves a value is computed from, as a bitset (weights: their own)."""
    if isinstance(x, Data):
        return x.depends
    if isinstance(x, Weight):
        bits = 0
        for leaf in x.lineages:
            bits |= 1 << leaf
        return bits
    return 0


def _small(value: Any) -> np.ndarray | None:
    if value is None or math.prod(np.shape(value)) > _CONST_FOLD_LIMIT:
        return None
    return np.asarray(value)


def _shape_kind(eqn: JaxprEqn, ins: Sequence[Any]) -> Any:
    """What is known of a constant's structure: an iota, or ``jnp.eye``."""
    name = eqn.primitive.name
    kinds = [x.shape_kind if isinstance(x, Const) else None for x in ins]
    if name == "iota":
        return ("iota", eqn.params["dimension"])
    if name in ("add", "sub") and len(ins) == 2:
        scalar = [shape_of(v) == () for v in eqn.invars]
        for i in (0, 1):
            if scalar[1 - i] and isinstance(kinds[i], tuple):
                return kinds[i]  # an iota offset by a scalar
    if name == "eq" and all(isinstance(k, tuple) for k in kinds):
        if kinds[0] != kinds[1] and len(shape_of(eqn.outvars[0])) == 2:
            return "onehot"
    if name in ("convert_element_type", "copy") and kinds[0] == "onehot":
        return "onehot"
    return None


def _is_onehot_table(table: Const) -> bool:
    """A constant whose last axis holds exactly one nonzero entry per row."""
    if table.shape_kind == "onehot":
        return True
    value = table.value()
    if value is None or value.ndim < 2:
        return False
    return bool(np.all(np.count_nonzero(value, axis=-1) == 1))


def _covered(pieces: frozenset, axis: int, size: int) -> bool:
    """The pieces of ``axis`` tile ``[0, size)`` exactly once."""
    ranges = sorted((lo, hi) for a, lo, hi in pieces if a == axis)
    position = 0
    for lo, hi in ranges:
        if lo != position:
            return False
        position = hi
    return position == size and bool(ranges)


# -- structural rules ---------------------------------------------------------------


@rule("transpose")
def transpose_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    perm = eqn.params["permutation"]

    def permute(leaf: int, lineage: Lineage) -> Lineage:
        span = lineage.span and (perm.index(lineage.span[0]),) + lineage.span[1:]
        return lineage._replace(axes=tuple(lineage.axes[p] for p in perm), span=span)

    return [interp.structural(ins[0], permute)]


@rule("rev")
def rev_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    return [interp.structural(ins[0], lambda leaf, s: s._replace(span=None))]


@rule("slice")
def slice_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    x = ins[0]
    p = eqn.params
    strides = p.get("strides") or (1,) * len(p["start_indices"])
    for d, (lo, hi, step) in enumerate(
        zip(p["start_indices"], p["limit_indices"], strides, strict=True)
    ):
        size = shape_of(eqn.invars[0])[d]
        if step == 1:
            x = interp.narrow(x, d, lo, hi, size)
        elif hi - lo > 1:

            def every_other(leaf: int, lineage: Lineage, d: int = d) -> Lineage:
                cut = lineage.axes[d] & interp.nontrivial[leaf]
                return lineage._replace(span=None, partial=lineage.partial | cut)

            x = interp.structural(x, every_other)
    return [x]


@rule("split")
def split_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    x, axis = ins[0], eqn.params["axis"]
    bounds, start = [], 0
    for size in eqn.params["sizes"]:
        bounds.append((start, start + size))
        start += size
    if not isinstance(x, Weight):
        return [x] * len(bounds)
    total = shape_of(eqn.invars[0])[axis]
    # One pass over the sources (a split after a concatenate, as in
    # ravel_pytree, has one source per part).
    parts: list[dict[int, Lineage]] = [{} for _ in bounds]
    starts = [lo for lo, _ in bounds]
    for leaf, lineage in x.lineages.items():
        cut_axes = lineage.axes[axis] & interp.nontrivial[leaf]
        if lineage.span is None or lineage.span[0] != axis:
            for part, (lo, hi) in zip(parts, bounds, strict=True):
                if len(parts) == 1:
                    part[leaf] = lineage
                else:
                    part[leaf] = lineage._replace(
                        partial=lineage.partial | cut_axes,
                        pieces=lineage.pieces
                        | interp.piece(leaf, cut_axes, lo, hi, total),
                    )
            continue
        _, lo, hi = lineage.span
        cut = lineage._replace(partial=lineage.partial | cut_axes)
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while i < len(bounds) and bounds[i][0] < hi:
            b_lo, b_hi = bounds[i]
            a, b = max(lo, b_lo), min(hi, b_hi)
            if a < b:
                whole = lineage if b - a == hi - lo else cut
                parts[i][leaf] = whole._replace(span=(axis, a - b_lo, b - b_lo))
            i += 1
    return [Weight(part) if part else CONST for part in parts]


@rule("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def cumulative_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    axis = eqn.params["axis"]

    def accumulate(leaf: int, lineage: Lineage) -> Lineage:
        mixed = lineage.axes[axis] & interp.nontrivial[leaf]
        return lineage._replace(mixed=lineage.mixed | mixed)

    return [interp.structural(ins[0], accumulate)]


@rule("squeeze")
def squeeze_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    dims = eqn.params["dimensions"]
    return [
        interp.structural(ins[0], lambda leaf, s: interp.drop(leaf, s, dims, "index"))
    ]


@rule("reshape")
def reshape_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    x = ins[0]
    old = tuple(shape_of(eqn.invars[0]))
    dims = eqn.params.get("dimensions")
    if dims is not None:  # a transpose first (vmap's batching of convolutions)
        x = interp.structural(
            x,
            lambda leaf, s: s._replace(
                axes=tuple(s.axes[d] for d in dims),
                span=s.span and (dims.index(s.span[0]),) + s.span[1:],
            ),
        )
        old = tuple(old[d] for d in dims)
    new = tuple(shape_of(eqn.outvars[0]))
    groups = reshape_groups(old, new)

    def regroup(leaf: int, lineage: Lineage) -> Lineage:
        view = view_groups(interp, leaf, lineage, old, new)
        if view is not None:
            return lineage._replace(axes=view, span=None)
        if groups is None:
            every = union(lineage.axes)
            return lineage._replace(
                axes=(every,) * len(new), mixed=lineage.mixed | every, span=None
            )
        gone = [d for d, size in enumerate(old) if size == 1 and lineage.axes[d]]
        sliced = union(lineage.axes[d] for d in gone) & interp.nontrivial[leaf]
        lineage = lineage._replace(
            stacked=lineage.stacked | interp.slices(lineage, sliced, "index"), span=None
        )
        axes = tuple(union(lineage.axes[i] for i in g) for g in groups)
        return lineage._replace(axes=axes)

    return [interp.structural(x, regroup)]


def view_groups(
    interp: Interpreter,
    leaf: int,
    lineage: Lineage,
    old: Sequence[int],
    new: Sequence[int],
) -> tuple[frozenset, ...] | None:
    """A reshape of a row-major view of the whole parameter (a flattened
    kernel, ``ravel_pytree``): the new axes, read from the parameter's own."""
    shape, nontrivial = interp.shapes[leaf], interp.nontrivial[leaf]
    order = [
        a
        for d in range(len(lineage.axes))
        for a in sorted(lineage.axes[d] & nontrivial)
    ]
    if order != sorted(nontrivial) or math.prod(old) != math.prod(shape):
        return None
    for d, axes in enumerate(lineage.axes):
        if math.prod(shape[a] for a in axes & nontrivial) != old[d]:
            return None
    groups = reshape_groups(shape, new)
    if groups is None:
        return None
    return tuple(frozenset(g) for g in groups)


@rule("broadcast_in_dim")
def broadcast_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    shape = eqn.params["shape"]
    dims = eqn.params["broadcast_dimensions"]
    old = shape_of(eqn.invars[0])

    def broadcast(leaf: int, lineage: Lineage) -> Lineage:
        axes = [EMPTY] * len(shape)
        mixed, spread = lineage.mixed, lineage.spread
        nontrivial = interp.nontrivial[leaf]
        for i, d in enumerate(dims):
            axes[d] = lineage.axes[i]
            if old[i] == 1 and shape[d] != 1:  # one entry copied to all
                mixed |= lineage.axes[i] & nontrivial
                spread |= lineage.axes[i] - nontrivial
        span = lineage.span and (dims[lineage.span[0]],) + lineage.span[1:]
        return lineage._replace(axes=tuple(axes), mixed=mixed, spread=spread, span=span)

    return [interp.structural(ins[0], broadcast)]


@rule(
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "reduce_xor",
    "argmax",
    "argmin",
)
def reduce_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    axes = eqn.params["axes"]
    # A sum (or product) reads every entry; a max, min or argmax one per unit.
    selects = eqn.primitive.name not in ("reduce_sum", "reduce_prod")

    def reduce(leaf: int, lineage: Lineage) -> Lineage:
        gone = union(lineage.axes[d] for d in axes) & interp.nontrivial[leaf]
        lineage = interp.drop(leaf, lineage, axes, None)
        if selects:
            lineage = lineage._replace(partial=lineage.partial | gone)
        return lineage

    return [interp.structural(ins[0], reduce)]


@rule("pad")
def pad_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    config = eqn.params["padding_config"]
    out = interp.elementwise("pad", ins, len(shape_of(eqn.outvars[0])))
    cut = [d for d, (lo, hi, _) in enumerate(config) if lo < 0 or hi < 0]
    return [interp.partly(out, cut)]


@rule("concatenate")
def concatenate_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    rank = len(shape_of(eqn.outvars[0]))
    if any(isinstance(x, Data) for x in ins):
        return [interp.elementwise("concatenate", ins, rank)]
    dim, start, parts = eqn.params["dimension"], 0, []
    for x, v in zip(ins, eqn.invars, strict=True):
        stop = start + shape_of(v)[dim]
        parts.append(
            interp.structural(
                x,
                lambda leaf, s, start=start, stop=stop: s._replace(
                    span=(dim, start, stop)
                ),
            )
        )
        start = stop
    out = merge(parts, rank)

    def reassembled(leaf: int, lineage: Lineage) -> Lineage:
        # Every part of a parameter axis put back along that axis
        # (``jnp.roll``): used whole.
        shape = interp.shapes[leaf]
        along = lineage.axes[dim]
        whole = {
            a for a in lineage.partial & along if _covered(lineage.pieces, a, shape[a])
        }
        if not whole:
            return lineage
        return lineage._replace(
            partial=lineage.partial - whole,
            pieces=frozenset(p for p in lineage.pieces if p[0] not in whole),
        )

    return [interp.structural(out, reassembled)]


@rule("stack")
def stack_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    """``jnp.stack`` (newer jax): a new axis, then a concatenation."""
    rank = len(shape_of(eqn.outvars[0]))
    if any(isinstance(x, Data) for x in ins):
        return [interp.elementwise("stack", ins, rank)]
    axis, parts = eqn.params["axis"], []
    for i, x in enumerate(ins):

        def insert(leaf: int, lineage: Lineage, i: int = i) -> Lineage:
            axes = lineage.axes[:axis] + (EMPTY,) + lineage.axes[axis:]
            return lineage._replace(axes=axes, span=(axis, i, i + 1))

        parts.append(interp.structural(x, insert))
    return [merge(parts, rank)]


@rule("tile")
def tile_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    """Entries copied, each still its own."""
    return [interp.structural(ins[0], lambda leaf, s: s._replace(span=None))]


@rule("sort")
def sort_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    out = interp.elementwise("sort", ins, len(shape_of(eqn.outvars[0])))
    dim = eqn.params["dimension"]

    def sort(leaf: int, lineage: Lineage) -> Lineage:
        return lineage._replace(
            mixed=lineage.mixed | (lineage.axes[dim] & interp.nontrivial[leaf])
        )

    return [interp.structural(out, sort)] * len(eqn.outvars)


@rule("all_gather")
def all_gather_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    if eqn.params.get("tiled", False):
        return [ins[0]]
    dim = eqn.params["all_gather_dimension"]

    def gather(leaf: int, lineage: Lineage) -> Lineage:
        axes = lineage.axes[:dim] + (EMPTY,) + lineage.axes[dim:]
        return lineage._replace(axes=axes, span=None)

    return [interp.structural(ins[0], gather)]


@rule("reduce_scatter", "psum_scatter")
def reduce_scatter_rule(
    interp: Interpreter, eqn: JaxprEqn, ins: list[Any]
) -> list[Any]:
    if not eqn.params.get("tiled", False):
        return interp.unsupported(eqn, ins)
    return [ins[0]]


# -- indexing -----------------------------------------------------------------------


@rule("dynamic_slice")
def dynamic_slice_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    operand, indices = ins[0], ins[1:]
    if any(isinstance(i, Weight) for i in indices):
        return interp.unsupported(eqn, ins)
    if any(isinstance(i, Data) for i in indices):
        interp.record_each(operand, lambda leaf, s: Use("lookup", "dynamic_slice"))
        return [interp.data_out(ins)]
    # Sliced axes become stacked where they are dropped (squeeze, reshape).
    old = shape_of(eqn.invars[0])
    cut = [d for d, n in enumerate(eqn.params["slice_sizes"]) if n < old[d]]
    return [interp.partly(operand, cut)]


@rule("gather")
def gather_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    operand, indices = ins
    if isinstance(indices, Weight):
        return interp.unsupported(eqn, ins)
    if isinstance(indices, Data):
        interp.record_each(operand, lambda leaf, s: Use("lookup", "gather"))
        return [interp.data_out(ins)]
    dn = eqn.params["dimension_numbers"]
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    collapsed = tuple(dn.collapsed_slice_dims)
    out_shape = shape_of(eqn.outvars[0])
    rank = len(out_shape)
    # Output axes that enumerate index positions (more than one: a gather of
    # several entries, whose axes then carry the collapsed operand axes).
    positions = [
        o for o in range(rank) if o not in dn.offset_dims and out_shape[o] != 1
    ]
    whole = positions and _gathers_every_entry(eqn, indices)
    operand_shape = shape_of(eqn.invars[0])
    cut = [
        d
        for d, n in enumerate(eqn.params["slice_sizes"])
        if d not in collapsed + batching and n < operand_shape[d]
    ]

    def gather(leaf: int, lineage: Lineage) -> Lineage:
        nontrivial = interp.nontrivial[leaf]
        part = union(lineage.axes[d] for d in cut) & nontrivial
        lineage = lineage._replace(partial=lineage.partial | part)
        kept = [d for d in range(len(lineage.axes)) if d not in collapsed + batching]
        axes = [EMPTY] * rank
        for d, o in zip(kept, dn.offset_dims, strict=True):
            axes[o] = lineage.axes[d]
        gathered = union(lineage.axes[d] for d in collapsed)
        stacked = lineage.stacked | {
            (a, "gather") for d in batching for a in lineage.axes[d] & nontrivial
        }
        if positions:
            for o in positions:
                axes[o] = axes[o] | gathered
            partial = (
                lineage.partial if whole else lineage.partial | (gathered & nontrivial)
            )
            return lineage._replace(
                axes=tuple(axes), stacked=stacked, span=None, partial=partial
            )
        stacked |= {(a, "gather") for a in gathered & nontrivial}
        return lineage._replace(axes=tuple(axes), stacked=stacked, span=None)

    return [interp.structural(operand, gather)]


def _gathers_every_entry(eqn: JaxprEqn, indices: Any) -> bool:
    """Constant indices that take every entry of the gathered axis (a
    permutation, or with repeats), so that the gathered weight is used whole;
    unknown indices count as a part."""
    dn = eqn.params["dimension_numbers"]
    value = indices.value() if isinstance(indices, Const) else None
    collapsed = tuple(dn.collapsed_slice_dims)
    if value is None or len(collapsed) != 1 or len(dn.start_index_map) != 1:
        return False
    size = shape_of(eqn.invars[0])[collapsed[0]]
    flat = np.asarray(value).reshape(-1)
    return bool(np.array_equal(np.unique(flat), np.arange(size)))


# -- uses -----------------------------------------------------------------------------


@rule("dot_general")
def dot_general_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    if any(isinstance(x, Data) and x.onehot for x in ins):  # one_hot @ table
        for x in (lhs, rhs):
            interp.record_each(x, lambda leaf, s: Use("lookup", "one-hot dot_general"))
        return [interp.data_out(ins)]
    lhs_rank = len(shape_of(eqn.invars[0]))
    rhs_rank = len(shape_of(eqn.invars[1]))
    lf = [d for d in range(lhs_rank) if d not in lc and d not in lb]
    rf = [d for d in range(rhs_rank) if d not in rc and d not in rb]
    out_rank = len(lb) + len(lf) + len(rf)
    sides = ((lhs, lb, lf, lc, 0), (rhs, rb, rf, rc, len(lf)))

    def output_axes(lineage: Lineage, batch, free, before) -> tuple[frozenset, ...]:
        axes = [EMPTY] * out_rank
        for i, d in enumerate(batch):
            axes[i] = lineage.axes[d]
        for i, d in enumerate(free):
            axes[len(lb) + before + i] = lineage.axes[d]
        return tuple(axes)

    if any(isinstance(x, Data) for x in ins):
        site = id(eqn)
        tokens: frozenset = EMPTY
        footprints = set()
        for value, batch, free, contracted, before in sides:
            used, clean = interp.contract(
                value, tuple(contracted), "dot_general", site, batch
            )
            tokens |= used
            for leaf, lineage in clean.items():
                axes = output_axes(lineage, batch, free, before)
                batched = union(lineage.axes[d] for d in batch)
                footprints.add(Footprint(leaf, site, axes, batched))
        return [interp.data_out(ins, tokens, frozenset(footprints))]
    # Two weight-derived values (or one and a constant): weight-derived; the
    # contracted axes are mixed away.
    for value, other in ((lhs, rhs), (rhs, lhs)):
        if isinstance(other, Const):
            interp.record_each(value, lambda leaf, s: Use("constant", "dot_general"))
    parts = []
    for value, batch, free, contracted, before in sides:
        if not isinstance(value, Weight):
            continue

        def product(
            leaf, lineage, batch=batch, free=free, contracted=contracted, before=before
        ):
            gone = union(lineage.axes[d] for d in contracted)
            mixed = lineage.mixed | (gone & interp.nontrivial[leaf])
            axes = output_axes(lineage, batch, free, before)
            return lineage._replace(axes=axes, mixed=mixed, span=None)

        parts.append(interp.structural(value, product))
    return [merge(parts, out_rank)]


@rule("conv_general_dilated")
def conv_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    lhs, rhs = ins
    if isinstance(lhs, Weight) or not isinstance(rhs, Weight):
        return interp.unsupported(eqn, ins)
    if isinstance(lhs, Const):
        interp.record_each(rhs, lambda leaf, s: Use("constant", "conv"))
        return [CONST]
    dn = eqn.params["dimension_numbers"]
    site = id(eqn)
    tokens, clean = interp.contract(rhs, tuple(dn.rhs_spec[1:]), "conv", site)
    rank = len(shape_of(eqn.outvars[0]))
    footprints = set()
    for leaf, lineage in clean.items():
        axes = [EMPTY] * rank
        axes[dn.out_spec[1]] = lineage.axes[dn.rhs_spec[0]]
        footprints.add(Footprint(leaf, site, tuple(axes)))
    return [interp.data_out(ins, tokens, frozenset(footprints))]


# -- control flow -------------------------------------------------------------------


def fixpoint(
    interp: Interpreter,
    eqn: JaxprEqn,
    step: Callable[[list[Any]], list[Any]],
    init: list[Any],
) -> tuple[list[Any], list[Any]]:
    """Runs a loop body until its carry stops changing.

    Returns the carry and the body's outputs for it. The uses of the last run
    (the one that saw the final carry) are the loop's. A loop met again in
    the same enclosing iteration context (a nested loop, run once per
    iteration of the outer one) starts from the carry it reached last time:
    the outer carry only grows, so the inner fixed point only grows, and
    nested loops cost about the sum of their iterations, not the product.
    """
    key = (*interp.context, id(eqn))
    warm = interp.warm.get(key)
    carry = list(init)
    if warm is not None:
        carry = [join(c, w) for c, w in zip(carry, warm, strict=True)]
    outer = interp.uses
    interp.context.append(id(eqn))
    try:
        for _ in range(_MAX_ITERATIONS):
            interp.uses = {}
            fed = [CONST if isinstance(c, Const) else _earlier(c) for c in carry]
            out = step(fed)
            new = [
                CONST if isinstance(j, Const) else _earlier(j)
                for j in (join(c, o) for c, o in zip(fed, out, strict=False))
            ]
            if new == fed:
                for leaf, counts in interp.uses.items():
                    mine = outer.setdefault(leaf, {})
                    for use, n in counts.items():
                        mine[use] = mine.get(use, 0) + n
                interp.warm[key] = fed
                return fed, out
            carry = new
        raise _NoFixpoint
    finally:
        interp.uses = outer
        interp.context.pop()


def _gave_up(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    """A loop whose carry did not settle: every leaf it reads is left alone."""
    what = f"{eqn.primitive.name} (its carry did not settle in {_MAX_ITERATIONS} runs)"
    for x in ins:
        interp.record_each(x, lambda leaf, lineage: Use("unsupported", what))
    return [interp.data_out(ins)] * len(eqn.outvars)


def _mix_carry(interp: Interpreter, inits, outs, fixed) -> None:
    for init, out, f in zip(inits, outs, fixed, strict=False):
        if isinstance(f, Data):
            interp.mix([init, out], "loop carry")


@rule("scan")
def scan_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts = ins[:n_consts]
    init = ins[n_consts : n_consts + n_carry]
    xs = ins[n_consts + n_carry :]
    sliced: dict[int, frozenset] = {}
    for x in xs:
        if isinstance(x, Weight):
            for leaf, lineage in x.lineages.items():
                sliced[leaf] = sliced.get(leaf, EMPTY) | lineage.axes[0]
    xs = [
        interp.structural(x, lambda leaf, s: interp.drop(leaf, s, (0,), "scan"))
        for x in xs
    ]
    xs = [_drop_footprints(x) for x in xs]  # their leading axis is gone

    def step(carry: list[Any]) -> list[Any]:
        return interp.run(p["jaxpr"], consts + carry + xs)

    try:
        carry, outs = fixpoint(interp, eqn, step, list(init))
    except _NoFixpoint:
        return _gave_up(interp, eqn, ins)
    _mix_carry(interp, init, outs[:n_carry], carry)

    def restack(leaf: int, lineage: Lineage) -> Lineage:
        lead = sliced.get(leaf, EMPTY)
        stacked = lineage.stacked - {(a, "scan") for a in lead}
        return lineage._replace(axes=(lead,) + lineage.axes, stacked=stacked, span=None)

    ys = [interp.structural(y, restack) for y in outs[n_carry:]]
    return carry + [_drop_footprints(y) for y in ys]


def _drop_footprints(x: Any) -> Any:
    if isinstance(x, Data) and x.footprints:
        return x._replace(footprints=EMPTY)
    if isinstance(x, Const):
        return CONST
    return x


@rule("while")
def while_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    p = eqn.params
    n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
    cond_consts = ins[:n_cond]
    body_consts = ins[n_cond : n_cond + n_body]
    init = ins[n_cond + n_body :]

    def step(carry: list[Any]) -> list[Any]:
        interp.run(p["cond_jaxpr"], cond_consts + carry)
        return interp.run(p["body_jaxpr"], body_consts + carry)

    try:
        carry, outs = fixpoint(interp, eqn, step, list(init))
    except _NoFixpoint:
        return _gave_up(interp, eqn, ins)
    _mix_carry(interp, init, outs, carry)
    return carry


@rule("cond")
def cond_rule(interp: Interpreter, eqn: JaxprEqn, ins: list[Any]) -> list[Any]:
    index, operands = ins[0], ins[1:]
    if isinstance(index, Weight):
        interp.mix([index], "cond")
    results = [interp.run(b, list(operands)) for b in eqn.params["branches"]]
    outs = []
    for values in zip(*results, strict=True):
        joined = values[0]
        for v in values[1:]:
            joined = join(joined, v)
        if isinstance(joined, Const) and not isinstance(index, Const):
            joined = interp.data_out([index])  # which constant: data decides
        if isinstance(joined, Data):
            interp.mix(values, "cond")
        outs.append(joined)
    return outs
