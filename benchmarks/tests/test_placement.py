"""benchmarks.placement: paired placement differences read from results files."""

import json

import pytest

from benchmarks import placement


def _run(arm, seed, test_acc, train_loss, lr=None):
    run = {"arm": arm, "seed": seed, "history": [{"test_acc": 0.0, "train_loss": 9.0}]}
    run["history"].append({"test_acc": test_acc, "train_loss": train_loss})
    if lr is not None:
        run["learning_rate"] = lr
    return run


CONFIG = {"dataset": "fashion-mnist-10k", "norm": "group", "batch_size": 16}


def _image_results(lr=None):
    # Per seed (0, 1): baseline 0.80/0.82, GC on the gradient 0.81/0.85, GC on
    # the update 0.79/0.82, so gradient - update is +2 and +3 points.
    runs = []
    for seed, (base, grad, update) in enumerate(
        ((0.80, 0.81, 0.79), (0.82, 0.85, 0.82))
    ):
        runs += [
            _run("adam", seed, base, 0.30, lr),
            _run("adam-grad+gc", seed, grad, 0.20, lr),
            _run("adam-update+gc", seed, update, 0.25, lr),
            _run("sgd", seed, 0.5, 1.0, None if lr is None else 10 * lr),
        ]
    return {"config": CONFIG, "runs": runs}


def test_differences_are_paired_by_seed():
    rows = placement.rows_of(_image_results())
    acc, loss = rows
    assert acc["setting"] == "fashion-mnist-10k, group norm, batch 16"
    assert acc["gradient - baseline"]["diff_mean"] == pytest.approx(2.0)
    assert acc["update - baseline"]["diff_mean"] == pytest.approx(-0.5)
    assert acc["gradient - update"]["diff_mean"] == pytest.approx(2.5)
    assert acc["gradient - update"]["diff_se"] == pytest.approx(0.5)
    assert loss["gradient - update"]["diff_mean"] == pytest.approx(-0.05)
    assert "| +2.50 ± 0.50 |" in placement.format_rows(rows)


def test_a_sweep_gives_a_row_per_rate(tmp_path):
    sweep = _image_results(lr=1e-3)
    sweep["runs"] += _image_results(lr=2e-3)["runs"]
    sweep["sweep"] = {}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    rows = placement.main([str(path)])
    assert [r["setting"].split(", lr ")[1] for r in rows] == ["0.001"] * 2 + [
        "0.002"
    ] * 2


def test_files_without_the_three_arms_are_refused(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": CONFIG, "runs": [_run("sgd", 0, 0.5, 1.0)]}))
    with pytest.raises(SystemExit, match="no run with a baseline"):
        placement.main([str(path)])
    with pytest.raises(SystemExit, match="not a results file"):
        placement.main([str(tmp_path / "missing.json")])
    unpaired = _image_results()
    unpaired["runs"] = [
        r for r in unpaired["runs"] if (r["arm"], r["seed"]) != ("adam", 1)
    ]
    path.write_text(json.dumps(unpaired))
    with pytest.raises(SystemExit, match="no run of adam with seed 1"):
        placement.main([str(path)])


def test_the_recorded_runs_are_all_readable():
    rows = placement.main([])
    settings = {r["setting"] for r in rows}
    assert len(rows) >= 2 * len(placement.DEFAULT_FILES)
    assert any(s.startswith("LM ") for s in settings)
