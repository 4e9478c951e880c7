"""evaluate.py: the simulated correction against its definition, the bucket selection by hand,
the trend over k_chunk, --check on corrupted artifacts, and bad inputs."""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from common.simulate.decdec_sim import SimulatedLinear, bucket_edges, select_buckets, select_channels
from tests.helpers import assert_input_error, run_script


@pytest.fixture(scope="module")
def artifacts(llama_pair, tmp_path_factory, corpus) -> tuple[Path, Path, Path, Path]:
    original, quantized = llama_pair
    folder = tmp_path_factory.mktemp("artifacts")
    data = folder / "text.txt"
    data.write_text("\n\n".join(corpus))
    for script, args in (("cheatsheet.py", ["--original_model", original, "--quantized_model", quantized]),
                         ("thresholds.py", ["--model_path", original, "--dataset", data, "--seq_len", 64,
                                            "--num_examples", 16])):
        result = run_script(script, *args, "--save_path", folder, "--quiet")
        assert result.returncode == 0, result.stderr[-2000:]
    return original, quantized, folder, data


def test_full_exact_correction_equals_corrected_weight_and_zero_equals_fakequant():
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(1124, 16, bias=True).double()
    residual = torch.randn(16, 1124, generator=generator, dtype=torch.float64) * 0.01
    simulated = SimulatedLinear(linear, residual, torch.linspace(5, 0, 1124))
    x = torch.randn(3, 7, 1124, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        simulated.k_chunk, simulated.selection = 1024, "exact"
        full = simulated(x)
        want = x @ (linear.weight + residual).t() + linear.bias
        assert torch.allclose(full, want, atol=1e-12)
        simulated.k_chunk = 0
        assert torch.equal(simulated(x), linear(x))


def test_bucket_selection_by_hand():
    # thresholds: a = 10, and with k_chunk = 512 on 8 channels k = 4, b = thresholds[3] = 4.
    thresholds = torch.tensor([10.0, 8, 6, 4, 2, 1, 0.5, 0.25])
    edges = bucket_edges(thresholds, 4)
    assert edges[0] == 10 and edges[15] == 4 and edges[16] == 3.75 and edges[31] == 0
    assert torch.all(edges[1:] <= edges[:-1])
    # |x| = 11 -> bucket 0; 9 -> 3; 5 -> 13; 4.5 -> 14; 3 -> 19; 0.1 and 0 -> 31
    x = torch.tensor([[0.1, 9.0, 5.0, 4.5, 11.0, 3.0, 4.2, 0.0]])
    assert select_channels(x, thresholds, 512, "buckets").tolist() == [[False, True, True, True, True,
                                                                         False, False, False]]
    # a partly taken last bucket: channel 2 in bucket 0, channels 1, 5, 6 all in bucket 3 (|x| in [8.8, 9.2)).
    # Quota 3 takes bucket 0, then 2 of bucket 3 in the kernel's scan order (j - 3) mod 8: 5, 6, then 1.
    x = torch.tensor([[0.0, 9.0, 12.0, 0.0, 0.0, 9.0, 9.1, 0.0]])
    assert select_buckets(x, edges, 3).nonzero()[:, 1].tolist() == [2, 5, 6]
    # exact top-k would rather take the largest: 2, 6 and then 1 or 5 by |x|
    assert select_channels(x, thresholds, 384, "exact").nonzero()[:, 1].tolist() == [1, 2, 6] or \
        select_channels(x, thresholds, 384, "exact").nonzero()[:, 1].tolist() == [2, 5, 6]


def test_per_chunk_quota_with_a_short_last_chunk():
    in_features = 1024 + 100
    thresholds = torch.linspace(8, 0.1, in_features)
    x = torch.rand(5, in_features, generator=torch.Generator().manual_seed(3)) * 8
    for selection in ("buckets", "exact", "random"):
        mask = select_channels(x, thresholds, 64, selection, torch.Generator().manual_seed(0))
        assert (mask[:, :1024].sum(1) == 64).all(), selection
        assert (mask[:, 1024:].sum(1) == (64 * 100) // 1024).all(), selection  # floor(6.25) = 6
    assert not select_channels(x, thresholds, 0, "buckets").any()


def test_bucket_selection_never_beats_exact_top_k():
    x = torch.randn(64, 2048, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3, 2048)
    thresholds = x.abs().sort(dim=1, descending=True).values.amax(0)
    for k_chunk in (8, 32, 128):
        bucket = select_channels(x, thresholds, k_chunk, "buckets")
        exact = select_channels(x, thresholds, k_chunk, "exact")
        assert (bucket.sum(1) == exact.sum(1)).all()
        captured_bucket = (x.abs() * bucket).sum(1)
        captured_exact = (x.abs() * exact).sum(1)
        assert (captured_bucket <= captured_exact + 1e-4).all()
        assert captured_bucket.sum() > 0.8 * captured_exact.sum()


# CI simulates on the CPU in float32; DECDEC_TEST_DEVICE=cuda runs the same checks on a GPU (float16)
DEVICE = os.environ.get("DECDEC_TEST_DEVICE", "cpu")


def run_evaluate(quantized, folder, *extra):
    return run_script("evaluate.py", "--quantized_model", quantized, "--artifacts", folder, "--quiet",
                      "--device", DEVICE, *extra)


def test_trend_over_k_chunk_and_outputs(artifacts, tmp_path):
    original, quantized, folder, data = artifacts
    reports = {}
    for selection in ("buckets", "exact"):
        result = run_evaluate(quantized, folder, "--original_model", original, "--dataset", data, "--seq_len", 128,
                              "--max_chunks", 6, "--k_chunks", 0, 32, 128, 512, 1024, "--selection", selection,
                              "--output", tmp_path / f"{selection}.json", "--plot", tmp_path / f"{selection}.png")
        assert result.returncode == 0, result.stderr[-2000:]
        assert "fake-quantized" in result.stdout and "DecDEC k_chunk=128" in result.stdout
        reports[selection] = json.loads((tmp_path / f"{selection}.json").read_text())
        assert (tmp_path / f"{selection}.png").read_bytes()[:4] == b"\x89PNG"
    report = reports["buckets"]
    assert {"ppl"} <= set(report["original"]) and {"ppl", "kl"} <= set(report["fakequant"])
    kls = [entry["kl"] for entry in report["decdec"]]
    assert [e["k_chunk"] for e in report["decdec"]] == [0, 32, 128, 512, 1024]
    assert kls[0] == report["fakequant"]["kl"] > 0
    assert all(later < earlier for earlier, later in zip(kls, kls[1:])), kls
    assert kls[-1] < 0.2 * kls[0]
    for bucket, exact in zip(report["decdec"][1:], reports["exact"]["decdec"][1:]):
        assert exact["kl"] <= bucket["kl"] * 1.05, (bucket, exact)
        assert bucket["kl"] <= exact["kl"] * 3 + 1e-3, (bucket, exact)


def corrupt(folder: Path, target: Path, change) -> Path:
    shutil.copytree(folder, target)
    sheet = torch.load(target / "cheatsheet.pt", weights_only=True)
    thresholds = torch.load(target / "thresholds.pt", weights_only=True)
    sheet, thresholds = change(sheet, thresholds)
    torch.save(sheet, target / "cheatsheet.pt")
    torch.save(thresholds, target / "thresholds.pt")
    return target


def test_check_catches_corrupted_artifacts(artifacts, tmp_path):
    original, quantized, folder, _ = artifacts
    result = run_evaluate(quantized, folder, "--check", "--original_model", original)
    assert result.returncode == 0 and f"fit {quantized} (2 layers" in result.stderr, result.stderr
    assert "relative error" in result.stderr and "warning" not in result.stderr

    def unfused(sheet, thresholds):  # what the reference's cheatsheet.py writes without --add_fused
        return [{m: e for m, e in layer.items() if m not in ("self_attn.qkv_proj", "mlp.gate_up_proj")}
                for layer in sheet], thresholds
    result = run_evaluate(quantized, corrupt(folder, tmp_path / "unfused", unfused), "--check")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "no fused self_attn.qkv_proj / mlp.gate_up_proj entries in 2 of 2" in warnings[0]
    assert "without --original_model the cheatsheet is not checked" in warnings[1]

    def break_three(sheet, thresholds):
        sheet[0]["mlp.up_proj"]["cheatsheet"] = sheet[0]["mlp.up_proj"]["cheatsheet"][:, :-1].contiguous()
        sheet[1]["self_attn.o_proj"]["reordered_scales"][4] = float("nan")
        return sheet, thresholds[:1]
    broken = corrupt(folder, tmp_path / "broken", break_three)
    result = run_evaluate(quantized, broken, "--check")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "thresholds.pt: 1 layers, the model has 2" in result.stderr
    assert "layer 0 mlp.up_proj: 'cheatsheet' should be int32 [64, 16], is int32 [64, 15]" in result.stderr
    assert "layer 1 self_attn.o_proj: scales hold NaN" in result.stderr

    def unsorted(sheet, thresholds):
        thresholds[1]["mlp.down_proj"][5] = 1e3
        return sheet, thresholds
    result = run_evaluate(quantized, corrupt(folder, tmp_path / "unsorted", unsorted), "--check")
    assert result.returncode == 2 and "layer 1 mlp.down_proj: not non-increasing" in result.stderr


def test_bad_inputs(artifacts, phi3_pair, tmp_path):
    original, quantized, folder, data = artifacts
    _, phi3_fq = phi3_pair
    result = run_evaluate(phi3_fq, folder, "--check")
    assert result.returncode == 2 and "self_attn.qkv_proj: missing" in result.stderr
    assert_input_error(run_evaluate(quantized, folder, "--k_chunks", 2000), "--k_chunks 2000")
    assert_input_error(run_evaluate(quantized, folder, "--k_chunks", -1), "--k_chunks -1")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_input_error(run_evaluate(quantized, empty), "cheatsheet.pt", "missing")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert_input_error(run_evaluate(quantized, folder, "--dataset", short, "--seq_len", 512),
                       "fewer than one window")
    empty_text = tmp_path / "empty.txt"
    empty_text.write_text("")
    result = run_evaluate(quantized, folder, "--original_model", original, "--dataset", empty_text, "--seq_len", 64)
    assert_input_error(result, str(empty_text))
    assert "residual:" not in result.stderr  # the dataset is checked before the slow residual check


def test_outputs_follow_the_rules_of_every_script(artifacts, tmp_path):
    original, quantized, folder, data = artifacts
    existing = tmp_path / "results.json"
    existing.write_text("earlier results")
    plot = tmp_path / "ppl.png"
    args = ["--original_model", original, "--dataset", data, "--seq_len", 64, "--max_chunks", 2, "--k_chunks", 0, 16]
    assert_input_error(run_evaluate(quantized, folder, *args, "--output", existing), "results.json",
                       "--overwrite")
    assert existing.read_text() == "earlier results"
    assert_input_error(run_evaluate(quantized, folder, *args, "--output", folder / "cheatsheet.pt", "--overwrite"),
                       "is the input --artifacts")
    assert_input_error(run_evaluate(quantized, folder, "--seq_len", 4096), "--seq_len 4096",
                       "longer than the model's context")
    result = run_evaluate(quantized, folder, *args, "--output", existing, "--plot", plot, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(existing.read_text())["decdec"][1]["k_chunk"] == 16
    assert "wrote" in result.stderr and str(existing) in result.stderr and str(plot) in result.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries, no locks
    check = tmp_path / "check.json"
    result = run_evaluate(quantized, folder, "--original_model", original, "--check", "--output", check)
    assert result.returncode == 0, result.stderr[-2000:]
    findings = json.loads(check.read_text())
    assert findings["problems"] == [] and findings["layers"] == 2
    assert 0 < findings["residual_relative_error"]["max"] < 0.5


def test_gap_closed_is_not_applicable_when_quantization_did_not_hurt(artifacts, capsys):
    from evaluate import build_report, print_table
    scores = {"original": {"ppl": 10.0, "kl": 0.0}, "fakequant": {"ppl": 9.9, "kl": 0.01},
              "decdec k_chunk=16": {"ppl": 9.95, "kl": 0.005}}
    args = argparse.Namespace(quantized_model="q", original_model="o", dataset="d", seq_len=8, selection="buckets",
                              k_chunks=[0, 16])
    report = build_report(scores, [], args, torch.zeros(3, 8))
    assert report["decdec"][1]["gap_closed"] is None
    print_table(report)
    assert "n/a" in capsys.readouterr().out
    scores["fakequant"]["ppl"] = 12.0
    assert build_report(scores, [], args, torch.zeros(3, 8))["decdec"][1]["gap_closed"] == pytest.approx(1.025)


def test_every_layout_the_one_pass_accepts_simulates(tokenizer, corpus, tmp_path):
    """OPT (biases everywhere, `model.decoder.layers`, a final norm named final_layer_norm): decdec_setup.py
    writes its folder, and evaluate.py simulates it, where it once stopped at "cannot find the final norm".
    The full correction brings the fake-quantized model back to the original's predictions."""
    from common.tiny_models import build_model
    original = tmp_path / "opt"
    build_model("opt", original, tokenizer)
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(corpus))
    one_pass = run_script("decdec_setup.py", "--model", original, "--output", tmp_path / "folder", "--method", "rtn",
                          "--q_group_size", 32, "--dataset", data, "--seq_len", 64, "--num_examples", 8,
                          "--sampling", "concat", "--device", DEVICE, "--quiet")
    assert one_pass.returncode == 0, one_pass.stderr[-2000:]
    result = run_evaluate(tmp_path / "folder", tmp_path / "folder", "--original_model", original, "--dataset", data,
                          "--seq_len", 64, "--max_chunks", 4, "--k_chunks", 0, 1024, "--selection", "exact",
                          "--output", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["decdec"][-1]["kl"] < 0.05 * report["fakequant"]["kl"], report


def peak_rss_mib(script: str, *args) -> tuple[int, float]:
    """(exit status, peak RSS in MiB) of one script run in its own process."""
    import os
    import subprocess
    import sys
    from tests.helpers import ROOT
    child = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss / 1024


def test_a_one_pass_folder_is_checked_in_a_layers_memory(tokenizer, corpus, tmp_path):
    """evaluate.py given decdec_setup.py's folder decodes its LUT-GEMM weights a Linear at a time, a few
    input words per step, from fresh buffers (no page of pytorch_model.bin stays mapped): its peak memory
    is within 1.2x of the same check given the fake-quantized model (it was ~1.5x here when a whole
    Linear's bit planes were expanded at once)."""
    from common.tiny_models import build_model
    original = tmp_path / "original"
    build_model("llama", original, tokenizer, hidden_size=1024, intermediate_size=4096, num_heads=8)
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(corpus))
    one_pass = run_script("decdec_setup.py", "--model", original, "--output", tmp_path / "folder", "--method", "rtn",
                          "--q_group_size", 128, "--dataset", data, "--seq_len", 64, "--num_examples", 4,
                          "--sampling", "concat", "--fakequant_output", tmp_path / "fq", "--device", "cpu", "--quiet")
    assert one_pass.returncode == 0, one_pass.stderr[-2000:]
    check = ["--original_model", original, "--artifacts", tmp_path / "folder", "--check", "--device", "cpu"]
    code_fq, fq = peak_rss_mib("evaluate.py", "--quantized_model", tmp_path / "fq", *check)
    code_folder, folder = peak_rss_mib("evaluate.py", "--quantized_model", tmp_path / "folder", *check)
    assert code_fq == 0 and code_folder == 0
    assert folder <= 1.2 * fq, (folder, fq)
