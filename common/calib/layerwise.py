"""Run a transformers model one decoder layer at a time.

The model is built with its parameters on the `meta` device (buffers such as rotary
frequencies are computed for real, since checkpoints do not hold them). The embedding runs
on the device; forward pre-hooks on the decoder layers capture whatever this `transformers`
version passes to each of them (hidden states, masks — which differ between sliding-window and
full-attention layers — and position embeddings) while the layers themselves are skipped; then
each layer is loaded, run over every batch, and freed. The next layer's weights are
read from disk while the current one computes. Device memory: one layer + activations.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from common.errors import InputError
from common.layers import LayerLayout
from common.io.model_files import Checkpoint


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on `meta` (no memory), buffers normally."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def assign_parameter(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


@dataclass
class LayerInputs:
    """One batch: its hidden states, and the other arguments each decoder layer receives."""
    hidden: torch.Tensor
    per_layer: list[tuple[tuple, dict]]  # (positional args after the hidden states, kwargs) by layer

    def with_hidden(self, hidden: torch.Tensor) -> "LayerInputs":
        return LayerInputs(hidden, self.per_layer)


class _CapturedLayerInputs(Exception):
    """Raised by the last layer's hook to stop the forward once the inputs are captured."""


class LayerwiseModel:
    """A causal LM whose decoder layers live on the device one at a time."""

    def __init__(self, checkpoint: Checkpoint, layout: LayerLayout, device: torch.device,
                 dtype: torch.dtype, trust_remote_code: bool = False, via_float16: bool = False):
        """`via_float16`: weights read from the checkpoint are rounded to float16 first, as in a
        model directory written in float16 (what the one pass must reproduce for AWQ)."""
        from transformers import AutoConfig, AutoModelForCausalLM
        self.checkpoint, self.layout, self.device, self.dtype = checkpoint, layout, device, dtype
        self.via_float16 = via_float16
        try:
            config = AutoConfig.from_pretrained(checkpoint.dir, trust_remote_code=trust_remote_code)
            with params_on_meta():
                self.model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              trust_remote_code=trust_remote_code)
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"{checkpoint.dir}: transformers cannot build this model "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
        self.model.eval()
        self.config = config
        self.layers_path = f"{layout.prefix}layers"
        try:
            layers = self.model.get_submodule(self.layers_path)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList) or len(layers) != len(layout.layers):
            raise InputError(f"{checkpoint.dir}: the model has no decoder layer list '{self.layers_path}' "
                             f"matching the checkpoint's {len(layout.layers)} layers")
        self.layers: nn.ModuleList = layers
        self._reader = ThreadPoolExecutor(max_workers=4, thread_name_prefix="layer-read")
        self._prefetched: dict[tuple[int, int], dict[str, Future]] = {}  # (layer, id(checkpoint))
        head = self.model.get_output_embeddings()
        self.head_names = {f"{name}." for name, module in self.model.named_modules() if module is head}
        self._load_outside_layers()

    # -- weights -------------------------------------------------------------------------------

    def _tensor(self, name: str, checkpoint: Checkpoint | None = None) -> torch.Tensor:
        checkpoint = checkpoint or self.checkpoint
        if name not in checkpoint.tensors:
            raise InputError(f"{checkpoint.dir}: tensor {name} is missing")
        tensor = checkpoint.read_raw(name)
        if self.via_float16 and tensor.dtype.is_floating_point:
            tensor = tensor.half()
        return tensor.to(self.device, self.dtype)

    def _load_outside_layers(self) -> None:
        """Embeddings, rotary buffers, final norm: everything but the layers and the LM head."""
        for name, param in list(self.model.named_parameters()):
            if name.startswith(self.layers_path + ".") or any(name.startswith(h) for h in self.head_names):
                continue
            assign_parameter(self.model, name, self._tensor(name))
        for module_name, module in self.model.named_modules():
            if not module_name.startswith(self.layers_path):
                for buffer_name, buffer in list(module._buffers.items()):
                    if buffer is not None and buffer.device != self.device:
                        module._buffers[buffer_name] = buffer.to(self.device)

    def load_head(self, checkpoint: Checkpoint | None = None) -> nn.Module:
        """The LM head with its weight (the input embedding's when the checkpoint ties them)."""
        checkpoint = checkpoint or self.checkpoint
        head = self.model.get_output_embeddings()
        for name, _ in list(head.named_parameters()):
            full = f"{next(iter(self.head_names))}{name}"
            if full not in checkpoint.tensors and name == "weight":
                embed_name = next(n for n, m in self.model.named_modules()
                                  if m is self.model.get_input_embeddings()) + ".weight"
                full = embed_name
            assign_parameter(head, name, self._tensor(full, checkpoint))
        return head

    def layer_tensor_names(self, index: int) -> dict[str, str]:
        """Parameter name inside layer `index` -> checkpoint tensor name."""
        prefix = f"{self.layers_path}.{index}."
        return {name: f"{prefix}{name}" for name, _ in self.layers[index].named_parameters()}

    def prefetch(self, index: int, checkpoint: Checkpoint | None = None) -> None:
        """Start reading layer `index`'s weights from disk in the background."""
        checkpoint = checkpoint or self.checkpoint
        key = (index, id(checkpoint))
        if index < len(self.layers) and key not in self._prefetched:
            pin = self.device.type == "cuda"
            names = self.layer_tensor_names(index)
            missing = [full for full in names.values() if full not in checkpoint.tensors]
            if missing:
                raise InputError(f"{checkpoint.dir}: tensor {missing[0]} is missing")
            self._prefetched[key] = {name: self._reader.submit(checkpoint.read_raw, full, pin)
                                     for name, full in names.items()}

    def load_layer(self, index: int, checkpoint: Checkpoint | None = None) -> nn.Module:
        """Layer `index` with its weights on the device (read now unless prefetched)."""
        checkpoint = checkpoint or self.checkpoint
        self.prefetch(index, checkpoint)
        layer = self.layers[index]
        for name, future in self._prefetched.pop((index, id(checkpoint))).items():
            assign_parameter(layer, name, future.result().to(self.device, self.dtype, non_blocking=True))
        self._buffers_to_device(layer)
        return layer

    def load_layer_from(self, index: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Layer `index` with weights already read (parameter name inside the layer -> tensor)."""
        layer = self.layers[index]
        for name, full in self.layer_tensor_names(index).items():
            if name not in tensors:
                raise InputError(f"{self.checkpoint.dir}: tensor {full} is missing")
            assign_parameter(layer, name, tensors[name].to(self.device, self.dtype, copy=True))  # searched in place
        self._buffers_to_device(layer)
        return layer

    def _buffers_to_device(self, layer: nn.Module) -> None:
        for module in layer.modules():
            for buffer_name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.device != self.device:
                    module._buffers[buffer_name] = buffer.to(self.device)

    def unload_layer(self, index: int) -> None:
        layer = self.layers[index]
        for name, param in list(layer.named_parameters()):
            assign_parameter(layer, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))

    # -- activations ---------------------------------------------------------------------------

    @torch.no_grad()
    def capture_inputs(self, batches: list[torch.Tensor]) -> list[LayerInputs]:
        """Run the embedding for each batch of token ids and capture every layer's inputs.

        The (weightless) layers are replaced by a pass-through while the model's own forward
        computes what it hands each layer; the last layer's hook stops the forward.
        """
        captured: list[LayerInputs] = []
        calls: list[tuple[tuple, dict]] = []
        last = len(self.layers) - 1

        def hook(index: int):
            def record(module: nn.Module, args: tuple, kwargs: dict):
                kwargs = dict(kwargs)
                hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
                if index == 0:
                    captured.append(LayerInputs(hidden, []))
                calls.append((rest, kwargs))
                if index == last:
                    raise _CapturedLayerInputs
            return record

        def pass_through(hidden_states=None, *args, **kwargs):
            return hidden_states if hidden_states is not None else kwargs["hidden_states"]

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        for layer in self.layers:
            layer.forward = pass_through
        try:
            for batch in batches:
                calls.clear()
                try:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
                except _CapturedLayerInputs:
                    captured[-1].per_layer = list(calls)
                    continue
                raise RuntimeError("the last decoder layer was never called")
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.layers:
                del layer.forward
        return captured

    @torch.no_grad()
    def run_layer(self, index: int, layer: nn.Module, inputs: list[LayerInputs]) -> list[LayerInputs]:
        """Every batch through decoder layer `index`; returns the next layer's inputs."""
        outputs = []
        for item in inputs:
            args, kwargs = item.per_layer[index]
            out = layer(item.hidden, *args, **kwargs)
            outputs.append(item.with_hidden(out[0] if isinstance(out, (tuple, list)) else out))
        return outputs

    def release_outside_layers(self) -> None:
        """Free the embeddings and final norm once the layer inputs are captured: a run that only
        walks the layers (thresholds, the AWQ search) need not hold them (1 GB for an 8B model)."""
        for name, param in list(self.model.named_parameters()):
            if not name.startswith(self.layers_path + ".") and param.device.type != "meta":
                assign_parameter(self.model, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)


def output_logits(model: LayerwiseModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden states after the last decoder layer -> float32 logits, as the model computes them (in its
    dtype, then upcast): the final norm (OPT's `final_layer_norm`, absent where its norm comes after each
    layer, then its `project_out` where it has one), the LM head, a softcap."""
    decoder = model.model.get_decoder() if hasattr(model.model, "get_decoder") else None
    if getattr(decoder, "norm", None) is not None:
        final = [decoder.norm]
    elif hasattr(decoder, "final_layer_norm"):
        final = [m for m in (decoder.final_layer_norm, getattr(decoder, "project_out", None)) if m is not None]
    else:
        raise InputError(f"{model.checkpoint.dir}: cannot find the final norm of this architecture")
    head = model.load_head()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        for module in final:
            hidden = module(hidden)
        out = head(hidden).float()
        return torch.tanh(out / softcap) * softcap if softcap else out
    return logits


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise InputError(f"{model_dir}: no usable tokenizer ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0][:120] if str(error).strip() else ''})") from None
