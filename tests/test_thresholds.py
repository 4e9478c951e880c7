"""thresholds.py: the streamed result against a direct whole-model computation, the sampler,
local dataset formats, fp16 clamping, and every bad input."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from common.calib.activation_stats import clamp_to_fp16, sorted_abs_max
from common.calib.calibration import load_texts, sample_concat, sample_reference, tokenize_with
from common.errors import InputError
from common.tiny_models import build_model
from tests.helpers import assert_input_error, run_script

SEQ_LEN, NUM = 48, 12
# CI compares on the CPU to float32 rounding; on a GPU machine DECDEC_TEST_DEVICE=cuda runs the same
# comparison through the GPU path, where other matmul kernels round differently.
DEVICE = os.environ.get("DECDEC_TEST_DEVICE", "cpu")
RTOL = 1e-5 if DEVICE == "cpu" else 1e-3


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(corpus))
    return path


def direct_thresholds(model_dir: Path, samples: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Whole model in float32 with forward hooks on every Linear: the definition, computed plainly."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    found: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            index = int(name.split(".layers.")[1].split(".")[0])
            local = name.split(f".layers.{index}.")[1]

            def hook(mod, args, key=(index, local)):
                values = args[0].reshape(-1, args[0].shape[-1]).abs().sort(dim=-1, descending=True).values.amax(0)
                found[key] = values if key not in found else torch.maximum(found[key], values)
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=samples, use_cache=False)
    layers = max(i for i, _ in found) + 1
    return [{m: v for (i, m), v in found.items() if i == layer} for layer in range(layers)]


def streamed_and_direct(model_dir: Path, save: Path, corpus_file: Path, num: int,
                        *extra) -> tuple[list[dict], list[dict]]:
    """thresholds.py's output (float32 run on DEVICE) and the direct whole-model computation on the
    same samples; the two have the same layers and modules, each vector within RTOL."""
    from transformers import AutoTokenizer
    result = run_script("thresholds.py", "--model_path", model_dir, "--save_path", save, "--dataset", corpus_file,
                        "--seq_len", SEQ_LEN, "--num_examples", num, "--dtype", "float32", "--quiet",
                        "--device", DEVICE, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    thresholds = torch.load(save / "thresholds.pt", weights_only=True)
    model_tokenizer = AutoTokenizer.from_pretrained(model_dir)  # as saved: the model type picks the class
    samples = sample_reference(load_texts(str(corpus_file)), tokenize_with(model_tokenizer), SEQ_LEN, num, 0)
    expected = direct_thresholds(model_dir, samples)
    assert isinstance(thresholds, list) and len(thresholds) == len(expected) == 2
    for got, want in zip(thresholds, expected):
        assert set(got) == set(want)
        for module, values in got.items():
            assert torch.allclose(values, want[module], rtol=RTOL, atol=RTOL / 10), module
    return thresholds, expected


def test_streamed_thresholds_equal_direct_computation(model_pair, corpus_file, tmp_path):
    family, original, _ = model_pair
    thresholds, _ = streamed_and_direct(original, tmp_path, corpus_file, NUM, "--batch_size", 5)
    for got in thresholds:
        for module, values in got.items():
            assert values.dtype == torch.float32 and values.device.type == "cpu"
            assert (values[:-1] >= values[1:]).all(), module
        if family != "phi3":
            assert torch.equal(got["self_attn.q_proj"], got["self_attn.k_proj"])
            assert torch.equal(got["self_attn.q_proj"], got["self_attn.v_proj"])
            assert torch.equal(got["mlp.gate_proj"], got["mlp.up_proj"])
        else:
            assert {"self_attn.qkv_proj", "mlp.gate_up_proj"} <= set(got)
    # the planted outlier channels make the top of the sorted vector much larger than the rest
    attention_input = thresholds[0]["self_attn.qkv_proj" if family == "phi3" else "self_attn.q_proj"]
    assert attention_input[0] > 5 * attention_input[20]


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text"])
def test_more_families_equal_direct_computation(family, tmp_path, tokenizer, corpus_file):
    """Qwen3 (q/k norms), Gemma 2 and 3 (scaled embeddings, sliding-window layers, extra norms)."""
    model_dir = tmp_path / family
    build_model(family, model_dir, tokenizer)
    streamed_and_direct(model_dir, tmp_path, corpus_file, 6)


def test_layers_with_their_own_attention_masks(tmp_path, tokenizer, corpus_file):
    """Qwen2 with a sliding-window layer after a full-attention one: each layer gets its own mask."""
    model_dir = tmp_path / "sliding"
    build_model("qwen2", model_dir, tokenizer, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert json.loads((model_dir / "config.json").read_text())["layer_types"] == ["full_attention",
                                                                                   "sliding_attention"]
    streamed_and_direct(model_dir, tmp_path, corpus_file, 6)


def test_default_bf16_run_is_close_to_float32(llama_pair, corpus_file, tmp_path):
    original, _ = llama_pair
    outs = {}
    for dtype in ("bfloat16", "float32"):
        result = run_script("thresholds.py", "--model_path", original, "--save_path", tmp_path / dtype,
                            "--dataset", corpus_file, "--seq_len", SEQ_LEN, "--num_examples", NUM,
                            "--dtype", dtype, "--quiet")
        assert result.returncode == 0, result.stderr[-2000:]
        outs[dtype] = torch.load(tmp_path / dtype / "thresholds.pt", weights_only=True)
    for a, b in zip(outs["bfloat16"], outs["float32"]):
        for module in a:
            assert torch.allclose(a[module], b[module], rtol=0.1, atol=0.05), module


class WordTokenizer:
    """Fake tokenizer: a passage '7 8 9' becomes tokens [7, 8, 9]."""

    def __call__(self, text, return_tensors=None):
        class Encoded:
            input_ids = torch.tensor([[int(w) for w in text.split()]])
        return Encoded()


PASSAGES = ["0 0 0 0 0", "1 1", "2 2 2 2 2 2", "3 3 3 3", "4 4 4", "5 5 5 5 5 5 5"]


def test_reference_sampling_by_hand():
    # random.seed(0) draws 3, 3, 0, 2, 4, ...: passage 3 (4 tokens), 3 again (skipped), 0, 2.
    samples = sample_reference(PASSAGES, tokenize_with(WordTokenizer()), 4, 3, seed=0)
    assert samples.tolist() == [[3] * 4, [0] * 4, [2] * 4]
    # random.seed(3) draws 1, 4, 4, 1, 2, 4, 3, 5, ...: 1 and 4 are too short, 4/1 repeat.
    samples = sample_reference(PASSAGES, tokenize_with(WordTokenizer()), 4, 3, seed=3)
    assert samples.tolist() == [[2] * 4, [3] * 4, [5] * 4]


def test_reference_sampling_stops_when_data_runs_out():
    with pytest.raises(InputError, match="only 2 passages of at least 6 tokens"):
        sample_reference(PASSAGES, tokenize_with(WordTokenizer()), 6, 3, seed=0)


def test_concat_sampling_windows():
    samples = sample_concat(PASSAGES, lambda t: torch.tensor([int(w) for w in t.split()]), 5, 4, seed=1)
    joined = [int(w) for w in " ".join(PASSAGES).split()]
    assert samples.shape == (4, 5)
    for row in samples.tolist():
        assert any(joined[s: s + 5] == row for s in range(len(joined) - 4))
    assert torch.equal(samples, sample_concat(PASSAGES, lambda t: torch.tensor([int(w) for w in t.split()]),
                                              5, 4, seed=1))


def test_local_dataset_formats(tmp_path):
    import gzip
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset, DatasetDict
    texts = ["first passage\nwith two lines", "second passage", "third, with a comma"]
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    lines = "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts))
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "b.json").write_text(json.dumps({"text": texts}))
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    import csv
    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(texts))
    Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_dict({"text": texts}),
                 "test": Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"content": t}) for t in texts))
    for name in ("a.txt", "a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.json", "b.json", "a.parquet", "a.csv",
                 "saved", "saved_dict"):
        assert load_texts(str(tmp_path / name)) == texts, name
    assert load_texts(str(tmp_path / "c.jsonl"), text_column="content") == texts
    with pytest.raises(InputError, match="no 'text' field"):
        load_texts(str(tmp_path / "c.jsonl"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk_elements", [1, 300, 1 << 20])
def test_sorted_abs_max_equals_a_plain_sort(dtype, chunk_elements):
    """The integer (16 bit: NumPy radix) sorts, ascending and flipped, chunked over tokens, give
    exactly the float sort's values, signed zeros, ties and extremes included."""
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 41, 96, generator=generator) * 4).round().to(dtype)  # many ties
    x[0, 0, :5] = torch.tensor([-0.0, 0.0, -7.5, 7.5, -1e-3])
    x[2, 40, 7] = -torch.finfo(dtype).max
    want = x.reshape(-1, 96).float().abs().sort(dim=-1, descending=True).values.amax(dim=0)
    got = sorted_abs_max(x, chunk_elements)
    assert got.dtype == dtype and torch.equal(got.float(), want)


def test_clamp_to_fp16_names_the_module():
    values = {"mlp.down_proj": torch.tensor([1e6, 7e4, 3.0]), "mlp.up_proj": torch.tensor([2.0, 1.0])}
    warnings = clamp_to_fp16([values])
    assert len(warnings) == 1 and "mlp.down_proj" in warnings[0] and "2 values" in warnings[0]
    assert values["mlp.down_proj"].tolist() == [65504.0, 65504.0, 3.0]


def test_huge_activations_are_clamped_unless_asked(tmp_path, tokenizer, corpus_file):
    model_dir = tmp_path / "loud"
    model = build_model("llama", model_dir, tokenizer, dtype=torch.bfloat16, outliers=False)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["model.layers.1.post_attention_layernorm.weight"][5] = 3e6
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    del model
    args = ["--model_path", model_dir, "--dataset", corpus_file, "--seq_len", 32, "--num_examples", 4, "--quiet"]
    result = run_script("thresholds.py", *args, "--save_path", tmp_path / "clamped")
    assert result.returncode == 0, result.stderr
    assert "layer 1 mlp.gate_proj" in result.stderr and "clamped" in result.stderr
    clamped = torch.load(tmp_path / "clamped" / "thresholds.pt", weights_only=True)
    assert clamped[1]["mlp.gate_proj"][0] == 65504.0
    result = run_script("thresholds.py", *args, "--save_path", tmp_path / "raw", "--no_clamp")
    raw = torch.load(tmp_path / "raw" / "thresholds.pt", weights_only=True)
    assert result.returncode == 0 and raw[1]["mlp.gate_proj"][0] > 65504


# ---- bad input -------------------------------------------------------------------------------

def expect_refusal(save: Path, *args, fragments=(), env=None) -> None:
    result = run_script("thresholds.py", "--save_path", save, *args, env=env)
    assert_input_error(result, *fragments)
    assert not (save / "thresholds.pt").exists() if save.suffix != ".pt" else not save.exists()


def test_bad_inputs(llama_pair, corpus_file, tmp_path):
    original, _ = llama_pair
    small = ["--seq_len", SEQ_LEN, "--num_examples", 4]
    expect_refusal(tmp_path / "o", "--model_path", tmp_path / "absent", "--dataset", corpus_file,
                   fragments=("absent",))
    no_tokenizer = tmp_path / "no-tok"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(original / name, no_tokenizer / name)
    expect_refusal(tmp_path / "o", "--model_path", no_tokenizer, "--dataset", corpus_file, *small,
                   fragments=("no-tok", "tokenizer"))
    expect_refusal(tmp_path / "o", "--model_path", original, "--dataset", "no_such_set", *small,
                   fragments=("no_such_set", "neither a file nor a known dataset"))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"content": "x " * 100}) + "\n")
    expect_refusal(tmp_path / "o", "--model_path", original, "--dataset", other, *small,
                   fragments=("other.jsonl", "--text_column"))
    expect_refusal(tmp_path / "o", "--model_path", original, "--dataset", corpus_file, "--seq_len", 400,
                   "--num_examples", 500, fragments=("passages of at least 400 tokens",))
    expect_refusal(tmp_path / "o", "--model_path", original, "--dataset", corpus_file, "--seq_len", 4096,
                   fragments=("--seq_len 4096", "context"))
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "thresholds.pt").write_text("keep")
    result = run_script("thresholds.py", "--save_path", existing, "--model_path", original, "--dataset", corpus_file)
    assert_input_error(result, "thresholds.pt", "--overwrite")
    assert (existing / "thresholds.pt").read_text() == "keep"


def test_named_dataset_offline_suggests_a_local_file(llama_pair, tmp_path):
    original, _ = llama_pair
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    expect_refusal(tmp_path / "o", "--model_path", original, "--dataset", "wikitext2", "--seq_len", 32,
                   fragments=("wikitext2", "local file"), env=env)


def test_model_without_decoder_layers(tmp_path):
    from safetensors.torch import save_file
    model_dir = tmp_path / "odd"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file({"transformer.h.0.attn.weight": torch.zeros(8, 8)}, str(model_dir / "model.safetensors"))
    expect_refusal(tmp_path / "o", "--model_path", model_dir, "--dataset", "x.txt",
                   fragments=("no decoder layers found",))


def test_the_flags_name_every_dataset_the_loader_knows():
    """The scripts' --help lists the named datasets without importing the loader (and torch) to parse
    their flags: the two lists must agree."""
    from common.calib.calibration import NAMED_DATASETS
    from common.cli import DATASET_NAMES
    assert DATASET_NAMES == tuple(NAMED_DATASETS)
