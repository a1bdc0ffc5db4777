"""benchmarks.inference runs end to end on a tiny model (no timing asserted)."""

import json

from benchmarks import inference


def test_inference_script_tiny(tmp_path, capsys):
    results = inference.main(["--tiny", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "target <= 2x" in printed and "GC touches" in printed
    data = json.loads((tmp_path / "inference-tiny.json").read_text())
    (result,) = data["results"].values()
    assert result == results["gpt2-tiny"]
    assert result["leaves"] == 4 + 16 * 2
    assert len(result["ratios"]) == 2 and all(r > 0 for r in result["ratios"])
