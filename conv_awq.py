#!/usr/bin/env python3
"""AWQ without the fork: search, scaled, fake-quantized and LUT-GEMM models in one pass.

One read of the original model, a decoder layer at a time: --run_awq searches the AWQ scales
and clips on calibration text (or --awq_results loads a search done earlier; neither means plain
round-to-nearest), then each layer goes to every output asked for:
  --scaled_output     the scaled FP16 model (with AWQ, DecDEC's "original model")
  --fakequant_output  its fake-quantized FP16 twin (cheatsheet.py's --quantized_model)
  --real_output       the LUT-GEMM checkpoint DecDEC's runtime loads (pytorch_model.bin)
  --dump_awq          the search results, llm-awq's file format

Example, the whole AWQ path for DecDEC (then cheatsheet.py and thresholds.py into the same DIR):
    python conv_awq.py --model_path meta-llama/Llama-3.1-8B --run_awq --calib_data ./pile-val.jsonl.zst \\
        --w_bit 3 --q_group_size 128 --dump_awq awq-llama3-8b-w3.pt --real_output ./llama3-8b-awq-w3 \\
        --scaled_output ./llama3-8b-awq-scaled --fakequant_output ./llama3-8b-awq-w3-fq
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports, to report their cost

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from common.quant.awq import (LayerTransforms, Quantizer, check_quantizable, layer_outputs,  # noqa: E402
                        load_bit_widths, load_results, split_by_layer)
from common.quant.awq_search import start_search  # noqa: E402
from common.cli import (add_device_arg, add_output_args, pick_device, progress, report_written,  # noqa: E402
                        seconds_by_stage)
from common.io.convert import convert_model  # noqa: E402
from common.errors import InputError, run_main  # noqa: E402
from common.layers import find_layers  # noqa: E402
from common.io.model_dir import resolve_model_dir  # noqa: E402
from common.io.model_files import Checkpoint, round_to_float16  # noqa: E402
from common.io.model_writer import parse_size  # noqa: E402
from common.io.outputs import check_free_space, claimed_outputs  # noqa: E402
from common.io.readahead import start_readahead  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OUTPUT_FLAGS = {"scaled": "--scaled_output", "fakequant": "--fakequant_output", "real": "--real_output"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="original model: directory or cached hub id")
    source = parser.add_argument_group("AWQ scales and clips (neither: plain round-to-nearest)")
    source.add_argument("--run_awq", action="store_true", help="search them on calibration text (llm-awq's search)")
    source.add_argument("--awq_results", "--load_awq", dest="awq_results", default=None,
                        help="load them from an earlier search (a --dump_awq file, ours or llm-awq's)")
    search = parser.add_argument_group("the search (--run_awq)")
    search.add_argument("--calib_data", default="pileval",
                        help="pileval (the hub dataset mit-han-lab/pile-val-backup; needs 'datasets' and network "
                             "or cache) or a local .txt/.jsonl[.gz|.zst]/.json/.parquet/.csv/.arrow file or "
                             "save_to_disk folder (default pileval)")
    search.add_argument("--text_column", default=None, help="text field of a local file (default: text)")
    search.add_argument("--n_samples", type=int, default=128, help="passages of at most 512 tokens (default 128)")
    search.add_argument("--seqlen", type=int, default=512, help="tokens per calibration block (default 512)")
    search.add_argument("--dtype", choices=list(DTYPES), default="float16",
                        help="dtype the search runs the layers in (default float16, as llm-awq)")
    search.add_argument("--batch_size", type=int, default=16,
                        help="calibration blocks per forward pass (memory only; default 16)")
    search.add_argument("--dump_awq", default=None, help="save the search results to this file")
    search.add_argument("--trust_remote_code", action="store_true",
                        help="allow the model's own Python code from its directory/hub repo")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--w_bit", type=int, default=3, choices=range(1, 9), metavar="{1..8}",
                       help="weight bits (default 3)")
    quant.add_argument("--bit_pt", default=None,
                       help="per-layer bit widths: a torch.save'd {layer_index: bits} covering every layer "
                            "(llm-awq's mixed-precision file); overrides --w_bit")
    quant.add_argument("--q_group_size", type=int, default=128,
                       help="input channels per quantization group (default 128; -1: whole rows)")
    quant.add_argument("--no_zero_point", action="store_true", help="symmetric quantization (no zero point)")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--scaled_output", default=None,
                         help="the scaled FP16 model (cheatsheet.py's --original_model and thresholds.py's "
                              "--model_path with AWQ)")
    outputs.add_argument("--fakequant_output", default=None, help="the fake-quantized FP16 model")
    outputs.add_argument("--real_output", default=None,
                         help="the LUT-GEMM checkpoint folder DecDEC's runtime loads (pytorch_model.bin, config, "
                              "tokenizer, bitwidth_map.json for mixed bits); put cheatsheet.pt and thresholds.pt "
                              "there too")
    outputs.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.run_awq and args.awq_results:
        raise InputError("--run_awq and --awq_results exclude each other: search, or load an earlier search")
    if args.dump_awq and not args.run_awq:
        raise InputError("--dump_awq saves a search: add --run_awq")
    if not (args.scaled_output or args.fakequant_output or args.real_output or args.dump_awq):
        raise InputError("nothing to write: give --scaled_output, --fakequant_output, --real_output "
                         "or (with --run_awq) --dump_awq")
    if args.q_group_size == 0 or args.q_group_size < -1:
        raise InputError(f"--q_group_size {args.q_group_size}: must be positive, or -1 for whole rows")
    if args.real_output and args.no_zero_point:
        raise InputError("--real_output needs the zero point: the LUT-GEMM format has no symmetric variant "
                         "(drop --no_zero_point)")
    for flag in ("n_samples", "seqlen", "batch_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run_awq:  # reading overlaps the checks below (a search reads after its set-up)
        start_readahead([Path(args.model_path)])
    check_args(args)
    device = pick_device(args.device)
    model_dir = resolve_model_dir(args.model_path, "--model_path")
    outputs = {key: Path(getattr(args, f"{key}_output")) for key in OUTPUT_FLAGS if getattr(args, f"{key}_output")}
    claimed = [(OUTPUT_FLAGS[key], path) for key, path in outputs.items()]
    if args.dump_awq:
        claimed.append(("--dump_awq", Path(args.dump_awq)))
    calib = Path(args.calib_data).expanduser() if args.run_awq else None
    inputs = [("--model_path", model_dir), ("--awq_results", Path(args.awq_results) if args.awq_results else None),
              ("--bit_pt", Path(args.bit_pt) if args.bit_pt else None),
              ("--calib_data", calib if calib is not None and calib.exists() else None)]
    with claimed_outputs(claimed, inputs, args.overwrite):
        layers, times = convert(args, model_dir, outputs, device)
    written = list(outputs.values()) + ([Path(args.dump_awq)] if args.dump_awq else [])
    report_written(written, f"{layers} layers on {device} in {time.time() - PROCESS_STARTED:.1f} s ({times})")
    return 0


def convert(args: argparse.Namespace, model_dir: Path, outputs: dict[str, Path],
            device: torch.device) -> tuple[int, str]:
    """Write every output; returns the number of decoder layers and where the time went."""
    checkpoint = Checkpoint(model_dir, "--model_path")
    layout = find_layers(checkpoint)
    check_quantizable(checkpoint, layout, args.q_group_size, lutgemm=bool(args.real_output))
    bits = load_bit_widths(Path(args.bit_pt), len(layout.layers)) if args.bit_pt else [args.w_bit] * len(layout.layers)
    if args.awq_results:
        path = Path(args.awq_results)
        transforms = split_by_layer(load_results(path), path, checkpoint, layout, args.q_group_size)
    else:
        transforms = [LayerTransforms() for _ in layout.layers]
    if args.dump_awq:
        check_free_space([(Path(args.dump_awq), results_bytes(checkpoint, layout), "--dump_awq")])
    started = time.time()
    # The search's set-up (imports, tokenizer, embeddings) runs first, and the model is read after it:
    # the search, not the disk, sets the pace of the layers, so reading during the set-up gains nothing,
    # while on a cold cache the imports' thousands of small reads starve behind the model's large ones
    # (an H200: 16 s for them beside the reads, 6 s alone).
    search = start_search(checkpoint, layout, device, args.calib_data, args.text_column, args.n_samples,
                          args.seqlen, DTYPES[args.dtype], args.batch_size,
                          args.trust_remote_code) if args.run_awq else None
    set_up, search_seconds = time.time() - started, 0.0
    if search is not None:
        start_readahead([checkpoint.dir])

    def transform(index: int, tensors: dict[str, torch.Tensor], _) -> dict[str, dict[str, torch.Tensor]]:
        nonlocal search_seconds
        round_to_float16(tensors, f"{checkpoint.dir}: layer {index}")
        if search is not None:
            begin = time.time()
            transforms[index] = search.layer(index, tensors, bits[index], args.q_group_size, not args.no_zero_point)
            search_seconds += time.time() - begin
        quantizer = Quantizer(bits[index], args.q_group_size, not args.no_zero_point)
        return layer_outputs(tensors, transforms[index], sorted(layout.layers[index].linears), quantizer,
                             set(outputs), f"{checkpoint.dir}: layer {index}")

    writer_for = {}
    if "real" in outputs:
        from common.quant.lutgemm import CheckpointWriter
        writer_for["real"] = lambda folder: CheckpointWriter(folder, checkpoint, layout, bits, args.q_group_size)
    try:
        convert_model(checkpoint, layout, outputs, transform, device, parse_size(args.max_shard_size),
                      args.overwrite, lambda items, desc, total: progress(items, args.quiet, desc, total),
                      writer_for=writer_for)
    finally:
        if search is not None:
            search.close()
    if args.dump_awq:
        from common.quant.awq_search import results_entries
        from common.io.torchsave import save_atomically
        save_atomically(results_entries(transforms, layout), Path(args.dump_awq))
    total = time.time() - started
    times = f"reading, quantizing, writing {total - set_up - search_seconds:.1f} s"
    if search is not None:
        stages = seconds_by_stage(search.times, leave_out=("outside the search",))
        times = (f"calibration set-up {set_up:.1f} s ({seconds_by_stage(search.set_up_times)}); "
                 f"search {search_seconds:.1f} s ({stages}); {times} besides")
    if device.type == "cuda":
        times += f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    return len(layout.layers), times


def results_bytes(checkpoint: Checkpoint, layout) -> int:
    """A bound on the results file: a float32 scale per input channel and clip per row of each Linear."""
    return 4 * sum(sum(checkpoint.tensors[n].shape) for layer in layout.layers for n in layer.linears.values())


if __name__ == "__main__":
    run_main(main)
