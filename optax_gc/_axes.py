"""Which axes of which leaf GC keeps: types, validation, key paths, decisions.

Everything here is static: it looks at option values, key paths, shapes and
dtypes, never at array values, so every decision is made at construction or
trace time and costs nothing per step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

AxesLike: TypeAlias = int | Sequence[int]
"""One output axis or several; negative values count from the end."""

OutputAxesFn: TypeAlias = Callable[[jax.tree_util.KeyPath, Any], AxesLike | None]
"""A per-leaf rule ``(key_path, leaf) -> axes | None``, given to
:func:`optax_gc.per_leaf`; ``None`` leaves the leaf alone."""

AxesTree: TypeAlias = Any
"""A pytree of axes: a prefix of the parameter tree whose leaves are
:data:`AxesLike` or ``None`` (leave alone), e.g.
``{"Dense_0": {"kernel": (1,), "bias": None}}``."""

OutputAxes: TypeAlias = AxesLike | AxesTree | Callable[[Any], AxesTree]
"""What ``output_axes`` accepts: axes for every leaf, an :data:`AxesTree`, a
callable ``params -> AxesTree``, or a per-leaf rule
(:func:`optax_gc.per_leaf`, :func:`optax_gc.path_rules`,
:func:`optax_gc.infer_output_axes`)."""

DEFAULT_OUTPUT_AXES: tuple[int, ...] = (-1,)
"""The default everywhere: the last axis indexes output units (Flax, Haiku).

A tuple rather than ``-1`` so that ``optax.inject_hyperparams`` keeps it
static (it turns every int or float argument into an array). The library
tells this object from an explicit ``(-1,)`` by identity: only the default
checks the tree for layouts it gets wrong (:class:`optax_gc.LayoutWarning`).
"""

_FORMS = (
    "an int, a non-empty tuple of ints, a pytree of those (None: leave alone) "
    "that is a prefix of the params, a callable params -> such a pytree, or a "
    "per-leaf rule (optax_gc.per_leaf, path_rules, infer_output_axes)"
)


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


def _array_error(spec: Any, where: str) -> ValueError:
    return ValueError(
        f"{where}: output_axes must be static Python ints, got an array "
        f"{spec!r}. Under optax.inject_hyperparams pass a tuple, e.g. "
        f"output_axes=(0,), or list output_axes in static_args (always for a "
        f"callable or a rule: inject_hyperparams calls callables as schedules)."
    )


def as_axes(spec: Any) -> tuple[int, ...] | None:
    """``spec`` as a tuple of distinct-or-not ints, or ``None`` if not axes."""
    if is_int(spec):
        return (int(spec),)
    if hasattr(spec, "_fields"):  # a NamedTuple is a container, never axes
        return None
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        axes = tuple(spec)
        if axes and all(is_int(a) for a in axes):
            return tuple(int(a) for a in axes)
    return None


def check_axes_spec(spec: Any, where: str) -> tuple[int, ...]:
    """Validates an int or a sequence of ints (independently of any leaf)."""
    if isinstance(spec, (jax.Array, np.ndarray)):
        raise _array_error(spec, where)
    axes = as_axes(spec)
    if axes is None:
        raise ValueError(
            f"{where}: output_axes must be an int or a non-empty tuple of "
            f"ints (None: leave the leaf alone); got {spec!r}."
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"{where}: output_axes={spec!r} repeats an axis.")
    return axes


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
    """Base class of the library's per-leaf rules (``per_leaf``, ``path_rules``,
    inference).

    A rule decides one leaf at a time from its key path and the leaf
    (:meth:`decide`, which also says why), and can check a whole tree once
    per traversal (:meth:`check_tree`). Called as ``rule(key_path, leaf)`` it
    returns the axes alone.
    """

    def decide(self, path: jax.tree_util.KeyPath, leaf: Any) -> tuple[Any, str]:
        """Returns ``(axes | None, reason)`` for one leaf."""
        raise NotImplementedError

    def prepare(self, tree: Any, where: str) -> None:
        """Called once per traversal, before any leaf is decided."""
        del tree, where

    def check_tree(self, paths: Sequence[str], where: str) -> None:
        """Called once per traversal with every leaf path the transform saw."""
        del paths, where

    def library_default_decides(self, path: Any, leaf: Any) -> bool:
        """Whether the library's default axes decide this leaf (unasked)."""
        del path, leaf
        return False

    def may_use_library_default(self) -> bool:
        """Whether :meth:`library_default_decides` can be true for any leaf."""
        return False

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


def _takes(fn: Callable[..., Any], n: int) -> bool | None:
    """Whether ``fn`` can be called with ``n`` positional arguments (None: unknown)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*([None] * n))
    except TypeError:
        return False
    return True


class PerLeaf(AxesRule):
    """The rule :func:`optax_gc.per_leaf` returns; see there."""

    def __init__(self, fn: OutputAxesFn):
        self.fn = fn

    def decide(self, path: Any, leaf: Any) -> tuple[Any, str]:
        return self.fn(path, leaf), "per_leaf rule"

    def __repr__(self) -> str:
        return f"per_leaf({getattr(self.fn, '__name__', self.fn)!r})"


def per_leaf(fn: OutputAxesFn) -> PerLeaf:
    """Wraps a function of one leaf as an ``output_axes`` rule.

    ``fn(key_path, leaf)`` returns the leaf's output axes (an int or a tuple
    of ints) or ``None`` to leave the leaf alone. It is called at trace time,
    once per leaf that passes the usual leaf rules of
    :func:`optax_gc.centralize` (ndim, dtype, size); ``leaf`` may be an array,
    a tracer or a ``jax.ShapeDtypeStruct``, so use its ``shape`` and
    ``dtype`` only. A plain callable given as ``output_axes`` is instead
    called with the whole tree, ``params -> tree of axes``, as
    ``optax.masked``'s mask is; this wrapper says which of the two a function
    is.

    Args:
      fn: ``(key_path, leaf) -> axes | None``; ``key_path`` is the leaf's
        ``jax.tree_util`` key path.

    Returns:
      A rule to pass as ``output_axes``.

    Raises:
      ValueError: if ``fn`` is not callable or cannot take two arguments.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> # Stacked (L, in, out) kernels: keep the layer axis and the outputs.
      >>> rule = optax_gc.per_leaf(lambda path, g: (0, -1) if g.ndim == 3 else -1)
      >>> grads = {"stack": jnp.arange(8.0).reshape(2, 2, 2)}
      >>> print(optax_gc.centralize(output_axes=rule).update(grads, None)[0]["stack"])
      [[[-1. -1.]
        [ 1.  1.]]
      <BLANKLINE>
       [[-1. -1.]
        [ 1.  1.]]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    if isinstance(fn, AxesRule):
        return fn  # type: ignore[return-value]
    if not callable(fn) or _takes(fn, 2) is False:
        raise ValueError(
            f"per_leaf: fn must be a callable (key_path, leaf) -> axes | None, "
            f"got {fn!r}."
        )
    return PerLeaf(fn)


def _is_axes_leaf(x: Any) -> bool:
    return x is None or as_axes(x) is not None


def _is_empty(x: Any) -> bool:
    """A subtree a transform sees as nothing (``optax.masked``'s ``MaskedNode``)."""
    return x is None or isinstance(x, optax.MaskedNode)


def _broadcast_axes(axes: Any, tree: Any, where: str) -> dict[tuple, Any]:
    """Each leaf path of ``tree`` to the axes of its prefix in ``axes``.

    ``axes`` must be a prefix of the tree the transform is given, except
    where that tree holds an empty subtree (under ``optax.masked`` or
    ``optax.multi_transform`` the masked-out parts are one ``MaskedNode``).
    """
    specs = {
        tuple(path): spec
        for path, spec in jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=_is_axes_leaf
        )[0]
    }
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty)[0]
    empty = {tuple(path) for path, leaf in flat if _is_empty(leaf)}
    table: dict[tuple, Any] = {}
    covered: dict[tuple, list[tuple]] = {}
    for path, leaf in flat:
        path = tuple(path)
        if _is_empty(leaf):
            continue
        prefix = next(
            (path[:n] for n in range(len(path) + 1) if path[:n] in specs), None
        )
        if prefix is None:
            raise ValueError(
                f'{where}: no axes for leaf "{path_str(path)}"; the axes tree '
                "must be a prefix of the parameter tree (as optax.masked's mask "
                "is), with axes or None at its leaves."
            )
        table[path] = specs[prefix]
        covered.setdefault(prefix, []).append(path)
    for prefix, spec in specs.items():
        if prefix not in covered:
            if not any(prefix[: len(e)] == e for e in empty):
                raise ValueError(
                    f'{where}: the axes at "{path_str(prefix)}" match no leaf of '
                    "the parameter tree; the axes tree must be a prefix of it."
                )
            continue
        below = {p[len(prefix)] for p in covered[prefix] if len(p) > len(prefix)}
        sequence = all(isinstance(k, jax.tree_util.SequenceKey) for k in below)
        if below and sequence and isinstance(spec, (list, tuple)):
            if len(below) == len(spec):
                raise ValueError(
                    f'{where}: the axes {spec!r} at "{path_str(prefix)}" sit '
                    f"over a sequence of {len(below)} subtrees, which reads two "
                    "ways. Write one entry per subtree (e.g. [(0,), (2,)]) or "
                    "the same axes for each (e.g. [(0, 2), (0, 2)])."
                )
    return table


def _check_axes_tree(tree: Any, where: str) -> None:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_axes_leaf)
    if not flat:
        raise ValueError(f"{where}: output_axes must be {_FORMS}; got {tree!r}.")
    for path, spec in flat:
        if spec is not None:
            at = f' at "{path_str(path)}"' if path else ""
            check_axes_spec(spec, f"{where}: output_axes{at}")


class TreeAxes(AxesRule):
    """``output_axes`` given as a tree of axes, or as ``params -> tree``."""

    def __init__(self, axes: Any, is_fn: bool):
        self.axes = axes
        self.is_fn = is_fn  # an Equinox module of axes is callable, yet a tree
        self._table: dict[tuple, Any] | None = None

    def prepare(self, tree: Any, where: str) -> None:
        if self.is_fn:
            axes = self.axes(tree)
            what = "the tree output_axes(params) returned"
            if isinstance(axes, (jax.Array, np.ndarray)):
                raise _array_error(axes, where)
            if axes is None:
                raise ValueError(
                    f"{where}: output_axes(params) returned None (a missing "
                    "return?); to leave every leaf alone, return a tree of None."
                )
            _check_axes_tree(axes, f"{where}: {what}")
        else:
            axes, what = self.axes, "output_axes"

        self._table = _broadcast_axes(axes, tree, f"{where}: {what}")

    def decide(self, path: Any, leaf: Any) -> tuple[Any, str]:
        del leaf
        if self._table is None:
            raise ValueError("output_axes tree: decided before it was prepared.")
        reason = "output_axes(params)" if self.is_fn else "output_axes tree"
        spec = self._table[tuple(path)]
        return spec, (reason if spec is not None else f"None in {reason}")

    def __repr__(self) -> str:
        return f"TreeAxes({self.axes!r})"


def resolve_output_axes(output_axes: Any, where: str) -> tuple[int, ...] | AxesRule:
    """Validates ``output_axes`` at construction: fixed axes, or a rule."""
    if isinstance(output_axes, (jax.Array, np.ndarray)):
        raise _array_error(output_axes, where)
    if isinstance(output_axes, AxesRule):
        return output_axes
    if as_axes(output_axes) is not None:
        return check_axes_spec(output_axes, where)
    leaves = jax.tree.leaves(output_axes, is_leaf=_is_axes_leaf)
    if callable(output_axes) and len(leaves) == 1 and leaves[0] is output_axes:
        if _takes(output_axes, 1) is False:
            per = (
                " A per-leaf function (key_path, leaf) -> axes is given as "
                "output_axes=optax_gc.per_leaf(fn)."
                if _takes(output_axes, 2)
                else ""
            )
            raise ValueError(
                f"{where}: an output_axes callable is called with the parameter "
                f"tree, as params -> tree of axes (optax.masked's convention); "
                f"{output_axes!r} cannot take one argument.{per}"
            )
        return TreeAxes(output_axes, is_fn=True)
    if output_axes is None or isinstance(output_axes, (str, bytes, float, bool)):
        raise ValueError(
            f"{where}: output_axes must be {_FORMS}; got {output_axes!r}. (Under "
            "optax.inject_hyperparams list a callable output_axes in "
            "static_args: otherwise it is called as a schedule, with the step "
            "count.)"
        )
    _check_axes_tree(output_axes, where)
    return TreeAxes(output_axes, is_fn=False)


class LeafDecision(NamedTuple):
    """What GC does to one leaf and why.

    Attributes:
      axes: the kept (output) axes, sorted and non-negative, or ``None`` when
        the leaf is left untouched.
      reason: a short human-readable reason.
    """

    axes: tuple[int, ...] | None
    reason: str


def check_conv_only(conv_only: Any, where: str) -> None:
    if not isinstance(conv_only, bool):
        raise ValueError(f"{where}: conv_only must be a bool, got {conv_only!r}.")


class LeafRule:
    """The validated options of a transform (checked at construction).

    Called as ``rule(path, leaf) -> LeafDecision``.

    The leaf rules of DESIGN: ndim below 2 (below 4 with ``conv_only``),
    non-floating dtypes and zero-size leaves are untouched, as are leaves
    whose fan-in has a single element (GC would zero them). ``shape``
    overrides the leaf's own (the global shape of a shard inside
    ``shard_map``).
    """

    def __init__(self, output_axes: OutputAxes, conv_only: bool, where: str):
        check_conv_only(conv_only, where)
        self.where = where
        self.min_ndim = 4 if conv_only else 2
        self.spec = resolve_output_axes(output_axes, where)
        self.is_default = output_axes is DEFAULT_OUTPUT_AXES

    def by_default(self, path: Any, leaf: Any) -> bool:
        """Whether the library's default axes, not the user's, decide a leaf."""
        if isinstance(self.spec, AxesRule):
            return self.spec.library_default_decides(path, leaf)
        return self.is_default

    def __call__(self, path, g, shape=None) -> LeafDecision:
        ndim, dtype = getattr(g, "ndim", None), getattr(g, "dtype", None)
        if ndim is None or dtype is None:
            return LeafDecision(None, "not an array")
        if not jnp.issubdtype(dtype, jnp.inexact):
            return LeafDecision(None, f"not floating ({dtype_name(dtype)})")
        if ndim < self.min_ndim:
            return LeafDecision(None, f"ndim < {self.min_ndim}")
        shape = tuple(g.shape) if shape is None else tuple(shape)
        if math.prod(shape) == 0:
            return LeafDecision(None, "zero-size")
        here = leaf_where(self.where, path)
        if isinstance(self.spec, AxesRule):
            # Inside shard_map a rule sees the global leaf, not the local shard.
            same = shape == tuple(g.shape)
            seen = g if same else jax.ShapeDtypeStruct(shape, dtype)
            spec, reason = self.spec.decide(path, seen)
        else:
            spec, reason = self.spec, f"output_axes={self.spec}"
        if spec is None:
            return LeafDecision(None, reason)
        axes = check_axes_spec(spec, here)
        axes = normalize_axes(axes, shape, here)
        if fan_in_size(shape, axes) == 1:
            return LeafDecision(None, "fan-in 1")
        return LeafDecision(axes, reason)


def map_leaves(
    fn: Callable[..., Any], rule: LeafRule, tree: Any, *rest: Any, seen: Any = None
) -> Any:
    """``fn(path, leaf, *rest_leaves)`` on every leaf, with the rule's checks.

    ``None`` and ``optax.MaskedNode`` are empty subtrees and never visited.
    The checks run once per traversal, so once per trace under ``jit``: a
    tree-valued ``output_axes`` is matched to ``tree`` first, a rule checks
    the paths it saw after, and the default axes look for layouts they get
    wrong (:func:`optax_gc._layouts.check_default_layout`). Both see ``seen``
    (``tree`` unless given): inside ``shard_map``, the leaves' global shapes.
    """
    from optax_gc._layouts import check_default_layout  # imports this module

    spec = rule.spec
    seen = tree if seen is None else seen  # the global shapes inside shard_map
    if isinstance(spec, AxesRule):
        spec.prepare(seen, rule.where)
    paths = []

    def visit(path, g, *others):
        paths.append(path_str(path))
        return fn(path, g, *others)

    out = jax.tree_util.tree_map_with_path(visit, tree, *rest)
    if isinstance(spec, AxesRule):
        spec.check_tree(paths, rule.where)
    if rule.is_default or (
        isinstance(spec, AxesRule) and spec.may_use_library_default()
    ):
        check_default_layout(seen, rule)
    return out
