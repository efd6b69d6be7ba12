"""Atomic, durable file writes: the one writer of adapter files, training checkpoints and the
adapter store's blobs and metadata.

The rule: a reader (maybe another process) sees either the old file or the complete new one, never
a partial write, and a write that returned survives a crash (file and directory fsync'd).
"""
from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"      # temp files; the store's start-up cleanup removes unlocked ones


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_temp(directory: Path) -> tuple[Path, int]:
    """Create an empty temp file in ``directory``, flock'd for as long as the fd stays open: the
    lock tells a cleanup (maybe in another process) a live write from a crash leftover."""
    path = Path(directory) / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return path, fd


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Run ``write(file)`` on a temp file beside ``path``, fsync it, rename it over ``path`` and
    fsync the directory. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = new_temp(path.parent)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            write(f)
            f.flush()
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return path
