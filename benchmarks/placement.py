"""Where GC goes for adaptive optimizers: the evidence, from recorded runs.

    python -m benchmarks.placement            # the runs in benchmarks/results
    python -m benchmarks.placement FILE ...   # other results.json / sweep.json

Run it from the repository root. It trains nothing: it reads results files
written by ``benchmarks.train`` (Adam) and ``benchmarks.lm`` (AdamW), in which
every seed trained the baseline, GC on the gradient and GC on the update from
the same initialization on the same data order, and prints, per run and
metric, three paired differences with their standard errors: GC on the
gradient - baseline, GC on the update - baseline, and gradient - update. A
learning-rate sweep gives a row per rate. In each comparison's statistics
(``report.paired_stats``) the ``baseline_*`` entries are the first arm named
and the ``gc_*`` entries the second. The docs' placement rule
(``README.md``, "Where GC goes") quotes this table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import NamedTuple

from benchmarks import report

RESULTS = pathlib.Path(__file__).parent / "results"
DEFAULT_FILES = (
    "fashion-mnist-10k/results.json",
    "fashion-mnist/results.json",
    "fashion-mnist-10k-groupnorm/results.json",
    "fashion-mnist-10k-batch16/results.json",
    "fashion-mnist-10k-groupnorm-batch16/results.json",
    "fashion-mnist-10k-lr-sweep/sweep.json",
    "lm-stdlib/results.json",
    "lm-stdlib-lr1e-3/results.json",
    "lm-stdlib-3x96-ctx128/results.json",
    "digits/results.json",
)


class Metric(NamedTuple):
    key: str
    label: str
    scale: float
    fmt: str
    better: str


# Per script: (baseline arm, GC-on-gradient arm, GC-on-update arm, metrics).
LAYOUTS = (
    (
        "adam",
        "adam-grad+gc",
        "adam-update+gc",
        (
            Metric("test_acc", "test acc, points", 100.0, "+.2f", "higher"),
            Metric("train_loss", "train loss", 1.0, "+.4f", "lower"),
        ),
    ),
    (
        "adamw",
        "adamw-grad+gc",
        "adamw-update+gc",
        (
            Metric("heldout_bits", "held-out bits/byte", 1.0, "+.4f", "lower"),
            Metric("train_loss", "train loss, nats/byte", 1.0, "+.4f", "lower"),
        ),
    ),
)
COMPARISONS = {  # name: (first arm's role, second arm's role), second - first
    "gradient - baseline": (0, 1),
    "update - baseline": (0, 2),
    "gradient - update": (2, 1),
}


def _layout(runs):
    arms = {r["arm"] for r in runs}
    return next((lay for lay in LAYOUTS if set(lay[:3]) <= arms), None)


def _setting(results) -> str:
    c = results["config"]
    if "d_model" in c:
        return (
            f"LM {c['layers']}x{c['d_model']}, ctx {c['ctx']}, {c['steps']} steps, "
            f"lr {c['lr']:g}"
        )
    return f"{c['dataset']}, {c.get('norm', 'batch')} norm, batch {c['batch_size']}"


def rows_of(results) -> list[dict]:
    """The paired differences of one results file: a row per metric (and rate)."""
    layout = _layout(results["runs"])
    if layout is None:
        return []
    *arms, metrics = layout
    groups = {}  # a sweep has one group of runs per learning rate
    for run in results["runs"]:
        if run["arm"] in arms:
            groups.setdefault(run.get("learning_rate"), []).append(run)
    rows = []
    for rate, runs in groups.items():
        final = {(r["arm"], r["seed"]): r["history"][-1] for r in runs}
        seeds = sorted({r["seed"] for r in runs if r["arm"] == arms[1]})
        missing = [(a, s) for a in arms for s in seeds if (a, s) not in final]
        if missing:
            arm, seed = missing[0]
            raise ValueError(f"no run of {arm} with seed {seed} to pair with")
        setting = _setting(results)
        if "sweep" in results:
            setting += f", lr {rate:g}"
        for m in metrics:
            values = [[m.scale * final[(arm, s)][m.key] for s in seeds] for arm in arms]
            row = {"setting": setting, "metric": m.label, "better": m.better}
            row |= {"seeds": len(seeds), "fmt": m.fmt}
            for name, (first, second) in COMPARISONS.items():
                row[name] = report.paired_stats(values[first], values[second])
            rows.append(row)
    return rows


def _cell(stats, fmt):
    return report.pm(stats["diff_mean"], stats["diff_se"], 1.0, fmt)


def format_rows(rows) -> str:
    head = ["run", "metric (better)", *COMPARISONS]
    body = [
        [
            r["setting"],
            f"{r['metric']} ({r['better']})",
            *(_cell(r[name], r["fmt"]) for name in COMPARISONS),
        ]
        for r in rows
    ]
    return report.markdown_table(head, body) + (
        "\n\nFinal evaluation; mean of the per-seed paired differences ± its "
        "standard error."
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.placement", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "files",
        nargs="*",
        type=pathlib.Path,
        help="results.json / sweep.json files (default: the runs in "
        "benchmarks/results)",
    )
    args = p.parse_args(argv)
    files = args.files or [RESULTS / f for f in DEFAULT_FILES]
    rows = []
    for path in files:
        try:
            results = json.loads(path.read_text())
            found = rows_of(results)
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(
                f"error: {path}: not a results file of benchmarks.train or lm: {e}"
            )
        if not found:
            sys.exit(
                f"error: {path}: no run with a baseline, GC on the gradient and GC "
                f"on the update"
            )
        rows += found
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
