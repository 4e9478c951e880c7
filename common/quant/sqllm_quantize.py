"""SqueezeLLM quantization built in (SPEC §9): the sensitivity of every Linear, then each layer's seed LUTs
and codes, kept as `ComputedTables` (what conv_sqllm.py and decdec_setup.py convert, and export as
Any-Precision's quantized folder when asked).

The sensitivity is rounded to bfloat16 (the gradients file's format) before the k-means, so a run from
`--gradients` gives the same tables as the run that dumped them. It is served a layer at a time: what does
not fit the host-memory budget waits in files beside the output.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch

from common.errors import InputError
from common.io.model_files import Checkpoint, require_float16
from common.layers import LayerLayout
from common.quant.sqllm import ComputedTables

STASH_BUDGET = 8 << 30  # bytes of stashed layer inputs and sensitivities kept in host memory; the rest spills


class Gradients:
    """F per layer (module -> bfloat16 [out, in]), served a layer at a time: `read(index)` gives one."""

    def __init__(self, layers: int, read: Callable[[int], dict[str, torch.Tensor]],
                 close: Callable[[], None] | None = None):
        self.layers, self._read, self._close = layers, read, close

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return self._read(index)

    def dump(self, path: Path, layout: LayerLayout, checkpoint: Checkpoint) -> None:
        """The gradients file (SPEC §9.1: a list with one dict per layer), streamed a layer at a time."""
        from common.io.outputs import atomic_file
        from common.io.torchsave import StreamedWriter, TensorMeta
        plan = [{module: TensorMeta(tuple(checkpoint.tensors[name].shape), torch.bfloat16)
                 for module, name in sorted(layer.linears.items())} for layer in layout.layers]
        with atomic_file(path) as temporary:
            writer = StreamedWriter(temporary, plan)
            for index in range(self.layers):
                writer.put(dict(sorted(self.layer(index).items())))
            writer.finish()

    def close(self) -> None:
        if self._close is not None:
            self._close()


def compute_sensitivity(checkpoint: Checkpoint, layout: LayerLayout, samples: torch.Tensor, device: torch.device,
                        batch_size: int, progress: Callable, spill_dir: Path, trust_remote_code: bool = False,
                        budget: int = STASH_BUDGET, ready: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                        keep: bool = True) -> Gradients | None:
    """F of SPEC §9.1 for every layer: the model in bfloat16 from its float16 weights. Each layer's F
    (bfloat16, as the gradients file holds it) goes to `ready(index, F)` as soon as it is known, from
    the last layer down; with `keep`, it is also kept for the result. The stashed layer inputs and the
    kept sensitivities share `budget` bytes of host memory; beyond it they go to files in `spill_dir`
    (removed by the result's `close`)."""
    from common.calib.layerwise import LayerwiseModel
    from common.quant.sensitivity import HostStash, layerwise_sensitivity
    stash = HostStash(budget, spill_dir)
    model = LayerwiseModel(checkpoint, layout, device, torch.bfloat16, trust_remote_code, via_float16=True)
    try:
        for index, sums in layerwise_sensitivity(model, samples, batch_size, stash, progress):
            values = {module: value.to(torch.bfloat16).cpu() for module, value in sums.items()}  # cast on the device
            if keep:
                for module, value in values.items():
                    stash.put(("F", index, module), value)
            if ready is not None:
                ready(index, values)
    except BaseException:
        stash.close()
        raise
    finally:
        model.close()
    if not keep:
        stash.close()
        return None
    modules = [sorted(layer.linears) for layer in layout.layers]
    return Gradients(len(layout.layers), lambda index: {m: stash.get(("F", index, m)) for m in modules[index]},
                     stash.close)


def load_gradients(path: Path, checkpoint: Checkpoint, layout: LayerLayout) -> Gradients:
    """A gradients file (ours, or Any-Precision's cache/gradients/*.pt), checked against the model."""
    from common.io.torchsave import load_user_file
    data = load_user_file(path, "--gradients", mmap=True)  # 8B: 14 GB, read a layer at a time
    if not isinstance(data, list) or len(data) != len(layout.layers):
        size = len(data) if isinstance(data, list) else type(data).__name__
        raise InputError(f"--gradients {path}: expected a list of {len(layout.layers)} layers, found {size}: "
                         f"is it another model's?")
    for layer, entry in zip(layout.layers, data):
        if not isinstance(entry, dict) or set(entry) != set(layer.linears):
            raise InputError(f"--gradients {path}: layer {layer.index} holds "
                             f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}, the model's "
                             f"Linears are {sorted(layer.linears)}")
        for module, name in layer.linears.items():
            tensor = entry[module]
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(checkpoint.tensors[name].shape) \
                    or not tensor.dtype.is_floating_point:
                shape = f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise InputError(f"--gradients {path}: layer {layer.index} {module} is {shape}, the weight "
                                 f"{list(checkpoint.tensors[name].shape)}")

    def served(index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s values, checked as they are read: the file (mmap'd) is read once, not twice."""
        values = {module: tensor.to(torch.bfloat16) for module, tensor in data[index].items()}
        for module, tensor in values.items():
            low, high = torch.aminmax(tensor)
            if not (bool(torch.isfinite(high)) and float(low) >= 0):
                raise InputError(f"--gradients {path}: layer {index} {module}: not finite, non-negative values")
        return values
    return Gradients(len(data), served)


class LayerKMeans:
    """Each layer's seed LUTs and codes (SPEC §9.2), every core on one layer's rows, into `tables`
    (`l<i>.safetensors` per layer), in the order layers are handed in. With `beside`, on a thread of its
    own (numba lets the GIL go, and nothing here is pickled): the cores work on one layer while the GPU
    computes the next layer's sensitivity, and `submit` waits only while `ahead` layers wait already,
    which bounds the memory. A layer whose file is there already (each is written whole, under a
    temporary name first) is not computed again: how an interrupted run resumes."""

    def __init__(self, checkpoint: Checkpoint, layout: LayerLayout, tables: ComputedTables, random_state: int,
                 beside: bool, ahead: int = 2, kernel_ready: Future | None = None):
        from concurrent.futures import ThreadPoolExecutor
        self.checkpoint, self.layout, self.tables, self.random_state = checkpoint, layout, tables, random_state
        self._kernel_ready = kernel_ready  # numba's compile or cache load, if it runs elsewhere
        self.seconds = 0.0  # spent in the k-means, all layers
        self.waited = 0.0  # `submit` waiting for a free place in the queue
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sqllm-kmeans") if beside else None
        self._pending: deque[Future] = deque()
        self._ahead = ahead

    @property
    def beside(self) -> bool:
        return self._pool is not None

    def done(self, index: int) -> bool:
        return self.tables.file(index).is_file()

    def submit(self, index: int, sensitivity: dict[str, torch.Tensor]) -> None:
        if self.done(index):
            return
        if self._pool is None:
            self._run(index, sensitivity)
            return
        started = time.perf_counter()
        while len(self._pending) >= self._ahead:
            self._pending.popleft().result()
        self.waited += time.perf_counter() - started
        self._pending.append(self._pool.submit(self._run, index, sensitivity))

    def finish(self) -> None:
        """Wait for every submitted layer (raising the first error)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Stop: layers not started are dropped, the running one ends first (its files stay whole)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self, index: int, sensitivity: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        from common.io.outputs import atomic_file
        from common.quant.seed_luts import seed_luts
        started = time.perf_counter()
        if self._kernel_ready is not None:
            self._kernel_ready.result()
        tables = {}
        for module, name in sorted(self.layout.layers[index].linears.items()):
            raw = self.checkpoint.read_raw(name)
            where = f"{self.checkpoint.dir}: tensor {name}"
            weight = raw
            if raw.dtype != torch.float16:
                weight = raw.half()
                require_float16(raw, weight, where)
            tables[f"{module}.lut"], tables[f"{module}.codes"] = seed_luts(
                weight, sensitivity[module], self.tables.bits, self.random_state, where)
        self.tables.path.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.tables.file(index)) as temporary:
            save_file(tables, str(temporary))
        self.seconds += time.perf_counter() - started


def quantize(checkpoint: Checkpoint, layout: LayerLayout, random_state: int, tables: ComputedTables | None,
             samples: Callable[[], torch.Tensor], device: torch.device, batch_size: int, progress: Callable,
             gradients_file: Path | None = None, dump: Path | None = None, stash_bytes: int = STASH_BUDGET,
             spill_dir: Path | None = None, trust_remote_code: bool = False, beside: bool | None = None
             ) -> dict[str, float]:
    """SPEC §9 from the model to its seed LUTs and codes in `tables`: the sensitivity (read from
    `gradients_file`, or computed on `samples()`; dumped to `dump` if given), and each layer's k-means
    as soon as its sensitivity is known (unless `tables` is None: the sensitivity alone). What
    conv_sqllm.py --w_bit and decdec_setup.py --method sqllm both run. Returns seconds by stage.

    `beside` (by default: when the sensitivity is computed on a GPU) runs numba's compile and the
    k-means in threads beside the sensitivity; else everything runs in order on this thread."""
    from common.background import finished, run_beside
    from common.quant.seed_luts import require_kmeans, threads, warm_up
    started = time.perf_counter()
    if beside is None:
        beside = device.type == "cuda" and gradients_file is None
    kmeans = None
    if tables is not None:
        require_kmeans()  # one line if flash1dkmeans or numba is missing, before any long work
        # numba compiles the kernel (10-30 s, once per install) or loads it from its cache
        kernel_ready = run_beside(warm_up, "numba-warm-up") if beside else finished(warm_up())
        kmeans = LayerKMeans(checkpoint, layout, tables, random_state, beside, kernel_ready=kernel_ready)
    ready = None if kmeans is None else kmeans.submit
    gradients = None
    try:
        if gradients_file is not None:
            gradients = load_gradients(gradients_file, checkpoint, layout)
            if kmeans is not None:
                for index in progress(range(gradients.layers), desc="k-means"):
                    if not kmeans.done(index):
                        kmeans.submit(index, gradients.layer(index))
        else:
            gradients = compute_sensitivity(checkpoint, layout, samples(), device, batch_size, progress,
                                            spill_dir or (tables.path if tables else dump).parent, trust_remote_code,
                                            stash_bytes, ready, keep=dump is not None)
        sensitivity_done = time.perf_counter()
        if dump is not None:  # beside the last layers' k-means
            gradients.dump(dump, layout, checkpoint)
        if kmeans is not None:
            kmeans.finish()
        all_done = time.perf_counter()
    finally:
        if kmeans is not None:
            kmeans.close()
        if gradients is not None:
            gradients.close()
    # the sensitivity's own time: without its waits for the queue, or the k-means run in its thread
    other = 0.0 if kmeans is None else kmeans.waited if kmeans.beside else kmeans.seconds
    times = {"sensitivity" if gradients_file is None else "reading the gradients": sensitivity_done - started - other}
    if kmeans is not None:
        times[f"k-means on {threads()} threads"] = kmeans.seconds
        if kmeans.beside:
            times["waiting for the k-means after it"] = all_done - sensitivity_done
    times["in all"] = all_done - started
    return times
