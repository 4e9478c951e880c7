"""Find the decoder layers of a checkpoint and the Linear modules DecDEC serves in each.

SPEC §2: decoder layer i is every tensor `<prefix>layers.<i>.<...>`; its Linears are the
2-D `.weight` tensors. 1-D tensors (norms, biases) are fine and ignored; tensors of 3 or more
dimensions (fused MoE experts) cannot be served and are an input error, never a silent skip.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from common.errors import InputError
from common.io.model_files import Checkpoint

LAYER_TENSOR = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass
class DecoderLayer:
    """One decoder layer: its Linear modules (name -> weight tensor name) and other tensors."""
    index: int
    linears: dict[str, str] = field(default_factory=dict)
    others: dict[str, str] = field(default_factory=dict)  # local name -> tensor name

    def tensor_names(self) -> dict[str, str]:
        """Every tensor of the layer: name inside the layer -> checkpoint tensor name."""
        return {**{f"{module}.weight": name for module, name in self.linears.items()}, **self.others}


@dataclass
class LayerLayout:
    prefix: str
    layers: list[DecoderLayer]
    outside: list[str]  # tensor names outside the decoder layers (embeddings, final norm, head)


def num_hidden_layers(config: dict) -> int | None:
    for source in (config, config.get("text_config") or {}):
        if isinstance(source.get("num_hidden_layers"), int):
            return source["num_hidden_layers"]
    return None


def model_context(config: dict) -> int | None:
    """The longest sequence the model takes (max_position_embeddings), when config.json says."""
    for source in (config, config.get("text_config") or {}):
        if isinstance(source.get("max_position_embeddings"), int):
            return source["max_position_embeddings"]
    return None


def check_seq_len(checkpoint: Checkpoint, seq_len: int, flag: str = "--seq_len") -> None:
    """Input error for windows longer than the model's context (positions past it are garbage)."""
    context = model_context(checkpoint.config)
    if context is not None and seq_len > context:
        raise InputError(f"{flag} {seq_len}: longer than the model's context ({context} tokens, "
                         f"{checkpoint.dir / 'config.json'})")


def find_layers(checkpoint: Checkpoint) -> LayerLayout:
    """Group the checkpoint's tensors into decoder layers (SPEC §2)."""
    by_prefix: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for name in checkpoint.tensors:
        match = LAYER_TENSOR.match(name)
        if match:
            by_prefix[match["prefix"]][int(match["index"])][match["rest"]] = name
    if not by_prefix:
        raise InputError(f"{checkpoint.dir}: no decoder layers found (no tensor is named "
                         "'<prefix>layers.<i>.<module>.weight'); this architecture is not supported")
    expected = num_hidden_layers(checkpoint.config)
    candidates = [p for p, layers in by_prefix.items() if expected is None or len(layers) == expected]
    if not candidates:
        counts = ", ".join(f"'{p}layers.*' has {len(l)}" for p, l in by_prefix.items())
        raise InputError(f"{checkpoint.dir}: config.json says num_hidden_layers={expected} but {counts}")
    prefix = "model." if "model." in candidates else max(candidates, key=lambda p: len(by_prefix[p]))
    found = by_prefix[prefix]
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise InputError(f"{checkpoint.dir}: decoder layer {prefix}layers.{missing[0]} is missing")
    layers = []
    for index in range(len(found)):
        layer = DecoderLayer(index)
        for rest, name in sorted(found[index].items()):
            ndim = len(checkpoint.tensors[name].shape)
            if ndim == 2 and rest.endswith(".weight"):
                layer.linears[rest[: -len(".weight")]] = name
            elif ndim <= 1:
                layer.others[rest] = name
            else:
                raise InputError(f"{checkpoint.dir}: tensor {name} has {ndim} dimensions; fused "
                                 "expert tensors (MoE) are not Linears DecDEC can serve")
        if not layer.linears:
            raise InputError(f"{checkpoint.dir}: decoder layer {index} has no Linear weights")
        layers.append(layer)
    inside = {name for layer in found.values() for name in layer.values()}
    outside = [name for name in checkpoint.tensors if name not in inside]
    return LayerLayout(prefix, layers, outside)


def check_same_layers(original: Checkpoint, original_layout: LayerLayout,
                      other: Checkpoint, other_layout: LayerLayout) -> None:
    """Input error unless both models have the same layers, Linear names and shapes."""
    a, b = original_layout.layers, other_layout.layers
    if len(a) != len(b):
        raise InputError(f"{other.dir}: {len(b)} decoder layers, but {original.dir} has {len(a)}")
    for la, lb in zip(a, b):
        if set(la.linears) != set(lb.linears):
            only_a = sorted(set(la.linears) - set(lb.linears))
            only_b = sorted(set(lb.linears) - set(la.linears))
            detail = (f"missing {only_a[0]}" if only_a else f"has extra module {only_b[0]}")
            raise InputError(f"{other.dir}: layer {la.index} {detail} (compared with {original.dir})")
        for module, name in la.linears.items():
            sa = original.tensors[name].shape
            sb = other.tensors[lb.linears[module]].shape
            if sa != sb:
                raise InputError(f"{other.dir}: tensor {lb.linears[module]} has shape {list(sb)}, "
                                 f"but {original.dir} has {list(sa)}")
