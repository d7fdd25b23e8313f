"""An output store at an fsspec URL: ``s3://`` (s3fs), ``gs://`` (gcsfs), ``memory://``, any fsspec writes.

Each object is one whole PUT, which an object store makes visible complete or not at all (a
large shard goes up as a multipart upload, which appears only when it completes). The
conditional create is fsspec's ``mode="create"``: S3 ``If-None-Match: *`` through s3fs,
``ifGenerationMatch=0`` through gcsfs; a store that refuses it raises ``FileExistsError``.
Modification times are the store's own (``Last-Modified``), so ages never depend on a node's clock.
Listings and existence checks bypass fsspec's listing cache: other processes change the store.

A shard is written to a local spool folder and uploaded when complete, with its index first.
Transient failures are retried with backoff; credentials come from the environment only and
never appear in a message.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from eatdist.data.remote import (
    DEFAULT_RETRIES,
    backoff_delay,
    describe,
    filesystem,
    redact,
)
from eatdist.data.shardindex import INDEX_SUFFIX
from eatdist.data.shards import AtomicShardWriter
from eatdist.errors import DataError
from eatdist.store.base import ShardSink, Store

T = TypeVar("T")
# Answers that a retry cannot change: handed to the caller as they are.
_FINAL = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class FsspecStore(Store):
    """The objects under one fsspec URL."""

    def __init__(
        self, url: str, option: str = "--output", shown: str | None = None, retries: int = DEFAULT_RETRIES
    ) -> None:
        try:
            self.fs, base = filesystem(url)
        except DataError as exc:
            raise DataError(f"{option}={redact(shown or url)}: {str(exc).split(': ', 1)[-1]}") from None
        self.base = base.rstrip("/")
        self.root = redact(url.rstrip("/"))
        self.retries = retries

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def url(self, key: str) -> str:
        return str(self.fs.unstrip_protocol(self._path(key)))

    def _call(self, verb: str, key: str, action: Callable[[], T]) -> T:
        """Return ``action()``, retried on transient failures; a lasting one is a DataError naming the URL."""
        attempt = 0
        while True:
            try:
                return action()
            except _FINAL:
                raise
            except Exception as exc:  # network stacks raise many types; each is retried, then reported
                attempt += 1
                if attempt > self.retries:
                    raise DataError(
                        f"cannot {verb} {redact(self.url(key))}: {describe(exc)} after {attempt} attempts"
                    ) from None
                time.sleep(backoff_delay(attempt))

    def put(self, key: str, data: bytes) -> None:
        try:
            self._call("write", key, lambda: self.fs.pipe_file(self._path(key), data))
        except _FINAL as exc:
            raise DataError(f"cannot write {redact(self.url(key))}: {_why(exc)}") from None

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            self._call("write", key, lambda: self.fs.pipe_file(path, data, mode="create"))
            return True
        except FileExistsError:
            # A create whose answer was lost and then retried meets its own object: still ours.
            try:
                return self.get(key) == data
            except FileNotFoundError:
                return False
        except _FINAL as exc:
            raise DataError(f"cannot write {redact(self.url(key))}: {_why(exc)}") from None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        self.fs.invalidate_cache(path)  # s3fs sizes a file from a cached listing when it has one
        return bytes(self._call("read", key, lambda: self.fs.cat_file(path)))

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        # fsspec fetches a list of paths concurrently (s3fs: batches of asyncio requests).
        paths = {self._path(k): k for k in keys}
        for path in paths:
            self.fs.invalidate_cache(path)
        found = self._call("read", keys[0] if keys else "", lambda: self.fs.cat(list(paths), on_error="omit"))
        return {paths[p]: bytes(data) for p, data in found.items() if p in paths}

    def exists(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return bool(self._call("read", key, lambda: self.fs.exists(path)))

    def list(self, prefix: str = "") -> list[str]:
        path = self._path(prefix.rstrip("/"))
        self.fs.invalidate_cache(path)
        try:
            found = self._call("list", prefix, lambda: self.fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        entries = (str(p).rstrip("/") for p in found)
        return [e.rsplit("/", 1)[-1] for e in entries if e.strip("/") != path.strip("/")]

    def list_times(self, prefix: str = "") -> dict[str, int]:
        # One listing gives every object's Last-Modified: no request per object.
        path = self._path(prefix.rstrip("/"))
        self.fs.invalidate_cache(path)
        try:
            found = self._call("list", prefix, lambda: self.fs.ls(path, detail=True))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        times = {}
        for entry in found:
            name = str(entry["name"]).rstrip("/")
            if entry.get("type") == "directory" or name.strip("/") == path.strip("/"):
                continue
            stamp = _entry_time(entry)
            key = f"{prefix}/{name.rsplit('/', 1)[-1]}" if prefix else name.rsplit("/", 1)[-1]
            stamp = stamp if stamp is not None else self.mtime_ns(key)
            if stamp is not None:
                times[name.rsplit("/", 1)[-1]] = stamp
        return times

    def delete(self, key: str) -> None:
        try:
            self._call("delete", key, lambda: self.fs.rm_file(self._path(key)))
        except FileNotFoundError:
            pass

    def mtime_ns(self, key: str) -> int | None:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        try:
            stamp = self._call("read", key, lambda: self.fs.modified(path))
        except FileNotFoundError:
            return None
        return int(stamp.timestamp() * 1e9)

    def touch(self, key: str, data: bytes) -> bool:
        # An object's Last-Modified moves only when it is written again.
        if not self.exists(key):
            return False
        self.put(key, data)
        return True

    def put_file(self, key: str, local: Path) -> None:
        """Upload the local file ``local`` as the whole object ``key``."""
        try:
            self._call("write", key, lambda: self.fs.put_file(str(local), self._path(key)))
        except _FINAL as exc:
            raise DataError(f"cannot write {redact(self.url(key))}: {_why(exc)}") from None

    def shard_writer(self, key: str) -> ShardSink:
        return SpooledShard(self, key)


def _entry_time(entry: dict[str, Any]) -> int | None:
    """Return the modification time (ns) in an fsspec listing entry, whatever the backend calls it."""
    import datetime

    for field in ("LastModified", "updated", "mtime", "modified", "created"):
        value = entry.get(field)
        if isinstance(value, datetime.datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, int | float):
            return int(value * 1e9)
        if isinstance(value, str):
            try:
                return int(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such bucket or path"
    return describe(exc)


class SpooledShard:
    """A shard written to a local spool folder, then uploaded whole: index first, then the shard."""

    def __init__(self, store: FsspecStore, key: str) -> None:
        self.store, self.key = store, key
        self._dir = Path(tempfile.mkdtemp(prefix="eatdist-spool-"))
        self._local = self._dir / key.rsplit("/", 1)[-1]
        self._writer = AtomicShardWriter(self._local)

    @property
    def count(self) -> int:
        return self._writer.count

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(sample)

    def write_members(self, members: bytes, offsets: list[int]) -> None:
        self._writer.write_members(members, offsets)

    def __enter__(self) -> SpooledShard:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._writer.__exit__(exc_type, exc, tb)
            if exc_type is None:
                # The index goes up first: a shard under its final name always has one.
                index = self._local.with_name(self._local.name + INDEX_SUFFIX)
                self.store.put_file(self.key + INDEX_SUFFIX, index)
                self.store.put_file(self.key, self._local)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
