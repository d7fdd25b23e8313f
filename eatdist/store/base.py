"""The interface of an output store, the choice of backend for a path or URL, and the refusal of the rest.

A store holds the objects of one output root under ``/``-separated keys (``test-000001.tar``,
``_claims/test-000001.tar.claim-0``). Every write is whole: an object appears complete or not
at all (a local file is written under a temporary name and renamed, an object store's PUT is
atomic). The one other primitive is a conditional create, which the claim protocol builds on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

from eatdist.data.remote import is_pipe, is_remote, local_path, redact
from eatdist.errors import ConfigError, DataError

# Schemes fsspec can read but never write: refused as outputs with a word on why.
READ_ONLY = ("http://", "https://", "ftp://")


class ShardSink(Protocol):
    """A tar shard being written: samples in, published whole by ``__exit__`` without an error."""

    count: int

    def write(self, sample: dict[str, Any]) -> None: ...

    def write_members(self, members: bytes, offsets: list[int]) -> None: ...

    def __enter__(self) -> ShardSink: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...


class Store(ABC):
    """Where the objects of one output root live: a local folder or an fsspec URL."""

    #: The root as users name it (credentials stripped), for messages.
    root: str

    @abstractmethod
    def url(self, key: str) -> str:
        """Return the path or URL readers open for ``key`` (e.g. with :func:`eatdist.data.shards.iter_shard`)."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` as the whole object ``key``, replacing any. Raises DataError or OSError."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Create ``key`` holding ``data`` only if it does not exist; return whether this call created it."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object ``key``. Raises FileNotFoundError when it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Return True when ``key`` exists now (never from a cached listing)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Return the names directly under the folder ``prefix`` (empty when there is none)."""

    def list_times(self, prefix: str = "") -> dict[str, int]:
        """Return the names directly under ``prefix`` with their modification times (ns, the store's clock)."""
        times = {}
        for name in self.list(prefix):
            stamp = self.mtime_ns(f"{prefix}/{name}" if prefix else name)
            if stamp is not None:
                times[name] = stamp
        return times

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; one that is already gone is fine."""

    @abstractmethod
    def mtime_ns(self, key: str) -> int | None:
        """Return when ``key`` was last written, on the store's clock (ns), or None when it does not exist."""

    @abstractmethod
    def touch(self, key: str, data: bytes) -> bool:
        """Refresh ``key``'s modification time (rewriting ``data`` where that is how); False when it is gone."""

    @abstractmethod
    def shard_writer(self, key: str) -> ShardSink:
        """Return a writer of the tar shard ``key`` and its index, published when it closes without an error."""

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Return the objects of ``keys`` that exist (key → bytes); a store may fetch them concurrently."""
        found = {}
        for key in keys:
            try:
                found[key] = self.get(key)
            except FileNotFoundError:
                continue
        return found

    def clean_partial(self, name: str) -> None:  # noqa: B027  (most stores leave nothing partial)
        """Remove what a writer of shard ``name`` killed mid-way left in the store."""

    def partial_among(self, names: set[str], listing: list[str]) -> set[str]:
        """Return those shard ``names`` that a writer killed mid-way left something of
        (:meth:`clean_partial` removes it), as ``listing`` (of the store's top level) shows them."""
        return set()

    def now(self, probe: str) -> float:
        """Return the store's current time (seconds): the modification time of ``probe``, written just now."""
        self.put(probe, b"")
        stamp = self.mtime_ns(probe)
        if stamp is None:
            raise DataError(f"{self.url(probe)} vanished just after it was written")
        return stamp / 1e9

    def put_json(self, key: str, data: Any) -> None:
        """Write ``data`` as indented JSON to ``key`` (whole)."""
        import json

        self.put(key, json.dumps(data, indent=1).encode())


def open_store(root: str | Path, option: str = "--output", shown: str | None = None) -> Store:
    """Return the store of an output ``root``: a local folder (or ``file://`` URL) or an fsspec URL.

    Messages name ``option=shown`` (``shown`` defaults to ``root``: the value the user gave).

    Raises:
        DataError: for a ``pipe:`` or read-only scheme, an unknown scheme, or a store package
            (s3fs, gcsfs) that is not installed, naming ``option`` and the root.
    """
    text = str(root)
    if not is_remote(text):
        from eatdist.store.local import LocalStore

        return LocalStore(Path(local_path(text)))
    if is_pipe(text) or text.lower().startswith(READ_ONLY):
        raise DataError(
            f"{option}={redact(shown or text)}: cannot write there (read-only); name a folder or an object store URL "
            "(s3://, gs://, ...)"
        )
    from eatdist.store.remote import FsspecStore

    return FsspecStore(text, option, shown)


def require_local(path: str | Path, option: str, doing: str) -> Path:
    """Return ``path`` as a local path, or refuse a URL in one line: what writes there needs a local folder.

    ``doing`` says what the option writes ("training writes checkpoints and logs to a local folder").
    Raises:
        ConfigError: for a URL (``s3://``, ``gs://``, an unknown ``foo://``) or a ``pipe:`` command.
    """
    text = str(path)
    if is_remote(text):
        raise ConfigError(f"{option}={redact(text)}: {doing}; give a local path (copy it to the store afterwards)")
    return Path(local_path(text))
