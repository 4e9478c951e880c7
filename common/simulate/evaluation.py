"""evaluate.py's two jobs: check the artifacts against the model, and measure DecDEC's effect.

The simulation runs the fake-quantized model layer by layer (like thresholds.py), every
configuration (fake-quantized, each k_chunk with DecDEC, and the original model) side by
side, so each layer's weights are read once; the residual of a Linear is decoded from the
cheatsheet only while its layer is on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.calib.activation_stats import FP16_MAX
from common.quant.cheatsheet_build import FUSED_MODULES
from common.simulate.decdec_sim import SimulatedLinear
from common.errors import InputError
from common.layers import LayerLayout
from common.calib.layerwise import LayerInputs, LayerwiseModel, output_logits
from common.io.model_files import Checkpoint
from common.io.prefetch import prefetched
from common.quant.residual import decode_cheatsheet


def load_artifact(path: Path) -> list:
    if not path.is_file():
        raise InputError(f"{path}: missing")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise InputError(f"{path}: unreadable ({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list with one entry per decoder layer")
    return data


def _is_fused(module: str, linears: dict) -> bool:
    parent, _, leaf = module.rpartition(".")
    prefix = f"{parent}." if parent else ""
    return leaf in FUSED_MODULES and all(prefix + m in linears for m in FUSED_MODULES[leaf])


def missing_fused_entries(layout: LayerLayout, cheatsheet: list) -> list[int]:
    """Layers whose separate q/k/v or gate/up Linears have no fused cheatsheet entry: DecDEC's end-to-end
    loaders look those up (a cheatsheet built with `--no_fused`, or by the reference without `--add_fused`)."""
    from common.quant.cheatsheet_build import fused_groups
    return [layer.index for layer, sheet in zip(layout.layers, cheatsheet) if isinstance(sheet, dict)
            and any(fused not in sheet for fused in fused_groups(sorted(layer.linears)))]


def check_artifacts(checkpoint: Checkpoint, layout: LayerLayout, cheatsheet: list, thresholds: list,
                    cheatsheet_name: str = "cheatsheet.pt", thresholds_name: str = "thresholds.pt") -> list[str]:
    """Every way the artifacts fail to match the model (SPEC §3/§4), one line each."""
    problems: list[str] = []
    layers = len(layout.layers)
    for name, data in ((cheatsheet_name, cheatsheet), (thresholds_name, thresholds)):
        if len(data) != layers:
            problems.append(f"{name}: {len(data)} layers, the model has {layers}")
    for layer in layout.layers[: len(cheatsheet)]:
        problems += _check_cheatsheet_layer(checkpoint, layer, cheatsheet[layer.index], cheatsheet_name)
    for layer in layout.layers[: len(thresholds)]:
        problems += _check_thresholds_layer(checkpoint, layer, thresholds[layer.index], thresholds_name)
    return problems


def _check_cheatsheet_layer(checkpoint: Checkpoint, layer, sheet, name: str) -> list[str]:
    where = f"{name}: layer {layer.index}"
    if not isinstance(sheet, dict):
        return [f"{where}: entry must be a dict module -> {{cheatsheet, reordered_scales}}"]
    problems = [f"{where} {module}: missing" for module in sorted(set(layer.linears) - set(sheet))]
    problems += [f"{where} {module}: not a Linear of the model" for module in sorted(set(sheet) - set(layer.linears))
                 if not _is_fused(module, layer.linears)]
    for module in sorted(set(layer.linears) & set(sheet)):
        out_features, in_features = checkpoint.tensors[layer.linears[module]].shape
        fields = sheet[module] if isinstance(sheet[module], dict) else {}
        packed, scales = fields.get("cheatsheet"), fields.get("reordered_scales")
        wrong = _wrong_tensor(packed, torch.int32, (in_features, out_features // 8))
        if wrong:
            problems.append(f"{where} {module}: 'cheatsheet' {wrong}")
        wrong = _wrong_tensor(scales, torch.float16, (out_features,))
        if wrong:
            problems.append(f"{where} {module}: 'reordered_scales' {wrong}")
        elif not torch.isfinite(scales).all() or (scales < 0).any():
            problems.append(f"{where} {module}: scales hold NaN, Inf or negative values")
    return problems


def _check_thresholds_layer(checkpoint: Checkpoint, layer, thr, name: str) -> list[str]:
    where = f"{name}: layer {layer.index}"
    if not isinstance(thr, dict):
        return [f"{where}: entry must be a dict module -> float32 vector"]
    problems = [f"{where} {module}: missing" for module in sorted(set(layer.linears) - set(thr))]
    for module in sorted(set(layer.linears) & set(thr)):
        in_features = checkpoint.tensors[layer.linears[module]].shape[1]
        values = thr[module]
        wrong = _wrong_tensor(values, torch.float32, (in_features,))
        if wrong:
            problems.append(f"{where} {module}: {wrong}")
        elif not torch.isfinite(values).all():
            problems.append(f"{where} {module}: holds NaN or Inf")
        elif (values[1:] > values[:-1]).any():
            problems.append(f"{where} {module}: not non-increasing")
        elif values.max() > FP16_MAX:
            problems.append(f"{where} {module}: values above 65504 become inf in the runtime's fp16 cast "
                            "(rebuild without --no_clamp)")
    return problems


def _wrong_tensor(value, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
    """None if `value` is a tensor of this dtype and shape, else 'should be ..., is ...'."""
    if isinstance(value, torch.Tensor) and value.dtype == dtype and tuple(value.shape) == shape:
        return None
    found = (f"{str(value.dtype).replace('torch.', '')} {list(value.shape)}" if isinstance(value, torch.Tensor)
             else type(value).__name__)
    return f"should be {str(dtype).replace('torch.', '')} {list(shape)}, is {found}"


@dataclass
class ResidualError:
    layer: int
    module: str
    relative: float


def residual_errors(original: Checkpoint, quantized: Checkpoint, layout: LayerLayout, quantized_layout: LayerLayout,
                    cheatsheet: list, device: torch.device, progress: Callable) -> list[ResidualError]:
    """Per Linear, ||R̂ - R|| / ||R|| with R = fp16(W_orig - W_fq) and R̂ decoded from the cheatsheet."""
    steps = [(layer.index, module) for layer in layout.layers for module in sorted(layer.linears)]
    pin = device.type == "cuda"

    def read(step):
        index, module = step
        return (original.read_raw(layout.layers[index].linears[module], pin),
                quantized.read_raw(quantized_layout.layers[index].linears[module], pin))

    errors = []
    for (index, module), (w_o, w_q) in progress(prefetched(steps, read, depth=4), desc="residual check",
                                                total=len(steps)):
        residual = (w_o.to(device).half() - w_q.to(device).half()).float()
        fields = cheatsheet[index][module]
        decoded = decode_cheatsheet(fields["cheatsheet"].to(device), fields["reordered_scales"].to(device))
        norm = residual.norm()
        relative = float((decoded - residual).norm() / norm) if norm > 0 else float((decoded != 0).any())
        errors.append(ResidualError(index, module, relative))
    return errors


def evaluation_windows(token_ids: torch.Tensor, seq_len: int, max_chunks: int | None) -> torch.Tensor:
    """[W, seq_len] non-overlapping windows of the tokenized text (the usual wikitext2 protocol)."""
    count = token_ids.shape[0] // seq_len
    if max_chunks:
        count = min(count, max_chunks)
    if count == 0:
        raise InputError(f"the dataset holds {token_ids.shape[0]} tokens, fewer than one window of "
                         f"--seq_len {seq_len}")
    return token_ids[: count * seq_len].reshape(count, seq_len)


@dataclass(frozen=True)
class Config:
    """One simulated setting: the original model, the fake-quantized one, or DecDEC at k_chunk."""
    name: str
    k_chunk: int = 0
    selection: str = "buckets"


def simulate(fq_model: LayerwiseModel, original_model: LayerwiseModel | None, windows: torch.Tensor,
             configs: list[Config], cheatsheet: list, thresholds: list, batch_size: int, seed: int,
             progress: Callable) -> dict[str, dict[str, float]]:
    """Perplexity (and KL to the original) of every config; {config name: {'ppl', 'kl'?}}."""
    batches = list(windows.split(batch_size))
    states: dict[str, list[LayerInputs]] = {}
    fq_inputs = fq_model.capture_inputs(batches)
    for config in configs:
        states[config.name] = [i.with_hidden(i.hidden.clone()) for i in fq_inputs]
    if original_model is not None:
        states["original"] = original_model.capture_inputs(batches)
    layout = fq_model.layout
    generator = torch.Generator(device=fq_model.device).manual_seed(seed)
    for index in progress(range(len(layout.layers)), desc="simulated layers"):
        if original_model is not None:
            layer = original_model.load_layer(index)
            original_model.prefetch(index + 1)
            states["original"] = original_model.run_layer(index, layer, states["original"])
            original_model.unload_layer(index)
        layer = fq_model.load_layer(index)
        fq_model.prefetch(index + 1)
        simulated = _wrap_linears(layer, layout.layers[index].linears, cheatsheet[index], thresholds[index],
                                  generator)
        for config in configs:
            for module in simulated.values():
                module.k_chunk, module.selection = config.k_chunk, config.selection
            states[config.name] = fq_model.run_layer(index, layer, states[config.name])
        _unwrap_linears(layer, simulated)
        fq_model.unload_layer(index)
    return _score(fq_model, original_model, batches, states, configs)


def _wrap_linears(layer: nn.Module, linears: dict[str, str], sheet: dict, thr: dict,
                  generator: torch.Generator) -> dict[str, SimulatedLinear]:
    wrapped = {}
    for module in linears:
        linear = layer.get_submodule(module)
        residual = decode_cheatsheet(sheet[module]["cheatsheet"].to(linear.weight.device),
                                     sheet[module]["reordered_scales"].to(linear.weight.device),
                                     dtype=linear.weight.dtype)
        wrapped[module] = SimulatedLinear(linear, residual, thr[module])
        wrapped[module].generator = generator
        parent, _, leaf = module.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, leaf, wrapped[module])
    return wrapped


def _unwrap_linears(layer: nn.Module, wrapped: dict[str, SimulatedLinear]) -> None:
    for module, simulated in wrapped.items():
        parent, _, leaf = module.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, leaf, simulated.linear)


@torch.no_grad()
def _score(fq_model: LayerwiseModel, original_model: LayerwiseModel | None, batches: list[torch.Tensor],
           states: dict[str, list[LayerInputs]], configs: list[Config]) -> dict[str, dict[str, float]]:
    heads = {"fq": output_logits(fq_model)}
    if original_model is not None:
        heads["original"] = output_logits(original_model)
    names = [c.name for c in configs] + (["original"] if original_model is not None else [])
    nll = {name: 0.0 for name in names}
    kl = {name: 0.0 for name in names}
    count = 0
    for b, ids in enumerate(batches):
        for row in range(ids.shape[0]):  # one window at a time bounds the [tokens, vocab] logits
            targets = ids[row, 1:].to(fq_model.device)
            reference = None
            if original_model is not None:
                reference = _log_probs(heads["original"], states["original"][b].hidden[row])
                nll["original"] += float(F.nll_loss(reference, targets, reduction="sum"))
            for config in configs:
                log_probs = _log_probs(heads["fq"], states[config.name][b].hidden[row])
                nll[config.name] += float(F.nll_loss(log_probs, targets, reduction="sum"))
                if reference is not None:
                    kl[config.name] += float(F.kl_div(log_probs, reference, log_target=True, reduction="sum"))
            count += targets.numel()
    results = {}
    for name in names:
        results[name] = {"ppl": math.exp(nll[name] / count)}
        if original_model is not None and name != "original":
            results[name]["kl"] = kl[name] / count
    return results


def _log_probs(head: Callable, hidden: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the vocabulary for every predicting position of one window."""
    return F.log_softmax(head(hidden[:-1]), dim=-1)
