"""The residual quantizer of SPEC §3 as pure, vectorized torch: grid search, packing, decoding.

Every function works on a whole `[out, in]` matrix on any device; rows are processed in
chunks only to bound the temporary memory. The only Python loop is over the G scale
candidates, each step a handful of whole-chunk kernels.
"""
from __future__ import annotations

import torch

from common.background import setting_up

NIBBLE_OFFSET = 8
ROWS_PER_PACK = 8


def max_level(bits: int) -> int:
    """Largest code magnitude P of a signed symmetric b-bit code: 7 for 4 bit, 1 for 2, 127 for 8."""
    return (2 ** bits - 1) // 2


def row_scale_bound(residual: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """m_r = fp16(max_j |R[r, j]| / P): the largest scale the search considers, per row."""
    return (residual.abs().amax(dim=1).float() / max_level(bits)).half()


def candidate_scales(bound: torch.Tensor, grid_size: int) -> torch.Tensor:
    """float32 [rows, G]: bit-for-bit what the reference's `torch.linspace(m / G, m, G)` gives on
    the CPU, m being the fp16 bound (so m / G is an fp16 division, rounded to fp16).

    linspace takes start + step*i for the first half and end - step*(G-1-i) for the rest,
    each rounded once; float64 arithmetic rounded to float32 reproduces that exactly.
    """
    end = bound.float()
    start = (bound.float() / grid_size).half().float()
    step = ((end - start) / (grid_size - 1)).double() if grid_size > 1 else torch.zeros_like(end.double())
    index = torch.arange(grid_size, device=bound.device, dtype=torch.float64)
    from_start = start.double()[:, None] + step[:, None] * index
    from_end = end.double()[:, None] - step[:, None] * (grid_size - 1 - index)
    return torch.where(index < grid_size // 2, from_start, from_end).float()


def default_row_chunk(in_features: int, device: torch.device) -> int:
    """Rows per chunk: ~64 MB of float32 work on a GPU, ~2 MB on a CPU (the 32 candidates re-read a
    chunk 7 times each: on the 2-core test machine 2 MB ran the grid 27 % faster than 4 MB). While a
    set-up thread runs beside on a CPU, ~32 MB: each kernel launch then waits for the GIL, so fewer,
    larger ones (a TinyLlama layer's grid beside it: 2 MB chunks 12.3 s for the one pass, 32 MB 11.0 s)."""
    if device.type == "cuda":
        budget = 16 << 20
    else:
        budget = (8 << 20) if setting_up() else (1 << 19)
    return max(1, budget // max(1, in_features))


@torch.no_grad()
def quantize_residual(residual: torch.Tensor, bits: int = 4, grid_size: int = 32,
                      row_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid-search a per-row scale and quantize the fp16 residual to signed b-bit codes.

    Returns (codes int8 [out, in] in [-P, P], scales fp16 [out]). For each row, the scale is
    the candidate c = m·t/G (t = 1..G) with the smallest mean squared error
    mean_j (R - clamp(round(R / c), -P, P)·c)², the first on ties. A row of zeros gets scale 0
    and codes 0 (never NaN).
    """
    levels = max_level(bits)
    out_features, in_features = residual.shape
    codes = torch.empty(residual.shape, dtype=torch.int8, device=residual.device)
    scales = torch.empty(out_features, dtype=torch.float16, device=residual.device)
    chunk = row_chunk or default_row_chunk(in_features, residual.device)
    for begin in range(0, out_features, chunk):
        rows = residual[begin: begin + chunk].float()
        bound = row_scale_bound(rows, bits)
        zero_rows = bound == 0
        candidates = candidate_scales(torch.where(zero_rows, torch.ones_like(bound), bound), grid_size)
        best_scale = _best_candidate(rows, candidates, levels)
        quantized = torch.div(rows, best_scale[:, None]).round_().clamp_(-levels, levels)
        quantized[zero_rows] = 0
        codes[begin: begin + chunk] = quantized.to(torch.int8)
        scales[begin: begin + chunk] = torch.where(zero_rows, torch.zeros_like(best_scale), best_scale).half()
    return codes, scales


def _best_candidate(rows: torch.Tensor, candidates: torch.Tensor, levels: int) -> torch.Tensor:
    """float32 [rows]: the candidate scale with the smallest reconstruction MSE per row."""
    # every dtype explicit: torch's default dtype is process-wide, and transformers changes it while a
    # set-up thread builds a model (a bfloat16 `err` here picked other scales for ~9 % of rows)
    work = torch.empty_like(rows)
    best_err = torch.full((rows.shape[0],), float("inf"), dtype=torch.float32, device=rows.device)
    best_scale = candidates[:, 0].clone()
    err = torch.empty_like(best_err)
    for t in range(candidates.shape[1]):
        scale = candidates[:, t: t + 1]
        torch.div(rows, scale, out=work)
        work.round_().clamp_(-levels, levels).mul_(scale)
        torch.sub(rows, work, out=work).square_()
        torch.mean(work, dim=1, out=err)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale[:, 0], best_scale)
    return best_scale


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int32 [in, out/8]: cheatsheet[j, c] = sum_k (codes[8c + k, j] + 8) << 4k (SPEC §3.3)."""
    out_features, in_features = codes.shape
    rows = codes.reshape(out_features // ROWS_PER_PACK, ROWS_PER_PACK, in_features)
    # Nibble k of each word is OR-ed in place: one int32 word array and one row group in flight, where
    # shifting a whole int32 copy of the codes and summing it moved ~4x the memory (5x slower on a CPU).
    # Shifting into bit 31 wraps as intended: the result is the bit pattern.
    packed = torch.zeros((out_features // ROWS_PER_PACK, in_features), dtype=torch.int32, device=codes.device)
    for k in range(ROWS_PER_PACK):
        packed |= rows[:, k].to(torch.int32, copy=True).add_(NIBBLE_OFFSET).bitwise_left_shift_(4 * k)
    return packed.t().contiguous()


def reorder_scales(scales: torch.Tensor) -> torch.Tensor:
    """reordered[k · out/8 + c] = scales[8c + k] (SPEC §3.4)."""
    return scales.reshape(-1, ROWS_PER_PACK).t().contiguous().reshape(-1)


def unpack_nibbles(cheatsheet: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] from a packed cheatsheet (inverse of pack_nibbles)."""
    in_features, groups = cheatsheet.shape
    shifts = (4 * torch.arange(ROWS_PER_PACK, device=cheatsheet.device, dtype=torch.int32))
    nibbles = (cheatsheet.t()[:, None, :] >> shifts[None, :, None]) & 0xF  # [out/8, 8, in]
    return (nibbles - NIBBLE_OFFSET).reshape(groups * ROWS_PER_PACK, in_features).to(torch.int8)


def restore_scales(reordered: torch.Tensor) -> torch.Tensor:
    """Per-row scales [out] from reordered scales (inverse of reorder_scales)."""
    return reordered.reshape(ROWS_PER_PACK, -1).t().contiguous().reshape(-1)


def decode_cheatsheet(cheatsheet: torch.Tensor, reordered_scales: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """R̂[8c + k, j] = (nibble - 8) · reordered_scales[k · out/8 + c] (SPEC §3.5)."""
    codes = unpack_nibbles(cheatsheet)
    return codes.to(dtype) * restore_scales(reordered_scales).to(dtype)[:, None]
