#!/usr/bin/env python3
"""Where one layer of the AWQ search spends its GPU time: the search of layer 0 (warm-up), then
layer 1 under torch.profiler; prints the stage times and the kernels by total GPU time.

    python bench/synthetic.py --shape 8b --layers 2 --out /tmp/bench/two-layers
    python bench/profile_awq_search.py /tmp/bench/two-layers /tmp/bench/calib.jsonl --n_samples 460
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.io.model_files import Checkpoint, round_to_float16  # noqa: E402
from common.layers import find_layers  # noqa: E402
from common.quant.awq_search import start_search  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("--n_samples", type=int, default=460)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda")
    checkpoint = Checkpoint(Path(args.model), "model")
    layout = find_layers(checkpoint)
    search = start_search(checkpoint, layout, device, args.calib, None, args.n_samples, args.seqlen,
                          torch.float16, args.batch_size)
    print("calibration tokens:", sum(item.hidden.shape[0] * item.hidden.shape[1] for item in search.inputs))

    def layer(index: int) -> None:
        tensors = {k: v.to(device).float() for k, v in checkpoint.read_named(layout.layers[index].tensor_names()).items()}
        round_to_float16(tensors, "bench")
        torch.cuda.synchronize()
        search.times.clear()
        search.times.lap("outside the search")
        begin = time.time()
        search.layer(index, tensors, 3, 128, True)
        torch.cuda.synchronize()
        print(f"layer {index}: {time.time() - begin:.2f} s;",
              ", ".join(f"{k} {v:.2f} s" for k, v in search.times.items() if k != "outside the search"))

    layer(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        layer(1)
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
