#!/usr/bin/env python3
"""Run one command from a cold page cache and report wall time, peak host RSS and peak GPU memory.

    python bench/measure.py --label cheatsheet -- python cheatsheet.py ...

Peak RSS is the largest sum of RSS over the command's process tree (polled every 0.1 s with
psutil, so worker processes count), and never less than the child's ru_maxrss; at that peak each
process's RSS and its shared part (e.g. shared-memory tensors, counted in every process mapping
them) are recorded. GPU memory is the device's used memory polled with nvidia-smi every 0.1 s (so it
includes the CUDA context). Also the host's memory in use (MemTotal - MemAvailable, page cache
excluded, shared memory counted once) at its peak, less what was in use before the command, and the
disks' reads in each second of the run (GB). Appends a JSON line to --log.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def host_used_bytes() -> int:
    """MemTotal - MemAvailable: what processes hold, shared memory once, the page cache not."""
    fields = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


def disk_read_bytes() -> int | None:
    try:
        import psutil
        return psutil.disk_io_counters().read_bytes
    except Exception:  # no psutil, or no disks it can see
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True)
    parser.add_argument("--log", default=None)
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache first")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    cold = False if args.warm else drop_caches()
    baseline = gpu_used_mib()
    peak = [baseline or 0]
    tree_rss = [0]
    at_peak: list = []  # (process, RSS GiB, of which shared GiB) when the tree's RSS peaked
    done = threading.Event()
    host_before = host_used_bytes()
    host_peak = [host_before]
    reads_by_second: list[int] = []  # cumulative disk reads at each whole second of the run
    reads_before = disk_read_bytes()
    started = time.time()
    process = subprocess.Popen(command)

    def poll() -> None:
        try:
            import psutil
            root = psutil.Process(process.pid)
        except (ImportError, OSError):
            root = None
        while not done.wait(0.1):
            host_peak[0] = max(host_peak[0], host_used_bytes())
            if reads_before is not None and time.time() - started >= len(reads_by_second) + 1:
                reads_by_second.append(disk_read_bytes() - reads_before)
            used = gpu_used_mib() if baseline is not None else None
            if used is not None:
                peak[0] = max(peak[0], used)
            if root is not None:
                try:
                    members = [root] + root.children(recursive=True)
                    infos = [(p, p.memory_info()) for p in members]
                    total = sum(info.rss for _, info in infos)
                    if total > tree_rss[0]:
                        tree_rss[0] = total
                        at_peak[:] = [(" ".join(p.cmdline()[:3])[:70], round(info.rss / 2 ** 30, 3),
                                       round(info.shared / 2 ** 30, 3)) for p, info in infos]
                except Exception:  # processes come and go while we look
                    pass
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    returncode = process.wait()
    wall = time.time() - started
    done.set()
    thread.join()
    result = subprocess.CompletedProcess(command, returncode)
    record = {"label": args.label, "wall_s": round(wall, 2), "rc": result.returncode, "cold_cache": cold,
              "peak_rss_gib": round(max(tree_rss[0] / 2 ** 30,
                                        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20), 3),
              "peak_gpu_gib": round((peak[0] - (baseline or 0)) / 1024, 2) if baseline is not None else None,
              "rss_at_peak_by_process": at_peak,
              "host_used_gib": round((host_peak[0] - host_before) / 2 ** 30, 3),
              "disk_read_gb_each_s": [round((b - a) / 1e9, 2) for a, b in zip([0] + reads_by_second, reads_by_second)],
              "command": " ".join(command)}
    print(json.dumps(record), flush=True)
    if args.log:
        with open(args.log, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
