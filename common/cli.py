"""Argument helpers every script shares: device choice, --overwrite, --quiet, progress bars.

Torch and tqdm are imported only when used, so a script can parse its arguments (and start
reading its inputs) before paying for the heavy imports.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

from common.errors import InputError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="torch device to compute on, e.g. cuda, cuda:1, cpu "
                             "(default: cuda when available, else cpu)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (default: refuse and keep them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the final lines still say what was written)")


DATASET_NAMES = ("wikitext2", "ptb", "c4", "pileval")  # common.calib.calibration's, without its torch import


def add_sampling_args(group) -> None:
    """The calibration sampler's flags (SPEC §4), the same wherever samples are drawn: thresholds.py,
    decdec_setup.py and conv_sqllm.py's sensitivity (their defaults are the reference's and Any-Precision's)."""
    group.add_argument("--dataset", default="c4",
                       help=f"named dataset ({', '.join(DATASET_NAMES)}; needs the 'datasets' package) or a local "
                            ".txt/.jsonl[.gz|.zst]/.json/.parquet/.csv/.arrow file or save_to_disk folder (default c4)")
    group.add_argument("--text_column", default=None, help="text field of a local file (default: text)")
    group.add_argument("--seq_len", type=int, default=512, help="tokens per sample (default 512)")
    group.add_argument("--num_examples", type=int, default=100, help="number of samples (default 100)")
    group.add_argument("--random_state", type=int, default=0, help="sampling seed (default 0)")
    group.add_argument("--sampling", choices=["reference", "concat"], default="reference",
                       help="reference: whole passages of at least seq_len tokens, drawn as the reference scripts "
                            "draw them; concat: random windows of all passages joined (for datasets of short "
                            "passages such as wikitext2 or ptb); default reference")


def add_sensitivity_args(group) -> None:
    """SqueezeLLM's sensitivity flags (SPEC §9.1), the same in conv_sqllm.py and decdec_setup.py."""
    group.add_argument("--gradients", default=None,
                       help="read the sensitivity from this file (ours, or Any-Precision's cache/gradients/*.pt)")
    group.add_argument("--dump_gradients", default=None, help="also save the sensitivity to this file")
    group.add_argument("--stash_gib", type=float, default=8.0,
                       help="host memory for the stashed layer inputs and, with --dump_gradients, the sensitivity "
                            "(default 8 GiB); "
                            "beyond it they wait in files beside the output")


def pick_device(requested: str | None) -> "torch.device":
    """The device to compute on: the user's choice, else the first GPU, else the CPU."""
    import torch
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise InputError(f"--device {requested}: not a torch device ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) present")
    return device


def progress(items: Iterable[T], quiet: bool, desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar over `items` (silent with --quiet)."""
    from tqdm import tqdm
    return iter(tqdm(items, desc=desc, total=total, disable=quiet, dynamic_ncols=True, leave=False))


def seconds_by_stage(times: dict[str, float], leave_out: tuple[str, ...] = ()) -> str:
    """'stage 1.2 s, other 3.4 s': the stage times of a final report line."""
    return ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in times.items() if stage not in leave_out)


_SHOWN_AS: dict[str, str] = {}  # temporary folder -> the path it is renamed to when complete


@contextmanager
def paths_shown_as(temporary: Path, final: Path) -> Iterator[None]:
    """While a program (the demo) runs the scripts inside a folder that becomes `final` only once
    complete, their report lines name the final paths, which outlive the run."""
    _SHOWN_AS[str(temporary)] = str(final)
    try:
        yield
    finally:
        del _SHOWN_AS[str(temporary)]


def shown(path) -> str:
    """`path` as a message names it: under its final name where `paths_shown_as` says so."""
    path = str(path)
    for temporary, final in _SHOWN_AS.items():
        if path == temporary or path.startswith(temporary + "/"):
            return final + path[len(temporary):]
    return path


def report_written(paths: list, summary: str) -> None:
    """The lines a run ends with, --quiet or not: what it did, and where each output now is."""
    print(f"{summary}; wrote:", file=sys.stderr)
    for path in paths:
        print(f"  {shown(path)}", file=sys.stderr)
