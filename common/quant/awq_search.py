"""AWQ's search (SPEC §7.2-7.4), one decoder layer at a time on the device.

For each layer: run the unmodified layer over the calibration blocks, recording each Linear's
input (the layer's output is the next layer's input); for each scale group, try the 20 ratios
of the grid against the group's block output, fold the winner into the layer and divide the
recorded inputs by it; then search each Linear's clip limits, every shrink step as one batched
matrix product over the groups instead of the fork's elementwise products. Weights are swapped
into the block with `functional_call`, never copied through state dicts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from common.quant.awq import LayerTransforms, pseudo_quantize
from common.errors import InputError
from common.layers import LayerLayout
from common.calib.layerwise import LayerInputs, LayerwiseModel
from common.io.model_files import Checkpoint

RATIOS = 20
CLIP_STEPS = 10  # limits max|W| * (1 - i/20) for i < 10
CLIP_TOKENS = 512
NOT_CLIPPED = ("q_", "k_", "query", "key", "Wqkv")  # q/k feed a product of two projections
NORMS = {"input_layernorm", "post_attention_layernorm"}
SEPARATE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

Quantize = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share an input (scaled together), the op before them, and the block whose
    output the search compares."""
    prev: str
    linears: tuple[str, ...]
    block: str
    attention: bool = False  # the block takes the layer's keyword arguments


def scale_groups(layer: nn.Module, where: str) -> list[ScaleGroup]:
    """SPEC §7.3's groups for a separate-q/k/v or a fused-qkv layer; any other structure is refused."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    norms = {name for name, _ in layer.named_children() if "norm" in name}
    shape = lambda name: tuple(linears[name].weight.shape)  # noqa: E731
    if set(linears) == set(SEPARATE) and norms == NORMS:
        groups = [ScaleGroup("input_layernorm", SEPARATE[:3], "self_attn", True)]
        if shape("self_attn.v_proj") == shape("self_attn.o_proj"):  # no grouped-query attention
            groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
        return groups + [ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                         ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")]
    if set(linears) == set(FUSED) and norms == NORMS:
        groups = [ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn", True)]
        if shape("self_attn.qkv_proj") == shape("self_attn.o_proj"):
            groups.append(ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
        return groups + [ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
                         ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj")]
    raise InputError(f"{where}: decoder layers of class {type(layer).__name__} are not supported by the AWQ "
                     "search (it supports layers with separate q/k/v_proj as Llama, Mistral, Qwen2, Qwen3, or "
                     "fused qkv_proj/gate_up_proj as Phi-3, each with input_ and post_attention_layernorm)")


def record_linear_inputs(layer: nn.Module, run: Callable[[], list[LayerInputs]]
                         ) -> tuple[dict[str, torch.Tensor], list[LayerInputs]]:
    """Run `run()` with every Linear's input recorded: (name -> [blocks, seq, in], run's result).
    Linears fed the very same tensor (q/k/v, gate/up) share one recorded tensor."""
    parts: dict[str, list[torch.Tensor]] = {}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            parts.setdefault(name, []).append(args[0])
        return record

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in layer.named_modules()
               if isinstance(m, nn.Linear)]
    try:
        outputs = run()
    finally:
        for handle in handles:
            handle.remove()
    joined: dict[tuple[int, ...], torch.Tensor] = {}
    recorded = {}
    for name, tensors in parts.items():
        key = tuple(id(t) for t in tensors)
        if key not in joined:
            joined[key] = torch.cat(tensors, dim=0)
        recorded[name] = joined[key]
    return recorded, outputs


def _block_output(block: nn.Module, x: torch.Tensor, kwargs: dict,
                  weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    out = functional_call(block, weights or {}, (x,), kwargs) if weights else block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def squared_error(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """float32 sum of (reference - output)²: one reduction reads the difference in its own dtype
    and accumulates in float32 (no float32 copy and no squared tensor written)."""
    return torch.linalg.vector_norm(reference - output, dtype=torch.float32).square()


@torch.no_grad()
def search_scale(layer: nn.Module, group: ScaleGroup, x: torch.Tensor, chunk_kwargs: list[tuple[slice, dict]],
                 quantize: Quantize, where: str) -> torch.Tensor:
    """The group's best scales (in the search dtype): the ratio r of the grid whose scales
    s = a^r / sqrt(max * min), a = mean |x| per channel, make the block's output closest to its
    unquantized output when the Linears hold Q(W * s) / s."""
    block = layer.get_submodule(group.block)
    local = {name: (name[len(group.block) + 1:] + ".weight" if name != group.block else "weight")
             for name in group.linears}
    weights = {name: layer.get_submodule(name).weight for name in group.linears}
    calls = [(x[part], kwargs if group.attention else {}) for part, kwargs in chunk_kwargs]
    reference = [_block_output(block, xc, kwargs) for xc, kwargs in calls]
    elements = sum(out.numel() for out in reference)
    channel_mean = x.abs().reshape(-1, x.shape[-1]).mean(0)
    candidates, totals = [], []
    for step in range(RATIOS):  # no sync inside: the device never waits for this thread's next launch
        scales = channel_mean.pow(step / RATIOS).clamp(min=1e-4)
        scales = (scales / (scales.max() * scales.min()).sqrt()).reshape(1, -1)
        trial = {local[name]: quantize(weight * scales) / scales for name, weight in weights.items()}
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for (xc, kwargs), org in zip(calls, reference):
            total += squared_error(org, _block_output(block, xc, kwargs, trial))
        candidates.append(scales.reshape(-1))
        totals.append(total)
    best_loss, best_scales = float("inf"), None
    for scales, total in zip(candidates, torch.stack(totals).tolist()):
        loss = total / elements
        if loss < best_loss:  # a later ratio wins only when strictly better; NaN never does
            best_loss, best_scales = loss, scales
    if best_scales is None:
        raise InputError(f"{where}: the AWQ scale search for {', '.join(group.linears)} found no finite loss "
                         "(the block's outputs overflow in this dtype; try --dtype float32 or bfloat16)")
    return best_scales


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Divide the previous op by the scales and multiply the group's Linears, in place."""
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):  # its last len(scales) output rows feed the group
        prev.weight[-scales.shape[0]:].div_(scales.reshape(-1, 1))
        if prev.bias is not None:
            prev.bias[-scales.shape[0]:].div_(scales)
    else:
        prev.weight.div_(scales)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scales)
    for name in group.linears:
        layer.get_submodule(name).weight.mul_(scales.reshape(1, -1))


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, quantize: Quantize, group_size: int,
                row_chunk: int | None = None) -> torch.Tensor:
    """Per row and group of `weight` [out, in], the limit m = max|W| * (1 - i/20), i < 10, whose
    clamped and quantized weight best reproduces x·Wᵀ on a sample of ~512 tokens of x.
    Returns max_val [out, groups, 1] in the weight's dtype. Rows are independent: `row_chunk`
    only bounds memory (on a GPU ~128M products at once, so a Linear takes few launches)."""
    out_features, in_features = weight.shape
    size = group_size if group_size > 0 else in_features
    groups = in_features // size
    tokens = x.reshape(-1, in_features)
    tokens = tokens[:: max(1, tokens.shape[0] // CLIP_TOKENS)]
    x_groups = tokens.reshape(-1, groups, size).permute(1, 0, 2)  # [groups, n, size]
    if row_chunk is None:
        budget = (128 << 20) if weight.device.type == "cuda" else (16 << 20)
        row_chunk = max(1, budget // (groups * x_groups.shape[1]))
    limits = []
    for begin in range(0, out_features, row_chunk):
        w = weight[begin: begin + row_chunk].reshape(-1, groups, size)  # [rows, groups, size]
        reference = torch.bmm(x_groups, w.permute(1, 2, 0))  # [groups, n, rows]
        original_max = w.abs().amax(dim=-1, keepdim=True)  # [rows, groups, 1]
        best = original_max.clone()
        best_err = torch.ones_like(original_max) * 1e9  # as the fork: inf in float16
        for step in range(CLIP_STEPS):
            limit = original_max * (1 - step / (2 * CLIP_STEPS))
            trial = quantize(torch.clamp(w, -limit, limit))
            err = (torch.bmm(x_groups, trial.permute(1, 2, 0)) - reference).pow(2).mean(dim=1)  # [groups, rows]
            err = err.t().unsqueeze(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, limit, best)
        limits.append(best)
    return torch.cat(limits)


class StageTimes(dict):
    """Seconds per stage, summed over layers (the device synchronised at each boundary)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self._mark = device, time.time()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.time()
        self[stage] = self.get(stage, 0.0) + now - self._mark
        self._mark = now


@torch.no_grad()
def search_layer(model: LayerwiseModel, index: int, layer: nn.Module, inputs: list[LayerInputs], bits: int,
                 group_size: int, zero_point: bool, times: StageTimes | None = None
                 ) -> tuple[LayerTransforms, list[LayerInputs]]:
    """One layer's AWQ entries (scales and clips, float32 on the CPU) and the next layer's inputs."""
    times = times or StageTimes(model.device)
    where = f"{model.checkpoint.dir}: layer {index}"
    groups = scale_groups(layer, where)
    times.lap("load")
    recorded, outputs = record_linear_inputs(layer, lambda: model.run_layer(index, layer, inputs))
    times.lap("forward")
    chunk_kwargs, start = [], 0
    for item in inputs:
        kwargs = {k: v for k, v in item.per_layer[index][1].items() if k != "use_cache"}
        chunk_kwargs.append((slice(start, start + item.hidden.shape[0]), kwargs))
        start += item.hidden.shape[0]
    quantize = partial(pseudo_quantize, bits=bits, group_size=group_size, zero_point=zero_point)
    transforms = LayerTransforms()
    divided: set[int] = set()
    for group in groups:
        scales = search_scale(layer, group, recorded[group.linears[0]], chunk_kwargs, quantize, where)
        fold_scales(layer, group, scales)
        for name in group.linears:  # what these Linears now see: their input divided by the scales
            if id(recorded[name]) not in divided:
                recorded[name].div_(scales)
                divided.add(id(recorded[name]))
        transforms.scales.append((group.prev, list(group.linears), scales.float().cpu()))
    times.lap("scales")
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and not any(part in name for part in NOT_CLIPPED):
            transforms.clips[name] = search_clip(module.weight, recorded[name], quantize, group_size).float().cpu()
    times.lap("clips")
    return transforms, outputs


class LayerwiseSearch:
    """The AWQ search over a whole model, fed one layer's weights at a time by the converter."""

    def __init__(self, checkpoint: Checkpoint, layout: LayerLayout, blocks: torch.Tensor, device: torch.device,
                 dtype: torch.dtype, blocks_per_batch: int, trust_remote_code: bool = False,
                 set_up_times: dict[str, float] | None = None):
        """`set_up_times`: seconds of the set-up's earlier stages (the report lists them all)."""
        started = time.time()
        self.model = LayerwiseModel(checkpoint, layout, device, dtype, trust_remote_code)
        self.set_up_times = dict(set_up_times or {})
        try:
            for index, layer in enumerate(self.model.layers):  # weights are on `meta`: shapes only
                scale_groups(layer, f"{checkpoint.dir}: layer {index}")
            self.set_up_times["model skeleton and embeddings"] = time.time() - started
            self.times = StageTimes(device)  # from here on, the search's stages
            self.inputs = self.model.capture_inputs(list(blocks.split(blocks_per_batch)))
            self.model.release_outside_layers()
            self.times.lap("layer inputs")
            self.set_up_times["layer inputs"] = self.times.pop("layer inputs")
        except BaseException:
            self.model.close()
            raise

    def layer(self, index: int, tensors: dict[str, torch.Tensor], bits: int, group_size: int,
              zero_point: bool) -> LayerTransforms:
        """Search layer `index` given its weights (parameter name in the layer -> tensor)."""
        self.times.lap("outside the search")
        layer = self.model.load_layer_from(index, tensors)
        try:
            transforms, self.inputs = search_layer(self.model, index, layer, self.inputs, bits, group_size,
                                                   zero_point, self.times)
        finally:
            self.model.unload_layer(index)
        return transforms

    def skip(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Layer `index`, searched by an earlier run: only its forward, for the next layer's inputs
        (the same outputs `layer` computes, before any scaling)."""
        layer = self.model.load_layer_from(index, tensors)
        try:
            self.inputs = self.model.run_layer(index, layer, self.inputs)
        finally:
            self.model.unload_layer(index)

    def close(self) -> None:
        self.model.close()


def start_search(checkpoint: Checkpoint, layout: LayerLayout, device: torch.device, calib_data: str,
                 text_column: str | None, n_samples: int, seqlen: int, dtype: torch.dtype, blocks_per_batch: int,
                 trust_remote_code: bool = False) -> LayerwiseSearch:
    """Calibration blocks (SPEC §7.1) from --calib_data, and the layer-by-layer search over them."""
    from common.calib.calibration import load_texts, naming, sample_awq_blocks
    from common.layers import check_seq_len
    from common.calib.layerwise import load_tokenizer
    check_seq_len(checkpoint, seqlen, "--seqlen")
    started = time.time()
    tokenizer = load_tokenizer(checkpoint.dir, trust_remote_code)
    loaded = time.time()
    texts = load_texts(calib_data, text_column, flag="--calib_data", keep_empty=True)
    with naming("--calib_data", calib_data):
        blocks = sample_awq_blocks(texts, tokenizer.encode, n_samples, seqlen)
    set_up_times = {"transformers and the tokenizer": loaded - started, "calibration blocks": time.time() - loaded}
    return LayerwiseSearch(checkpoint, layout, blocks, device, dtype, blocks_per_batch, trust_remote_code,
                           set_up_times)


def results_entries(transforms: list[LayerTransforms], layout: LayerLayout) -> dict:
    """The --dump_awq file's content (SPEC §7.5): full module names, layers in order."""
    results: dict = {"scale": [], "clip": []}
    for index, layer in enumerate(transforms):
        prefix = f"{layout.prefix}layers.{index}."
        results["scale"] += [(prefix + prev, tuple(prefix + n for n in names), scales.float())
                             for prev, names, scales in layer.scales]
        results["clip"] += [(prefix + name, limit.float()) for name, limit in layer.clips.items()]
    return results
