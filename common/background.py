"""Run a set-up in a thread beside the layer loop's device work, without stalling that loop.

A set-up that is mostly importing Python modules holds the GIL nearly all the time. Each torch
call of the main thread lets the GIL go and then waits up to a whole switch interval (5 ms by
default) to get it back, so a layer's thousands of kernel launches would take seconds: 20,000
small ops took 65 s beside a CPU-bound thread at 5 ms, 1.2 s at 0.1 ms, 0.06 s alone (CPython
3.11). While a set-up runs, the interval is therefore 0.1 ms, and CPU work launches fewer, larger
kernels (`setting_up`) on one thread (`sharing_the_cpu`).
"""
from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

SWITCH_INTERVAL_BESIDE = 1e-4
_running = 0
_lock = threading.Lock()
_default_interval = sys.getswitchinterval()


def run_beside(build: Callable[[], T], name: str) -> Future:
    """Start `build()` in a daemon thread (an error elsewhere need not wait for it); its future."""
    global _running, _default_interval
    future: Future = Future()
    with _lock:
        if _running == 0:
            _default_interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_BESIDE)
        _running += 1

    def work() -> None:
        global _running
        try:
            result, error = build(), None
        except BaseException as caught:  # noqa: BLE001 - handed to whoever waits on the future
            result, error = None, caught
        with _lock:
            _running -= 1
            if _running == 0:
                sys.setswitchinterval(_default_interval)
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    future.set_running_or_notify_cancel()
    threading.Thread(target=work, name=name, daemon=True).start()
    return future


def close_when_done(future: Future) -> None:
    """Close what a set-up built once it ends (if it succeeded), without waiting for it: a run
    that failed meanwhile need not sit out the rest of the imports."""
    future.add_done_callback(lambda done: None if done.exception() else done.result().close())


def finished(value: T) -> Future:
    """A future already holding `value`: for a set-up run in order, where callers expect a future."""
    future: Future = Future()
    future.set_result(value)
    return future


def setting_up() -> bool:
    """Whether a set-up thread runs now, holding the GIL most of the time."""
    return _running > 0


@contextmanager
def sharing_the_cpu(device) -> Iterator[None]:
    """While a set-up runs beside CPU work, that work's kernels run on one thread and leave the set-up
    the other core(s): an OpenMP kernel waits for its slowest thread, so two threads on two cores, one
    of them shared with the set-up, ran at the pace of the shared one."""
    import torch
    threads = torch.get_num_threads()
    if device.type != "cpu" or not setting_up() or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
