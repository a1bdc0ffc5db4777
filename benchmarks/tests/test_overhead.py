"""benchmarks.overhead runs end to end on tiny trees (no timing asserted)."""

import json

from benchmarks import overhead


def test_overhead_script_tiny(tmp_path, capsys):
    results = overhead.main(["--tiny", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "copy (roofline proxy)" in printed and "trace + compile" in printed
    data = json.loads((tmp_path / "overhead-cpu-tiny.json").read_text())
    assert data["versions"]["optax_gc"] and len(data["tables"]) == len(results) == 4
    for table in data["tables"]:
        assert all(seconds > 0 and ratio > 0 for _, seconds, ratio in table["rows"])
    adam = data["tables"][1]["memory"]
    assert (
        adam["with_gc(adam, 'update')"]["opt_state_bytes"]
        == adam["optax.adam"]["opt_state_bytes"]
    )


def test_small_kernels_tree():
    assert len(overhead.small_kernels_shapes()) == 1000
