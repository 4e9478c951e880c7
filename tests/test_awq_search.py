"""conv_awq.py without the fork (issue 11): the search against a direct, loop-by-loop
implementation of SPEC §7 written here, the calibration sampler by hand, the LUT-GEMM checkpoint
decoded back to the fake-quantized weights, per-layer bits, and every bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from common.calib.calibration import sample_awq_blocks
from common.quant.lutgemm import decode
from common.tiny_models import build_model
from tests.helpers import assert_input_error, run_script
from tests.test_cheatsheet import all_tensors

SEQLEN, N_SAMPLES, GROUP = 64, 48, 32


# -- a direct implementation of SPEC §7, the way the fork computes it ----------------------------

def q_direct(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """SPEC §7's zero-point quantizer, group by group."""
    rows = w.reshape(-1, group)
    top = 2 ** bits - 1
    s = (rows.amax(1, keepdim=True) - rows.amin(1, keepdim=True)).clamp(min=1e-5) / top
    z = (-torch.round(rows.amin(1, keepdim=True) / s)).clamp(0, top)
    return ((torch.clamp(torch.round(rows / s) + z, 0, top) - z) * s).reshape(w.shape)


def groups_of(layer: nn.Module) -> list[tuple[str, list[str], str, bool]]:
    if hasattr(layer.self_attn, "qkv_proj"):
        return [("input_layernorm", ["self_attn.qkv_proj"], "self_attn", True),
                ("post_attention_layernorm", ["mlp.gate_up_proj"], "mlp", False),
                ("mlp.gate_up_proj", ["mlp.down_proj"], "mlp.down_proj", False)]
    groups = [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn", True)]
    if layer.self_attn.v_proj.weight.shape == layer.self_attn.o_proj.weight.shape:
        groups.append(("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj", False))
    return groups + [("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp", False),
                     ("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj", False)]


class Stop(Exception):
    pass


@torch.no_grad()
def direct_awq(model_dir: Path, blocks: torch.Tensor, bits: list[int], group: int) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    caught = {}

    def catch(module, args, kwargs):
        caught["x"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "use_cache")}
        raise Stop
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(input_ids=blocks, use_cache=False)
    except Stop:
        pass
    handle.remove()
    x, kwargs = caught["x"], caught["kwargs"]
    results: dict = {"scale": [], "clip": []}
    for i, layer in enumerate(layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        feats: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, a[0].clone()))
                 for n, m in linears.items()]
        out = layer(x, **kwargs)
        next_x = out[0] if isinstance(out, tuple) else out
        for hook in hooks:
            hook.remove()
        for prev, names, block_name, with_kwargs in groups_of(layer):
            block = layer.get_submodule(block_name)
            call = (lambda inp: block(inp, **kwargs)) if with_kwargs else block
            inp = feats[names[0]]
            org = call(inp)
            org = org[0] if isinstance(org, tuple) else org
            mean = inp.abs().reshape(-1, inp.shape[-1]).mean(0)
            saved = {n: linears[n].weight.data.clone() for n in names}
            best, best_s = float("inf"), None
            for r in range(20):
                s = mean.pow(r / 20).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for n in names:
                    linears[n].weight.data = q_direct(saved[n] * s.view(1, -1), bits[i], group) / s.view(1, -1)
                got = call(inp)
                got = got[0] if isinstance(got, tuple) else got
                loss = (org - got).float().pow(2).mean().item()
                if loss < best:
                    best, best_s = loss, s
                for n in names:
                    linears[n].weight.data = saved[n].clone()
            prev_module = layer.get_submodule(prev)
            if isinstance(prev_module, nn.Linear):
                prev_module.weight.data[-best_s.shape[0]:] /= best_s.view(-1, 1)
            else:
                prev_module.weight.data /= best_s
            for n in names:
                linears[n].weight.data *= best_s.view(1, -1)
                feats[n] = feats[n] / best_s.view(1, -1)
            results["scale"].append((f"model.layers.{i}.{prev}", tuple(f"model.layers.{i}.{n}" for n in names),
                                     best_s))
        for n, m in linears.items():
            if any(part in n for part in ("q_", "k_", "query", "key", "Wqkv")):
                continue
            w = m.weight.data.reshape(m.weight.shape[0], 1, -1, group)
            f = feats[n].reshape(-1, feats[n].shape[-1])
            f = f.reshape(1, f.shape[0], -1, group)
            f = f[:, 0::max(1, f.shape[1] // 512)]
            org = (f * w).sum(-1)
            org_max = w.abs().amax(-1, keepdim=True)
            best_max, min_err = org_max.clone(), torch.ones_like(org_max) * 1e9
            for step in range(10):
                limit = org_max * (1 - step / 20)
                q = q_direct(torch.clamp(w, -limit, limit), bits[i], group)
                err = ((f * q).sum(-1) - org).pow(2).mean(dim=1).view(min_err.shape)
                better = err < min_err
                min_err[better] = err[better]
                best_max[better] = limit[better]
            results["clip"].append((f"model.layers.{i}.{n}", best_max.squeeze(1)))
        x = next_x
    return results


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in corpus) + "\n")
    return path


@pytest.fixture(scope="module")
def awq_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Llama with and without grouped-query attention, Qwen2 (biases), Phi-3 (fused)."""
    root = tmp_path_factory.mktemp("awq-models")
    models = {"llama": {}, "llama-mha": {"num_key_value_heads": 4}, "qwen2": {}, "phi3": {}}
    for name, overrides in models.items():
        build_model(name.split("-")[0], root / name, tokenizer, **overrides)
    return {name: root / name for name in models}


def run_awq(model: Path, calib: Path, out: Path, *extra) -> None:
    result = run_script("conv_awq.py", "--model_path", model, "--run_awq", "--calib_data", calib, "--dtype", "float32",
                        "--n_samples", N_SAMPLES, "--seqlen", SEQLEN, "--q_group_size", GROUP, "--device", "cpu",
                        "--quiet", *extra)
    assert result.returncode == 0, result.stderr[-3000:]


def blocks_for(model: Path, calib: Path) -> torch.Tensor:
    from transformers import AutoTokenizer
    from common.calib.calibration import load_texts
    texts = load_texts(str(calib), keep_empty=True)
    return sample_awq_blocks(texts, AutoTokenizer.from_pretrained(model).encode, N_SAMPLES, SEQLEN)


def assert_same_results(ours: dict, direct: dict) -> None:
    assert [(p, tuple(n)) for p, n, _ in ours["scale"]] == [(p, tuple(n)) for p, n, _ in direct["scale"]]
    assert [n for n, _ in ours["clip"]] == [n for n, _ in direct["clip"]]
    for (_, names, got), (_, _, want) in zip(ours["scale"], direct["scale"]):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=0), names  # the same ratio of the grid
    same = total = 0
    for (name, got), (_, want) in zip(ours["clip"], direct["clip"]):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        same += int(torch.isclose(got, want, rtol=1e-5, atol=0).sum())
        total += want.numel()
    assert same >= 0.99 * total, (same, total)


# -- tests -----------------------------------------------------------------------------------------

def test_calibration_sampler_by_hand():
    # default_rng(42).permutation(6) visits 3, 2, 5, 4, 1, 0
    texts = ["a b c", "", "d e f g", "  h  ", "long " * 600, "i j"]
    encode = lambda text: [len(word) for word in text.split()] + ([0] if text else [])  # noqa: E731
    # 3 -> "h" [1, 0]; 2 -> [1, 1, 1, 1, 0]; 5 -> [1, 1, 0]; 4: 601 ids, skipped; 1: empty, skipped;
    # 0 -> [1, 1, 1, 0]: 14 ids, cut into 3 blocks of 4, the last 2 dropped
    blocks = sample_awq_blocks(texts, encode, n_samples=4, seqlen=4)
    assert blocks.tolist() == [[1, 0, 1, 1], [1, 1, 0, 1], [1, 0, 1, 1]]
    assert sample_awq_blocks(texts, encode, n_samples=2, seqlen=6).tolist() == [[1, 0, 1, 1, 1, 1]]
    with pytest.raises(Exception, match="7 tokens from 2 passages"):
        sample_awq_blocks(texts, encode, n_samples=2, seqlen=8)


@pytest.mark.parametrize("family", ["llama", "llama-mha", "qwen2", "phi3"])
def test_search_equals_the_direct_implementation(family, awq_models, calib_file, tmp_path):
    model = awq_models[family]
    run_awq(model, calib_file, tmp_path, "--dump_awq", tmp_path / "awq.pt", "--batch_size", 3)
    ours = torch.load(tmp_path / "awq.pt", weights_only=True)
    direct = direct_awq(model, blocks_for(model, calib_file), [3, 3], GROUP)
    assert_same_results(ours, direct)
    if family == "llama-mha":
        assert any(p.endswith("self_attn.v_proj") for p, _, _ in ours["scale"])
    if family == "phi3":
        clipped = {n for n, _ in ours["clip"]}  # "qkv_proj" holds none of q_, k_, query, key, Wqkv
        assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= clipped


def test_per_layer_bits_search_and_lutgemm_checkpoint(awq_models, calib_file, tmp_path):
    model = awq_models["llama"]
    bit_pt = tmp_path / "bits.pt"
    torch.save({0: 3, 1: 4}, bit_pt)
    run_awq(model, calib_file, tmp_path, "--bit_pt", bit_pt, "--dump_awq", tmp_path / "awq.pt",
            "--real_output", tmp_path / "real", "--fakequant_output", tmp_path / "fq",
            "--scaled_output", tmp_path / "scaled")
    ours = torch.load(tmp_path / "awq.pt", weights_only=True)
    assert_same_results(ours, direct_awq(model, blocks_for(model, calib_file), [3, 4], GROUP))
    assert json.loads((tmp_path / "real" / "bitwidth_map.json").read_text()) == {"0": 3, "1": 4}
    check_real_output(tmp_path / "real", tmp_path / "fq", model, {0: 3, 1: 4})
    # the search in one pass equals loading its results afterwards, output for output
    again = run_script("conv_awq.py", "--model_path", model, "--awq_results", tmp_path / "awq.pt", "--bit_pt", bit_pt,
                       "--q_group_size", GROUP, "--real_output", tmp_path / "real2", "--fakequant_output",
                       tmp_path / "fq2", "--scaled_output", tmp_path / "scaled2", "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    for a, b in (("fq", "fq2"), ("scaled", "scaled2")):
        first, second = all_tensors(tmp_path / a), all_tensors(tmp_path / b)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    first, second = (torch.load(tmp_path / f / "pytorch_model.bin", weights_only=True) for f in ("real", "real2"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def check_real_output(real: Path, fakequant: Path, original: Path, bits: dict[int, int]) -> None:
    """pytorch_model.bin has the fork's keys, dtypes and shapes and decodes to the fake-quantized model."""
    state = torch.load(real / "pytorch_model.bin", weights_only=True)
    fake, orig = all_tensors(fakequant), all_tensors(original)
    for name, tensor in orig.items():
        layer_linear = ".layers." in name and name.endswith(".weight") and tensor.ndim == 2
        if not layer_linear:
            assert state[name].dtype == torch.float16 and state[name].shape == tensor.shape, name
            assert torch.equal(state[name], fake[name]), name
            continue
        base, index = name[: -len(".weight")], int(name.split(".layers.")[1].split(".")[0])
        out_features, in_features = tensor.shape
        b = bits[index]
        assert name not in state
        assert state[f"{base}.binary"].dtype == torch.int32
        assert state[f"{base}.binary"].shape == (in_features // 32, b, out_features)
        assert state[f"{base}.alpha"].dtype == torch.float32
        assert state[f"{base}.alpha"].shape == (in_features // GROUP, b, out_features)
        assert state[f"{base}.q_bias"].shape == (in_features // GROUP, out_features)
        decoded = decode(state[f"{base}.binary"], state[f"{base}.alpha"], state[f"{base}.q_bias"])
        assert torch.equal(decoded.half(), fake[name]), name
        levels = torch.unique(fake[name][:, :GROUP][0])
        assert len(levels) <= 2 ** b
    assert (real / "config.json").is_file() and (real / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_lutgemm_checkpoint_of_other_families(family, awq_models, tmp_path):
    model = awq_models[family]
    result = run_script("conv_awq.py", "--model_path", model, "--q_group_size", GROUP, "--w_bit", 3, "--real_output",
                        tmp_path / "real", "--fakequant_output", tmp_path / "fq", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    check_real_output(tmp_path / "real", tmp_path / "fq", model, {0: 3, 1: 3})
    assert not (tmp_path / "real" / "bitwidth_map.json").exists()
    state = torch.load(tmp_path / "real" / "pytorch_model.bin", weights_only=True)
    if family == "qwen2":
        assert state["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    else:
        assert "model.layers.1.mlp.gate_up_proj.binary" in state


def test_tied_embeddings_give_the_head_its_own_entry(tokenizer, tmp_path):
    model = tmp_path / "tied"
    build_model("llama", model, tokenizer, tie_word_embeddings=True)
    assert "lm_head.weight" not in all_tensors(model)
    result = run_script("conv_awq.py", "--model_path", model, "--q_group_size", GROUP, "--real_output",
                        tmp_path / "real", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(tmp_path / "real" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])


def perplexity(model_dir: Path, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss.exp())


def test_awq_beats_round_to_nearest_on_a_trained_model(corpus, tmp_path):
    from common.tiny_models import save_model, train_briefly, train_tokenizer
    texts, held_out = [t for i, t in enumerate(corpus) if i % 10], corpus[::10]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model_dir = tmp_path / "trained"
    model = build_model("llama", model_dir, tokenizer, dtype=torch.float32, hidden_size=128, intermediate_size=256,
                        num_layers=2, num_heads=4)
    train_briefly(model, tokenizer, texts, steps=80)
    save_model(model.to(torch.float16), model_dir, tokenizer)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(texts))
    # 3 bit over whole rows: coarse enough that quantization clearly hurts this small model
    common = ["--model_path", model_dir, "--q_group_size", -1, "--w_bit", 3, "--quiet", "--device", "cpu"]
    for name, extra in (("rtn", []), ("awq", ["--run_awq", "--calib_data", calib, "--dtype", "float32",
                                              "--n_samples", 128, "--seqlen", 128])):
        result = run_script("conv_awq.py", *common, *extra, "--fakequant_output", tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
    ids = tokenizer("\n\n".join(held_out), return_tensors="pt").input_ids[0]
    ids = ids[: (ids.shape[0] // 128) * 128].reshape(-1, 128)[:16]
    original, rtn, awq = (perplexity(p, ids) for p in (model_dir, tmp_path / "rtn", tmp_path / "awq"))
    assert awq < rtn and awq - original < 0.8 * (rtn - original), (original, awq, rtn)


def test_bad_inputs(awq_models, calib_file, tmp_path, tokenizer):
    model = awq_models["llama"]
    out = ["--fakequant_output", tmp_path / "fq"]
    awq = ["--model_path", model, "--run_awq", "--calib_data", calib_file, "--q_group_size", GROUP]

    def refused(*args, fragments):
        assert_input_error(run_script("conv_awq.py", *args), *fragments)
        assert not (tmp_path / "fq").exists() and not (tmp_path / "real").exists()

    results = tmp_path / "r.pt"
    torch.save({"scale": [], "clip": []}, results)
    refused(*awq, "--awq_results", results, *out, fragments=("--run_awq and --awq_results",))
    refused("--model_path", model, "--load_awq", results, "--run_awq", *out, fragments=("exclude each other",))
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    refused("--model_path", model, "--run_awq", "--calib_data", short, "--q_group_size", GROUP, *out,
            fragments=("tokens", "fewer than one block of --seqlen 512"))
    for payload, fragments in (({0: 3}, ("no bit width for layer 1",)), ({0: 3, 1: 9}, ("layer 1", "9 bits")),
                               ({0: 3, 1: 2.5}, ("layer 1", "2.5")), ([3, 3], ("expected a dict",)),
                               ({0: 3, 1: 3, 2: 4, 31: 3}, ("layer(s) 2, 31", "the model lacks", "2 layers"))):
        torch.save(payload, tmp_path / "bits.pt")
        refused(*awq, "--bit_pt", tmp_path / "bits.pt", *out, fragments=fragments)
    refused("--model_path", model, "--real_output", tmp_path / "real", "--no_zero_point", "--q_group_size", GROUP,
            fragments=("--real_output", "zero point"))
    odd = tmp_path / "odd"
    build_model("llama", odd, tokenizer, hidden_size=48, intermediate_size=96, num_heads=4)
    refused("--model_path", odd, "--real_output", tmp_path / "real", "--q_group_size", 16,
            fragments=("input channels, not a multiple of 32", "model.layers.0."))
    refused("--model_path", model, "--real_output", tmp_path / "real", "--q_group_size", 48,
            fragments=("not divisible by --q_group_size 48",))
    gemma = tmp_path / "gemma"
    build_model("gemma2", gemma, tokenizer)
    refused("--model_path", gemma, "--run_awq", "--calib_data", calib_file, "--q_group_size", GROUP, *out,
            fragments=("Gemma2DecoderLayer", "not supported"))
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = run_script("conv_awq.py", "--model_path", model, "--run_awq", "--q_group_size", GROUP, *out, env=env)
    assert_input_error(result, "--calib_data pileval", "local file")
    refused("--model_path", model, "--dump_awq", tmp_path / "d.pt", fragments=("--dump_awq", "--run_awq"))
    refused("--model_path", model, fragments=("nothing to write",))


def test_float16_search_runs_and_writes_float32_results(awq_models, calib_file, tmp_path):
    """The fork's default dtype: limits and losses that overflow float16 must not break the search."""
    run_awq(awq_models["llama"], calib_file, tmp_path, "--dump_awq", tmp_path / "awq.pt", "--dtype", "float16")
    results = torch.load(tmp_path / "awq.pt", weights_only=True)
    assert len(results["scale"]) == 6 and len(results["clip"]) == 10
    for entry in [e[2] for e in results["scale"]] + [e[1] for e in results["clip"]]:
        assert entry.dtype == torch.float32 and torch.isfinite(entry).all() and (entry > 0).all()
