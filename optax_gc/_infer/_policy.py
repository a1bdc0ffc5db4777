"""The decision policy: a leaf's output axes (or none) from its recorded uses.

The safety rule: a leaf gets axes only when every use it has agrees on them;
anything the analysis could not follow, or that defines no units, leaves the
leaf alone with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optax_gc._infer._values import EMPTY, Use, describe, union

Decision = tuple[Any, str]
"""``(kept axes or None, reason)``."""

CONSTANTS = "contracted with constants only"
NO_DATA = "not used with data"
STOPPED = "used only under stop_gradient: no gradient reaches it"
SCALAR = "only reduced to a number with none of its axes (an L2 term?): no units"

_IGNORED_KINDS = frozenset(
    {"constant", "summed", "scalar", "reduced", "extend", "stopped"}
)
"""Uses that decide nothing alone: constants, summed slices, whole-leaf
reductions (an L2 term in a loss), reductions that meet data entry by entry
(``h0 @ w`` with a constant ``h0``, a norm of the weight scaling the
output), extensions of another use, and values under ``stop_gradient``."""


def decide(
    uses: Mapping[Use, int],
    shape: tuple[int, ...],
    paths: Mapping[int, str] | None = None,
) -> Decision:
    """A leaf's output axes (or ``None``) and the reason, from its uses.

    ``paths`` gives the other leaves' paths, for reasons that name them.
    """
    by_kind: dict[str, list[Use]] = {}
    for use in uses:
        by_kind.setdefault(use.kind, []).append(use)
    paths = paths or {}
    constant = "constant" in by_kind
    hint = (
        "; contracted with constants only (closed-over inputs? pass them as arguments)"
        if constant
        else ""
    )
    if not set(by_kind) - _IGNORED_KINDS:
        if constant:
            return (
                None,
                f"{CONSTANTS} (closed-over inputs? pass them as arguments)",
            )
        if "scalar" in by_kind:
            return None, SCALAR
        if "reduced" in by_kind:
            what = sorted({u.what for u in by_kind["reduced"]})
            axes = union(u.fan_in for u in by_kind["reduced"])
            return None, (
                f"elementwise only ({', '.join(what)}), after its entries along "
                f"{describe(axes)} were combined: no units"
            )
        if "stopped" in by_kind:
            return None, STOPPED
        return None, NO_DATA
    if "unsupported" in by_kind:
        names = sorted({u.what for u in by_kind["unsupported"]})
        return None, f"unsupported op: {', '.join(names)}"
    if "conflict" in by_kind:
        return None, sorted(u.what for u in by_kind["conflict"])[0]
    if "bias" in by_kind:
        others = sorted(union(u.partners for u in by_kind["bias"]))
        named = ", ".join(f'"{paths.get(o, o)}"' for o in others)
        return None, (
            f"added to a value built from other parameters ({named}) before its "
            "use: a bias of that computation"
        )
    contracts = _extended(by_kind.get("contract", []), by_kind.get("extend", []))
    if "lookup" in by_kind:
        if contracts:
            return None, "tied lookup and matmul"
        return None, "lookup"
    if not contracts:
        names = sorted({u.what for u in by_kind["elementwise"]})
        return None, f"elementwise only ({', '.join(names)}){hint}"
    summed = union(u.summed for u in by_kind.get("summed", ()))
    if summed:
        return None, (
            f"the outputs of its slices along {describe(summed)} are summed into "
            "the same units (a convolution over a stack?), not a stack of layers"
        )
    nontrivial = frozenset(a for a in range(len(shape)) if shape[a] != 1)
    ops = sorted({u.what for u in contracts})
    fan_ins = {u.fan_in & nontrivial for u in contracts}
    if len(fan_ins) > 1 or "elementwise" in by_kind:
        described = sorted({_describe_use(u.what, u.fan_in) for u in contracts})
        if "elementwise" in by_kind:
            names = sorted({u.what for u in by_kind["elementwise"]})
            described.append(f"elementwise ({', '.join(names)})")
        return None, "uses disagree: " + "; ".join(described)
    fan_in = union(u.fan_in for u in contracts)
    if not fan_in:
        return None, f"{' and '.join(ops)}: no axis contracted"
    reason = _describe_use(" and ".join(ops), fan_in)
    count = sum(n for u, n in uses.items() if u.kind == "contract")
    if count > 1:
        reason += f" ({count} uses)"
    stacked = frozenset(a for u in contracts for a, _ in u.stacked)
    if stacked:
        reason += f"; stacked {describe(stacked)} kept"
    kept = tuple(a for a in range(len(shape)) if a not in fan_in)
    if not kept:
        return None, f"{reason}: every axis contracted, no output axis"
    return kept, reason


def _extended(contracts: list[Use], extends: list[Use]) -> list[Use]:
    """Contractions with the axes later contractions of their output sum."""
    if not extends:
        return contracts
    more: dict[int, frozenset] = {}
    for use in extends:
        more[use.site] = more.get(use.site, EMPTY) | use.fan_in
    out = []
    for use in contracts:
        extra = more.get(use.site, EMPTY) - use.fan_in
        if extra:
            use = use._replace(fan_in=use.fan_in | extra, what=f"{use.what} (bilinear)")
        out.append(use)
    return out


def stacked_of(uses: Mapping[Use, int], axes: Any) -> tuple[int, ...]:
    """The kept axes that stack layers or ensemble members (not output units):
    sliced off per layer, or batch dimensions of the contraction."""
    if axes is None:
        return ()
    contracts = [u for u in uses if u.kind == "contract"]
    stacked = {a for u in contracts for a, _ in u.stacked}
    stacked |= set().union(*(u.batched for u in contracts)) if contracts else set()
    return tuple(a for a in axes if a in stacked)


def _describe_use(ops: str, fan_in: frozenset) -> str:
    if ops == "conv":
        return f"conv: in-feature and spatial {describe(fan_in)}"
    verb = "contract" if " and " in ops else "contracts"
    return f"{ops} {verb} {describe(fan_in)}"
