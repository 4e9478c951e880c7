"""SPEC §4 statistics: per Linear, the element-wise max over tokens of the descending-sorted |input|.

Linears that receive the very same input tensor (q/k/v, gate/up) share one sort. Tokens are
sorted in chunks so the sort's workspace stays bounded whatever the batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from common.errors import InputError

if TYPE_CHECKING:
    from common.calib.layerwise import LayerInputs, LayerwiseModel

FP16_MAX = 65504.0


SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def sorted_abs_max(x: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """max over tokens of sort(|x_t|, descending), in x's dtype (max is exact in any dtype).

    |x| has its sign bit clear, so its bits read as a signed integer of the same width order
    exactly as the floats do: sorting and maximising those integers gives the same values,
    and integer sorts are faster. Rows are sorted ascending and the maxima flipped once:
    the k-th largest of a row is its (n-1-k)-th smallest."""
    flat = x.reshape(-1, x.shape[-1])
    as_int = SAME_WIDTH_INT[x.element_size()]
    rows = max(1, chunk_elements // max(1, flat.shape[1]))
    result = None
    for begin in range(0, flat.shape[0], rows):
        part = ascending_rows_max(flat[begin: begin + rows].abs().view(as_int))
        result = part if result is None else torch.maximum(result, part)
    return result.flip(-1).view(x.dtype)


def ascending_rows_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise max over the rows of `values` [rows, n], each sorted ascending."""
    if values.device.type == "cpu" and values.element_size() <= 2:
        # NumPy's stable sort of 16-bit integers is a radix sort: ~6x torch's sort on a CPU
        return torch.from_numpy(np.sort(values.numpy(), axis=-1, kind="stable").max(axis=0))
    return values.sort(dim=-1).values.amax(dim=0)


class SortedInputMaxima:
    """Hooks every nn.Linear of a layer and accumulates its sorted-|input| maxima."""

    def __init__(self, layer: nn.Module, chunk_elements: int):
        self.chunk_elements = chunk_elements
        self.maxima: dict[str, torch.Tensor] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [module.register_forward_pre_hook(self._hook(name))
                         for name, module in layer.named_modules() if isinstance(module, nn.Linear)]

    def _hook(self, name: str):
        def observe(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                stats = self._last[1]  # same input as the previous Linear: reuse its sort
            else:
                stats = sorted_abs_max(x, self.chunk_elements)
                self._last = (x, stats)
            previous = self.maxima.get(name)
            self.maxima[name] = stats if previous is None else torch.maximum(previous, stats)
        return observe

    def end_batch(self) -> None:
        self._last = None

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self._handles:
            handle.remove()
        self._last = None
        return {name: values.float().cpu() for name, values in self.maxima.items()}


def chunk_elements_for(device: torch.device) -> int:
    """Elements sorted at once: bounds the sort's workspace (larger on a GPU)."""
    return (32 << 20) if device.type == "cuda" else (4 << 20)


@torch.no_grad()
def layer_thresholds(model: "LayerwiseModel", index: int, layer: nn.Module, inputs: list["LayerInputs"],
                     expected: set[str]) -> tuple[dict[str, torch.Tensor], list["LayerInputs"]]:
    """One layer's thresholds.pt entry (module -> float32 [in], sorted by name) and the next
    layer's inputs, from running `layer` over every batch of `inputs`."""
    stats = SortedInputMaxima(layer, chunk_elements_for(model.device))
    outputs: list = []
    for item in inputs:
        outputs += model.run_layer(index, layer, [item])
        stats.end_batch()
    maxima = stats.close()
    if set(maxima) != expected:
        missing = sorted(expected - set(maxima)) or sorted(set(maxima) - expected)
        raise InputError(f"{model.checkpoint.dir}: layer {index} module {missing[0]} is not an nn.Linear "
                         "that ran during the forward pass; this architecture is not supported")
    return dict(sorted(maxima.items())), outputs


class LayerwiseThresholds:
    """thresholds.py's layer loop, one layer at a time: layers read from the checkpoint
    (`next_layer`, thresholds.py) or given their weights (`layer`, the one pass's stage)."""

    def __init__(self, model: "LayerwiseModel", samples: torch.Tensor, batch_size: int):
        self.model = model
        self.inputs = model.capture_inputs(list(samples.split(batch_size)))
        model.release_outside_layers()
        self.entries: list[dict[str, torch.Tensor]] = []

    def layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Run layer `index` with these weights (parameter name in the layer -> tensor)."""
        self._run(index, self.model.load_layer_from(index, tensors))

    def next_layer(self) -> None:
        """Run the next layer, read from the checkpoint while the one after it is read ahead."""
        index = len(self.entries)
        layer = self.model.load_layer(index)
        self.model.prefetch(index + 1)
        self._run(index, layer)

    def _run(self, index: int, layer: nn.Module) -> None:
        try:
            maxima, self.inputs = layer_thresholds(self.model, index, layer, self.inputs,
                                                   set(self.model.layout.layers[index].linears))
        finally:
            self.model.unload_layer(index)
        self.entries.append(maxima)

    def close(self) -> None:
        self.model.close()


def clamp_to_fp16(thresholds: list[dict[str, torch.Tensor]]) -> list[str]:
    """Clamp values above 65504 in place; one warning line per affected module."""
    warnings = []
    for index, layer in enumerate(thresholds):
        for module, values in layer.items():
            over = values > FP16_MAX
            if over.any():
                warnings.append(f"warning: layer {index} {module}: {int(over.sum())} values above 65504 "
                                f"(max {float(values.max()):.4g}) clamped to 65504 so the runtime's fp16 cast "
                                "stays finite (--no_clamp keeps them)")
                values.clamp_(max=FP16_MAX)
    return warnings
