"""What GC does to a tree: ``gc_fraction`` (how much) and ``explain`` (where, why)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gc._axes import (
    DEFAULT_OUTPUT_AXES,
    LeafRule,
    OutputAxes,
    dtype_name,
    fan_in_size,
    map_leaves,
    path_str,
)
from optax_gc._transform import subtract_fan_in_mean


def _ldexp(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """``x * 2**exponent``, exactly (no reciprocal), for real or complex ``x``."""
    if jnp.iscomplexobj(x):
        return jax.lax.complex(jnp.ldexp(x.real, exponent), jnp.ldexp(x.imag, exponent))
    return jnp.ldexp(x, exponent)


def _removed_fraction(g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``||g - Φ(g)|| / ||g||`` without overflow, as a float32 scalar.

    The leaf is first scaled by a power of two that brings its largest
    magnitude into [0.5, 1), so the sums of squares stay below the leaf's size
    whatever its dtype (f16 squares overflow above 256, f32 ones above about
    1.8e19). A leaf with a NaN or infinite entry gives NaN.
    """
    x = g if jnp.dtype(g.dtype).itemsize >= 4 else g.astype(jnp.float32)
    top = jnp.max(jnp.abs(x))
    _, exponent = jnp.frexp(jnp.where(jnp.isfinite(top), top, 1))
    # Two half steps: each factor stays a normal number (some jax versions
    # multiply by 2**-exponent, which is subnormal, and flushed, for 2**127).
    half = exponent // 2
    y = _ldexp(_ldexp(x, -half), half - exponent)
    removed = y - subtract_fan_in_mean(y, axes)
    norm = jnp.linalg.norm(jnp.ravel(y))
    ratio = jnp.linalg.norm(jnp.ravel(removed)) / jnp.where(norm > 0, norm, 1)
    ratio = jnp.where(jnp.isfinite(top), ratio, jnp.nan)
    return ratio.astype(jnp.float32)


def gc_fraction(
    grads: optax.Updates,
    *,
    output_axes: OutputAxes = DEFAULT_OUTPUT_AXES,
    conv_only: bool = False,
) -> optax.Updates:
    r"""Per leaf, the share of the gradient's norm that GC removes.

    For each leaf, :math:`\|g - \Phi(g)\| / \|g\|`, a float32 scalar in
    :math:`[0, 1]`: 0 when every fan-in already has zero mean, 1 when each
    output unit's gradient is constant over its fan-in. Leaves that
    :func:`optax_gc.centralize` leaves untouched (same rules, same options)
    report 0, as does an all-zero gradient; a leaf with a NaN or infinite entry
    reports NaN. The norms are computed in at least float32 on the leaf scaled
    by a power of two, so float16 leaves and float32 values anywhere in their
    range give finite results.
    Useful to log next to the loss; jit-compatible. Inside ``shard_map`` it
    sees each device's shard only and reports per-shard fractions; call it
    outside, on the global gradients.

    Args:
      grads: a gradient pytree.
      output_axes: see :func:`optax_gc.centralize`.
      conv_only: see :func:`optax_gc.centralize`.

    Returns:
      A pytree of float32 scalars with the structure of ``grads``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> grads = {"kernel": jnp.array([[1.0, 1.0], [1.0, -1.0]]),
      ...          "bias": jnp.array([1.0, 2.0])}
      >>> fractions = optax_gc.gc_fraction(grads)
      >>> print(fractions["kernel"], fractions["bias"])
      0.70710677 0.0

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    where = "gc_fraction"
    rule = LeafRule(output_axes, conv_only, where)

    def fraction(path, g):
        axes = rule(path, g).axes
        if axes is None:
            return jnp.zeros((), jnp.float32)
        return _removed_fraction(g, axes)

    return map_leaves(fraction, rule, grads)


class LeafReport(NamedTuple):
    """One row of :func:`optax_gc.explain`: what GC does to one leaf, and why.

    Attributes:
      path: the leaf's path in the ``a/b/c`` form ``path_rules`` matches.
      shape: the leaf's shape (``None`` for a leaf that is not an array).
      dtype: the leaf's dtype name (``None`` likewise).
      kept: the output axes GC keeps, or ``None`` when it leaves the leaf alone.
      fan_in: M, the entries each output unit is averaged over (``None`` when
        untouched).
      units: N, the number of output units (``None`` when untouched).
      why: the rule, pattern, use or leaf property that decided.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> row = optax_gc.explain({"w": jnp.zeros((3, 4))})["w"]
      >>> row  # doctest: +NORMALIZE_WHITESPACE
      LeafReport(path='w', shape=(3, 4), dtype='float32', kept=(1,), fan_in=3,
                 units=4, why='output_axes=(-1,)')
    """

    path: str
    shape: tuple[int, ...] | None
    dtype: str | None
    kept: tuple[int, ...] | None
    fan_in: int | None
    units: int | None
    why: str


_HEADER = ("path", "shape", "dtype", "kept", "M", "N", "why")


class Explanation:
    """The table :func:`optax_gc.explain` returns: print it or read its rows.

    Iterating gives one :class:`LeafReport` per leaf, in tree order;
    ``explanation["a/b"]`` looks a row up by path.

    Attributes:
      rows: the rows, a tuple of :class:`LeafReport`.
      touched_leaves: how many leaves GC centralizes.
      touched_params: how many entries those leaves hold.
      total_params: how many entries all array leaves hold.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> table = optax_gc.explain({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})
      >>> [row.path for row in table if row.kept is not None]
      ['w']
      >>> table["w"].fan_in, table["w"].units, table.touched_params
      (3, 4, 12)
    """

    def __init__(self, rows: list[LeafReport]):
        self.rows = tuple(rows)
        touched = [r for r in rows if r.kept is not None]
        self.touched_leaves = len(touched)
        self.touched_params = sum(math.prod(r.shape or ()) for r in touched)
        self.total_params = sum(math.prod(r.shape) for r in rows if r.shape is not None)

    def __iter__(self) -> Iterator[LeafReport]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> LeafReport:
        if isinstance(key, str):
            for row in self.rows:
                if row.path == key:
                    return row
            raise KeyError(f"explain: no leaf with path {key!r}.")
        return self.rows[key]

    @property
    def summary(self) -> str:
        """How many leaves and what share of the parameters GC touches, in a line."""
        share = self.touched_params / self.total_params if self.total_params else 0.0
        return (
            f"GC touches {self.touched_leaves} of {len(self.rows)} leaves: "
            f"{self.touched_params:,} of {self.total_params:,} parameters "
            f"({share:.1%})."
        )

    def __str__(self) -> str:
        def cell(x: Any) -> str:
            return "-" if x is None else str(x)

        table = [_HEADER] + [tuple(cell(x) for x in row) for row in self.rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(_HEADER) - 1)]
        right = {4, 5}  # M, N
        lines = []
        for r in table:
            cells = [
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(r[:-1], widths, strict=True))
            ]
            lines.append("  ".join(cells + [r[-1]]).rstrip())
        return "\n".join(lines + [self.summary])

    __repr__ = __str__


def explain(
    tree: Any,
    *,
    output_axes: OutputAxes = DEFAULT_OUTPUT_AXES,
    conv_only: bool = False,
) -> Explanation:
    r"""Shows, leaf by leaf, what GC does to ``tree`` and why.

    With the same options as :func:`optax_gc.centralize`, each row gives the
    leaf's path (in the form ``path_rules`` patterns match), shape, dtype, the
    output axes GC keeps, the fan-in size M that each of the N output units is
    averaged over, and the reason: the use that decided it under
    :func:`optax_gc.infer_output_axes` (e.g. ``"dot_general contracts axis
    0"``), the ``path_rules`` pattern that matched, the fixed ``output_axes``,
    or why the leaf is left alone (``"ndim < 2"``, ``"fan-in 1"``,
    ``"lookup"``, ...). A summary line says how many leaves and what share of
    the parameters GC touches. Nothing is computed on array values, so
    ``tree`` may hold ``jax.ShapeDtypeStruct`` leaves (e.g. from
    ``jax.eval_shape``).

    Args:
      tree: parameters or gradients (arrays or ``jax.ShapeDtypeStruct``).
      output_axes: see :func:`optax_gc.centralize`.
      conv_only: see :func:`optax_gc.centralize`.

    Returns:
      An :class:`Explanation`: print it for the table, iterate it for
      :class:`LeafReport` rows, index it by path.

    Raises:
      ValueError: for a malformed option, or from the rule for a leaf it
        cannot decide (named by path).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)},
      ...           "scale": jnp.zeros((1, 4))}
      >>> print(optax_gc.explain(params))
      path          shape   dtype    kept  M  N  why
      dense/bias    (4,)    float32  -     -  -  ndim < 2
      dense/kernel  (3, 4)  float32  (1,)  3  4  output_axes=(-1,)
      scale         (1, 4)  float32  -     -  -  fan-in 1
      GC touches 1 of 3 leaves: 12 of 20 parameters (60.0%).

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    where = "explain"
    rule = LeafRule(output_axes, conv_only, where)
    rows: list[LeafReport] = []

    def report(path, leaf):
        decision = rule(path, leaf)
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            shape = dtype = None
        else:
            shape, dtype = tuple(shape), dtype_name(dtype)
        kept = decision.axes
        m = n = None
        if kept is not None and shape is not None:
            m = fan_in_size(shape, kept)
            n = math.prod(shape) // m
        rows.append(
            LeafReport(path_str(path), shape, dtype, kept, m, n, decision.reason)
        )
        return leaf

    map_leaves(report, rule, tree)
    return Explanation(rows)
