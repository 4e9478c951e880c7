#!/usr/bin/env python3
"""Write a seeded random Llama-shaped FP16 model straight to safetensors (no transformers model
is built, so an 8B or 70B shape takes seconds and little memory), with a small local tokenizer.

    python bench/synthetic.py --shape 8b --out /tmp/bench/original
    python bench/synthetic.py --shape 70b --layers 4 --out /tmp/bench/70b
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.io.model_writer import ShardedModelWriter  # noqa: E402
from common.tiny_models import local_corpus, train_tokenizer  # noqa: E402

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, num_hidden_layers=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                vocab_size=128256, num_hidden_layers=80),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                      vocab_size=32000, num_hidden_layers=22),
}


def tensor_plan(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    plan = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        plan += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                 (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                 (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                 (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                 (p + "post_attention_layernorm.weight", (h,))]
    return plan + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(args.seed)
    plan = tensor_plan(shape)
    writer = ShardedModelWriter(out, [(n, s, torch.float16) for n, s in plan], 5 * 10 ** 9)
    for name, size in plan:
        if len(size) == 1:
            tensor = torch.ones(size, dtype=torch.float16, device=device)
            tensor[[3, 17, 40]] = 25.0  # activation outlier channels, as real LLMs have
        else:
            tensor = (torch.randn(size, generator=generator, device=device) * 0.02).half()
        writer.write(name, tensor)
    writer.finish()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
              "dtype": "float16", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu", **shape}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    train_tokenizer(local_corpus(), vocab_size=1024).save_pretrained(out)
    print(f"wrote {out} ({shape['num_hidden_layers']} layers)")


if __name__ == "__main__":
    main()
