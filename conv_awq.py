#!/usr/bin/env python3
"""AWQ (or plain round-to-nearest) -> the scaled FP16 model and its fake-quantized twin.

With AWQ, DecDEC's "original model" is the *scaled* model (AWQ folds per-channel scales into
the weights before quantizing): give --scaled_output to cheatsheet.py as --original_model.
Without --awq_results this is plain RTN quantization.

Example:
    python conv_awq.py --model_path meta-llama/Llama-3.1-8B --awq_results awq-llama3-8b-w3-g128.pt \\
        --w_bit 3 --q_group_size 128 --scaled_output ./llama3-8b-awq-scaled --fakequant_output ./llama3-8b-awq-fq
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports, to report their cost

import argparse  # noqa: E402
import sys
from pathlib import Path

import torch

from common.awq import LayerTransforms, apply_scales, clip_weight, load_results, pseudo_quantize, split_by_layer
from common.cli import add_device_arg, add_output_args, pick_device, progress
from common.convert import convert_model
from common.errors import InputError, run_main
from common.layers import find_layers
from common.model_files import Checkpoint, resolve_model_dir
from common.model_writer import parse_size
from common.readahead import start_readahead


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="original model: directory or cached hub id")
    parser.add_argument("--awq_results", default=None,
                        help="llm-awq search results (--dump_awq file); omit for plain round-to-nearest")
    parser.add_argument("--w_bit", type=int, default=3, choices=[2, 3, 4, 8], help="weight bits (default 3)")
    parser.add_argument("--q_group_size", type=int, default=128,
                        help="input channels per quantization group (default 128; -1: whole rows)")
    parser.add_argument("--no_zero_point", action="store_true", help="symmetric quantization (no zero point)")
    parser.add_argument("--scaled_output", default=None,
                        help="write the scaled FP16 model here (cheatsheet.py's --original_model for AWQ)")
    parser.add_argument("--fakequant_output", default=None, help="write the fake-quantized FP16 model here")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_readahead([Path(args.model_path)])  # reading overlaps the checks and set-up below
    if not args.scaled_output and not args.fakequant_output:
        raise InputError("give --scaled_output, --fakequant_output or both")
    if args.q_group_size == 0 or args.q_group_size < -1:
        raise InputError(f"--q_group_size {args.q_group_size}: must be positive, or -1 for whole rows")
    device = pick_device(args.device)
    checkpoint = Checkpoint(resolve_model_dir(args.model_path, "--model_path"), "--model_path")
    layout = find_layers(checkpoint)
    if args.q_group_size > 0:
        for layer in layout.layers:
            for module, name in layer.linears.items():
                if checkpoint.tensors[name].shape[1] % args.q_group_size:
                    raise InputError(f"{checkpoint.dir}: tensor {name} has {checkpoint.tensors[name].shape[1]} "
                                     f"input channels, not divisible by --q_group_size {args.q_group_size}")
    if args.awq_results:
        path = Path(args.awq_results)
        transforms = split_by_layer(load_results(path), path, checkpoint, layout, args.q_group_size)
    else:
        transforms = [LayerTransforms() for _ in layout.layers]
    outputs = {key: Path(path) for key, path in (("scaled", args.scaled_output),
                                                  ("fakequant", args.fakequant_output)) if path}

    def transform(index: int, tensors: dict[str, torch.Tensor], _) -> dict[str, dict[str, torch.Tensor]]:
        apply_scales(tensors, transforms[index])
        scaled = {name: t.half() for name, t in tensors.items()}
        for name, tensor in scaled.items():
            if not torch.isfinite(tensor).all():
                raise InputError(f"{checkpoint.dir}: layer {index} {name} is not finite in float16 after scaling")
        results = {"scaled": scaled}
        if "fakequant" in outputs:
            fake = dict(scaled)
            for module in layout.layers[index].linears:
                weight = scaled[f"{module}.weight"].float()
                if module in transforms[index].clips:
                    weight = clip_weight(weight, transforms[index].clips[module])
                fake[f"{module}.weight"] = pseudo_quantize(weight, args.w_bit, args.q_group_size,
                                                           not args.no_zero_point).half()
            results["fakequant"] = fake
        return {key: results[key] for key in outputs}

    convert_model(checkpoint, layout, outputs, transform, device, parse_size(args.max_shard_size),
                  args.overwrite, lambda items, desc, total: progress(items, args.quiet, desc, total))
    if not args.quiet:
        print(f"{len(layout.layers)} layers on {device} in {time.time() - PROCESS_STARTED:.1f} s -> "
              + ", ".join(str(p) for p in outputs.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
