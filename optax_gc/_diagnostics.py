"""What GC does to a gradient tree: ``gc_fraction``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_gc._axes import (
    DEFAULT_OUTPUT_AXES,
    OutputAxes,
    make_leaf_rule,
    map_leaves,
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
    rule = make_leaf_rule(output_axes, conv_only, where)

    def fraction(path, g):
        axes = rule(path, g).axes
        if axes is None:
            return jnp.zeros((), jnp.float32)
        return _removed_fraction(g, axes)

    return map_leaves(fraction, output_axes, where, grads)
