"""Fan-in sums computed block by block, so that what is summed never exists whole.

GC needs each output unit's fan-in sum before it can write a centred value.
When the values summed are themselves computed (an optimizer's update from its
new moments), XLA on CPU writes them to memory in full before reducing them,
and reads them back for the subtraction: a whole extra leaf of temporary
memory and two extra passes over it. Here the leaf is read as a matrix whose
rows are contiguous, and a loop visits row blocks that fit in cache: each
block's values are recomputed from the block's inputs and added into a small
accumulator. Nothing of the leaf's size is written.

GPUs and TPUs fuse a reduction with its producer themselves and pay for every
loop iteration with a kernel launch, so they keep the plain formulation:
:func:`on_cpu` chooses per platform when the computation is lowered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

ROW_BLOCK_ELEMENTS = 8192
"""Elements in one row block, and in the accumulator (32 KiB in float32)."""

UNROLL = 4
"""Row blocks summed per loop iteration (fewer iterations, same accumulator)."""

MIN_BLOCKED_ELEMENTS = 8192
"""Leaves smaller than this are summed in one piece: they fit in cache."""


def matrix_view(
    shape: Sequence[int], output_axes: tuple[int, ...]
) -> tuple[int, int, bool] | None:
    """``(rows, cols, units_are_cols)`` when the leaf is a matrix of units.

    ``units_are_cols``: the output axes are the trailing axes (Flax, Haiku:
    ``(in, out)``, ``(kh, kw, in, out)``), so each column is a unit and its
    fan-in runs down the rows. Otherwise the output axes are the leading axes
    (Equinox, PyTorch: ``(out, in, kh, kw)``) and each row is a unit. ``None``
    when the output axes are neither (e.g. a stacked ``(L, in, out)`` kernel).
    """
    ndim = len(shape)
    k = len(output_axes)
    if output_axes == tuple(range(ndim - k, ndim)):
        return math.prod(shape[: ndim - k]), math.prod(shape[ndim - k :]), True
    if output_axes == tuple(range(k)):
        return math.prod(shape[:k]), math.prod(shape[k:]), False
    return None


def blocked_fan_in_sums(
    fn: Callable[..., jax.Array],
    inputs: Sequence[jax.Array],
    shape: Sequence[int],
    output_axes: tuple[int, ...],
    dtype: jnp.dtype,
) -> jax.Array | None:
    """Fan-in sums of ``fn(*inputs)``, kept dims of size 1; ``None`` if no view.

    ``fn`` must act entry by entry: its value on a block of the inputs is the
    same block of its value on the whole. Every input has the leaf's
    ``shape``; the sums are accumulated in ``dtype``.
    """
    view = matrix_view(shape, output_axes)
    if view is None:
        return None
    rows, cols, units_are_cols = view
    mats = [x.reshape(rows, cols) for x in inputs]

    def value(blocks):
        return fn(*blocks).astype(dtype)

    r = max(1, min(rows, ROW_BLOCK_ELEMENTS // cols))
    step = r * UNROLL
    full = rows // step
    if units_are_cols:
        # Each iteration adds UNROLL row blocks into an (r, cols) accumulator.
        def add_blocks(i, acc):
            for j in range(UNROLL):
                start = i * step + j * r
                acc = acc + value([lax.dynamic_slice_in_dim(m, start, r) for m in mats])
            return acc

        sums = jnp.zeros((cols,), dtype)
        if full:
            acc = lax.fori_loop(0, full, add_blocks, jnp.zeros((r, cols), dtype))
            sums = acc.sum(axis=0)
        if rows > full * step:
            sums = sums + value([m[full * step :] for m in mats]).sum(axis=0)
        kept = [1] * (len(shape) - len(output_axes)) + [shape[a] for a in output_axes]
    else:
        # Each iteration sums the rows of one block of units and stores them.
        def store_rows(i, out):
            start = i * step
            block = value([lax.dynamic_slice_in_dim(m, start, step) for m in mats])
            return lax.dynamic_update_slice_in_dim(out, block.sum(axis=1), start, 0)

        sums = jnp.zeros((rows,), dtype)
        if full:
            sums = lax.fori_loop(0, full, store_rows, sums)
        if rows > full * step:
            tail = value([m[full * step :] for m in mats]).sum(axis=1)
            sums = lax.dynamic_update_slice_in_dim(sums, tail, full * step, 0)
        kept = [shape[a] for a in output_axes] + [1] * (len(shape) - len(output_axes))
    return sums.reshape(kept)


def on_cpu(cpu: Callable[[], Any], default: Callable[[], Any]) -> Any:
    """``cpu()`` where the computation is lowered for CPU, ``default()`` elsewhere.

    Both are traced; only the branch for the platform that compiles it runs.
    """
    platform_dependent = getattr(lax, "platform_dependent", None)
    if platform_dependent is None:  # pragma: no cover - jax without it
        return cpu() if jax.default_backend() == "cpu" else default()
    return platform_dependent(cpu=cpu, default=default)
