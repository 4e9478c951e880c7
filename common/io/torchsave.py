"""Write `torch.save(list_of_dicts)` files one tensor at a time.

A 70B cheatsheet is ~35 GB, yet its format is a single `torch.save`d list. `torch.save`
needs every tensor in memory at once; this writer does not. It pickles the structure with
placeholder storages (the same records torch.save emits: `_rebuild_tensor_v2` over
`('storage', <type>, key, 'cpu', numel)`), then appends each storage's bytes as a zip
record as the caller produces it, so host memory is bounded by one tensor. The result is
read by `torch.load(..., weights_only=True)` exactly like a `torch.save` file.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.serialization

from common.errors import InputError
from common.io.outputs import atomic_file, opened_for_writing

STORAGE_TYPES = {
    torch.float16: "HalfStorage", torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage",
    torch.int32: "IntStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
    torch.int64: "LongStorage", torch.float64: "DoubleStorage",
}


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor that will be written later."""
    shape: tuple[int, ...]
    dtype: torch.dtype


class _StorageRef:
    def __init__(self, key: str, meta: TensorMeta):
        self.key, self.meta = key, meta


class _Placeholder:
    """Pickles like a contiguous CPU tensor whose storage is written later."""

    def __init__(self, ref: _StorageRef):
        self.ref = ref

    def __reduce_ex__(self, protocol: int):
        shape = self.ref.meta.shape
        stride = tuple(int(s) for s in torch.empty(shape, device="meta").stride())
        return (torch._utils._rebuild_tensor_v2,
                (self.ref, 0, shape, stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, STORAGE_TYPES[obj.meta.dtype])
            numel = 1
            for d in obj.meta.shape:
                numel *= d
            return ("storage", storage_type, obj.key, "cpu", numel)
        return None


def _leaves(structure: Any) -> Iterable[Any]:
    """Leaves of nested lists/dicts in a fixed traversal order."""
    if isinstance(structure, dict):
        for value in structure.values():
            yield from _leaves(value)
    elif isinstance(structure, (list, tuple)):
        for value in structure:
            yield from _leaves(value)
    else:
        yield structure


def layout_bytes(layout: list[Any]) -> int:
    """The bytes of the tensors a layout announces (TensorMeta leaves): the file's size, near enough."""
    return sum(math.prod(meta.shape) * meta.dtype.itemsize for meta in _leaves(layout))


def _replace_leaves(structure: Any, make: Callable[[Any], Any]) -> Any:
    if isinstance(structure, dict):
        return {k: _replace_leaves(v, make) for k, v in structure.items()}
    if isinstance(structure, list):
        return [_replace_leaves(v, make) for v in structure]
    return make(structure)


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` through a temporary name; a failed write is one OutputError line."""
    with atomic_file(path) as temp, opened_for_writing(temp) as handle:
        torch.save(obj, handle)


def write_streamed(path: Path, layout: list[Any] | dict[str, Any], load_item: Callable[[int], Any]) -> None:
    """torch.save a list (or dict) whose item i has the structure of `layout`'s item i (TensorMeta
    leaves); a dict's items are its values, in order.

    `load_item(i)` returns item i with real tensors in place of the metas (same keys, same
    order); it is called once per item, in order, and each item is released before the next.
    """
    items = list(layout.values()) if isinstance(layout, dict) else list(layout)
    refs: list[_StorageRef] = []

    def placeholder(meta: TensorMeta) -> _Placeholder:
        refs.append(_StorageRef(str(len(refs)), meta))
        return _Placeholder(refs[-1])

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(_replace_leaves(layout, placeholder))
    data = buffer.getvalue()
    key = 0
    with opened_for_writing(path) as handle, torch.serialization._open_zipfile_writer(handle) as writer:
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for index in range(len(items)):
            item = load_item(index)
            for tensor, meta_ref in zip(_leaves(item), refs[key: key + _count(items[index])]):
                if tuple(tensor.shape) != meta_ref.meta.shape or tensor.dtype != meta_ref.meta.dtype:
                    raise RuntimeError(f"item {index}: tensor does not match its announced layout")
                tensor = tensor.detach().cpu().contiguous()
                storage = tensor.untyped_storage()
                writer.write_record(f"data/{meta_ref.key}", storage, tensor.numel() * tensor.element_size())
            key += _count(items[index])
            del item


def _count(structure: Any) -> int:
    return sum(1 for _ in _leaves(structure))


class _Abort(Exception):
    """Handed to the writer thread when the producer fails."""


class StreamedWriter:
    """`write_streamed` in a background thread, fed item by item with `put`, in order.

    Writing (and the zip's CRC) then overlaps the producer's work; at most `depth` items
    wait in the queue, so memory stays bounded.
    """

    def __init__(self, path: Path, layout: list[Any], depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(path, layout), name="torch-save", daemon=True)
        self.thread.start()

    def _run(self, path: Path, layout: list[Any]) -> None:
        try:
            write_streamed(path, layout, self._next)
        except BaseException as error:  # handed to the producer in put()/finish()
            self.error = error

    def _next(self, index: int) -> Any:
        item = self.queue.get()
        if item is _Abort:
            raise _Abort
        return item

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        while self.thread.is_alive():
            try:
                self.queue.put(_Abort, timeout=0.1)
            except queue.Full:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    pass
            self.thread.join(timeout=0.1)

    def __enter__(self) -> "StreamedWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()


class StateDictWriter:
    """A `torch.save`d dict of tensors whose names, shapes and dtypes are planned up front, written
    tensor by tensor. Tensors may arrive out of plan order; each waits until its turn (a caller
    that writes layer by layer in plan order holds at most one layer)."""

    def __init__(self, path: Path, plan: list[tuple[str, TensorMeta]]):
        self.order = [name for name, _ in plan]
        self.expected = {name: (meta.shape, meta.dtype) for name, meta in plan}
        self.total_size = layout_bytes([meta for _, meta in plan])
        self._writer = StreamedWriter(path, dict(plan))
        self._next = 0
        self._waiting: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._waiting[name] = tensor
        while self._next < len(self.order) and self.order[self._next] in self._waiting:
            self._writer.put(self._waiting.pop(self.order[self._next]))
            self._next += 1

    def finish(self) -> None:
        if self._next < len(self.order):
            raise RuntimeError(f"tensors never written: {self.order[self._next: self._next + 3]}")
        self._writer.finish()

    def close(self) -> None:
        if self._writer.thread.is_alive():
            self._writer.abort()


def load_user_file(path: Path, flag: str, mmap: bool = False):
    """A torch.save'd file a user passes with `flag`, loaded without executing arbitrary pickles
    (weights_only; `mmap`: its tensors read from the file as used); a missing or refused file is an
    input error naming the flag and the file."""
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        reason = str(error).strip().splitlines()
        hint = next((line for line in reason if "GLOBAL" in line or "global" in line), reason[0] if reason else "")
        raise InputError(f"{flag} {path}: refused to load ({type(error).__name__}: {hint[:160]})") from None
