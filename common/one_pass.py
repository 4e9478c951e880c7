"""decdec_setup.py's single pass (SPEC §8): every artifact from one read of the original model.

Per decoder layer, with the layer's original weights on the device once, the stages the separate
scripts run, each the same function they call:
  quantize     AWQ search (common.quant.awq_search) or results, RTN, or the SqueezeLLM LUTs (common.quant.sqllm)
  outputs      scaled / fake-quantized / LUT-GEMM tensors (common.quant.awq.layer_outputs)
  cheatsheet   the residual of (scaled) original vs fake-quantized (common.quant.cheatsheet_build)
  thresholds   the (scaled) original's layer over the calibration samples (common.calib.activation_stats)
The converter (common.io.convert) reads the layers ahead and writes the model outputs behind; the
output folder's writer streams cheatsheet.pt as layers finish and writes thresholds.pt at the end.
RTN and SqueezeLLM thresholds depend on the original model only: on a GPU thresholds.py's own run
computes them in a child process (common.calib.thresholds_job) that decdec_setup.py starts before
anything else, since its imports (6-15 s on the H200 test machine) are the longest path; its Python work
never holds the loop's GIL, and it reads the layers again, from the page cache as a rule. AWQ's
thresholds are the scaled model's, so they run in the loop. With a search, its set-up (tokenizer,
blocks, the layer-by-layer model) comes first and the model is read after it, since the search, not
the disk, sets the pace; on a GPU the thresholds' set-up then runs beside the first search, which
needs only its own. Without one, the set-up is built in a thread beside the first layers (on a CPU
the first layer's thresholds then wait until its other stages are done).
Finished layers' costly results go to part files, so an interrupted run resumes (common.io.parts).
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from common.background import close_when_done, finished, run_beside, sharing_the_cpu
from common.calib.activation_stats import LayerwiseThresholds, clamp_to_fp16
from common.calib.thresholds_job import from_arrays
from common.child import ChildProcess
from common.quant.awq import LayerTransforms, Quantizer, layer_outputs
from common.quant.awq_search import LayerwiseSearch, StageTimes
from common.quant.cheatsheet_build import OUTPUT_FILES, CheatsheetOptions, LayerResults, cheatsheet_layout, item_for_output
from common.errors import InputError
from common.layers import LayerLayout
from common.quant.lutgemm import CheckpointWriter
from common.io.model_files import Checkpoint, round_to_float16
from common.io.parts import PartStore, file_identities
from common.quant.sqllm import QuantizedFolder
from common.io.torchsave import StreamedWriter, layout_bytes, save_atomically

THRESHOLDS_FILE = "thresholds.pt"


@dataclass
class Calibration:
    """What the in-loop calibration stages need: the thresholds' layer-by-layer model over the
    samples, and the AWQ search's (when searching). Building them is mostly importing transformers.
    The thresholds may still be building (beside the first search, which needs only its own)."""
    pending_thresholds: Future  # -> LayerwiseThresholds
    search: LayerwiseSearch | None = None
    seconds: float = 0.0  # to build them (the thresholds' part, if beside the first search, excluded)

    @property
    def thresholds(self) -> LayerwiseThresholds:
        return self.pending_thresholds.result()

    def close(self) -> None:
        close_when_done(self.pending_thresholds)
        if self.search is not None:
            self.search.close()


def start_calibration(build: Callable[[], Calibration], beside: bool) -> Future:
    """Build the calibration `beside` the first layers, or first. Beside, on a GPU, it overlaps the
    first reads and the outside tensors' copies (the first layer waits for it); on a CPU, the first
    layer's quantization and cheatsheet run meanwhile on one core (`sharing_the_cpu`) and its
    thresholds after them: on 2 cores the one pass took 11.0 s instead of 12.0 s."""
    started = time.time()

    def timed() -> Calibration:
        calibration = build()
        calibration.seconds = time.time() - started
        return calibration
    return run_beside(timed, "calibration-set-up") if beside else finished(timed())


AWQ_PART = "awq."  # part entries holding a layer's search results, beside its cheatsheet modules


def transforms_to_part(transforms: LayerTransforms) -> dict[str, dict[str, torch.Tensor]]:
    """A layer's search results as part entries: names and order go in the keys (safetensors holds
    tensors only, and sorts its keys)."""
    entries: dict[str, dict[str, torch.Tensor]] = {
        f"{AWQ_PART}scale.{i}": {f"{prev}|{','.join(names)}": scales.float()}
        for i, (prev, names, scales) in enumerate(transforms.scales)}
    if transforms.clips:
        entries[f"{AWQ_PART}clip"] = {f"{i}|{name}": limit.float()
                                      for i, (name, limit) in enumerate(transforms.clips.items())}
    return entries


def transforms_from_part(part: dict[str, dict[str, torch.Tensor]]) -> LayerTransforms:
    """The inverse of `transforms_to_part`, in the search's order."""
    transforms = LayerTransforms()
    scale_entries = sorted((int(key.rsplit(".", 1)[1]), fields) for key, fields in part.items()
                           if key.startswith(f"{AWQ_PART}scale."))
    for _, fields in scale_entries:
        (key, scales), = fields.items()
        prev, names = key.split("|")
        transforms.scales.append((prev, names.split(","), scales))
    clips = sorted((int(key.split("|")[0]), key.split("|")[1], limit)
                   for key, limit in part.get(f"{AWQ_PART}clip", {}).items())
    transforms.clips = {name: limit for _, name, limit in clips}
    return transforms


def parts_folder(output: Path) -> Path:
    """Where a run keeps its finished layers: beside the output folder, which appears only whole."""
    return output.parent / f".{output.name}.parts"


def run_fingerprint(checkpoint: Checkpoint, inputs: Iterable[Path], options: dict) -> dict:
    """What the parts of a run depend on: the model's and the other inputs' files, and the options."""
    files = [file for path in inputs
             for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()))]
    return {"version": 1, "model": file_identities(checkpoint.files()), "inputs": file_identities(files),
            "options": options}


@dataclass
class OnePass:
    """Everything one run needs across the layer loop."""
    checkpoint: Checkpoint
    layout: LayerLayout
    method: str  # "rtn" | "awq" | "sqllm"
    calibration: Future | None  # -> Calibration; None when the thresholds run in a child process
    cheatsheet: CheatsheetOptions
    device: torch.device
    quantizers: list[Quantizer] = field(default_factory=list)  # rtn / awq
    transforms: list[LayerTransforms] = field(default_factory=list)  # awq: results, or filled by the search
    sqllm: QuantizedFolder | None = None
    wanted: set[str] = field(default_factory=set)  # model directories asked for: "scaled", "fakequant"
    clamp: bool = True
    times: StageTimes | None = None
    folder: "SetupFolderWriter | None" = None
    any_residual: bool = False
    parts: PartStore | None = None  # finished layers (search results, cheatsheets), for resuming
    thresholds_child: ChildProcess | None = None  # rtn / sqllm: thresholds.py's run beside the loop
    thresholds: list[dict[str, torch.Tensor]] | None = None  # thresholds.pt's content, after the last layer

    @property
    def cheatsheet_parts(self) -> bool:
        """Keep each layer's cheatsheet in its part only where it is costly to compute: on a CPU (0.9 s
        per TinyLlama layer on 2 cores). On an H200 an 8B layer's takes 0.2 s to compute and ~0.4 s to
        write (13 s over 32 layers), so a resumed run there computes it again."""
        return self.device.type == "cpu"

    def transform(self, index: int, tensors: dict[str, torch.Tensor], tables) -> dict[str, dict[str, torch.Tensor]]:
        """convert_model's callback: every stage of layer `index`; returns the model outputs' tensors."""
        times = self.times if self.times is not None else StageTimes(self.device)
        where = f"{self.checkpoint.dir}: layer {index}"
        part = self.parts.read(index) if self.parts is not None and self.parts.done(index) else {}
        calibration, original_thresholds = None, None
        if self.thresholds_child is not None:
            if self.thresholds_child.future.done():  # its error now, not after the last layer
                self.thresholds_child.future.result()
        elif self.method == "awq" or self.calibration.done():
            calibration = self.calibration.result()
            if self.method != "awq":
                # thresholds of the original as stored (what thresholds.py reads), first: their layer copy is
                # freed before the quantized weights exist
                calibration.thresholds.layer(index, tensors)
                times.lap("thresholds")
        else:  # the set-up still runs beside (on a CPU): this layer's thresholds come after its other stages
            original_thresholds = dict(tensors)
        round_to_float16(tensors, where)
        times.lap("read and check")
        with sharing_the_cpu(self.device):
            results = self._quantize(index, tensors, tables, calibration, part, times)
        modules = self._cheatsheet(index, results["scaled"], results["fakequant"], part)
        if self.parts is not None and not part:
            searched = self.method == "awq" and calibration.search is not None
            entries = {**(modules if self.cheatsheet_parts else {}),
                       **(transforms_to_part(self.transforms[index]) if searched else {})}
            if entries:
                self.parts.write_beside(index, entries)
        self.any_residual = self.any_residual or any(bool(f["cheatsheet/scales"].any()) for f in modules.values())
        times.lap("cheatsheet")
        if original_thresholds is not None:
            self.calibration.result().thresholds.layer(index, original_thresholds)
            times.lap("thresholds")
        if self.method == "awq":  # thresholds of the scaled model, what thresholds.py would read
            calibration.thresholds.layer(index, results["scaled"])
            times.lap("thresholds")
        self.folder.put_layer(item_for_output(modules, "cheatsheet"))
        outputs = {key: results[key] for key in self.wanted}
        if "real" in results:
            outputs["folder"] = results["real"]
        return outputs

    def _quantize(self, index: int, tensors: dict[str, torch.Tensor], tables, calibration: Calibration | None,
                  part: dict, times: StageTimes) -> dict[str, dict[str, torch.Tensor]]:
        """Layer `index`'s model outputs: 'scaled' (DecDEC's original: AWQ's scaled model), 'fakequant' and,
        where LUT-GEMM applies, 'real'; the AWQ search first when it runs."""
        where = f"{self.checkpoint.dir}: layer {index}"
        if self.method == "sqllm":
            from common.quant.anyprec import packed_layer
            shapes = {m: tuple(self.checkpoint.tensors[n].shape) for m, n in self.layout.layers[index].linears.items()}
            tables = tuple({module: table.to(self.device) for module, table in kind.items()} for kind in tables)
            fake = {**tensors, **self.sqllm.fake_quantized_layer(index, tables, shapes, self.device,
                                                                 self.checkpoint.dir)}
            others = {name: tensor for name, tensor in tensors.items()
                      if name.removesuffix(".weight") not in shapes}
            packed = {**others, **packed_layer(*tables, self.sqllm.bits, self.sqllm.shift)}  # what the runtime loads
            times.lap("quantize")
            return {"scaled": tensors, "fakequant": fake, "real": packed}
        quantizer = self.quantizers[index]
        if self.method == "awq" and calibration.search is not None:
            if part:  # searched before the interruption: only the forward
                self.transforms[index] = transforms_from_part(part)
                calibration.search.skip(index, tensors)
            else:
                self.transforms[index] = calibration.search.layer(index, tensors, quantizer.bits,
                                                                  quantizer.group_size, quantizer.zero_point)
            times.lap("AWQ search")
        lutgemm = {"real"} if quantizer.zero_point else set()  # LUT-GEMM needs the zero point
        results = layer_outputs(tensors, self.transforms[index], sorted(self.layout.layers[index].linears),
                                quantizer, {"scaled", "fakequant"} | lutgemm, where)
        times.lap("quantize")
        return results

    def _cheatsheet(self, index: int, original: dict[str, torch.Tensor], quantized: dict[str, torch.Tensor],
                    part: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Layer `index`'s cheatsheet entries (fused ones included), from its part when resuming."""
        saved = {module: fields for module, fields in part.items() if not module.startswith(AWQ_PART)}
        if saved:
            return saved
        where = f"{self.checkpoint.dir}: layer {index}"
        sheet = LayerResults(self.layout.layers[index])
        for module in sorted(self.layout.layers[index].linears):
            with sharing_the_cpu(self.device):  # a Linear at a time: all cores again once the set-up is done
                sheet.add_linear(module, original[f"{module}.weight"], quantized[f"{module}.weight"],
                                 self.cheatsheet, f"{where} {module} (original)", f"{where} {module} (quantized)")
        return sheet.finish(self.cheatsheet)

    def finish(self) -> list[str]:
        """After the last layer: the all-zero check and thresholds.pt's content (waiting for the child
        process's, if it computes them); returns warnings."""
        if not self.any_residual:
            raise InputError(f"{self.checkpoint.dir}: every residual is zero: the quantized model equals the "
                             "original, so the cheatsheet would be empty")
        if self.thresholds_child is not None:
            self.thresholds = from_arrays(self.thresholds_child.future.result())
            if self.times is not None:
                self.times.lap("waiting for the thresholds process")
        else:
            self.thresholds = self.calibration.result().thresholds.entries
        return clamp_to_fp16(self.thresholds) if self.clamp else []


class SetupFolderWriter:
    """The folder DecDEC's runtime loads: the LUT-GEMM checkpoint (rtn/awq) or the packed SqueezeLLM one,
    cheatsheet.pt streamed layer by layer, thresholds.pt at the end. convert_model's writer interface plus
    `put_layer`."""

    def __init__(self, folder: Path, run: OnePass, lutgemm: CheckpointWriter | None):
        self.folder, self.run, self.lutgemm = folder, run, lutgemm
        layout = cheatsheet_layout(run.layout.layers, self._shape, run.cheatsheet)
        self.cheatsheet = StreamedWriter(folder / OUTPUT_FILES["cheatsheet"], layout)
        self.expected = lutgemm.expected if lutgemm else {}
        in_features = sum(self._shape(layer.index, m)[1] for layer in run.layout.layers for m in layer.linears)
        parts = layout_bytes(layout) if run.parts is not None and run.cheatsheet_parts else 0  # beside the folder
        self.total_size = (lutgemm.total_size if lutgemm else 0) + layout_bytes(layout) + parts + 4 * in_features
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
        save_atomically(self.run.thresholds, self.folder / THRESHOLDS_FILE)

    def close(self) -> None:
        if self.lutgemm:
            self.lutgemm.close()
        if self.cheatsheet.thread.is_alive():
            self.cheatsheet.abort()
