"""AWQ's weight transforms (llm-awq's apply_scale, apply_clip, pseudo_quantize_tensor), and its
results file.

Dtypes follow the fork, because the bytes of the outputs depend on them: the quantizer runs in
the dtype of the weight it is given (float16 for the model's weights); a clip limit promotes
the clipped weight to its own dtype (the fork's `clamp(fp16 weight, fp32 limit)` returns fp32,
so a results file with float32 limits quantizes those Linears in float32). Scales are folded as
the fork's `apply_scale` does on its float16 model: in place, entry by entry, each multiply and
divide rounded to float16 (SPEC §7.6, "computed in fp16 as the fork runs").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import InputError
from common.layers import LayerLayout
from common.io.model_files import Checkpoint
from common.io.torchsave import load_user_file


@dataclass
class LayerTransforms:
    """The AWQ entries of one decoder layer, with module names local to the layer."""
    scales: list[tuple[str, list[str], torch.Tensor]] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    return weight.reshape(-1, group_size if group_size > 0 else weight.shape[-1])


def _zero_point_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, zeros) of grouped rows `w`, all in w's dtype, in the fork's operation order."""
    max_int = 2 ** bits - 1
    high, low = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scales = (high - low).clamp(min=1e-5) / max_int
    zeros = (-torch.round(low / scales)).clamp(0, max_int)
    return torch.clamp(torch.round(w / scales) + zeros, 0, max_int), scales, zeros


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-point round-to-nearest per group of input channels, in `weight`'s dtype.

    Returns (codes uint8 [out, in] in 0..2^b-1, scales [out, groups], zeros [out, groups]), the
    last two in the weight's dtype: the fake-quantized weight is (codes - zeros) * scales.
    """
    codes, scales, zeros = _zero_point_grid(_grouped(weight, group_size), bits)
    rows = weight.shape[0]
    return codes.reshape(weight.shape).to(torch.uint8), scales.reshape(rows, -1), zeros.reshape(rows, -1)


def pseudo_quantize(weight: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Round-to-nearest per group of `group_size` input channels (<= 0: whole rows), computed
    in `weight`'s dtype exactly as llm-awq's pseudo_quantize_tensor."""
    w = _grouped(weight, group_size)
    if zero_point:
        codes, scales, zeros = _zero_point_grid(w, bits)
        return ((codes - zeros) * scales).reshape(weight.shape)
    max_int, min_int = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
    return (torch.clamp(torch.round(w / scale), min_int, max_int) * scale).reshape(weight.shape)


def apply_scales(tensors: dict[str, torch.Tensor], transforms: LayerTransforms) -> None:
    """Fold each (prev_op, layers, scales) entry into the layer's tensors, in place and in their own
    dtype, in entry order: the fork's `apply_scale`. On float16 tensors each `div_`/`mul_` computes in
    float32 and rounds to float16, so `up_proj`, multiplied by its norm's scales and later divided by
    its own, is rounded twice, as in the fork (one float32 fold rounded once differs in ~25 % of its
    weights by an ulp)."""
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
    """Clamp each group of input channels to [-max_val, max_val] (max_val [out, n_groups, 1]),
    in the promoted dtype of the two, as the fork's clamp does."""
    grouped = weight.reshape(max_val.shape[0], max_val.shape[1], -1)
    limit = max_val.to(weight.device)
    return torch.clamp(grouped, -limit, limit).reshape(weight.shape)


def load_results(path: Path) -> dict:
    """llm-awq's --dump_awq file, loaded without executing arbitrary pickles."""
    results = load_user_file(path, "--awq_results")
    if not isinstance(results, dict) or not {"scale", "clip"} <= set(results):
        raise InputError(f"--awq_results {path}: expected a dict with 'scale' and 'clip' lists")
    return results


def load_bit_widths(path: Path, layers: int) -> list[int]:
    """The fork's per-layer bits file ({layer_index: bits}, torch.save'd), checked for every layer."""
    data = load_user_file(path, "--bit_pt")
    if not isinstance(data, dict):
        raise InputError(f"--bit_pt {path}: expected a dict {{layer_index: bits}}")
    extra = sorted(str(key) for key in data if str(key) not in {str(index) for index in range(layers)})
    if extra:
        raise InputError(f"--bit_pt {path}: bit widths for layer(s) {', '.join(extra[:5])}, which the model "
                         f"lacks (it has {layers} layers, 0 to {layers - 1}): is it another model's file?")
    widths = []
    for index in range(layers):
        value = data.get(index, data.get(str(index)))
        if value is None:
            raise InputError(f"--bit_pt {path}: no bit width for layer {index} (the model has {layers} layers)")
        try:
            bits = int(value)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"--bit_pt {path}: layer {index}: {value!r} is not a bit width") from None
        if bits != value or not 1 <= bits <= 8:
            raise InputError(f"--bit_pt {path}: layer {index}: {value} bits; expected a whole number from 1 to 8")
        widths.append(bits)
    return widths


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
        max_val = torch.as_tensor(max_val)
        if not max_val.dtype.is_floating_point:
            raise InputError(f"--awq_results {path}: clip max_val for {name} is not floating point")
        if (max_val.ndim != 3 or max_val.shape[0] != out_features or max_val.shape[2] != 1
                or in_features % max_val.shape[1]):
            raise InputError(f"--awq_results {path}: clip max_val of shape {list(max_val.shape)} does not "
                             f"fit {name} of shape {[out_features, in_features]}")
        if not torch.isfinite(max_val).all():
            raise InputError(f"--awq_results {path}: clip max_val for {name} holds NaN or Inf")
        per_layer[index].clips[local] = max_val
    return per_layer


@dataclass(frozen=True)
class Quantizer:
    """How one layer's Linears are quantized."""
    bits: int
    group_size: int
    zero_point: bool = True


def layer_outputs(tensors: dict[str, torch.Tensor], transforms: LayerTransforms, linears: list[str],
                  quantizer: Quantizer, wanted: set[str], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """One layer of each output asked for ('scaled', 'fakequant', 'real': LUT-GEMM tensors), from
    the layer's float16 weights (name in the layer -> tensor; scaled in place) and its AWQ entries."""
    from common.quant.lutgemm import pack
    from common.io.model_files import all_finite
    apply_scales(tensors, transforms)
    scaled = {name: t.half() for name, t in tensors.items()}
    if transforms.scales:
        finite = torch.stack([all_finite(tensor) for tensor in scaled.values()]).cpu()  # one sync
        if not bool(finite.all()):
            name = list(scaled)[int((~finite).nonzero()[0])]
            raise InputError(f"{where} {name}: scaling by the AWQ results leaves values beyond the float16 "
                             "range (±65504)")
    results: dict[str, dict[str, torch.Tensor]] = {"scaled": scaled}
    if "fakequant" in wanted:
        results["fakequant"] = dict(scaled)
    if "real" in wanted:
        results["real"] = {name: t for name, t in scaled.items() if name.removesuffix(".weight") not in linears}
    for module in linears if wanted & {"fakequant", "real"} else []:
        weight = scaled[f"{module}.weight"]
        if module in transforms.clips:
            weight = clip_weight(weight, transforms.clips[module])
        if not quantizer.zero_point:
            results["fakequant"][f"{module}.weight"] = pseudo_quantize(weight, quantizer.bits, quantizer.group_size,
                                                                       zero_point=False).half()
            continue
        # one quantization serves both: the fake-quantized weight is (codes - zeros) * scales, in the
        # weight's dtype, exactly what pseudo_quantize computes
        codes, scales, zeros = quantize_groups(weight, quantizer.bits, quantizer.group_size)
        if "fakequant" in wanted:
            size = quantizer.group_size if quantizer.group_size > 0 else weight.shape[1]
            grouped = codes.reshape(-1, size).to(weight.dtype)
            fake = (grouped - zeros.reshape(-1, 1)) * scales.reshape(-1, 1)
            results["fakequant"][f"{module}.weight"] = fake.reshape(weight.shape).half()
        if "real" in wanted:
            packed = pack(codes, scales, zeros, quantizer.bits)
            results["real"].update({f"{module}.{key}": tensor for key, tensor in packed.items()})
    return {key: results[key] for key in wanted}


def check_quantizable(checkpoint: Checkpoint, layout: LayerLayout, group_size: int, lutgemm: bool) -> None:
    """Every Linear must split into whole groups (and, for the LUT-GEMM checkpoint, whole int32 words)."""
    from common.quant.lutgemm import check_shape
    for layer in layout.layers:
        for name in layer.linears.values():
            shape = checkpoint.tensors[name].shape
            if group_size > 0 and shape[1] % group_size:
                raise InputError(f"{checkpoint.dir}: tensor {name} has {shape[1]} input channels, not divisible "
                                 f"by --q_group_size {group_size}")
            if lutgemm:
                try:
                    check_shape(name, shape, group_size)
                except InputError as error:
                    raise InputError(f"{checkpoint.dir}: {error}") from None
