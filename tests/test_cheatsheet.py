"""cheatsheet.py end to end: the decoded artifact against the exact residual, every layout we
read, the side outputs, --add_fused, resuming, and every bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.io.parts import PartStore
from common.quant.cheatsheet_build import PARTS_DIR, CheatsheetOptions, PairedModels, build_cheatsheet
from common.io.model_files import Checkpoint, all_finite
from common.quant.residual import decode_cheatsheet
from common.tiny_models import build_model
from tests.helpers import assert_input_error, rtn_fake_quantize, run_script
from tests.test_residual import reference_row


def all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def layer_linears(tensors: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}."
    return {name[len(prefix):-len(".weight")]: t for name, t in tensors.items()
            if name.startswith(prefix) and name.endswith(".weight") and t.ndim == 2}


def run_cheatsheet(original: Path, quantized: Path, save: Path, *extra: str) -> list:
    result = run_script("cheatsheet.py", "--original_model", original, "--quantized_model", quantized,
                        "--save_path", save, "--quiet", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(save / "cheatsheet.pt", weights_only=True)


def test_decoded_cheatsheet_matches_reference_for_every_family(model_pair, tmp_path):
    family, original, quantized = model_pair
    sheet = run_cheatsheet(original, quantized, tmp_path / "out")
    orig, fq = all_tensors(original), all_tensors(quantized)
    assert isinstance(sheet, list) and len(sheet) == 2
    for layer, entry in enumerate(sheet):
        modules_o, modules_q = layer_linears(orig, layer), layer_linears(fq, layer)
        # fused entries by default: DecDEC's end-to-end loaders read qkv_proj / gate_up_proj
        assert set(entry) == set(modules_o) | {"self_attn.qkv_proj", "mlp.gate_up_proj"}
        for module, fields in ((m, f) for m, f in entry.items() if m in modules_o):
            out_features, in_features = modules_o[module].shape
            assert fields["cheatsheet"].dtype == torch.int32 and fields["cheatsheet"].is_contiguous()
            assert fields["cheatsheet"].shape == (in_features, out_features // 8)
            assert fields["reordered_scales"].dtype == torch.float16
            assert fields["reordered_scales"].shape == (out_features,)
            residual = modules_o[module] - modules_q[module]
            decoded = decode_cheatsheet(fields["cheatsheet"], fields["reordered_scales"])
            assert torch.isfinite(decoded).all()
            for r in range(0, out_features, 7):  # rows against the reference's own loop
                scale, codes, _ = reference_row(residual[r], 32, 7)
                assert torch.equal(decoded[r], codes.float() * scale.float()), (module, r)
            relative = (decoded - residual.float()).norm() / residual.float().norm()
            assert relative < 0.2, (module, relative)


def test_side_outputs_and_fused_entries(llama_pair, tmp_path):
    original, quantized = llama_pair
    save = tmp_path / "out"
    sheet = run_cheatsheet(original, quantized, save, "--save_extra_bit_widths", "--save_exact_residuals")
    orig, fq = all_tensors(original), all_tensors(quantized)
    plain = run_cheatsheet(original, quantized, tmp_path / "plain", "--no_fused")  # the reference's layout
    for layer in range(2):
        assert set(plain[layer]) == set(layer_linears(orig, layer))
        assert all(torch.equal(plain[layer][m][f], sheet[layer][m][f]) for m in plain[layer]
                   for f in ("cheatsheet", "reordered_scales"))
    exact = torch.load(save / "exact_residuals.pt", weights_only=True)
    two = torch.load(save / "quantized_residuals_2bit.pt", weights_only=True)
    eight = torch.load(save / "quantized_residuals_8bit.pt", weights_only=True)
    for layer in range(2):
        for module, weight in layer_linears(orig, layer).items():
            residual = weight - layer_linears(fq, layer)[module]
            assert exact[layer][module].dtype == torch.float16
            assert torch.equal(exact[layer][module], residual)
            for stored, bits in ((two, 2), (eight, 8)):
                levels = (2 ** bits - 1) // 2
                for r in range(0, residual.shape[0], 9):
                    scale, codes, _ = reference_row(residual[r], 32, levels)
                    assert torch.equal(stored[layer][module][r], (codes.float() * scale.float()).half())
        entry = sheet[layer]
        for fused, members in (("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                               ("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"])):
            decoded = decode_cheatsheet(entry[fused]["cheatsheet"], entry[fused]["reordered_scales"])
            parts = [decode_cheatsheet(entry[m]["cheatsheet"], entry[m]["reordered_scales"]) for m in members]
            assert torch.equal(decoded, torch.cat(parts))
    assert not (save / PARTS_DIR).exists()


def test_checkpoint_layouts_give_the_same_bytes(llama_pair, tmp_path, tokenizer):
    original, quantized = llama_pair
    baseline = run_cheatsheet(original, quantized, tmp_path / "base")

    sharded = tmp_path / "sharded"
    build_model("llama", sharded, tokenizer, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert torch.equal(all_tensors(sharded)["model.layers.1.mlp.up_proj.weight"],
                       all_tensors(original)["model.layers.1.mlp.up_proj.weight"])
    sheet = run_cheatsheet(sharded, quantized, tmp_path / "s")
    assert_same_sheets(sheet, baseline)

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(original / "config.json", binary / "config.json")
    torch.save(all_tensors(original), binary / "pytorch_model.bin")
    assert_same_sheets(run_cheatsheet(binary, quantized, tmp_path / "b"), baseline)

    hf_home = tmp_path / "hf"
    snapshot = hf_home / "hub" / "models--tiny--llama" / "snapshots" / "0123abcd"
    shutil.copytree(original, snapshot)
    (hf_home / "hub" / "models--tiny--llama" / "refs").mkdir(parents=True)
    (hf_home / "hub" / "models--tiny--llama" / "refs" / "main").write_text("0123abcd")
    import os
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    result = run_script("cheatsheet.py", "--original_model", "tiny/llama", "--quantized_model", quantized,
                        "--save_path", tmp_path / "hub-out", "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert_same_sheets(torch.load(tmp_path / "hub-out" / "cheatsheet.pt", weights_only=True), baseline)
    result = run_script("cheatsheet.py", "--original_model", "tiny/absent", "--quantized_model", quantized,
                        "--save_path", tmp_path / "hub-out2", env=env)
    assert_input_error(result, "tiny/absent", "cache")


def test_bf16_checkpoint_is_read_as_fp16(tmp_path, tokenizer):
    bf16 = tmp_path / "bf16"
    build_model("llama", bf16, tokenizer, dtype=torch.bfloat16, seed=4)
    fp16 = tmp_path / "fp16"
    fp16.mkdir()
    shutil.copy(bf16 / "config.json", fp16 / "config.json")
    save_file({k: v.half() for k, v in all_tensors(bf16).items()}, str(fp16 / "model.safetensors"))
    quantized = tmp_path / "fq"
    rtn_fake_quantize(fp16, quantized)
    assert_same_sheets(run_cheatsheet(bf16, quantized, tmp_path / "a"),
                       run_cheatsheet(fp16, quantized, tmp_path / "b"))


def assert_same_sheets(a: list, b: list) -> None:
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        assert set(la) == set(lb)
        for module in la:
            for key in ("cheatsheet", "reordered_scales"):
                assert torch.equal(la[module][key], lb[module][key]), (module, key)


def interrupt_after_first_part(monkeypatch) -> None:
    """Make the run stop like Ctrl-C right after layer 0's part file is written."""
    original_write = PartStore.write

    def write(self, layer, results):
        original_write(self, layer, results)
        if layer == 0:
            raise KeyboardInterrupt
    monkeypatch.setattr(PartStore, "write", write)


def plain(items, desc):
    return iter(items)


def test_interrupted_run_resumes_from_its_parts(llama_pair, tmp_path, monkeypatch):
    original, quantized = llama_pair
    expected = run_cheatsheet(original, quantized, tmp_path / "full")
    save = tmp_path / "resumed"
    save.mkdir()
    models = PairedModels(Checkpoint(original), Checkpoint(quantized))
    with monkeypatch.context() as patch:
        interrupt_after_first_part(patch)
        with pytest.raises(KeyboardInterrupt):
            build_cheatsheet(models, save, CheatsheetOptions(), torch.device("cpu"), plain)
    assert (save / PARTS_DIR / "layer-00000.safetensors").exists()
    assert not (save / PARTS_DIR / "layer-00001.safetensors").exists()
    assert not (save / "cheatsheet.pt").exists() and not list(save.glob(".cheatsheet.pt.tmp*"))
    seen = []

    def record(items, desc):
        for item in items:
            seen.append(item.index)
            yield item
    build_cheatsheet(models, save, CheatsheetOptions(), torch.device("cpu"), record)
    assert seen == [1]  # layer 0 came from its part
    assert_same_sheets(torch.load(save / "cheatsheet.pt", weights_only=True), expected)
    assert not (save / PARTS_DIR).exists()


def test_changed_options_do_not_reuse_parts(llama_pair, tmp_path, monkeypatch):
    original, quantized = llama_pair
    save = tmp_path / "out"
    save.mkdir()
    models = PairedModels(Checkpoint(original), Checkpoint(quantized))
    with monkeypatch.context() as patch:
        interrupt_after_first_part(patch)
        with pytest.raises(KeyboardInterrupt):
            build_cheatsheet(models, save, CheatsheetOptions(grid_size=16), torch.device("cpu"), plain)
    seen = []

    def record(items, desc):
        for item in items:
            seen.append(item.index)
            yield item
    build_cheatsheet(models, save, CheatsheetOptions(), torch.device("cpu"), record)
    assert seen == [0, 1]


# ---- bad input -------------------------------------------------------------------------------

def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite_tensors(model_dir: Path, change) -> None:
    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def expect_refusal(original: Path, quantized: Path, save: Path, *fragments: str) -> None:
    result = run_script("cheatsheet.py", "--original_model", original, "--quantized_model", quantized,
                        "--save_path", save)
    assert_input_error(result, *fragments)
    if save.is_dir():
        assert not (save / "cheatsheet.pt").exists() and not (save / PARTS_DIR).exists()
        assert not any(p.name.startswith(".cheatsheet.pt.tmp") for p in save.iterdir())


def test_missing_and_non_model_paths(llama_pair, tmp_path):
    original, quantized = llama_pair
    expect_refusal(tmp_path / "nowhere", quantized, tmp_path / "o1", "nowhere", "no such directory")
    # relative names that could be hub ids: never the hub client's own error (tests run with HF_HUB_OFFLINE=1)
    expect_refusal(Path("no-such-folder/llama--fq"), quantized, tmp_path / "o1",
                   "no-such-folder/llama--fq: no such directory, and not a Hugging Face hub id")
    expect_refusal(Path("no-such-org/no-such-model"), quantized, tmp_path / "o1",
                   "no-such-org/no-such-model: no such directory, and not a model in the Hugging Face cache")
    (tmp_path / "empty").mkdir()
    expect_refusal(original, tmp_path / "empty", tmp_path / "o2", "empty", "config.json")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(original / "config.json", no_weights / "config.json")
    expect_refusal(original, no_weights, tmp_path / "o3", "noweights", "no *.safetensors")


def test_mismatched_models(llama_pair, tmp_path, tokenizer):
    original, quantized = llama_pair
    deeper = tmp_path / "deeper"
    build_model("llama", deeper, tokenizer, num_layers=3)
    expect_refusal(original, deeper, tmp_path / "o1", "3 decoder layers", "has 2")
    renamed = copy_model(quantized, tmp_path / "renamed")
    rewrite_tensors(renamed, lambda t: t.__setitem__("model.layers.1.mlp.upp_proj.weight",
                                                     t.pop("model.layers.1.mlp.up_proj.weight")))
    expect_refusal(original, renamed, tmp_path / "o2", "layer 1", "mlp.up_proj")
    wider = tmp_path / "wider"
    build_model("llama", wider, tokenizer, intermediate_size=136)
    expect_refusal(original, wider, tmp_path / "o3", "has shape", "mlp.")


def test_rows_not_multiple_of_8(tmp_path, tokenizer):
    odd = tmp_path / "odd"
    build_model("llama", odd, tokenizer, intermediate_size=132)
    fq = tmp_path / "odd-fq"
    rtn_fake_quantize(odd, fq)
    expect_refusal(odd, fq, tmp_path / "o", "gate_proj", "multiple of 8")


def test_nan_in_weight(llama_pair, tmp_path):
    original, quantized = llama_pair
    broken = copy_model(quantized, tmp_path / "nan")
    rewrite_tensors(broken, lambda t: t["model.layers.1.self_attn.o_proj.weight"].__setitem__((3, 4), float("nan")))
    expect_refusal(original, broken, tmp_path / "o", "model.layers.1.self_attn.o_proj.weight", "NaN")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_finds_every_nan_and_inf(dtype):
    clean = torch.randn(37, 64).to(dtype)
    assert bool(all_finite(clean)) and bool(all_finite(torch.empty(0, 8, dtype=dtype)))
    for value in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (20, 31), (36, 63)):
            broken = clean.clone()
            broken[where] = value
            assert not bool(all_finite(broken)), (value, where)


def test_truncated_safetensors(llama_pair, tmp_path):
    original, quantized = llama_pair
    broken = copy_model(quantized, tmp_path / "cut")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    expect_refusal(original, broken, tmp_path / "o", "model.safetensors", "truncated")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    expect_refusal(original, broken, tmp_path / "o", "model.safetensors")


def test_save_path_is_a_file_and_existing_output(llama_pair, tmp_path):
    original, quantized = llama_pair
    target = tmp_path / "file"
    target.write_text("x")
    expect_refusal(original, quantized, target, "is a file")
    save = tmp_path / "out"
    save.mkdir()
    (save / "cheatsheet.pt").write_text("keep me")
    result = run_script("cheatsheet.py", "--original_model", original, "--quantized_model", quantized,
                        "--save_path", save)
    assert_input_error(result, "cheatsheet.pt", "--overwrite")
    assert (save / "cheatsheet.pt").read_text() == "keep me"
    result = run_script("cheatsheet.py", "--original_model", original, "--quantized_model", quantized,
                        "--save_path", save, "--overwrite", "--quiet")
    assert result.returncode == 0 and isinstance(torch.load(save / "cheatsheet.pt", weights_only=True), list)


def test_fused_moe_tensor_is_refused(llama_pair, tmp_path):
    original, quantized = llama_pair
    moe_o = copy_model(original, tmp_path / "moe-o")
    moe_q = copy_model(quantized, tmp_path / "moe-q")
    for model in (moe_o, moe_q):
        rewrite_tensors(model, lambda t: t.__setitem__("model.layers.0.mlp.experts.gate_up_proj",
                                                       torch.zeros(4, 64, 16, dtype=torch.float16)))
    expect_refusal(moe_o, moe_q, tmp_path / "o", "mlp.experts.gate_up_proj", "3 dimensions")
