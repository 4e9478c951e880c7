"""Plain-PyTorch simulation of DecDEC's decode-time residual correction (SPEC §1, §4).

Per token and Linear: split the input channels in chunks of 1024; in each chunk pick
floor(k_chunk · len / 1024) channels by the runtime's 32-bucket approximation of top-k;
add x[sel] · R̂[:, sel]ᵀ to the quantized output. `exact` (true top-k) and `random`
selections are there for comparison.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 1024
BUCKETS = 32
MAX_RUNTIME_K_CHUNK = 367  # the kernel aborts above this with fp16/bf16 activations
SELECTIONS = ("buckets", "exact", "random")


def bucket_edges(thresholds: torch.Tensor, k: int) -> torch.Tensor:
    """fp16 [32] lower edges e_0..e_31, computed as the kernel does (e_0 = a, e_15 = b, e_31 = 0)."""
    a = thresholds[0].half()
    b = thresholds[k - 1].half()
    step = (b - a).half().float()
    index = torch.arange(16, device=thresholds.device, dtype=torch.float32)
    upper = (a.float() + ((step * index) / 15).half().float()).half()
    lower = ((b.float() * (31 - torch.arange(16, 32, device=thresholds.device, dtype=torch.float32))) / 16).half()
    return torch.cat([upper, lower])


def bucket_of(magnitude: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bucket index per value: the first i with |x| >= e_i (edges non-increasing, compared in fp16)."""
    return (magnitude.half()[..., None] < edges).sum(-1)


def select_buckets(magnitude: torch.Tensor, edges: torch.Tensor, quota: int) -> torch.Tensor:
    """bool [N, L] for one chunk: whole buckets from 0 down, the rest of the last bucket reached
    in the kernel's scan order (ascending (j - t) mod L for bucket t)."""
    tokens, length = magnitude.shape
    if quota <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    bucket = bucket_of(magnitude, edges).clamp_(max=BUCKETS - 1)
    counts = torch.zeros(tokens, BUCKETS, dtype=torch.long, device=magnitude.device)
    counts.scatter_add_(1, bucket, torch.ones_like(bucket))
    cumulative = counts.cumsum(1)
    last = (cumulative < quota).sum(1).clamp_(max=BUCKETS - 1)  # bucket t where the quota is reached
    before = torch.where(last > 0, cumulative.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0],
                         torch.zeros_like(last))
    remaining = quota - before
    positions = (torch.arange(length, device=magnitude.device)[None, :] + last[:, None]) % length
    in_last = (bucket == last[:, None]).gather(1, positions)  # in scan order
    taken = in_last & (in_last.cumsum(1) <= remaining[:, None])
    selected = bucket < last[:, None]
    return selected.scatter(1, positions, taken | selected.gather(1, positions))


def select_channels(x: torch.Tensor, thresholds: torch.Tensor, k_chunk: int, selection: str,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """bool mask [N, in] of the channels DecDEC corrects for each token of x [N, in]."""
    tokens, in_features = x.shape
    mask = torch.zeros(tokens, in_features, dtype=torch.bool, device=x.device)
    k = (k_chunk * in_features) // CHUNK
    if k_chunk <= 0 or k == 0:
        return mask
    magnitude = x.abs()
    edges = bucket_edges(thresholds.to(x.device), k) if selection == "buckets" else None
    for begin in range(0, in_features, CHUNK):
        part = magnitude[:, begin: begin + CHUNK]
        length = part.shape[1]
        quota = (k_chunk * length) // CHUNK
        if quota <= 0:
            continue
        if selection == "buckets":
            chosen = select_buckets(part, edges, quota)
        else:
            scores = part.float() if selection == "exact" else torch.rand(
                part.shape, generator=generator, device=generator.device if generator else part.device)
            top = scores.topk(min(quota, length), dim=1).indices
            chosen = torch.zeros_like(part, dtype=torch.bool).scatter_(1, top.to(part.device), True)
        mask[:, begin: begin + length] = chosen
    return mask


class SimulatedLinear(nn.Module):
    """A Linear computing x·W_fqᵀ (+ b) + x[sel]·R̂[:, sel]ᵀ, with a settable DecDEC config."""

    def __init__(self, linear: nn.Linear, residual: torch.Tensor, thresholds: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.residual = residual.to(linear.weight.device, linear.weight.dtype)
        self.thresholds = thresholds.to(linear.weight.device)
        self.k_chunk = 0
        self.selection = "buckets"
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.k_chunk <= 0:
            return out
        flat = x.reshape(-1, x.shape[-1])
        mask = select_channels(flat, self.thresholds, self.k_chunk, self.selection, self.generator)
        correction = F.linear(flat * mask.to(flat.dtype), self.residual)
        return out + correction.reshape(out.shape)
