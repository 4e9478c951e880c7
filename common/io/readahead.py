"""Warm the page cache with a checkpoint's tensors, in the order they will be used.

On a cold cache the scripts are I/O-bound: reading the weights is the floor. A background
thread reads the upcoming tensors while the script is still importing torch/transformers,
loading the tokenizer or computing, so that the real reads hit memory. It is bounded: it
stops after a share of the available memory, so it never pushes the page cache into
thrashing. Standard library only, so a script can start it before its heavy imports.
"""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Iterable

LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
BLOCK = 8 << 20  # bytes per read: small enough that other processes' small reads are not starved


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a conservative 8 GB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def safetensors_ranges(model_dir: Path, layers_only: bool,
                       skip: tuple[str, ...] = ()) -> list[tuple[tuple[int, str], Path, int, int]]:
    """(order key, file, offset, length) of every tensor; the key sorts by layer, then name
    (tensors outside the layers first). Names containing a `skip` string are left out."""
    ranges = []
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
        except (OSError, ValueError):
            continue  # the real reader reports bad files; warming is best effort
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            match = LAYER_INDEX.search(name)
            if (layers_only and not match) or any(part in name for part in skip):
                continue
            begin, end = entry.get("data_offsets", (0, 0))
            ranges.append(((int(match[1]) if match else -1, name), file, 8 + size + begin, end - begin))
    return ranges


def layer_file_ranges(files: Iterable[tuple[int, Path]]) -> list[tuple[tuple[int, str], Path, int, int]]:
    """`safetensors_ranges`' entries for whole files that belong to a layer (layer index, file)."""
    ranges = []
    for layer, file in files:
        try:
            ranges.append(((layer, str(file)), file, 0, file.stat().st_size))
        except OSError:
            continue  # the real reader reports it
    return ranges


def readahead_order(model_dirs: list[Path], layers_only: bool = False, skip: tuple[str, ...] = (),
                    layer_files: Iterable[tuple[int, Path]] = ()) -> list[tuple[tuple[int, str], Path, int, int]]:
    """What `start_readahead` reads, in order: by layer (tensors outside the layers first), the
    models interleaved; `layer_files` (layer index, file) whole, after their layer's tensors."""
    per_model = [sorted(safetensors_ranges(d, layers_only, skip)) for d in model_dirs if d.is_dir()]
    order = [r for group in zip(*per_model) for r in group] if len(per_model) > 1 else \
        (per_model[0] if per_model else [])
    if len(per_model) > 1:  # zip stops at the shortest; keep the tails too
        shortest = min(len(g) for g in per_model)
        order += [r for g in per_model for r in g[shortest:]]
    files = layer_file_ranges(layer_files)
    if files:  # a stable sort by layer keeps the models' interleaving within each
        order = sorted(order + files, key=lambda entry: entry[0][0])
    return order


def start_readahead(model_dirs: list[Path], layers_only: bool = False, skip: tuple[str, ...] = (),
                    share: float = 0.4, layer_files: Iterable[tuple[int, Path]] = ()) -> threading.Event:
    """Read `readahead_order`'s tensors and files in a daemon thread. `layer_files`, e.g. a SqueezeLLM
    folder's tables, so the disk streams every input once, in the order the layers need them.

    Returns an Event; set it to stop early. Reads at most `share` of the available memory.
    """
    stop = threading.Event()
    order = readahead_order(model_dirs, layers_only, skip, layer_files)
    budget = int(available_memory() * share)

    def run() -> None:
        buffer = bytearray(BLOCK)
        view = memoryview(buffer)
        fds: dict[Path, int] = {}
        spent = 0
        try:
            for _, file, offset, length in order:
                if stop.is_set() or spent + length > budget:
                    return
                fd = fds.get(file)
                if fd is None:
                    fd = fds[file] = os.open(file, os.O_RDONLY)
                done = 0
                while done < length and not stop.is_set():
                    got = os.preadv(fd, [view[: min(BLOCK, length - done)]], offset + done)
                    if got <= 0:
                        return
                    done += got
                spent += length
        except OSError:
            return
        finally:
            for fd in fds.values():
                os.close(fd)

    threading.Thread(target=run, name="readahead", daemon=True).start()
    return stop
