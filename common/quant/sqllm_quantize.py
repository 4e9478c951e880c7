"""SqueezeLLM quantization built in (SPEC §9): the sensitivity of every Linear, then each layer's seed LUTs
and codes, written as Any-Precision's quantized folder (what conv_sqllm.py and decdec_setup.py read).

The sensitivity is rounded to bfloat16 (the gradients file's format) before the k-means, so a run from
`--gradients` gives the same folder as the run that dumped them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from common.errors import InputError
from common.io.model_files import Checkpoint
from common.layers import LayerLayout

Gradients = list[dict[str, torch.Tensor]]  # per layer: module -> F, bfloat16 [out, in]


def compute_sensitivity(checkpoint: Checkpoint, layout: LayerLayout, samples: torch.Tensor, device: torch.device,
                        batch_size: int, progress: Callable, trust_remote_code: bool = False) -> Gradients:
    """F of SPEC §9.1 for every layer (bfloat16, on the CPU): the model in bfloat16 from its float16 weights."""
    from common.calib.layerwise import LayerwiseModel
    from common.quant.sensitivity import layerwise_sensitivity
    model = LayerwiseModel(checkpoint, layout, device, torch.bfloat16, trust_remote_code, via_float16=True)
    gradients: Gradients = [{} for _ in layout.layers]
    try:
        for index, sums in layerwise_sensitivity(model, samples, batch_size, progress):
            gradients[index] = {module: value.to(torch.bfloat16) for module, value in sums.items()}
    finally:
        model.close()
    return gradients


def load_gradients(path: Path, checkpoint: Checkpoint, layout: LayerLayout) -> Gradients:
    """A gradients file (ours, or Any-Precision's cache/gradients/*.pt), checked against the model."""
    from common.io.torchsave import load_user_file
    data = load_user_file(path, "--gradients")
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
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(checkpoint.tensors[name].shape):
                shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise InputError(f"--gradients {path}: layer {layer.index} {module} is {shape}, the weight "
                                 f"{list(checkpoint.tensors[name].shape)}")
            if not tensor.dtype.is_floating_point or not torch.isfinite(tensor).all() or (tensor < 0).any():
                raise InputError(f"--gradients {path}: layer {layer.index} {module}: not finite, non-negative floats")
    return [{module: tensor.to(torch.bfloat16) for module, tensor in entry.items()} for entry in data]


def quantize_to_folder(checkpoint: Checkpoint, layout: LayerLayout, gradients: Gradients, bits: int,
                       random_state: int, folder: Path, progress: Callable) -> None:
    """Each layer's seed LUTs and codes (SPEC §9.2), a row at a time over every core, into `folder`
    in Any-Precision's layout (SPEC §9.3)."""
    from common.quant.anyprec import save_quantized_layer
    from common.quant.seed_luts import seed_luts
    for layer in progress(layout.layers, desc="k-means"):
        luts, codes = {}, {}
        for module, name in sorted(layer.linears.items()):
            weight = checkpoint.read_raw(name).half()
            lut, code = seed_luts(weight.numpy(), gradients[layer.index][module].float().numpy(), bits, random_state)
            luts[module], codes[module] = torch.from_numpy(lut), torch.from_numpy(code)
        save_quantized_layer(folder, layer.index, bits, luts, codes)
