"""Test helpers: tiny model pairs, a naive quantizer, subprocess runners."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def rtn_fake_quantize(source: Path, target: Path, bits: int = 3, seed: int | None = None) -> None:
    """A naive per-row symmetric round-to-nearest twin of `source` (layer Linears only)."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    for file in source.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name, tensor in tensors.items():
            if ".layers." in name and name.endswith(".weight") and tensor.ndim == 2:
                levels = 2 ** (bits - 1) - 1
                w = tensor.float()
                scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / levels
                tensors[name] = ((w / scale).round().clamp(-levels, levels) * scale).to(tensor.dtype)
        save_file(tensors, str(target / file.name), metadata={"format": "pt"})


def run_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would; returns the completed process."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def assert_input_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one line on stderr starting with 'error:', naming what the test expects."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    # progress bars redraw with carriage returns; what stays on screen is after the last one
    lines = [line.rsplit("\r", 1)[-1] for line in result.stderr.split("\n")]
    lines = [line for line in lines if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def layer_weight(model_dir: Path, name: str) -> torch.Tensor:
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(str(file))
        if name in tensors:
            return tensors[name]
    raise KeyError(name)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
