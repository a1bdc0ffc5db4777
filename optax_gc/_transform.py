"""Gradient Centralization (GC) as an optax gradient transformation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

AxesLike: TypeAlias = int | Sequence[int]
"""One output axis or several; negative values count from the end."""

OutputAxesFn: TypeAlias = Callable[[jax.tree_util.KeyPath, Any], AxesLike | None]
"""A per-leaf rule ``(key_path, leaf) -> axes | None``; ``None`` skips the leaf."""

OutputAxes: TypeAlias = AxesLike | OutputAxesFn
"""What ``output_axes`` accepts: axes for every leaf, or a per-leaf rule."""


def _path_str(path: jax.tree_util.KeyPath) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_axes_spec(spec: Any, where: str) -> tuple[int, ...]:
    """Validates an int or a sequence of ints (independently of any leaf)."""
    if isinstance(spec, jax.Array):
        raise ValueError(
            f"{where}: output_axes must be static Python ints, got a JAX array "
            f"{spec!r}. Under optax.inject_hyperparams pass it as a tuple, e.g. "
            f"output_axes=(0,), or list it in static_args."
        )
    if _is_int(spec):
        return (int(spec),)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        axes = tuple(spec)
        if axes and all(_is_int(a) for a in axes):
            axes = tuple(int(a) for a in axes)
            if len(set(axes)) != len(axes):
                raise ValueError(f"{where}: output_axes={spec!r} repeats an axis.")
            return axes
    raise ValueError(
        f"{where}: output_axes must be an int, a non-empty tuple of ints, or a "
        f"callable (path, leaf) -> axes | None; got {spec!r}."
    )


def _normalize_axes(
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


def _fan_in_axes(ndim: int, output_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in output_axes)


def _subtract_fan_in_mean(g: jax.Array, output_axes: tuple[int, ...]) -> jax.Array:
    """Φ(g) for validated, non-negative ``output_axes``; keeps ``g``'s dtype.

    bf16/f16 (and narrower) leaves are centred in float32 and rounded once.
    """
    x = g.astype(jnp.float32) if jnp.dtype(g.dtype).itemsize < 4 else g
    mean = jnp.mean(x, axis=_fan_in_axes(g.ndim, output_axes), keepdims=True)
    return (x - mean).astype(g.dtype)


def _reduced_size(shape: tuple[int, ...], output_axes: tuple[int, ...]) -> int:
    return math.prod(shape[a] for a in _fan_in_axes(len(shape), output_axes))


def centralize_array(g: jax.Array, output_axes: AxesLike = -1) -> jax.Array:
    r"""Centralizes one gradient array over its fan-in (the GC operator Φ).

    The array is read as a matrix :math:`G \in \mathbb{R}^{M \times N}` whose
    ``N`` columns are the output units named by ``output_axes`` and whose ``M``
    rows are every other axis (the fan-in). Each column loses its mean:

    .. math::
        \Phi(G) = P G, \qquad P = I_M - e e^\top, \qquad e = 1_M / \sqrt{M}.

    The mean is accumulated in float32 for bf16/f16 inputs; the result keeps
    the input's dtype and shape. Complex inputs are centred as complex numbers.
    An array whose fan-in has a single element (``M == 1``) or no element is
    returned unchanged, since Φ would zero it.

    Args:
      g: a floating or complex array.
      output_axes: the axis or axes that index output units (kept). ``-1`` for
        Flax/Haiku/Keras layouts ``(in, out)``, ``(kh, kw, in, out)``; ``0`` for
        Equinox/PyTorch layouts ``(out, in, ...)``.

    Returns:
      ``Φ(g)``, with the same shape and dtype as ``g``.

    Raises:
      ValueError: if ``output_axes`` is malformed, out of range, repeats an axis
        or keeps every axis, or if ``g`` is not floating or complex.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> kernel_grad = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # (in, out)
      >>> print(optax_gc.centralize_array(kernel_grad))
      [[ -1. -10.]
       [  1.  10.]]
      >>> print(optax_gc.centralize_array(kernel_grad, output_axes=0))
      [[ -4.5   4.5]
       [-13.5  13.5]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    where = "centralize_array"
    axes = _check_axes_spec(output_axes, where)
    g = jnp.asarray(g)
    if not jnp.issubdtype(g.dtype, jnp.inexact):
        raise ValueError(
            f"{where}: expected a floating or complex array, got {g.dtype}."
        )
    axes = _normalize_axes(axes, g.shape, where)
    if g.size == 0 or _reduced_size(g.shape, axes) == 1:
        return g
    return _subtract_fan_in_mean(g, axes)


def _make_leaf_rule(
    output_axes: OutputAxes, conv_only: bool, where: str
) -> Callable[[jax.tree_util.KeyPath, Any], tuple[int, ...] | None]:
    """Validates the options; returns ``(path, leaf) -> output axes | None``."""
    if not isinstance(conv_only, bool):
        raise ValueError(f"{where}: conv_only must be a bool, got {conv_only!r}.")
    min_ndim = 4 if conv_only else 2
    fixed = None if callable(output_axes) else _check_axes_spec(output_axes, where)

    def rule(path, g):
        ndim, dtype = getattr(g, "ndim", 0), getattr(g, "dtype", None)
        if ndim < min_ndim or dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            return None
        if g.size == 0:
            return None
        leaf_where = f"{where} at leaf {_path_str(path)}"
        if fixed is None:
            spec = output_axes(path, g)
            if spec is None:
                return None
            axes = _check_axes_spec(spec, leaf_where)
        else:
            axes = fixed
        axes = _normalize_axes(axes, tuple(g.shape), leaf_where)
        return None if _reduced_size(g.shape, axes) == 1 else axes

    return rule


def centralize(
    *, output_axes: OutputAxes = -1, conv_only: bool = False
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient Centralization: removes each output unit's fan-in mean.

    Every eligible leaf ``g`` of the updates is replaced by :math:`\Phi(g)`
    (see :func:`optax_gc.centralize_array`): the mean over all axes *except*
    ``output_axes`` is subtracted, so each output unit's incoming weights get a
    zero-mean gradient. Φ is the orthogonal projection :math:`I - ee^\top` on
    each column, so it is linear, idempotent and never increases the norm.

    Axis conventions:

    * Flax linen/NNX, Haiku, Keras: Dense ``(in, out)``, Conv ``(kh, kw, in,
      out)``: ``output_axes=-1`` (default).
    * Equinox, PyTorch: ``(out, in)``, ``(out, in, kh, kw)``: ``output_axes=0``.
      With this setting the transform equals ``optax.centralize`` on floating
      leaves of ndim >= 2 (``optax.centralize`` always keeps axis 0, which is
      wrong for Flax/Haiku kernels).
    * Per-leaf rules: pass a callable ``(key_path, leaf) -> axes | None``, e.g.
      ``(1, 2)`` for DenseGeneral q/k/v kernels ``(in, H, D)``, ``(0, -1)`` for
      scan-stacked kernels ``(L, in, out)``, ``None`` to skip embeddings. The
      callable is called at trace time, only on leaves that pass the checks
      below.

    Leaves left untouched (returned as they are): ndim below 2 (below 4 with
    ``conv_only=True``, the paper's GCC, as in the authors' code), non-floating
    dtypes, ``None`` and ``optax.MaskedNode``, zero-size arrays, leaves the
    callable maps to ``None``, and leaves whose fan-in has one element (e.g. a
    Dense layer with one input), which Φ would set to zero. bf16/f16 means are
    accumulated in float32; every leaf keeps its dtype, shape and sharding.

    Args:
      output_axes: the axes that index output units, as an int or tuple of ints
        for every leaf, or a callable giving them per leaf (see above).
      conv_only: if True, only leaves with ndim >= 4 are centralized (GCC).

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: at construction if an option is malformed; at trace time,
        naming the leaf's key path, if ``output_axes`` does not fit a leaf (out
        of range, a repeated axis, or every axis kept).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_gc
      >>> params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
      >>> grads = {"kernel": jnp.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]]),
      ...          "bias": jnp.array([1.0, 2.0, 3.0])}
      >>> tx = optax.chain(optax_gc.centralize(), optax.sgd(1.0))
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"])
      [[ 1.  2.  3.]
       [-1. -2. -3.]]
      >>> print(updates["bias"])
      [-1. -2. -3.]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    rule = _make_leaf_rule(output_axes, conv_only, "centralize")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        updates = jax.tree_util.tree_map_with_path(
            lambda path, g: _apply_rule(rule, path, g), updates
        )
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _apply_rule(rule, path, g):
    axes = rule(path, g)
    return g if axes is None else _subtract_fan_in_mean(g, axes)


def gc_fraction(
    grads: optax.Updates, *, output_axes: OutputAxes = -1, conv_only: bool = False
) -> optax.Updates:
    r"""Per leaf, the share of the gradient's norm that GC removes.

    For each leaf, :math:`\|g - \Phi(g)\| / \|g\|`, a float32 scalar in
    :math:`[0, 1]`: 0 when every fan-in already has zero mean, 1 when each
    output unit's gradient is constant over its fan-in. Leaves that
    :func:`optax_gc.centralize` leaves untouched (same rules, same options)
    report 0, as does an all-zero gradient. Useful to log next to the loss;
    jit-compatible.

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
    rule = _make_leaf_rule(output_axes, conv_only, "gc_fraction")

    def fraction(path, g):
        axes = rule(path, g)
        if axes is None:
            return jnp.zeros((), jnp.float32)
        removed = g - _subtract_fan_in_mean(g, axes)
        norm = jnp.linalg.norm(jnp.ravel(g)).astype(jnp.float32)
        removed_norm = jnp.linalg.norm(jnp.ravel(removed)).astype(jnp.float32)
        return jnp.where(norm > 0, removed_norm / jnp.where(norm > 0, norm, 1), 0.0)

    return jax.tree_util.tree_map_with_path(fraction, grads)
