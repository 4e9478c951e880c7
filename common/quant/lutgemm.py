"""DecDEC's LUT-GEMM checkpoint (SPEC §7.6): what its runtime loads with `--backend lutgemm`.

Each quantized Linear's weight becomes three tensors of a binary-coded form: the codes' bits
packed 32 input channels to an int32 word (`binary`), a per-group, per-bit scale (`alpha`) and a
per-group offset (`q_bias`), such that
    W[o, j] = sum_p alpha[G, p, o] * (2 * bit_p(q[o, j]) - 1) + q_bias[G, o],   G = j // g,
which equals the fake-quantized weight (q - z) * s.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from common.errors import InputError
from common.layers import LayerLayout
from common.io.model_files import Checkpoint, TensorInfo
from common.io.torchsave import StateDictWriter, TensorMeta

WORD_BITS = 32
SUFFIXES = ("binary", "alpha", "q_bias")


def check_shape(name: str, shape: tuple[int, ...], group_size: int) -> None:
    """Input error for a weight the LUT-GEMM layout cannot hold."""
    in_features = shape[1]
    if in_features % WORD_BITS:
        raise InputError(f"tensor {name} has {in_features} input channels, not a multiple of 32, "
                         "which the LUT-GEMM checkpoint (--real_output) packs per int32 word")
    if group_size > 0 and in_features % group_size:
        raise InputError(f"tensor {name} has {in_features} input channels, not divisible by "
                         f"--q_group_size {group_size}")


def layout(shape: tuple[int, ...], bits: int, group_size: int) -> dict[str, TensorMeta]:
    """The three tensors replacing a weight of `shape` [out, in]."""
    out_features, in_features = shape
    groups = in_features // (group_size if group_size > 0 else in_features)
    return {"binary": TensorMeta((in_features // WORD_BITS, bits, out_features), torch.int32),
            "alpha": TensorMeta((groups, bits, out_features), torch.float32),
            "q_bias": TensorMeta((groups, out_features), torch.float32)}


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """binary / alpha / q_bias from codes [out, in] and per-group scales, zeros [out, groups]."""
    out_features, in_features = codes.shape
    if sys.byteorder != "little":
        raise RuntimeError("the LUT-GEMM packing assumes a little-endian machine")
    # Bit k of byte [plane, r, c] is bit `plane` of input channel 8c + k, OR-ed in one channel column at
    # a time (a bit-per-byte copy of every plane, weighted and summed, was 6x slower on a CPU); then 4
    # little-endian bytes make an int32.
    channels = codes.to(torch.uint8).reshape(out_features, in_features // 8, 8)
    packed = torch.zeros((bits, out_features, in_features // 8), dtype=torch.uint8, device=codes.device)
    for k in range(8):
        column = channels[..., k].contiguous()
        for plane in range(bits):
            packed[plane] |= column.bitwise_right_shift(plane).bitwise_and_(1).bitwise_left_shift_(k)
    binary = packed.view(torch.int32).permute(2, 0, 1).contiguous()  # [in/32, b, out]
    planes = torch.arange(bits, device=codes.device, dtype=torch.int32)
    scales32, zeros32 = scales.float(), zeros.float()
    alpha = (scales32 / 2.0)[..., None] * (2.0 ** planes.float())  # [out, groups, b]
    q_bias = alpha.sum(dim=-1) - scales32 * zeros32  # [out, groups]
    return {"binary": binary, "alpha": alpha.permute(1, 2, 0).contiguous(), "q_bias": q_bias.t().contiguous()}


def decode(binary: torch.Tensor, alpha: torch.Tensor, q_bias: torch.Tensor, dtype: torch.dtype = torch.float32,
           chunk_bytes: int = 1 << 20) -> torch.Tensor:
    """The weight [out, in] a LUT-GEMM triple stands for (the runtime's arithmetic, in float32), cast
    to `dtype`. A few input words at a time: each step's temporaries stay near `chunk_bytes` (a whole
    8B down_proj at once took ~3 GB of them), and each element's arithmetic does not depend on the chunk."""
    words, bits, out_features = binary.shape
    in_features = words * WORD_BITS
    group_size = in_features // alpha.shape[0]
    shifts = torch.arange(WORD_BITS, device=binary.device, dtype=torch.int32)
    weight = torch.empty((out_features, in_features), dtype=dtype, device=binary.device)
    step = max(1, chunk_bytes // (WORD_BITS * bits * out_features * 4))
    for begin in range(0, words, step):
        part = binary[begin: begin + step]
        code_bits = (part[:, None] >> shifts[None, :, None, None]) & 1  # [words, 32, b, out]
        signs = (2 * code_bits - 1).reshape(-1, bits, out_features).float()
        channels = torch.arange(begin * WORD_BITS, begin * WORD_BITS + signs.shape[0], device=binary.device)
        group_of = channels // group_size
        values = (alpha[group_of] * signs).sum(dim=1) + q_bias[group_of]  # [channels, out]
        weight[:, channels[0]: channels[-1] + 1] = values.t()
    return weight


class CheckpointWriter:
    """DIR/pytorch_model.bin in the fork's `--dump_quant` layout (every decoder Linear's weight
    replaced by binary / alpha / q_bias, everything else float16), streamed layer by layer; plus
    bitwidth_map.json when the bits differ between layers. Same interface as the shard writer."""

    FILE = "pytorch_model.bin"

    def __init__(self, out_dir: Path, checkpoint: Checkpoint, model_layout: LayerLayout, bits: list[int],
                 group_size: int, linear_tensors: Callable[[tuple, int], dict[str, TensorMeta]] | None = None):
        """`linear_tensors(shape, bits)`: what replaces a Linear's weight (LUT-GEMM's three tensors unless
        given: the packed SqueezeLLM checkpoint has another pair)."""
        self.out_dir, self.bits = out_dir, bits
        linear_tensors = linear_tensors or (lambda shape, b: layout(shape, b, group_size))
        plan: list[tuple[str, TensorMeta]] = []
        for name in model_layout.outside:
            plan.append((name, _as_stored(checkpoint.tensors[name])))
        self.tied_source = tied_embedding(checkpoint, model_layout)
        if self.tied_source:  # the fork's state dict names the tied head too; DecDEC's loader reads it
            plan.append(("lm_head.weight", _as_stored(checkpoint.tensors[self.tied_source])))
        linear_names = set()
        for layer in model_layout.layers:
            linear_names.update(layer.linears.values())
            for name in sorted([*layer.linears.values(), *layer.others.values()]):
                info = checkpoint.tensors[name]
                if name in linear_names:
                    base = name[: -len(".weight")]
                    plan += [(f"{base}.{key}", meta)
                             for key, meta in linear_tensors(info.shape, bits[layer.index]).items()]
                else:
                    plan.append((name, _as_stored(info)))
        self._state = StateDictWriter(out_dir / self.FILE, plan)
        self.expected, self.total_size = self._state.expected, self._state.total_size

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._state.write(name, tensor)
        if name == self.tied_source:
            self._state.write("lm_head.weight", tensor)

    def finish(self) -> None:
        self._state.finish()
        if len(set(self.bits)) > 1:
            (self.out_dir / "bitwidth_map.json").write_text(
                json.dumps({str(index): bits for index, bits in enumerate(self.bits)}, indent=1) + "\n")

    def close(self) -> None:
        self._state.close()


def _as_stored(info: TensorInfo) -> TensorMeta:
    return TensorMeta(info.shape, torch.float16 if info.dtype.is_floating_point else info.dtype)


def tied_embedding(checkpoint: Checkpoint, model_layout: LayerLayout) -> str | None:
    """The input embedding's name when the checkpoint has no LM head of its own (tied weights)."""
    if any(name.endswith("lm_head.weight") for name in model_layout.outside):
        return None
    return next((name for name in model_layout.outside if name.endswith("embed_tokens.weight")), None)


class DecodedCheckpoint(Checkpoint):
    """A model folder read as float16 weights, where a LUT-GEMM `pytorch_model.bin` (SPEC §7.6) or a packed
    SqueezeLLM one (SPEC §9.4: LUT[code]) is decoded Linear by Linear on demand: the folder the runtime
    loads is the folder evaluated. On a GPU (`device`) only the packed bytes cross to it and the decoded
    weight stays there: decoded on the host, an 8B folder's check ran at half the pace of reading the
    fake-quantized model."""

    def __init__(self, model_dir: Path, flag: str = "model", device: torch.device | str = "cpu"):
        super().__init__(model_dir, flag)
        self.device = torch.device(device)
        self._packed: dict[str, dict[str, TensorInfo]] = {}  # weight name -> its binary / alpha / q_bias
        for base in [name[: -len(".qweight")] for name in self.tensors if name.endswith(".qweight")]:
            # a packed SqueezeLLM checkpoint (SPEC §9.4): qweight [b, out, in/32] and lut<b> [out, 2^b]
            qweight = self.tensors.pop(f"{base}.qweight")
            bits = qweight.shape[0]
            if f"{base}.lut{bits}" not in self.tensors:
                raise InputError(f"{qweight.file}: {base}.qweight has no {base}.lut{bits}")
            shape = (qweight.shape[1], qweight.shape[2] * WORD_BITS)
            self._packed[f"{base}.weight"] = {"qweight": qweight, "lut": self.tensors.pop(f"{base}.lut{bits}")}
            self.tensors[f"{base}.weight"] = TensorInfo(f"{base}.weight", qweight.file, torch.float16, shape, -1,
                                                        2 * shape[0] * shape[1])
        for base in [name[: -len(".binary")] for name in self.tensors if name.endswith(".binary")]:
            parts = {"binary": self.tensors.pop(f"{base}.binary")}
            for key in ("alpha", "q_bias"):
                if f"{base}.{key}" not in self.tensors:
                    raise InputError(f"{parts['binary'].file}: {base}.binary has no {base}.{key}")
                parts[key] = self.tensors.pop(f"{base}.{key}")
            words, _, out_features = parts["binary"].shape
            shape = (out_features, words * WORD_BITS)
            self.tensors[f"{base}.weight"] = TensorInfo(f"{base}.weight", parts["binary"].file, torch.float16, shape,
                                                        -1, 2 * out_features * words * WORD_BITS)
            self._packed[f"{base}.weight"] = parts

    def read_raw(self, name: str, pin: bool = False) -> torch.Tensor:
        """As Checkpoint's; a decoded Linear comes on `device` (a fresh tensor there)."""
        parts = self._packed.get(name)
        if parts is None:
            return super().read_raw(name, pin)
        on_gpu = self.device.type == "cuda"
        stored = {key: self.read_info(info, on_gpu).to(self.device, non_blocking=True)  # only this Linear's bytes
                  for key, info in parts.items()}
        if "qweight" in stored:
            from common.quant.anyprec import unpack_codes
            codes = unpack_codes(stored["qweight"], self.tensors[name].shape[1])
            weight = torch.gather(stored["lut"].half(), 1, codes.long())
        else:
            weight = decode(stored["binary"], stored["alpha"], stored["q_bias"], torch.float16,
                            chunk_bytes=(64 << 20) if on_gpu else (1 << 20))
        if on_gpu:
            return weight  # on the device, where every caller takes it next
        return weight.pin_memory() if pin else weight
