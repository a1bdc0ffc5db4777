"""The benchmarks' reporting: paired statistics, tables, figures, results files.

Every comparison is paired: each seed trains the baseline and the GC arm from
the same initialization on the same data order, and a difference is the mean
of the per-seed differences GC - baseline with its standard error. Spreads
need two seeds; with one they are ``None`` (``null`` in the JSON files).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

BASELINE_COLOR, GC_COLOR = "tab:gray", "tab:red"


# --- statistics ------------------------------------------------------------------


def paired_stats(base, gc) -> dict:
    """Means and sample stds of both arms, and the paired difference ± its SE."""
    base, gc = np.asarray(base, np.float64), np.asarray(gc, np.float64)
    diff, n = gc - base, len(base)
    return {
        "baseline_mean": float(base.mean()),
        "baseline_std": float(base.std(ddof=1)) if n > 1 else None,
        "gc_mean": float(gc.mean()),
        "gc_std": float(gc.std(ddof=1)) if n > 1 else None,
        "diff_mean": float(diff.mean()),
        "diff_se": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
    }


# --- tables ------------------------------------------------------------------------


def pm(mean, spread, scale=1.0, fmt=".4f") -> str:
    """``mean ± spread`` scaled, with the spread left out when it is ``None``."""
    text = format(scale * mean, fmt)
    digits = fmt.lstrip("+")
    return text if spread is None else f"{text} ± {scale * spread:{digits}}"


def stats_cells(stats: dict, scale=1.0, fmt=".4f") -> list[str]:
    """Baseline, GC and GC - baseline cells of one ``paired_stats`` result."""
    return [
        pm(stats["baseline_mean"], stats["baseline_std"], scale, fmt),
        pm(stats["gc_mean"], stats["gc_std"], scale, fmt),
        pm(stats["diff_mean"], stats["diff_se"], scale, "+" + fmt),
    ]


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- results files -------------------------------------------------------------------


def finite(tree):
    """NaN/inf (a diverged run) as ``None``: the results file stays valid JSON."""
    if isinstance(tree, dict):
        return {k: finite(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def write_json(path: pathlib.Path, results: dict) -> None:
    pathlib.Path(path).write_text(json.dumps(finite(results), indent=1) + "\n")


# --- figures -----------------------------------------------------------------------


def figure(ncols: int, nrows: int = 2, width: float = 4.2, height: float = 3.25):
    """``(plt, fig, axes)``: an ``nrows x ncols`` grid of axes, Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False
    )
    return plt, fig, axes


def plot_band(ax, x, values, color, label):
    """Mean over runs (rows of ``values``) as a line, ± the runs' std as a band.

    One run draws no band; one point draws a marker that can be seen. Returns
    the band's lower and upper edges (the mean itself for one run), for
    ``focus_ylim``.
    """
    values = np.asarray(values, np.float64)
    mean = values.mean(0)
    ax.plot(x, mean, color=color, label=label, marker="o" if len(x) == 1 else ".")
    if len(values) < 2:
        return mean, mean
    std = values.std(0, ddof=1)
    if len(x) == 1:
        ax.errorbar(x, mean, yerr=std, color=color, capsize=4)
    else:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
    return mean - std, mean + std


def focus_ylim(ax, lows, highs, tail: float = 0.6, pad: float = 0.2):
    """Scales the y axis to the last ``tail`` of the curves, where they end.

    ``lows`` and ``highs`` are the curves' lower and upper edges (bands, or the
    curves themselves). Early points far outside that range (the first
    epochs' low accuracy) are cut off, so that the final differences are
    visible.
    """

    def ends(curves):
        curves = [np.asarray(c, np.float64) for c in curves]
        return [c[int(len(c) * (1 - tail)) :] if len(c) > 2 else c for c in curves]

    lo = min(float(np.nanmin(c)) for c in ends(lows))
    hi = max(float(np.nanmax(c)) for c in ends(highs))
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.01
    ax.set_ylim(lo - pad * span, hi + pad * span)


def integer_ticks(ax, x):
    """Epoch-like axes: a tick at each integer, at most ~10 of them."""
    x = list(x)
    step = max(1, math.ceil(len(x) / 10))
    ax.set_xticks(x[::step])
    if len(x) == 1:
        ax.set_xlim(x[0] - 1, x[0] + 1)


def save(plt, fig, path, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
