"""benchmarks.overhead runs end to end on tiny trees (no timing asserted)."""

import json

from benchmarks import overhead


def test_overhead_script_tiny(tmp_path, capsys):
    results = overhead.main(["--tiny", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "copy (roofline proxy)" in printed and "trace + compile" in printed
    assert "## Targets" in printed
    data = json.loads((tmp_path / "overhead-cpu-tiny.json").read_text())
    # transforms, adam, adamw, lion, update alone, train step, compile, compile of
    # a step, adafactor memory
    assert data["versions"]["optax_gc"] and len(data["tables"]) == len(results) == 9
    for table in data["tables"]:
        assert all(seconds > 0 and ratio > 0 for _, seconds, ratio in table["rows"])
    for table, base in zip(data["tables"][1:4], ("adam", "adamw", "lion"), strict=True):
        memory = table["memory"]
        states = {m["opt_state_bytes"] for m in memory.values()}
        assert len(memory) == 4 and len(states) == 1, base
    # Every target of the issue, each with its measured ratio.
    whats = [t["ratio"] for t in data["targets"]]
    # one tree: 2 + 1 + 3 + 1, train step 2, compile 3, adafactor 1
    assert len(whats) == 13
    assert any("with_gc(lion)" in w for w in whats)
    assert sum("compile, with_gc(adam)" in w for w in whats) == 3
    assert any("@ accelerator" in w for w in whats)
    assert any("with_gc(adafactor) [update] temp" in w for w in whats)
    assert any("temp - adam's" in w for w in whats)
    for t in data["targets"]:
        assert t["met"] == (t["measured"] <= t["target"])


def test_targets_reads_each_table():
    rows = [("a", 2.0, 2.0), ("b", 1.0, 1.0)]
    res = {"kind": "update_only", "tree": "T: x", "rows": []}
    res["rows"] = [
        ("optax.adam", 1.0, 1.0),
        ("chain(centralize(), adam) [gradient]", 1.2, 1.2),
    ]
    ((what, value, target),) = overhead.targets([res])
    assert value == 1.2 and target == 1.05 and what.startswith("T:")
    assert "**no**" in overhead.fmt_targets([(what, value, target)])
    assert "| yes |" in overhead.fmt_targets(rows[1:])


def test_small_kernels_tree():
    assert len(overhead.small_kernels_shapes()) == 1000


def test_targets_are_data_a_tag_matches_every_tagged_row():
    res = {
        "kind": "optimizer",
        "tree": "T: x",
        "baseline": "optax.lion",
        "rows": [
            ("optax.lion", 2.0, 1.0),
            ("a [update]", 3.0, 1.5),
            ("b [update]", 2.2, 1.1),
            ("c [update, plain]", 9.0, 4.5),
        ],
    }
    table = (overhead.Target("optimizer", "[update]", None, 1.2, "{tree}: {row}"),)
    assert overhead.targets([res], table) == [
        ("T: a [update]", 1.5, 1.2),
        ("T: b [update]", 1.1, 1.2),
    ]
    # A target limited to Adam's tables reads nothing from Lion's.
    only_adam = (table[0]._replace(baselines=("optax.adam",)),)
    assert overhead.targets([res], only_adam) == []


def test_compile_table_forces_the_accelerator_formulation():
    res = overhead.table_compile_step("tiny", overhead.tiny_shapes(), 1)
    names = [name for name, _, _ in res["rows"]]
    assert len(names) == 6 and sum(n.endswith(overhead.ACCELERATOR) for n in names) == 3
    assert set(res["cpu_seconds"]) == set(names)
    text = overhead.fmt_compile(res)
    assert "x chain" in text and "@ accelerator" in text


def test_traced_for_patches_the_platform_guess_and_restores_it():
    from benchmarks import harness
    from optax_gc import _transform

    before = _transform.lowering_platform()
    with harness.traced_for("gpu"):
        assert _transform.lowering_platform() == "gpu" and not _transform.for_cpu()
    assert _transform.lowering_platform() == before
