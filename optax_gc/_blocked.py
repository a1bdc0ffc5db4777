"""Fan-in sums computed block by block, so that what is summed never exists whole.

GC needs each output unit's fan-in sum before it can write a centred value.
When the values summed are themselves computed (an optimizer's update from its
new moments), XLA on CPU writes them to memory in full before reducing them,
and reads them back for the subtraction: a whole extra leaf of temporary
memory and two extra passes over it. Here the leaf is read as a matrix whose
rows are contiguous, and a loop visits row blocks that fit in cache: each
block's values are recomputed from the block's inputs and added into a small
accumulator. Nothing of the leaf's size is written.

Compile time is about proportional to the number of pieces XLA compiles
(fusions), and one loop per leaf, each with its own tail, made ResNet-50's
step compile in twice the bare optimizer's time. Here leaves whose loops run
the same number of iterations share one loop (ResNet-50's 53 centred kernels
need 9), block sizes are chosen so that no ragged tail is left where the
rows allow, leaves of at most two blocks are summed in one piece, two blocks
are added per iteration (:data:`UNROLL`), and block indices are unsigned so that
none is normalized.

GPUs and TPUs fuse a reduction with its producer themselves and pay for every
loop iteration with a kernel launch, so they keep the plain formulation:
:func:`optax_gc._transform.for_cpu` says, at trace time, which the
computation is for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROW_BLOCK_ELEMENTS = 8192
"""Elements in one row block, and in the accumulator (32 KiB in float32)."""

UNROLL = 2
"""Row blocks added per loop iteration.

More blocks per iteration mean fewer iterations but one more copy of the
recomputed update in the code XLA compiles: on ResNet-50's Adam step, two
compiled about 8% faster than four, for the same step time. One compiled
about 4% faster still, but XLA then kept 18 KiB more temporary memory in the
Flax CNN train step of ``benchmarks/overhead.py`` (5.0% of its parameter
bytes, against 2.9% with two).
"""

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


class MeanJob(NamedTuple):
    """One leaf's fan-in means, to compute from ``fn(blocks, scalars)``.

    ``fn`` must act entry by entry: its value on a block of ``inputs`` (and
    the ``scalars``) is the same block of its value on the whole. Every input
    has the leaf's ``shape``; ``fn``'s values are summed in ``dtype``.
    """

    fn: Callable[[Sequence[jax.Array], Sequence[jax.Array]], jax.Array]
    inputs: Sequence[jax.Array]
    scalars: Sequence[jax.Array]
    shape: tuple[int, ...]
    output_axes: tuple[int, ...]
    dtype: Any


def _cut(rows: int, cols: int) -> tuple[int, int]:
    """``(r, u)``: blocks of ``r`` rows, ``u`` of them per iteration.

    ``r`` is at most :data:`ROW_BLOCK_ELEMENTS` ``// cols`` and ``u`` at most
    :data:`UNROLL`. Where some ``r`` down to a quarter of that and some ``u``
    make ``r * u`` divide ``rows``, the loop needs no ragged tail (one more
    piece of code to compile per leaf); among those, an ``r`` that makes the
    number of iterations a power of two is preferred, so that more leaves
    share a loop (ResNet-50's 53 centred kernels need 9 loops, not 11).
    """
    r0 = max(1, min(rows, ROW_BLOCK_ELEMENTS // cols))
    for u in range(UNROLL, 0, -1):
        fits = [r for r in range(r0, max(1, r0 // 4) - 1, -1) if rows % (r * u) == 0]
        if fits:
            even = [r for r in fits if (rows // (r * u)) & (rows // (r * u) - 1) == 0]
            return (even or fits)[0], u
    return r0, UNROLL


class _Plan:
    """How one job is cut: blocks of ``r`` rows, ``u`` blocks per iteration.

    Units are columns: each iteration adds ``u`` blocks of ``r`` rows into an
    ``(r, cols)`` accumulator, one after the other (XLA fuses them into one
    pass). Units are rows: each iteration sums the rows of one block of
    ``step = r * u`` units and stores them. ``trips`` full iterations, then a
    ragged tail where :func:`_cut` found no divisor.
    """

    def __init__(self, job: MeanJob, view: tuple[int, int, bool]):
        self.job = job
        self.rows, self.cols, self.units_are_cols = view
        self.r, self.u = _cut(self.rows, self.cols)
        self.step = self.r * self.u
        self.trips = self.rows // self.step
        self.count = self.rows if self.units_are_cols else self.cols
        self.mats = [x.reshape(self.rows, self.cols) for x in job.inputs]

    def value(self, blocks: Sequence[jax.Array]) -> jax.Array:
        # lax, not jnp: this is traced once per block, and jnp costs more.
        v = self.job.fn(blocks, self.job.scalars)
        if v.dtype != self.job.dtype:
            v = lax.convert_element_type(v, self.job.dtype)
        return v

    def block(self, start: Any, size: int) -> jax.Array:
        index = (_index(start), np.uint32(0))  # unsigned: never normalized
        return self.value(
            [lax.dynamic_slice(m, index, (size, self.cols)) for m in self.mats]
        )

    def accumulate(self, i: Any, acc: jax.Array) -> jax.Array:
        """Units are columns: ``acc`` plus iteration ``i``'s ``u`` blocks."""
        for j in range(self.u):
            acc = lax.add(acc, self.block(i * self.step + j * self.r, self.r))
        return acc

    def row_sums(self, i: Any, acc: jax.Array) -> jax.Array:
        """Units are rows: ``acc`` with iteration ``i``'s units' sums stored."""
        start = _index(i * self.step)
        sums = self.block(start, self.step).sum(axis=1)
        return lax.dynamic_update_slice(acc, sums, (start,))

    def mean(self, looped: jax.Array | None) -> jax.Array:
        """The means, kept dims of size 1, from the loop's sums (``None``: no loop).

        ``looped`` is the sum over the looped rows per column (units are
        columns) or the looped units' sums (units are rows). Without a loop
        (fewer than two iterations) the leaf, at most ``step`` rows and in
        cache, is summed in one piece, as its tail.
        """
        done = 0 if looped is None else self.trips * self.step
        tail = self.value([m[done:] for m in self.mats]) if self.rows > done else None
        if self.units_are_cols:
            sums = looped
            if tail is not None:
                t = tail.sum(axis=0)
                sums = t if sums is None else lax.add(sums, t)
        else:
            sums = jnp.zeros((self.rows,), self.job.dtype) if looped is None else looped
            if tail is not None:
                sums = lax.dynamic_update_slice(sums, tail.sum(axis=1), (done,))
        assert sums is not None
        count = self.count
        axes, ndim = self.job.output_axes, len(self.job.shape)
        if self.units_are_cols:
            kept = [1] * (ndim - len(axes)) + [self.job.shape[a] for a in axes]
        else:
            kept = [self.job.shape[a] for a in axes] + [1] * (ndim - len(axes))
        return (sums / count).reshape(kept)


def _index(i: Any) -> Any:
    return np.uint32(i) if isinstance(i, int) else i


def blocked_fan_in_means(jobs: Sequence[MeanJob]) -> list[jax.Array]:
    """Each job's fan-in means, kept dims of size 1.

    Every job's leaf must be a matrix of units (:func:`matrix_view`). Jobs
    whose loops run the same number of iterations share one loop: one
    ``fori_loop`` per distinct count, and none for fewer than two.
    """
    plans = []
    for job in jobs:
        view = matrix_view(job.shape, job.output_axes)
        if view is None:
            raise ValueError(f"no matrix view of {job.shape} with {job.output_axes}")
        plans.append(_Plan(job, view))
    loops: dict[int, list[int]] = {}
    for k, plan in enumerate(plans):
        if plan.trips > 1:
            loops.setdefault(plan.trips, []).append(k)
    looped: list[Any] = [None] * len(plans)
    for trips, group in loops.items():

        def body(i, carry, group=group):
            i = lax.convert_element_type(i, jnp.uint32)
            return tuple(
                plans[k].accumulate(i, acc)
                if plans[k].units_are_cols
                else plans[k].row_sums(i, acc)
                for k, acc in zip(group, carry, strict=True)
            )

        init = []
        for k in group:
            p = plans[k]
            shape = (p.r, p.cols) if p.units_are_cols else (p.rows,)
            init.append(jnp.zeros(shape, p.job.dtype))
        out = lax.fori_loop(0, trips, body, tuple(init))
        for k, acc in zip(group, out, strict=True):
            looped[k] = acc.sum(axis=0) if plans[k].units_are_cols else acc
    return [plan.mean(sums) for plan, sums in zip(plans, looped, strict=True)]
