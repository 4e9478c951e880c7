"""demo.py end to end on its smallest setting."""
from __future__ import annotations

import json
import re

from tests.helpers import assert_input_error, run_script


def test_demo_runs_offline_and_decdec_helps(tmp_path):
    out = tmp_path / "demo"
    result = run_script("demo.py", "--quick", "--output", out, "--quiet", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    for path in ("decdec/cheatsheet.pt", "decdec/thresholds.pt", "decdec/pytorch_model.bin", "decdec/config.json",
                 "original/config.json", "results.json", "perplexity.png"):
        assert (out / path).is_file(), path
    assert "fake-quantized" in result.stdout and "python decdec_setup.py" in result.stdout
    # the steps' report lines name the final paths (the run's temporary folder is gone), and the one pass
    # reports its own time, not the demo's training before it
    assert f"  {out / 'decdec'}\n" in result.stderr and ".tmp" not in result.stderr, result.stderr
    one_pass = re.search(r"layers, rtn, on cpu in ([\d.]+) s \(start-up ([\d.]+) s", result.stderr)
    step = re.search(r"\(3-bit round-to-nearest [^:]*: ([\d.]+) s\)", result.stderr)
    train = re.search(r"\(build and train [^:]*: ([\d.]+) s\)", result.stderr)
    assert float(one_pass.group(2)) < float(one_pass.group(1)) <= float(step.group(1)) + 0.1, result.stderr
    assert float(train.group(1)) > 0
    assert "stage totals over the 4 layers:" in result.stderr
    check = run_script("evaluate.py", "--quantized_model", out / "decdec", "--original_model", out / "original",
                       "--check")
    assert check.returncode == 0, check.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    largest = max(report["decdec"], key=lambda e: e["k_chunk"])
    assert largest["ppl"] < report["fakequant"]["ppl"]
    assert largest["kl"] < report["fakequant"]["kl"]
    again = run_script("demo.py", "--quick", "--output", out, "--quiet")
    assert_input_error(again, "demo", "--overwrite")


def test_demo_on_a_given_model_picks_a_group_size_that_fits(llama_pair, corpus, tmp_path):
    original, _ = llama_pair  # hidden size 64: group 128 does not fit, 64 does
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(corpus))
    result = run_script("demo.py", "--model", original, "--dataset", data, "--quick", "--output", tmp_path / "d",
                        "--quiet", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "group 64" in result.stderr
    report = json.loads((tmp_path / "d" / "results.json").read_text())
    assert report["decdec"][-1]["kl"] < report["fakequant"]["kl"]
