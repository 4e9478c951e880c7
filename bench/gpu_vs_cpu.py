#!/usr/bin/env python3
"""Same inputs, GPU vs CPU: the share of identical cheatsheet nibbles and scales (SPEC §3 asks
for bit-identical, at least 99.9 %). Works on any model pair.

    python bench/gpu_vs_cpu.py ORIGINAL FAKEQUANT
"""
from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.quant.cheatsheet_build import residual_outputs, CheatsheetOptions  # noqa: E402
from common.layers import find_layers  # noqa: E402
from common.io.model_files import Checkpoint  # noqa: E402
from common.quant.residual import unpack_nibbles  # noqa: E402


def main() -> None:
    original, quantized = Checkpoint(Path(sys.argv[1])), Checkpoint(Path(sys.argv[2]))
    layout, quantized_layout = find_layers(original), find_layers(quantized)
    same = total = same_scales = total_scales = 0
    for layer, other in zip(layout.layers, quantized_layout.layers):
        for module, name in layer.linears.items():
            w_o, w_q = original.read(name), quantized.read(other.linears[module])
            cpu = residual_outputs(w_o, w_q, CheatsheetOptions())
            gpu = residual_outputs(w_o.cuda(), w_q.cuda(), CheatsheetOptions())
            a, b = unpack_nibbles(cpu["cheatsheet/cheatsheet"]), unpack_nibbles(gpu["cheatsheet/cheatsheet"].cpu())
            same += int((a == b).sum())
            total += a.numel()
            same_scales += int((cpu["cheatsheet/scales"] == gpu["cheatsheet/scales"].cpu()).sum())
            total_scales += a.shape[0]
    print(f"GPU vs CPU: {same / total:.5%} of {total} nibbles identical, "
          f"{same_scales / total_scales:.5%} of {total_scales} row scales identical")


if __name__ == "__main__":
    main()
