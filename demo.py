#!/usr/bin/env python3
"""The whole DecDEC setup pipeline on one machine, offline, in about a minute.

1. builds a small Llama-family model (tokenizer and weights trained briefly on text that
   ships with Python), unless --model names a real one;
2. quantizes it to 3 bit (round-to-nearest) and builds, in one pass with decdec_setup.py, the
   folder DecDEC's runtime loads: the LUT-GEMM checkpoint, cheatsheet.pt and thresholds.pt;
3. simulates DecDEC on that folder with evaluate.py: perplexity and KL to the original;
4. says where everything is and what to run on a real model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import decdec_setup
import evaluate
from common.cli import paths_shown_as, pick_device, progress
from common.errors import InputError, run_main
from common.io.model_dir import resolve_model_dir
from common.io.outputs import atomic_dir, claimed_outputs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="decdec-demo", help="folder for everything (default ./decdec-demo)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output folder written by an earlier demo (files of yours "
                             "in it are kept)")
    parser.add_argument("--model", default=None,
                        help="use this model (directory or cached hub id) instead of building the small one")
    parser.add_argument("--dataset", default=None,
                        help="calibration/evaluation text for --model (default: Python's docstrings)")
    parser.add_argument("--k_chunks", type=int, nargs="+", default=[0, 16, 64, 128, 256],
                        help="k_chunk values to simulate (default 0 16 64 128 256)")
    parser.add_argument("--train_steps", type=int, default=200, help="training steps of the small model (default 200; --quick: at most 60)")
    parser.add_argument("--quick", action="store_true", help="smallest setting (what the tests run)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


class Steps:
    """Numbered step headings, each closing with its own duration."""

    def __init__(self, total: int):
        self.total, self.number, self.started, self.title = total, 0, 0.0, ""

    def start(self, title: str) -> None:
        self.finish()
        self.number += 1
        self.title, self.started = title, time.time()
        print(f"\n== {self.number}/{self.total} {title}", file=sys.stderr)

    def finish(self) -> None:
        if self.title:
            print(f"   ({self.title}: {time.time() - self.started:.1f} s)", file=sys.stderr)
            self.title = ""


def build_small_model(folder: Path, texts: list[str], train_steps: int, device: torch.device, quiet: bool) -> Path:
    from common.tiny_models import build_model, save_model, train_tokenizer, train_briefly
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    model_dir = folder / "original"
    model = build_model("llama", model_dir, tokenizer, dtype=torch.float32, hidden_size=256,
                        intermediate_size=512, num_layers=4, num_heads=8, max_positions=1024)
    loss = train_briefly(model, tokenizer, texts, train_steps, device=device,
                         progress=lambda items: progress(items, quiet, "training"))
    save_model(model.to("cpu", torch.float16), model_dir, tokenizer)
    print(f"small Llama (4 layers, hidden 256, vocab 1024) trained {train_steps} steps, loss {loss:.2f}",
          file=sys.stderr)
    return model_dir


def largest_group(model: str, preferred: int = 128) -> int:
    """The usual group size of 128 input channels, or the largest power of two below it that fits."""
    from common.layers import find_layers
    from common.io.model_dir import resolve_model_dir
    from common.io.model_files import Checkpoint
    checkpoint = Checkpoint(resolve_model_dir(model, "--model"), "--model")
    widths = {checkpoint.tensors[name].shape[1] for layer in find_layers(checkpoint).layers
              for name in layer.linears.values()}
    group = preferred
    while group > 1 and any(width % group for width in widths):
        group //= 2
    return group


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    out = Path(os.path.abspath(Path(args.output).expanduser()))
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out}: is a file")
    model_dir = resolve_model_dir(args.model, "--model") if args.model else None
    dataset = Path(args.dataset).expanduser() if args.dataset else None
    device = pick_device(args.device)
    if args.quiet:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    if args.quick:
        args.train_steps = min(args.train_steps, 60)
    inputs = [("--model", model_dir), ("--dataset", dataset if dataset and dataset.exists() else None)]
    with claimed_outputs([("--output", out)], inputs, args.overwrite), atomic_dir(out, args.overwrite) as work:
        with paths_shown_as(work, out):  # built under a temporary name, renamed when complete
            run_pipeline(args, work, model_dir, device)
    kind = f"your model {args.model}" if args.model else "a small model trained for a few seconds"
    print(f"\n(The table above is {kind}; DecDEC's effect grows with k_chunk. "
          f"Done in {time.time() - started:.0f} s.)")
    print(f"\nThe folder DecDEC's runtime loads (--backend lutgemm): {out / 'decdec'}\n"
          f"  (pytorch_model.bin, cheatsheet.pt, thresholds.pt, config and tokenizer)\n"
          f"  report: {out / 'results.json'}, {out / 'perplexity.png'}")
    print("\nNext, with a real model (GPU recommended; see README.md):\n"
          "  python decdec_setup.py --model meta-llama/Llama-3.1-8B --output ./llama3-8b-awq-w3 --method awq \\\n"
          "      --calib_data ./pile-val.jsonl.zst --dataset ./c4-sample.jsonl --scaled_output ./llama3-8b-awq-scaled\n"
          "  python evaluate.py --quantized_model ./llama3-8b-awq-w3 --original_model ./llama3-8b-awq-scaled \\\n"
          "      --dataset ./wikitext2-test.txt --k_chunks 0 8 16 32")
    return 0


def run_pipeline(args: argparse.Namespace, out: Path, model_dir: Path | None, device: torch.device) -> None:
    """Every step, writing into `out` (the temporary folder that becomes --output)."""
    common = ["--device", str(device)] + (["--quiet"] if args.quiet else [])
    steps = Steps(2 if model_dir else 3)
    if model_dir:
        original, data = str(model_dir), args.dataset or "wikitext2"
        calibration = evaluation = data
    else:
        from common.tiny_models import local_corpus
        texts = local_corpus()
        held_out = texts[::10]
        training = [t for i, t in enumerate(texts) if i % 10]
        calibration, evaluation = out / "calibration.txt", out / "evaluation.txt"
        calibration.write_text("\n\n".join(training))
        evaluation.write_text("\n\n".join(held_out))
        steps.start("build and train a small Llama-family model")
        original = str(build_small_model(out, training, args.train_steps, device, args.quiet))

    group = largest_group(original)
    seq_len, samples = (128, 16) if args.quick else (256, 64)
    steps.start(f"3-bit round-to-nearest (group {group}), cheatsheet.pt and thresholds.pt in one pass "
                "(decdec_setup.py)")
    decdec_setup.main(["--model", original, "--output", str(out / "decdec"), "--method", "rtn", "--w_bit", "3",
                       "--q_group_size", str(group), "--dataset", str(calibration), "--sampling", "concat",
                       "--seq_len", str(seq_len), "--num_examples", str(samples), *common])
    steps.start("simulate DecDEC on that folder (evaluate.py)")
    windows = 8 if args.quick else 40
    evaluate.main(["--quantized_model", str(out / "decdec"), "--original_model", original,
                   "--dataset", str(evaluation), "--seq_len", str(seq_len), "--max_chunks", str(windows),
                   "--k_chunks", *map(str, args.k_chunks), "--output", str(out / "results.json"),
                   "--plot", str(out / "perplexity.png"), *common])
    steps.finish()


if __name__ == "__main__":
    run_main(main)
