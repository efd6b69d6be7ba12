"""The adapter store's own file primitives: per-id flock, streaming a blob with its sha256 under a
size cap. Atomic writes and temp files are petserve.adapters.atomic_file's (the one writer).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from petserve.serving.errors import ApiError

CHUNK = 1 << 20


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


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
