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
from typing import NamedTuple

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


class Pair(NamedTuple):
    """A comparison: the GC arm against its baseline arm, under a title."""

    title: str
    baseline: str
    gc: str


def _histories(runs):
    return {(r["arm"], r["seed"]): r["history"] for r in runs}


def final_stats(runs, pairs: dict[str, Pair], metrics, seeds) -> dict:
    """``{pair: {metric: paired_stats}}`` of each run's last history entry.

    ``runs`` are dicts with ``arm``, ``seed`` and ``history`` (a list of
    ``{metric: value}``, one per evaluation).
    """
    hist = _histories(runs)
    return {
        name: {
            m: paired_stats(
                [hist[(pair.baseline, s)][-1][m] for s in seeds],
                [hist[(pair.gc, s)][-1][m] for s in seeds],
            )
            for m in metrics
        }
        for name, pair in pairs.items()
    }


def curve_differences(runs, pairs: dict[str, Pair], metric, seeds, scale=1.0):
    """``{pair: [mean over seeds of GC - baseline at each evaluation]}``."""
    hist = _histories(runs)
    out = {}
    for name, pair in pairs.items():
        base = [[h[metric] for h in hist[(pair.baseline, s)]] for s in seeds]
        gc = [[h[metric] for h in hist[(pair.gc, s)]] for s in seeds]
        diff = scale * np.mean(np.subtract(gc, base), 0)
        out[name] = [round(float(v), 4) for v in diff]
    return out


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


class Column(NamedTuple):
    """A metric's three columns in a table: baseline, GC, GC - baseline."""

    metric: str
    label: str
    scale: float = 1.0
    fmt: str = ".4f"


def stats_table(summary: dict, columns, first: str = "comparison", lead=None):
    """A markdown table of ``final_stats``: one row per pair.

    ``lead`` maps a row's name to extra leading cells (e.g. a learning rate),
    whose headers follow ``first``.
    """
    head = [first]
    rows = []
    for name, row in summary.items():
        extra = list(lead(name)) if lead else []
        cells = [name, *extra]
        for c in columns:
            cells += stats_cells(row[c.metric], c.scale, c.fmt)
        rows.append(cells)
    for c in columns:
        head += [f"{c.label}, baseline", f"{c.label}, GC", "GC - baseline"]
    return head, rows


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


def results_folder(out) -> pathlib.Path:
    """Creates the ``--out`` folder; exits with a message naming it if it can't."""
    out = pathlib.Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: {e}") from None
    return out


def read_results(path: pathlib.Path) -> dict:
    """A results file to ``--replot``; exits with a message if it is not one."""
    try:
        results = json.loads(pathlib.Path(path).read_text())
        missing = {"config", "runs"} - set(results)
    except (OSError, ValueError, TypeError) as e:
        missing = e
    if missing:
        raise SystemExit(
            f"error: --replot {path}: not a results file of this script ({missing})"
        )
    return results


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


class Panel(NamedTuple):
    """One row of a curves figure: a metric against the evaluation axis."""

    metric: str
    label: str
    scale: float = 1.0
    log: bool = False
    focus: bool = False  # scale the y axis to where the curves end
    legend: str = "upper right"
    difference: bool = False  # GC - baseline paired per seed, ± its SE


def _plot_difference(ax, runs, pair, panel, x_key):
    """The paired difference GC - baseline per evaluation: mean ± SE, and zero."""
    hist = _histories(runs)
    seeds = sorted({r["seed"] for r in runs if r["arm"] == pair.gc})
    diffs = np.array(
        [
            [
                panel.scale * (g[panel.metric] - b[panel.metric])
                for b, g in zip(
                    hist[(pair.baseline, s)], hist[(pair.gc, s)], strict=True
                )
            ]
            for s in seeds
        ]
    )
    x = [h[x_key] for h in hist[(pair.gc, seeds[0])]]
    mean = diffs.mean(0)
    ax.axhline(0.0, color=BASELINE_COLOR, lw=1)
    ax.plot(
        x,
        mean,
        color=GC_COLOR,
        marker="o" if len(x) == 1 else ".",
        label="GC - baseline" + (" ± SE" if len(seeds) > 1 else ""),
    )
    if len(seeds) > 1:
        se = diffs.std(0, ddof=1) / math.sqrt(len(seeds))
        if len(x) == 1:
            ax.errorbar(x, mean, yerr=se, color=GC_COLOR, capsize=4)
        else:
            ax.fill_between(x, mean - se, mean + se, color=GC_COLOR, alpha=0.2)
    return x


def plot_pairs(runs, pairs: dict[str, Pair], panels, x_key, xlabel, path, title):
    """A column per pair, a row per panel: baseline and GC, mean ± std of seeds.

    ``x_key`` is the history entries' evaluation axis (``"epoch"``, ``"step"``).
    """
    plt, fig, axes = figure(len(pairs), len(panels))
    seeds = len({r["seed"] for r in runs})
    for col, pair in enumerate(pairs.values()):
        for row, panel in enumerate(panels):
            ax = axes[row, col]
            lows, highs = [], []
            if panel.difference:
                x = _plot_difference(ax, runs, pair, panel, x_key)
                panel = panel._replace(focus=False, log=False)
            for arm, label, color in (
                ()
                if panel.difference
                else (
                    (pair.baseline, "baseline", BASELINE_COLOR),
                    (pair.gc, "GC", GC_COLOR),
                )
            ):
                hist = [r["history"] for r in runs if r["arm"] == arm]
                x = [h[x_key] for h in hist[0]]
                values = [[panel.scale * h[panel.metric] for h in run] for run in hist]
                low, high = plot_band(ax, x, values, color, label)
                lows.append(low)
                highs.append(high)
            if x_key == "epoch":
                integer_ticks(ax, x)
            if panel.log:
                ax.set_yscale("log")
            if panel.focus:
                focus_ylim(ax, lows, highs)
            if row == 0:
                ax.set_title(pair.title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(panel.label)
            ax.grid(alpha=0.3)
            ax.legend(loc=panel.legend)
    spread = "mean ± std over seeds" if seeds > 1 else "one seed"
    save(plt, fig, path, f"{title}: {spread}")


def save(plt, fig, path, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
