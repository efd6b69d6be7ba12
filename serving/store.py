"""Versioned, crash-safe storage of adapter files.

Adapter files are opaque bytes here (they are .safetensors files validated
elsewhere); each version carries a small JSON-able metadata dict from the
caller. `AdapterStore` is the interface the server uses; `LocalDirStore` keeps
everything in one directory that several threads, processes and Ray replicas on
one host may share.

Layout of `LocalDirStore(root)`:

    root/<id>/v<N>.safetensors   the blob of version N
    root/<id>/v<N>.json          its metadata; written after the blob
    root/<id>/.counter           last version number handed out (survives delete)
    root/<id>/.lock              flock'd around every change to <id>/
    root/<id>/.tmp-<random>      a write in progress, or a crash leftover

A version is visible only when its metadata exists, parses, and names a blob
that exists with the recorded size. Writers hold the per-id lock only while
committing (never while streaming an upload), readers take no lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from petserve.adapters.atomic_file import TMP_PREFIX, fsync_dir, new_temp, write_atomically
from petserve.serving.durable_files import locked, sha256_file, stream_to_fd
from petserve.serving.errors import ApiError

log = logging.getLogger(__name__)

ADAPTER_ID_RE = r"[a-z0-9][a-z0-9._-]{0,63}"  # must match the whole id
DEFAULT_MAX_BYTES = 512 * 2**20
DEFAULT_KEEP_VERSIONS = 3
RACY_S = 0.05        # see LocalDirStore._scan_cached

_ID = re.compile(ADAPTER_ID_RE)
_VERSION_FILE = re.compile(r"v([1-9][0-9]{0,17})\.(safetensors|json)")


def validate_adapter_id(adapter_id: object) -> str:
    """Return `adapter_id` unchanged if it is a valid id, else raise ApiError 400.

    Valid ids fully match ADAPTER_ID_RE, so they can never name a path outside
    the store (no '/', no leading '.', no NUL, no uppercase, at most 64 chars).
    """
    if isinstance(adapter_id, str) and _ID.fullmatch(adapter_id):
        return adapter_id
    shown = repr(adapter_id) if len(repr(adapter_id)) <= 80 else repr(adapter_id)[:77] + "..."
    raise ApiError.bad_request(
        "invalid_adapter_id",
        f"invalid adapter id {shown}: an id is 1 to 64 characters, each a "
        "lowercase letter, digit, '.', '_' or '-', and starts with a letter "
        "or digit",
    )


@dataclass(frozen=True)
class StoredAdapter:
    """One stored version of an adapter. `meta` is the caller's dict."""

    id: str
    version: int
    sha256: str
    size: int
    created: float
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> StoredAdapter:
        """Inverse of to_json; raises KeyError/TypeError/ValueError on bad input."""
        if not isinstance(obj["meta"], dict):
            raise TypeError("meta must be an object")
        return cls(
            str(obj["id"]), int(obj["version"]), str(obj["sha256"]),
            int(obj["size"]), float(obj["created"]), obj["meta"],
        )


@runtime_checkable
class AdapterStore(Protocol):
    """Where adapter files live. Errors are ApiError (400 bad id, 404, 413)."""

    def put(self, adapter_id: str, data: bytes | BinaryIO, meta: dict) -> StoredAdapter:
        """Store a new version (numbers start at 1 and never repeat per id)."""

    def get(self, adapter_id: str, version: int | None = None) -> StoredAdapter:
        """The given version, or the latest when version is None."""

    def read(self, adapter_id: str, version: int | None = None) -> bytes:
        """The blob of get(adapter_id, version)."""

    def path(self, adapter_id: str, version: int | None = None) -> Path:
        """Local file of the blob (local backends only; may vanish on delete)."""

    def list(self) -> list[StoredAdapter]:
        """Latest version of each adapter, sorted by id."""

    def delete(self, adapter_id: str) -> StoredAdapter:
        """Remove every version; returns what was the latest."""

    def refresh(self) -> None:
        """Re-read the index from the backend (other writers share it)."""


def _not_found(adapter_id: str, version: int | None = None) -> ApiError:
    which = "" if version is None else f" version {version}"
    return ApiError.not_found("adapter_not_found", f"adapter {adapter_id!r}{which} not found")


def _too_large(max_bytes: int) -> ApiError:
    return ApiError.payload_too_large(f"adapter file is larger than the limit of {max_bytes} bytes")


def _version_files(id_dir: Path) -> dict[int, set[str]]:
    """version -> {"safetensors", "json"} as present in id_dir."""
    found: dict[int, set[str]] = {}
    for name in os.listdir(id_dir):
        m = _VERSION_FILE.fullmatch(name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def _scan_id(id_dir: Path, adapter_id: str, verify: bool) -> dict[int, StoredAdapter]:
    """The visible versions of one adapter. Needs no lock: metadata files
    appear atomically, and a blob deleted under us just drops its version."""
    versions: dict[int, StoredAdapter] = {}
    try:
        files = _version_files(id_dir)
    except FileNotFoundError:
        return versions
    for version, kinds in files.items():
        if "json" not in kinds:
            continue
        blob = id_dir / f"v{version}.safetensors"
        try:
            stored = StoredAdapter.from_json(
                json.loads((id_dir / f"v{version}.json").read_bytes())
            )
            ok = (
                stored.id == adapter_id
                and stored.version == version
                and os.stat(blob).st_size == stored.size
                and (not verify or sha256_file(blob) == stored.sha256)
            )
        except FileNotFoundError:
            continue  # deleted or pruned while we looked
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("skipping unreadable metadata %s/v%d: %s", id_dir, version, e)
            continue
        if ok:
            versions[version] = stored
        else:
            log.warning("skipping %s/v%d: blob does not match metadata", id_dir, version)
    return versions


def _remove_if_abandoned(path: Path) -> None:
    """Unlink a temp file unless a live writer still holds its flock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass  # a live writer holds it
    finally:
        os.close(fd)


# --- the local-directory backend --------------------------------------------


class LocalDirStore:
    """AdapterStore in a local directory shared by threads and processes.

    max_bytes:      largest accepted adapter file (413 beyond).
    keep_versions:  after a put, keep only this many newest versions of the id
                    (None keeps all).
    verify_sha256:  on start-up and refresh(), hash every blob and hide the
                    versions that do not match (slow for big stores).

    get/read/path look at the directory for that one id on every call, so they
    see other processes' writes at once; list() serves the index, which is
    rebuilt by refresh() and kept current with this process's own writes.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep_versions: int | None = DEFAULT_KEEP_VERSIONS,
        verify_sha256: bool = False,
    ) -> None:
        if keep_versions is not None and keep_versions < 1:
            raise ValueError("keep_versions must be >= 1 or None")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.keep_versions = keep_versions
        self.verify_sha256 = verify_sha256
        self._index: dict[str, StoredAdapter] = {}
        self._index_lock = threading.Lock()
        self._scans: dict[str, tuple[tuple[int, int], dict[int, StoredAdapter]]] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        for adapter_id in self._ids_on_disk():
            self._clean(self.root / adapter_id)
        self.refresh()

    # -- reads (no file lock) --

    def get(self, adapter_id: str, version: int | None = None) -> StoredAdapter:
        adapter_id = validate_adapter_id(adapter_id)
        versions = self._scan_cached(adapter_id)
        self._remember(adapter_id, versions)
        if not versions:
            raise _not_found(adapter_id)
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise _not_found(adapter_id, version)
        return versions[version]

    def _scan_cached(self, adapter_id: str) -> dict[int, StoredAdapter]:
        """_scan_id, memoised on the id directory's mtime. Every visible change renames or unlinks
        an entry there, which moves the mtime; a directory changed within the last RACY_S is
        rescanned every time, because file-system timestamps are coarse (two changes inside one
        clock tick share an mtime), as git does for "racily clean" files."""
        id_dir = self.root / adapter_id
        try:
            st = os.stat(id_dir)
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_mtime_ns)
        hit = self._scans.get(adapter_id)
        if hit is not None and hit[0] == key:
            return hit[1]
        versions = _scan_id(id_dir, adapter_id, verify=False)
        if time.time_ns() - st.st_mtime_ns > RACY_S * 1e9:
            self._scans[adapter_id] = (key, versions)
        return versions

    def path(self, adapter_id: str, version: int | None = None) -> Path:
        return self._blob(self.get(adapter_id, version))

    def read(self, adapter_id: str, version: int | None = None) -> bytes:
        """The blob bytes, checked against the recorded sha256 (a mismatch
        means the disk was tampered with or corrupted: RuntimeError, a 500)."""
        stored = self.get(adapter_id, version)
        try:
            data = self._blob(stored).read_bytes()
        except FileNotFoundError:  # deleted or pruned since get()
            raise _not_found(stored.id, version) from None
        if hashlib.sha256(data).hexdigest() != stored.sha256:
            raise RuntimeError(
                f"adapter {stored.id!r} v{stored.version}: blob does not match "
                "its recorded sha256"
            )
        return data

    def list(self) -> list[StoredAdapter]:
        with self._index_lock:
            return sorted(self._index.values(), key=lambda s: s.id)

    def refresh(self) -> None:
        index: dict[str, StoredAdapter] = {}
        for adapter_id in self._ids_on_disk():
            versions = _scan_id(self.root / adapter_id, adapter_id, self.verify_sha256)
            if versions:
                index[adapter_id] = versions[max(versions)]
        with self._index_lock:
            self._index = index

    # -- writes (under the per-id file lock) --

    def put(self, adapter_id: str, data: bytes | BinaryIO, meta: dict) -> StoredAdapter:
        adapter_id = validate_adapter_id(adapter_id)
        meta = dict(meta)
        json.dumps(meta)  # not JSON-able is a caller bug: fail before any I/O
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > self.max_bytes:
            raise _too_large(self.max_bytes)  # before touching the disk
        id_dir = self._id_dir(adapter_id)
        with locked(id_dir / ".lock"):
            tmp, fd = new_temp(id_dir)
        try:
            # Stream outside the id lock: an upload can take minutes.
            sha256, size = stream_to_fd(fd, data, self.max_bytes)
            os.fsync(fd)
            with locked(id_dir / ".lock"):
                draft = StoredAdapter(adapter_id, 0, sha256, size, 0.0, meta)
                stored = self._commit(id_dir, tmp, draft)
        finally:
            tmp.unlink(missing_ok=True)  # no-op once committed (renamed away)
            os.close(fd)
        with self._index_lock:
            self._index[adapter_id] = stored
        return stored

    def delete(self, adapter_id: str) -> StoredAdapter:
        """Remove all versions. The id directory with its .counter stays, so
        a later upload under the same id continues the version numbers."""
        adapter_id = validate_adapter_id(adapter_id)
        id_dir = self.root / adapter_id
        if not id_dir.is_dir():
            raise _not_found(adapter_id)
        with locked(id_dir / ".lock"):
            versions = _scan_id(id_dir, adapter_id, verify=False)
            if not versions:
                raise _not_found(adapter_id)
            for version in _version_files(id_dir):
                self._remove_version(id_dir, version)
            fsync_dir(id_dir)
        with self._index_lock:
            self._index.pop(adapter_id, None)
        return versions[max(versions)]

    # -- internals --

    def _commit(self, id_dir: Path, tmp: Path, stored: StoredAdapter) -> StoredAdapter:
        """Give the streamed temp blob the next version number. Holds the id lock."""
        version = max([self._counter(id_dir), *_version_files(id_dir)]) + 1
        # Counter first: a crash after this point burns the number, never reuses it.
        _write(id_dir / ".counter", f"{version}\n".encode())
        stored = replace(stored, version=version, created=time.time())
        blob = id_dir / f"v{version}.safetensors"
        os.rename(tmp, blob)
        try:
            fsync_dir(id_dir)  # the blob is durable before metadata can name it
            _write(id_dir / f"v{version}.json", json.dumps(stored.to_json()).encode())
        except BaseException:
            blob.unlink(missing_ok=True)
            raise
        self._prune(id_dir)
        return stored

    def _prune(self, id_dir: Path) -> None:
        if self.keep_versions is None:
            return
        files = _version_files(id_dir)
        # Count only complete versions, so a crashed writer's orphan can't
        # take a visible version's place; orphans below the cut go too.
        complete = sorted((v for v, kinds in files.items() if len(kinds) == 2), reverse=True)
        if len(complete) <= self.keep_versions:
            return
        cutoff = complete[self.keep_versions - 1]
        for version in files:
            if version < cutoff:
                self._remove_version(id_dir, version)
        fsync_dir(id_dir)

    @staticmethod
    def _remove_version(id_dir: Path, version: int) -> None:
        # Metadata first, so the version turns invisible before its blob goes.
        (id_dir / f"v{version}.json").unlink(missing_ok=True)
        (id_dir / f"v{version}.safetensors").unlink(missing_ok=True)

    @staticmethod
    def _counter(id_dir: Path) -> int:
        try:
            return int((id_dir / ".counter").read_text().strip())
        except (FileNotFoundError, ValueError):
            return 0

    def _clean(self, id_dir: Path) -> None:
        """Remove crash leftovers: abandoned temp files, and blobs/metadata
        missing their partner. Holding the id lock, no commit is half-done."""
        with locked(id_dir / ".lock"):
            for name in os.listdir(id_dir):
                if name.startswith(TMP_PREFIX):
                    _remove_if_abandoned(id_dir / name)
            for version, kinds in _version_files(id_dir).items():
                if len(kinds) == 1:
                    log.warning("removing half-written version %s/v%d", id_dir, version)
                    self._remove_version(id_dir, version)

    def _blob(self, stored: StoredAdapter) -> Path:
        return self.root / stored.id / f"v{stored.version}.safetensors"

    def _id_dir(self, adapter_id: str) -> Path:
        id_dir = self.root / adapter_id
        if not id_dir.is_dir():
            id_dir.mkdir(exist_ok=True)
            fsync_dir(self.root)
        return id_dir

    def _ids_on_disk(self) -> list[str]:
        return [
            e.name for e in os.scandir(self.root) if e.is_dir() and _ID.fullmatch(e.name)
        ]

    def _remember(self, adapter_id: str, versions: dict[int, StoredAdapter]) -> None:
        with self._index_lock:
            if versions:
                self._index[adapter_id] = versions[max(versions)]
            else:
                self._index.pop(adapter_id, None)


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably (the caller holds the id lock)."""
    write_atomically(path, lambda f: f.write(data))


S3_CACHE_DIR = ".s3-cache"    # under store_dir; not a valid id, so a LocalDirStore there skips it


def open_store(config) -> AdapterStore:
    """The store a ServerConfig names (every server process opens it here): S3 when it has a
    store_url (with this replica's blob cache in store_dir/.s3-cache), else store_dir."""
    if config.store_url is not None:
        from petserve.serving.s3_store import S3Store  # boto3 only when S3 is used
        from petserve.serving.server_config import split_s3_url
        bucket, prefix = split_s3_url(config.store_url)
        return S3Store(bucket, prefix, config.store_dir / S3_CACHE_DIR,
                       max_bytes=config.max_adapter_bytes,
                       cache_max_bytes=config.store_cache_mib * 2**20)
    return LocalDirStore(config.store_dir, max_bytes=config.max_adapter_bytes)
