#!/usr/bin/env python3
"""Any-Precision-LLM / SqueezeLLM quantized folder + original model -> fake-quantized FP16 model.

Example:
    python conv_sqllm.py --original_model_path meta-llama/Llama-3.1-8B \\
        --quantized_path ./cache/packed/llama3-8b-w3 --output_path ./llama3-8b-sqllm3-fq
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports, to report their cost

import argparse  # noqa: E402
from pathlib import Path

import torch

from common.cli import add_device_arg, add_output_args, pick_device, progress, report_written
from common.io.convert import convert_model
from common.errors import run_main
from common.layers import find_layers
from common.io.model_dir import resolve_model_dir
from common.io.model_files import Checkpoint
from common.io.model_writer import parse_size
from common.io.outputs import claimed_outputs
from common.quant.sqllm import QuantizedFolder, TableReader


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original_model_path", required=True, help="original model: directory or cached hub id")
    parser.add_argument("--quantized_path", required=True,
                        help="quantizer output folder with lut_<bits>/l<i>.pt and weights/l<i>.pt")
    parser.add_argument("--output_path", required=True, help="fake-quantized FP16 model directory to write")
    parser.add_argument("--bits", type=int, default=None,
                        help="bit width to use when the folder holds several lut_<bits> (an upscaled model)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quantized = QuantizedFolder.open(Path(args.quantized_path), args.bits)
    device = pick_device(args.device)
    model_dir = resolve_model_dir(args.original_model_path, "--original_model_path")
    output = Path(args.output_path)
    with claimed_outputs([("--output_path", output)], [("--original_model_path", model_dir),
                                                       ("--quantized_path", quantized.path)], args.overwrite):
        layers = convert(args, model_dir, quantized, output, device)
    report_written([output], f"{layers} layers, {quantized.bits}-bit, on {device} in {time.time() - PROCESS_STARTED:.1f} s")
    return 0


def convert(args: argparse.Namespace, model_dir: Path, quantized: QuantizedFolder, output: Path,
            device: torch.device) -> int:
    """Write the fake-quantized model; returns the number of decoder layers."""
    checkpoint = Checkpoint(model_dir, "--original_model_path")
    layout = find_layers(checkpoint)
    quantized.check_layers(len(layout.layers))

    def transform(index: int, tensors: dict[str, torch.Tensor], tables) -> dict[str, dict[str, torch.Tensor]]:
        shapes = {m: tuple(checkpoint.tensors[n].shape) for m, n in layout.layers[index].linears.items()}
        # norms and biases as in the original; the LUTs and codes give every Linear weight
        return {"fakequant": {**tensors, **quantized.fake_quantized_layer(index, tables, shapes, device,
                                                                           checkpoint.dir)}}

    with TableReader(quantized, len(layout.layers)) as tables:
        convert_model(checkpoint, layout, {"fakequant": output}, transform, device,
                      parse_size(args.max_shard_size), args.overwrite,
                      lambda items, desc, total: progress(items, args.quiet, desc, total), tables.read_layer,
                      read_linears=False)  # the LUTs and codes replace every Linear weight
    return len(layout.layers)


if __name__ == "__main__":
    run_main(main)
