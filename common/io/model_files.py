"""Find a model directory and read its tensors one at a time.

Only the safetensors headers are parsed up front (so a truncated or corrupt shard is
reported before any work starts); each tensor's bytes are read on demand with `os.preadv`
straight into a (pinned, when a GPU is used) buffer. Nothing ever holds a whole model.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from common.errors import InputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range."""
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file` (safetensors only)
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading any tensor data."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise InputError(f"{file}: truncated safetensors file (no header)")
            header_len = int.from_bytes(head, "little")
            if header_len <= 0 or 8 + header_len > size:
                raise InputError(f"{file}: corrupt or truncated safetensors header")
            header = json.loads(handle.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{file}: unreadable safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise InputError(f"{file}: corrupt safetensors header")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{file}: tensor {name}: unsupported dtype or corrupt header entry") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise InputError(f"{file}: tensor {name}: header byte range does not match its shape")
        if data_start + end > size:
            raise InputError(f"{file}: truncated: tensor {name} ends past the end of the file")
        tensors[name] = TensorInfo(name, file, dtype, shape, data_start + begin, nbytes)
    return tensors


class Checkpoint:
    """The weights of one model directory, read tensor by tensor."""

    def __init__(self, model_dir: Path, flag: str = "model"):
        self.dir = model_dir
        self.flag = flag
        self.config = load_config(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        self._bin_shards: dict[Path, dict[str, torch.Tensor]] = {}
        self._fds: dict[Path, int] = {}
        files = weight_files(model_dir)
        if files[0].suffix == ".safetensors":
            for file in files:
                for name, info in read_safetensors_header(file).items():
                    self.tensors[name] = info
        else:
            for file in files:
                state = self._load_bin(file)
                offsets = bin_offsets(file, state)
                for name, tensor in state.items():
                    self.tensors[name] = TensorInfo(name, file, tensor.dtype, tuple(tensor.shape),
                                                    offsets.get(name, -1), tensor.numel() * tensor.element_size())
                if len(offsets) == len(state):  # every tensor is read with pread: unmap the file
                    del self._bin_shards[file]
        if not self.tensors:
            raise InputError(f"{model_dir}: the checkpoint holds no tensors")

    def files(self) -> list[Path]:
        """The weight files the tensors come from."""
        return sorted({info.file for info in self.tensors.values()})

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin_shards:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as error:
                raise InputError(f"{file}: cannot load ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:120]})") from None
            if not isinstance(state, dict):
                raise InputError(f"{file}: not a state dict")
            self._bin_shards[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._bin_shards[file]

    def read_raw(self, name: str, pin: bool = False) -> torch.Tensor:
        """The tensor in its stored dtype, in a fresh CPU buffer (pinned if asked)."""
        return self.read_info(self.tensors[name], pin)

    def read_info(self, info: TensorInfo, pin: bool = False) -> torch.Tensor:
        """`read_raw` of the tensor `info` describes."""
        name = info.name
        if info.offset < 0:
            source = self._load_bin(info.file)[name]
            return torch.empty(info.shape, dtype=info.dtype, pin_memory=pin).copy_(source)
        return read_tensor(info, self._fd(info.file), pin)

    def read_named(self, names: dict[str, str], pin: bool = False) -> dict[str, torch.Tensor]:
        """`read_raw` of each tensor name, keyed as `names` keys them (e.g. by name inside a layer)."""
        return {key: self.read_raw(name, pin) for key, name in names.items()}

    def read(self, name: str, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The tensor cast to `dtype` on the CPU."""
        return self.read_raw(name).to(dtype)

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin_shards.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


READ_CHUNK = 8 << 20  # bytes per preadv, so a concurrent process's small reads (its imports) need not queue
#                       behind a whole 117 MB weight (on the H200 no measurable change either way)


def bin_offsets(file: Path, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Where each contiguous tensor of a torch.save'd state dict, loaded with mmap=True, lies in `file`:
    read from there with pread, like a safetensors tensor, into a fresh buffer, no page of the file stays
    mapped (and counted in the process's memory) once a layer is done. Empty where the layout is not
    the one expected (the mmap'd tensors then serve)."""
    try:
        reader = torch._C.PyTorchFileReader(str(file))
        records = sorted(reader.get_record_offset(r) for r in reader.get_all_records() if r.startswith("data/"))
    except Exception:  # noqa: BLE001 - a private API: any surprise means "use the mmap'd tensors"
        return {}
    storages = sorted({t.untyped_storage().data_ptr() for t in state.values() if t.numel()})
    if not storages or len(storages) != len(records):
        return {}
    base = storages[0] - records[0]
    if [pointer - base for pointer in storages] != records:
        return {}
    return {name: t.data_ptr() - base for name, t in state.items() if t.numel() and t.is_contiguous()}


def read_tensor(info: TensorInfo, fd: int, pin: bool = False) -> torch.Tensor:
    """Read one safetensors tensor's bytes with preadv (thread-safe: no shared file position)."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
    view = memoryview(buffer.numpy()) if info.nbytes else None
    done = 0
    while done < info.nbytes:
        got = os.preadv(fd, [view[done: done + READ_CHUNK]], info.offset + done)
        if got <= 0:
            raise InputError(f"{info.file}: truncated while reading tensor {info.name}")
        done += got
    return buffer.view(info.dtype).reshape(info.shape)


def all_finite(tensor: torch.Tensor) -> torch.Tensor:
    """Device bool: no NaN or Inf in `tensor`. min and max propagate NaN and reach any Inf, and
    this one pass is ~40x faster on a CPU than `isfinite(x).all()`, which writes a mask as large as x."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def float16_check(raw: torch.Tensor, half: torch.Tensor, where: str) -> tuple[torch.Tensor, Callable[[], str]]:
    """(device flag "`half`, the float16 cast of `raw`, is finite", a function that says what is
    wrong): NaN/Inf in the checkpoint, or a finite value beyond float16's range, with that value."""
    def problem() -> str:  # only after a failed check: finding the largest value costs a pass
        value = float(raw.abs().amax()) if raw.numel() else 0.0
        if not math.isfinite(value):
            return f"{where} holds NaN or Inf"
        return f"{where} holds {value:.6g}, beyond the float16 range (±65504)"
    return all_finite(half), problem


def require_float16(raw: torch.Tensor, half: torch.Tensor, where: str) -> None:
    """Input error now (one sync) unless `half`, the float16 cast of `raw`, is finite."""
    fits, problem = float16_check(raw, half, where)
    if not fits:
        raise InputError(problem())


def round_to_float16(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Replace each tensor by its float16 cast, as SPEC §2 uses weights (and the fork's float16 model
    holds them); an input error names a tensor that float16 cannot hold."""
    for name, tensor in tensors.items():
        half = tensor.half()
        require_float16(tensor, half, f"{where} {name}")
        tensors[name] = half


def read_safetensors_file(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one (small) safetensors file, e.g. a part file of our own."""
    fd = os.open(file, os.O_RDONLY)
    try:
        return {name: read_tensor(info, fd) for name, info in read_safetensors_header(file).items()}
    finally:
        os.close(fd)


def load_config(model_dir: Path) -> dict:
    file = model_dir / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"{model_dir}: no config.json, not a Hugging Face model directory") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{file}: unreadable ({error})") from None
    if not isinstance(config, dict):
        raise InputError(f"{file}: not a JSON object")
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors (single or indexed) or pytorch_model*.bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise InputError(f"{index}: unreadable index ({error})") from None
            files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{index}: shard {missing[0].name} is missing")
            return files
        if (model_dir / single).is_file():
            return [model_dir / single]
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise InputError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights found")
    return files
