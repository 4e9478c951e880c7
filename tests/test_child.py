"""common.child: a result, the child's own error, a child that dies, and a child whose parent dies."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.child import ChildDied, ChildProcess
from common.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def test_result_and_errors_come_back():
    assert ChildProcess(max, 2, 5).future.result(timeout=60) == 5
    with pytest.raises(ValueError, match="invalid literal"):
        ChildProcess(int, "x").future.result(timeout=60)
    from common.io.model_dir import resolve_model_dir
    with pytest.raises(InputError, match="--model"):  # an input error stays one (exit status 2, one line)
        ChildProcess(resolve_model_dir, "/no/such/model/dir", "--model").future.result(timeout=60)


def test_ready_is_the_functions_own_signal():
    from multiprocessing.synchronize import Event
    child = ChildProcess(Event.set, ready=True)  # the function gets the Event and sets it
    child.wait_ready(timeout=60)
    assert child.ready.is_set()
    assert child.future.result(timeout=60) is None


def test_a_result_that_cannot_come_back_is_an_error_not_a_hang():
    child = ChildProcess(_unpicklable_here)
    with pytest.raises(Exception):
        child.future.result(timeout=60)


def test_a_child_that_dies_is_reported():
    child = ChildProcess(os._exit, 3, name="dying")
    with pytest.raises(ChildDied, match="dying process ended without a result .exit code 3"):
        child.future.result(timeout=60)


def test_stop_ends_a_working_child():
    child = ChildProcess(time.sleep, 60)
    child.stop()
    assert not child.process.is_alive()


def test_a_child_ends_with_its_parent():
    """A parent killed outright (no cleanup at all) takes its child with it."""
    parent = subprocess.run(
        [sys.executable, "-c", "import os, time\nfrom common.child import ChildProcess\n"
         "child = ChildProcess(time.sleep, 60)\ntime.sleep(1)\nprint(child.process.pid, flush=True)\nos._exit(0)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    pid = int(parent.stdout.split()[0])
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid)


class _GoneInTheParent:
    def __reduce__(self):  # unpickling it raises in whichever process receives it
        return (int, ("not a number",))


def _unpicklable_here():
    return _GoneInTheParent()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
