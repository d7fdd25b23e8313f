"""Reading and writing WebDataset tar shards, one raw sample (a dict of bytes) at a time."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from eatdist.errors import DataError


def iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one tar shard: ``{"__key__": ..., ext: bytes, ...}``.

    Nothing is decoded here. Raises:
        DataError: when the file is missing or is not a readable tar archive.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"shard file not found: {path}")

    def reraise(exc: Exception) -> bool:
        raise DataError(f"shard {path} is not a readable tar archive ({exc})") from exc

    stream = url_opener([{"url": path}], handler=reraise)
    files = tar_file_expander(stream, handler=reraise)
    yield from group_by_keys(files, handler=reraise)


class AtomicShardWriter:
    """Write a tar shard under a temporary name; rename it to ``path`` only when complete.

    A job killed mid-shard leaves a ``.tmp`` file, never a partial shard under the final name.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self._file = open(self.tmp_path, "wb")
        # mtime fixed so the same samples give byte-identical shards.
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0.0, user="eatdist", group="eatdist")
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample: ``__key__`` plus extension → bytes (str is written as UTF-8)."""
        self._writer.write(sample)
        self.count += 1

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._writer.close()
        if exc_type is None:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        if exc_type is None:
            os.replace(self.tmp_path, self.path)
        else:
            self.tmp_path.unlink(missing_ok=True)
