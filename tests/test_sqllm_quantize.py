"""SqueezeLLM built in (issue 23, SPEC §9): the layer-by-layer sensitivity against a whole-model autograd
reference, and the seed LUTs against a direct per-row flash1dkmeans call."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import InputError
from tests.conftest import _model_pair


@pytest.mark.parametrize("family,budget", [("llama", 0), ("qwen2", 1 << 30), ("phi3", 40_000)])
def test_layerwise_sensitivity_equals_whole_model_autograd(family, budget, models_root, tokenizer, tmp_path):
    """F = Σₛ (∂Lₛ/∂W)² from one layer on the device at a time equals a per-sample backward through the
    whole bfloat16 model (squares summed in float32) within 1 % relative, module by module; with the
    stashed layer inputs in host memory, all in files (budget 0), or some of each."""
    from transformers import AutoModelForCausalLM
    from common.calib.layerwise import LayerwiseModel
    from common.io.model_files import Checkpoint
    from common.layers import find_layers
    from common.quant.sensitivity import HostStash, layerwise_sensitivity

    original, _ = _model_pair(family, models_root, tokenizer)
    samples = torch.randint(3, 500, (5, 48), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16).eval()
    expected: dict[str, torch.Tensor] = {}
    for sample in samples:
        reference.zero_grad(set_to_none=True)
        reference(input_ids=sample[None], labels=sample[None], use_cache=False).loss.backward()
        for name, param in reference.named_parameters():
            if ".layers." in name and param.ndim == 2:
                expected[name] = expected.get(name, 0) + param.grad.float() ** 2

    checkpoint = Checkpoint(original, "--model")
    layout = find_layers(checkpoint)
    model = LayerwiseModel(checkpoint, layout, torch.device("cpu"), torch.bfloat16, via_float16=True)
    stash = HostStash(budget, tmp_path / "spill")
    try:
        got = dict(layerwise_sensitivity(model, samples, 2, stash))
    finally:
        model.close()
        stash.close()
    # each layer's inputs are batches of 12, 12 and 6 KB: budget 0 spills all 6; 40 KB keeps layer 0's
    # and the last small batch of layer 1, and spills its two larger ones
    assert stash.spills == {0: 6, 40_000: 2}.get(budget, 0), stash.spills
    assert not any((tmp_path / "spill").glob("**/*.safetensors"))  # the files are gone with the stash
    assert sorted(got) == [0, 1]
    for index, modules in got.items():
        assert sorted(modules) == sorted(layout.layers[index].linears)
        for module, value in modules.items():
            want = expected[layout.layers[index].linears[module]]
            assert value.dtype == torch.float32 and value.shape == want.shape
            relative = float((value - want).norm() / want.norm())
            assert relative < 0.01, (index, module, relative)


def test_seed_luts_equal_a_direct_flash1dkmeans_call_per_row():
    """SPEC §9.2 row by row in plain NumPy, against the parallel kernel: the same LUT and codes, with a
    row of zero sensitivity (unweighted), one holding zeros (masked out of the weights) and rows of
    many ties, -0 among them. The kernel's radix sort is stable: ties come in index order, as
    np.argsort(kind="stable") gives them (numpy's default quicksort may order ties otherwise, which
    changes only the float64 prefix sums' rounding: the same result on these rows too)."""
    from flash1dkmeans import numba_kmeans_1d_k_cluster
    from common.quant.seed_luts import seed_luts
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((24, 256)) * 0.02).astype(np.float16)
    weight[3, :40] = 0
    weight[7:10] = np.round(weight[7:10] * 300) / 300  # a few distinct values, each many times
    weight[8, ::3] = -0.0
    sensitivity = torch.from_numpy(rng.standard_normal((24, 256)) ** 2).to(torch.bfloat16)
    sensitivity[5] = 0
    for bits in (2, 3, 4):
        luts, codes = seed_luts(torch.from_numpy(weight), sensitivity, bits, random_state=0)
        luts, codes = luts.numpy(), codes.numpy()
        assert luts.dtype == np.float16 and luts.shape == (24, 2 ** bits) and codes.dtype == np.uint8
        for row, kind in [(row, kind) for row in range(24) for kind in ("stable", "quicksort")]:
            x = weight[row].astype(np.float32)
            f = sensitivity[row].float().numpy() * (x != 0)
            order = np.argsort(x, kind=kind)
            sorted_f = f[order].astype(np.float64)
            if sorted_f.sum() == 0:
                sorted_f = np.ones_like(sorted_f)
            x64 = x[order].astype(np.float64)
            centroids, borders = numba_kmeans_1d_k_cluster(
                x[order], 2 ** bits, 50, np.cumsum(sorted_f), np.cumsum(sorted_f * x64),
                np.cumsum(sorted_f * x64 * x64), 0, len(x), 0)
            want = np.empty(len(x), dtype=np.uint8)
            for cluster in range(2 ** bits):
                want[order[borders[cluster]:borders[cluster + 1]]] = cluster
            assert np.array_equal(luts[row], centroids.astype(np.float32).astype(np.float16)), (bits, row, kind)
            assert np.array_equal(codes[row], want), (bits, row, kind)
        decoded = np.take_along_axis(luts.astype(np.float32), codes.astype(np.int64), axis=1)
        error = np.abs(decoded - weight.astype(np.float32)).mean()
        assert error < np.abs(weight.astype(np.float32)).mean() * (0.5 if bits == 2 else 0.25)
    weight[11, 7] = np.inf
    with pytest.raises(InputError, match="layer 9 up_proj holds NaN or Inf"):
        seed_luts(torch.from_numpy(weight), sensitivity, 3, where="layer 9 up_proj")


def unpack_by_the_letter(qweight: torch.Tensor, bits: int, in_features: int) -> np.ndarray:
    """SPEC §9.4 read back one byte at a time: the test's own reading of the packed layout."""
    planes, out_features, _ = qweight.shape
    total = in_features // 8
    raw = qweight.numpy().view(np.uint8).reshape(planes, out_features, total)  # little-endian int32s
    whole, rest = 128 * (total // 128), total % 128
    codes = np.zeros((out_features, in_features), dtype=np.uint8)
    for plane in range(bits):
        for j in range(total):
            if j < whole:
                n = 128 * (j // 128) + 4 * (j % 32) + (((j % 128) // 32) ^ 3)
            else:
                r, threads = j - whole, rest // 4
                n = whole + 4 * (r % threads) + ((r // threads) ^ 3)
            byte = raw[plane, :, n]
            for k in range(8):
                codes[:, 8 * j + k] |= ((byte >> (7 - k)) & 1) << (bits - 1 - plane)
    return codes


@pytest.mark.parametrize("in_features", [96, 1056, 2048])
def test_packed_codes_read_back_by_the_letter(in_features):
    """Whole 128-byte warps, a remainder spread over fewer threads, and no whole warp at all."""
    from common.quant.anyprec import pack_codes
    generator = torch.Generator().manual_seed(in_features)
    for bits in (2, 3, 4):
        codes = torch.randint(0, 2 ** bits, (24, in_features), generator=generator, dtype=torch.uint8)
        qweight = pack_codes(codes, bits)
        assert qweight.dtype == torch.int32 and qweight.shape == (bits, 24, in_features // 32)
        assert np.array_equal(unpack_by_the_letter(qweight, bits, in_features), codes.numpy())


def conv_sqllm(*args):
    from tests.helpers import run_script
    return run_script("conv_sqllm.py", *args, "--device", "cpu", "--quiet")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("sqllm-text") / "text.txt"
    path.write_text("\n\n".join(corpus))
    return path


CALIBRATION = ["--seq_len", 64, "--num_examples", 6, "--sampling", "concat", "--batch_size", 4]


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_quantize_here_and_every_output(family, models_root, tokenizer, corpus_file, tmp_path):
    """--w_bit: the quantized folder (Phi-3's fused Linears quantized per row of the fused weight), the
    fake-quantized model equal to LUT[code], the packed checkpoint read back to the same codes and LUTs;
    the folder read again through --quantized_path gives the same model; a run from the dumped
    sensitivity gives the same folder."""
    from common.quant.sqllm import load_pickled_dict
    from tests.test_cheatsheet import all_tensors
    original, _ = _model_pair(family, models_root, tokenizer)
    result = conv_sqllm("--original_model_path", original, "--w_bit", 3, "--dataset", corpus_file, *CALIBRATION,
                        "--output_path", tmp_path / "fq", "--quantized_output", tmp_path / "q",
                        "--packed_output", tmp_path / "packed", "--dump_gradients", tmp_path / "grads.pt")
    assert result.returncode == 0, result.stderr[-2000:]
    gradients = torch.load(tmp_path / "grads.pt", weights_only=True)
    fake, packed = all_tensors(tmp_path / "fq"), torch.load(tmp_path / "packed" / "pytorch_model.bin",
                                                              weights_only=True)
    originals = all_tensors(original)
    for index in range(2):
        luts = load_pickled_dict(tmp_path / "q" / "lut_3" / f"l{index}.pt")
        codes = load_pickled_dict(tmp_path / "q" / "weights" / f"l{index}.pt")
        prefix = f"model.layers.{index}."
        linears = {name[len(prefix):-len(".weight")] for name in originals
                   if name.startswith(prefix) and name.endswith(".weight") and originals[name].ndim == 2}
        assert set(luts) == set(codes) == set(gradients[index]) == linears
        if family == "phi3":
            assert {"self_attn.qkv_proj", "mlp.gate_up_proj"} <= linears
        for module in linears:
            weight = originals[f"{prefix}{module}.weight"]
            lut, code = luts[module], codes[module]
            assert lut.dtype == torch.float16 and lut.shape == (weight.shape[0], 1, 8)
            assert code.dtype == torch.uint8 and code.shape == (weight.shape[0], 1, weight.shape[1])
            assert gradients[index][module].dtype == torch.bfloat16
            want = torch.gather(lut[:, 0], 1, code[:, 0].long())
            assert torch.equal(fake[f"{prefix}{module}.weight"], want)
            assert (want.float() - weight.float()).abs().mean() < 0.3 * weight.float().abs().mean()
            assert f"{prefix}{module}.weight" not in packed
            assert np.array_equal(unpack_by_the_letter(packed[f"{prefix}{module}.qweight"], 3, weight.shape[1]),
                                  code[:, 0].numpy())
            assert torch.equal(packed[f"{prefix}{module}.lut3"], lut[:, 0])
    assert torch.equal(packed["model.embed_tokens.weight"], originals["model.embed_tokens.weight"].half())
    from common.quant.lutgemm import DecodedCheckpoint  # what evaluate.py reads the packed folder with
    decoded = DecodedCheckpoint(tmp_path / "packed")
    for name, tensor in fake.items():
        assert torch.equal(decoded.read_raw(name), tensor), name
    again = conv_sqllm("--original_model_path", original, "--quantized_path", tmp_path / "q",
                       "--output_path", tmp_path / "fq-again")
    assert again.returncode == 0, again.stderr[-2000:]
    second = all_tensors(tmp_path / "fq-again")
    assert fake.keys() == second.keys() and all(torch.equal(fake[k], second[k]) for k in fake)
    reread = conv_sqllm("--original_model_path", original, "--w_bit", 3, "--gradients", tmp_path / "grads.pt",
                        "--quantized_output", tmp_path / "q-again")
    assert reread.returncode == 0, reread.stderr[-2000:]
    for sub in ("lut_3", "weights"):
        for index in range(2):
            first = load_pickled_dict(tmp_path / "q" / sub / f"l{index}.pt")
            other = load_pickled_dict(tmp_path / "q-again" / sub / f"l{index}.pt")
            assert all(torch.equal(first[m], other[m]) for m in first)


def test_kmeans_beside_the_sensitivity_writes_the_same_tables(phi3_pair, tmp_path):
    """The k-means on its own thread (as on a GPU), handed layers from the top down with at most one
    waiting, writes the same tables as run in order on the caller's thread, and they equal seed_luts of
    each weight; a layer already there is not computed again; an error on the thread reaches the caller."""
    from common.io.model_files import Checkpoint
    from common.layers import find_layers
    from common.quant.seed_luts import seed_luts
    from common.quant.sqllm import ComputedTables
    from common.quant.sqllm_quantize import LayerKMeans
    checkpoint = Checkpoint(phi3_pair[0], "--model")
    layout = find_layers(checkpoint)
    generator = torch.Generator().manual_seed(1)
    sensitivity = {layer.index: {m: torch.rand(checkpoint.tensors[n].shape, generator=generator).to(torch.bfloat16)
                                 for m, n in layer.linears.items()} for layer in layout.layers}
    tables = {name: ComputedTables(tmp_path / name, 3, 0) for name in ("inline", "beside")}
    for name, beside, order in (("inline", False, [0, 1]), ("beside", True, [1, 0])):
        kmeans = LayerKMeans(checkpoint, layout, tables[name], 0, beside=beside, ahead=1)
        try:
            for index in order:
                kmeans.submit(index, sensitivity[index])
            kmeans.finish()
        finally:
            kmeans.close()
        assert kmeans.beside == beside and kmeans.seconds > 0
    for layer in layout.layers:
        first, other = tables["inline"].read_layer(layer.index), tables["beside"].read_layer(layer.index)
        for module, name in layer.linears.items():
            lut, codes = seed_luts(checkpoint.read(name), sensitivity[layer.index][module], 3)
            for got in (first, other):
                assert torch.equal(got[0][module], lut) and torch.equal(got[1][module], codes)
    tables["beside"].file(1).unlink()
    again = LayerKMeans(checkpoint, layout, tables["beside"], 0, beside=True)
    try:
        again.submit(0, {})  # there already: nothing to compute, so no sensitivity needed
        again.submit(1, {})  # layer 1's tables are gone: computed, and the missing sensitivity surfaces
        with pytest.raises(KeyError):
            again.finish()
    finally:
        again.close()
    assert not tables["beside"].file(1).exists() and not list((tmp_path / "beside").glob("*tmp*"))


def test_quantize_beside_the_sensitivity_equals_in_order(llama_pair, tmp_path):
    """quantize() with numba's warm-up and the k-means in threads beside the sensitivity (what a GPU
    run does) writes the same tables, and dumps the same sensitivity, as everything in order."""
    from common.io.model_files import Checkpoint
    from common.layers import find_layers
    from common.quant.sqllm import ComputedTables
    from common.quant.sqllm_quantize import quantize
    checkpoint = Checkpoint(llama_pair[0], "--model")
    layout = find_layers(checkpoint)
    samples = torch.randint(3, 500, (5, 32), generator=torch.Generator().manual_seed(2))
    results = {}
    for beside in (False, True):
        tables = ComputedTables(tmp_path / f"beside-{beside}", 3, 0)
        times = quantize(checkpoint, layout, 0, tables, lambda: samples, torch.device("cpu"), 2,
                         lambda items, **_: items, dump=tmp_path / f"grads-{beside}.pt", beside=beside)
        assert ("waiting for the k-means after it" in times) == beside and times["in all"] > 0
        results[beside] = [tables.read_layer(layer.index) for layer in layout.layers]
    for (luts, codes), (other_luts, other_codes) in zip(results[False], results[True]):
        assert luts.keys() == other_luts.keys() == codes.keys() == other_codes.keys()
        assert all(torch.equal(luts[m], other_luts[m]) and torch.equal(codes[m], other_codes[m]) for m in luts)
    first, other = (torch.load(tmp_path / f"grads-{beside}.pt", weights_only=True) for beside in (False, True))
    assert all(torch.equal(a[m], b[m]) for a, b in zip(first, other) for m in a)


def test_bad_sqllm_inputs(llama_pair, tokenizer, corpus_file, tmp_path):
    """Each ends with one line naming the problem, exit status 2, and nothing written."""
    from common.tiny_models import build_model
    from tests.helpers import assert_input_error
    original, _ = llama_pair
    out = ["--output_path", tmp_path / "fq"]
    data = ["--dataset", corpus_file, *CALIBRATION]

    def refused(*args, fragments):
        assert_input_error(conv_sqllm("--original_model_path", original, *args), *fragments)
        assert not (tmp_path / "fq").exists() and not (tmp_path / "packed").exists()

    refused("--w_bit", 9, *data, *out, fragments=("--w_bit 9", "2 to 8"))
    refused("--w_bit", 3, *data, fragments=("no output",))
    refused(*data, *out, fragments=("--quantized_path", "--w_bit"))
    (tmp_path / "q").mkdir()
    refused("--quantized_path", tmp_path / "q", "--gradients", tmp_path / "g.pt", *out,
            fragments=("--gradients", "only with --w_bit"))
    torch.save([{}], tmp_path / "other.pt")
    refused("--w_bit", 3, "--gradients", tmp_path / "other.pt", *out,
            fragments=("--gradients", "list of 2 layers, found 1", "another model"))
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    refused("--w_bit", 3, "--dataset", short, "--seq_len", 64, "--num_examples", 4, *out,
            fragments=("--dataset",))
    odd = tmp_path / "odd"
    build_model("llama", odd, tokenizer, hidden_size=48, intermediate_size=96, num_heads=4)
    assert_input_error(conv_sqllm("--original_model_path", odd, "--w_bit", 3, *data, "--packed_output",
                                  tmp_path / "packed"), "not a multiple of 32", "--packed_output")
    assert not (tmp_path / "packed").exists()
    blocked = tmp_path / "no-flash1dkmeans"
    blocked.mkdir()
    (blocked / "flash1dkmeans.py").write_text("raise ImportError('not installed here')\n")
    import os
    from tests.helpers import run_script
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    assert_input_error(run_script("conv_sqllm.py", "--original_model_path", original, "--w_bit", 3, *data, *out,
                                  "--device", "cpu", env=env), "flash1dkmeans", "pip install flash1dkmeans")
    assert not (tmp_path / "fq").exists()
