#!/usr/bin/env python3
"""Build DecDEC's cheatsheet.pt: 4-bit packed residuals W_orig - W_quant with per-row scales.

Example:
    python cheatsheet.py --original_model meta-llama/Llama-3.1-8B \\
        --quantized_model ./llama3-8b-sqllm3-fq --save_path ./artifacts
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports, to report their cost

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from common.cli import add_device_arg, add_output_args, pick_device, progress, report_written  # noqa: E402
from common.errors import InputError, run_main  # noqa: E402
from common.io.readahead import start_readahead  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original_model", required=True,
                        help="original FP16/BF16 model (local directory or cached hub id); "
                             "for AWQ, the scaled model written by conv_awq.py")
    parser.add_argument("--quantized_model", required=True,
                        help="fake-quantized FP16 model with the same layers (conv_sqllm.py / conv_awq.py output)")
    parser.add_argument("--save_path", required=True, help="output directory (created if missing)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="CPU threads for the computation when it runs on the CPU "
                             "(default: torch's choice); ignored on a GPU")
    parser.add_argument("--save_exact_residuals", action="store_true",
                        help="also write exact_residuals.pt (fp16 W_orig - W_quant, as large as the model)")
    parser.add_argument("--save_extra_bit_widths", action="store_true",
                        help="also write quantized_residuals_2bit.pt and quantized_residuals_8bit.pt")
    parser.add_argument("--grid_size", type=int, default=32,
                        help="scale candidates per row (default 32, the reference's; larger searches finer "
                             "but changes the bytes)")
    fused = parser.add_mutually_exclusive_group()
    fused.add_argument("--add_fused", dest="add_fused", action="store_true", default=True,
                       help="add self_attn.qkv_proj / mlp.gate_up_proj entries, scales reordered over the fused "
                            "rows, for models with separate q/k/v and gate/up: DecDEC's end-to-end loaders read "
                            "these (default; the flag is accepted for the reference's command lines)")
    fused.add_argument("--no_fused", dest="add_fused", action="store_false",
                       help="leave the fused entries out (the reference's default layout; the end-to-end loaders "
                            "then mis-read the concatenated per-module scales)")
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Start reading the weights now: torch's import and the checks below then cost no I/O time.
    start_readahead([Path(args.original_model), Path(args.quantized_model)], layers_only=True)
    import torch
    from common.quant.cheatsheet_build import (OUTPUT_FILES, CheatsheetOptions, PairedModels,
                                         build_cheatsheet, likely_swapped, output_bytes)
    from common.io.model_dir import resolve_model_dir
    from common.io.model_files import Checkpoint
    from common.io.outputs import check_free_space, claimed_outputs, output_dir
    if args.grid_size < 1:
        raise InputError(f"--grid_size {args.grid_size}: must be at least 1")
    if args.num_workers is not None:
        if args.num_workers < 1:
            raise InputError(f"--num_workers {args.num_workers}: must be at least 1")
        torch.set_num_threads(args.num_workers)
    device = pick_device(args.device)
    options = CheatsheetOptions(args.grid_size, args.save_extra_bit_widths, args.save_exact_residuals,
                                args.add_fused)
    save_path = Path(args.save_path)
    if save_path.exists() and not save_path.is_dir():
        raise InputError(f"--save_path {save_path}: is a file, expected a directory")
    original_dir = resolve_model_dir(args.original_model, "--original_model")
    quantized_dir = resolve_model_dir(args.quantized_model, "--quantized_model")
    if original_dir.resolve() == quantized_dir.resolve():
        raise InputError(f"--quantized_model {quantized_dir}: is the --original_model itself; the residual "
                         "would be zero (give the fake-quantized model)")
    outputs = [("--save_path", save_path / OUTPUT_FILES[kind]) for kind in options.outputs()]
    inputs = [("--original_model", original_dir), ("--quantized_model", quantized_dir)]
    with claimed_outputs(outputs, inputs, args.overwrite):
        models = PairedModels(Checkpoint(original_dir, "--original_model"),
                              Checkpoint(quantized_dir, "--quantized_model"))
        final = output_bytes(models, options)
        check_free_space([(save_path, 2 * final, "the cheatsheet files and their resume parts")])
        if likely_swapped(models):
            print(f"warning: --original_model {original_dir} looks quantized (few distinct values per row) and "
                  f"--quantized_model {quantized_dir} does not: are the two swapped?", file=sys.stderr)
        output_dir(save_path, "--save_path")
        written = build_cheatsheet(models, save_path, options, device,
                                   lambda items, desc: progress(items, args.quiet, desc))
    layers = len(models.layout.layers)
    report_written(list(written.values()), f"{layers} layers on {device} in {time.time() - PROCESS_STARTED:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
