"""An output store in a local (or network-mounted) folder.

Whole writes are a temporary name and a rename; the conditional create is ``link(2)`` of a
finished temporary file (atomic on NFS too), else ``O_EXCL`` where hard links are not supported.
"""

from __future__ import annotations

import glob
import os
import uuid
from pathlib import Path

from eatdist.atomic import write_bytes
from eatdist.data.shards import AtomicShardWriter
from eatdist.store.base import ShardSink, Store


class LocalStore(Store):
    """The objects of a folder: keys are paths relative to it."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root)
        self.root = str(self.path)

    def file(self, key: str) -> Path:
        """Return the local file of ``key``."""
        return self.path / key if key else self.path

    def url(self, key: str) -> str:
        return str(self.file(key))

    def _temp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")

    def put(self, key: str, data: bytes) -> None:
        # Temporary name, flush, rename: a full or read-only disk is one DiskError line naming the file.
        write_bytes(self.file(key), data, f"the file {Path(key).name}")

    def create(self, key: str, data: bytes) -> bool:
        path = self.file(key)
        tmp = self._temp(path)
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: readers treat a half-written claim as live
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        return self.file(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.file(key).exists()

    def list(self, prefix: str = "") -> list[str]:
        try:
            return os.listdir(self.file(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_times(self, prefix: str = "") -> dict[str, int]:
        times = {}
        try:
            with os.scandir(self.file(prefix)) as entries:
                for entry in entries:
                    try:
                        times[entry.name] = entry.stat().st_mtime_ns
                    except FileNotFoundError:  # removed since the listing
                        continue
        except (FileNotFoundError, NotADirectoryError):
            pass
        return times

    def delete(self, key: str) -> None:
        self.file(key).unlink(missing_ok=True)

    def mtime_ns(self, key: str) -> int | None:
        try:
            return self.file(key).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def touch(self, key: str, data: bytes) -> bool:
        try:
            os.utime(self.file(key))
            return True
        except FileNotFoundError:
            return False

    def now(self, probe: str) -> float:
        path = self.file(probe)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return path.stat().st_mtime

    def shard_writer(self, key: str) -> ShardSink:
        return AtomicShardWriter(self.file(key))

    def clean_partial(self, name: str) -> None:
        for stale in self.path.glob(f".{glob.escape(name)}.*.tmp"):
            stale.unlink(missing_ok=True)

    def partial_among(self, names: set[str], listing: list[str]) -> set[str]:
        # What clean_partial's pattern matches, ".<name>.<anything>.tmp", read off one listing.
        found = set()
        for entry in listing:
            if entry.startswith(".") and entry.endswith(".tmp"):
                stem = entry[1:-4]
                found.update(stem[:i] for i, c in enumerate(stem) if c == "." and stem[:i] in names)
        return found
