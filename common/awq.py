"""AWQ's three weight transforms (llm-awq's apply_scale, apply_clip, pseudo_quantize_tensor).

Arithmetic is float32. The scaled weights are rounded to float16 before clipping and
pseudo-quantization, so the fake-quantized model quantizes exactly the model that the
cheatsheet compares against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import InputError
from common.layers import LayerLayout
from common.model_files import Checkpoint


@dataclass
class LayerTransforms:
    """The AWQ entries of one decoder layer, with module names local to the layer."""
    scales: list[tuple[str, list[str], torch.Tensor]] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)


def pseudo_quantize(weight: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Round-to-nearest per group of `group_size` input channels (group_size <= 0: whole rows)."""
    shape = weight.shape
    w = weight.float().reshape(-1, group_size if group_size > 0 else shape[-1])
    if zero_point:
        max_int = 2 ** bits - 1
        high, low = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
        scale = (high - low).clamp(min=1e-5) / max_int
        zero = (-torch.round(low / scale)).clamp(0, max_int)
        w = (torch.clamp(torch.round(w / scale) + zero, 0, max_int) - zero) * scale
    else:
        max_int, min_int = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        w = torch.clamp(torch.round(w / scale), min_int, max_int) * scale
    return w.reshape(shape)


def apply_scales(tensors: dict[str, torch.Tensor], transforms: LayerTransforms) -> None:
    """Fold each (prev_op, layers, scales) entry into the layer's float32 tensors, in place."""
    for prev, names, scales in transforms.scales:
        scales = scales.to(tensors[f"{names[0]}.weight"].device, torch.float32)
        prev_weight = tensors[f"{prev}.weight"]
        prev_bias = tensors.get(f"{prev}.bias")
        if prev_weight.ndim == 1:  # a norm: divide its weight (and bias)
            prev_weight.div_(scales)
            if prev_bias is not None:
                prev_bias.div_(scales)
        else:  # a Linear: divide its last len(scales) output rows
            prev_weight[-scales.shape[0]:].div_(scales[:, None])
            if prev_bias is not None:
                prev_bias[-scales.shape[0]:].div_(scales)
        for name in names:
            tensors[f"{name}.weight"].mul_(scales[None, :])


def clip_weight(weight: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each group of input channels to [-max_val, max_val] (max_val [out, n_groups, 1])."""
    grouped = weight.reshape(max_val.shape[0], max_val.shape[1], -1)
    limit = max_val.to(weight.device, torch.float32)
    return torch.clamp(grouped, -limit, limit).reshape(weight.shape)


def load_results(path: Path) -> dict:
    """llm-awq's --dump_awq file, loaded without executing arbitrary pickles."""
    if not path.is_file():
        raise InputError(f"--awq_results {path}: no such file")
    try:
        results = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()
        hint = next((line for line in reason if "GLOBAL" in line or "global" in line), reason[0] if reason else "")
        raise InputError(f"--awq_results {path}: refused to load ({type(error).__name__}: {hint[:160]})") from None
    if not isinstance(results, dict) or not {"scale", "clip"} <= set(results):
        raise InputError(f"--awq_results {path}: expected a dict with 'scale' and 'clip' lists")
    return results


def split_by_layer(results: dict, path: Path, checkpoint: Checkpoint, layout: LayerLayout,
                   group_size: int) -> list[LayerTransforms]:
    """Validate every entry against the model and group them by decoder layer."""
    prefix = f"{layout.prefix}layers."
    per_layer = [LayerTransforms() for _ in layout.layers]

    def locate(name: str) -> tuple[int, str]:
        if not name.startswith(prefix) or "." not in name[len(prefix):]:
            raise InputError(f"--awq_results {path}: {name} is not a module of a decoder layer of {checkpoint.dir}")
        index_text, local = name[len(prefix):].split(".", 1)
        if not index_text.isdigit() or int(index_text) >= len(layout.layers):
            raise InputError(f"--awq_results {path}: {name} is not in the model ({len(layout.layers)} layers)")
        index = int(index_text)
        layer = layout.layers[index]
        if local not in layer.linears and f"{local}.weight" not in layer.others:
            raise InputError(f"--awq_results {path}: {name} is not in the model")
        return index, local

    for entry in results["scale"]:
        try:
            prev, names, scales = entry
        except (TypeError, ValueError):
            raise InputError(f"--awq_results {path}: a 'scale' entry is not (prev_op, [layers], scales)") from None
        index, prev_local = locate(prev)
        scales = torch.as_tensor(scales).float()
        if scales.ndim != 1 or not torch.isfinite(scales).all() or (scales <= 0).any():
            raise InputError(f"--awq_results {path}: scales for {names} must be finite, positive and 1-D")
        locals_ = []
        for name in names:
            name_index, local = locate(name)
            if name_index != index or local not in layout.layers[index].linears:
                raise InputError(f"--awq_results {path}: {name} is not a Linear of the layer of {prev}")
            in_features = checkpoint.tensors[layout.layers[index].linears[local]].shape[1]
            if in_features != scales.shape[0]:
                raise InputError(f"--awq_results {path}: {scales.shape[0]} scales for {name}, "
                                 f"which has {in_features} input channels")
            locals_.append(local)
        layer = layout.layers[index]
        prev_shape = (checkpoint.tensors[layer.linears[prev_local]].shape if prev_local in layer.linears
                      else checkpoint.tensors[layer.others[f"{prev_local}.weight"]].shape)
        if len(prev_shape) == 1 and prev_shape[0] != scales.shape[0] or \
                len(prev_shape) == 2 and prev_shape[0] < scales.shape[0]:
            raise InputError(f"--awq_results {path}: {scales.shape[0]} scales do not fit {prev} "
                             f"of shape {list(prev_shape)}")
        per_layer[index].scales.append((prev_local, locals_, scales))
    for entry in results["clip"]:
        try:
            name, max_val = entry
        except (TypeError, ValueError):
            raise InputError(f"--awq_results {path}: a 'clip' entry is not (layer_name, max_val)") from None
        index, local = locate(name)
        if local not in layout.layers[index].linears:
            raise InputError(f"--awq_results {path}: clip target {name} is not a Linear")
        out_features, in_features = checkpoint.tensors[layout.layers[index].linears[local]].shape
        max_val = torch.as_tensor(max_val).float()
        if (max_val.ndim != 3 or max_val.shape[0] != out_features or max_val.shape[2] != 1
                or in_features % max_val.shape[1]):
            raise InputError(f"--awq_results {path}: clip max_val of shape {list(max_val.shape)} does not "
                             f"fit {name} of shape {[out_features, in_features]}")
        if not torch.isfinite(max_val).all():
            raise InputError(f"--awq_results {path}: clip max_val for {name} holds NaN or Inf")
        per_layer[index].clips[local] = max_val
    return per_layer
