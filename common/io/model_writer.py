"""Write a Hugging Face model directory tensor by tensor, with memory bounded by one tensor.

Converters know every output tensor's name, shape and dtype before computing any of them,
so the shard layout and the safetensors headers are written first and each tensor's bytes
go straight to their offset as they are produced (no shard is ever buffered in memory).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from common.errors import InputError
from common.io.model_files import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.index\.json)$")
UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "KIB": 2 ** 10, "MIB": 2 ** 20,
         "GIB": 2 ** 30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (the units save_pretrained accepts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*", text.upper())
    if not match:
        raise InputError(f"--max_shard_size {text}: expected a size such as 5GB or 500MB")
    return int(float(match[1]) * UNITS.get(match[2] or "", 1))


class ShardedModelWriter:
    """Safetensors shards + index for a fixed list of (name, shape, dtype), filled in any order."""

    def __init__(self, out_dir: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int):
        self.out_dir = out_dir
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype))
            size += nbytes
        count = len(shards)
        self.locations: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        self.weight_map: dict[str, str] = {}
        self.pending: set[str] = set()
        self.total_size = 0
        self._fds: list[int] = []
        for number, shard in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{count:05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype in shard:
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            fd = os.open(out_dir / file_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(encoded).to_bytes(8, "little") + encoded, 0)
            data_start = 8 + len(encoded)
            os.ftruncate(fd, data_start + offset)
            for name, shape, dtype in shard:
                begin = header[name]["data_offsets"][0]
                self.locations[name] = (fd, data_start + begin, math.prod(shape) * dtype.itemsize)
                self.weight_map[name] = file_name
                self.pending.add(name)
                self.total_size += math.prod(shape) * dtype.itemsize
        self.expected = {name: (tuple(shape), dtype) for name, shape, dtype in tensors}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, announced {shape} {dtype}")
        fd, offset, nbytes = self.locations[name]
        data = tensor.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
        view = memoryview(data)
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, view[done:], offset + done)
        self.pending.discard(name)

    def finish(self) -> None:
        if self.pending:
            raise RuntimeError(f"tensors never written: {sorted(self.pending)[:3]}")
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def copy_model_files(source: Path, out_dir: Path, dtype: str = "float16") -> None:
    """Copy config, generation config, tokenizer and code files; config.json says `dtype`."""
    for item in source.iterdir():
        if item.is_file() and not WEIGHT_FILE.search(item.name) and item.name != "config.json":
            shutil.copy2(item, out_dir / item.name)
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    for sub in ("text_config",):
        if isinstance(config.get(sub), dict):
            config[sub]["torch_dtype"] = dtype
            config[sub]["dtype"] = dtype
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
