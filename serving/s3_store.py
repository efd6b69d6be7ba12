"""AdapterStore in S3 (or any S3-compatible service): one store shared by replicas on many nodes.

Same contract as serving.store.LocalDirStore: versions numbered from 1 that never repeat per id
(also across delete), an acknowledged put is never lost, a partial version is never visible, and
concurrent puts of one id get one version number each. Layout under ``s3://bucket/prefix/``:

    <id>/counter               the last version number handed out; advanced only by
                               compare-and-swap (If-Match: its ETag; If-None-Match: * to create
                               it) and never deleted, like the local store's .counter
    <id>/blobs/<sha256>-<rnd>  the bytes of one upload; a fresh key per upload, read by nobody
                               until a manifest names it
    <id>/v<N>.json             manifest of version N: StoredAdapter JSON plus "blob" (its key),
                               published last, with If-None-Match: *
    <id>/v<N>.deleted          deletion marker: every version <= N of the id is deleted

put: (1) write the blob; (2) claim N by advancing the counter (a 412 means another writer took
that number: reread it and try the next); (3) publish v<N>.json. Only (3) makes a version visible
and S3 writes are atomic per object, so readers never see a partial version; put returns after
(3), so an acknowledged upload is in S3. A crash after (1) leaves an orphan blob, after (2) a
burned number. The counter exists because S3 lets a deleted key be created again: a manifest's
If-None-Match alone cannot stop a number from repeating once delete or pruning removed it.

Visible versions of an id: its manifests numbered above its highest deletion marker. delete
writes the marker at the counter's value (the whole id disappears in one write), then removes the
manifests, blobs and markers below it; prune (keep_versions) removes the manifests older than the
newest keep_versions, then their blobs, then orphan blobs older than ORPHAN_AGE_S (younger ones
may be uploads in flight). A crash during either clean-up leaves only invisible objects, which the
next one removes. Blob keys are per upload rather than per content so that pruning an old
version's blob can never delete the blob that a concurrent upload of the same bytes will publish.

Reads: get() lists ``<id>/v`` at most once per ``fresh_s`` per id (the engine calls it on every
request); manifests are immutable, so each is fetched once. read() serves blobs from this
replica's read-through cache (``cache_dir/<sha256>``, written by adapters.atomic_file, checked
against the sha256 on every read), fetching from S3 on a miss. The cache holds at most
``cache_max_bytes``: writing a blob drops the least recently used ones (a hit refreshes a blob's
mtime) until it fits; replicas sharing the directory share the budget, and a blob dropped under
another reader is a miss there, fetched again.

Outages: a connection error, a timeout or a 5xx (after botocore's few retries) makes every call
fail fast with ApiError 503 ``store_unavailable`` (naming the store and the cause, Retry-After)
for RETRY_AFTER_S before S3 is tried again. Meanwhile put/delete fail, while get/read/list fall
back to what this process already knows (its last listing, manifests and cached blobs), so
adapters it has served keep serving; an adapter it has never seen is a 503.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from petserve.adapters.atomic_file import write_atomically
from petserve.serving.errors import ApiError
from petserve.serving.store import (
    ADAPTER_ID_RE,
    DEFAULT_KEEP_VERSIONS,
    DEFAULT_MAX_BYTES,
    StoredAdapter,
    _not_found,
    _too_large,
    validate_adapter_id,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5.0          # after a failed call, S3 is not tried again for this long
ORPHAN_AGE_S = 3600.0        # an unpublished blob this old belongs to a crashed upload
MAX_CLAIMS = 100             # counter compare-and-swap attempts before giving up (contention)
DEFAULT_CACHE_BYTES = 2 * 2**30   # the blob cache of the replicas sharing a cache directory
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")     # a cached blob (its sha256); temp files are not
# An endpoint that refuses fails at once; one that does not connect after 2 attempts of 2 s; one
# that connects but never answers after 2 attempts of a 5 s read (measured 12 s).
CLIENT_CONFIG = Config(connect_timeout=2, read_timeout=5,
                       retries={"total_max_attempts": 2, "mode": "standard"})
_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict")
_MISSING = ("NoSuchKey", "404")
_VERSION_KEY = re.compile(rf"(?P<id>{ADAPTER_ID_RE})/v(?P<n>[1-9][0-9]{{0,17}})\.(?P<kind>json|deleted)")


@dataclass
class _Listing:
    """The version numbers of one id as last listed (visible: above the highest marker)."""

    visible: list[int]          # sorted
    marker: int                 # highest deletion marker, 0 when none
    listed_at: float            # time.monotonic()


class S3Store:
    """AdapterStore in ``s3://bucket/prefix`` with a read-through blob cache in ``cache_dir``.

    max_bytes, keep_versions: as LocalDirStore's.
    fresh_s:       get() trusts its last listing of an id for this long (other replicas' new
                   versions show up within it; refresh() forgets every listing).
    cache_max_bytes: the blob cache's budget (None: unbounded).
    endpoint_url:  None: the AWS environment's (AWS_ENDPOINT_URL, ~/.aws/config), else AWS.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        cache_dir: Path | str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep_versions: int | None = DEFAULT_KEEP_VERSIONS,
        fresh_s: float = 1.0,
        endpoint_url: str | None = None,
        cache_max_bytes: int | None = DEFAULT_CACHE_BYTES,
    ) -> None:
        if keep_versions is not None and keep_versions < 1:
            raise ValueError("keep_versions must be >= 1 or None")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.cache_dir, self.cache_max_bytes = Path(cache_dir), cache_max_bytes
        self.max_bytes, self.keep_versions, self.fresh_s = max_bytes, keep_versions, fresh_s
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                                     config=CLIENT_CONFIG)
        self._lock = threading.Lock()
        self._listings: dict[str, _Listing] = {}
        self._manifests: dict[tuple[str, int], tuple[StoredAdapter, str]] = {}  # -> (stored, blob)
        self._index: dict[str, StoredAdapter] = {}
        self._down_until, self._down_cause = 0.0, ""
        self._refreshed = False
        self._check_bucket()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.refresh()

    # -- reads --

    def get(self, adapter_id: str, version: int | None = None) -> StoredAdapter:
        adapter_id = validate_adapter_id(adapter_id)
        listing = self._listing(adapter_id)
        if version is None and listing.visible:
            version = listing.visible[-1]
        if version not in listing.visible:
            raise _not_found(adapter_id, None if not listing.visible else version)
        stored = self._manifest(adapter_id, version)[0]
        if version == listing.visible[-1]:
            with self._lock:
                self._index[adapter_id] = stored
        return stored

    def read(self, adapter_id: str, version: int | None = None) -> bytes:
        """The blob, from the cache or S3, checked against its sha256 (a mismatch in S3:
        RuntimeError, a 500)."""
        stored = self.get(adapter_id, version)
        data = self._cached(stored.sha256)
        if data is not None:
            return data
        blob_key = self._manifest(stored.id, stored.version)[1]
        try:
            obj = self._call(self.client.get_object, _MISSING, Bucket=self.bucket,
                             Key=self._key(blob_key))
            data = obj["Body"].read()
        except ClientError:                  # pruned or deleted since get()
            raise _not_found(stored.id, version) from None
        if hashlib.sha256(data).hexdigest() != stored.sha256:
            raise RuntimeError(f"adapter {stored.id!r} v{stored.version}: blob {self.url}/"
                               f"{blob_key} does not match its recorded sha256")
        self._cache(stored.sha256, data)
        return data

    def path(self, adapter_id: str, version: int | None = None) -> Path:
        """The cached file of the blob (fetched first when not cached)."""
        stored = self.get(adapter_id, version)
        if self._cached(stored.sha256) is None:
            self.read(adapter_id, version)
        return self.cache_dir / stored.sha256

    def list(self) -> list[StoredAdapter]:
        with self._lock:
            return sorted(self._index.values(), key=lambda s: s.id)

    def refresh(self) -> None:
        """One listing of the whole prefix (paginated). In an outage the last index stays (with
        a warning) once there is one."""
        try:
            objects = self._objects("")
        except ApiError as e:
            if e.status != 503 or not self._refreshed:
                raise
            log.warning("%s; listing adapters from the last index", e.message)
            return
        by_id: dict[str, list[str]] = {}
        for obj in objects:
            by_id.setdefault(obj["Key"].split("/", 1)[0], []).append(obj["Key"])
        now = time.monotonic()
        listings = {i: _listing_of(keys, now) for i, keys in by_id.items()}
        latest = {i: self._manifest_or_none(i, lst.visible[-1])
                  for i, lst in listings.items() if lst.visible}
        index = {i: hit[0] for i, hit in latest.items() if hit is not None}
        with self._lock:
            self._listings, self._index, self._refreshed = listings, index, True

    # -- writes --

    def put(self, adapter_id: str, data: bytes | BinaryIO, meta: dict) -> StoredAdapter:
        adapter_id = validate_adapter_id(adapter_id)
        meta = dict(meta)
        json.dumps(meta)  # not JSON-able is a caller bug: fail before any I/O
        body = _read_capped(data, self.max_bytes)
        sha256 = hashlib.sha256(body).hexdigest()
        blob_key = f"{adapter_id}/blobs/{sha256}-{secrets.token_hex(4)}"
        self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(blob_key), Body=body)
        draft = StoredAdapter(adapter_id, 0, sha256, len(body), 0.0, meta)
        stored = self._publish(draft, blob_key)
        self._cache(sha256, body)
        with self._lock:    # stale (listed again at the next get), yet known in an outage
            last = self._listings.get(adapter_id, _Listing([], 0, 0.0))
            self._listings[adapter_id] = _Listing(sorted({*last.visible, stored.version}),
                                                  last.marker, 0.0)
            self._index[adapter_id] = stored
        self._clean_up(adapter_id, self.keep_versions)
        return stored

    def delete(self, adapter_id: str) -> StoredAdapter:
        """Write the deletion marker at the counter's value, then remove what it hides. A later
        upload continues the version numbers."""
        adapter_id = validate_adapter_id(adapter_id)
        with self._lock:
            self._listings.pop(adapter_id, None)
        latest = self.get(adapter_id)
        upto = self._counter(adapter_id)[0]
        self._call(self.client.put_object, Bucket=self.bucket,
                   Key=self._key(f"{adapter_id}/v{upto}.deleted"), Body=b"")
        with self._lock:
            self._listings[adapter_id] = _Listing([], upto, time.monotonic())
            self._index.pop(adapter_id, None)
        self._clean_up(adapter_id, keep=0)
        return latest

    # -- internals: versions --

    def _listing(self, adapter_id: str) -> _Listing:
        """The id's listing: the last one while fresh, else a new one (the last one in an
        outage, when there is one)."""
        with self._lock:
            last = self._listings.get(adapter_id)
        if last is not None and time.monotonic() - last.listed_at < self.fresh_s:
            return last
        try:
            keys = [o["Key"] for o in self._objects(f"{adapter_id}/v")]
        except ApiError as e:
            if e.status != 503 or last is None:
                raise
            log.warning("%s; serving %r from its last listing", e.message, adapter_id)
            return last
        listing = _listing_of(keys, time.monotonic())
        with self._lock:
            self._listings[adapter_id] = listing
            if not listing.visible:
                self._index.pop(adapter_id, None)
        return listing

    def _manifest(self, adapter_id: str, version: int) -> tuple[StoredAdapter, str]:
        """(stored, blob key) of a published version, fetched once (manifests never change)."""
        hit = self._manifests.get((adapter_id, version))
        if hit is not None:
            return hit
        try:
            obj = self._call(self.client.get_object, _MISSING, Bucket=self.bucket,
                             Key=self._key(f"{adapter_id}/v{version}.json"))
            raw = json.loads(obj["Body"].read())
            hit = StoredAdapter.from_json(raw), str(raw["blob"])
        except ClientError:                  # deleted or pruned since it was listed
            raise _not_found(adapter_id, version) from None
        except (ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"{self.url}/{adapter_id}/v{version}.json is not a manifest: "
                               f"{e}") from None
        self._manifests[(adapter_id, version)] = hit
        return hit

    def _manifest_or_none(self, adapter_id: str, version: int) -> tuple[StoredAdapter, str] | None:
        """_manifest, or None (logged) for one deleted since it was listed or unreadable."""
        try:
            return self._manifest(adapter_id, version)
        except RuntimeError as e:
            log.warning("skipping %s", e)
        except ApiError as e:
            if e.status != 404:
                raise
        return None

    def _publish(self, draft: StoredAdapter, blob_key: str) -> StoredAdapter:
        """Claim the next number, then publish its manifest (If-None-Match: only a writer that
        bypassed the counter can have taken it; then claim again)."""
        for _ in range(MAX_CLAIMS):
            stored = replace(draft, version=self._claim(draft.id), created=time.time())
            body = json.dumps({**stored.to_json(), "blob": blob_key}).encode()
            if self._put_if(f"{draft.id}/v{stored.version}.json", body, IfNoneMatch="*"):
                self._manifests[(stored.id, stored.version)] = (stored, blob_key)
                return stored
            there = self._manifest_or_none(draft.id, stored.version)
            if there is not None and there[1] == blob_key:
                return there[0]     # our own write: botocore retried it after a lost response
            log.warning("%s/%s/v%d.json exists already; claiming another number", self.url,
                        draft.id, stored.version)
        raise self._contention(draft.id)

    def _claim(self, adapter_id: str) -> int:
        """The next version number: the counter advanced by compare-and-swap."""
        for _ in range(MAX_CLAIMS):
            last, etag = self._counter(adapter_id)
            guard = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            if self._put_if(f"{adapter_id}/counter", f"{last + 1}\n".encode(), **guard):
                return last + 1
        raise self._contention(adapter_id)

    def _counter(self, adapter_id: str) -> tuple[int, str | None]:
        """(last number handed out, the counter's ETag); (0, None) before the first put."""
        try:
            obj = self._call(self.client.get_object, _MISSING, Bucket=self.bucket,
                             Key=self._key(f"{adapter_id}/counter"))
        except ClientError:
            return 0, None
        return int(obj["Body"].read().decode().strip()), obj["ETag"]

    def _clean_up(self, adapter_id: str, keep: int | None) -> None:
        """Remove what no reader may see any more: hidden or pruned (beyond the newest ``keep``)
        manifests, their blobs, old orphan blobs, superseded markers. Best effort: a put or
        delete has already taken effect, a failure here only leaves invisible objects."""
        if keep is None:
            return
        try:
            objects = self._objects(f"{adapter_id}/")
            keys = [o["Key"] for o in objects]
            listing = _listing_of(keys, 0.0)
            kept = listing.visible[-keep:] if keep else []
            doomed = [n for n in _numbers(keys, "json") if n not in kept]
            kept_blobs = {self._manifest(adapter_id, n)[1] for n in kept}
            doomed_blobs = {hit[1] for n in doomed
                            if (hit := self._manifest_or_none(adapter_id, n)) is not None}
            gone = [f"{adapter_id}/v{n}.json" for n in doomed]
            gone += [f"{adapter_id}/v{n}.deleted" for n in _numbers(keys, "deleted")
                     if n < listing.marker]
            old = time.time() - ORPHAN_AGE_S
            gone += [o["Key"] for o in objects if "/blobs/" in o["Key"]
                     and o["Key"] not in kept_blobs
                     and (o["Key"] in doomed_blobs or o["LastModified"].timestamp() < old)]
            for key in gone:           # manifests first: a version turns invisible before its blob
                self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(key))
            for n in doomed:
                self._manifests.pop((adapter_id, n), None)
        except (ApiError, RuntimeError) as e:
            log.warning("%s/%s: clean-up left for later: %s", self.url, adapter_id, e)

    def _contention(self, adapter_id: str) -> ApiError:
        return ApiError.unavailable("store_contention", f"{MAX_CLAIMS} concurrent uploads of "
                                    f"{adapter_id!r} won every version number; retry", 1.0)

    # -- internals: S3 calls, the cache --

    def _call(self, method, handled: tuple[str, ...] = (), **kwargs):
        """``method(**kwargs)``; ClientErrors whose code is in ``handled`` pass through, every
        other failure is ApiError 503 and keeps S3 untried for RETRY_AFTER_S."""
        if time.monotonic() < self._down_until:
            raise self._unavailable(self._down_cause)
        try:
            return method(**kwargs)
        except ClientError as e:
            error = e.response.get("Error", {})
            if error.get("Code") in handled:
                raise
            cause = f"{error.get('Code')}: {error.get('Message') or 'no message'}"
        except BotoCoreError as e:
            cause = str(e)
        self._down_until, self._down_cause = time.monotonic() + RETRY_AFTER_S, cause
        raise self._unavailable(cause)

    def _check_bucket(self) -> None:
        """A clear error at start-up for a missing bucket or refused credentials."""
        try:
            self._call(self.client.head_bucket, ("404", "NoSuchBucket", "403", "AccessDenied"),
                       Bucket=self.bucket)
        except ClientError as e:
            why = ("does not exist" if e.response["Error"]["Code"] in ("404", "NoSuchBucket")
                   else "refuses these credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                        "or AWS_PROFILE)")
            raise ApiError.unavailable("store_unavailable", f"the adapter store {self.url}: "
                                       f"bucket {self.bucket!r} {why}", RETRY_AFTER_S) from None

    def _unavailable(self, cause: str) -> ApiError:
        return ApiError.unavailable("store_unavailable", f"the adapter store {self.url} is "
                                    f"unavailable ({cause}); adapters already loaded are still "
                                    "served, uploads and deletes fail until it is back",
                                    RETRY_AFTER_S)

    def _put_if(self, key: str, body: bytes, **guard: str) -> bool:
        """A conditional put: False when the condition did not hold (another writer won)."""
        try:
            self._call(self.client.put_object, _LOST_RACE, Bucket=self.bucket,
                       Key=self._key(key), Body=body, **guard)
            return True
        except ClientError:
            return False

    def _objects(self, under: str) -> list[dict]:
        """Every object under ``<prefix>/<under>``, keys made relative to the prefix."""
        start = self._key(under)

        def list_all() -> list[dict]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start)
            return [o for page in pages for o in page.get("Contents", [])]

        root = len(self._key(""))
        return [{**o, "Key": o["Key"][root:]} for o in self._call(list_all)]

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _cached(self, sha256: str) -> bytes | None:
        path = self.cache_dir / sha256
        try:
            data = path.read_bytes()
            os.utime(path)                   # recently used: the last to be dropped
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
        log.warning("dropping corrupt cached blob %s", path)
        path.unlink(missing_ok=True)
        return None

    def _cache(self, sha256: str, data: bytes) -> None:
        write_atomically(self.cache_dir / sha256, lambda f: f.write(data))
        if self.cache_max_bytes is not None:
            self._trim_cache(keep=sha256)

    def _trim_cache(self, keep: str) -> None:
        """Drop the least recently used blobs (not ``keep``) until the cache fits its budget."""
        blobs, total = [], 0
        for entry in os.scandir(self.cache_dir):
            if not _BLOB_NAME.fullmatch(entry.name):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:        # dropped meanwhile by a replica sharing the cache
                continue
            total += st.st_size
            if entry.name != keep:
                blobs.append((st.st_mtime_ns, st.st_size, entry.path))
        for _, size, path in sorted(blobs):
            if total <= self.cache_max_bytes:
                break
            Path(path).unlink(missing_ok=True)
            total -= size


def _numbers(keys: list[str], kind: str) -> list[int]:
    """The version numbers of the manifests (kind "json") or markers ("deleted") among keys."""
    return [int(m["n"]) for m in map(_VERSION_KEY.fullmatch, keys) if m and m["kind"] == kind]


def _listing_of(keys: list[str], listed_at: float) -> _Listing:
    marker = max(_numbers(keys, "deleted"), default=0)
    visible = sorted(n for n in _numbers(keys, "json") if n > marker)
    return _Listing(visible, marker, listed_at)


def _read_capped(data: bytes | BinaryIO, max_bytes: int) -> bytes:
    """The upload's bytes; 413 past max_bytes (reading at most one byte more)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        body = bytes(data)
    else:
        chunks, size = [], 0
        while size <= max_bytes and (chunk := data.read(max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        body = b"".join(chunks)
    if len(body) > max_bytes:
        raise _too_large(max_bytes)
    return body
