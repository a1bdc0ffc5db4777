"""benchmarks.report: paired statistics, tables, figures and results files."""

import json
import math

import numpy as np
import pytest

from benchmarks import report


def test_paired_stats_by_hand():
    base, gc = [0.80, 0.70, 0.90], [0.85, 0.70, 1.00]
    stats = report.paired_stats(base, gc)
    # differences 0.05, 0.00, 0.10: mean 0.05, sample std 0.05, SE 0.05 / sqrt(3)
    assert stats["diff_mean"] == pytest.approx(0.05)
    assert stats["diff_se"] == pytest.approx(0.05 / math.sqrt(3))
    assert stats["baseline_mean"] == pytest.approx(0.80)
    assert stats["baseline_std"] == pytest.approx(0.10)
    one = report.paired_stats([1.0], [2.0])
    assert one["diff_mean"] == 1.0 and one["diff_se"] is None and one["gc_std"] is None


def test_cells_and_table():
    stats = report.paired_stats([0.5, 0.7], [0.6, 0.9])
    cells = report.stats_cells(stats, 100, ".2f")
    assert cells == ["60.00 ± 14.14", "75.00 ± 21.21", "+15.00 ± 5.00"]
    assert report.pm(0.5, None, 100, "+.1f") == "+50.0"
    table = report.markdown_table(["a", "b"], [["1", "2"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_write_json_turns_non_finite_values_into_null(tmp_path):
    path = tmp_path / "r.json"
    report.write_json(path, {"a": [1.0, float("nan")], "b": {"c": float("inf")}})
    assert json.loads(path.read_text()) == {"a": [1.0, None], "b": {"c": None}}


def test_focus_ylim_shows_where_the_curves_end():
    plt, fig, axes = report.figure(1, 1)
    ax = axes[0, 0]
    x = np.arange(1, 11)
    rising = 90 - 40 * np.exp(-x)  # 75.3 at epoch 1, ~90 at the end
    low, high = report.plot_band(ax, x, [rising - 0.1, rising + 0.1], "k", "a")
    report.focus_ylim(ax, [low], [high])
    bottom, top = ax.get_ylim()
    assert rising[0] < bottom < rising[-5] and top > rising[-1] + 0.1
    plt.close(fig)


def test_one_point_and_one_run_draw_a_visible_marker():
    plt, fig, axes = report.figure(1, 1)
    ax = axes[0, 0]
    low, high = report.plot_band(ax, [1], [[0.5]], "k", "one run, one epoch")
    assert low == high == 0.5
    (line,) = ax.get_lines()
    assert line.get_marker() == "o"
    report.integer_ticks(ax, [1])
    assert ax.get_xlim() == (0, 2)
    plt.close(fig)


def _runs():
    # Two seeds; GC is 0.1 better than the baseline at the end of seed 0 and
    # 0.3 better at the end of seed 1.
    def run(arm, seed, values):
        return {
            "arm": arm,
            "seed": seed,
            "history": [{"step": i, "loss": v} for i, v in enumerate(values)],
        }

    return [
        run("base", 0, [2.0, 1.0]),
        run("gc", 0, [2.0, 0.9]),
        run("base", 1, [2.2, 1.2]),
        run("gc", 1, [2.0, 0.9]),
    ]


def test_final_stats_and_curve_differences_pair_runs_by_seed():
    pairs = {"GC": report.Pair("GC vs base", "base", "gc")}
    summary = report.final_stats(_runs(), pairs, ["loss"], [0, 1])
    stats = summary["GC"]["loss"]
    assert stats["diff_mean"] == pytest.approx(-0.2)
    assert stats["diff_se"] == pytest.approx(0.1)  # std of (-0.1, -0.3) / sqrt(2)
    diffs = report.curve_differences(_runs(), pairs, "loss", [0, 1])
    assert diffs == {"GC": [pytest.approx(-0.1), pytest.approx(-0.2)]}
    head, rows = report.stats_table(summary, [report.Column("loss", "loss", 1, ".2f")])
    assert head == ["comparison", "loss, baseline", "loss, GC", "GC - baseline"]
    assert rows == [["GC", "1.10 ± 0.14", "0.90 ± 0.00", "-0.20 ± 0.10"]]


def test_plot_pairs_writes_a_figure(tmp_path):
    pairs = {"GC": report.Pair("GC vs base", "base", "gc")}
    panels = [
        report.Panel("loss", "loss", log=True, focus=True),
        report.Panel("loss", "loss", difference=True),
    ]
    path = tmp_path / "f.png"
    report.plot_pairs(_runs(), pairs, panels, "step", "step", path, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 1.5 * width  # one column, two rows
