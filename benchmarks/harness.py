"""The benchmarks' harness: timing, memory, fingerprints and version records.

Timings are medians of interleaved calls (every variant of a table called in
turn, round by round, in one process), so that their ratios survive a noisy
machine; every call ends in ``jax.block_until_ready``. Fingerprints and
version records go into every results file, so that two runs can be told
apart: same initial parameters, same data order, same software.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax

import optax_gc


def interleaved(fns: dict, make_args, repeats: int, warmup: int = 3):
    """Median seconds per call of each fn, calls interleaved round-robin.

    ``make_args(name)`` returns the argument tuple for a call; for donated
    steps each fn keeps and threads its own state (see ``stateful``).
    """
    for name, fn in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(fn(*make_args(name)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            args = make_args(name)
            jax.block_until_ready(args)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}, samples


def interleaved_compile(fns: dict, repeats: int, warmup: int = 1):
    """Median wall and process-CPU seconds of each ``fn()``, interleaved.

    Each ``fn`` traces and compiles something fresh (a new function object:
    jax caches on identity) and returns the compiled object. Returns
    ``(wall medians, {name: [wall samples]}, CPU medians)``; CPU seconds add
    up every compiler thread, so they move less with the machine's load.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return (
        {name: statistics.median(s) for name, s in wall.items()},
        wall,
        {name: statistics.median(s) for name, s in cpu.items()},
    )


@contextlib.contextmanager
def traced_for(platform):
    """Trace as if for ``platform`` (``None``: as the library guesses).

    Patches ``optax_gc._transform.lowering_platform``, the trace-time guess
    that picks GC's formulation, so that on one machine the formulation
    another platform gets can be traced and compiled.
    """
    if platform is None:
        yield
        return
    from optax_gc import _transform

    saved = _transform.lowering_platform
    _transform.lowering_platform = lambda: platform
    try:
        yield
    finally:
        _transform.lowering_platform = saved


def stateful(step, init):
    """Wraps a donated ``state -> state`` step so each call consumes the last."""
    holder = {"state": init}

    def call():
        holder["state"] = step(*holder["state"])
        return holder["state"]

    return call


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def memory_stats(compiled, opt_state) -> dict:
    """XLA's memory analysis of a compiled step, and the optimizer state's bytes."""
    stats = {"opt_state_bytes": tree_bytes(opt_state)}
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - backends without memory analysis
        stats["error"] = repr(e)
        return stats
    if m is None:
        return stats
    for key in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    ):
        stats[key] = int(getattr(m, key, 0))
    stats["peak_estimate_bytes"] = (
        stats["argument_size_in_bytes"]
        + stats["output_size_in_bytes"]
        + stats["temp_size_in_bytes"]
        - stats["alias_size_in_bytes"]
    )
    return stats


def tree_sha256(tree) -> str:
    """A 16-hex-digit fingerprint of a tree's leaves' bytes, in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """The software and device a result was measured with."""
    try:
        import flax

        flax_version = flax.__version__
    except ImportError:
        flax_version = None
    device = jax.devices()[0]
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None),
        "optax": optax.__version__,
        "flax": flax_version,
        "optax_gc": optax_gc.__version__,
        "backend": jax.default_backend(),
        "device": str(device),
        "device_kind": device.device_kind,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
