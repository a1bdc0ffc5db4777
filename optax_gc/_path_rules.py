"""Per-leaf ``output_axes`` rules keyed on parameter paths."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from optax_gc._axes import (
    DEFAULT_OUTPUT_AXES,
    AxesLike,
    AxesRule,
    check_axes_spec,
    path_str,
)
from optax_gc._warnings import UnmatchedPatternWarning


class PathRules(AxesRule):
    """The rule :func:`optax_gc.path_rules` returns; see there."""

    def __init__(self, compiled, default, strict):
        self.rules = tuple(compiled)
        self.default = default
        self.strict = strict

    def decide(self, path: Any, leaf: Any) -> tuple[Any, str]:
        del leaf
        name = path_str(path)
        for regex, axes in self.rules:
            if regex.search(name):
                return axes, f"path_rules {regex.pattern!r}"
        return self.default, "path_rules default"

    def may_use_library_default(self) -> bool:
        return self.default is DEFAULT_OUTPUT_AXES

    def library_default_decides(self, path: Any, leaf: Any) -> bool:
        if self.default is not DEFAULT_OUTPUT_AXES:
            return False
        name = path_str(path)
        return not any(regex.search(name) for regex, _ in self.rules)

    def check_tree(self, paths: Sequence[str], where: str) -> None:
        deciding = set()
        for name in paths:
            first = next(
                (i for i, (r, _) in enumerate(self.rules) if r.search(name)), None
            )
            deciding.add(first)
        unmatched, shadowed = [], []
        for i, (regex, _) in enumerate(self.rules):
            if i in deciding:
                continue
            matches = any(regex.search(p) for p in paths)
            (shadowed if matches else unmatched).append(regex.pattern)
        if not unmatched and not shadowed:
            return
        problems = []
        if unmatched:
            problems.append(f"pattern(s) {unmatched} matched no leaf path")
        if shadowed:
            problems.append(
                f"pattern(s) {shadowed} matched only leaves that an earlier "
                "pattern decides (the first match wins)"
            )
        message = (
            f"{where}: path_rules {'; '.join(problems)}, among the "
            f"{len(paths)} leaf paths it was given (e.g. {list(paths[:3])}); a "
            "pattern that decides nothing leaves GC on the leaves it was "
            "written for."
        )
        if self.strict:
            raise ValueError(message)
        warnings.warn(message, UnmatchedPatternWarning, stacklevel=2)

    def __repr__(self) -> str:
        rules = ", ".join(f"{r.pattern!r}: {a!r}" for r, a in self.rules)
        return f"path_rules({{{rules}}}, default={self.default!r})"


def path_rules(
    rules: Mapping[str, AxesLike | None] | Sequence[tuple[str, AxesLike | None]],
    *,
    default: AxesLike | None = DEFAULT_OUTPUT_AXES,
    strict: bool = False,
) -> PathRules:
    r"""Builds a per-leaf ``output_axes`` rule from path patterns.

    Each leaf's key path is written as a ``/``-separated string, e.g.
    ``"params/Block_0/query/kernel"`` for Flax linen, ``"layers/0/weight"`` for
    Equinox (a trailing ``/value`` of NNX variables is dropped), and the first
    pattern that :func:`re.search` finds in it decides the leaf's output axes
    (``None`` leaves the leaf untouched). Leaves no pattern matches get
    ``default``. The usual leaf rules of
    :func:`optax_gc.centralize` apply first (ndim, dtype, size), so biases and
    norm scales never reach the patterns. Error messages quote leaf paths in
    the same form, so a path from an error can be pasted into a pattern.

    Each time a transform walks a tree (once per trace under ``jit``), a
    pattern that decides none of the tree's leaf paths (ineligible leaves
    included) is reported: one that matches no path, or one whose every match
    an earlier pattern already decides. It is an
    :class:`UnmatchedPatternWarning` (Python shows a repeated identical
    warning once), or a ``ValueError`` with ``strict=True``. A typo in a
    pattern would otherwise leave GC on the leaves the rule was written to
    protect. The check sees the leaves the transform sees: under ``optax.masked`` or
    ``optax.multi_transform`` that is the unmasked part.

    Typical transformer rules for Flax (linen or NNX) layouts:

    * ``r"embedding$": None``: an embedding table's gradient is sparse in its
      rows; centring it would move every token's vector.
    * ``r"bias$": None``: DenseGeneral q/k/v biases have shape ``(H, D)``, two
      dimensions but no fan-in; without this rule they would be centred.
    * ``r"(query|key|value)/kernel$": (1, 2)``: DenseGeneral kernels
      ``(in, H, D)``, one output unit per (head, dim).
    * ``r"out/kernel$": (2,)``: the output projection ``(H, D, out)``, whose
      fan-in is every (head, dim).
    * ``r"layers/.*kernel$": (0, -1)``: ``nn.scan``-stacked ``(L, in, out)``
      kernels, never averaged across the stack.

    Args:
      rules: ``{pattern: axes | None}`` or a sequence of such pairs, tried in
        order.
      default: the axes for leaves no pattern matches (``None``: untouched).
      strict: raise instead of warn when a pattern matches no leaf.

    Returns:
      A rule for ``output_axes``: callable as ``rule(key_path, leaf) -> axes |
      None``. Under ``optax.inject_hyperparams`` list ``output_axes`` in
      ``static_args`` (it treats callables as schedules).

    Raises:
      ValueError: if ``rules`` is not a mapping or a sequence of pairs (a set,
        whose order would decide which pattern wins, or a generator), a
        pattern is not a valid regular expression or an axes value is
        malformed or callable (named in the message); with ``strict=True``, at
        trace time, if a pattern matches no leaf.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> rule = optax_gc.path_rules({r"embedding$": None,
      ...                             r"(query|key|value)/kernel$": (1, 2)})
      >>> grads = {"embed": {"embedding": jnp.ones((10, 4))},
      ...          "query": {"kernel": jnp.arange(8.0).reshape(2, 2, 2)}}
      >>> out = optax_gc.centralize(output_axes=rule).update(grads, None)[0]
      >>> print(out["query"]["kernel"][:, 0, 0], out["embed"]["embedding"][0])
      [-2.  2.] [1. 1. 1. 1.]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    if isinstance(rules, (set, frozenset, AbstractSet)) or (
        not isinstance(rules, (Mapping, Sequence))
    ):
        raise ValueError(
            "path_rules: rules must be ordered, a dict or a list of (pattern, "
            f"axes) pairs, since the first matching pattern decides; got "
            f"{type(rules).__name__} {rules!r}."
        )
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"path_rules: rules must be (pattern, axes) pairs, got {item!r}."
            )
        pattern, axes = item
        if not isinstance(pattern, str):
            raise ValueError(f"path_rules: a pattern must be a str, got {pattern!r}.")
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"path_rules: invalid pattern {pattern!r}: {e}") from None
        if callable(axes):
            raise ValueError(
                f"path_rules[{pattern!r}]: axes must be an int, a tuple of ints "
                f"or None, got the callable {axes!r}; a callable rule is given "
                "as output_axes itself (optax_gc.per_leaf(fn)), not inside "
                "path_rules."
            )
        if axes is not None:
            check_axes_spec(axes, f"path_rules[{pattern!r}]")
        compiled.append((regex, axes))
    if default is not None:
        check_axes_spec(default, "path_rules default")
    if not isinstance(strict, bool):
        raise ValueError(f"path_rules: strict must be a bool, got {strict!r}.")
    return PathRules(compiled, default, strict)
