#!/usr/bin/env python3
"""How fast can one 8B-shaped layer of an Any-Precision folder (3-bit codes, torch.save'd NumPy
arrays) be loaded, and how much does that stall the main thread's device work?

    python bench/sqllm_tables.py /tmp/tables      # writes 2 layers there first

Variants: in a reader thread (torch's weights-only unpickler holds the GIL), in a child process
whose arrays come back through a pipe, and through torch's shared memory.
"""
from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.quant.sqllm import QuantizedFolder  # noqa: E402

SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
          "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
          "mlp.down_proj": (4096, 14336)}


def write_folder(out: Path, layers: int) -> None:
    (out / "lut_3").mkdir(parents=True, exist_ok=True)
    (out / "weights").mkdir(parents=True, exist_ok=True)
    for index in range(layers):
        luts = {m: torch.randn(r, 1, 8).sort(dim=-1).values.numpy() for m, (r, c) in SHAPES.items()}
        codes = {m: torch.randint(0, 8, (r, 1, c), dtype=torch.uint8).numpy() for m, (r, c) in SHAPES.items()}
        torch.save(luts, out / "lut_3" / f"l{index}.pt")
        torch.save(codes, out / "weights" / f"l{index}.pt")


def as_tensors(folder: QuantizedFolder, index: int):
    return folder.read_layer(index)


def main() -> None:
    out = Path(sys.argv[1])
    layers = 4
    if not (out / "weights" / f"l{layers - 1}.pt").exists():
        write_folder(out, layers)
    folder = QuantizedFolder.open(out, None)
    print("/dev/shm:", __import__("shutil").disk_usage("/dev/shm"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(256, 256, device=device)

    def launches(seconds: float) -> int:
        count, end = 0, time.time() + seconds
        while time.time() < end:
            x.add_(0.0)
            count += 1
        return count
    print(f"alone: {launches(1.0)} small ops per second")
    for label, reader in [("thread", None), ("thread, 0.1 ms switch interval", "fast-switch"),
                          ("process+pipe", "pipe"), ("process+shm", "shm")]:
        pool = None
        sys.setswitchinterval(1e-4 if reader == "fast-switch" else 0.005)
        if reader in ("pipe", "shm"):
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            pool.submit(int).result()
        if reader == "pipe":
            from common.quant.sqllm import TableReader
            tables = TableReader(folder, layers, workers=1)
            tables.read_layer(0)
            load = tables.read_layer
        elif reader == "shm":
            pool.submit(as_tensors, folder, 0).result()
            load = lambda index: pool.submit(as_tensors, folder, index).result()  # noqa: E731
        else:
            load = folder.read_layer
        load(0)
        done = []

        def run() -> None:
            begin = time.time()
            for index in range(1, layers):
                load(index)
            done.append(time.time() - begin)
        thread = threading.Thread(target=run)
        thread.start()
        ops = 0
        begin = time.time()
        while thread.is_alive():
            ops += launches(0.05)
        thread.join()
        print(f"{label}: {done[0] / (layers - 1):.2f} s per layer; main thread meanwhile "
              f"{ops / (time.time() - begin):.0f} small ops per second")
        if pool:
            pool.shutdown()


if __name__ == "__main__":
    main()
