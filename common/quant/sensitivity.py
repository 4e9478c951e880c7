"""SqueezeLLM's sensitivity (SPEC §9.1): F[W] = Σ_s (∂L_s/∂W)² for every decoder Linear, a layer at a time.

Any-Precision LLM puts the whole bfloat16 model on the GPU and back-propagates each sample through it.
Here the layers go forward once over all samples, keeping each layer's input (the stash), the loss of
each sample is taken at the top, and the gradient then goes down one layer at a time: the layer's
forward is recomputed with gradients on its input, the gradient from above is back-propagated, and
each Linear's per-sample weight gradient Gₛᵀ·Xₛ is formed from the input Xₛ and output gradient Gₛ that
hooks capture (a batch of samples goes back together; only the weight gradients must be per sample,
and those come from the hooks, not from autograd's batch sum). The device holds one layer and one
batch's activations.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from common.calib.layerwise import LayerwiseModel, output_logits


class HostStash:
    """Tensors kept by key on the host up to `budget` bytes, beyond it in files of a scratch folder made
    in `spill_dir` when first needed (8B: each layer's stashed inputs are 0.4 GB at 100 x 512 tokens,
    its sensitivity 0.4 GB in bfloat16). `take` hands a tensor back and forgets it."""

    def __init__(self, budget: int, spill_dir: Path):
        self.budget, self.spill_dir = budget, spill_dir
        self.held = 0
        self.spills = 0  # tensors that went to files, in all
        self._memory: dict[Hashable, torch.Tensor] = {}
        self._files: dict[Hashable, Path] = {}
        self._folder: Path | None = None

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        size = tensor.numel() * tensor.element_size()
        if self.held + size <= self.budget:
            self._memory[key] = tensor
            self.held += size
            return
        from safetensors.torch import save_file
        if self._folder is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix=".sqllm-stash-", dir=self.spill_dir))
        path = self._folder / f"{len(self._files)}.safetensors"
        save_file({"t": tensor.contiguous()}, str(path))
        self._files[key] = path
        self.spills += 1

    def get(self, key: Hashable) -> torch.Tensor:
        """The tensor under `key`, kept."""
        if key in self._memory:
            return self._memory[key]
        from safetensors.torch import load_file
        return load_file(str(self._files[key]))["t"]

    def take(self, key: Hashable) -> torch.Tensor:
        if key in self._memory:
            tensor = self._memory.pop(key)
            self.held -= tensor.numel() * tensor.element_size()
            return tensor
        from safetensors.torch import load_file
        path = self._files.pop(key)
        tensor = load_file(str(path))["t"]
        path.unlink()
        return tensor

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def causal_lm_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each sample's mean next-token cross entropy (transformers' loss with labels = input_ids)."""
    vocab = logits.shape[-1]
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1).to(logits.device),
                                reduction="none")
    return per_token.view(ids.shape[0], -1).mean(dim=1)


class _LinearTaps:
    """Forward hooks on a layer's Linears that keep each one's input and, during backward, its output's
    gradient; `square_into` then adds every sample's squared weight gradient to the sums."""

    def __init__(self, layer: nn.Module, modules: list[str]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = [layer.get_submodule(name).register_forward_hook(self._tap(name)) for name in modules]

    def _tap(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.inputs[name] = args[0].detach()
            output.register_hook(lambda grad: self.grads.__setitem__(name, grad.detach()))
        return hook

    def square_into(self, sums: dict[str, torch.Tensor]) -> None:
        for name, x in self.inputs.items():
            grad = self.grads[name]
            for sample in range(x.shape[0]):  # Gₛᵀ·Xₛ in the model's dtype, as autograd forms it
                weight_grad = grad[sample].reshape(-1, grad.shape[-1]).t() @ x[sample].reshape(-1, x.shape[-1])
                sums[name].addcmul_(weight_grad, weight_grad)  # squared in float32 (exact for bf16), no copy
        self.inputs.clear()
        self.grads.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def layerwise_sensitivity(model: LayerwiseModel, samples: torch.Tensor, batch_size: int, stash: HostStash,
                          progress: Callable = lambda items, **_: items
                          ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(layer index, module -> F float32 [out, in] on the model's device), from the last layer down to the
    first.

    `model` runs in the sensitivity's dtype (bfloat16 in SPEC §9.1); `samples` [N, T] token ids; each
    layer's inputs wait in `stash` between the forward and the backward."""
    batches = list(samples.split(batch_size))
    inputs = model.capture_inputs(batches)
    for index in progress(range(len(model.layers)), desc="sensitivity: forward"):
        layer = model.load_layer(index)
        model.prefetch(index + 1)
        for position, item in enumerate(inputs):
            stash.put(("input", index, position), item.hidden)
        inputs = model.run_layer(index, layer, inputs)
        model.unload_layer(index)
    per_layer = [item.per_layer for item in inputs]  # each batch's other arguments, by layer
    logits = output_logits(model)
    grads = []
    for item, ids in zip(inputs, batches):
        hidden = item.hidden.detach().requires_grad_(True)
        for sample in range(ids.shape[0]):  # a sample's float32 logits at a time (8B: 0.26 GB at 512 tokens)
            with torch.enable_grad():
                causal_lm_losses(logits(hidden[sample: sample + 1]), ids[sample: sample + 1]).sum().backward()
        grads.append(hidden.grad)
    model.release_outside_layers()
    del inputs, logits
    for index in progress(range(len(model.layers) - 1, -1, -1), desc="sensitivity: backward"):
        layer = model.load_layer(index)
        if index > 0:
            model.prefetch(index - 1)
        modules = sorted(model.layout.layers[index].linears)
        sums = {name: torch.zeros(layer.get_submodule(name).weight.shape, dtype=torch.float32, device=model.device)
                for name in modules}
        taps = _LinearTaps(layer, modules)
        try:
            for position, arguments in enumerate(per_layer):
                args, kwargs = arguments[index]
                hidden = stash.take(("input", index, position)).to(model.device).requires_grad_(True)
                with torch.enable_grad():
                    out = layer(hidden, *args, **kwargs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    out.backward(grads[position])
                taps.square_into(sums)
                grads[position] = hidden.grad
        finally:
            taps.remove()
        model.unload_layer(index)
        yield index, sums
