#!/usr/bin/env python3
"""The I/O floor: read every weight file of the given model directories once, sequentially
(safetensors shards, and the .pt files of an Any-Precision / SqueezeLLM folder's subfolders).

    python bench/read_floor.py /tmp/bench/original /tmp/bench/sqllm3
    BLOCK_MB=8 python bench/read_floor.py /tmp/bench/original     # in 8 MB reads (the read-ahead's)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

BLOCK = int(os.environ.get("BLOCK_MB", "64")) << 20


def main() -> None:
    files = [f for d in sys.argv[1:] for pattern in ("*.safetensors", "*.pt") for f in sorted(Path(d).rglob(pattern))]
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    total = 0
    started = time.time()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while (got := handle.readinto(view)) > 0:
                total += got
    wall = time.time() - started
    print(f"read {total / 1e9:.1f} GB in {wall:.1f} s ({total / 1e9 / wall:.2f} GB/s) in {BLOCK >> 20} MB reads")


if __name__ == "__main__":
    main()
