"""conv_awq.py: scaling preserves the model, clip + pseudo-quantization follow llm-awq, RTN mode,
and every bad input."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.quant.awq import pseudo_quantize
from common.tiny_models import build_model
from tests.helpers import assert_input_error, run_script
from tests.test_cheatsheet import all_tensors


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def awq_results(layers: int, hidden: int, intermediate: int, seed: int = 0, clip: bool = False) -> dict:
    """Random positive scales for every entry kind llm-awq writes for Llama-style layers."""
    generator = torch.Generator().manual_seed(seed)

    def scales(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator) * 1.5 + 0.5

    entries, clips = [], []
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [
            (p + "input_layernorm", [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
             scales(hidden)),
            (p + "self_attn.v_proj", [p + "self_attn.o_proj"], scales(hidden)),
            (p + "post_attention_layernorm", [p + "mlp.gate_proj", p + "mlp.up_proj"], scales(hidden)),
            (p + "mlp.up_proj", [p + "mlp.down_proj"], scales(intermediate)),
        ]
        if clip:
            clips.append((p + "mlp.gate_proj", torch.full((intermediate, 2, 1), 0.01)))
    return {"scale": entries, "clip": clips}


@pytest.fixture(scope="module")
def mha_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Llama and Qwen2 without GQA, so that v_proj -> o_proj scaling applies (as in llm-awq)."""
    root = tmp_path_factory.mktemp("mha")
    return {family: root / family for family in ("llama", "qwen2")
            if build_model(family, root / family, tokenizer, num_key_value_heads=4) is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scaling_alone_preserves_the_logits(family, mha_models, tmp_path):
    original = mha_models[family]
    results = tmp_path / "awq.pt"
    torch.save(awq_results(2, 64, 128), results)
    result = run_script("conv_awq.py", "--model_path", original, "--awq_results", results, "--w_bit", 3,
                        "--q_group_size", 32, "--scaled_output", tmp_path / "scaled", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    base, scaled = logits(original, ids), logits(tmp_path / "scaled", ids)
    error = (base - scaled).abs().max()
    assert error < 2e-2, error  # float16 rounding of the scaled weights (float32: see below)
    # the check is sharp: leaving out one compensation (a norm keeps its weight) breaks it
    tensors = all_tensors(tmp_path / "scaled")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "scaled", broken)
    changed = dict(tensors)
    changed["model.layers.1.post_attention_layernorm.weight"] = \
        all_tensors(original)["model.layers.1.post_attention_layernorm.weight"]
    for file in broken.glob("*.safetensors"):
        save_file({k: changed[k] for k in load_file(str(file))}, str(file), metadata={"format": "pt"})
    assert (base - logits(broken, ids)).abs().max() > 10 * error
    assert not torch.equal(tensors["model.layers.0.mlp.down_proj.weight"],
                           all_tensors(original)["model.layers.0.mlp.down_proj.weight"])
    if family == "qwen2":  # v_proj's bias is divided too
        assert not torch.equal(tensors["model.layers.0.self_attn.v_proj.bias"],
                               all_tensors(original)["model.layers.0.self_attn.v_proj.bias"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scaling_is_exact_in_float32(family, mha_models):
    from transformers import AutoModelForCausalLM
    from common.quant.awq import LayerTransforms, apply_scales
    base = AutoModelForCausalLM.from_pretrained(mha_models[family], dtype=torch.float32).eval()
    scaled = AutoModelForCausalLM.from_pretrained(mha_models[family], dtype=torch.float32).eval()
    state = scaled.state_dict()
    for index in range(2):
        prefix = f"model.layers.{index}."
        transforms = LayerTransforms([(prev[len(prefix):], [n[len(prefix):] for n in names], scales)
                                      for prev, names, scales in awq_results(2, 64, 128)["scale"]
                                      if prev.startswith(prefix)])
        apply_scales({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, transforms)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (base(input_ids=ids).logits - scaled(input_ids=ids).logits).abs().max()
    assert error < 1e-4, error
    assert not torch.equal(state["model.layers.0.mlp.down_proj.weight"],
                           base.state_dict()["model.layers.0.mlp.down_proj.weight"])


def test_pseudo_quantize_against_a_direct_per_group_computation():
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    for zero_point in (True, False):
        got = pseudo_quantize(weight, 3, 16, zero_point)
        for r in range(6):
            for g in range(4):
                w = weight[r, g * 16:(g + 1) * 16]
                if zero_point:
                    scale = max(float(w.max() - w.min()), 1e-5) / 7
                    zero = min(max(-round(float(w.min()) / scale), 0), 7)
                    want = [(min(max(round(float(v) / scale) + zero, 0), 7) - zero) * scale for v in w]
                else:
                    scale = max(float(w.abs().max()), 1e-5) / 3
                    want = [min(max(round(float(v) / scale), -4), 3) * scale for v in w]
                assert torch.allclose(got[r, g * 16:(g + 1) * 16], torch.tensor(want), atol=1e-6)
                assert len(set(got[r, g * 16:(g + 1) * 16].tolist())) <= 8
        again = pseudo_quantize(got, 3, 16, zero_point)
        assert torch.allclose(again, got, atol=1e-6)


def test_clip_only_in_fakequant_and_rtn_equals_empty_results(llama_pair, tmp_path):
    original, _ = llama_pair
    results = tmp_path / "clip.pt"
    torch.save({"scale": [], "clip": [("model.layers.1.mlp.gate_proj", torch.full((128, 2, 1), 0.01))]}, results)
    empty = tmp_path / "empty.pt"
    torch.save({"scale": [], "clip": []}, empty)
    common = ["--model_path", original, "--w_bit", 3, "--q_group_size", 32, "--quiet"]
    for name, extra in (("rtn", []), ("empty", ["--awq_results", empty]), ("clip", ["--awq_results", results])):
        result = run_script("conv_awq.py", *common, *extra, "--scaled_output", tmp_path / f"{name}-s",
                            "--fakequant_output", tmp_path / f"{name}-fq")
        assert result.returncode == 0, result.stderr[-2000:]
    for kind in ("s", "fq"):
        a, b = all_tensors(tmp_path / f"rtn-{kind}"), all_tensors(tmp_path / f"empty-{kind}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    orig = all_tensors(original)
    scaled = all_tensors(tmp_path / "clip-s")
    assert all(torch.equal(scaled[k], orig[k].half()) for k in orig)  # no scales: scaled == original
    clipped = all_tensors(tmp_path / "clip-fq")
    name = "model.layers.1.mlp.gate_proj.weight"
    want = pseudo_quantize(orig[name].float().clamp(-0.01, 0.01), 3, 32).half()
    assert torch.equal(clipped[name], want)
    assert clipped[name].abs().max() <= 4 * 0.02 / 7 + 1e-4  # clipped range, then at most 4 steps
    other = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(clipped[other], pseudo_quantize(orig[other].half(), 3, 32).half())  # float16, as the fork
    assert torch.equal(clipped["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])
    assert torch.equal(clipped["lm_head.weight"], orig["lm_head.weight"])
    result = run_script("cheatsheet.py", "--original_model", tmp_path / "clip-s", "--quantized_model",
                        tmp_path / "clip-fq", "--save_path", tmp_path / "cs", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]


def expect_refusal(tmp_path: Path, model: Path, payload, *fragments: str, group: int = 32) -> None:
    results = tmp_path / "bad.pt"
    if payload is not None:
        torch.save(payload, results)
    args = ["--awq_results", results] if payload is not None else []
    result = run_script("conv_awq.py", "--model_path", model, *args, "--q_group_size", group,
                        "--scaled_output", tmp_path / "s", "--fakequant_output", tmp_path / "fq")
    assert_input_error(result, *fragments)
    assert not (tmp_path / "s").exists() and not (tmp_path / "fq").exists()
    assert not any(p.name.startswith((".s.tmp", ".fq.tmp")) for p in tmp_path.iterdir())


def test_bad_inputs(llama_pair, tmp_path):
    original, _ = llama_pair
    p = "model.layers.0."
    expect_refusal(tmp_path, original, {"scale": [(p + "input_layernorm", [p + "self_attn.x_proj"], torch.ones(64))],
                                        "clip": []}, "self_attn.x_proj", "not in the model")
    expect_refusal(tmp_path, original, {"scale": [(p + "input_layernorm", [p + "self_attn.q_proj"], torch.ones(60))],
                                        "clip": []}, "60 scales", "q_proj")
    expect_refusal(tmp_path, original, {"scale": [], "clip": [(p + "mlp.up_proj", torch.ones(128, 3, 1))]},
                   "max_val", "mlp.up_proj")
    expect_refusal(tmp_path, original, None, "divisible by --q_group_size 48", group=48)
    nan = torch.ones(64)
    nan[3] = float("nan")
    expect_refusal(tmp_path, original, {"scale": [(p + "input_layernorm", [p + "self_attn.q_proj"], nan)],
                                        "clip": []}, "finite")
    expect_refusal(tmp_path, original, {"scale": [], "clip": [], "extra": argparse.Namespace(a=1)},
                   "bad.pt", "refused")


def test_scales_fold_in_the_forks_float16_order(mha_models, tmp_path):
    """SPEC §7.6: the fork applies each entry in place on its float16 model, in entry order, so every
    multiply and divide rounds to float16 and up_proj (× its norm's scales, then ÷ its own) rounds twice.
    The scaled output equals that, restated here on transformers' float16 modules, bit for bit; one
    float32 fold rounded once (what we did before issue 22) does not."""
    from transformers import AutoModelForCausalLM
    original = mha_models["qwen2"]  # v_proj's bias is divided too
    results = awq_results(2, 64, 128, seed=3)
    torch.save(results, tmp_path / "awq.pt")
    result = run_script("conv_awq.py", "--model_path", original, "--awq_results", tmp_path / "awq.pt", "--w_bit", 3,
                        "--q_group_size", 32, "--scaled_output", tmp_path / "scaled", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    fork = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float16)
    with torch.no_grad():
        for prev_name, names, scales in results["scale"]:
            prev = fork.get_submodule(prev_name)
            if isinstance(prev, torch.nn.Linear):
                prev.weight[-scales.shape[0]:].div_(scales.view(-1, 1))
                if prev.bias is not None:
                    prev.bias.div_(scales.view(-1))
            else:
                prev.weight.div_(scales)
            for name in names:
                fork.get_submodule(name).weight.mul_(scales.view(1, -1))
    ours = all_tensors(tmp_path / "scaled")
    state = fork.state_dict()
    assert {name for name in ours if ".layers." in name} <= set(state)
    for name, tensor in ours.items():
        assert torch.equal(tensor, state[name]), name
    up = "model.layers.0.mlp.up_proj.weight"
    (_, _, by_norm), (_, _, by_own) = results["scale"][2], results["scale"][3]
    once = (all_tensors(original)[up].half().float() * by_norm[None, :] / by_own[:, None]).half()
    assert not torch.equal(once, ours[up])
