"""Any-Precision-LLM / SqueezeLLM quantized folders (SPEC §5): find, load safely, dequantize.

A folder holds `lut_<b>/l<i>.pt` (per-row lookup tables) and `weights/l<i>.pt` (codes for
the largest b), each a torch.save'd dict module -> NumPy array or tensor. They are loaded
with `weights_only=True` and an explicit allowlist of the NumPy types such pickles use, so
a file that needs anything else is refused rather than executed.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import torch

from common.errors import InputError

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
