"""Outputs that never destroy anything and appear whole or not at all.

Every writing script follows the same rules, all implemented here:
* an output may not be, contain or lie inside an input, and two outputs may not overlap;
* an existing output is kept unless --overwrite; --overwrite replaces only what these scripts
  wrote: a file of theirs, or the files a folder of theirs lists in its manifest, never others;
* one run per output at a time, through an OS file lock the kernel drops when a process dies;
  the run holding it removes the temporaries that killed runs left;
* free space is compared with what will be written before any work;
* a write that fails (disk full, quota, I/O error, read-only, permission) becomes one
  `OutputError` line naming the output; the temporary is removed.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from common.errors import WRITE_FAILURES, InputError, OutputError

MANIFEST = ".decdec-files.json"  # inside every folder these scripts write: the files they put there


# -- where outputs may go ----------------------------------------------------------------------

def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_apart(outputs: Iterable[tuple[str, Path]], inputs: Iterable[tuple[str, Path | None]]) -> None:
    """Input error if an output is, contains or lies inside an input, or two outputs overlap."""
    outputs = [(label, Path(p).expanduser().resolve()) for label, p in outputs]
    inputs = [(label, Path(p).expanduser().resolve()) for label, p in inputs if p is not None]
    for out_label, out in outputs:
        for in_label, source in inputs:
            if out == source:
                relation = "is"
            elif _inside(out, source):
                relation = "lies inside"
            elif _inside(source, out):
                relation = "contains"
            else:
                continue
            raise InputError(f"{out_label} {out}: {relation} the input {in_label} {source}; "
                             "outputs must stay apart from the inputs, choose another path")
    for i, (label_a, a) in enumerate(outputs):
        for label_b, b in outputs[i + 1:]:
            if _inside(a, b) or _inside(b, a):
                raise InputError(f"{label_a} {a} and {label_b} {b}: two outputs at the same place; "
                                 "give each its own path")


def read_manifest(folder: Path) -> set[str] | None:
    """The files a folder of ours lists as written by us; None when it is not ours."""
    try:
        return set(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _files_below(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def refuse_existing(paths: Iterable[Path], overwrite: bool, label: str = "") -> None:
    """Input error for an existing output without --overwrite, and for anything --overwrite must
    not replace: a folder these scripts did not write (it holds someone else's files)."""
    for path in paths:
        if not path.exists() and not path.is_symlink():
            continue
        where = f"{label} {path}" if label else str(path)
        if not overwrite:
            raise InputError(f"{where}: already exists; pass --overwrite to replace it")
        if path.is_dir():
            ours, present = read_manifest(path), _files_below(path)
            if ours is None and present:
                example = sorted(present)[0]
                raise InputError(f"{where}: a folder these scripts did not write (it holds {example}); "
                                 "--overwrite only replaces their own folders: choose another path")


# -- one run per output ------------------------------------------------------------------------

def absolute(path: Path) -> Path:
    """`path` made absolute and normalised ('.' and '..' resolved, links kept), so it has a name."""
    return Path(os.path.abspath(Path(path).expanduser()))


def temp_name(path: Path) -> Path:
    path = absolute(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _lock_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextmanager
def output_lock(path: Path, label: str = "") -> Iterator[None]:
    """Hold the lock of output `path` (refusing if another run holds it); then remove what killed
    runs on this output left behind: while we hold the lock, no other run of ours writes there.
    Folders made to hold the lock are removed again if the run fails."""
    path = absolute(path)
    where = f"{label} {path}" if label else str(path)
    try:
        created = _make_parents(path.parent)
    except OSError as error:  # e.g. under a read-only mount: name the output, not the folder's internals
        raise InputError(f"{where}: cannot create the folder {error.filename or path.parent} "
                         f"({error.strerror or error})") from None
    lock = _lock_name(path)
    try:
        fd = _acquire(lock, where)
    except OSError as error:  # the lock is ours, an internal name: say where the output cannot go
        _remove_empty(created)
        raise InputError(f"{where}: cannot write in {path.parent} ({error.strerror or error})") from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)  # only for the message of a refused run
        except OSError:
            pass
        remove_stale_temporaries(path)
        yield
    except BaseException:
        os.unlink(lock)
        os.close(fd)
        _remove_empty(created)
        raise
    else:
        os.unlink(lock)
        os.close(fd)


def _acquire(lock: Path, where: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(f"{where}: another run (pid {holder}) is writing this output; "
                             "wait for it to finish or choose another path") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed this lock file as we opened it: take the new one


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest first)."""
    created = []
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    for new in reversed(created):
        new.mkdir(exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def remove_stale_temporaries(path: Path) -> None:
    """Remove `.name.tmp-*` / `.name.old-*` siblings of `path` (call only while holding its lock)."""
    path = absolute(path)
    if not path.parent.is_dir():
        return
    for stale in list(path.parent.glob(f".{path.name}.tmp-*")) + list(path.parent.glob(f".{path.name}.old-*")):
        if stale == temp_name(path):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def claimed_outputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path | None]],
                    overwrite: bool) -> Iterator[None]:
    """Check the outputs against the inputs and --overwrite, then hold their locks for the run."""
    check_apart(outputs, inputs)
    for label, path in outputs:
        refuse_existing([path], overwrite, label)
    with ExitStack() as stack:
        for label, path in outputs:
            stack.enter_context(output_lock(path, label))
        yield


# -- free space --------------------------------------------------------------------------------

def human_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(needs: list[tuple[Path, int, str]]) -> None:
    """Input error when a filesystem cannot hold what will be written on it.

    `needs`: (output path, bytes, what), summed per filesystem; 1 % + 4 MiB are kept in reserve."""
    per_device: dict[int, list[tuple[Path, int, str]]] = {}
    for path, nbytes, what in needs:
        anchor = _existing_ancestor(path)
        per_device.setdefault(anchor.stat().st_dev, []).append((anchor, nbytes, what))
    for entries in per_device.values():
        total = int(sum(n for _, n, _ in entries) * 1.01) + (4 << 20)
        free = shutil.disk_usage(entries[0][0]).free
        if total > free:
            what = " and ".join(w for _, _, w in entries)
            raise InputError(f"{entries[0][0]}: writing {what} needs {human_size(total)} of free space, but that "
                             f"filesystem has only {human_size(free)}; free some space or choose another path")


# -- writing -----------------------------------------------------------------------------------

def as_output_error(error: OSError, path: Path, hint: str = "") -> OutputError:
    reason = error.strerror or str(error)
    return OutputError(f"writing {path}: {reason}{hint}")


class RecordingFile:
    """A binary file whose write errors are remembered: torch's zip writer turns them into an
    uninformative RuntimeError, and `raise_recorded` restores the real OSError (its errno)."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()

    def raise_recorded(self) -> None:
        if self.error is not None:
            raise self.error


@contextmanager
def opened_for_writing(path: Path) -> Iterator[RecordingFile]:
    """`path` open for writing; an OSError inside any writer that swallowed it is re-raised."""
    with open(path, "wb") as handle:
        recording = RecordingFile(handle)
        try:
            yield recording
        except Exception:
            recording.raise_recorded()
            raise
        recording.raise_recorded()


@contextmanager
def atomic_file(path: Path, hint: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; it becomes `path` only if the block succeeds.

    A failed write (disk full, ...) becomes an OutputError naming `path`, plus `hint`."""
    temp = temp_name(path)
    try:
        yield temp
        os.replace(temp, path)
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        raise as_output_error(error, path, hint) from None
    finally:
        if temp.exists():
            temp.unlink()


@contextmanager
def atomic_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it becomes `path`, with a manifest of
    its files. Replacing an existing folder of ours keeps any file it does not list."""
    path = absolute(path)
    refuse_existing([path], overwrite)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file, expected a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name(path)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        files = sorted(_files_below(temp) - {MANIFEST})
        (temp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
        _commit_folder(temp, path, set(files))
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        raise as_output_error(error, path) from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _commit_folder(temp: Path, path: Path, files: set[str]) -> None:
    if not path.exists():
        os.replace(temp, path)
        return
    ours = read_manifest(path) or set()
    foreign = _files_below(path) - ours - {MANIFEST}
    if not foreign:  # nothing but our old files: swap the folders in one rename
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(temp, path)
        shutil.rmtree(old)
        return
    for name in sorted(files):  # someone else's files live there too: replace ours file by file
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(temp / name, target)
    for name in sorted(ours - files):
        (path / name).unlink(missing_ok=True)
    os.replace(temp / MANIFEST, path / MANIFEST)


def output_dir(path: Path, flag: str) -> Path:
    """A directory for outputs (created if needed); an input error if it is a file."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, expected a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path
