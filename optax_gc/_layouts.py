"""Layouts the default ``output_axes=(-1,)`` gets wrong, recognised from a tree.

The default keeps the last axis, which is right for Flax and Haiku Dense and
Conv kernels. Some trees show, by their leaf names and ranks, leaves for
which it is wrong; centring them with the default raises a
:class:`optax_gc.LayoutWarning` naming them and the fix. The checks read key
paths and shapes only, once per trace.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax

from optax_gc._axes import LeafRule, path_str
from optax_gc._warnings import LayoutWarning

_OUTPUT_FIRST = frozenset({"weight", "weight_ih", "weight_hh"})
_EMBEDDINGS = frozenset({"embedding", "embeddings"})
_ATTENTION = frozenset({"query", "key", "value"})
_PER_UNIT = frozenset({"bias", "b", "scale", "offset"})
_SHOWN = 6


def _split(path: jax.tree_util.KeyPath) -> tuple[str, str, str]:
    """The leaf's name, its parent's, and the parent's path."""
    parts = path_str(path).split("/")
    parent = parts[-2] if len(parts) > 1 else ""
    return parts[-1], parent, "/".join(parts[:-1])


def _stacked_modules(leaves: list[tuple[Any, Any]]) -> set[str]:
    """Modules with a bias or norm parameter of one axis more than a unit's.

    Haiku's short names count only beside their module's other parameter
    (``b`` beside ``w``, ``offset`` beside ``scale``).
    """
    names: dict[str, set[str]] = {}
    for path, _ in leaves:
        name, _, module = _split(path)
        names.setdefault(module, set()).add(name)
    stacked = set()
    for path, leaf in leaves:
        name, parent, module = _split(path)
        siblings = names[module]
        known = name in ("bias", "scale") or (
            (name == "b" and "w" in siblings)
            or (name == "offset" and "scale" in siblings)
        )
        per_unit = 2 if parent in _ATTENTION and name in ("bias", "b") else 1
        if module and known and leaf.ndim > per_unit:
            stacked.add(module)
    return stacked


def _problem(
    path: Any, leaf: Any, stacked: set[str], output_first: set[str]
) -> str | None:
    name, parent, module = _split(path)
    if name in _OUTPUT_FIRST or module in output_first:
        return "output-first"
    if name in _EMBEDDINGS and leaf.ndim == 2:
        return "embedding"
    attention = name == "kernel" and parent in _ATTENTION
    if module in stacked or (attention and leaf.ndim > 3):
        return "stacked"
    if attention and leaf.ndim == 3:
        return "attention"
    return None


_FIXES = {
    "output-first": (
        "weights named weight are output-first, (out, in, ...) as in Equinox "
        "and PyTorch (their biases (out, 1, ...) too), and the default would "
        "centre each input across the outputs (GC on the transpose): pass "
        "output_axes=0"
    ),
    "embedding": (
        "an embedding table (vocab, dim) would be averaged over the vocabulary "
        "for each feature: leave it alone (path_rules({r'embedding$': None}))"
    ),
    "attention": (
        "an attention kernel (in, H, D) would keep D and average over in and "
        "the heads; its output units are (H, D): output_axes (1, 2)"
    ),
    "stacked": (
        "layers stacked on a leading axis (nn.scan, hk.layer_stack) would be "
        "averaged across the stack, biases and norm scales included"
    ),
}


def check_default_layout(tree: Any, rule: LeafRule) -> None:
    """Warns, once per trace, if the default axes centre a leaf they get wrong."""
    leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(leaf, "ndim") and hasattr(leaf, "shape") and path
    ]
    stacked = _stacked_modules(leaves)
    # Equinox stores a convolution's bias as (out, 1, 1) beside its weight.
    output_first = {_split(p)[2] for p, _ in leaves if _split(p)[0] in _OUTPUT_FIRST}
    found: dict[str, list[str]] = {}
    for path, leaf in leaves:
        kind = _problem(path, leaf, stacked, output_first)
        if kind is None or rule(path, leaf).axes is None:
            continue
        found.setdefault(kind, []).append(f'"{path_str(path)}" {tuple(leaf.shape)}')
    if not found:
        return
    parts = []
    for kind, names in found.items():
        shown = ", ".join(names[:_SHOWN])
        more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
        parts.append(f"{shown}{more}: {_FIXES[kind]}")
    warnings.warn(
        f"{rule.where}: the default output_axes=(-1,) keeps the last axis of "
        f"every leaf, which is wrong for these leaves. "
        + "; ".join(parts)
        + ". output_axes=optax_gc.infer_output_axes(fn, params, *inputs) reads "
        "every leaf's axes from the model; any explicit output_axes silences "
        "this warning.",
        LayoutWarning,
        stacklevel=4,
    )
