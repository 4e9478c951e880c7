"""Build cheatsheet.pt (and its side outputs) from an original and a fake-quantized model.

Pipeline, per Linear: reader threads pull the two fp16/bf16 weights from disk into pinned
buffers while the device quantizes the previous residual; each finished layer is written to
a small part file in a background thread; at the end the parts are streamed into the final
`torch.save` files one tensor at a time. Host memory stays at a few tensors whatever the
model size, and parts whose fingerprint matches are reused after an interruption.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from common.errors import InputError
from common.layers import DecoderLayer, LayerLayout, check_same_layers, find_layers
from common.io.model_files import Checkpoint, all_finite, float16_check
from common.io.host_copy import to_host
from common.io.outputs import atomic_file
from common.io.parts import PartStore, file_identities
from common.quant.residual import pack_nibbles, quantize_residual, reorder_scales
from common.io.prefetch import prefetched
from common.io.torchsave import StreamedWriter, TensorMeta, layout_bytes

OUTPUT_FILES = {
    "cheatsheet": "cheatsheet.pt",
    "residual_2bit": "quantized_residuals_2bit.pt",
    "residual_8bit": "quantized_residuals_8bit.pt",
    "exact": "exact_residuals.pt",
}
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PARTS_DIR = ".cheatsheet-parts"
PART_FORMAT_VERSION = 1
READ_AHEAD = 4  # Linears read ahead of the one being quantized


@dataclass(frozen=True)
class CheatsheetOptions:
    grid_size: int = 32
    extra_bit_widths: bool = False
    exact_residuals: bool = False
    add_fused: bool = True  # qkv_proj / gate_up_proj entries: what DecDEC's end-to-end loaders read

    def outputs(self) -> list[str]:
        kinds = ["cheatsheet"]
        if self.extra_bit_widths:
            kinds += ["residual_2bit", "residual_8bit"]
        if self.exact_residuals:
            kinds.append("exact")
        return kinds


def fused_groups(modules: list[str]) -> dict[str, list[str]]:
    """Fused entries to add for --add_fused: e.g. self_attn.qkv_proj -> [q, k, v] members."""
    names = set(modules)
    groups = {}
    for fused, members in FUSED_MODULES.items():
        for module in modules:
            parent, _, leaf = module.rpartition(".")
            if leaf != members[0]:
                continue
            prefix = f"{parent}." if parent else ""
            full = [prefix + m for m in members]
            if all(m in names for m in full) and prefix + fused not in names:
                groups[prefix + fused] = full
    return groups


def check_packable(checkpoint: Checkpoint, layout: LayerLayout) -> None:
    """Input error unless every Linear is floating point with a multiple of 8 output rows."""
    for layer in layout.layers:
        for name in layer.linears.values():
            info = checkpoint.tensors[name]
            if not info.dtype.is_floating_point:
                raise InputError(f"{checkpoint.dir}: tensor {name} has dtype {info.dtype}, expected floating point")
            if info.shape[0] % 8:
                raise InputError(f"{checkpoint.dir}: tensor {name} has {info.shape[0]} output rows, "
                                 "not a multiple of 8 (the cheatsheet packs 8 rows per int32)")


class PairedModels:
    """The original and fake-quantized checkpoints, validated against each other up front."""

    def __init__(self, original: Checkpoint, quantized: Checkpoint):
        self.original, self.quantized = original, quantized
        self.layout: LayerLayout = find_layers(original)
        self.quantized_layout: LayerLayout = find_layers(quantized)
        check_same_layers(original, self.layout, quantized, self.quantized_layout)
        check_packable(original, self.layout)

    def shape(self, layer: int, module: str) -> tuple[int, int]:
        return self.original.tensors[self.layout.layers[layer].linears[module]].shape  # type: ignore[return-value]

    def fingerprint(self, options: CheatsheetOptions) -> dict:
        return {"version": PART_FORMAT_VERSION, "original": file_identities(self.original.files()),
                "quantized": file_identities(self.quantized.files()), "options": asdict(options)}


def output_layout(models: PairedModels, options: CheatsheetOptions, kind: str) -> list[dict]:
    """The structure of one output file, with TensorMeta leaves (known before any compute)."""
    return cheatsheet_layout(models.layout.layers, models.shape, options, kind)


def cheatsheet_layout(layers: list[DecoderLayer], shape: Callable[[int, str], tuple[int, int]],
                      options: CheatsheetOptions, kind: str = "cheatsheet") -> list[dict]:
    """`output_layout` for any model: `shape(layer index, module)` gives a Linear's [out, in]."""
    layout = []
    for layer in layers:
        entry: dict = {}
        for module in sorted(layer.linears):
            out_features, in_features = shape(layer.index, module)
            if kind == "cheatsheet":
                entry[module] = {"reordered_scales": TensorMeta((out_features,), torch.float16),
                                 "cheatsheet": TensorMeta((in_features, out_features // 8), torch.int32)}
            else:
                entry[module] = TensorMeta((out_features, in_features), torch.float16)
        if kind == "cheatsheet" and options.add_fused:
            for fused, members in fused_groups(sorted(layer.linears)).items():
                out_features = sum(shape(layer.index, m)[0] for m in members)
                in_features = shape(layer.index, members[0])[1]
                entry[fused] = {"reordered_scales": TensorMeta((out_features,), torch.float16),
                                "cheatsheet": TensorMeta((in_features, out_features // 8), torch.int32)}
        layout.append(dict(sorted(entry.items())))  # item_for_output walks modules sorted too
    return layout


@torch.no_grad()
def residual_outputs(original: torch.Tensor, quantized: torch.Tensor,
                     options: CheatsheetOptions) -> dict[str, torch.Tensor]:
    """Everything one Linear contributes, keyed '<kind>/<field>', on the weights' device."""
    residual = original.half() - quantized.half()
    codes, scales = quantize_residual(residual, bits=4, grid_size=options.grid_size)
    results = {"cheatsheet/cheatsheet": pack_nibbles(codes), "cheatsheet/scales": scales,
               "finite": all_finite(residual)}
    if options.extra_bit_widths:
        for bits in (2, 8):
            codes, scales = quantize_residual(residual, bits=bits, grid_size=options.grid_size)
            results[f"residual_{bits}bit/"] = (codes.float() * scales.float()[:, None]).half()
    if options.exact_residuals:
        results["exact/"] = residual
    return results


def add_fused_entries(layer_results: dict[str, dict[str, torch.Tensor]], modules: list[str]) -> None:
    """Fused q/k/v and gate/up cheatsheets: rows concatenated, scales reordered over the fused size."""
    for fused, members in fused_groups(modules).items():
        layer_results[fused] = {
            "cheatsheet/cheatsheet": torch.cat([layer_results[m]["cheatsheet/cheatsheet"] for m in members], dim=1),
            "cheatsheet/scales": torch.cat([layer_results[m]["cheatsheet/scales"] for m in members]),
        }


def item_for_output(results: dict[str, dict[str, torch.Tensor]], kind: str) -> dict:
    """One layer's entry of output `kind`, in the SPEC §3 layout."""
    item: dict = {}
    for module in sorted(results):
        fields = results[module]
        if kind == "cheatsheet":
            item[module] = {"reordered_scales": reorder_scales(fields["cheatsheet/scales"]),
                            "cheatsheet": fields["cheatsheet/cheatsheet"]}
        elif f"{kind}/" in fields:
            item[module] = fields[f"{kind}/"]
    return item


def build_cheatsheet(models: PairedModels, save_path: Path, options: CheatsheetOptions,
                     device: torch.device, progress: Callable) -> dict[str, Path]:
    """Compute every layer (reusing matching parts) and stream the outputs as layers finish.

    Each finished layer goes to its part file (for resuming) and, at the same time, into the
    final files, which background threads write (and rename) in layer order.
    """
    parts = PartStore(save_path / PARTS_DIR, models.fingerprint(options))
    targets = {kind: save_path / OUTPUT_FILES[kind] for kind in options.outputs()}
    try:
        with ExitStack() as stack:
            writers = {kind: stack.enter_context(StreamedWriter(
                stack.enter_context(atomic_file(target, parts.resume_hint())), output_layout(models, options, kind)))
                for kind, target in targets.items()}
            any_residual = False
            for _, results in _layer_results(models, parts, options, device, progress):
                any_residual = any_residual or any(bool(fields["cheatsheet/scales"].any())
                                                   for fields in results.values())
                for kind, writer in writers.items():
                    writer.put(item_for_output(results, kind))
            if not any_residual:
                raise InputError(f"{models.quantized.dir}: the quantized model equals the original "
                                 f"{models.original.dir}: every residual is zero, so the cheatsheet would be empty")
    except InputError:
        parts.remove()  # bad input: a rerun with the same input cannot use these parts
        raise
    parts.remove()
    return targets


def output_bytes(models: PairedModels, options: CheatsheetOptions) -> int:
    """What the final files of `options` take on disk (the resume parts take about as much again)."""
    return sum(layout_bytes(output_layout(models, options, kind)) for kind in options.outputs())


def likely_swapped(models: PairedModels, rows: int = 16) -> bool:
    """True when the 'original' looks quantized and the 'quantized' does not: the first Linear's
    rows hold far fewer distinct values in the original (a quantizer keeps at most 2^b per group)."""
    layer = models.layout.layers[0]
    module = sorted(layer.linears)[0]
    original = models.original.read_raw(layer.linears[module])[:rows].half()
    quantized = models.quantized.read_raw(models.quantized_layout.layers[0].linears[module])[:rows].half()

    def distinct(weights: torch.Tensor) -> float:
        return sum(len(torch.unique(row)) for row in weights) / max(1, weights.shape[0])
    return 2 * distinct(original) <= distinct(quantized)


def _layer_results(models: PairedModels, parts: PartStore, options: CheatsheetOptions, device: torch.device,
                   progress: Callable) -> Iterator[tuple[int, dict[str, dict[str, torch.Tensor]]]]:
    """Every layer's results in order: from its part when one exists, else computed."""
    todo = [layer for layer in models.layout.layers if not parts.done(layer.index)]
    pending = {layer.index for layer in todo}
    computed = _compute_layers(models, parts, options, device, progress(todo, desc="cheatsheet layers"))
    for layer in models.layout.layers:
        if layer.index in pending:
            index, results = next(computed)
            assert index == layer.index
            yield index, results
        else:
            yield layer.index, parts.read(layer.index)
    next(computed, None)  # run the computation to its end: it waits for the last part file to be written


def _compute_layers(models: PairedModels, parts: PartStore, options: CheatsheetOptions, device: torch.device,
                    layers: Iterable[DecoderLayer]) -> Iterator[tuple[int, dict[str, dict[str, torch.Tensor]]]]:
    """Quantize the residuals of `layers` on the device while reader threads fetch the next
    weights; yield each finished layer (on the CPU) and write it to its part file."""
    pin = device.type == "cuda"

    def jobs() -> Iterator[tuple[DecoderLayer, str]]:
        for layer in layers:
            for module in sorted(layer.linears):
                yield layer, module

    def read(job: tuple[DecoderLayer, str]) -> tuple[torch.Tensor, torch.Tensor]:
        layer, module = job
        return (models.original.read_raw(layer.linears[module], pin),
                models.quantized.read_raw(models.quantized_layout.layers[layer.index].linears[module], pin))

    layer_results = LayerResults(None)
    for (layer, module), (raw_o, raw_q) in prefetched(jobs(), read, depth=READ_AHEAD):
        if layer is not layer_results.layer:
            if layer_results.layer is not None:
                parts.write_beside(layer_results.layer.index, layer_results.finish(options))
                yield layer_results.layer.index, layer_results.modules
            layer_results = LayerResults(layer)
        name_q = models.quantized_layout.layers[layer.index].linears[module]
        layer_results.add_linear(module, raw_o.to(device, non_blocking=True), raw_q.to(device, non_blocking=True),
                                 options, f"{models.original.dir}: tensor {layer.linears[module]}",
                                 f"{models.quantized.dir}: tensor {name_q}")
    if layer_results.layer is not None:
        parts.write_beside(layer_results.layer.index, layer_results.finish(options))
        yield layer_results.layer.index, layer_results.modules
    parts.wait()


class LayerResults:
    """One layer's outputs while it is computed, with its pending finiteness checks (device flags)."""

    def __init__(self, layer: DecoderLayer | None):
        self.layer = layer
        self.modules: dict[str, dict[str, torch.Tensor]] = {}
        self._flags: list[torch.Tensor] = []
        self._problems: list[str | Callable[[], str]] = []

    def add_linear(self, module: str, original: torch.Tensor, quantized: torch.Tensor, options: CheatsheetOptions,
                   where_original: str, where_quantized: str) -> None:
        """Quantize one Linear's residual (weights on the device, any float dtype, used as float16);
        the checks that the weights fit float16 are deferred to `finish`."""
        weight_o, weight_q = original.half(), quantized.half()
        outputs = residual_outputs(weight_o, weight_q, options)
        self.check(*float16_check(original, weight_o, where_original))
        self.check(*float16_check(quantized, weight_q, where_quantized))
        self.check(outputs.pop("finite"), f"{where_quantized} differs from the original by more than float16 can hold")
        self.modules[module] = outputs

    def finish(self, options: CheatsheetOptions) -> dict[str, dict[str, torch.Tensor]]:
        """Check the layer (one device sync), bring it to the CPU and add the fused entries."""
        self.raise_problems()
        self.modules = {m: to_host(fields) for m, fields in self.modules.items()}
        if options.add_fused:
            add_fused_entries(self.modules, sorted(self.layer.linears))
        return self.modules

    def check(self, flag: torch.Tensor, problem: str | Callable[[], str]) -> None:
        """Record a device flag; `problem` (a message, or a function making it) if it is false."""
        self._flags.append(flag)
        self._problems.append(problem)

    def raise_problems(self) -> None:
        """One device sync per layer: raise the first failed check as an input error."""
        flags = torch.stack(self._flags).cpu()
        if not bool(flags.all()):
            problem = self._problems[int((~flags).nonzero()[0])]
            raise InputError(problem if isinstance(problem, str) else problem())
