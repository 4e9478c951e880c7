"""Work in a spawned child process: its own interpreter, so its imports and Python-heavy work never
hold this process's GIL (a thread doing the same stalls the main thread's kernel launches).

A child exits as soon as its parent is gone (even a parent killed outright), so an interrupted
run leaves no worker computing on behind it.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any, Callable

PARENT_POLL_S = 0.5


class ChildDied(RuntimeError):
    """The child process ended without a result (killed, out of host memory, ...)."""


def spawn_context() -> multiprocessing.context.BaseContext:
    """spawn, never fork: the parent may hold CUDA and threads already."""
    return multiprocessing.get_context("spawn")


def exit_with_parent(parent: int) -> None:
    """In a child: a watchdog that ends this process once `parent` is no longer its parent."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _sendable(error: BaseException) -> BaseException:
    """The error itself where it pickles (InputError, out-of-memory keep their meaning), else its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 - any unpicklable error becomes its traceback
        return RuntimeError("".join(traceback.format_exception(error)))


def _child_main(connection, parent: int, function: Callable, args: tuple) -> None:
    exit_with_parent(parent)
    try:
        message = (True, function(*args))
    except BaseException as error:  # noqa: BLE001 - handed to the parent
        message = (False, _sendable(error))
    connection.send(message)
    connection.close()


class ChildProcess:
    """`function(*args)` in a spawned child; its outcome as `future` (the child's exception re-raised).

    `function`, its arguments and its result must pickle; tensors in the result travel by value
    only if the function makes them NumPy arrays (torch's own reduction needs /dev/shm room).
    With `ready`, the function also gets an Event to set at a point the parent can wait for."""

    def __init__(self, function: Callable, *args: Any, name: str = "child", ready: bool = False):
        self.started: float = time.time()
        self.ended: float | None = None
        context = spawn_context()
        self.ready = context.Event() if ready else None
        args = (*args, self.ready) if ready else args
        receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_child_main, args=(send, os.getpid(), function, args),
                                       name=name, daemon=True)
        self.process.start()
        send.close()
        # one thread at a time reaps the process: two concurrent joins race in waitpid, and the loser
        # can see a dead child as alive (CPython's Popen.poll reads ECHILD as "not yet created")
        self._reaping = threading.Lock()
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()
        threading.Thread(target=self._collect, args=(receive,), name=f"{name}-result", daemon=True).start()

    def _collect(self, receive) -> None:
        try:
            ok, value = receive.recv()
            self.ended = time.time()
        except (EOFError, OSError):
            self._join(timeout=5)
            self.future.set_exception(ChildDied(f"the {self.process.name} process ended without a result "
                                                f"(exit code {self.process.exitcode}; out of memory?)"))
            return
        except Exception as error:  # noqa: BLE001 - a result that does not unpickle here: never hang on it
            self.future.set_exception(error)
            return
        finally:
            receive.close()
        self._join(timeout=30)
        if ok:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)

    def _join(self, timeout: float) -> None:
        with self._reaping:
            self.process.join(timeout=timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until the function sets its Event, ends, or `timeout` seconds pass."""
        deadline = time.time() + timeout
        while self.ready is not None and not self.ready.is_set() and not self.future.done() \
                and time.time() < deadline:
            self.ready.wait(0.05)

    @property
    def seconds(self) -> float:
        """From the start to the result (so far, while it runs)."""
        return (self.ended or time.time()) - self.started

    def stop(self) -> None:
        """End the child now if it is still working (the run failed or was interrupted)."""
        with self._reaping:
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=10)
