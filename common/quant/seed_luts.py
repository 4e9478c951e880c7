"""SqueezeLLM's seed LUTs (SPEC §9.2): per output row, a sensitivity-weighted 1-D k-means of the row's
float16 weights, with flash1dkmeans, the library Any-Precision LLM calls, and its arguments.

Rows are independent, so one numba kernel runs them over every core (`prange`), each row seeding its
own k-means++ draw with `random_state`: the result does not depend on the thread count or on which
thread takes a row. The kernel lets the GIL go, so a layer's k-means can run beside other work. numba caches the compiled kernel on disk (`cache=True`); `warm_up()` compiles or
loads it beside other set-up work, so no layer waits for it.
"""
from __future__ import annotations

import numpy as np

from common.errors import InputError

MAX_ITER = 50  # Any-Precision's


try:
    import numba
    from flash1dkmeans import numba_kmeans_1d_k_cluster
except ImportError:  # only SqueezeLLM quantization needs them: say so when it is asked for
    numba = None


def _require_flash1dkmeans() -> None:
    if numba is None:
        raise InputError("SqueezeLLM quantization needs the flash1dkmeans package (and numba): "
                         "pip install flash1dkmeans")


if numba is not None:
    @numba.njit(inline="always")
    def _stable_argsort(half_bits, order, scratch):
        """`order` = np.argsort(x, kind="stable") of the float16 row whose bit patterns are `half_bits`:
        an LSD radix sort of 16-bit keys that order as the values do, two passes of a byte. It does in
        ~6 ns an element what a comparison sort did in ~75 (numba's quicksort of the float32 row, 85 %
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
    def _seed_rows(half_bits, weights, sensitivity, n_clusters, max_iter, random_state, luts, codes):
        for row in numba.prange(weights.shape[0]):
            x = weights[row]
            f = sensitivity[row] * (x != 0)
            order = np.empty(x.shape[0], dtype=np.int64)
            _stable_argsort(half_bits[row], order, np.empty(x.shape[0], dtype=np.int64))
            sorted_x = x[order]
            sorted_f = f[order].astype(np.float64)
            if sorted_f.sum() == 0:
                sorted_f = np.ones_like(sorted_f)
            x64 = sorted_x.astype(np.float64)
            weighted = sorted_f * x64
            centroids, borders = numba_kmeans_1d_k_cluster(
                sorted_x, n_clusters, max_iter, np.cumsum(sorted_f), np.cumsum(weighted), np.cumsum(weighted * x64),
                0, x.shape[0], random_state)
            luts[row] = centroids
            for cluster in range(n_clusters):
                codes[row, order[borders[cluster]:borders[cluster + 1]]] = cluster


def seed_luts(weight: np.ndarray, sensitivity: np.ndarray, bits: int, random_state: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """(LUT float16 [out, 2^bits], codes uint8 [out, in]) of one Linear: `weight` its float16 weights,
    `sensitivity` F of the same shape (any float dtype; used as float32)."""
    rows, columns = weight.shape
    n_clusters = 2 ** bits
    half = np.ascontiguousarray(weight, dtype=np.float16)
    x = half.astype(np.float32)
    f = np.ascontiguousarray(sensitivity, dtype=np.float32)
    _require_flash1dkmeans()
    luts = np.empty((rows, n_clusters), dtype=np.float64)
    codes = np.empty((rows, columns), dtype=np.uint8)
    _seed_rows(half.view(np.uint16), x, f, n_clusters, MAX_ITER, random_state, luts, codes)
    return luts.astype(np.float32).astype(np.float16), codes


def threads() -> int:
    """The threads the row kernel runs on (numba's, every core unless NUMBA_NUM_THREADS says otherwise)."""
    _require_flash1dkmeans()
    return numba.get_num_threads()


def warm_up() -> None:
    """Compile (or load from numba's cache) the row kernel on a tiny problem."""
    seed_luts(np.linspace(-1, 1, 64, dtype=np.float16).reshape(2, 32), np.ones((2, 32), np.float32), 2)
