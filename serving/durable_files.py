"""Durable file primitives of the adapter store: atomic replace, fsync, flock'd temp files.

Everything here follows one rule: a reader (maybe another process) sees either the old file or the
complete new one, never a partial write, and an acknowledged write survives a crash.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from petserve.serving.errors import ApiError

TMP_PREFIX = ".tmp-"
CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Exclusive flock on lock_path. flock locks belong to the open file
    description, so this also excludes other threads of this process."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def new_temp(directory: Path) -> tuple[Path, int]:
    """Create an empty temp file, flock'd for as long as the fd stays open.

    The lock tells start-up cleanup (maybe in another process) a live write
    from a crash leftover; create temps under the id lock so cleanup never
    sees one before it is locked.
    """
    path = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return path, fd


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` durably. Caller holds the id lock."""
    tmp, fd = new_temp(path.parent)
    try:
        write_all(fd, data)
        os.fsync(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def stream_to_fd(fd: int, data: bytes | BinaryIO, max_bytes: int) -> tuple[str, int]:
    """Write `data` to fd; return (sha256 hex, size). Raises 413 past max_bytes."""
    digest = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > max_bytes:
            raise ApiError.payload_too_large(
                f"adapter file is larger than the limit of {max_bytes} bytes")
        digest.update(data)
        write_all(fd, data)
        return digest.hexdigest(), len(data)
    size = 0
    while chunk := data.read(CHUNK):
        size += len(chunk)
        if size > max_bytes:  # stop reading: the client may send gigabytes
            raise ApiError.payload_too_large(
                f"adapter file is larger than the limit of {max_bytes} bytes")
        digest.update(chunk)
        write_all(fd, chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
