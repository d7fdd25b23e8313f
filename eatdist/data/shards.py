"""Reading and writing WebDataset tar shards, one raw sample (a dict of bytes) at a time.

A reader goes straight to the first sample it wants through the shard's index
(:mod:`eatdist.data.shardindex`), reads exactly the bytes of its samples, and resumes at the
sample where a transient failure (a dropped connection, a timeout, a failed ``pipe:`` command)
stopped it, so every sample comes exactly once, the same bytes as from a local file.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.pool
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds

from eatdist.data.remote import (
    DEFAULT_RETRIES,
    ByteReader,
    backoff_delay,
    describe,
    is_permanent,
    is_pipe,
    is_remote,
    local_path,
    redact,
    size,
)
from eatdist.data.shardindex import INDEX_SUFFIX, ShardIndex, load_index, save_index, write_index
from eatdist.data.tarscan import Corrupt, Cut, DuplicateMember, iter_members, iter_samples
from eatdist.errors import DataError

log = logging.getLogger(__name__)
# Remote reads fetch this much per ranged request; local reads, less.
REMOTE_CHUNK = 8 << 20
LOCAL_CHUNK = 1 << 20
_warned: set[tuple[str, str]] = set()


def shard_pool(workers: int) -> multiprocessing.pool.Pool:
    """A pool of ``workers`` processes for per-shard jobs (synth, convert, check).

    Started through a fork server, not by forking this process: a caller that already runs threads
    (torch's, a tracker's, a notebook's) can hold a lock at the moment of a fork, and the forked
    worker then waits on it forever. Jobs and results travel pickled, as with any pool.
    """
    return multiprocessing.get_context("forkserver").Pool(workers)


def _warn_once(url: str, kind: str, message: str) -> None:
    if (url, kind) not in _warned:
        _warned.add((url, kind))
        log.warning("%s", message)


def _is_cut_for_good(url: str, src: ByteReader | None, cut: Cut) -> bool:
    """Tell a shard that really ends at ``cut.offset`` from a read that was interrupted there."""
    if not is_remote(url):
        return True
    if is_pipe(url):
        try:
            if src is not None:
                src.close(check=True)
        except Exception:  # the command failed: try again
            return False
        return True
    try:
        return size(url) <= cut.offset
    except Exception:  # cannot tell: treat it as interrupted, which retries
        return False


def iter_shard(
    url: str | Path,
    start: int = 0,
    stop: int | None = None,
    *,
    retries: int | None = None,
    listed: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield raw samples (``{"__key__": ..., ext: bytes}``) at positions [start, stop) of one shard, nothing decoded.

    ``url`` is a local path or any URL :mod:`eatdist.data.remote` opens. A start inside the shard
    is reached through its index; opening and reading are retried ``retries`` times (default 3)
    with exponential backoff, resuming at the sample that failed. ``listed``, the count
    ``dataset.json`` gives, is compared with the shard's real count (a warning when they differ);
    a shard holding fewer samples than ``stop`` is warned about and ends early.

    Raises:
        DataError: naming the shard (credentials stripped) when it is missing or unreadable after
            the retries, is not a tar archive, or is truncated: then every complete sample before
            the cut has been yielded and the message says "truncated" and how many were read.
    """
    url = str(url)
    retries = DEFAULT_RETRIES if retries is None else retries
    if start < 0 or (stop is not None and stop < start):
        raise ValueError(f"invalid sample range [{start}, {stop}) for {redact(url)}")
    if stop == start:
        return
    name = redact(url)
    if not is_remote(url) and not os.path.isfile(local_path(url)):
        raise DataError(f"shard file not found: {url}")
    index: ShardIndex | None = None
    if start > 0 or listed is not None or (stop is not None and is_remote(url)):
        index = load_index(url, retries)
    if index is not None and listed is not None and not index.truncated and index.count != listed:
        _warn_once(url, "listed", f"shard {name} holds {index.count} samples, dataset.json lists {listed}")
    if index is None and start > 0 and is_remote(url):
        _warn_once(url, "index", f"shard {name} has no index ({INDEX_SUFFIX}): reading it from its start")

    position = start
    attempt = 0
    starts: list[int] = []  # a remote shard read in full without an index gets one cached
    while True:
        src: ByteReader | None = None
        failure: BaseException | None = None
        try:
            if index is not None:
                last = index.count if stop is None else min(stop, index.count)
                if position < last:
                    lo, hi = index.offsets[position], index.offsets[last]
                    src = ByteReader(url, lo, hi, REMOTE_CHUNK if is_remote(url) else LOCAL_CHUNK)
                    samples = iter_samples(iter_members(src), set(index.offsets))
                    for sample in samples:
                        yield sample.raw()
                        position += 1
                        attempt = 0
                if index.truncated and (stop is None or stop > index.count):
                    raise _truncated(name, index.size or index.offsets[-1], position - start)
                if stop is not None and stop > index.count:
                    _warn_once(url, "short", f"shard {name} holds {index.count} samples, fewer than the {stop} planned")
                return
            src = ByteReader(url, 0, None, REMOTE_CHUNK if is_remote(url) else LOCAL_CHUNK)
            seen = 0
            for sample in iter_samples(iter_members(src)):
                if seen == len(starts):
                    starts.append(sample.start)
                seen += 1
                if seen <= position:
                    continue
                if stop is not None and position >= stop:
                    return
                yield sample.raw()
                position += 1
                attempt = 0
            if stop is not None and stop > position:
                _warn_once(url, "short", f"shard {name} holds {position} samples, fewer than the {stop} planned")
            if is_remote(url) and not is_pipe(url) and seen == len(starts):
                save_index(url, ShardIndex([*starts, src.pos], None))
            return
        except Cut as cut:
            if _is_cut_for_good(url, src, cut):
                raise _truncated(name, cut.offset, position - start) from None
            failure = cut
        except Corrupt as exc:
            if index is not None and position == start and src is not None and exc.offset == src_start(index, start):
                # The index does not describe this file (the shard was replaced): read it from its start.
                _warn_once(url, "stale", f"the index of shard {name} does not match it: reading it from its start")
                index = None
                continue
            raise DataError(f"shard {name} is not a readable tar archive ({exc})") from None
        except DuplicateMember as exc:
            raise KeyClash(f"shard {name}: {exc} (a key with a dot? WebDataset splits keys there)") from None
        except DataError:
            raise
        except Exception as exc:  # network stacks raise many types: each is retried, then reported
            if is_permanent(exc):
                if isinstance(exc, FileNotFoundError) and not is_remote(url):
                    raise DataError(f"shard file not found: {url}") from None
                raise DataError(f"cannot read shard {name}: {describe(exc)}") from None
            failure = exc
        finally:
            if src is not None:
                src.close()
        attempt += 1
        if attempt > retries:
            raise DataError(
                f"cannot read shard {name} at sample {position}: {describe(failure)} (gave up after {attempt} attempts)"
            )
        log.info("retrying shard %s at sample %d: %s", name, position, describe(failure))
        time.sleep(backoff_delay(attempt))


class TruncatedShard(DataError):
    """A shard cut inside its archive: every complete sample before the cut was read."""


class KeyClash(DataError):
    """A shard where two members of one sample share an extension (keys merged at a dot): read up to there."""


def _truncated(name: str, offset: int, read: int) -> DataError:
    if offset == 0:
        return DataError(f"shard {name} is not a readable tar archive (empty, or truncated in its first header)")
    return TruncatedShard(f"shard {name} is truncated (cut at byte {offset}): read {read} complete samples")


def src_start(index: ShardIndex, start: int) -> int:
    """Return the byte offset a read of samples from ``start`` begins at."""
    return index.offsets[min(start, index.count)]


def check_key(key: str, where: str | Path) -> None:
    """Refuse a key WebDataset cannot read back: a dot in its file name would split it.

    Raises:
        DataError: naming the key, the shard and what it would read back as.
    """
    base = key.rsplit("/", 1)[-1]
    if "." in base:
        head = key[: len(key) - len(base)] + base.split(".", 1)[0]
        raise DataError(
            f"{where}: sample key '{key}' contains a dot; WebDataset splits keys at the first dot, so it would "
            f"read back as key '{head}' (merged with its neighbours); use letters, digits, _ - / only"
        )


class _FileTarWriter(wds.TarWriter):
    """webdataset's ``TarWriter`` with tarfile writing straight to the file (mode ``w``): the same
    bytes as its stream mode (``w|``), whose buffer copies all it holds again for each 10 KiB block
    it passes on, ten times the cost of the write itself for a batch of members of 150 KiB."""

    @staticmethod
    def tarmode(fileobj: Any, compress: Any = None) -> str:
        return "w"


class AtomicShardWriter:
    """Write a tar shard under a temporary name; rename it to ``path`` only when complete.

    A job killed mid-shard leaves a ``.tmp`` file, never a partial shard under the final name.
    The shard's index (``<name>.idx.json``) is written just before the rename, so a shard under its
    final name always has one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self._file = open(self.tmp_path, "wb")
        # mtime fixed so the same samples give byte-identical shards; an int, since a float mtime
        # gives every member a PAX header (1 KiB more and twice the time per member).
        self._writer = _FileTarWriter(self._file, encoder=False, mtime=0, user="eatdist", group="eatdist")
        self._offsets: list[int] = []
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample: ``__key__`` plus extension → bytes (str is written as UTF-8).

        Raises:
            DataError: when the key holds a dot (WebDataset would read it back split).
        """
        check_key(str(sample.get("__key__", "")), self.path)
        # The tar's own offset is where this sample's first header lands.
        self._offsets.append(self._writer.tarstream.offset)
        self._writer.write(sample)
        self.count += 1

    def write_members(self, members: bytes, offsets: list[int]) -> None:
        """Add samples already laid out as tar members (as :meth:`write` lays them out, e.g. by
        :func:`eatdist.explain.encode.tar_members` in another process); ``offsets``: where each
        sample starts in ``members``."""
        stream = self._writer.tarstream
        self._offsets += [stream.offset + o for o in offsets]
        stream.fileobj.write(members)  # the file itself (see _FileTarWriter)
        stream.offset += len(members)  # tarfile pads the archive from its offset when it closes
        self.count += len(offsets)

    def __enter__(self) -> AtomicShardWriter:
        return self

    def _finish(self, ok: bool) -> None:
        """Close the tar; when ``ok``, flush it to disk, write its index and rename it into place."""
        end = self._writer.tarstream.offset
        try:
            self._writer.close()
            if ok:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if ok:
            index = ShardIndex([*self._offsets, end], self.tmp_path.stat().st_size)
            write_index(self.path.with_name(self.path.name + INDEX_SUFFIX), index)
            os.replace(self.tmp_path, self.path)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ok = exc_type is None
        try:
            self._finish(ok)
        except OSError:
            if ok:
                raise
            # The shard failed already; a close that cannot flush (a full disk) adds nothing to that.
        finally:
            # Whatever failed (the samples, a full disk at close), no temporary file stays behind.
            self.tmp_path.unlink(missing_ok=True)
