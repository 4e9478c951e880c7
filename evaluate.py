#!/usr/bin/env python3
"""Check DecDEC artifacts and predict DecDEC's accuracy gain, in plain PyTorch (no CUDA build).

1. Check: cheatsheet.pt and thresholds.pt match the fake-quantized model (layers, modules,
   dtypes, shapes, finite, non-increasing); with --original_model also how well the decoded
   residual matches W_orig - W_fq. --check stops here.
2. Simulate DecDEC's decode-time correction for each --k_chunks value and report perplexity
   (and KL divergence to the original model's predictions when --original_model is given).

DecDEC's kernel accepts k_chunk <= 367 with fp16/bf16 activations; larger values (up to 1024)
are what-ifs only this simulator can run.

Example:
    python evaluate.py --quantized_model ./llama3-8b-awq-w3 \\
        --original_model ./llama3-8b-awq-scaled --dataset ./wikitext2-test.txt --k_chunks 0 8 32 128
    python evaluate.py --quantized_model ./llama3-8b-sqllm3-fq --artifacts ./artifacts \\
        --original_model meta-llama/Llama-3.1-8B --dataset ./wikitext2-test.txt --k_chunks 0 8 32 128
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common.calib.calibration import NAMED_DATASETS, load_texts
from common.cli import add_device_arg, add_output_args, pick_device, progress, report_written, shown
from common.simulate.decdec_sim import CHUNK, MAX_RUNTIME_K_CHUNK, SELECTIONS
from common.errors import InputError, run_main
from common.simulate.evaluation import (Config, check_artifacts, evaluation_windows, load_artifact,
                                       missing_fused_entries, residual_errors, simulate)
from common.layers import check_same_layers, check_seq_len, find_layers
from common.calib.layerwise import LayerwiseModel, load_tokenizer
from common.quant.lutgemm import DecodedCheckpoint
from common.io.model_dir import resolve_model_dir
from common.io.model_files import Checkpoint
from common.quant.sqllm import LutCheckpoint, QuantizedFolder
from common.io.outputs import atomic_file, claimed_outputs

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantized_model", default=None,
                        help="the fake-quantized FP16 model, or decdec_setup.py's output folder (its LUT-GEMM "
                             "pytorch_model.bin is decoded)")
    parser.add_argument("--quantized_path", default=None,
                        help="instead of --quantized_model: an Any-Precision / SqueezeLLM folder, applied to "
                             "--original_model")
    parser.add_argument("--bits", type=int, default=None, help="bit width of --quantized_path, when it holds several")
    parser.add_argument("--artifacts", default=None,
                        help="directory holding cheatsheet.pt and thresholds.pt (default: --quantized_model)")
    parser.add_argument("--original_model", default=None,
                        help="the model the cheatsheet was built against (enables residual check, KL, gap closed)")
    parser.add_argument("--check", action="store_true", help="only check the artifacts, then exit")
    parser.add_argument("--k_chunks", type=int, nargs="+", default=[0, 4, 8, 16, 32],
                        help=f"k_chunk values to simulate (0..{CHUNK}; the kernel accepts <= {MAX_RUNTIME_K_CHUNK}; "
                             "default 0 4 8 16 32)")
    parser.add_argument("--selection", choices=SELECTIONS, default="buckets",
                        help="buckets: the runtime's 32-bucket approximation (default); exact: true top-k; "
                             "random: random channels")
    parser.add_argument("--dataset", default="wikitext2",
                        help=f"named dataset ({', '.join(NAMED_DATASETS)}; test split for wikitext2) or local file "
                             "(default wikitext2)")
    parser.add_argument("--text_column", default=None, help="text field of a local file (default: text)")
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per evaluation window (default 2048)")
    parser.add_argument("--max_chunks", type=int, default=None, help="evaluate at most this many windows")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="compute dtype (default float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --selection random")
    parser.add_argument("--output", default=None,
                        help="write the results as JSON here (with --check: the check's findings)")
    parser.add_argument("--plot", default=None, help="write a PNG plot of perplexity vs k_chunk here")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's own Python code")
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for k in args.k_chunks:
        if not 0 <= k <= CHUNK:
            raise InputError(f"--k_chunks {k}: must be between 0 and {CHUNK}")
    if args.seq_len < 2 or args.batch_size < 1:
        raise InputError("--seq_len must be at least 2 and --batch_size at least 1")
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    if bool(args.quantized_model) == bool(args.quantized_path):
        raise InputError("give the quantized model as --quantized_model or (SqueezeLLM) --quantized_path")
    if args.quantized_path and not args.original_model:
        raise InputError("--quantized_path needs --original_model (the LUTs replace its Linear weights)")
    original_dir = resolve_model_dir(args.original_model, "--original_model") if args.original_model else None
    fq_dir = resolve_model_dir(args.quantized_model, "--quantized_model") if args.quantized_model else original_dir
    if not args.artifacts and not args.quantized_model:
        raise InputError("--artifacts: the folder holding cheatsheet.pt and thresholds.pt is needed")
    artifacts = Path(args.artifacts or args.quantized_model)
    if not artifacts.is_dir():
        raise InputError(f"--artifacts {artifacts}: no such directory")
    if args.plot and args.check:
        raise InputError("--plot: nothing to plot with --check (it simulates nothing)")
    dataset = Path(args.dataset).expanduser()
    inputs = [("--quantized_model", fq_dir), ("--original_model", original_dir),
              ("--quantized_path", Path(args.quantized_path) if args.quantized_path else None),
              ("--artifacts", artifacts / "cheatsheet.pt"), ("--artifacts", artifacts / "thresholds.pt"),
              ("--dataset", dataset if dataset.exists() else None)]
    outputs = [(flag, Path(path)) for flag, path in (("--output", args.output), ("--plot", args.plot)) if path]
    with claimed_outputs(outputs, inputs, args.overwrite):
        evaluate(args, fq_dir, original_dir, artifacts, device, dtype)
    if outputs:
        report_written([path for _, path in outputs], "evaluation done")
    return 0


def evaluate(args: argparse.Namespace, fq_dir: Path, original_dir: Path | None, artifacts: Path,
             device: torch.device, dtype: torch.dtype) -> None:
    """Check the artifacts, then (unless --check) simulate; writes --output / --plot if given."""
    bar = lambda items, desc, total=None: progress(items, args.quiet, desc, total)  # noqa: E731
    if args.quantized_path:
        fq = LutCheckpoint(fq_dir, QuantizedFolder.open(Path(args.quantized_path), args.bits))
    else:
        fq = DecodedCheckpoint(fq_dir, "--quantized_model", device)
    layout = find_layers(fq)
    cheatsheet = load_artifact(artifacts / "cheatsheet.pt")
    thresholds = load_artifact(artifacts / "thresholds.pt")
    problems = check_artifacts(fq, layout, cheatsheet, thresholds)
    if problems:
        raise InputError(f"{len(problems)} problem(s) with {artifacts} for {fq_dir}:\n" + "\n".join(problems))
    texts = None
    if not args.check:  # a bad dataset fails now, not after the residual check
        check_seq_len(fq, args.seq_len)
        texts = load_texts(args.dataset, args.text_column, split="test" if args.dataset == "wikitext2" else None)
    model = "its model" if artifacts.resolve() == fq_dir.resolve() else shown(fq_dir)
    print(f"check: cheatsheet.pt and thresholds.pt in {shown(artifacts)} fit {model} ({len(layout.layers)} layers: "
          "modules, shapes, dtypes, finite values)", file=sys.stderr)
    unfused = missing_fused_entries(layout, cheatsheet)
    if unfused:
        print(f"warning: {shown(artifacts / 'cheatsheet.pt')}: no fused self_attn.qkv_proj / mlp.gate_up_proj entries in "
              f"{len(unfused)} of {len(layout.layers)} layers; DecDEC's end-to-end loaders need them: rebuild it "
              "with cheatsheet.py (fused entries are its default) or decdec_setup.py", file=sys.stderr)
    if original_dir is None:
        print("warning: without --original_model the cheatsheet is not checked against the residual it encodes: "
              "artifacts built from another model of the same shapes pass", file=sys.stderr)
    check: dict = {"artifacts": str(artifacts), "quantized_model": str(fq_dir), "layers": len(layout.layers),
                   "problems": []}
    original = None
    if original_dir is not None:
        original = Checkpoint(original_dir, "--original_model")
        original_layout = find_layers(original)
        check_same_layers(original, original_layout, fq, layout)
        errors = residual_errors(original, fq, original_layout, layout, cheatsheet, device, bar)
        worst = sorted(errors, key=lambda e: -e.relative)[:5]
        mean = sum(e.relative for e in errors) / len(errors)
        print(f"residual: decoded vs exact relative error mean {mean:.4f}, max {worst[0].relative:.4f} "
              f"(worst: {', '.join(f'layer {e.layer} {e.module} {e.relative:.4f}' for e in worst[:3])})",
              file=sys.stderr)
        if worst[0].relative > 0.5:
            raise InputError(f"{artifacts / 'cheatsheet.pt'}: layer {worst[0].layer} {worst[0].module} decodes to "
                             f"a residual {worst[0].relative:.0%} off; was it built from these two models?")
        check["original_model"] = str(original_dir)
        check["residual_relative_error"] = {"mean": mean, "max": worst[0].relative,
                                            "worst": [{"layer": e.layer, "module": e.module,
                                                       "relative": e.relative} for e in worst]}
    if args.check:
        if args.output:
            write_json(check, Path(args.output))
        return

    tokenizer = load_tokenizer(fq_dir, args.trust_remote_code)
    token_ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    windows = evaluation_windows(token_ids, args.seq_len, args.max_chunks)
    configs = [Config("fakequant")] + [Config(f"decdec k_chunk={k}", k, args.selection)
                                       for k in dict.fromkeys(args.k_chunks) if k > 0]
    fq_model = LayerwiseModel(fq, layout, device, dtype, args.trust_remote_code)
    original_model = LayerwiseModel(original, original_layout, device, dtype, args.trust_remote_code) \
        if original is not None else None
    try:
        scores = simulate(fq_model, original_model, windows, configs, cheatsheet, thresholds, args.batch_size,
                          args.seed, bar)
    finally:
        fq_model.close()
        if original_model is not None:
            original_model.close()
    report = build_report(scores, configs, args, windows)
    print_table(report)
    if args.output:
        write_json(report, Path(args.output))
    if args.plot:
        plot(report, Path(args.plot))


def write_json(data: dict, path: Path) -> None:
    with atomic_file(path) as temp:
        temp.write_text(json.dumps(data, indent=2) + "\n")


def build_report(scores: dict, configs: list[Config], args: argparse.Namespace, windows: torch.Tensor) -> dict:
    report: dict = {"settings": {"quantized_model": args.quantized_model or args.quantized_path,
                                 "original_model": args.original_model,
                                 "dataset": args.dataset, "seq_len": args.seq_len, "windows": int(windows.shape[0]),
                                 "selection": args.selection}}
    if "original" in scores:
        report["original"] = scores["original"]
    report["fakequant"] = scores["fakequant"]
    report["decdec"] = []
    for k in dict.fromkeys(args.k_chunks):
        score = scores["fakequant"] if k == 0 else scores[f"decdec k_chunk={k}"]
        entry = {"k_chunk": k, "selection": args.selection, **score}
        if "original" in scores:
            gap = scores["fakequant"]["ppl"] - scores["original"]["ppl"]
            # no gap to close when the fake-quantized model is not worse than the original
            entry["gap_closed"] = (scores["fakequant"]["ppl"] - score["ppl"]) / gap if gap > 0 else None
        report["decdec"].append(entry)
    return report


def print_table(report: dict) -> None:
    has_kl = "original" in report
    print(f"{'model':<34}{'perplexity':>12}" + (f"{'KL to orig':>12}{'gap closed':>12}" if has_kl else ""))
    if has_kl:
        print(f"{'original':<34}{report['original']['ppl']:>12.3f}")
    print(f"{'fake-quantized':<34}{report['fakequant']['ppl']:>12.3f}"
          + (f"{report['fakequant']['kl']:>12.4f}" if has_kl else ""))
    for entry in report["decdec"]:
        if entry["k_chunk"] == 0:
            continue
        note = "" if entry["k_chunk"] <= MAX_RUNTIME_K_CHUNK else " *"
        line = f"{'+ DecDEC k_chunk=' + str(entry['k_chunk']) + ' (' + entry['selection'] + ')' + note:<34}"
        line += f"{entry['ppl']:>12.3f}"
        if has_kl:
            gap = entry["gap_closed"]
            line += f"{entry['kl']:>12.4f}" + (f"{gap:>11.0%}" if gap is not None else f"{'n/a':>12}")
        print(line)
    if any(e["k_chunk"] > MAX_RUNTIME_K_CHUNK for e in report["decdec"]):
        print(f"* above {MAX_RUNTIME_K_CHUNK}: DecDEC's kernel rejects it; a simulator-only what-if")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [e["k_chunk"] for e in report["decdec"]]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(ks, [e["ppl"] for e in report["decdec"]], marker="o", label=f"DecDEC ({report['decdec'][0]['selection']})")
    axis.axhline(report["fakequant"]["ppl"], color="tab:red", linestyle="--", label="fake-quantized")
    if "original" in report:
        axis.axhline(report["original"]["ppl"], color="tab:green", linestyle="--", label="original")
    axis.set_xlabel("k_chunk")
    axis.set_ylabel("perplexity")
    axis.legend()
    figure.tight_layout()
    with atomic_file(path) as temp:
        figure.savefig(temp, format="png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    run_main(main)
