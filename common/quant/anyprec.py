"""Any-Precision LLM's layouts for a SqueezeLLM model: its quantized folder (SPEC §9.3, what
conv_sqllm.py reads) and the packed checkpoint DecDEC's runtime loads (SPEC §9.4).

Packed codes: per bit plane (the most significant first) and output row, the plane's bits of 8 inputs
make a byte (input 8j in its top bit); the bytes of a row are then permuted so that each GPU thread of
a warp reads 4 consecutive bytes of its own as one little-endian int32.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.errors import InputError
from common.io.model_files import Checkpoint
from common.io.torchsave import TensorMeta
from common.layers import LayerLayout
from common.quant.lutgemm import CheckpointWriter

WARP_BYTES = 128  # 32 threads x 4 bytes


def check_packed_words(checkpoint: Checkpoint, layout: LayerLayout, flag: str) -> None:
    """Input error (naming `flag` and the tensor) unless every Linear packs into whole int32 words: checked
    before any work, and again by the writer."""
    for name in (name for layer in layout.layers for name in layer.linears.values()):
        in_features = checkpoint.tensors[name].shape[1]
        if in_features % 32:
            raise InputError(f"{flag}: tensor {name} has {in_features} input channels, not a multiple of 32, which "
                             "the packed SqueezeLLM checkpoint stores 32 to an int32 word")


def byte_order(total: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n(j) of SPEC §9.4: where byte j of a row's stream goes (whole warps of 128 bytes, then the rest
    spread over rest/4 threads)."""
    index = torch.arange(total, device=device)
    whole = WARP_BYTES * (total // WARP_BYTES)
    threads = torch.where(index < whole, torch.full_like(index, 32), torch.full_like(index, max(1, (total - whole) // 4)))
    local = torch.where(index < whole, index % WARP_BYTES, index - whole)
    base = torch.where(index < whole, index - index % WARP_BYTES, torch.full_like(index, whole))
    return base + 4 * (local % threads) + ((local // threads) ^ 3)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [bits, out, in/32] from codes [out, in] (values below 2^bits), on the codes' device.

    The 8-code groups are first put in the bytes' final order (P[n(j)] = B[j]: one gather of 8-byte
    words), then each plane's byte is ORed together a column of the group at a time, in uint8:
    an 8B layer in ~0.1 s on a GPU (whole int32 copies per plane and a scatter took ~2 s on 16 cores)."""
    out_features, in_features = codes.shape
    total = in_features // 8
    grouped = codes.to(torch.uint8).reshape(out_features, total, 8).contiguous()
    source = torch.empty(total, dtype=torch.long, device=codes.device)
    source[byte_order(total, codes.device)] = torch.arange(total, device=codes.device)  # P[m] = B[source[m]]
    grouped = grouped.view(torch.int64).squeeze(-1)[:, source].unsqueeze(-1).view(torch.uint8)
    planes = torch.zeros((bits, out_features, total), dtype=torch.uint8, device=codes.device)
    for plane in range(bits):
        shift = bits - 1 - plane
        for position in range(8):  # input 8j + position -> bit 7 - position of byte j
            planes[plane] |= ((grouped[:, :, position] >> shift) & 1) << (7 - position)
    return planes.view(torch.int32)  # 4 bytes of a row, little-endian, per int32


def unpack_codes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """codes uint8 [out, in] from qweight int32 [bits, out, in/32] (the inverse of `pack_codes`)."""
    bits, out_features, _ = qweight.shape
    permuted = qweight.contiguous().view(torch.uint8).reshape(bits, out_features, in_features // 8)
    streams = permuted[:, :, byte_order(in_features // 8, qweight.device)]  # B[j] = P[n(j)]
    shifts = torch.arange(7, -1, -1, device=qweight.device, dtype=torch.uint8)
    codes = torch.zeros((out_features, in_features // 8, 8), dtype=torch.uint8, device=qweight.device)
    for plane in range(bits):
        codes |= ((streams[plane, :, :, None] >> shifts) & 1) << (bits - 1 - plane)
    return codes.reshape(out_features, in_features)


def packed_layout(shape: tuple[int, ...], bits: int) -> dict[str, TensorMeta]:
    """The two tensors replacing a Linear's weight of `shape` [out, in]."""
    out_features, in_features = shape
    return {"qweight": TensorMeta((bits, out_features, in_features // 32), torch.int32),
            f"lut{bits}": TensorMeta((out_features, 2 ** bits), torch.float16)}


def anyprec_config(config: dict, bits: int, modules: list[str], prefix: str) -> dict:
    """config.json of the packed checkpoint: the original's plus the `anyprec` block ap_load reads."""
    return {**config, "anyprec": {
        "seed_precision": bits, "parent_precision": bits, "group_count": 1,
        "arch_config": {"model_name": prefix.rstrip("."), "layers_name": "layers", "module_names": modules}}}


def save_quantized_layer(folder: Path, index: int, bits: int, luts: dict[str, torch.Tensor],
                         codes: dict[str, torch.Tensor]) -> None:
    """`lut_<b>/l<i>.pt` and `weights/l<i>.pt` of SPEC §9.3 for one layer (NumPy float16 [out, 1, 2^b],
    uint8 [out, 1, in]), as Any-Precision writes them."""
    from common.io.torchsave import save_atomically
    for sub, values, dtype in ((f"lut_{bits}", luts, np.float16), ("weights", codes, np.uint8)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        arrays = {name: np.ascontiguousarray(tensor.cpu().numpy().astype(dtype)[:, None, :])
                  for name, tensor in values.items()}
        save_atomically(arrays, folder / sub / f"l{index}.pt")


class PackedCheckpointWriter(CheckpointWriter):
    """DIR/pytorch_model.bin of SPEC §9.4 (every decoder Linear's weight replaced by `qweight` and
    `lut<b>`, everything else float16), streamed layer by layer, and config.json with the anyprec block."""

    def __init__(self, out_dir: Path, checkpoint: Checkpoint, model_layout: LayerLayout, bits: int):
        check_packed_words(checkpoint, model_layout, str(out_dir))
        super().__init__(out_dir, checkpoint, model_layout, [bits] * len(model_layout.layers), 0, packed_layout)
        self.config = anyprec_config(checkpoint.config, bits, sorted(model_layout.layers[0].linears),
                                     model_layout.prefix)

    def finish(self) -> None:
        super().finish()
        (self.out_dir / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")


def packed_layer(luts: dict[str, torch.Tensor], codes: dict[str, torch.Tensor], bits: int, shift: int
                 ) -> dict[str, torch.Tensor]:
    """One layer's packed tensors ('<module>.qweight', '<module>.lut<b>') from its LUTs and codes (codes of
    a larger width are shifted down to `bits`, as SPEC §5 reads an upscaled folder)."""
    packed = {}
    for module, lut in luts.items():
        code = codes[module].reshape(codes[module].shape[0], -1)
        packed[f"{module}.qweight"] = pack_codes(code.to(torch.int32) >> shift, bits)
        packed[f"{module}.lut{bits}"] = lut.reshape(lut.shape[0], -1).half()
    return packed
