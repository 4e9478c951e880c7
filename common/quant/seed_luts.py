"""SqueezeLLM's seed LUTs (SPEC §9.2): per output row, a sensitivity-weighted 1-D k-means of the row's
float16 weights, with flash1dkmeans, the library Any-Precision LLM calls, and its arguments.

Rows are independent, so one numba kernel runs them over every core (`prange`), each row seeding its
own k-means++ draw with `random_state`: the result does not depend on the thread count or on which
thread takes a row. The kernel lets the GIL go, so a layer's k-means can run beside the GPU's work on
the next layer. numba caches the compiled kernel on disk (`cache=True`); `warm_up()` compiles it (10-30 s,
once per install) or loads it, beside the sensitivity on a GPU.
"""
from __future__ import annotations

import numpy as np
import torch

from common.errors import InputError

MAX_ITER = 50  # Any-Precision's


try:
    import numba
    from flash1dkmeans import numba_kmeans_1d_k_cluster
except ImportError:  # only SqueezeLLM quantization needs them: say so when it is asked for
    numba = None


def require_kmeans() -> None:
    """An input error naming the package and its install command unless flash1dkmeans and numba import."""
    if numba is None:
        raise InputError("SqueezeLLM quantization needs the flash1dkmeans package (and numba): "
                         "pip install flash1dkmeans")


if numba is not None:
    @numba.njit(inline="always")
    def _stable_argsort(half_bits, order, scratch):
        """`order` = np.argsort(x, kind="stable") of the float16 row whose bit patterns are `half_bits`:
        an LSD radix sort of 16-bit keys that order as the values do, two passes of a byte. It does in
        ~8 ns an element what a comparison sort did in ~75 (numba's quicksort of the float32 row, 85 %
        of the k-means' time); the order of ties only changes the float64 prefix sums' rounding."""
        n = half_bits.shape[0]
        keys = np.empty(n, dtype=np.uint16)
        for i in range(n):
            key = half_bits[i]
            if key == 0x8000:  # -0 is 0
                key = 0
            keys[i] = ~key if key & 0x8000 else key | 0x8000
            order[i] = i
        counts = np.empty(257, dtype=np.int64)
        source, target = order, scratch
        for shift in (0, 8):
            counts[:] = 0
            for i in range(n):
                counts[((keys[i] >> shift) & 0xFF) + 1] += 1
            for b in range(256):
                counts[b + 1] += counts[b]
            for i in range(n):
                j = source[i]
                b = (keys[j] >> shift) & 0xFF
                target[counts[b]] = j
                counts[b] += 1
            source, target = target, source
        # two passes: the result is back in `order`

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _seed_rows(half_bits, sensitivity_bits, half_to_float, n_clusters, max_iter, random_state, luts, codes,
                   finite):
        """Each row's k-means from the raw 16-bit patterns of its float16 weights and bfloat16 sensitivity,
        turned into float32 here (a table lookup and a shift), on every core rather than in one thread."""
        for row in numba.prange(half_bits.shape[0]):
            bits = half_bits[row]
            n = bits.shape[0]
            x = np.empty(n, dtype=np.float32)
            f_bits = np.empty(n, dtype=np.uint32)
            finite[row] = True
            for i in range(n):
                h = bits[i]
                if (h & 0x7C00) == 0x7C00:  # Inf or NaN
                    finite[row] = False
                x[i] = half_to_float[h]
                f_bits[i] = (np.uint32(sensitivity_bits[row, i]) << 16) if h & 0x7FFF else 0  # f = F·(x ≠ 0)
            if not finite[row]:
                continue
            f = f_bits.view(np.float32)
            order = np.empty(n, dtype=np.int64)
            _stable_argsort(bits, order, np.empty(n, dtype=np.int64))
            sorted_x = x[order]
            sorted_f = f[order].astype(np.float64)
            if sorted_f.sum() == 0:
                sorted_f = np.ones_like(sorted_f)
            x64 = sorted_x.astype(np.float64)
            weighted = sorted_f * x64
            centroids, borders = numba_kmeans_1d_k_cluster(
                sorted_x, n_clusters, max_iter, np.cumsum(sorted_f), np.cumsum(weighted), np.cumsum(weighted * x64),
                0, n, random_state)
            luts[row] = centroids
            for cluster in range(n_clusters):
                codes[row, order[borders[cluster]:borders[cluster + 1]]] = cluster


_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def seed_luts(weight: torch.Tensor, sensitivity: torch.Tensor, bits: int, random_state: int = 0,
              where: str = "the weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(LUT float16 [out, 2^bits], codes uint8 [out, in]) of one Linear: `weight` its float16 weights,
    `sensitivity` its F in bfloat16 (as SPEC §9.1 rounds it), both on the CPU. A NaN or Inf weight is an
    input error naming `where`."""
    require_kmeans()
    if weight.dtype != torch.float16 or sensitivity.dtype != torch.bfloat16 or weight.shape != sensitivity.shape:
        raise ValueError(f"seed_luts takes float16 weights and bfloat16 sensitivity of one shape, got "
                         f"{weight.dtype} {list(weight.shape)} and {sensitivity.dtype} {list(sensitivity.shape)}")
    rows, columns = weight.shape
    n_clusters = 2 ** bits
    luts = np.empty((rows, n_clusters), dtype=np.float64)
    codes = np.empty((rows, columns), dtype=np.uint8)
    finite = np.empty(rows, dtype=np.bool_)
    _seed_rows(_raw_bits(weight), _raw_bits(sensitivity), _HALF_TO_FLOAT, n_clusters, MAX_ITER, random_state, luts,
               codes, finite)
    if not finite.all():
        raise InputError(f"{where} holds NaN or Inf")
    return torch.from_numpy(luts.astype(np.float32).astype(np.float16)), torch.from_numpy(codes)


def _raw_bits(tensor: torch.Tensor) -> np.ndarray:
    """The 16-bit patterns of a float16 / bfloat16 CPU tensor, as uint16 NumPy (no copy when contiguous)."""
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


def threads() -> int:
    """The threads the row kernel runs on (numba's, every core unless NUMBA_NUM_THREADS says otherwise)."""
    require_kmeans()
    return numba.get_num_threads()


def warm_up() -> None:
    """Compile (or load from numba's cache) the row kernel on a tiny problem."""
    seed_luts(torch.linspace(-1, 1, 64).half().reshape(2, 32), torch.ones((2, 32), dtype=torch.bfloat16), 2)
