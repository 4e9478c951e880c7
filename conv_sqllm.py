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
from common.convert import convert_model
from common.errors import InputError, run_main
from common.layers import find_layers
from common.model_files import Checkpoint, resolve_model_dir
from common.model_writer import parse_size
from common.outputs import claimed_outputs
from common.sqllm import dequantize, load_pickled_dict, lut_bit_widths


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
    quantized = Path(args.quantized_path)
    widths = lut_bit_widths(quantized)
    if args.bits is None and len(widths) > 1:
        raise InputError(f"--quantized_path {quantized}: holds lut_{{{','.join(map(str, widths))}}}; "
                         "choose one with --bits")
    bits = args.bits if args.bits is not None else widths[0]
    if bits not in widths:
        raise InputError(f"--bits {bits}: {quantized} has no lut_{bits} folder (it has {widths})")
    shift = max(widths) - bits  # codes are stored for the largest bit width
    device = pick_device(args.device)
    model_dir = resolve_model_dir(args.original_model_path, "--original_model_path")
    output = Path(args.output_path)
    with claimed_outputs([("--output_path", output)], [("--original_model_path", model_dir),
                                                       ("--quantized_path", quantized)], args.overwrite):
        layers = convert(args, model_dir, quantized, bits, shift, output, device)
    report_written([output], f"{layers} layers, {bits}-bit, on {device} in {time.time() - PROCESS_STARTED:.1f} s")
    return 0


def convert(args: argparse.Namespace, model_dir: Path, quantized: Path, bits: int, shift: int, output: Path,
            device: torch.device) -> int:
    """Write the fake-quantized model; returns the number of decoder layers."""
    checkpoint = Checkpoint(model_dir, "--original_model_path")
    layout = find_layers(checkpoint)
    for index in range(len(layout.layers)):
        for folder in (f"lut_{bits}", "weights"):
            if not (quantized / folder / f"l{index}.pt").is_file():
                raise InputError(f"{quantized / folder / f'l{index}.pt'}: missing "
                                 f"(the model has {len(layout.layers)} layers)")

    def read_quantized(index: int) -> tuple[dict, dict]:
        return (load_pickled_dict(quantized / f"lut_{bits}" / f"l{index}.pt"),
                load_pickled_dict(quantized / "weights" / f"l{index}.pt"))

    def transform(index: int, tensors: dict[str, torch.Tensor], extras) -> dict[str, dict[str, torch.Tensor]]:
        luts, codes = extras
        linears = layout.layers[index].linears
        for source, table in ((f"lut_{bits}", luts), ("weights", codes)):
            unknown = sorted(set(table) - set(linears))
            if unknown:
                raise InputError(f"{quantized / source / f'l{index}.pt'}: {unknown[0]} is not a Linear of layer "
                                 f"{index} of {checkpoint.dir}")
            missing = sorted(set(linears) - set(table))
            if missing:
                raise InputError(f"{quantized / source / f'l{index}.pt'}: module {missing[0]} is missing")
        result = dict(tensors)  # norms and biases, as in the original
        for module, name in linears.items():
            where = f"{quantized}/{{lut_{bits},weights}}/l{index}.pt: {module}"
            weight = dequantize(luts[module].to(device), codes[module].to(device), shift, where,
                                tuple(checkpoint.tensors[name].shape))
            result[f"{module}.weight"] = weight
        return {"fakequant": result}

    convert_model(checkpoint, layout, {"fakequant": output}, transform, device,
                  parse_size(args.max_shard_size), args.overwrite,
                  lambda items, desc, total: progress(items, args.quiet, desc, total), read_quantized,
                  read_linears=False)  # the LUTs and codes replace every Linear weight
    return len(layout.layers)


if __name__ == "__main__":
    run_main(main)
