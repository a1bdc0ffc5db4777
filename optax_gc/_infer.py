"""Output axes read from the computation: ``infer_output_axes``.

The model function is traced once to a jaxpr and interpreted abstractly.
Every value is one of three kinds:

* constant: computed from literals and closed-over constants only;
* data: depends on a non-parameter input (``args``, ``kwargs``);
* weight-derived: computed from parameters without data. For each parameter
  it comes from, it records which of the parameter's axes each of its own
  axes carries (a reshape that merges axes carries all of them), and which
  parameter axes were sliced off by a data-independent index (a stack).

Where a weight-derived value meets data, the parameter is *used*, and the use
says which of its axes are the fan-in (``dot_general``, convolutions) or that
it has none (a lookup, an elementwise op). The uses of a leaf then decide its
output axes, or leave it untouched with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from optax_gc._axes import AxesRule, path_str

_Axes = tuple[frozenset, ...]


class _Src(NamedTuple):
    """How a weight-derived value relates to one parameter leaf."""

    axes: _Axes  # per axis of the value, the parameter axes it carries
    stacked: frozenset  # parameter axes sliced off by a data-independent index


class _Weight:
    """A weight-derived value: ``{leaf index: _Src}``."""

    __slots__ = ("srcs",)

    def __init__(self, srcs: dict[int, _Src]):
        self.srcs = srcs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Weight) and self.srcs == other.srcs

    __hash__ = None  # type: ignore[assignment]


class _Kind:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


CONST = _Kind("CONST")
DATA = _Kind("DATA")
ONEHOT = _Kind("ONEHOT")  # data: an indicator ``ids == arange(n)``, cast or not


def _is_data(x: Any) -> bool:
    return x is DATA or x is ONEHOT


_ONEHOT_KEEPS = frozenset(
    "convert_element_type broadcast_in_dim reshape transpose squeeze copy copy_p "
    "sharding_constraint".split()
)
"""Primitives after which a one-hot indicator is still one."""


class _Use(NamedTuple):
    kind: str  # "contract", "lookup", "elementwise", "unsupported", "conflict"
    what: str  # primitive (contract, elementwise, unsupported) or the detail
    fan_in: frozenset = frozenset()
    stacked: frozenset = frozenset()


def _map_axes(w: _Weight, fn: Callable[[_Src], _Src]) -> _Weight:
    return _Weight({leaf: fn(src) for leaf, src in w.srcs.items()})


def _merge(values: Sequence[Any], rank: int) -> _Weight:
    """Weight-derived values combined elementwise (right-aligned broadcast)."""
    srcs: dict[int, _Src] = {}
    for w in values:
        if not isinstance(w, _Weight):
            continue
        for leaf, src in w.srcs.items():
            axes = (frozenset(),) * (rank - len(src.axes)) + src.axes[-rank:]
            if len(src.axes) > rank:  # cannot happen for well-formed jaxprs
                axes = (frozenset().union(*src.axes),) * rank
            old = srcs.get(leaf)
            if old is not None:
                axes = tuple(a | b for a, b in zip(old.axes, axes, strict=True))
                src = _Src(axes, old.stacked | src.stacked)
            srcs[leaf] = _Src(axes, src.stacked)
    return _Weight(srcs)


def _drop_axes(src: _Src, dropped: Sequence[int], stack: bool) -> _Src:
    """Removes value axes; with ``stack`` their parameter axes become stacked."""
    gone = frozenset().union(*(src.axes[d] for d in dropped)) if dropped else None
    axes = tuple(a for d, a in enumerate(src.axes) if d not in dropped)
    stacked = src.stacked | gone if (stack and gone) else src.stacked
    return _Src(axes, stacked)


def _reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[list[int]] | None:
    """For each new axis, the old axes it is made of (size-1 axes ignored)."""
    if 0 in old or 0 in new:
        return None
    olds = [i for i, s in enumerate(old) if s != 1]
    news = [j for j, s in enumerate(new) if s != 1]
    groups: list[list[int]] = [[] for _ in new]
    i = j = 0
    while i < len(olds) and j < len(news):
        gi, gj = [olds[i]], [news[j]]
        pi, pj = old[olds[i]], new[news[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= old[olds[i]]
                gi.append(olds[i])
                i += 1
            else:
                pj *= new[news[j]]
                gj.append(news[j])
                j += 1
        for o in gj:
            groups[o] = gi
    return groups


_ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e
    bessel_i1e cbrt ceil clamp clz complex conj convert_element_type copy copy_p
    cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma
    igammac imag integer_pow is_finite le lgamma log log1p logistic lt max min mul
    ne neg nextafter not or polygamma population_count pow real reduce_precision
    rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh xor
    zeta sharding_constraint pvary mesh_cast reshard psum pmax pmin ppermute
    pbroadcast psum_invariant""".split()
)
"""Primitives that act entry by entry (or across devices, entry by entry)."""

_IGNORED = frozenset({"debug_callback", "debug_print"})
"""Primitives with no effect on the computation's values."""

_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _sub_jaxpr(eqn: Any) -> Any:
    """The sub-jaxpr of a call-like primitive (jit, remat, custom_jvp, ...)."""
    for name in _CALL_PARAMS:
        sub = eqn.params.get(name)
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
            return sub
    return None


def _describe(fan_in: frozenset) -> str:
    axes = tuple(sorted(fan_in))
    return f"axis {axes[0]}" if len(axes) == 1 else f"axes {axes}"


class _Interpreter:
    """Abstract interpretation of a jaxpr; collects each parameter's uses."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        self.shapes = shapes
        self.uses: list[dict[_Use, int]] = [{} for _ in shapes]
        self.recording = True

    # -- bookkeeping -----------------------------------------------------------

    def use(self, value: Any, use: Callable[[int, _Src], _Use]) -> None:
        if self.recording and isinstance(value, _Weight):
            for leaf, src in value.srcs.items():
                u = use(leaf, src)
                self.uses[leaf][u] = self.uses[leaf].get(u, 0) + 1

    def mix(self, values: Sequence[Any], what: str) -> None:
        """Weight-derived values meet data with no fan-in."""
        for v in values:
            self.use(v, lambda leaf, src: _Use("elementwise", what))

    def contract(self, value: Any, fan_dims: Sequence[int], what: str) -> None:
        """``value``'s axes ``fan_dims`` are contracted with data."""

        def use(leaf: int, src: _Src) -> _Use:
            fan = frozenset().union(*(src.axes[d] for d in fan_dims))
            kept = frozenset().union(
                *(a for d, a in enumerate(src.axes) if d not in fan_dims)
            )
            kept |= src.stacked
            # Size-1 axes change nothing either way: never a conflict.
            sizes = self.shapes[leaf]
            big = frozenset(a for a in range(len(sizes)) if sizes[a] != 1)
            both = fan & kept & big
            if both:
                return _Use(
                    "conflict",
                    f"{_describe(both)} both contracted and kept by {what}",
                )
            lost = big - fan - kept
            if lost:
                return _Use("conflict", f"{_describe(lost)} reduced before {what}")
            return _Use("contract", what, fan - kept, src.stacked & big)

        self.use(value, use)

    # -- evaluation ------------------------------------------------------------

    def run(self, closed: Any, inputs: Sequence[Any]) -> list[Any]:
        jaxpr = getattr(closed, "jaxpr", closed)
        env: dict[Any, Any] = {v: CONST for v in jaxpr.constvars}
        env.update(zip(jaxpr.invars, inputs, strict=True))

        def read(v: Any) -> Any:
            return CONST if hasattr(v, "val") else env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            if any(isinstance(x, _Weight) for x in ins):
                outs = self.eqn(eqn, ins)
            elif any(_is_data(x) for x in ins):
                outs = self.data_eqn(eqn, ins)
            else:
                outs = [CONST] * len(eqn.outvars)
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(v) for v in jaxpr.outvars]

    def data_eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        """Data only: tracks one-hot indicators, which make a matmul a lookup."""
        name = eqn.primitive.name
        if name == "eq" and {ins[0], ins[1]} == {DATA, CONST}:
            # ids == arange(n): the constant adds the class axis (ids == 0 does not)
            data = eqn.invars[0] if ins[0] is DATA else eqn.invars[1]
            size = math.prod(eqn.outvars[0].aval.shape)
            if size > math.prod(data.aval.shape):
                return [ONEHOT]
        if name in _ONEHOT_KEEPS and ins[0] is ONEHOT:
            return [ONEHOT]
        sub = _sub_jaxpr(eqn)  # e.g. jax.nn.one_hot is a jitted function
        if sub is not None:
            return self.run(sub, ins)
        return [DATA] * len(eqn.outvars)

    def eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        params = eqn.params
        n_out = len(eqn.outvars)
        if name in _IGNORED:
            return [CONST] * n_out
        handler = getattr(self, "p_" + name, None)
        if handler is not None:
            return handler(eqn, ins)
        if name in _ELEMENTWISE and n_out == 1:
            return [self.elementwise(name, ins, len(eqn.outvars[0].aval.shape))]
        if name in ("optimization_barrier", "device_put"):
            return list(ins)
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            return self.run(sub, ins)
        del params
        for x in ins:
            self.use(x, lambda leaf, src: _Use("unsupported", name))
        return [DATA] * n_out

    def elementwise(self, what: str, ins: Sequence[Any], rank: int) -> Any:
        if any(_is_data(x) for x in ins):
            self.mix(ins, what)
            return DATA
        return _merge(ins, rank)

    # -- structural primitives (one weight-derived operand) --------------------

    def structural(self, x: Any, fn: Callable[[_Src], _Src]) -> Any:
        return _map_axes(x, fn) if isinstance(x, _Weight) else x

    def p_transpose(self, eqn, ins):
        perm = eqn.params["permutation"]
        return [
            self.structural(
                ins[0], lambda s: _Src(tuple(s.axes[p] for p in perm), s.stacked)
            )
        ]

    def p_rev(self, eqn, ins):
        return [ins[0]]

    def p_slice(self, eqn, ins):
        return [ins[0]]

    def p_cumsum(self, eqn, ins):
        return [ins[0]]

    p_cumprod = p_cummax = p_cummin = p_cumlogsumexp = p_cumsum

    def p_squeeze(self, eqn, ins):
        dims = eqn.params["dimensions"]
        return [self.structural(ins[0], lambda s: _drop_axes(s, dims, stack=True))]

    def p_reshape(self, eqn, ins):
        if eqn.params.get("dimensions") is not None:
            return self.unsupported(eqn, ins)
        old = eqn.invars[0].aval.shape
        new = eqn.outvars[0].aval.shape
        groups = _reshape_groups(old, new)

        def fn(s: _Src) -> _Src:
            if groups is None:
                every = frozenset().union(*s.axes) if s.axes else frozenset()
                return _Src((every,) * len(new), s.stacked)
            gone = [d for d, size in enumerate(old) if size == 1 and s.axes[d]]
            s = _Src(s.axes, s.stacked.union(*(s.axes[d] for d in gone)))
            axes = tuple(frozenset().union(*(s.axes[i] for i in g)) for g in groups)
            return _Src(axes, s.stacked)

        return [self.structural(ins[0], fn)]

    def p_broadcast_in_dim(self, eqn, ins):
        shape = eqn.params["shape"]
        dims = eqn.params["broadcast_dimensions"]

        def fn(s: _Src) -> _Src:
            axes = [frozenset()] * len(shape)
            for i, d in enumerate(dims):
                axes[d] = s.axes[i]
            return _Src(tuple(axes), s.stacked)

        return [self.structural(ins[0], fn)]

    def reduce(self, eqn, ins):
        axes = eqn.params["axes"]
        return [self.structural(ins[0], lambda s: _drop_axes(s, axes, stack=False))]

    p_reduce_sum = p_reduce_max = p_reduce_min = p_reduce_prod = reduce
    p_reduce_and = p_reduce_or = p_reduce_xor = p_argmax = p_argmin = reduce

    def p_split(self, eqn, ins):
        return [ins[0]] * len(eqn.outvars)

    def p_pad(self, eqn, ins):
        return [self.elementwise("pad", ins, len(eqn.outvars[0].aval.shape))]

    def p_concatenate(self, eqn, ins):
        return [self.elementwise("concatenate", ins, len(eqn.outvars[0].aval.shape))]

    def p_sort(self, eqn, ins):
        rank = len(eqn.outvars[0].aval.shape)
        out = self.elementwise("sort", ins, rank)
        return [out] * len(eqn.outvars)

    def p_all_gather(self, eqn, ins):
        if eqn.params.get("tiled", False):
            return [ins[0]]
        dim = eqn.params["all_gather_dimension"]

        def fn(s: _Src) -> _Src:
            return _Src(s.axes[:dim] + (frozenset(),) + s.axes[dim:], s.stacked)

        return [self.structural(ins[0], fn)]

    def p_reduce_scatter(self, eqn, ins):
        if not eqn.params.get("tiled", False):
            return self.unsupported(eqn, ins)
        return [ins[0]]

    p_psum_scatter = p_reduce_scatter

    def unsupported(self, eqn, ins):
        for x in ins:
            self.use(x, lambda leaf, src: _Use("unsupported", eqn.primitive.name))
        return [DATA] * len(eqn.outvars)

    # -- indexing ---------------------------------------------------------------

    def p_dynamic_slice(self, eqn, ins):
        operand, indices = ins[0], ins[1:]
        if any(isinstance(i, _Weight) for i in indices):
            return self.unsupported(eqn, ins)
        if any(_is_data(i) for i in indices):
            self.use(operand, lambda leaf, src: _Use("lookup", "dynamic_slice"))
            return [DATA]
        return [operand]  # sliced axes are marked stacked where they are dropped

    def p_gather(self, eqn, ins):
        operand, indices = ins
        if isinstance(indices, _Weight):
            return self.unsupported(eqn, ins)
        if _is_data(indices):
            self.use(operand, lambda leaf, src: _Use("lookup", "gather"))
            return [DATA]
        dn = eqn.params["dimension_numbers"]
        collapsed = tuple(dn.collapsed_slice_dims) + tuple(
            getattr(dn, "operand_batching_dims", ())
        )
        rank = len(eqn.outvars[0].aval.shape)

        def fn(s: _Src) -> _Src:
            kept = [d for d in range(len(s.axes)) if d not in collapsed]
            axes = [frozenset()] * rank
            for d, o in zip(kept, dn.offset_dims, strict=True):
                axes[o] = s.axes[d]
            stacked = s.stacked.union(*(s.axes[d] for d in collapsed))
            return _Src(tuple(axes), stacked)

        return [self.structural(operand, fn)]

    # -- uses ---------------------------------------------------------------------

    def p_dot_general(self, eqn, ins):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        if ONEHOT in (lhs, rhs):  # one_hot(ids) @ table: a lookup
            for x in (lhs, rhs):
                self.use(x, lambda leaf, src: _Use("lookup", "one-hot dot_general"))
            return [DATA]
        if _is_data(lhs) or _is_data(rhs):
            self.contract(lhs, tuple(lc), "dot_general")
            self.contract(rhs, tuple(rc), "dot_general")
            return [DATA]
        # Two weight-derived values (or one and a constant): weight-derived.
        lhs_rank = len(eqn.invars[0].aval.shape)
        rhs_rank = len(eqn.invars[1].aval.shape)
        lf = [d for d in range(lhs_rank) if d not in lc and d not in lb]
        rf = [d for d in range(rhs_rank) if d not in rc and d not in rb]
        srcs: dict[int, _Src] = {}
        for value, batch, free, n_free_before in (
            (lhs, lb, lf, 0),
            (rhs, rb, rf, len(lf)),
        ):
            if not isinstance(value, _Weight):
                continue
            for leaf, s in value.srcs.items():
                axes = [frozenset()] * (len(lb) + len(lf) + len(rf))
                for i, d in enumerate(batch):
                    axes[i] = s.axes[d]
                for i, d in enumerate(free):
                    axes[len(lb) + n_free_before + i] = s.axes[d]
                new = _Src(tuple(axes), s.stacked)
                old = srcs.get(leaf)
                if old is not None:
                    new = _Src(
                        tuple(a | b for a, b in zip(old.axes, new.axes, strict=True)),
                        old.stacked | new.stacked,
                    )
                srcs[leaf] = new
        return [_Weight(srcs)]

    def p_conv_general_dilated(self, eqn, ins):
        lhs, rhs = ins
        if isinstance(lhs, _Weight) or not isinstance(rhs, _Weight):
            return self.unsupported(eqn, ins)
        if lhs is CONST:
            return self.unsupported(eqn, ins)
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec
        self.contract(rhs, tuple(rhs_spec[1:]), "conv")
        return [DATA]

    # -- control flow -------------------------------------------------------------

    def join(self, a: Any, b: Any) -> Any:
        if a is CONST:
            return b
        if b is CONST:
            return a
        if a is ONEHOT and b is ONEHOT:
            return ONEHOT
        if _is_data(a) or _is_data(b):
            return DATA
        return _merge([a, b], len(next(iter(a.srcs.values())).axes))

    def fixpoint(
        self,
        step: Callable[[list[Any]], list[Any]],
        carry: list[Any],
    ) -> list[Any]:
        """Joins the loop carry with the body's output until it stops changing."""
        recording, self.recording = self.recording, False
        try:
            for _ in range(32):
                out = step(carry)
                new = [self.join(c, o) for c, o in zip(carry, out, strict=True)]
                if new == carry:
                    break
                carry = new
            else:  # pragma: no cover - the lattice has finite height
                carry = [DATA if c is not CONST else c for c in carry]
        finally:
            self.recording = recording
        return carry

    def mix_carry(self, inits, outs, fixed) -> None:
        for init, out, f in zip(inits, outs, fixed, strict=True):
            if _is_data(f):
                self.mix([init, out], "loop carry")

    def p_scan(self, eqn, ins):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        consts, init, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]

        def slice_x(x: Any) -> Any:
            return self.structural(x, lambda s: _drop_axes(s, (0,), stack=True))

        xs = [slice_x(x) for x in xs]

        def step(carry: list[Any]) -> list[Any]:
            return self.run(p["jaxpr"], consts + carry + xs)[:nk]

        carry = self.fixpoint(step, list(init))
        outs = self.run(p["jaxpr"], consts + carry + xs)
        self.mix_carry(init, outs[:nk], carry)
        ys = [
            self.structural(y, lambda s: _Src((frozenset(),) + s.axes, s.stacked))
            for y in outs[nk:]
        ]
        return carry + ys

    def p_while(self, eqn, ins):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, init = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]

        def step(carry: list[Any]) -> list[Any]:
            return self.run(p["body_jaxpr"], bconsts + carry)

        carry = self.fixpoint(step, list(init))
        outs = self.run(p["body_jaxpr"], bconsts + carry)
        self.run(p["cond_jaxpr"], cconsts + carry)
        self.mix_carry(init, outs, carry)
        return carry

    def p_cond(self, eqn, ins):
        index, operands = ins[0], ins[1:]
        if isinstance(index, _Weight):
            self.mix([index], "cond")
        results = [self.run(b, list(operands)) for b in eqn.params["branches"]]
        outs = []
        for values in zip(*results, strict=True):
            joined = values[0]
            for v in values[1:]:
                joined = self.join(joined, v)
            if _is_data(joined):
                self.mix(values, "cond")
            outs.append(joined)
        return outs


def _decide(uses: dict[_Use, int], shape: tuple[int, ...]) -> tuple[Any, str]:
    """A leaf's output axes (or ``None``) and the reason, from its uses."""
    if not uses:
        return None, "not used with data"
    by_kind: dict[str, list[_Use]] = {}
    for u in uses:
        by_kind.setdefault(u.kind, []).append(u)
    if "unsupported" in by_kind:
        names = sorted({u.what for u in by_kind["unsupported"]})
        return None, f"unsupported op: {', '.join(names)}"
    if "conflict" in by_kind:
        return None, sorted(u.what for u in by_kind["conflict"])[0]
    contracts = by_kind.get("contract", [])
    if "lookup" in by_kind:
        if contracts:
            return None, "tied lookup and matmul"
        return None, "lookup"
    if not contracts:
        names = sorted({u.what for u in by_kind["elementwise"]})
        return None, f"elementwise only ({', '.join(names)})"
    big = frozenset(a for a in range(len(shape)) if shape[a] != 1)
    ops = sorted({u.what for u in contracts})
    fans = {u.fan_in & big for u in contracts}
    if len(fans) > 1 or "elementwise" in by_kind:
        described = sorted({_describe_use(u.what, u.fan_in) for u in contracts})
        if "elementwise" in by_kind:
            names = sorted({u.what for u in by_kind["elementwise"]})
            described.append(f"elementwise ({', '.join(names)})")
        return None, "uses disagree: " + "; ".join(described)
    fan_in = frozenset().union(*(u.fan_in for u in contracts))
    if not fan_in:
        return None, f"{' and '.join(ops)}: no axis contracted"
    reason = _describe_use(" and ".join(ops), fan_in)
    count = sum(uses[u] for u in contracts)
    if count > 1:
        reason += f" ({count} uses)"
    stacked = frozenset().union(*(u.stacked for u in contracts))
    if stacked:
        reason += f"; stacked {_describe(stacked)} kept"
    kept = tuple(a for a in range(len(shape)) if a not in fan_in)
    if not kept:
        return None, f"{reason}: every axis contracted, no output axis"
    return kept, reason


def _describe_use(ops: str, fan_in: frozenset) -> str:
    if ops == "conv":
        return f"conv: in-feature and spatial {_describe(fan_in)}"
    verb = "contract" if " and " in ops else "contracts"
    return f"{ops} {verb} {_describe(fan_in)}"


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


class InferredAxes(AxesRule):
    """The rule :func:`optax_gc.infer_output_axes` returns; see there.

    Attributes:
      decisions: ``{path: (axes | None, reason)}`` for every leaf of the
        parameters it was inferred from, paths in the ``a/b/c`` form.
    """

    def __init__(self, decisions: dict[str, tuple[Any, str]], shapes: dict):
        self.decisions = decisions
        self._shapes = shapes

    def decide(self, path: Any, leaf: Any) -> tuple[Any, str]:
        name = path_str(path)
        if name not in self.decisions:
            known = list(self.decisions)
            raise ValueError(
                f'infer_output_axes: leaf "{name}" is not a leaf of the '
                f"parameters the axes were inferred from ({len(known)} leaves, "
                f"e.g. {known[:3]}). Infer from a tree with the structure of "
                "the gradients (for Flax linen, variables['params'])."
            )
        shape = self._shapes[name]
        leaf_shape = getattr(leaf, "shape", None)
        if shape is not None and leaf_shape is not None and tuple(leaf_shape) != shape:
            raise ValueError(
                f'infer_output_axes: leaf "{name}" has shape {tuple(leaf_shape)}, '
                f"but the parameter it was inferred from has shape {shape}."
            )
        axes, reason = self.decisions[name]
        if isinstance(axes, Exception):
            raise axes
        return axes, reason

    def __repr__(self) -> str:
        touched = sum(a is not None for a, _ in self.decisions.values())
        return f"InferredAxes({len(self.decisions)} leaves, {touched} with output axes)"


def infer_output_axes(
    fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> InferredAxes:
    r"""Reads every parameter's output axes from the computation that uses it.

    GC averages each output unit's gradient over its fan-in: the weights that
    are contracted with the layer's input to produce that unit. This traces
    ``fn(params, *args, **kwargs)`` once, abstractly (nothing runs on data),
    and reads the fan-in of every leaf of ``params`` from the jaxpr, so that
    GC is exact on any layout without rules written by hand: DenseGeneral and
    attention kernels, stacked (``nn.scan``, ``nnx.vmap``) layers, Equinox's
    ``(out, in)`` layout, weights applied transposed, locally connected and
    grouped convolutions alike.

    Semantics. A value is *weight-derived* when it is computed from
    parameters without data: casts, transposes, ``rev``, reshapes that split or
    merge axes, broadcasts, slices with data-independent indices, elementwise
    products with constants or other parameters (weight normalization). A
    *use* is where a weight-derived value meets data:

    * ``dot_general`` (matmul, einsum, DenseGeneral, attention, locally
      connected layers): the parameter's axes that map to contracted
      dimensions are its fan-in; batch and free dimensions are kept.
    * ``conv_general_dilated`` (incl. transposed, grouped, depthwise): the
      kernel's in-feature and spatial dimensions are the fan-in, its
      out-feature dimension is kept.
    * a gather or dynamic slice with data-dependent indices: a lookup; the
      leaf is left untouched (embedding tables).
    * only elementwise with data (biases, norm scales of any rank, position
      embeddings): untouched.

    Axes sliced off by ``scan`` (stacked layers), by a loop indexing a stack
    with its counter, or mapped by ``vmap``, are kept: GC never averages
    across a stack or an ensemble. Uses that agree decide together; a lookup
    together with a matmul (tied embeddings), uses that disagree, an op the
    analysis does not understand, or a parameter never used with data leave
    the leaf untouched. Calls (``jit``, ``custom_jvp``, ``custom_vjp``,
    ``checkpoint``, ``shard_map``) and control flow (``scan``, ``while``,
    ``cond``) are followed into their bodies. Inputs closed over by ``fn``
    count as constants: pass data as ``args``.

    Every decision carries its reason; print them with
    :func:`optax_gc.explain`. The decisions are made once, here: using the
    rule costs nothing per step.

    Args:
      fn: the model, called as ``fn(params, *args, **kwargs)``; for Flax linen
        e.g. ``lambda p, x: model.apply({"params": p}, x)``.
      params: the parameter tree, with the structure of the gradients the rule
        will be applied to. Leaves may be arrays or ``jax.ShapeDtypeStruct``.
      *args: example inputs (arrays or ``jax.ShapeDtypeStruct``; any other
        leaf is passed as a static value).
      **kwargs: more inputs, likewise.

    Returns:
      An :data:`OutputAxesFn` for ``output_axes`` (:func:`centralize`,
      :func:`with_gc`, the aliases, :func:`gc_fraction`, :func:`explain`),
      keyed by each leaf's path. Applied to a leaf path it never saw, or a
      leaf whose shape differs, it raises ``ValueError`` naming the path.

    Raises:
      ValueError: if ``fn`` is not callable or ``params`` has no array leaf.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_gc
      >>> def mlp(p, x):  # PyTorch layout: w is (out, in), applied as x @ w.T
      ...     return jnp.tanh(x @ p["w"].T + p["b"]) @ p["head"]
      >>> params = {"w": jnp.zeros((8, 3)), "b": jnp.zeros((1, 8)),
      ...           "head": jnp.zeros((8, 2))}
      >>> x = jax.ShapeDtypeStruct((16, 3), jnp.float32)
      >>> rule = optax_gc.infer_output_axes(mlp, params, x)
      >>> for path, (axes, why) in rule.decisions.items():
      ...     print(path, axes, why)
      b None elementwise only (add)
      head (1,) dot_general contracts axis 0
      w (0,) dot_general contracts axis 1

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    if not callable(fn):
        raise ValueError(f"infer_output_axes: fn must be callable, got {fn!r}.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    if not traced:
        raise ValueError(
            "infer_output_axes: params has no array leaf to infer axes for."
        )
    arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
    arg_traced = [i for i, leaf in enumerate(arg_leaves) if _is_array(leaf)]

    def spec(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)

    def flat_fn(param_specs: list[Any], arg_specs: list[Any]) -> Any:
        p_leaves = list(leaves)
        for i, v in zip(traced, param_specs, strict=True):
            p_leaves[i] = v
        a_leaves = list(arg_leaves)
        for i, v in zip(arg_traced, arg_specs, strict=True):
            a_leaves[i] = v
        a, kw = jax.tree_util.tree_unflatten(arg_tree, a_leaves)
        out = fn(jax.tree_util.tree_unflatten(treedef, p_leaves), *a, **kw)
        return [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]

    closed = jax.make_jaxpr(flat_fn)(
        [spec(leaves[i]) for i in traced], [spec(arg_leaves[i]) for i in arg_traced]
    )
    shapes = [tuple(np.shape(leaves[i])) for i in traced]
    interp = _Interpreter(shapes)
    inputs: list[Any] = [
        _Weight({k: _Src(tuple(frozenset({a}) for a in range(len(s))), frozenset())})
        for k, s in enumerate(shapes)
    ] + [DATA] * len(arg_traced)
    interp.run(closed, inputs)

    decisions: dict[str, tuple[Any, str]] = {}
    leaf_shapes: dict[str, Any] = {}
    position = {i: k for k, i in enumerate(traced)}
    for i, name in enumerate(paths):
        if i in position:
            k = position[i]
            decision = _decide(interp.uses[k], shapes[k])
            shape = shapes[k]
        else:
            decision, shape = (None, "not an array"), None
        if name in decisions and decisions[name] != decision:
            decision = (
                ValueError(
                    f'infer_output_axes: two leaves share the path "{name}" and '
                    "were decided differently; rename one of them."
                ),
                "ambiguous path",
            )
        decisions[name] = decision
        leaf_shapes[name] = shape
    return InferredAxes(decisions, leaf_shapes)
