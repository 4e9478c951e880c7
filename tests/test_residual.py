"""The SPEC §3 math against an independent, row-by-row reimplementation of the reference."""
from __future__ import annotations

import pytest
import torch

from common.quant.residual import (candidate_scales, decode_cheatsheet, pack_nibbles, quantize_residual,
                             reorder_scales, restore_scales, unpack_nibbles)


def reference_row(row: torch.Tensor, grid: int, levels: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The reference's arithmetic for one fp16 row: (fp16 scale, codes, best mse).

    As in DecDEC's cheatsheet.py: the bound is an fp16 tensor, so `bound / grid` is an fp16
    division, and linspace runs in the default float32."""
    bound = torch.max(torch.abs(row)) / levels
    if bound == 0:
        return torch.tensor(0.0, dtype=torch.float16), torch.zeros_like(row, dtype=torch.int8), 0.0
    values = row.float()
    best = None
    for scale in torch.linspace(bound / grid, bound, grid):
        codes = torch.clamp(torch.round(values / scale), -levels, levels)
        err = ((values - codes * scale) ** 2).mean()
        if best is None or err < best[0]:
            best = (err, scale, codes)
    return best[1].half(), best[2].to(torch.int8), float(best[0])


def random_residual(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.exp(torch.randn(rows, 1, generator=generator) * 2) * 1e-3
    residual = (torch.randn(rows, cols, generator=generator) * magnitudes)
    residual[:, :3] *= 20  # a few outlier columns, as quantization residuals have
    residual[5] = 0  # an all-zero row must not give NaN
    return residual.half()


@pytest.mark.parametrize("bits,grid", [(4, 32), (2, 32), (8, 32), (4, 7)])
def test_grid_search_matches_reference_rows(bits, grid):
    residual = random_residual(48, 96, seed=bits * 100 + grid)
    codes, scales = quantize_residual(residual, bits=bits, grid_size=grid, row_chunk=13)
    levels = (2 ** bits - 1) // 2
    for r in range(residual.shape[0]):
        scale, row_codes, _ = reference_row(residual[r], grid, levels)
        assert scales[r].item() == scale.item(), r
        assert torch.equal(codes[r], row_codes), r
    assert torch.isfinite(scales.float()).all() and scales[5] == 0 and (codes[5] == 0).all()
    assert codes.abs().max() <= levels


def test_chosen_scale_has_the_smallest_error_of_all_candidates():
    residual = random_residual(32, 64, seed=3)
    codes, scales = quantize_residual(residual)
    values = residual.float()
    for r in range(residual.shape[0]):
        if scales[r] == 0:
            continue
        _, _, best = reference_row(residual[r], 32, 7)
        chosen = ((values[r] - codes[r].float() * scales[r].float()) ** 2).mean().item()
        # the stored scale is the fp16 rounding of the best float32 candidate
        assert chosen <= best * 1.01 + 1e-12


def test_candidates_equal_cpu_linspace_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    # magnitudes from 1e-6 up: small bounds make m / G an fp16 subnormal, which the reference rounds
    bounds = (torch.rand(3000, generator=generator) * torch.exp(torch.randn(3000, generator=generator) * 4)).half()
    bounds = bounds[(bounds > 1e-6) & torch.isfinite(bounds)]
    assert (bounds < 2 ** -9).sum() > 100
    for grid in (32, 33, 64):
        expected = torch.stack([torch.linspace(b / grid, b, grid) for b in bounds])
        assert torch.equal(candidate_scales(bounds, grid), expected)


def test_packing_layout_on_a_hand_made_matrix():
    out_features, in_features = 16, 3
    codes = torch.tensor([[((r * 3 + j) % 15) - 7 for j in range(in_features)] for r in range(out_features)],
                         dtype=torch.int8)
    packed = pack_nibbles(codes)
    assert packed.shape == (in_features, out_features // 8) and packed.dtype == torch.int32
    for j in range(in_features):
        for c in range(out_features // 8):
            word = sum((int(codes[8 * c + k, j]) + 8) << (4 * k) for k in range(8))
            expected = word - (1 << 32) if word >= (1 << 31) else word
            assert int(packed[j, c]) == expected
    assert torch.equal(unpack_nibbles(packed), codes)


def test_scale_order():
    scales = torch.arange(24, dtype=torch.float16)
    reordered = reorder_scales(scales)
    groups = 24 // 8
    for k in range(8):
        for c in range(groups):
            assert reordered[k * groups + c] == scales[8 * c + k]
    assert torch.equal(restore_scales(reordered), scales)


def test_decode_is_codes_times_row_scale():
    residual = random_residual(40, 24, seed=9)
    codes, scales = quantize_residual(residual)
    decoded = decode_cheatsheet(pack_nibbles(codes), reorder_scales(scales))
    assert torch.equal(decoded, codes.float() * scales.float()[:, None])
    # 4-bit codes with a grid-searched scale: the error is a fraction of the residual's energy
    error = (decoded - residual.float()).norm() / residual.float().norm()
    assert error < 0.2


@pytest.mark.parametrize("default_dtype", [torch.bfloat16, torch.float64])
def test_stage_bytes_do_not_depend_on_torch_defaults_threads_or_chunks(default_dtype):
    """Concurrency may move work in time, never change its arithmetic (issue 22). torch's default dtype
    is process-wide, and transformers sets it while a set-up thread builds a model: with a bfloat16
    default the grid search once kept its errors in bfloat16 and picked other scales. Neither that, nor
    the thread count, nor the row chunk may change a code or a scale; nor the RTN / LUT-GEMM stage's."""
    from common.quant.awq import LayerTransforms, Quantizer, layer_outputs
    residual = random_residual(96, 512, seed=3)
    weights = {"mlp.up_proj.weight": (torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) / 8).half()}

    def stages(chunk: int | None) -> list[torch.Tensor]:
        codes, scales = quantize_residual(residual, row_chunk=chunk)
        outputs = layer_outputs(dict(weights), LayerTransforms(), ["mlp.up_proj"], Quantizer(3, 32),
                                {"fakequant", "real"}, "test")
        return [codes, scales, *outputs["fakequant"].values(), *outputs["real"].values()]

    expected = stages(None)
    threads, previous = torch.get_num_threads(), torch.get_default_dtype()
    try:
        torch.set_default_dtype(default_dtype)
        for count in (1, threads):
            torch.set_num_threads(count)
            for chunk in (None, 1, 7, 96):
                got = stages(chunk)
                assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected)), (count, chunk)
    finally:
        torch.set_default_dtype(previous)
        torch.set_num_threads(threads)
