"""Outputs that appear whole or not at all: temp names, rename on success, --overwrite."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.errors import InputError


def output_dir(path: Path, flag: str) -> Path:
    """A directory for outputs (created if needed); an input error if it is a file."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, expected a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Input error if any output already exists and --overwrite was not given."""
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise InputError(f"{path}: already exists; pass --overwrite to replace it")


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    temp = temp_name(path)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


@contextmanager
def atomic_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; it replaces `path` only on success."""
    refuse_existing([path], overwrite)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file, expected a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name(path)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(temp, path)
            shutil.rmtree(old)
        else:
            os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
