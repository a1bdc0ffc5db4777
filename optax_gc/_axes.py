"""Which axes of which leaf GC keeps: types, validation, key paths, decisions.

Everything here is static: it looks at option values, key paths, shapes and
dtypes, never at array values, so every decision is made at construction or
trace time and costs nothing per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

AxesLike: TypeAlias = int | Sequence[int]
"""One output axis or several; negative values count from the end."""

OutputAxesFn: TypeAlias = Callable[[jax.tree_util.KeyPath, Any], AxesLike | None]
"""A per-leaf rule ``(key_path, leaf) -> axes | None``; ``None`` skips the leaf."""

OutputAxes: TypeAlias = AxesLike | OutputAxesFn
"""What ``output_axes`` accepts: axes for every leaf, or a per-leaf rule."""

DEFAULT_OUTPUT_AXES: tuple[int, ...] = (-1,)
"""The default everywhere: the last axis indexes output units (Flax, Haiku).

A tuple rather than ``-1`` so that ``optax.inject_hyperparams`` keeps it
static (it turns every int or float argument into an array).
"""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey, ...
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: jax.tree_util.KeyPath) -> str:
    """A key path as ``"params/Dense_0/kernel"``: the one form used everywhere.

    ``path_rules`` patterns match this string and every error message quotes
    it, so a path from an error can be pasted into a rule. A trailing
    ``.value`` (Flax NNX ``Variable`` leaves in an ``nnx.State``) is dropped,
    so one pattern fits NNX states and plain parameter dicts alike.
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
        if path[-1].name == "value":
            path = path[:-1]
    return "/".join(_key_name(k) for k in path)


def leaf_where(where: str, path: jax.tree_util.KeyPath) -> str:
    """``where`` plus the leaf's path, quoted, for error messages."""
    if not path:
        return f"{where} at the root leaf"
    return f'{where} at leaf "{path_str(path)}"'


def dtype_name(dtype: Any) -> str:
    """``float32``, ``int8``, ``key<fry>``: any leaf dtype, PRNG keys included."""
    return getattr(dtype, "name", str(dtype))


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_axes_spec(spec: Any, where: str, callable_ok: bool = True) -> tuple[int, ...]:
    """Validates an int or a sequence of ints (independently of any leaf)."""
    if isinstance(spec, (jax.Array, np.ndarray)):
        raise ValueError(
            f"{where}: output_axes must be static Python ints, got an array "
            f"{spec!r}. Under optax.inject_hyperparams pass a tuple, e.g. "
            f"output_axes=(0,), or list output_axes in static_args."
        )
    if is_int(spec):
        return (int(spec),)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        axes = tuple(spec)
        if axes and all(is_int(a) for a in axes):
            axes = tuple(int(a) for a in axes)
            if len(set(axes)) != len(axes):
                raise ValueError(f"{where}: output_axes={spec!r} repeats an axis.")
            return axes
    options = "an int, a non-empty tuple of ints"
    if callable_ok:
        options += ", or a callable (path, leaf) -> axes | None"
    raise ValueError(f"{where}: output_axes must be {options}; got {spec!r}.")


def normalize_axes(
    axes: tuple[int, ...], shape: tuple[int, ...], where: str
) -> tuple[int, ...]:
    """Maps ``axes`` to sorted non-negative axes of ``shape``, checking they fit."""
    ndim = len(shape)
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(
            f"{where}: output_axes={axes} is out of range for a leaf of shape "
            f"{shape} (ndim={ndim})."
        )
    normalized = tuple(sorted(a % ndim for a in axes))
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"{where}: output_axes={axes} names the same axis twice for a leaf of "
            f"shape {shape}."
        )
    if len(normalized) == ndim:
        raise ValueError(
            f"{where}: output_axes={axes} keeps every axis of a leaf of shape "
            f"{shape}, leaving no fan-in to centralize."
        )
    return normalized


def fan_in_axes(ndim: int, output_axes: tuple[int, ...]) -> tuple[int, ...]:
    """The axes GC averages over: every axis not in ``output_axes``."""
    return tuple(a for a in range(ndim) if a not in output_axes)


def fan_in_size(shape: Sequence[int], output_axes: tuple[int, ...]) -> int:
    """M, the number of fan-in entries of each output unit."""
    return math.prod(shape[a] for a in fan_in_axes(len(shape), output_axes))


_MISSING = object()


class AxesRule:
    """Base class of the library's per-leaf rules (``path_rules``, inference).

    A rule is an :data:`OutputAxesFn` (``rule(path, leaf) -> axes | None``)
    that can also say why it decided (:meth:`decide`) and check a whole tree
    once per trace (:meth:`check_tree`).
    """

    def decide(self, path: jax.tree_util.KeyPath, leaf: Any) -> tuple[Any, str]:
        """Returns ``(axes | None, reason)`` for one leaf."""
        raise NotImplementedError

    def check_tree(self, paths: Sequence[str], where: str) -> None:
        """Called once per traversal with every leaf path the transform saw."""
        del paths, where

    def __call__(self, path: Any, leaf: Any = _MISSING, *rest: Any) -> Any:
        if leaf is _MISSING or rest:
            raise ValueError(
                f"{type(self).__name__} is an output_axes rule, called as "
                "rule(key_path, leaf); it was called with "
                f"{1 + int(leaf is not _MISSING) + len(rest)} argument(s). "
                "optax.inject_hyperparams treats every callable argument as a "
                "schedule: list it in static_args, e.g. "
                "optax.inject_hyperparams(optax_gc.gc_adam, "
                "static_args=('output_axes',))(learning_rate=1e-3, "
                "output_axes=rule)."
            )
        return self.decide(path, leaf)[0]


class LeafDecision(NamedTuple):
    """What GC does to one leaf and why.

    Attributes:
      axes: the kept (output) axes, sorted and non-negative, or ``None`` when
        the leaf is left untouched.
      reason: a short human-readable reason.
    """

    axes: tuple[int, ...] | None
    reason: str


LeafRule: TypeAlias = Callable[..., LeafDecision]
"""``rule(path, leaf, shape=None) -> LeafDecision``; ``shape`` overrides the
leaf's own (the global shape of a shard inside ``shard_map``)."""


def check_conv_only(conv_only: Any, where: str) -> None:
    if not isinstance(conv_only, bool):
        raise ValueError(f"{where}: conv_only must be a bool, got {conv_only!r}.")


def make_leaf_rule(output_axes: OutputAxes, conv_only: bool, where: str) -> LeafRule:
    """Validates the options; returns ``(path, leaf) -> LeafDecision``.

    The leaf rules of DESIGN: ndim below 2 (below 4 with ``conv_only``),
    non-floating dtypes and zero-size leaves are untouched, as are leaves
    whose fan-in has a single element (GC would zero them).
    """
    check_conv_only(conv_only, where)
    min_ndim = 4 if conv_only else 2
    fn = output_axes if callable(output_axes) else None
    fixed = None if fn is not None else check_axes_spec(output_axes, where)

    def rule(path, g, shape=None) -> LeafDecision:
        ndim, dtype = getattr(g, "ndim", None), getattr(g, "dtype", None)
        if ndim is None or dtype is None:
            return LeafDecision(None, "not an array")
        if not jnp.issubdtype(dtype, jnp.inexact):
            return LeafDecision(None, f"not floating ({dtype_name(dtype)})")
        if ndim < min_ndim:
            return LeafDecision(None, f"ndim < {min_ndim}")
        shape = tuple(g.shape) if shape is None else tuple(shape)
        if math.prod(shape) == 0:
            return LeafDecision(None, "zero-size")
        here = leaf_where(where, path)
        # Inside shard_map a rule sees the global leaf, not the local shard.
        seen = g if shape == tuple(g.shape) else jax.ShapeDtypeStruct(shape, dtype)
        if isinstance(fn, AxesRule):
            spec, reason = fn.decide(path, seen)
        elif fn is not None:
            spec, reason = fn(path, seen), "output_axes callable"
        else:
            spec, reason = fixed, f"output_axes={fixed}"
        if spec is None:
            return LeafDecision(None, reason)
        axes = check_axes_spec(spec, here)
        axes = normalize_axes(axes, shape, here)
        if fan_in_size(shape, axes) == 1:
            return LeafDecision(None, "fan-in 1")
        return LeafDecision(axes, reason)

    return rule


def map_leaves(
    fn: Callable[..., Any],
    output_axes: OutputAxes,
    where: str,
    tree: Any,
    *rest: Any,
) -> Any:
    """``fn(path, leaf, *rest_leaves)`` on every leaf, then the rule's check.

    ``None`` and ``optax.MaskedNode`` are empty subtrees and never visited.
    The check runs once per traversal, so once per trace under ``jit``.
    """
    paths = []

    def visit(path, g, *others):
        paths.append(path_str(path))
        return fn(path, g, *others)

    out = jax.tree_util.tree_map_with_path(visit, tree, *rest)
    if isinstance(output_axes, AxesRule):
        output_axes.check_tree(paths, where)
    return out
