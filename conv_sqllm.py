#!/usr/bin/env python3
"""SqueezeLLM for DecDEC: quantize a model (sensitivity + k-means, SPEC §9), or read an Any-Precision LLM /
SqueezeLLM quantized folder; write the fake-quantized FP16 model, Any-Precision's quantized folder and/or
the packed checkpoint DecDEC's runtime loads.

Examples:
    python conv_sqllm.py --original_model_path meta-llama/Llama-3.1-8B --w_bit 3 --dataset ./c4-sample.jsonl \\
        --output_path ./llama3-8b-sqllm3-fq --packed_output ./llama3-8b-sqllm3
    python conv_sqllm.py --original_model_path meta-llama/Llama-3.1-8B \\
        --quantized_path ./cache/quantized/llama3-8b-w3 --output_path ./llama3-8b-sqllm3-fq
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports, to report their cost

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from common.cli import (add_device_arg, add_output_args, add_sampling_args, add_sensitivity_args,  # noqa: E402
                        pick_device, progress, report_written, seconds_by_stage)
from common.io.convert import convert_model  # noqa: E402
from common.errors import InputError, run_main  # noqa: E402
from common.layers import LayerLayout, find_layers  # noqa: E402
from common.io.model_dir import resolve_model_dir  # noqa: E402
from common.io.model_files import Checkpoint  # noqa: E402
from common.io.model_writer import parse_size  # noqa: E402
from common.io.outputs import atomic_dir, claimed_outputs  # noqa: E402
from common.quant.sqllm import QuantizedFolder, TableReader  # noqa: E402

OUTPUTS = {"output_path": "fakequant", "packed_output": "packed"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original_model_path", required=True, help="original model: directory or cached hub id")
    source = parser.add_argument_group("what to quantize with (one of)")
    source.add_argument("--quantized_path", default=None,
                        help="an Any-Precision / SqueezeLLM folder with lut_<bits>/l<i>.pt and weights/l<i>.pt")
    source.add_argument("--w_bit", type=int, default=None, help="quantize here, to this many bits (2 to 8)")
    source.add_argument("--bits", type=int, default=None,
                        help="with --quantized_path: the bit width to use when it holds several lut_<bits>")
    calib = parser.add_argument_group("the sensitivity's calibration (with --w_bit; thresholds.py's sampler)")
    add_sampling_args(calib)  # --random_state seeds the k-means too
    calib.add_argument("--batch_size", type=int, default=8, help="samples per forward and backward (default 8)")
    add_sensitivity_args(calib)
    out = parser.add_argument_group("outputs (at least one)")
    out.add_argument("--output_path", default=None, help="the fake-quantized FP16 model directory")
    out.add_argument("--quantized_output", default=None, help="with --w_bit: Any-Precision's quantized folder")
    out.add_argument("--packed_output", default=None,
                     help="the packed checkpoint DecDEC's runtime loads (pytorch_model.bin with qweight/lut<b>)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's own Python code")
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if (args.quantized_path is None) == (args.w_bit is None):
        raise InputError("give --quantized_path (an existing quantized folder) or --w_bit (quantize here), not both")
    if args.w_bit is not None and not 2 <= args.w_bit <= 8:
        raise InputError(f"--w_bit {args.w_bit}: must be from 2 to 8")
    if args.quantized_path is not None:
        for flag in ("gradients", "dump_gradients", "quantized_output"):
            if getattr(args, flag):
                raise InputError(f"--{flag}: only with --w_bit (--quantized_path is quantized already)")
    if not (args.output_path or args.packed_output or args.quantized_output or args.dump_gradients):
        raise InputError("no output: give --output_path, --packed_output, --quantized_output or --dump_gradients")
    for flag in ("seq_len", "num_examples", "batch_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    model_dir = resolve_model_dir(args.original_model_path, "--original_model_path")
    quantized = QuantizedFolder.open(Path(args.quantized_path), args.bits) if args.quantized_path else None
    outputs = {key: Path(getattr(args, flag)) for flag, key in OUTPUTS.items() if getattr(args, flag)}
    claimed = [(f"--{flag}", Path(getattr(args, flag))) for flag in (*OUTPUTS, "quantized_output", "dump_gradients")
               if getattr(args, flag)]
    inputs = [("--original_model_path", model_dir), ("--quantized_path", quantized.path if quantized else None),
              ("--gradients", Path(args.gradients) if args.gradients else None)]
    checkpoint = Checkpoint(model_dir, "--original_model_path")
    layout = find_layers(checkpoint)
    if args.packed_output:  # before any work
        from common.quant.anyprec import check_packed_words
        check_packed_words(checkpoint, layout, "--packed_output")
    with claimed_outputs(claimed, inputs, args.overwrite), tempfile.TemporaryDirectory(
            prefix=".sqllm-tables-", dir=Path(claimed[0][1]).absolute().parent) as scratch:
        quantized_in = ""
        if quantized is None:
            quantized, times = quantize(args, checkpoint, layout, device, Path(scratch))
            quantized_in = f" (quantization {seconds_by_stage(times)})"
        if outputs:
            convert(args, checkpoint, layout, quantized, outputs, device)
    written = [path for _, path in claimed]
    report_written(written, f"{len(layout.layers)} layers, {quantized.bits if quantized else args.w_bit}-bit, on "
                            f"{device} in {time.time() - PROCESS_STARTED:.1f} s{quantized_in}")
    return 0


def quantize(args: argparse.Namespace, checkpoint: Checkpoint, layout: LayerLayout, device: torch.device,
             scratch: Path) -> tuple[QuantizedFolder | None, dict[str, float]]:
    """The sensitivity (computed or read), then the seed LUTs and codes into a scratch folder the
    converters read, exported to --quantized_output if asked; with the seconds by stage."""
    from common.calib.thresholds_job import ThresholdsJob
    from common.quant.sqllm import ComputedTables
    from common.quant.sqllm_quantize import quantize as quantize_here
    job = ThresholdsJob(checkpoint.dir, args.dataset, args.text_column, args.sampling, args.seq_len,
                        args.num_examples, args.random_state, "bfloat16", args.batch_size, str(device),
                        args.trust_remote_code, "--original_model_path")
    tables = ComputedTables(scratch / "tables", args.w_bit, 0)
    if not (args.output_path or args.packed_output or args.quantized_output):
        tables = None  # the sensitivity alone (--dump_gradients)
    times = quantize_here(checkpoint, layout, args.random_state, tables, job.samples, device, args.batch_size,
                          lambda items, desc, total=None: progress(items, args.quiet, desc, total),
                          Path(args.gradients) if args.gradients else None,
                          Path(args.dump_gradients) if args.dump_gradients else None, int(args.stash_gib * 2 ** 30),
                          scratch, args.trust_remote_code)
    if tables is not None and args.quantized_output:
        with atomic_dir(Path(args.quantized_output), args.overwrite) as folder:
            tables.export(folder, len(layout.layers))
    return tables, times


def convert(args: argparse.Namespace, checkpoint: Checkpoint, layout: LayerLayout, quantized: QuantizedFolder,
            outputs: dict[str, Path], device: torch.device) -> None:
    """Write the fake-quantized model and/or the packed checkpoint, in one pass over the model."""
    from common.quant.anyprec import PackedCheckpointWriter, packed_layer
    quantized.check_layers(len(layout.layers))

    def transform(index: int, tensors: dict[str, torch.Tensor], tables) -> dict[str, dict[str, torch.Tensor]]:
        shapes = {m: tuple(checkpoint.tensors[n].shape) for m, n in layout.layers[index].linears.items()}
        tables = tuple({module: table.to(device) for module, table in kind.items()} for kind in tables)  # packed there too
        # norms and biases as in the original; the LUTs and codes give every Linear weight
        fake = quantized.fake_quantized_layer(index, tables, shapes, device, checkpoint.dir)
        results = {}
        if "fakequant" in outputs:
            results["fakequant"] = {**tensors, **fake}
        if "packed" in outputs:
            luts, codes = tables
            results["packed"] = {**{k: t.half() for k, t in tensors.items()},
                                 **packed_layer(luts, codes, quantized.bits, quantized.shift)}
        return results

    writer_for = {"packed": lambda folder: PackedCheckpointWriter(folder, checkpoint, layout, quantized.bits)}
    with TableReader(quantized, len(layout.layers)) as tables:
        convert_model(checkpoint, layout, outputs, transform, device, parse_size(args.max_shard_size), args.overwrite,
                      lambda items, desc, total: progress(items, args.quiet, desc, total), tables.read_layer,
                      read_linears=False, writer_for=writer_for)  # the LUTs and codes replace every Linear weight


if __name__ == "__main__":
    run_main(main)
