"""benchmarks.train end to end on tiny settings (the README's main job)."""

import gzip
import json
import pathlib

import numpy as np
import pytest

from benchmarks import train

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
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    return results


def test_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["--seeds", "2", "--optimizers", "sgd,adam-update", "--out", str(out)]
    results = train.main(args + TINY)
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
    # GC and baseline really differ; seeds really differ.
    final = {
        (r["arm"], r["seed"]): r["history"][-1]["train_loss"] for r in results["runs"]
    }
    assert final[("sgd", 0)] != final[("sgd+gc", 0)]
    assert final[("sgd", 0)] != final[("sgd", 1)]


def test_same_seed_same_numbers(tmp_path):
    args = ["--seeds", "1", "--optimizers", "adam-grad"] + TINY
    a = train.main(args + ["--out", str(tmp_path / "a")])
    b = train.main(args + ["--out", str(tmp_path / "b")])
    assert [r["history"] for r in a["runs"]] == [r["history"] for r in b["runs"]]


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    arrays = {
        "x_train": rng.integers(0, 256, (80, 28, 28)),
        "y_train": rng.integers(0, 10, 80),
        "x_test": rng.integers(0, 256, (20, 28, 28)),
        "y_test": rng.integers(0, 10, 20),
    }
    for key, name in train.FASHION_FILES.items():
        _write_idx(data / name, arrays[key])
    np.testing.assert_array_equal(
        train.read_idx(data / train.FASHION_FILES["x_test"]), arrays["x_test"]
    )
    out = tmp_path / "out"
    train.main(
        [
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(data),
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--optimizers",
            "sgd",
            "--train-subset",
            "64",
            "--batch-size",
            "32",
            "--out",
            str(out),
        ]
    )
    results = _check_outputs(out, n_runs=2, epochs=2)
    assert results["config"]["split"] == {"train": 64, "test": 20}


def test_missing_fashion_mnist_names_package_and_flag(tmp_path):
    with pytest.raises(SystemExit) as info:
        train.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path)])
    message = str(info.value)
    assert "dataset-fashion-mnist" in message and "--data-dir" in message


@pytest.mark.parametrize(
    "bad", [["--optimizers", "rmsprop"], ["--epochs", "0"], ["--seeds", "0"]]
)
def test_bad_options_exit_with_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as info:
        train.parse_args(bad)
    assert info.value.code == 2
    assert bad[0] in capsys.readouterr().err
