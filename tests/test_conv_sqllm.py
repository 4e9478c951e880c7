"""conv_sqllm.py: synthetic Any-Precision/SqueezeLLM folders -> fake-quantized models; bad inputs."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.quant.sqllm import numpy_safe_globals
from tests.helpers import assert_input_error, run_script
from tests.test_cheatsheet import all_tensors, layer_linears


def make_quantized_folder(original: Path, folder: Path, bit_widths: tuple[int, ...] = (3,)) -> dict:
    """LUTs from per-row quantiles, codes = nearest entry, saved as NumPy arrays like the quantizer."""
    tensors = all_tensors(original)
    top = max(bit_widths)
    expected: dict = {b: {} for b in bit_widths}
    for layer in range(2):
        luts = {b: {} for b in bit_widths}
        codes = {}
        for module, weight in layer_linears(tensors, layer).items():
            w = weight.float()
            levels = torch.linspace(0, 1, 2 ** top)
            lut_top = torch.quantile(w, levels, dim=1).t().contiguous()  # [out, 2^top]
            code = (w[:, :, None] - lut_top[:, None, :]).abs().argmin(-1).to(torch.uint8)
            codes[module] = code.numpy()[:, None, :]
            for b in bit_widths:
                lut = lut_top[:, :: 2 ** (top - b)].contiguous()  # the entries the top-b-bit codes select
                luts[b][module] = lut.numpy()[:, None, :]
                expected[b][(layer, module)] = torch.gather(lut, 1, code.long() >> (top - b)).half()
        for b in bit_widths:
            (folder / f"lut_{b}").mkdir(parents=True, exist_ok=True)
            torch.save(luts[b], folder / f"lut_{b}" / f"l{layer}.pt")
        (folder / "weights").mkdir(parents=True, exist_ok=True)
        torch.save(codes, folder / "weights" / f"l{layer}.pt")
    return expected


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_converted_model_equals_lut_gather(family, request, tmp_path):
    original, _ = request.getfixturevalue(f"{family}_pair")
    expected = make_quantized_folder(original, tmp_path / "q")
    out = tmp_path / "fq"
    result = run_script("conv_sqllm.py", "--original_model_path", original, "--quantized_path", tmp_path / "q",
                        "--output_path", out, "--quiet", "--max_shard_size", "100KB")
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    converted, source = all_tensors(out), all_tensors(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in converted.values())
    assert set(converted) == set(source)
    for (layer, module), want in expected[3].items():
        assert torch.equal(converted[f"model.layers.{layer}.{module}.weight"], want), module
    for name, tensor in source.items():
        if not (".layers." in name and tensor.ndim == 2):
            assert torch.equal(converted[name], tensor.half()), name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and (out / "tokenizer.json").exists()
    assert (out / "generation_config.json").exists()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    result = run_script("cheatsheet.py", "--original_model", original, "--quantized_model", out,
                        "--save_path", tmp_path / "cs", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]


def test_upscaled_folder(llama_pair, tmp_path):
    original, _ = llama_pair
    expected = make_quantized_folder(original, tmp_path / "q", bit_widths=(3, 4))
    for bits in (3, 4):
        result = run_script("conv_sqllm.py", "--original_model_path", original, "--quantized_path",
                            tmp_path / "q", "--output_path", tmp_path / f"fq{bits}", "--bits", bits, "--quiet")
        assert result.returncode == 0, result.stderr[-2000:]
        converted = all_tensors(tmp_path / f"fq{bits}")
        for (layer, module), want in expected[bits].items():
            assert torch.equal(converted[f"model.layers.{layer}.{module}.weight"], want)
    assert not torch.equal(expected[3][(0, "mlp.up_proj")], expected[4][(0, "mlp.up_proj")])
    result = run_script("conv_sqllm.py", "--original_model_path", original, "--quantized_path", tmp_path / "q",
                        "--output_path", tmp_path / "x")
    assert_input_error(result, "lut_{3,4}", "--bits")


def expect_refusal(original: Path, folder: Path, out: Path, *fragments: str, extra=()) -> None:
    result = run_script("conv_sqllm.py", "--original_model_path", original, "--quantized_path", folder,
                        "--output_path", out, *extra)
    assert_input_error(result, *fragments)
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def rewrite(file: Path, change) -> None:
    with torch.serialization.safe_globals(numpy_safe_globals()):
        data = torch.load(file, weights_only=True)
    change(data)
    torch.save(data, file)


def test_bad_inputs(llama_pair, tmp_path):
    original, _ = llama_pair
    good = tmp_path / "good"
    make_quantized_folder(original, good)
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    expect_refusal(original, tmp_path / "empty", out, "no lut_<bits> folder")

    def variant(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    missing = variant("missing")
    (missing / "weights" / "l1.pt").unlink()
    expect_refusal(original, missing, out, "weights/l1.pt", "missing")
    stranger = variant("stranger")
    rewrite(stranger / "lut_3" / "l0.pt", lambda d: d.__setitem__("self_attn.rotary", d["mlp.up_proj"]))
    expect_refusal(original, stranger, out, "self_attn.rotary", "not a Linear")
    absent = variant("absent")
    rewrite(absent / "weights" / "l1.pt", lambda d: d.pop("mlp.down_proj"))
    expect_refusal(original, absent, out, "weights/l1.pt", "mlp.down_proj", "missing")
    shape = variant("shape")
    rewrite(shape / "weights" / "l0.pt", lambda d: d.__setitem__("mlp.up_proj", d["mlp.up_proj"][:, :, :32]))
    expect_refusal(original, shape, out, "mlp.up_proj", "shape")
    big = variant("big")

    def big_code(d):
        d["mlp.gate_proj"][3, 0, 5] = 9
    rewrite(big / "weights" / "l0.pt", big_code)
    expect_refusal(original, big, out, "mlp.gate_proj", "out of range")
    nan = variant("nan")

    def nan_lut(d):
        d["self_attn.o_proj"][2, 0, 1] = np.nan
    rewrite(nan / "lut_3" / "l1.pt", nan_lut)
    expect_refusal(original, nan, out, "self_attn.o_proj", "NaN")
    evil = variant("evil")
    rewrite(evil / "weights" / "l0.pt", lambda d: d.__setitem__("note", argparse.Namespace(x=1)))
    expect_refusal(original, evil, out, "weights/l0.pt", "refused")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    result = run_script("conv_sqllm.py", "--original_model_path", original, "--quantized_path", good,
                        "--output_path", existing)
    assert_input_error(result, "existing", "--overwrite")
    assert (existing / "keep").read_text() == "x"


def test_table_reader_child_process_and_fallback(llama_pair, tmp_path):
    """The tables come back from the child process equal to reading them here, the first layers asked
    for at the start; when the child cannot hand them over (say, /dev/shm too small), the reader
    reads them here from then on."""
    from concurrent.futures import Future

    from common.quant.sqllm import QuantizedFolder, TableReader
    original, _ = llama_pair
    make_quantized_folder(original, tmp_path / "q")
    folder = QuantizedFolder.open(tmp_path / "q", None)

    def same(a, b) -> bool:
        return all(a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i]) for i in (0, 1))
    with TableReader(folder, 2, workers=2) as reader:
        assert sorted(reader._pending) == [0, 1]  # the first layers are asked for at once
        assert same(reader.read_layer(1), folder.read_layer(1))
        assert reader._pool is not None  # the child served it

        class NoSharedMemory:
            def submit(self, *args):
                failed: Future = Future()
                failed.set_exception(RuntimeError("unable to write to file </torch_1_2>: No space left on device"))
                return failed

            def shutdown(self, **kwargs):
                pass
        reader.close()
        reader._pool = NoSharedMemory()
        assert same(reader.read_layer(0), folder.read_layer(0))
        assert reader._pool is None
