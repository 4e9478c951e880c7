"""Give freed memory back to the operating system between layers.

glibc keeps the heap pages of freed tensors for reuse; with a layer's tensors of many sizes
allocated and freed from several threads, the process's resident memory grows layer after
layer (0.1 GB per TinyLlama layer on a CPU) though nothing is held. `malloc_trim` returns
those pages; elsewhere (no glibc) this does nothing.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim from the symbols already loaded in this process. (ctypes.util.find_library
    would run `ldconfig -p` in a child: a fork of this whole process, mid-run.)"""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
