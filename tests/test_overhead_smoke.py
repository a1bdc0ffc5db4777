"""benchmarks/overhead.py runs end to end on tiny trees (no timing asserted)."""

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_overhead_script_tiny(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "overhead", ROOT / "benchmarks" / "overhead.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead"] = module
    spec.loader.exec_module(module)
    results = module.main(["--tiny", "--experiments", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "copy (roofline proxy)" in printed and "trace + compile" in printed
    data = json.loads((tmp_path / "overhead-cpu-tiny.json").read_text())
    assert data["versions"]["optax_gc"] and len(data["tables"]) == len(results) == 4
    for table in data["tables"]:
        assert all(seconds > 0 and ratio > 0 for _, seconds, ratio in table["rows"])
    adam = data["tables"][1]["memory"]
    assert (
        adam["with_gc(adam, 'update')"]["opt_state_bytes"]
        == (adam["optax.adam"]["opt_state_bytes"])
    )


def test_real_tree_shapes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import overhead

    resnet = overhead.resnet50_shapes()
    assert len(resnet) == 161
    assert abs(sum(_size(s) for s in resnet.values()) - 25.557e6) < 0.01e6
    gpt2 = overhead.gpt2_small_shapes()
    assert abs(sum(_size(s) for s in gpt2.values()) - 124.4e6) < 0.1e6
    assert len(overhead.small_kernels_shapes()) == 1000


def _size(shape):
    n = 1
    for d in shape:
        n *= d
    return n
