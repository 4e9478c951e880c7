"""Any-Precision-LLM / SqueezeLLM quantized folders (SPEC §5): find, load safely, dequantize.

A folder holds `lut_<b>/l<i>.pt` (per-row lookup tables) and `weights/l<i>.pt` (codes for
the largest b), each a torch.save'd dict module -> NumPy array or tensor. They are loaded
with `weights_only=True` and an explicit allowlist of the NumPy types such pickles use, so
a file that needs anything else is refused rather than executed.
"""
from __future__ import annotations

import os
import re
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.child import exit_with_parent, spawn_context
from common.errors import InputError
from common.layers import find_layers
from common.io.model_files import Checkpoint

_ALLOWLIST_LOCK = threading.Lock()  # torch's safe_globals context is process-wide, not per thread
LUT_DIR = re.compile(r"^lut_(\d+)$")
LAYER_PREFIX = re.compile(r"^(?:.*\.)?layers\.\d+\.")


def numpy_safe_globals() -> list:
    """The globals a pickled NumPy array needs, under both NumPy 1 and NumPy 2 module names."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    entries: list = [np.ndarray, np.dtype,
                     (reconstruct, "numpy.core.multiarray._reconstruct"),
                     (reconstruct, "numpy._core.multiarray._reconstruct")]
    scalar = getattr(core.multiarray, "scalar", None)
    if scalar is not None:
        entries += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    for name in ("float16", "float32", "float64", "uint8", "uint16", "uint32", "uint64",
                 "int8", "int16", "int32", "int64", "bool_"):
        entries.append(type(np.dtype(getattr(np, name))))
    return entries


def load_pickled_dict(path: Path) -> dict[str, torch.Tensor]:
    """A dict module -> tensor from a torch.save'd dict of arrays/tensors, safely."""
    if not path.is_file():
        raise InputError(f"{path}: missing")
    try:
        with _ALLOWLIST_LOCK, torch.serialization.safe_globals(numpy_safe_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        lines = str(error).strip().splitlines()
        hint = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(error).__name__)
        raise InputError(f"{path}: refused to load ({hint.strip()[:160]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a dict module -> array")
    result = {}
    for name, value in data.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"{path}: entry {name} is not an array")
        result[LAYER_PREFIX.sub("", str(name))] = tensor
    return result


def lut_bit_widths(folder: Path) -> list[int]:
    if not folder.is_dir():
        raise InputError(f"--quantized_path {folder}: no such directory")
    widths = sorted(int(m[1]) for p in folder.iterdir() if p.is_dir() and (m := LUT_DIR.match(p.name)))
    if not widths:
        raise InputError(f"--quantized_path {folder}: no lut_<bits> folder (expected lut_3/, weights/ ...)")
    if not (folder / "weights").is_dir():
        raise InputError(f"--quantized_path {folder}: no weights/ folder with the codes")
    return widths


def dequantize(lut: torch.Tensor, codes: torch.Tensor, shift: int, where: str,
               shape: tuple[int, int]) -> torch.Tensor:
    """W_fq[r, j] = fp16(LUT[r, code[r, j] >> shift]), on the LUT's device.

    Gathering from the fp16-cast LUT gives the same values as casting the gathered weight,
    without a float32 matrix in between."""
    lut = lut.reshape(lut.shape[0], lut.shape[-1]) if lut.ndim == 3 else lut
    codes = codes.reshape(codes.shape[0], codes.shape[-1]) if codes.ndim == 3 else codes
    if tuple(codes.shape) != tuple(shape):
        raise InputError(f"{where}: codes of shape {list(codes.shape)}, but the weight is {list(shape)}")
    if lut.ndim != 2 or lut.shape[0] != shape[0]:
        raise InputError(f"{where}: LUT of shape {list(lut.shape)} does not fit {shape[0]} rows")
    if not lut.dtype.is_floating_point or not torch.isfinite(lut).all():
        raise InputError(f"{where}: LUT holds NaN/Inf or is not floating point")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise InputError(f"{where}: codes must be unsigned integers, got {codes.dtype}")
    index = codes.long() >> shift
    if int(index.min()) < 0 or int(index.max()) >= lut.shape[1]:
        raise InputError(f"{where}: a code is out of range for a {lut.shape[1]}-entry LUT")
    return torch.gather(lut.half(), 1, index)


@dataclass(frozen=True)
class QuantizedFolder:
    """An Any-Precision / SqueezeLLM folder at one bit width (codes stored for the largest)."""
    path: Path
    bits: int
    shift: int
    read_in_children = True  # pickles: unpickling holds the GIL (TableReader)

    @classmethod
    def open(cls, path: Path, bits: int | None) -> "QuantizedFolder":
        widths = lut_bit_widths(path)
        if bits is None and len(widths) > 1:
            raise InputError(f"--quantized_path {path}: holds lut_{{{','.join(map(str, widths))}}}; "
                             "choose one with --bits")
        bits = bits if bits is not None else widths[0]
        if bits not in widths:
            raise InputError(f"--bits {bits}: {path} has no lut_{bits} folder (it has {widths})")
        return cls(path, bits, max(widths) - bits)

    def check_layers(self, layers: int) -> None:
        for index in range(layers):
            for folder in (f"lut_{self.bits}", "weights"):
                if not (self.path / folder / f"l{index}.pt").is_file():
                    raise InputError(f"{self.path / folder / f'l{index}.pt'}: missing (the model has {layers} layers)")

    def read_layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(LUTs, codes) of layer `index`, module -> tensor (TableReader runs this in a child process)."""
        return (load_pickled_dict(self.path / f"lut_{self.bits}" / f"l{index}.pt"),
                load_pickled_dict(self.path / "weights" / f"l{index}.pt"))

    def fake_quantized_layer(self, index: int, tables: tuple[dict, dict], shapes: dict[str, tuple[int, int]],
                             device: torch.device, model: Path) -> dict[str, torch.Tensor]:
        """'<module>.weight' -> fp16 W_fq for every Linear of the layer (`shapes`: module -> [out, in])."""
        luts, codes = tables
        for source, table in ((f"lut_{self.bits}", luts), ("weights", codes)):
            unknown = sorted(set(table) - set(shapes))
            if unknown:
                raise InputError(f"{self.path / source / f'l{index}.pt'}: {unknown[0]} is not a Linear of layer "
                                 f"{index} of {model}")
            missing = sorted(set(shapes) - set(table))
            if missing:
                raise InputError(f"{self.path / source / f'l{index}.pt'}: module {missing[0]} is missing")
        where = f"{self.path}/{{lut_{self.bits},weights}}/l{index}.pt"
        return {f"{module}.weight": dequantize(luts[module].to(device), codes[module].to(device), self.shift,
                                               f"{where}: {module}", shape)
                for module, shape in shapes.items()}


Tables = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # (LUTs, codes), module -> tensor


@dataclass(frozen=True)
class ComputedTables(QuantizedFolder):
    """The tables a run's own k-means wrote into `path`: `l<i>.safetensors` per layer, '<module>.lut'
    float16 [out, 2^b] and '<module>.codes' uint8 [out, in]. Read back with plain reads, in this process:
    no pickles, whose writing and reading hold the GIL for ~1 s per 8B layer. `export` writes
    Any-Precision's folder (SPEC §9.3) from them."""
    read_in_children = False

    def file(self, index: int) -> Path:
        return self.path / f"l{index}.safetensors"

    def check_layers(self, layers: int) -> None:
        for index in range(layers):
            if not self.file(index).is_file():
                raise InputError(f"{self.file(index)}: missing (the model has {layers} layers)")

    def read_layer(self, index: int) -> Tables:
        from common.io.model_files import read_safetensors_file
        tensors = read_safetensors_file(self.file(index))
        return ({name.removesuffix(".lut"): t for name, t in tensors.items() if name.endswith(".lut")},
                {name.removesuffix(".codes"): t for name, t in tensors.items() if name.endswith(".codes")})

    def export(self, folder: Path, layers: int) -> None:
        """Any-Precision's quantized folder of these tables in `folder`, a layer at a time."""
        from common.quant.anyprec import save_quantized_layer
        for index in range(layers):
            save_quantized_layer(folder, index, self.bits, *self.read_layer(index))


def reader_count() -> int:
    """Child processes reading ahead: each unpickles an 8B layer's tables in ~0.8 s and holds torch
    (~0.4 GB of host memory), so two keep up with a disk-bound H200 layer loop (~0.4 s a layer);
    on a small machine one, so the loop keeps its cores."""
    return max(1, min(2, (os.cpu_count() or 2) // 8))


class TableReader:
    """`QuantizedFolder.read_layer` run in child processes, the next layers' ahead of the device work.

    torch's weights-only unpickler rebuilds a pickled NumPy array through one long string, holding
    the GIL for ~0.8 s per layer of an 8B model; in a reader thread that starved the main thread's
    kernel launches (6x fewer on an H200: bench/sqllm_tables.py). The children hand their tensors
    over in shared memory (torch.multiprocessing); where that fails (a container's /dev/shm may hold
    only 64 MB), the layers are read in this process instead.

    The first layers are asked for at once, and every worker keeps a layer in hand beside the one it
    unpickles (`ahead` = 2 x workers layers in flight): with only `workers` in flight, each layer had
    one loop step to be ready in, so the loop ran at one worker's pace (~0.7 s a layer on an H200).
    A run's own tables (`ComputedTables`, no pickles) are read in this process."""

    def __init__(self, folder: QuantizedFolder, layers: int, workers: int | None = None):
        self.folder, self.layers = folder, layers
        self.workers = workers or reader_count()
        self.ahead = 2 * self.workers
        self._pending: dict[int, Future] = {}
        self._pool: ProcessPoolExecutor | None = None
        if not folder.read_in_children:
            return
        try:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=spawn_context(),
                                             initializer=exit_with_parent, initargs=(os.getpid(),))
            self._ask_from(0)  # the children start (and import) now, then read the first layers
        except (OSError, RuntimeError):  # no child processes here: read in this process
            self.close()

    def _ask_from(self, index: int) -> None:
        """Have layers index .. index + ahead - 1 read (those not asked for yet)."""
        for ahead in range(index, min(index + self.ahead, self.layers)):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self.folder.read_layer, ahead)

    def read_layer(self, index: int) -> Tables:
        """Layer `index`'s tables; layers are asked for in order (the next ones are started now)."""
        if self._pool is not None:
            try:
                self._ask_from(index)
                return self._pending.pop(index).result()
            except InputError:
                raise
            except Exception:  # noqa: BLE001 - no shared memory, or a child died: read here from now on
                self.close()
        return self.folder.read_layer(index)

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "TableReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LutCheckpoint(Checkpoint):
    """The original model's checkpoint read with every decoder Linear replaced by its LUT gather:
    the fake-quantized model conv_sqllm.py would write, without writing it."""

    def __init__(self, original_dir: Path, folder: QuantizedFolder, flag: str = "--original_model"):
        super().__init__(original_dir, flag)
        self.folder = folder
        self.layout = find_layers(self)
        folder.check_layers(len(self.layout.layers))
        self._where = {name: (layer.index, module) for layer in self.layout.layers
                       for module, name in layer.linears.items()}
        self._lock = threading.Lock()
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    def read_raw(self, name: str, pin: bool = False) -> torch.Tensor:
        if name not in self._where:
            return super().read_raw(name, pin)
        index, module = self._where[name]
        with self._lock:  # a layer's pickles are read once, whichever reader thread asks first
            if self._cached is None or self._cached[0] != index:
                linears = self.layout.layers[index].linears
                shapes = {m: tuple(self.tensors[n].shape) for m, n in linears.items()}
                self._cached = (index, self.folder.fake_quantized_layer(
                    index, self.folder.read_layer(index), shapes, torch.device("cpu"), self.dir))
            weight = self._cached[1][f"{module}.weight"]
        return weight.pin_memory() if pin else weight.clone()
