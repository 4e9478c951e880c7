"""decdec_setup.py's single pass (SPEC §8): every artifact from one read of the original model.

Per decoder layer, with the layer's original weights on the device once, the stages the separate
scripts run, each the same function they call:
  quantize     AWQ search (common.quant.awq_search) or results, RTN, or the SqueezeLLM LUTs (common.quant.sqllm)
  outputs      scaled / fake-quantized / LUT-GEMM tensors (common.quant.awq.layer_outputs)
  cheatsheet   the residual of (scaled) original vs fake-quantized (common.quant.cheatsheet_build)
  thresholds   the (scaled) original's layer over the calibration samples (common.calib.activation_stats)
The converter (common.io.convert) reads the layers ahead and writes the model outputs behind; the
output folder's writer streams cheatsheet.pt as layers finish and writes thresholds.pt at the end.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.calib.activation_stats import LayerwiseThresholds, clamp_to_fp16
from common.quant.awq import LayerTransforms, Quantizer, layer_outputs
from common.quant.awq_search import LayerwiseSearch, StageTimes
from common.quant.cheatsheet_build import OUTPUT_FILES, CheatsheetOptions, LayerResults, cheatsheet_layout, item_for_output
from common.errors import InputError
from common.layers import LayerLayout
from common.quant.lutgemm import CheckpointWriter
from common.io.model_files import Checkpoint, round_to_float16
from common.quant.sqllm import QuantizedFolder
from common.io.torchsave import StreamedWriter, layout_bytes, save_atomically

THRESHOLDS_FILE = "thresholds.pt"


@dataclass
class OnePass:
    """Everything one run needs, set up before the layer loop."""
    checkpoint: Checkpoint
    layout: LayerLayout
    method: str  # "rtn" | "awq" | "sqllm"
    thresholds: LayerwiseThresholds
    cheatsheet: CheatsheetOptions
    device: torch.device
    quantizers: list[Quantizer] = field(default_factory=list)  # rtn / awq
    transforms: list[LayerTransforms] = field(default_factory=list)  # awq: results, or filled by the search
    search: LayerwiseSearch | None = None
    sqllm: QuantizedFolder | None = None
    wanted: set[str] = field(default_factory=set)  # model directories asked for: "scaled", "fakequant"
    clamp: bool = True
    times: StageTimes | None = None
    folder: "SetupFolderWriter | None" = None
    any_residual: bool = False

    def transform(self, index: int, tensors: dict[str, torch.Tensor], tables) -> dict[str, dict[str, torch.Tensor]]:
        """convert_model's callback: every stage of layer `index`; returns the model outputs' tensors."""
        times = self.times if self.times is not None else StageTimes(self.device)
        where = f"{self.checkpoint.dir}: layer {index}"
        raw = dict(tensors)  # float32 copies of the checkpoint's values
        round_to_float16(tensors, where)
        linears = sorted(self.layout.layers[index].linears)
        times.lap("read and check")
        if self.method == "sqllm":
            shapes = {m: tuple(self.checkpoint.tensors[n].shape) for m, n in self.layout.layers[index].linears.items()}
            fake = {**tensors, **self.sqllm.fake_quantized_layer(index, tables, shapes, self.device,
                                                                 self.checkpoint.dir)}
            results = {"scaled": raw, "fakequant": fake}
        else:
            if self.search is not None:
                self.transforms[index] = self.search.layer(index, tensors, self.quantizers[index].bits,
                                                           self.quantizers[index].group_size,
                                                           self.quantizers[index].zero_point)
                times.lap("AWQ search")
            lutgemm = {"real"} if self.quantizers[index].zero_point else set()  # LUT-GEMM needs the zero point
            results = layer_outputs(tensors, self.transforms[index], linears, self.quantizers[index],
                                    {"scaled", "fakequant"} | lutgemm, where)
        times.lap("quantize")
        original = results["scaled"]  # AWQ: DecDEC's original model is the scaled one
        sheet = LayerResults(self.layout.layers[index])
        for module in linears:
            sheet.add_linear(module, original[f"{module}.weight"], results["fakequant"][f"{module}.weight"],
                             self.cheatsheet, f"{where} {module} (original)", f"{where} {module} (quantized)")
        modules = sheet.finish(self.cheatsheet)
        self.any_residual = self.any_residual or any(bool(f["cheatsheet/scales"].any()) for f in modules.values())
        times.lap("cheatsheet")
        # thresholds of what thresholds.py would read: the scaled model (AWQ) or the original as stored
        self.thresholds.layer(index, original if self.method == "awq" else raw)
        times.lap("thresholds")
        self.folder.put_layer(item_for_output(modules, "cheatsheet"))
        outputs = {key: results[key] for key in self.wanted}
        if "real" in results:
            outputs["folder"] = results["real"]
        return outputs

    def finish(self) -> list[str]:
        """After the last layer: the all-zero check and thresholds.pt's content; returns warnings."""
        if not self.any_residual:
            raise InputError(f"{self.checkpoint.dir}: every residual is zero: the quantized model equals the "
                             "original, so the cheatsheet would be empty")
        return clamp_to_fp16(self.thresholds.entries) if self.clamp else []


class SetupFolderWriter:
    """The folder DecDEC's runtime loads: the LUT-GEMM checkpoint (rtn/awq), cheatsheet.pt streamed layer
    by layer, thresholds.pt at the end. convert_model's writer interface plus `put_layer`."""

    def __init__(self, folder: Path, run: OnePass, lutgemm: CheckpointWriter | None):
        self.folder, self.run, self.lutgemm = folder, run, lutgemm
        layout = cheatsheet_layout(run.layout.layers, self._shape, run.cheatsheet)
        self.cheatsheet = StreamedWriter(folder / OUTPUT_FILES["cheatsheet"], layout)
        self.expected = lutgemm.expected if lutgemm else {}
        in_features = sum(self._shape(layer.index, m)[1] for layer in run.layout.layers for m in layer.linears)
        self.total_size = (lutgemm.total_size if lutgemm else 0) + layout_bytes(layout) + 4 * in_features
        run.folder = self

    def _shape(self, index: int, module: str) -> tuple[int, int]:
        return tuple(self.run.checkpoint.tensors[self.run.layout.layers[index].linears[module]].shape)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.lutgemm.write(name, tensor)

    def put_layer(self, cheatsheet_item: dict) -> None:
        self.cheatsheet.put(cheatsheet_item)

    def finish(self) -> None:
        for line in self.run.finish():
            print(line, file=sys.stderr)
        if self.lutgemm:
            self.lutgemm.finish()
        self.cheatsheet.finish()
        save_atomically(self.run.thresholds.entries, self.folder / THRESHOLDS_FILE)

    def close(self) -> None:
        if self.lutgemm:
            self.lutgemm.close()
        if self.cheatsheet.thread.is_alive():
            self.cheatsheet.abort()
