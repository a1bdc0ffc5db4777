"""Layouts the default ``output_axes=(-1,)`` gets wrong, recognised from a tree.

The default keeps the last axis, which is right for Flax and Haiku Dense and
Conv kernels. Some trees show, by their leaf names, ranks and (for Equinox)
module types, leaves for which it is wrong; centring them with the default
raises a :class:`optax_gc.LayoutWarning` naming them and the fix. The checks
read key paths, shapes and node types only, once per trace. What a tree does
not show (a ``nn.scan`` stack without biases or norms, Flax's
``ConvTranspose(transpose_kernel=True)``) is not recognised.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

import jax

from optax_gc._axes import LeafRule, path_str
from optax_gc._warnings import LayoutWarning

_OUTPUT_FIRST = frozenset({"weight", "weight_ih", "weight_hh"})
_EMBEDDINGS = frozenset({"embedding", "embeddings"})
_ATTENTION = frozenset({"query", "key", "value"})
_BIASES = frozenset({"bias", "b"})
_NORMS = frozenset({"scale", "offset"})
_KERNELS = frozenset({"kernel", "w"})
_HAIKU_STACK = "__layer_stack"  # hk.layer_stack's module name prefix
_HAIKU_TRANSPOSED = re.compile(r"conv\d_d_transpose")  # hk.Conv{1,2,3}DTranspose
_SHOWN = 6

_FIXES = {
    "output-first": (
        "weights named weight are output-first, (out, in, ...) as in Equinox "
        "and PyTorch (their biases (out, 1, ...) too), and the default would "
        "centre each input across the outputs (GC on the transpose): "
        "output_axes=0 for these"
    ),
    "embedding": (
        "an embedding table (vocab, dim) would be averaged over the vocabulary "
        "for each feature: leave it alone"
    ),
    "norm": (
        "normalization parameters with more than one axis would be centred: "
        "leave them alone"
    ),
    "attention": (
        "attention projections (in, H, D) and their biases (H, D) would keep D "
        "and average over the heads; their output units are (H, D): "
        "output_axes (1, 2) for the kernels, biases left alone"
    ),
    "transposed": (
        "Haiku's transposed-convolution kernels are (..., out, in): output_axes -2"
    ),
    "stacked": (
        "layers stacked on a leading axis (nn.scan, hk.layer_stack) would be "
        "averaged across the stack: keep the stack axis, and leave the stacked "
        "biases and norm parameters alone"
    ),
    "multi-axis": (
        "biases and norm parameters with more than one axis (a stacked layer, "
        "or a norm over several axes) would be centred: leave them alone"
    ),
}


def _parts(path: jax.tree_util.KeyPath) -> list[str]:
    """The path's names; PyTorch state dicts' dotted keys split too."""
    return [p for p in re.split(r"[/.]", path_str(path)) if p]


def _equinox_kinds(tree: Any) -> dict[str, str]:
    """Paths of Equinox embeddings and norms, whose ``weight`` is not (out, in)."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return {}
    kinds = {eqx.nn.Embedding: "embedding"}
    for name in ("LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm"):
        if hasattr(eqx.nn, name):
            kinds[getattr(eqx.nn, name)] = "norm"
    types = tuple(kinds)
    found = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, types)
    )[0]
    return {
        "/".join(_parts(p)): kinds[type(x)] for p, x in found if isinstance(x, types)
    }


class _Tree:
    """The leaves of a tree by module: names, ranks and what they show."""

    def __init__(self, leaves: list[tuple[Any, Any]], equinox: dict[str, str]):
        self.leaves = leaves
        self.equinox = equinox
        self.modules: dict[str, dict[str, int]] = {}
        for path, leaf in leaves:
            *module, name = _parts(path)
            self.modules.setdefault("/".join(module), {})[name] = leaf.ndim
        # A block stacked by nn.scan: two or more of its modules show a stack
        # axis (a bias of one axis more than a unit's beside a kernel, or a
        # norm parameter of more than one axis). One such module alone may be
        # a DenseGeneral with features (H, D).
        evidence: dict[str, int] = {}
        for module, names in self.modules.items():
            if "/" in module and self._shows_stack(module, names):
                block = module.rsplit("/", 1)[0]
                evidence[block] = evidence.get(block, 0) + 1
        self.blocks = {block for block, n in evidence.items() if n >= 2}

    @staticmethod
    def _shows_stack(module: str, names: dict[str, int]) -> bool:
        per_unit = 2 if module.rsplit("/", 1)[-1] in _ATTENTION else 1
        biases = [names[b] for b in _BIASES if b in names]
        if biases and _KERNELS & set(names):
            return biases[0] > per_unit
        norms = [names[n] for n in _NORMS if n in names]
        return bool(norms) and not _KERNELS & set(names) and norms[0] > 1

    def kind(self, path: Any, leaf: Any) -> str | None:
        """What the default gets wrong about this leaf, or ``None``."""
        *module_parts, name = _parts(path)
        module = "/".join(module_parts)
        parent = module_parts[-1] if module_parts else ""
        siblings = self.modules[module]
        for prefix, kind in self.equinox.items():
            if module == prefix or module.startswith(prefix + "/"):
                return kind
        if any(p.startswith(_HAIKU_STACK) for p in module_parts) or any(
            module == b or module.startswith(b + "/") for b in self.blocks
        ):
            return "stacked"
        if name in _OUTPUT_FIRST or "weight" in siblings:
            return "output-first"
        if name in _EMBEDDINGS and leaf.ndim == 2:
            return "embedding"
        if _HAIKU_TRANSPOSED.fullmatch(parent) and name == "w":
            return "transposed"
        if parent in _ATTENTION and (name in _KERNELS or name in _BIASES):
            bias = next((siblings[b] for b in _BIASES if b in siblings), None)
            kernel = next((siblings[k] for k in _KERNELS if k in siblings), None)
            if kernel == 3 and bias in (None, 2):  # DenseGeneral (in, H, D)
                return "attention"
        # Haiku's short names count beside their module's other parameter.
        known = name in ("bias", "scale") or (
            (name == "b" and "w" in siblings)
            or (name == "offset" and "scale" in siblings)
        )
        if known and leaf.ndim > 1:
            return "multi-axis"
        return None


def check_default_layout(tree: Any, rule: LeafRule) -> None:
    """Warns, once per trace, if the default axes centre a leaf they get wrong.

    Only leaves the default decides are looked at: all of them with the
    default ``output_axes``, and those no pattern matches with a
    ``path_rules`` whose ``default`` is the library's.
    """
    leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(leaf, "ndim") and hasattr(leaf, "shape") and path
    ]
    if not leaves:
        return
    shape = _Tree(leaves, _equinox_kinds(tree))
    found: dict[str, list[str]] = {}
    for path, leaf in leaves:
        if not rule.by_default(path, leaf):
            continue
        kind = shape.kind(path, leaf)
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
        "every leaf, which is wrong for these leaves. "
        + "; ".join(parts)
        + ". output_axes=optax_gc.infer_output_axes(fn, params, *inputs) reads "
        "every leaf's axes from the model; an explicit output_axes (or a "
        "path_rules default) silences this warning.",
        LayoutWarning,
        stacklevel=4,
    )
