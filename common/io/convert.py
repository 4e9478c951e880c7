"""Stream a checkpoint into one or more new float16 model directories, one decoder layer at a time.

Used by conv_awq.py (scaled + fake-quantized outputs) and conv_sqllm.py (fake-quantized).
Tensors outside the decoder layers are copied (as float16); each layer's tensors are read
ahead in the background, transformed on the device by the caller, and written straight
into pre-planned safetensors shards. Every output appears only when complete.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from common.layers import LayerLayout
from common.io.heap import trim_heap
from common.io.host_copy import to_host
from common.io.model_files import Checkpoint
from common.io.model_writer import ShardedModelWriter, copy_model_files
from common.io.outputs import atomic_dir, check_free_space
from common.io.prefetch import prefetched

# (layer index, {local tensor name: tensor as stored, on the device}, extras) -> {output: {local name: tensor}}
LayerTransform = Callable[[int, dict[str, torch.Tensor], Any], dict[str, dict[str, torch.Tensor]]]


WRITE_BEHIND = 2  # layers whose outputs may wait to be written (host memory: about that many layers)


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype.is_floating_point else dtype


class Writer(Protocol):
    """What convert_model writes an output through: every tensor planned up front."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
    total_size: int

    def write(self, name: str, tensor: torch.Tensor) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


def convert_model(checkpoint: Checkpoint, layout: LayerLayout, outputs: dict[str, Path],
                  transform: LayerTransform, device: torch.device, max_shard_size: int, overwrite: bool,
                  progress: Callable, read_extras: Callable[[int], Any] = lambda index: None,
                  read_linears: bool = True, writer_for: dict[str, Callable[[Path], Writer]] | None = None
                  ) -> None:
    """Write every output directory; `transform` supplies each layer's new tensors.

    `read_extras(i)` loads whatever else layer i needs (e.g. LUTs and codes); it runs ahead in
    the background with the layer's own tensors. With `read_linears=False` the layer's Linear
    weights are not read at all (the transform replaces them; their shapes are in the header).
    An output is a safetensors model directory unless `writer_for` names another writer for it
    (made in the output's temporary folder); the transform's tensors are named as in the layer.
    The transform gets the tensors as stored, on the device.
    """
    plan = [(name, info.shape, output_dtype(info.dtype)) for name, info in checkpoint.tensors.items()]
    pin = device.type == "cuda"
    with ExitStack() as stack:
        writers: dict[str, Writer] = {}
        for key, path in outputs.items():
            temp = stack.enter_context(atomic_dir(path, overwrite))
            make = (writer_for or {}).get(key)
            writers[key] = make(temp) if make else ShardedModelWriter(temp, plan, max_shard_size)
            stack.callback(writers[key].close)
            copy_model_files(checkpoint.dir, temp)
        check_free_space([(outputs[key], writer.total_size, outputs[key].name) for key, writer in writers.items()])
        for name in layout.outside:
            # a writer may plan only some tensors: decdec_setup's sqllm folder plans none, so the
            # embeddings and the LM head (2 GB of an 8B model) are not read at all
            wanted = [writer for writer in writers.values() if name in writer.expected]
            if wanted:
                tensor = checkpoint.read_raw(name).to(output_dtype(checkpoint.tensors[name].dtype))
                for writer in wanted:
                    writer.write(name, tensor)

        def read_layer(index: int) -> tuple[dict[str, torch.Tensor], Any]:
            names = layout.layers[index].tensor_names() if read_linears else dict(layout.layers[index].others)
            return checkpoint.read_named(names, pin), read_extras(index)

        def write_layer(outputs: dict[str, dict[str, torch.Tensor]]) -> None:
            for key, tensors in outputs.items():
                for name, tensor in tensors.items():
                    writers[key].write(name, tensor)

        steps = range(len(layout.layers))
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as write_pool:
            # one layer read ahead: enough to keep the disk busy, and host memory stays ~3 layers
            for index, (raw, extras) in progress(prefetched(steps, read_layer, depth=1), desc="layers",
                                                 total=len(steps)):
                tensors = {local: t.to(device, non_blocking=True) for local, t in raw.items()}
                del raw  # the copies on the device are what the transform uses
                results = transform(index, tensors, extras)
                prefix = f"{layout.prefix}layers.{index}."
                outputs = {}
                for key, produced in results.items():
                    named = {prefix + local: tensor for local, tensor in produced.items()}
                    outputs[key] = to_host(named, {name: writers[key].expected[name][1] for name in named})
                del tensors, results
                while len(pending) >= WRITE_BEHIND:  # later layers are computed while earlier ones are written
                    pending.popleft().result()
                pending.append(write_pool.submit(write_layer, outputs))
                trim_heap()  # host memory stays that of a few layers, not a growing heap
            while pending:
                pending.popleft().result()
        for writer in writers.values():
            writer.finish()
