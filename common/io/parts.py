"""Resume after an interruption: each finished decoder layer's results in a part file.

cheatsheet.py and decdec_setup.py write every layer's costly results (residual cheatsheets, AWQ
search results) to `layer-<i>.safetensors` as they finish; a rerun with the same inputs and
options reads those layers back instead of computing them again. Any change (a model file, an
option) gives another fingerprint, and the old parts are dropped.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save as safetensors_bytes

from common.io.model_files import read_safetensors_file
from common.io.outputs import atomic_file


def file_identities(paths: Iterable[Path]) -> list:
    """[path, size, mtime] per file: what a fingerprint compares (changed files give new parts)."""
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(set(paths))]


class PartStore:
    """Per-layer part files in a folder of their own, valid for one fingerprint (of the inputs and
    options): a run that stops keeps its finished layers, and the same command resumes from them."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.dir = folder
        stamp = self.dir / "fingerprint.json"
        if self.dir.exists():
            try:
                same = json.loads(stamp.read_text()) == fingerprint
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # a killed run's half-written part (we hold the lock)
            stale.unlink(missing_ok=True)
        stamp.write_text(json.dumps(fingerprint))
        self._writer: ThreadPoolExecutor | None = None
        self._writing: Future | None = None

    def path(self, layer: int) -> Path:
        return self.dir / f"layer-{layer:05d}.safetensors"

    def done(self, layer: int) -> bool:
        return self.path(layer).is_file()

    def write(self, layer: int, results: dict[str, dict[str, torch.Tensor]]) -> None:
        flat = {f"{module}|{key}": tensor.contiguous() for module, fields in results.items()
                for key, tensor in fields.items()}
        with atomic_file(self.path(layer), self.resume_hint()) as temp:
            temp.write_bytes(safetensors_bytes(flat))

    def write_beside(self, layer: int, results: dict[str, dict[str, torch.Tensor]]) -> None:
        """`write` on a thread of the store's own while the next layer computes (on 2 CPU cores a
        TinyLlama layer's part took 0.15 s to write, 15 % of its cheatsheet); one write is in flight at
        most: this waits for the one before, and raises its error. `results` must not change after."""
        self.wait()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-part")
        self._writing = self._writer.submit(self.write, layer, results)

    def wait(self) -> None:
        """Wait for the write in flight, if any, and raise its error."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def resume_hint(self) -> str:
        return f"; finished layers are kept in {self.dir}: the same command resumes from them"

    def read(self, layer: int) -> dict[str, dict[str, torch.Tensor]]:
        results: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in read_safetensors_file(self.path(layer)).items():
            module, field = key.split("|", 1)
            results.setdefault(module, {})[field] = tensor
        return results

    def remove(self) -> None:
        """Drop every part (the run is over, or its input was bad): a write in flight ends first, its
        error ignored, since no part is kept anyway."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the parts are dropped anyway
            pass
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        shutil.rmtree(self.dir, ignore_errors=True)
