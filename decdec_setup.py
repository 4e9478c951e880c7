#!/usr/bin/env python3
"""From the original model to a DecDEC-ready folder in one pass (SPEC §8).

One read of the original model, a decoder layer at a time: quantize it (round-to-nearest, AWQ
search or results, or a SqueezeLLM / Any-Precision folder's LUTs), and write into --output what
DecDEC's runtime loads: cheatsheet.pt, thresholds.pt and the checkpoint (pytorch_model.bin, config,
tokenizer): LUT-GEMM's for rtn/awq, the packed SqueezeLLM one (Any-Precision's layout) for sqllm. Each file equals what the separate scripts write
(conv_awq.py / conv_sqllm.py, cheatsheet.py --add_fused, thresholds.py) for the same inputs.

Examples:
    python decdec_setup.py --model meta-llama/Llama-3.1-8B --output ./llama3-8b-awq-w3 --method awq \\
        --calib_data ./pile-val.jsonl.zst --dataset ./c4-sample.jsonl
    python decdec_setup.py --model meta-llama/Llama-3.1-8B --output ./llama3-8b-sqllm3 --method sqllm \\
        --quantized_path ./cache/packed/llama3-8b-w3 --dataset ./c4-sample.jsonl
"""
from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports, to report their cost

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Callable  # noqa: E402

from common.background import run_beside  # noqa: E402
from common.cli import (add_device_arg, add_output_args, add_sampling_args, add_sensitivity_args,  # noqa: E402
                        pick_device, progress, report_written, seconds_by_stage)
from common.errors import InputError, run_main  # noqa: E402
from common.io.readahead import start_readahead  # noqa: E402

if TYPE_CHECKING:
    from concurrent.futures import Future

    from common.calib.thresholds_job import ThresholdsJob
    from common.child import ChildProcess

DTYPES = ("float16", "bfloat16", "float32")
IMPORT_WAIT_S = 30.0  # the longest the layer loop waits for the thresholds child's imports


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the original model: directory or cached hub id")
    parser.add_argument("--output", required=True,
                        help="the folder DecDEC's runtime loads (created; cheatsheet.pt, thresholds.pt and the "
                             "checkpoint: LUT-GEMM for rtn/awq, packed SqueezeLLM for sqllm)")
    parser.add_argument("--method", required=True, choices=["rtn", "awq", "sqllm"], help="how to quantize")
    quant = parser.add_argument_group("rtn / awq (--w_bit: sqllm quantizing here too)")
    quant.add_argument("--w_bit", type=int, default=3, choices=range(1, 9), metavar="{1..8}",
                       help="weight bits (default 3; sqllm: 2 to 8)")
    quant.add_argument("--bit_pt", default=None, help="per-layer bits, llm-awq's {layer_index: bits} file")
    quant.add_argument("--q_group_size", type=int, default=128, help="input channels per group (default 128)")
    quant.add_argument("--no_zero_point", action="store_true",
                       help="symmetric quantization; the LUT-GEMM checkpoint needs the zero point, so the folder "
                            "then holds only the two artifacts (use --fakequant_output for the model)")
    awq = parser.add_argument_group("awq: earlier results, or a search")
    awq.add_argument("--awq_results", "--load_awq", dest="awq_results", default=None,
                     help="scales and clips of an earlier search (conv_awq.py --dump_awq or llm-awq's)")
    awq.add_argument("--calib_data", default="pileval", help="search text: pileval (default) or a local file")
    awq.add_argument("--calib_text_column", default=None, help="text field of a local --calib_data file")
    awq.add_argument("--n_samples", type=int, default=128, help="search passages (default 128)")
    awq.add_argument("--seqlen", type=int, default=512, help="search block length (default 512)")
    awq.add_argument("--awq_dtype", choices=DTYPES, default="float16", help="dtype of the search (default float16)")
    awq.add_argument("--dump_awq", default=None, help="also save the search's results here")
    sqllm = parser.add_argument_group("sqllm: an Any-Precision folder, or quantized here to --w_bit bits (SPEC §9; "
                                      "the sensitivity's samples are the thresholds')")
    sqllm.add_argument("--quantized_path", default=None, help="Any-Precision / SqueezeLLM folder (lut_<b>/, weights/)")
    sqllm.add_argument("--bits", type=int, default=None, help="bit width, when the folder holds several")
    sqllm.add_argument("--quantized_output", default=None, help="quantizing here: also keep Any-Precision's folder")
    add_sensitivity_args(sqllm)  # quantizing here
    calib = parser.add_argument_group("thresholds (as thresholds.py)")
    add_sampling_args(calib)
    calib.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the thresholds forward (default bfloat16, as thresholds.py)")
    calib.add_argument("--batch_size", type=int, default=8, help="samples per forward (default 8)")
    calib.add_argument("--no_clamp", action="store_true", help="keep threshold values above 65504")
    extra = parser.add_argument_group("optional outputs")
    extra.add_argument("--scaled_output", default=None, help="also write the scaled FP16 model (rtn/awq)")
    extra.add_argument("--fakequant_output", default=None, help="also write the fake-quantized FP16 model")
    extra.add_argument("--no_fused", action="store_true",
                       help="leave the fused qkv_proj / gate_up_proj cheatsheet entries out (DecDEC's end-to-end "
                            "loader needs them for separate q/k/v models)")
    extra.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard of the model outputs (default 5GB)")
    extra.add_argument("--trust_remote_code", action="store_true", help="allow the model's own Python code")
    add_device_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def searches(args: argparse.Namespace) -> bool:
    """Whether this run searches AWQ scales. The search, not the disk, then sets the pace of the
    layers: the model is read after the search's set-up, whose imports would otherwise starve behind
    the model's large reads on a cold cache (an H200: 10 s for them beside the reads, 6 s alone)."""
    return args.method == "awq" and not args.awq_results


def thresholds_beside_search(device) -> bool:
    """Whether the AWQ thresholds' set-up runs in a thread beside the first layer's search (which
    needs only its own set-up): on a GPU; on a CPU both would compete for the same cores."""
    return device.type == "cuda"


def table_files(args: argparse.Namespace) -> list[tuple[int, Path]]:
    """(layer, file) of every table a SqueezeLLM run reads: lut_<bits>/l<i>.pt and weights/l<i>.pt
    (every lut_* folder when --bits is not given: there is one, or the run stops on it)."""
    if args.method != "sqllm" or not args.quantized_path:  # quantizing here: the tables do not exist yet
        return []
    folder = Path(args.quantized_path).expanduser()
    luts = [f"lut_{args.bits}"] if args.bits is not None else [path.name for path in folder.glob("lut_*")]
    return [(int(file.stem[1:]), file) for sub in [*luts, "weights"] for file in (folder / sub).glob("l*.pt")
            if file.stem[1:].isdigit()]


def quantize_sqllm(args: argparse.Namespace, checkpoint, layout, device, samples: Callable, work: Path):
    """SqueezeLLM quantization before the pass (conv_sqllm.py --w_bit's steps), its tables in `work` (in
    the run's parts folder, so an interrupted run keeps its finished layers' k-means; the sensitivity is
    computed again), then exported to --quantized_output if asked. Returns the tables and the seconds by
    stage."""
    from common.io.outputs import atomic_dir
    from common.quant.sqllm import ComputedTables
    from common.quant.sqllm_quantize import quantize
    tables = ComputedTables(work, args.w_bit, 0)
    times = quantize(checkpoint, layout, args.random_state, tables, samples, device, args.batch_size,
                     lambda items, desc, total=None: progress(items, args.quiet, desc, total),
                     Path(args.gradients) if args.gradients else None, Path(args.dump_gradients) if args.dump_gradients
                     else None, int(args.stash_gib * 2 ** 30), work.parent, args.trust_remote_code)
    if args.quantized_output:
        with atomic_dir(Path(args.quantized_output), args.overwrite) as temporary:
            tables.export(temporary, len(layout.layers))
    return tables, times


def read_ahead(args: argparse.Namespace, model_dir: Path) -> None:
    """Warm the page cache with every input in the background, in the order the layer loop reads
    them: the model's tensors and, for sqllm, each layer's tables beside them."""
    start_readahead([model_dir], layer_files=table_files(args))


def check_args(args: argparse.Namespace) -> None:
    if args.method == "sqllm":
        if args.quantized_path and (args.quantized_output or args.gradients or args.dump_gradients):
            raise InputError("--quantized_output, --gradients and --dump_gradients are for quantizing here, "
                             "not with --quantized_path (quantized already)")
        if not args.quantized_path and not 2 <= args.w_bit <= 8:
            raise InputError(f"--w_bit {args.w_bit}: SqueezeLLM quantization takes 2 to 8 bits")
        if args.scaled_output or args.awq_results or args.dump_awq or args.bit_pt or args.no_zero_point:
            raise InputError("--method sqllm takes no --scaled_output, --awq_results, --dump_awq, --bit_pt "
                             "or --no_zero_point")
    else:
        if args.quantized_path or args.bits is not None or args.quantized_output or args.gradients \
                or args.dump_gradients:
            raise InputError(f"--quantized_path, --bits, --quantized_output, --gradients and --dump_gradients "
                             f"belong to --method sqllm, not {args.method}")
        if args.q_group_size == 0 or args.q_group_size < -1:
            raise InputError(f"--q_group_size {args.q_group_size}: must be positive, or -1 for whole rows")
    if args.method != "awq" and (args.awq_results or args.dump_awq):
        raise InputError("--awq_results and --dump_awq belong to --method awq")
    if args.awq_results and args.dump_awq:
        raise InputError("--dump_awq saves a search; with --awq_results there is none")
    for flag in ("n_samples", "seqlen", "seq_len", "num_examples", "batch_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the report's clock: from the process's start when run as a script (the imports are part of the cost),
    # from this call when another program (the demo) calls it after work of its own
    started = PROCESS_STARTED if argv is None else time.time()
    check_args(args)
    from common.calib.thresholds_job import ThresholdsJob, start_thresholds_child, thresholds_in_child
    from common.io.model_dir import resolve_model_dir
    model_dir = resolve_model_dir(args.model, "--model")
    job = ThresholdsJob(model_dir, args.dataset, args.text_column, args.sampling, args.seq_len, args.num_examples,
                        args.random_state, args.dtype, args.batch_size, args.device or "cuda", args.trust_remote_code,
                        "--model")
    # on a GPU the child's imports are the longest path: it starts before this process imports torch
    child = start_thresholds_child(job) if thresholds_in_child(args.method, args.device) else None
    samples = None
    if child is None and not searches(args):
        read_ahead(args, model_dir)
        samples = run_beside(job.samples, "calibration-samples")
    try:
        return set_up(args, model_dir, job, child, samples, started)
    finally:
        if child is not None:
            child.stop()


def set_up(args: argparse.Namespace, model_dir: Path, job: ThresholdsJob, child: ChildProcess | None,
           samples: Future | None, started: float) -> int:
    """Everything after the child's start: the device, the outputs claimed, the pass, the report."""
    from common.io.outputs import claimed_outputs
    device = pick_device(args.device)
    if child is not None and str(device) != job.device:  # torch found no GPU after all: thresholds in the loop
        child.stop()
        child = None
    output = Path(args.output)
    outputs = {"folder": output, **{key: Path(getattr(args, f"{key}_output")) for key in ("scaled", "fakequant")
                                    if getattr(args, f"{key}_output")}}
    claimed = [("--output", output)] + [(f"--{key}_output", path) for key, path in outputs.items() if key != "folder"]
    claimed += [(flag, Path(value)) for flag, value in (("--dump_awq", args.dump_awq), ("--quantized_output",
                args.quantized_output), ("--dump_gradients", args.dump_gradients)) if value]
    files = {flag: Path(value).expanduser() for flag, value in (
        ("--awq_results", args.awq_results), ("--bit_pt", args.bit_pt), ("--quantized_path", args.quantized_path),
        ("--gradients", args.gradients),
        ("--calib_data", args.calib_data if args.method == "awq" and not args.awq_results else None),
        ("--dataset", args.dataset)) if value}
    inputs = [("--model", model_dir)] + [(flag, path) for flag, path in files.items() if path.exists()]
    with claimed_outputs(claimed, inputs, args.overwrite):
        summary = run(args, model_dir, outputs, device, [path for path in files.values() if path.exists()], job, child,
                      samples, started)
    written = [path for _, path in claimed]
    report_written(written, summary)
    return 0


# options that change where results go or how they are reported, not what they are (resume fingerprint)
NOT_IN_RESULTS = ("output", "scaled_output", "fakequant_output", "dump_awq", "max_shard_size", "device", "stash_gib",
                  "overwrite", "quiet")


def run(args: argparse.Namespace, model_dir: Path, outputs: dict[str, Path], device, inputs: list[Path],
        job: ThresholdsJob, child: ChildProcess | None, samples: Future | None, started: float) -> str:
    """The pass itself, while this run holds the outputs; `child`, if any, computes the thresholds.
    Returns the summary line, its times counted from `started`."""
    import torch
    from common.calib.activation_stats import LayerwiseThresholds
    from common.quant.awq import LayerTransforms, Quantizer, check_quantizable, load_bit_widths, load_results, split_by_layer
    from common.quant.awq_search import StageTimes, start_search
    from common.quant.cheatsheet_build import CheatsheetOptions, check_packable
    from common.io.convert import convert_model
    from common.layers import check_seq_len, find_layers
    from common.calib.layerwise import LayerwiseModel
    from common.quant.lutgemm import CheckpointWriter
    from common.io.model_files import Checkpoint
    from common.io.model_writer import parse_size
    from common.io.parts import PartStore
    from common.background import close_when_done, finished
    from common.one_pass import (Calibration, OnePass, SetupFolderWriter, parts_folder, run_fingerprint,
                                 start_calibration)
    from common.quant.sqllm import QuantizedFolder, TableReader
    checkpoint = Checkpoint(model_dir, "--model")
    layout = find_layers(checkpoint)
    check_packable(checkpoint, layout)
    layers = len(layout.layers)
    sqllm, quantizers, transforms, quantized_in = None, [], [], ""
    options = {key: value for key, value in sorted(vars(args).items()) if key not in NOT_IN_RESULTS}
    parts = PartStore(parts_folder(outputs["folder"]), run_fingerprint(checkpoint, inputs, options))
    if args.method == "sqllm":
        from common.quant.anyprec import check_packed_words
        check_packed_words(checkpoint, layout, "--output")  # the packed checkpoint's words, before any quantization
        if args.quantized_path:
            sqllm = QuantizedFolder.open(Path(args.quantized_path), args.bits)
        else:  # SPEC §9 here, first: the sensitivity on the thresholds' samples, then each layer's k-means
            sqllm, times = quantize_sqllm(args, checkpoint, layout, device,
                                          lambda: samples.result() if samples else job.samples(), parts.dir / "sqllm")
            quantized_in = (f", of which SqueezeLLM quantization {times['in all']:.1f} s "
                            f"({seconds_by_stage(times, leave_out=('in all',))})")
        sqllm.check_layers(layers)
    else:
        check_quantizable(checkpoint, layout, args.q_group_size, lutgemm=not args.no_zero_point)
        bits = load_bit_widths(Path(args.bit_pt), layers) if args.bit_pt else [args.w_bit] * layers
        quantizers = [Quantizer(b, args.q_group_size, not args.no_zero_point) for b in bits]
        transforms = [LayerTransforms() for _ in range(layers)]
        if args.awq_results:
            transforms = split_by_layer(load_results(Path(args.awq_results)), Path(args.awq_results), checkpoint,
                                        layout, args.q_group_size)
    check_seq_len(checkpoint, args.seq_len)
    tables = TableReader(sqllm, layers) if sqllm else None  # its child processes start now

    def build_thresholds() -> LayerwiseThresholds:
        # the samples first: their thread imports transformers, which two threads must not do at once
        calibration_samples = samples.result() if samples else job.samples()
        model = LayerwiseModel(checkpoint, layout, device, getattr(torch, args.dtype), args.trust_remote_code,
                               via_float16=args.method == "awq")
        try:
            return LayerwiseThresholds(model, calibration_samples, args.batch_size)
        except BaseException:
            model.close()
            raise

    def build_calibration() -> Calibration:
        if args.method != "awq" or args.awq_results:
            return Calibration(finished(build_thresholds()))
        # the search first: the first layer waits for it, and for the thresholds only after its search
        search = start_search(checkpoint, layout, device, args.calib_data, args.calib_text_column, args.n_samples,
                              args.seqlen, getattr(torch, args.awq_dtype), 16, args.trust_remote_code)
        try:
            return Calibration(run_beside(build_thresholds, "thresholds-set-up") if thresholds_beside_search(device)
                               else finished(build_thresholds()), search)
        except BaseException:
            search.close()
            raise

    calibration_beside = not searches(args)  # else first, in the start-up
    calibration = None if child else start_calibration(build_calibration, beside=calibration_beside)
    if searches(args):
        read_ahead(args, model_dir)
    one_pass = OnePass(checkpoint, layout, args.method, calibration, CheatsheetOptions(add_fused=not args.no_fused),
                       device, quantizers, transforms, sqllm, {key for key in outputs if key != "folder"},
                       not args.no_clamp, StageTimes(device), parts=parts, thresholds_child=child)

    def folder_writer(folder: Path) -> SetupFolderWriter:
        if sqllm:
            from common.quant.anyprec import PackedCheckpointWriter
            return SetupFolderWriter(folder, one_pass, PackedCheckpointWriter(folder, checkpoint, layout, sqllm.bits))
        lutgemm = None if args.no_zero_point else CheckpointWriter(folder, checkpoint, layout,
                                                                   [q.bits for q in quantizers], args.q_group_size)
        return SetupFolderWriter(folder, one_pass, lutgemm)

    if child is not None:
        # on a cold cache the child's imports (thousands of small reads) starve behind the model's large
        # reads (the child then took 30 s instead of 18 on an H200); the model is read once they are done
        child.wait_ready(IMPORT_WAIT_S)
        read_ahead(args, model_dir)
    loop_started = time.time()  # after the imports, the device's start and the checks of every input
    try:
        convert_model(checkpoint, layout, outputs, one_pass.transform, device, parse_size(args.max_shard_size),
                      args.overwrite, lambda items, desc, total: progress(items, args.quiet, desc, total),
                      read_extras=tables.read_layer if tables else (lambda index: None),
                      writer_for={"folder": folder_writer})
    except InputError:
        parts.remove()  # bad input: a rerun with the same input cannot use them
        raise
    finally:
        if calibration is not None:
            close_when_done(calibration)
        if tables is not None:
            tables.close()
    if args.dump_awq:
        from common.quant.awq_search import results_entries
        from common.io.torchsave import save_atomically
        save_atomically(results_entries(transforms, layout), Path(args.dump_awq))
    parts.remove()
    if child:
        beside = f"thresholds in a second process {child.seconds:.1f} s"
    else:
        search = calibration.result().search
        beside = (f"calibration set-up {calibration.result().seconds:.1f} s"
                  f"{', beside the first layers' if calibration_beside else ', in the start-up'}"
                  f"{f' ({seconds_by_stage(search.set_up_times)})' if search is not None else ''}")
    memory = (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
              if device.type == "cuda" else "")
    return (f"{layers} layers, {args.method}, on {device} in {time.time() - started:.1f} s (start-up "
            f"{loop_started - started:.1f} s{quantized_in}; {beside}; stage totals over the {layers} layers: "
            f"{seconds_by_stage(one_pass.times)}"
            f"{memory})")


if __name__ == "__main__":
    run_main(main)
