"""One error type for bad user input, and the wrapper that turns it into exit status 2.

Scripts raise `InputError` for anything the user can fix (a missing path, mismatched
models, a corrupt file). `run_main` prints it as one line and exits 2, so a user never sees
a traceback for their own mistake; a genuine bug still shows its traceback. A write that the
machine refuses (disk full, quota, I/O error, read-only) is an `OutputError`: one line, exit 1.
"""
from __future__ import annotations

import errno
import gc
import sys
from typing import Callable, NoReturn


class InputError(Exception):
    """A problem with the user's input; the message names the file or tensor and the problem."""


class OutputError(Exception):
    """Writing an output failed for a reason outside the program (disk full, quota, I/O error, ...)."""


WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def is_out_of_memory(error: BaseException) -> bool:
    """Host MemoryError or torch's (CUDA) OutOfMemoryError, without importing torch."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


def _exit(code: int) -> NoReturn:
    """Exit, leaving out the interpreter's last garbage collections over every imported module's objects:
    0.2 s after importing torch, 0.5 s with transformers too, on the 2-core test machine. Every output is
    closed and renamed by now, and the OS frees the memory."""
    gc.freeze()
    sys.exit(code)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run a script's `main`; InputError and out-of-memory become a short message and exit 2."""
    try:
        code = main(argv)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        _exit(2)
    except OutputError as error:
        print(f"error: {error}", file=sys.stderr)
        _exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        _exit(130)
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror}", file=sys.stderr)
        _exit(1)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        first_line = str(error).strip().split("\n")[0][:200]
        print(f"error: out of memory ({first_line}); try a smaller --batch_size, "
              "--device cpu, or close other programs", file=sys.stderr)
        _exit(2)
    _exit(code or 0)
