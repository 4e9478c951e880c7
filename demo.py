#!/usr/bin/env python3
"""The whole DecDEC setup pipeline on one machine, offline, in about a minute.

1. builds a small Llama-family model (tokenizer and weights trained briefly on text that
   ships with Python), unless --model names a real one;
2. fake-quantizes it to 3 bit with conv_awq.py (round-to-nearest);
3. builds cheatsheet.pt (cheatsheet.py) and thresholds.pt (thresholds.py);
4. simulates DecDEC with evaluate.py and prints perplexity and KL to the original;
5. says where everything is and what to run on a real model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import cheatsheet
import conv_awq
import evaluate
import thresholds
from common.cli import pick_device, progress
from common.errors import InputError, run_main
from common.model_files import resolve_model_dir
from common.outputs import atomic_dir, claimed_outputs


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
    parser.add_argument("--train_steps", type=int, default=200, help="training steps of the small model")
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
    from common.model_files import Checkpoint, resolve_model_dir
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
        run_pipeline(args, work, model_dir, device)  # built under a temporary name, renamed when complete
    kind = f"your model {args.model}" if args.model else "a small model trained for a few seconds"
    print(f"\n(The table above is {kind}; DecDEC's effect grows with k_chunk. "
          f"Done in {time.time() - started:.0f} s.)")
    print(f"\nArtifacts:\n  {out / 'artifacts' / 'cheatsheet.pt'}\n  {out / 'artifacts' / 'thresholds.pt'}\n"
          f"  fake-quantized model: {out / 'fakequant-w3'}\n  report: {out / 'results.json'}, "
          f"{out / 'perplexity.png'}")
    print("\nNext, with a real model (GPU recommended; see README.md):\n"
          "  python conv_awq.py --model_path meta-llama/Llama-3.1-8B --w_bit 3 --q_group_size 128 \\\n"
          "      --fakequant_output ./llama3-8b-w3-fq\n"
          "  python cheatsheet.py --original_model meta-llama/Llama-3.1-8B --quantized_model ./llama3-8b-w3-fq \\\n"
          "      --save_path ./llama3-8b-w3-decdec\n"
          "  python thresholds.py --model_path meta-llama/Llama-3.1-8B --save_path ./llama3-8b-w3-decdec \\\n"
          "      --dataset c4\n"
          "  python evaluate.py --quantized_model ./llama3-8b-w3-fq --artifacts ./llama3-8b-w3-decdec \\\n"
          "      --original_model meta-llama/Llama-3.1-8B --k_chunks 0 8 16 32")
    return 0


def run_pipeline(args: argparse.Namespace, out: Path, model_dir: Path | None, device: torch.device) -> None:
    """Every step, writing into `out` (the temporary folder that becomes --output)."""
    common = ["--device", str(device)] + (["--quiet"] if args.quiet else [])
    artifacts = out / "artifacts"
    steps = Steps(4 if model_dir else 5)
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
    steps.start(f"fake-quantize to 3 bit, group {group} (conv_awq.py, round-to-nearest)")
    conv_awq.main(["--model_path", original, "--w_bit", "3", "--q_group_size", str(group),
                   "--fakequant_output", str(out / "fakequant-w3"), *common])
    steps.start("cheatsheet.pt (cheatsheet.py)")
    cheatsheet.main(["--original_model", original, "--quantized_model", str(out / "fakequant-w3"),
                     "--save_path", str(artifacts), *common])
    steps.start("thresholds.pt (thresholds.py)")
    seq_len, samples = (128, 16) if args.quick else (256, 64)
    thresholds.main(["--model_path", original, "--save_path", str(artifacts), "--dataset", str(calibration),
                     "--sampling", "concat", "--seq_len", str(seq_len), "--num_examples", str(samples), *common])
    steps.start("simulate DecDEC (evaluate.py)")
    windows = 8 if args.quick else 40
    evaluate.main(["--quantized_model", str(out / "fakequant-w3"), "--artifacts", str(artifacts),
                   "--original_model", original, "--dataset", str(evaluation), "--seq_len", str(seq_len),
                   "--max_chunks", str(windows), "--k_chunks", *map(str, args.k_chunks),
                   "--output", str(out / "results.json"), "--plot", str(out / "perplexity.png"), *common])
    steps.finish()


if __name__ == "__main__":
    run_main(main)
