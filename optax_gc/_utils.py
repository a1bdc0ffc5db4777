"""Per-leaf ``output_axes`` rules keyed on parameter paths."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from optax_gc._transform import AxesLike, OutputAxesFn, _check_axes_spec


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey, ...
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: jax.tree_util.KeyPath) -> str:
    """A key path as ``"params/Dense_0/kernel"`` (the form ``path_rules`` sees).

    A trailing ``.value`` (Flax NNX ``Variable`` leaves in an ``nnx.State``) is
    dropped, so one pattern fits NNX states and plain parameter dicts alike.
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
        if path[-1].name == "value":
            path = path[:-1]
    return "/".join(_key_name(k) for k in path)


def path_rules(
    rules: Mapping[str, AxesLike | None] | Sequence[tuple[str, AxesLike | None]],
    *,
    default: AxesLike | None = -1,
) -> OutputAxesFn:
    r"""Builds a per-leaf ``output_axes`` rule from path patterns.

    Each leaf's key path is written as a ``/``-separated string, e.g.
    ``"params/Block_0/query/kernel"`` for Flax linen, ``"layers/0/weight"`` for
    Equinox (a trailing ``/value`` of NNX variables is dropped), and the first
    pattern that :func:`re.search` finds in it decides the leaf's output axes
    (``None`` leaves the leaf untouched). Leaves no pattern matches get
    ``default``. The usual leaf rules of
    :func:`optax_gc.centralize` apply first (ndim, dtype, size), so biases and
    norm scales never reach the patterns.

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

    Returns:
      A callable ``(key_path, leaf) -> axes | None`` for ``output_axes``.

    Raises:
      ValueError: if a pattern is not a valid regular expression or an axes
        value is malformed (named in the message).

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
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    compiled = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(
                f"path_rules: rules must be (pattern, axes) pairs, got {item!r}."
            )
        pattern, axes = item
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"path_rules: invalid pattern {pattern!r}: {e}") from None
        if axes is not None:
            _check_axes_spec(axes, f"path_rules[{pattern!r}]")
        compiled.append((regex, axes))
    if default is not None:
        _check_axes_spec(default, "path_rules default")

    def rule(path, leaf):
        del leaf
        name = path_str(path)
        for regex, axes in compiled:
            if regex.search(name):
                return axes
        return default

    return rule
