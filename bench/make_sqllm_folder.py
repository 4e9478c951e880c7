#!/usr/bin/env python3
"""Write a synthetic Any-Precision/SqueezeLLM b-bit folder for a model (random codes, sorted
per-row LUTs), saved as NumPy arrays with [out, 1, .] shapes like the quantizer writes them.

For timing only: the codes are random, not a quantization of the model's weights, so the model it
gives is noise and its cheatsheet's residuals are as large as the weights. For a real SqueezeLLM
folder, run Any-Precision LLM's quantizer.

    python bench/make_sqllm_folder.py --model /tmp/bench/original --bits 3 --out /tmp/bench/sqllm3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.layers import find_layers  # noqa: E402
from common.io.model_files import Checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    checkpoint = Checkpoint(Path(args.model))
    layout = find_layers(checkpoint)
    out = Path(args.out)
    (out / f"lut_{args.bits}").mkdir(parents=True, exist_ok=True)
    (out / "weights").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for layer in layout.layers:
        luts, codes = {}, {}
        for module, name in layer.linears.items():
            rows, cols = checkpoint.tensors[name].shape
            lut = (torch.randn(rows, 2 ** args.bits, generator=generator) * 0.02).sort(dim=1).values
            luts[module] = lut.numpy()[:, None, :]
            codes[module] = torch.randint(0, 2 ** args.bits, (rows, 1, cols), generator=generator,
                                          dtype=torch.uint8).numpy()
        torch.save(luts, out / f"lut_{args.bits}" / f"l{layer.index}.pt")
        torch.save(codes, out / "weights" / f"l{layer.index}.pt")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
