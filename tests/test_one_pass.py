"""decdec_setup.py (issue 12): the one pass equals the separate scripts, artifact for artifact,
for rtn, awq (results and search) and sqllm on Llama, Qwen2 and Phi-3; and its bad inputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import _model_pair
from tests.helpers import assert_input_error, run_script
from tests.test_cheatsheet import all_tensors
from tests.test_conv_sqllm import make_quantized_folder

GROUP = 32
# CI runs both paths on the CPU; DECDEC_TEST_DEVICE=cuda runs both on a GPU (they must still be equal)
DEVICE = os.environ.get("DECDEC_TEST_DEVICE", "cpu")
THRESHOLDS = ["--seq_len", 64, "--num_examples", 8, "--sampling", "concat", "--dtype", "float32"]
SEARCH = ["--n_samples", 24, "--seqlen", 64]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("one-pass") / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in corpus) + "\n")
    return path


def ok(*args) -> None:
    result = run_script(*args, "--device", DEVICE, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_tree(a, b, where: str = "") -> None:
    """Nested lists/dicts of tensors, equal to the bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, str):
        assert a == b, where
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    else:
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{index}]")


def separate_scripts(model: Path, method: str, data: Path, out: Path, extra: list) -> dict[str, Path]:
    """What a user runs today: converter, cheatsheet.py --add_fused, thresholds.py."""
    fq, art = out / "fq", out / "artifacts"
    if method == "sqllm":
        ok("conv_sqllm.py", "--original_model_path", model, "--quantized_path", extra[1], "--output_path", fq,
           "--packed_output", out / "real")
        original = model
    else:
        scaled = out / "scaled"
        ok("conv_awq.py", "--model_path", model, "--q_group_size", GROUP, *extra, "--scaled_output", scaled,
           "--fakequant_output", fq, "--real_output", out / "real")
        original = scaled if method == "awq" else model
    ok("cheatsheet.py", "--original_model", original, "--quantized_model", fq, "--save_path", art, "--add_fused")
    ok("thresholds.py", "--model_path", original, "--save_path", art, "--dataset", data, *THRESHOLDS)
    return {"fq": fq, "art": art, "real": out / "real", "scaled": out / "scaled"}


def compare(one: Path, fq: Path, scaled: Path | None, expected: dict[str, Path], method: str) -> None:
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    assert_same_tree(load(one / "cheatsheet.pt"), load(expected["art"] / "cheatsheet.pt"), "cheatsheet")
    ours, theirs = load(one / "thresholds.pt"), load(expected["art"] / "thresholds.pt")
    assert [list(layer) for layer in ours] == [list(layer) for layer in theirs]
    for layer_ours, layer_theirs in zip(ours, theirs):
        for module in layer_ours:
            assert torch.allclose(layer_ours[module], layer_theirs[module], rtol=1e-5, atol=0), module
    first, second = all_tensors(fq), all_tensors(expected["fq"])
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert_same_tree(load(one / "pytorch_model.bin"), load(expected["real"] / "pytorch_model.bin"), "real")
    assert json.loads((one / "config.json").read_text()) == json.loads((expected["real"] / "config.json").read_text())
    if method != "sqllm":
        first, second = all_tensors(scaled), all_tensors(expected["scaled"])
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("method", ["rtn", "awq", "sqllm"])
def test_one_pass_equals_the_separate_scripts(family, method, models_root, tokenizer, corpus_file, tmp_path):
    original, _ = _model_pair(family, models_root, tokenizer)
    extra: list = []
    if method == "awq":
        ok("conv_awq.py", "--model_path", original, "--q_group_size", GROUP, "--run_awq", "--calib_data",
           corpus_file, "--dtype", "float32", *SEARCH, "--dump_awq", tmp_path / "awq.pt")
        extra = ["--awq_results", tmp_path / "awq.pt"]
    elif method == "sqllm":
        make_quantized_folder(original, tmp_path / "sqllm")
        extra = ["--quantized_path", tmp_path / "sqllm"]
    expected = separate_scripts(original, method, corpus_file, tmp_path / "separate", extra)
    one = tmp_path / "one"
    outputs = ["--fakequant_output", tmp_path / "one-fq"] + \
        ([] if method == "sqllm" else ["--scaled_output", tmp_path / "one-scaled", "--q_group_size", GROUP])
    ok("decdec_setup.py", "--model", original, "--output", one, "--method", method, *extra, "--dataset", corpus_file,
       *THRESHOLDS, *outputs)
    compare(one, tmp_path / "one-fq", tmp_path / "one-scaled", expected, method)
    # evaluate.py checks the folder the runtime loads, decoding its LUT-GEMM weights (or the LUTs)
    model = ["--quantized_model", one]  # the packed SqueezeLLM checkpoint is decoded too (LUT[code])
    reference = tmp_path / "one-scaled" if method == "awq" else original
    check = run_script("evaluate.py", *model, "--original_model", reference, "--check", "--device", DEVICE)
    assert check.returncode == 0, check.stderr[-2000:]
    assert "residual: decoded vs exact relative error" in check.stderr


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_sqllm_quantized_in_the_one_pass_equals_the_separate_commands(family, models_root, tokenizer, corpus_file,
                                                                     tmp_path):
    """SPEC §9 without Any-Precision: conv_sqllm.py --w_bit (sensitivity on the thresholds' samples), then
    cheatsheet.py and thresholds.py, against decdec_setup.py --method sqllm quantizing in its own run:
    the same quantized folder, fake-quantized model, packed checkpoint, cheatsheet and thresholds."""
    original, _ = _model_pair(family, models_root, tokenizer)
    samples = [item for item in THRESHOLDS if item not in ("--dtype", "float32")]
    sep = tmp_path / "separate"
    ok("conv_sqllm.py", "--original_model_path", original, "--w_bit", 3, "--dataset", corpus_file, *samples,
       "--output_path", sep / "fq", "--packed_output", sep / "real", "--quantized_output", sep / "q")
    ok("cheatsheet.py", "--original_model", original, "--quantized_model", sep / "fq", "--save_path", sep / "art")
    ok("thresholds.py", "--model_path", original, "--save_path", sep / "art", "--dataset", corpus_file, *THRESHOLDS)
    expected = {"fq": sep / "fq", "art": sep / "art", "real": sep / "real"}
    ok("decdec_setup.py", "--model", original, "--output", tmp_path / "one", "--method", "sqllm", "--w_bit", 3,
       "--dataset", corpus_file, *THRESHOLDS, "--fakequant_output", tmp_path / "one-fq",
       "--quantized_output", tmp_path / "one-q")
    compare(tmp_path / "one", tmp_path / "one-fq", None, expected, "sqllm")
    from common.quant.sqllm import load_pickled_dict
    for sub in ("lut_3", "weights"):
        for index in range(2):
            ours, theirs = (load_pickled_dict(root / sub / f"l{index}.pt") for root in (tmp_path / "one-q", sep / "q"))
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[m], theirs[m]) for m in ours)
    assert not any(path.name.endswith(".sqllm-tables") for path in tmp_path.iterdir())


def test_sqllm_quantizing_resumes_its_k_means(llama_pair, corpus_file, tmp_path, monkeypatch):
    """Stopped after the first layer's k-means (like Ctrl-C; the k-means follows the sensitivity from the
    top layer down), the same command computes the sensitivity again but not that layer's LUTs; every file
    equals an uninterrupted run's."""
    import decdec_setup
    from common.one_pass import parts_folder
    from common.quant import seed_luts

    original, _ = llama_pair
    args = [str(a) for a in ["--model", original, "--method", "sqllm", "--w_bit", 3, "--dataset", corpus_file,
                             *THRESHOLDS, "--device", "cpu", "--quiet"]]
    assert decdec_setup.main([*args, "--output", str(tmp_path / "whole")]) == 0
    real_seed = seed_luts.seed_luts
    calls = []

    def seed_then_stop(weight, *rest):
        calls.append(weight.shape)
        if len(calls) == 1 + 7 + 1:  # numba's warm-up, layer 1's seven Linears, then layer 0's first
            raise KeyboardInterrupt
        return real_seed(weight, *rest)
    with monkeypatch.context() as patch:
        patch.setattr(seed_luts, "seed_luts", seed_then_stop)
        with pytest.raises(KeyboardInterrupt):
            decdec_setup.main([*args, "--output", str(tmp_path / "resumed")])
    assert not (tmp_path / "resumed").exists()
    tables = parts_folder(tmp_path / "resumed") / "sqllm"
    assert (tables / "l1.safetensors").is_file() and not (tables / "l0.safetensors").exists()
    seeded = []
    monkeypatch.setattr(seed_luts, "seed_luts", lambda weight, *rest: seeded.append(weight.shape) or
                        real_seed(weight, *rest))
    assert decdec_setup.main([*args, "--output", str(tmp_path / "resumed")]) == 0
    assert seeded[0] == (2, 32) and len(seeded) == 1 + 7  # numba's warm-up, then layer 0's Linears only
    assert not parts_folder(tmp_path / "resumed").exists()
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    for name in ("cheatsheet.pt", "thresholds.pt", "pytorch_model.bin"):
        assert_same_tree(load(tmp_path / "resumed" / name), load(tmp_path / "whole" / name), name)


def test_bfloat16_checkpoint_and_thresholds(tokenizer, corpus_file, tmp_path):
    """A bfloat16 checkpoint (no float32 copy in the one pass: cast straight to float16) and the
    default bfloat16 thresholds (their 16-bit sort): still the separate scripts' artifacts."""
    from common.tiny_models import build_model
    original = tmp_path / "bf16"
    build_model("llama", original, tokenizer, dtype=torch.bfloat16, seed=5)
    bf16 = [("bfloat16" if item == "float32" else item) for item in THRESHOLDS]
    expected = separate_scripts(original, "rtn", corpus_file, tmp_path / "separate", [])
    ok("thresholds.py", "--model_path", original, "--save_path", tmp_path / "bf16-thresholds", "--dataset",
       corpus_file, *bf16)
    ok("decdec_setup.py", "--model", original, "--output", tmp_path / "one", "--method", "rtn", "--dataset",
       corpus_file, *THRESHOLDS, "--fakequant_output", tmp_path / "one-fq", "--scaled_output",
       tmp_path / "one-scaled", "--q_group_size", GROUP)
    compare(tmp_path / "one", tmp_path / "one-fq", tmp_path / "one-scaled", expected, "rtn")
    ok("decdec_setup.py", "--model", original, "--output", tmp_path / "one-bf16", "--method", "rtn", "--dataset",
       corpus_file, *bf16, "--q_group_size", GROUP)
    assert_same_tree(torch.load(tmp_path / "one-bf16" / "thresholds.pt", weights_only=True),
                     torch.load(tmp_path / "bf16-thresholds" / "thresholds.pt", weights_only=True), "thresholds")


def test_awq_search_in_the_one_pass(llama_pair, corpus_file, tmp_path):
    original, _ = llama_pair
    search = ["--calib_data", corpus_file, "--awq_dtype", "float32", *SEARCH]
    ok("decdec_setup.py", "--model", original, "--output", tmp_path / "one", "--method", "awq", "--q_group_size", GROUP,
       *search, "--dump_awq", tmp_path / "one-awq.pt", "--dataset", corpus_file, *THRESHOLDS,
       "--fakequant_output", tmp_path / "one-fq", "--scaled_output", tmp_path / "one-scaled")
    ok("conv_awq.py", "--model_path", original, "--q_group_size", GROUP, "--run_awq", "--calib_data", corpus_file,
       "--dtype", "float32", *SEARCH, "--dump_awq", tmp_path / "awq.pt")
    assert_same_tree(torch.load(tmp_path / "one-awq.pt", weights_only=True),
                     torch.load(tmp_path / "awq.pt", weights_only=True), "results")
    expected = separate_scripts(original, "awq", corpus_file, tmp_path / "separate",
                                ["--awq_results", tmp_path / "awq.pt"])
    compare(tmp_path / "one", tmp_path / "one-fq", tmp_path / "one-scaled", expected, "awq")


def test_bad_inputs(llama_pair, corpus_file, tmp_path):
    original, _ = llama_pair
    base = ["decdec_setup.py", "--model", original, "--output", tmp_path / "out", "--dataset", corpus_file]

    def refused(*args, fragments):
        assert_input_error(run_script(*base, *args), *fragments)
        assert not (tmp_path / "out").exists()

    refused("--method", "sqllm", "--quantized_path", tmp_path, "--gradients", tmp_path / "g.pt",
            fragments=("for quantizing here", "not with --quantized_path"))
    refused("--method", "sqllm", "--w_bit", 1, fragments=("--w_bit 1", "2 to 8 bits"))
    refused("--method", "rtn", "--quantized_path", tmp_path, fragments=("belong to --method sqllm",))
    refused("--method", "rtn", "--awq_results", tmp_path / "x.pt", fragments=("belong to --method awq",))
    refused("--method", "rtn", "--q_group_size", 48, fragments=("not divisible by --q_group_size 48",))
    refused("--method", "awq", "--awq_results", tmp_path / "missing.pt", "--q_group_size", GROUP,
            fragments=("missing.pt", "no such file"))
    refused("--method", "rtn", "--q_group_size", GROUP, "--seq_len", 4096, fragments=("--seq_len 4096",))
    refused("--method", "rtn", "--q_group_size", GROUP, "--fakequant_output", original,
            fragments=("is the input --model",))
    torch.save({0: 3}, tmp_path / "bits.pt")
    refused("--method", "rtn", "--q_group_size", GROUP, "--bit_pt", tmp_path / "bits.pt",
            fragments=("no bit width for layer 1",))
    refused("--method", "sqllm", "--quantized_path", tmp_path / "nothing", fragments=("no such directory",))


def test_symmetric_quantization_writes_the_artifacts_only(llama_pair, corpus_file, tmp_path):
    original, _ = llama_pair
    ok("decdec_setup.py", "--model", original, "--output", tmp_path / "one", "--method", "rtn", "--q_group_size",
       GROUP, "--no_zero_point", "--dataset", corpus_file, *THRESHOLDS, "--fakequant_output", tmp_path / "one-fq")
    assert not (tmp_path / "one" / "pytorch_model.bin").exists()
    ok("conv_awq.py", "--model_path", original, "--q_group_size", GROUP, "--no_zero_point", "--fakequant_output",
       tmp_path / "fq")
    ok("cheatsheet.py", "--original_model", original, "--quantized_model", tmp_path / "fq", "--save_path",
       tmp_path / "art", "--add_fused")
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    assert_same_tree(load(tmp_path / "one" / "cheatsheet.pt"), load(tmp_path / "art" / "cheatsheet.pt"))
    first, second = all_tensors(tmp_path / "one-fq"), all_tensors(tmp_path / "fq")
    assert all(torch.equal(first[k], second[k]) for k in second)


def test_interrupted_run_resumes_from_its_parts(llama_pair, corpus_file, tmp_path, monkeypatch):
    """Stopped after layer 0 (like Ctrl-C), the same command goes on from layer 1: layer 0's search
    results (and on a CPU its cheatsheet) come from its part; every file equals an uninterrupted run's."""
    import decdec_setup
    from common.io.parts import PartStore
    from common.one_pass import parts_folder
    from common.quant import awq_search, cheatsheet_build

    original, _ = llama_pair
    args = ["--model", original, "--method", "awq", "--q_group_size", GROUP, "--calib_data", corpus_file,
            "--awq_dtype", "float32", *SEARCH, "--dataset", corpus_file, *THRESHOLDS, "--device", DEVICE, "--quiet"]
    args = [str(a) for a in args]
    assert decdec_setup.main([*args, "--output", str(tmp_path / "whole"), "--dump_awq", str(tmp_path / "whole.pt")]) == 0
    resumed = tmp_path / "resumed"
    real_write = PartStore.write

    def write_then_stop(self, layer, results):
        real_write(self, layer, results)
        if layer == 0:
            raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(PartStore, "write", write_then_stop)
        with pytest.raises(KeyboardInterrupt):
            decdec_setup.main([*args, "--output", str(resumed), "--dump_awq", str(tmp_path / "resumed.pt")])
    assert not resumed.exists()
    assert sorted(p.name for p in parts_folder(resumed).iterdir()) == ["fingerprint.json", "layer-00000.safetensors"]

    searched, sheets = [], []
    real_search, real_add = awq_search.LayerwiseSearch.layer, cheatsheet_build.LayerResults.add_linear
    monkeypatch.setattr(awq_search.LayerwiseSearch, "layer",
                        lambda self, index, *a: searched.append(index) or real_search(self, index, *a))
    monkeypatch.setattr(cheatsheet_build.LayerResults, "add_linear",
                        lambda self, *a: sheets.append(self.layer.index) or real_add(self, *a))
    assert decdec_setup.main([*args, "--output", str(resumed), "--dump_awq", str(tmp_path / "resumed.pt")]) == 0
    assert searched == [1]  # layer 0's search results came from its part
    assert set(sheets) == ({1} if DEVICE == "cpu" else {0, 1})  # its cheatsheet too, where costly (a CPU)
    assert not parts_folder(resumed).exists()
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    for name in ("cheatsheet.pt", "thresholds.pt", "pytorch_model.bin"):
        assert_same_tree(load(resumed / name), load(tmp_path / "whole" / name), name)
    assert_same_tree(load(tmp_path / "resumed.pt"), load(tmp_path / "whole.pt"), "results")


def test_thresholds_in_a_child_process(llama_pair, corpus_file, tmp_path, monkeypatch):
    """On a GPU the rtn / sqllm thresholds are thresholds.py's run in a child process (forced here on
    the CPU): every file equals the run that computes them in the loop. An error in the child is the
    same one-line input error, with nothing left behind; where no child can start, the loop computes
    them."""
    import decdec_setup
    from common.calib import thresholds_job
    from common.errors import InputError

    original, _ = llama_pair
    args = [str(a) for a in ["--model", original, "--method", "rtn", "--q_group_size", GROUP, *THRESHOLDS,
                             "--device", DEVICE, "--quiet"]]
    data = ["--dataset", str(corpus_file)]
    assert decdec_setup.main([*args, *data, "--output", str(tmp_path / "loop")]) == 0
    started = []
    real_start = thresholds_job.start_thresholds_child
    monkeypatch.setattr(thresholds_job, "thresholds_in_child", lambda method, device: True)
    monkeypatch.setattr(thresholds_job, "start_thresholds_child", lambda job: started.append(job) or real_start(job))
    assert decdec_setup.main([*args, *data, "--output", str(tmp_path / "child")]) == 0
    assert len(started) == 1
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    for name in ("cheatsheet.pt", "thresholds.pt", "pytorch_model.bin"):
        assert_same_tree(load(tmp_path / "child" / name), load(tmp_path / "loop" / name), name)

    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    with pytest.raises(InputError, match="--dataset .*short.txt: the dataset holds 6 tokens"):
        decdec_setup.main([*args, "--dataset", str(short), "--output", str(tmp_path / "failed")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child", "loop", "short.txt"]  # nothing left behind

    children = []
    monkeypatch.setattr(thresholds_job, "start_thresholds_child", lambda job: children.append(real_start(job))
                        or children[-1])
    no_device = [a for a in args if a not in ("--device", DEVICE)]  # the child is told "cuda", torch finds none
    assert decdec_setup.main([*no_device, *data, "--output", str(tmp_path / "no_gpu")]) == 0
    assert children[0].future.cancelled() or not children[0].process.is_alive()
    assert_same_tree(load(tmp_path / "no_gpu" / "thresholds.pt"), load(tmp_path / "loop" / "thresholds.pt"))

    def no_child(*_args, **_kwargs):
        raise OSError("no child processes here")
    monkeypatch.setattr(thresholds_job, "ChildProcess", no_child)
    monkeypatch.setattr(thresholds_job, "start_thresholds_child", real_start)
    assert decdec_setup.main([*args, *data, "--output", str(tmp_path / "fallback")]) == 0
    assert_same_tree(load(tmp_path / "fallback" / "thresholds.pt"), load(tmp_path / "loop" / "thresholds.pt"))


def test_the_read_ahead_streams_each_layers_tables_beside_its_tensors(llama_pair, tmp_path):
    """sqllm: the read-ahead reads the chosen bit width's tables and the codes, each right after its
    layer's tensors (the order the loop needs them), and nothing of another bit width."""
    import decdec_setup
    from common.io.readahead import readahead_order

    original, _ = llama_pair
    make_quantized_folder(original, tmp_path / "q", bit_widths=(2, 3))
    args = decdec_setup.parse_args(["--model", str(original), "--output", str(tmp_path / "out"), "--method", "sqllm",
                                    "--quantized_path", str(tmp_path / "q"), "--bits", "2"])
    files = decdec_setup.table_files(args)
    assert sorted((layer, f"{file.parent.name}/{file.name}") for layer, file in files) == [
        (0, "lut_2/l0.pt"), (0, "weights/l0.pt"), (1, "lut_2/l1.pt"), (1, "weights/l1.pt")]
    order = readahead_order([original], skip=("lm_head",), layer_files=files)
    layers = [key[0] for key, *_ in order]
    assert layers == sorted(layers) and layers[0] == -1  # outside tensors, then layer by layer
    for _, file in files:
        assert [entry[2:] for entry in order if entry[1] == file] == [(0, file.stat().st_size)]  # read whole
    for layer in (0, 1):
        kinds = [path.suffix for key, path, *_ in order if key[0] == layer]
        assert kinds == [".safetensors"] * (len(kinds) - 2) + [".pt"] * 2 and len(kinds) > 2  # tensors, then tables
    assert decdec_setup.table_files(decdec_setup.parse_args(["--model", "m", "--output", "o", "--method", "rtn"])) == []


def test_sqllm_reads_each_tensor_once(llama_pair, corpus_file, tmp_path, monkeypatch):
    """The sqllm folder holds the packed checkpoint, the whole model (its LM head too): the head, which only
    the checkpoint needs, is read once, with or without the fake-quantized model beside it. (The embeddings
    are read again by the thresholds' own model on a CPU, as for rtn.)"""
    from collections import Counter

    import decdec_setup
    from common.io.model_files import Checkpoint

    original, _ = llama_pair
    make_quantized_folder(original, tmp_path / "q")
    read: list[str] = []
    real_read = Checkpoint.read_raw
    monkeypatch.setattr(Checkpoint, "read_raw", lambda self, name, pin=False: read.append(name) or
                        real_read(self, name, pin))
    args = [str(a) for a in ["--model", original, "--method", "sqllm", "--quantized_path", tmp_path / "q",
                             "--dataset", corpus_file, *THRESHOLDS, "--device", DEVICE, "--quiet"]]
    for extra in ([], ["--fakequant_output", str(tmp_path / "fq")]):
        read.clear()
        assert decdec_setup.main([*args, "--output", str(tmp_path / f"folder{len(extra)}"), *extra]) == 0
        counts = Counter(read)
        assert counts["lm_head.weight"] == 1, counts
        assert "model.layers.1.mlp.down_proj.weight" in counts


def test_first_layers_beside_a_slow_set_up_on_a_cpu(llama_pair, corpus_file, tmp_path, monkeypatch):
    """On a CPU the layers that start while the calibration set-up still runs (slowed down here) are
    quantized on one torch thread with their thresholds after their other stages: every file equals
    a run without the delay, and all threads come back."""
    import time

    import decdec_setup
    from common.background import setting_up
    from common.calib.thresholds_job import ThresholdsJob
    from common.quant.cheatsheet_build import LayerResults

    original, _ = llama_pair
    args = [str(a) for a in ["--model", original, "--method", "rtn", "--q_group_size", GROUP, *THRESHOLDS,
                             "--dataset", corpus_file, "--device", "cpu", "--quiet"]]
    threads = torch.get_num_threads()
    assert decdec_setup.main([*args, "--output", str(tmp_path / "undelayed")]) == 0
    real_samples, real_add = ThresholdsJob.samples, LayerResults.add_linear
    seen = []
    monkeypatch.setattr(ThresholdsJob, "samples", lambda job: time.sleep(3) or real_samples(job))
    monkeypatch.setattr(LayerResults, "add_linear", lambda self, *a, **k: seen.append(
        (setting_up(), torch.get_num_threads())) or real_add(self, *a, **k))
    assert decdec_setup.main([*args, "--output", str(tmp_path / "beside")]) == 0
    assert seen[0] == (True, 1) and seen[-1] == (False, threads)  # one thread only while the set-up runs
    assert torch.get_num_threads() == threads
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    for name in ("cheatsheet.pt", "thresholds.pt", "pytorch_model.bin"):
        assert_same_tree(load(tmp_path / "beside" / name), load(tmp_path / "undelayed" / name), name)


def test_set_up_builds_its_model_in_the_middle_of_layer_0(llama_pair, corpus_file, tmp_path, monkeypatch):
    """Issue 22's race, forced. While the set-up thread builds the bfloat16 thresholds model, transformers
    sets torch's process-wide default dtype to bfloat16; layer 0's first Linear is quantized exactly then,
    on one thread, and the rest once the build goes on. The artifacts equal the separate commands'."""
    import threading

    import decdec_setup
    from transformers.models.llama import modeling_llama
    from common.quant.cheatsheet_build import LayerResults

    original, _ = llama_pair
    bf16 = [("bfloat16" if item == "float32" else item) for item in THRESHOLDS]
    expected = separate_scripts(original, "rtn", corpus_file, tmp_path / "separate", [])
    ok("thresholds.py", "--model_path", original, "--save_path", tmp_path / "bf16", "--dataset", corpus_file, *bf16)
    in_window, first_done, seen = threading.Event(), threading.Event(), []
    real_init, real_add = modeling_llama.LlamaForCausalLM.__init__, LayerResults.add_linear

    def building(self, *args, **kwargs):  # called inside transformers' default-dtype window
        in_window.set()
        first_done.wait(120)
        real_init(self, *args, **kwargs)

    def add_linear(self, *args, **kwargs):
        if not seen:
            assert in_window.wait(120), "the set-up never reached the model's construction"
        seen.append((torch.get_default_dtype(), torch.get_num_threads()))
        real_add(self, *args, **kwargs)
        first_done.set()

    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "__init__", building)
    monkeypatch.setattr(LayerResults, "add_linear", add_linear)
    assert decdec_setup.main([str(a) for a in [
        "--model", original, "--output", tmp_path / "one", "--method", "rtn", "--q_group_size", GROUP,
        "--dataset", corpus_file, *bf16, "--device", "cpu", "--quiet"]]) == 0
    assert seen[0] == (torch.bfloat16, 1), seen[:3]  # the race's conditions held
    assert torch.get_default_dtype() == torch.float32
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    assert_same_tree(load(tmp_path / "one" / "cheatsheet.pt"), load(expected["art"] / "cheatsheet.pt"), "cheatsheet")
    assert_same_tree(load(tmp_path / "one" / "pytorch_model.bin"), load(expected["real"] / "pytorch_model.bin"))
    assert_same_tree(load(tmp_path / "one" / "thresholds.pt"), load(tmp_path / "bf16" / "thresholds.pt"))


def test_a_search_is_set_up_before_the_model_is_read(llama_pair, corpus_file, tmp_path, monkeypatch):
    """With a search, reading early gains nothing (the search sets the pace) and, on a cold cache, slows
    the set-up's imports: conv_awq.py and the one pass start reading the model once the search is set up."""
    import conv_awq
    import decdec_setup
    from common.quant import awq_search
    original, _ = llama_pair
    events: list[str] = []
    set_up = awq_search.start_search

    def recorded_start_search(*args, **kwargs):
        search = set_up(*args, **kwargs)
        events.append("search set up")
        return search

    monkeypatch.setattr(awq_search, "start_search", recorded_start_search)
    monkeypatch.setattr(conv_awq, "start_search", recorded_start_search)
    monkeypatch.setattr(conv_awq, "start_readahead", lambda *args, **kwargs: events.append("read-ahead"))
    monkeypatch.setattr(decdec_setup, "read_ahead", lambda *args, **kwargs: events.append("read-ahead"))
    search = ["--calib_data", str(corpus_file), *map(str, SEARCH), "--q_group_size", str(GROUP), "--device", "cpu",
              "--quiet"]
    assert conv_awq.main(["--model_path", str(original), "--run_awq", "--dump_awq", str(tmp_path / "awq.pt"),
                          *search]) == 0
    assert events == ["search set up", "read-ahead"]
    events.clear()
    assert decdec_setup.main(["--model", str(original), "--output", str(tmp_path / "one"), "--method", "awq",
                              "--dataset", str(corpus_file), *map(str, THRESHOLDS), *search]) == 0
    assert events == ["search set up", "read-ahead"]
    events.clear()
    assert conv_awq.main(["--model_path", str(original), "--awq_results", str(tmp_path / "awq.pt"),
                          "--real_output", str(tmp_path / "real"), "--q_group_size", str(GROUP), "--quiet"]) == 0
    assert events == ["read-ahead"]  # no search: reading starts at once


def test_awq_thresholds_set_up_beside_the_first_search(llama_pair, corpus_file, tmp_path, monkeypatch):
    """The GPU's order (the thresholds' set-up in a thread while the first layer is searched), forced on
    the CPU: the same cheatsheet, thresholds and checkpoint as building them one after the other."""
    import decdec_setup
    original, _ = llama_pair
    args = ["--model", str(original), "--method", "awq", "--q_group_size", str(GROUP), "--calib_data",
            str(corpus_file), "--awq_dtype", "float32", *map(str, SEARCH), "--dataset", str(corpus_file),
            *map(str, THRESHOLDS), "--device", "cpu", "--quiet"]
    assert decdec_setup.main([*args, "--output", str(tmp_path / "in-order")]) == 0
    beside = []
    monkeypatch.setattr(decdec_setup, "thresholds_beside_search", lambda device: not beside.append(device))
    assert decdec_setup.main([*args, "--output", str(tmp_path / "beside")]) == 0
    assert len(beside) == 1
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    for name in ("cheatsheet.pt", "thresholds.pt", "pytorch_model.bin"):
        assert_same_tree(load(tmp_path / "beside" / name), load(tmp_path / "in-order" / name), name)
