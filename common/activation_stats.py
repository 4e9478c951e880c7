"""SPEC §4 statistics: per Linear, the element-wise max over tokens of the descending-sorted |input|.

Linears that receive the very same input tensor (q/k/v, gate/up) share one sort. Tokens are
sorted in chunks so the sort's workspace stays bounded whatever the batch.
"""
from __future__ import annotations

import torch
from torch import nn

FP16_MAX = 65504.0


def sorted_abs_max(x: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """max over tokens of sort(|x_t|, descending), in x's dtype (max is exact in any dtype)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = max(1, chunk_elements // max(1, flat.shape[1]))
    result = None
    for begin in range(0, flat.shape[0], rows):
        part = flat[begin: begin + rows].abs().sort(dim=-1, descending=True).values.amax(dim=0)
        result = part if result is None else torch.maximum(result, part)
    return result


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
