"""The abstract values of the analysis, how they combine, and the uses it records.

Every jaxpr variable is one of:

* :class:`Const`: computed from literals and closed-over constants only. Its
  concrete value can be computed on demand (gather indices, one-hot tables).
* :class:`Data`: depends on a non-parameter input.
* :class:`Weight`: computed from parameters without data; for each parameter
  leaf it comes from, a :class:`Lineage` says how its axes relate to the
  leaf's.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

Axes = tuple[frozenset, ...]
"""Per axis of a value, the parameter axes it carries (a merged axis: several)."""

EMPTY: frozenset = frozenset()


class Lineage(NamedTuple):
    """How a weight-derived value relates to one parameter leaf."""

    axes: Axes
    """Per axis of the value, the parameter axes it carries."""
    stacked: frozenset = EMPTY
    """``(parameter axis, index or kind)``: sliced off, one slice per layer."""
    mixed: frozenset = EMPTY
    """Parameter axes whose entries were combined (a reduction, ``cumsum``)."""
    span: tuple | None = None
    """``(value axis, start, stop)``: where the leaf lies after a concatenate."""
    partial: frozenset = EMPTY
    """Parameter axes of which only a part is used."""
    picked: frozenset = EMPTY
    """``(parameter axis, index)``: a static single entry taken."""
    pieces: frozenset = EMPTY
    """``(parameter axis, start, stop)``: the static parts taken, so that a
    concatenation that puts every part back (``jnp.roll``) is whole again."""
    spread: frozenset = EMPTY
    """Size-1 parameter axes copied along a longer value axis (a gain shared
    by every unit of that axis)."""
    added: frozenset = EMPTY
    """The leaves of a product or reduction of parameters this one was added
    to before its use (``probe @ w + b``: ``b`` is a bias of it)."""


class Weight:
    """A weight-derived value: ``{leaf index: Lineage}``."""

    __slots__ = ("lineages",)

    def __init__(self, lineages: dict[int, Lineage]):
        self.lineages = lineages

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Weight) and self.lineages == other.lineages

    __hash__ = None  # type: ignore[assignment]


class Const:
    """A constant; ``value()`` computes it, or ``None`` when unknown or big.

    All constants compare equal: a loop carry that is a constant is fed to
    the body as an unknown one (``CONST``), so its value never decides.
    ``shape_kind`` says what is known of it without computing it:
    ``("iota", dim)`` (``iota`` along ``dim``, maybe offset), or ``"onehot"``
    (an identity-like table, ``eq`` of two iotas: ``jnp.eye``).
    """

    __slots__ = ("_compute", "_value", "_done", "shape_kind")

    def __init__(
        self,
        compute: Callable[[], np.ndarray | None] | None = None,
        shape_kind: Any = None,
    ):
        self._compute = compute
        self._value: np.ndarray | None = None
        self._done = compute is None
        self.shape_kind = shape_kind

    def value(self) -> np.ndarray | None:
        if not self._done:
            self._done = True
            compute, self._compute = self._compute, None
            try:
                self._value = compute() if compute is not None else None
            except Exception:  # noqa: BLE001 - unknown is the safe answer
                self._value = None
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Const)

    def __hash__(self) -> int:
        return hash(Const)

    def __repr__(self) -> str:
        return "CONST"


CONST = Const()
"""A constant whose value is not known."""


class Footprint(NamedTuple):
    """A leaf's axes carried by a data value computed linearly from one use.

    ``site`` names the use (a contraction of the weight with data); ``axes``
    gives, per axis of the data value, the leaf's axes it carries.
    """

    leaf: int
    site: int
    axes: Axes
    batched: frozenset = EMPTY
    """The leaf's axes the use kept as batch dimensions (an einsum split in
    two: a later contraction may still sum them)."""


class Data(NamedTuple):
    """A data value.

    ``depends`` is a bitset over leaf indices (bit ``k``: leaf ``k``), of the
    leaves whose use (a contraction with data) this value is computed from.

    ``tokens``: ``(leaf, axis, index, earlier)`` for each use of a stack slice
    whose output this value is a linear function of: the slice is entry
    ``index`` of the parameter's ``axis`` (an int for a static index, else the
    kind of slicing, e.g. ``"scan"``); ``earlier``: it comes from an earlier
    iteration of a loop. ``ancestors``: every such token upstream.
    ``onehot``: an indicator ``ids == arange(n)``, cast, scaled or reshaped.
    ``footprints``: the uses whose output this value is a linear function of,
    with the leaf's axes each of its axes carries.
    """

    tokens: frozenset = EMPTY
    ancestors: frozenset = EMPTY
    onehot: bool = False
    footprints: frozenset = EMPTY
    depends: int = 0


DATA = Data()
ONEHOT = Data(onehot=True)


class Use(NamedTuple):
    """What one equation did with a leaf; the leaf's decision reads them all.

    ``kind``: ``"contract"`` (with data, ``fan_in`` its axes contracted),
    ``"extend"`` (a later contraction of that use's output with data sums
    ``fan_in`` too), ``"lookup"``, ``"elementwise"``, ``"unsupported"``,
    ``"conflict"`` (the use cannot define units: ``what`` says why),
    ``"constant"`` (contracted with a constant), ``"scalar"`` (the whole leaf
    reduced to one number, e.g. an L2 term), ``"reduced"`` (met data entry by
    entry after its axes ``fan_in`` were reduced), ``"bias"`` (added to a
    value built from the leaves ``partners`` before a contraction),
    ``"stopped"`` (under ``stop_gradient``), ``"summed"`` (outputs of slices
    along ``summed`` added into the same units).
    """

    kind: str
    what: str
    fan_in: frozenset = EMPTY
    stacked: frozenset = EMPTY
    """``(axis, slice id)`` of the stack slices used."""
    summed: frozenset = EMPTY
    site: int = 0
    """The contraction (``"contract"``, ``"extend"``) this use belongs to."""
    batched: frozenset = EMPTY
    """Axes kept as batch dimensions of the contraction (``vmap``)."""
    partners: frozenset = EMPTY
    """``"bias"``: the leaves of the value this one was added to."""


def describe(axes: frozenset) -> str:
    """``axis 1`` or ``axes (0, 2)``."""
    sorted_axes = tuple(sorted(axes))
    if len(sorted_axes) == 1:
        return f"axis {sorted_axes[0]}"
    return f"axes {sorted_axes}"


def stacked_axes(stacked: frozenset) -> frozenset:
    return frozenset(a for a, _ in stacked)


def union(sets: Any) -> frozenset:
    return frozenset().union(*sets)


def merge(values: Sequence[Any], rank: int) -> Weight:
    """Weight-derived values combined elementwise (right-aligned broadcast)."""
    lineages: dict[int, Lineage] = {}
    for value in values:
        if not isinstance(value, Weight):
            continue
        for leaf, lineage in value.lineages.items():
            if len(lineage.axes) > rank:  # cannot happen for well-formed jaxprs
                lineage = lineage._replace(axes=(union(lineage.axes),) * rank)
            elif len(lineage.axes) < rank:
                pad = rank - len(lineage.axes)
                span = lineage.span
                if span is not None:
                    span = (span[0] + pad,) + span[1:]
                lineage = lineage._replace(
                    axes=(EMPTY,) * pad + lineage.axes, span=span
                )
            old = lineages.get(leaf)
            if old is not None:
                lineage = Lineage(
                    tuple(a | b for a, b in zip(old.axes, lineage.axes, strict=True)),
                    old.stacked | lineage.stacked,
                    old.mixed | lineage.mixed,
                    old.span if old.span == lineage.span else None,
                    old.partial | lineage.partial,
                    old.picked | lineage.picked,
                    old.pieces | lineage.pieces,
                    old.spread | lineage.spread,
                    old.added | lineage.added,
                )
            lineages[leaf] = lineage
    return Weight(lineages)


def join(a: Any, b: Any) -> Any:
    """The value that is either ``a`` or ``b`` (loop carries, ``cond``)."""
    if isinstance(a, Const):
        return b
    if isinstance(b, Const) or a == b:
        return a
    if isinstance(a, Data) or isinstance(b, Data):
        datas = [x for x in (a, b) if isinstance(x, Data)]
        return Data(
            union(x.tokens for x in datas),
            union(x.ancestors for x in datas),
            all(isinstance(x, Data) and x.onehot for x in (a, b)),
            union(x.footprints for x in datas),
            functools.reduce(operator.or_, (x.depends for x in datas), 0),
        )
    rank = len(next(iter(a.lineages.values())).axes) if a.lineages else 0
    return merge([a, b], rank)


def reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[list[int]] | None:
    """For each new axis, the old axes it is made of (size-1 axes ignored)."""
    if 0 in old or 0 in new:
        return None
    olds = [i for i, s in enumerate(old) if s != 1]
    news = [j for j, s in enumerate(new) if s != 1]
    groups: list[list[int]] = [[] for _ in new]
    i = j = 0
    while i < len(olds) and j < len(news):
        old_group, new_group = [olds[i]], [news[j]]
        old_size, new_size = old[olds[i]], new[news[j]]
        i, j = i + 1, j + 1
        while old_size != new_size:
            if old_size < new_size:
                old_size *= old[olds[i]]
                old_group.append(olds[i])
                i += 1
            else:
                new_size *= new[news[j]]
                new_group.append(news[j])
                j += 1
        for o in new_group:
            groups[o] = old_group
    return groups


def reshape_axes(axes: Axes, old: Sequence[int], new: Sequence[int]) -> Axes | None:
    """``axes`` (one entry per old axis) through a reshape, or ``None``."""
    if math.prod(old) != math.prod(new):
        return None
    groups = reshape_groups(old, new)
    if groups is None:
        return None
    return tuple(union(axes[i] for i in g) for g in groups)
