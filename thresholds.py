#!/usr/bin/env python3
"""Build DecDEC's thresholds.pt: per Linear, the max over calibration tokens of sorted |input|.

Runs the model one decoder layer at a time (a 70B model fits a 24 GB GPU), on the GPU when
there is one. Example, offline with a local file:
    python thresholds.py --model_path meta-llama/Llama-3.1-8B --save_path ./artifacts \\
        --dataset ./c4-sample.jsonl
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports, to report their cost

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from common.cli import (add_device_arg, add_output_args, add_sampling_args, pick_device, progress,  # noqa: E402
                        report_written)
from common.errors import InputError, run_main  # noqa: E402
from common.io.readahead import start_readahead  # noqa: E402

DTYPES = ("bfloat16", "float16", "float32")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True,
                        help="model to calibrate (normally the original FP16 model): directory or cached hub id")
    parser.add_argument("--save_path", required=True,
                        help="output directory (thresholds.pt is written inside), or a file path ending in .pt")
    add_sampling_args(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype the model runs in (default bfloat16)")
    parser.add_argument("--batch_size", type=int, default=8, help="samples per forward pass (default 8)")
    parser.add_argument("--cpu_only", action="store_true", help="run on the CPU (same as --device cpu)")
    parser.add_argument("--no_clamp", action="store_true",
                        help="keep values above 65504 (the runtime's fp16 cast turns them into inf)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow the model's own Python code from its directory/hub repo")
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def output_path(save_path: str) -> Path:
    path = Path(save_path)
    if path.suffix == ".pt":
        return path
    if path.exists() and not path.is_dir():
        raise InputError(f"--save_path {path}: is a file; give a directory or a path ending in .pt")
    return path / "thresholds.pt"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The imports below are CPU time (seconds of it); reading the weights meanwhile is free.
    start_readahead([Path(args.model_path)], skip=("lm_head",))
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401  (the heavy part of the imports, done now)
    from common.io.model_dir import resolve_model_dir
    from common.io.outputs import claimed_outputs
    started = time.time()
    for flag in ("seq_len", "num_examples", "batch_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    device = pick_device("cpu" if args.cpu_only else args.device)
    target = output_path(args.save_path)
    model_dir = resolve_model_dir(args.model_path, "--model_path")
    dataset = Path(args.dataset).expanduser()
    with claimed_outputs([("--save_path", target)], [("--model_path", model_dir),
                                                     ("--dataset", dataset if dataset.exists() else None)],
                         args.overwrite):
        return calibrate_and_save(args, model_dir, target, device, started)


def calibrate_and_save(args: argparse.Namespace, model_dir: Path, target: Path, device, started: float) -> int:
    """Everything after the checks of the arguments, while this run holds the output."""
    import torch
    from common.calib.thresholds_job import ThresholdsJob, model_thresholds
    from common.layers import check_seq_len, find_layers
    from common.io.model_files import Checkpoint
    from common.io.outputs import check_free_space
    from common.io.torchsave import save_atomically
    checkpoint = Checkpoint(model_dir, "--model_path")
    layout = find_layers(checkpoint)
    check_seq_len(checkpoint, args.seq_len)
    in_features = sum(checkpoint.tensors[name].shape[1] for layer in layout.layers for name in layer.linears.values())
    check_free_space([(target, 4 * in_features + (1 << 20), "thresholds.pt")])
    job = ThresholdsJob(model_dir, args.dataset, args.text_column, args.sampling, args.seq_len, args.num_examples,
                        args.random_state, args.dtype, args.batch_size, str(device), args.trust_remote_code)
    samples = job.samples()
    loaded = time.time()

    thresholds = model_thresholds(checkpoint, layout, samples, device, getattr(torch, args.dtype), args.batch_size,
                                  args.trust_remote_code, lambda items, desc: progress(items, args.quiet, desc))
    if not args.no_clamp:
        from common.calib.activation_stats import clamp_to_fp16
        for line in clamp_to_fp16(thresholds):
            print(line, file=sys.stderr)
    save_atomically(thresholds, target)
    report_written([target], f"{len(thresholds)} layers, {samples.shape[0]} x {samples.shape[1]} tokens on {device}: "
                   f"{time.time() - PROCESS_STARTED:.1f} s in all (imports {started - PROCESS_STARTED:.1f} s, "
                   f"data {loaded - started:.1f} s, layer-by-layer calibration {time.time() - loaded:.1f} s)"
                   + (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
                      if device.type == "cuda" else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
