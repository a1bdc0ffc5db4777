"""benchmarks.train end to end on tiny settings (the README's main job)."""

import json
import pathlib

import numpy as np
import pytest

from benchmarks import datasets, train
from benchmarks.tests.test_datasets import fake_official_files

TINY = ["--epochs", "1", "--train-subset", "96", "--batch-size", "32"]


def _check_outputs(out: pathlib.Path, n_runs: int, epochs: int):
    results = json.loads((out / "results.json").read_text())
    assert {"config", "versions", "summary", "runs"} <= set(results)
    assert results["versions"]["jax"] and results["versions"]["optax_gc"]
    assert len(results["runs"]) == n_runs
    for run in results["runs"]:
        assert len(run["history"]) == epochs
        for h in run["history"]:
            assert np.isfinite(h["train_loss"]) and h["train_loss"] > 0
            assert 0.0 <= h["test_acc"] <= 1.0 and 0.0 <= h["train_acc"] <= 1.0
    _check_png(out / "curves.png")
    return results


def _check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


# --- runs -------------------------------------------------------------------------


def test_default_dataset_tiny_run_all_arms(tmp_path, capsys):
    out = tmp_path / "default"
    args = ["--seeds", "2", "--epochs", "1", "--train-subset", "128"]
    results = train.main(args + ["--batch-size", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    for name in train.OPTIMIZERS:
        assert f"| {name} |" in printed
    results = _check_outputs(out, n_runs=2 * 5, epochs=1)
    assert results["config"]["split"] == {"train": 128, "test": 5000}
    runs = results["runs"]
    assert {r["arm"] for r in runs} == {
        "sgd",
        "sgd+gc",
        "adam",
        "adam-grad+gc",
        "adam-update+gc",
    }
    # Every arm of a seed starts from the same parameters and sees the same
    # batches; the seeds differ in both.
    for key in ("init_sha256", "data_order_sha256"):
        by_seed = [{r[key] for r in runs if r["seed"] == s} for s in (0, 1)]
        assert len(by_seed[0]) == 1 and len(by_seed[1]) == 1
        assert by_seed[0] != by_seed[1]
    final = {(r["arm"], r["seed"]): r["history"][-1]["train_loss"] for r in runs}
    assert final[("sgd", 0)] != final[("sgd+gc", 0)]
    assert final[("adam-grad+gc", 0)] != final[("adam-update+gc", 0)]
    # The summary pairs each GC arm with its own seed's baseline.
    acc = {(r["arm"], r["seed"]): r["history"][-1]["test_acc"] for r in runs}
    for name, base in (("sgd", "sgd"), ("adam-update", "adam")):
        diffs = [acc[(f"{name}+gc", s)] - acc[(base, s)] for s in (0, 1)]
        row = results["summary"][name]["test_acc"]
        assert row["diff_mean"] == pytest.approx(np.mean(diffs))
        assert row["diff_se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(2))


def test_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["--dataset", "digits", "--seeds", "2", "--optimizers", "sgd,adam-update"]
    results = train.main(args + ["--out", str(out)] + TINY)
    printed = capsys.readouterr().out
    assert "| sgd |" in printed and "| adam-update |" in printed
    results = _check_outputs(out, n_runs=2 * 4, epochs=1)
    assert {r["arm"] for r in results["runs"]} == {
        "sgd",
        "sgd+gc",
        "adam",
        "adam-update+gc",
    }
    assert set(results["summary"]) == {"sgd", "adam-update"}
    row = results["summary"]["sgd"]["test_acc"]
    assert row["diff_se"] >= 0 and np.isfinite(row["diff_mean"])


def test_same_seed_same_numbers(tmp_path):
    args = ["--dataset", "digits", "--optimizers", "adam-grad"] + TINY
    a = train.main(args + ["--seeds", "1", "--out", str(tmp_path / "a")])
    b = train.main(args + ["--seeds", "2", "--out", str(tmp_path / "b")])
    assert b["runs"][0]["history"] == a["runs"][0]["history"]  # seed 0, adam
    assert b["runs"][1]["history"] == a["runs"][1]["history"]  # seed 0, GC
    assert b["runs"][2]["history"] != a["runs"][0]["history"]  # seed 1


def test_constant_schedule_differs_from_cosine(tmp_path):
    args = ["--dataset", "digits", "--seeds", "1", "--optimizers", "sgd"] + TINY
    cosine = train.main(args + ["--out", str(tmp_path / "a")])
    constant = train.main(
        args + ["--out", str(tmp_path / "b"), "--schedule", "constant"]
    )
    assert cosine["runs"][0]["history"] != constant["runs"][0]["history"]


def test_lr_sweep_writes_one_row_per_rate_and_a_figure(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--dataset", "digits", "--seeds", "2", "--optimizers", "sgd"]
    results = train.main(args + TINY + ["--lr-sweep", "0.5,2", "--out", str(out)])
    assert json.loads((out / "sweep.json").read_text())["sweep"] == results["sweep"]
    _check_png(out / "lr_sweep.png")
    rates = {
        n: [row["learning_rate"] for row in rows]
        for n, rows in results["sweep"].items()
    }
    assert rates == {"sgd": [0.5 * train.SGD_LR, 2 * train.SGD_LR]}
    assert len(results["runs"]) == 2 * 2 * 2  # rates x seeds x arms
    assert "| sgd | 0.025 |" in capsys.readouterr().out


def test_fashion_mnist_from_idx_files(tmp_path):
    arrays = fake_official_files(tmp_path / "fmnist")
    np.testing.assert_array_equal(
        datasets.read_idx(tmp_path / "fmnist" / datasets.FASHION_FILES["x_test"]),
        arrays["x_test"],
    )
    out = tmp_path / "out"
    args = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fmnist")]
    args += ["--seeds", "1", "--epochs", "2", "--optimizers", "sgd"]
    train.main(args + ["--train-subset", "64", "--batch-size", "32", "--out", str(out)])
    results = _check_outputs(out, n_runs=2, epochs=2)
    assert results["config"]["split"] == {"train": 64, "test": 1003}
    for run in results["runs"]:  # every test image scored, not 1,000 of them
        correct = run["history"][-1]["test_acc"] * 1003  # a float32 ratio
        assert correct == pytest.approx(round(correct), abs=1e-3)
    # One seed: no spread to report.
    assert results["summary"]["sgd"]["test_acc"]["diff_se"] is None


def test_missing_fashion_mnist_names_package_and_flag(tmp_path):
    with pytest.raises(SystemExit) as info:
        train.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path)])
    message = str(info.value)
    assert "dataset-fashion-mnist" in message and "--data-dir" in message


@pytest.mark.parametrize(
    "bad",
    [
        ["--optimizers", "rmsprop"],
        ["--epochs", "0"],
        ["--seeds", "0"],
        ["--stem-stride", "0"],
        ["--sgd-lr", "0"],
        ["--lr-sweep", "1,x"],
        ["--lr-sweep", "0,1"],
        ["--train-subset", "0"],
        ["--lr-sweep", "nan"],
        ["--adam-lr", "inf"],
        ["--optimizers", ","],
        ["--norm", "layer"],
        ["--groups", "0"],
        ["--groups", "3", "--norm", "group"],
    ],
)
def test_bad_options_exit_with_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as info:
        train.parse_args(bad)
    assert info.value.code == 2
    assert bad[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--train-subset", "20000"], "--train-subset 20000 > the 10000"),
        (["--stem-stride", "16"], "--stem-stride 16 leaves nothing"),
        (["--dataset", "digits", "--batch-size", "5000"], "--batch-size 5000 >"),
    ],
)
def test_options_the_data_cannot_meet_exit_with_a_message(bad, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(bad + ["--out", str(tmp_path)])


def test_replot_redraws_a_results_file(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--seeds", "1", "--optimizers", "sgd"] + TINY
    train.main(args + ["--out", str(out)])
    (out / "curves.png").unlink()
    assert train.main(["--replot", str(out / "results.json")]) is None
    _check_png(out / "curves.png")
    with pytest.raises(SystemExit, match="not a results file"):
        train.main(["--replot", str(tmp_path / "missing.json")])


def test_sweep_says_when_the_best_rate_is_at_an_edge():
    def row(lr, base, gc):
        return {
            "learning_rate": lr,
            "test_acc": {"baseline_mean": base, "gc_mean": gc},
        }

    sweep = {"sgd": [row(0.1, 0.80, 0.85), row(0.2, 0.90, 0.84), row(0.4, 0.85, 0.80)]}
    assert train.sweep_brackets(sweep) == {
        "sgd baseline": {"best_learning_rate": 0.2, "bracketed": True},
        "sgd gc": {"best_learning_rate": 0.1, "bracketed": False},
    }
    assert train.sweep_brackets({"sgd": sweep["sgd"][:1]}) == {}


@pytest.mark.parametrize("norm", ["group", "none"])
def test_other_norms_train_and_are_recorded(tmp_path, norm):
    out = tmp_path / norm
    args = ["--seeds", "1", "--optimizers", "adam-grad", "--norm", norm] + TINY
    results = train.main(args + ["--out", str(out)])
    assert results["config"]["norm"] == norm
    _check_outputs(out, n_runs=2, epochs=1)


def test_sweep_figure_leaves_out_a_diverged_rate(tmp_path):
    def row(lr, loss):
        stats = {"baseline_mean": loss, "baseline_std": None, "gc_mean": 0.1}
        stats |= {"gc_std": None, "diff_mean": 0.0, "diff_se": None}
        acc = dict(stats, baseline_mean=0.1 if loss is None else 0.8, gc_mean=0.85)
        return {"learning_rate": lr, "train_loss": stats, "test_acc": acc}

    sweep = {"sgd": [row(0.1, 0.3), row(0.2, 0.2), row(0.4, None)]}
    assert train._diverged(sweep["sgd"][2], "baseline")
    assert not train._diverged(sweep["sgd"][2], "gc")
    train.plot_sweep(sweep, tmp_path / "s.png", "t")
    _check_png(tmp_path / "s.png")
