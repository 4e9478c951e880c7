#!/usr/bin/env python3
"""Share of identical nibbles and scales between two cheatsheet.pt files (e.g. ours vs the
reference script's output for the same models).

    python bench/compare_cheatsheets.py ours/cheatsheet.pt reference/cheatsheet.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.quant.residual import unpack_nibbles  # noqa: E402


def main() -> None:
    a = torch.load(sys.argv[1], weights_only=True, mmap=True)
    b = torch.load(sys.argv[2], weights_only=True, mmap=True)
    assert len(a) == len(b), "different layer counts"
    same = total = same_scales = total_scales = 0
    for layer_a, layer_b in zip(a, b):
        for module in sorted(set(layer_a) & set(layer_b)):
            na, nb = unpack_nibbles(layer_a[module]["cheatsheet"]), unpack_nibbles(layer_b[module]["cheatsheet"])
            same += int((na == nb).sum())
            total += na.numel()
            sa, sb = layer_a[module]["reordered_scales"], layer_b[module]["reordered_scales"]
            same_scales += int((sa == sb).sum())
            total_scales += sa.numel()
    print(f"{same / total:.6%} of {total} nibbles and {same_scales / total_scales:.6%} of {total_scales} "
          "scales identical")


if __name__ == "__main__":
    main()
