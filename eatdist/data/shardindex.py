"""The per-shard index of sample byte offsets, so a reader starting inside a shard seeks instead of skipping.

Format (``<shard>.idx.json`` beside ``<shard>``, plain JSON, never unpickled)::

    {"format": "eatdist-shard-index", "version": 1, "samples": N, "size": BYTES,
     "offsets": [o_0, o_1, ..., o_N]}

``o_i`` is the byte offset of sample ``i``'s first tar header and ``o_N`` the end of the last
sample, so samples ``[a, b)`` are exactly bytes ``[o_a, o_b)`` of the tar: a reader seeks there
(locally) or asks for that byte range (remotely). ``size`` is the tar's size when indexed; a local
index whose size differs from the shard's is stale and rebuilt.

:class:`~eatdist.data.shards.AtomicShardWriter` writes the index before the shard's rename, so
``synth``, ``convert`` and ``explain`` outputs carry one. A local shard without one gets it built
by reading the tar headers only (seeking over the data) and cached beside it, or, where that
folder is read-only, in the user cache (``$EATDIST_CACHE_DIR``, else ``$XDG_CACHE_HOME/eatdist``,
else ``~/.cache/eatdist``). A remote shard's index is fetched with one small request; a remote
shard without one is read from its start, and its index is cached locally once read in full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eatdist.data.remote import (
    DEFAULT_RETRIES,
    ByteReader,
    is_pipe,
    is_remote,
    local_path,
    read_bytes,
    redact,
    with_retries,
)
from eatdist.data.tarscan import Corrupt, DuplicateMember, scan_offsets
from eatdist.errors import DataError

log = logging.getLogger(__name__)
INDEX_SUFFIX = ".idx.json"
FORMAT = "eatdist-shard-index"
VERSION = 1
# Header scans read one block at a time and seek over the data.
_SCAN_CHUNK = 4096


@dataclass(frozen=True)
class ShardIndex:
    """Byte offsets of a shard's samples: sample ``i`` is bytes ``[offsets[i], offsets[i + 1])``.

    ``truncated`` marks an index built from a cut shard (it lists the complete samples only;
    such an index is never cached).
    """

    offsets: list[int]
    size: int | None = None
    truncated: bool = False

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "samples": self.count, "size": self.size, "offsets": self.offsets}

    @classmethod
    def from_json(cls, data: Any) -> ShardIndex | None:
        """Return the index in ``data``, or None when it is not a valid index of this version."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            return None
        offsets, size = data.get("offsets"), data.get("size")
        if (
            not isinstance(offsets, list)
            or not offsets
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or any(b < a for a, b in zip(offsets, offsets[1:], strict=False))
            or data.get("samples") != len(offsets) - 1
            or not (size is None or isinstance(size, int))
        ):
            return None
        return cls(offsets, size)


def index_location(url: str) -> str | None:
    """Return where the index of the shard at ``url`` lives beside it (None for a ``pipe:``)."""
    if is_pipe(url):
        return None
    base, sep, query = url.partition("?")
    return base + INDEX_SUFFIX + sep + query


def cache_location(url: str) -> Path:
    """Return the user-cache file for the index of ``url`` (named by a hash of its credential-free form)."""
    root = os.environ.get("EATDIST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eatdist"
    )
    name = local_path(url) if not is_remote(url) else redact(url).split("?", 1)[0]
    digest = hashlib.sha256(os.path.abspath(name).encode() if not is_remote(url) else name.encode()).hexdigest()
    return Path(root) / "shard-index" / f"{digest[:32]}{INDEX_SUFFIX}"


def write_index(path: str | Path, index: ShardIndex) -> None:
    """Write ``index`` to the local file ``path`` atomically (temporary name, then rename).

    Raises:
        OSError: when the folder cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(index.to_json(), separators=(",", ":")))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_local(path: str | Path) -> ShardIndex | None:
    try:
        return ShardIndex.from_json(json.loads(Path(path).read_bytes()))
    except (OSError, ValueError):
        return None


def save_index(url: str, index: ShardIndex) -> None:
    """Cache ``index`` beside a local shard, else in the user cache; a cut shard's index is not kept."""
    if index.truncated:
        return
    targets = [] if is_remote(url) else [Path(local_path(url) + INDEX_SUFFIX)]
    for target in [*targets, cache_location(url)]:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_index(target, index)
            return
        except OSError:
            continue
    log.debug("could not cache the index of %s", redact(url))


def build_index(url: str) -> ShardIndex:
    """Scan a shard's tar headers (seeking over the data where it can) and return its index.

    Raises the store's errors for a missing or unreadable file, and:
        DataError: when the file is not a tar archive.
    """
    src = ByteReader(url, chunk=_SCAN_CHUNK)
    try:
        starts, end, cut = scan_offsets(src)
    except (Corrupt, DuplicateMember) as exc:
        raise DataError(f"shard {redact(url)} is not a readable tar archive ({exc})") from None
    finally:
        src.close()
    size = None if is_remote(url) else os.path.getsize(local_path(url))
    return ShardIndex([*starts, end], size, truncated=cut)


def load_index(url: str, retries: int = DEFAULT_RETRIES) -> ShardIndex | None:
    """Return the index of the shard at ``url``, or None where there is none to be had cheaply.

    Local: the index beside the shard or in the user cache when its size matches, else one built
    now (and cached). Remote: the index beside the shard (one small request), else the user cache,
    else None. ``pipe:``: None. Raises:
        DataError: when a local shard cannot be read, or a remote index still fails after retries.
    """
    if is_pipe(url):
        return None
    if not is_remote(url):
        path = local_path(url)
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise DataError(f"shard file not found: {path}") from exc
        for candidate in (path + INDEX_SUFFIX, cache_location(url)):
            index = _read_local(candidate)
            if index is not None and index.size == size:
                return index
        try:
            index = build_index(url)
        except OSError as exc:
            raise DataError(f"shard {path} cannot be read ({exc.strerror or exc})") from None
        save_index(url, index)
        return index
    location = index_location(url)
    assert location is not None

    def fetch() -> bytes | None:
        try:
            return read_bytes(location)
        except (FileNotFoundError, PermissionError):  # S3 answers 403 for a missing key without list rights
            return None

    data = with_retries(location, fetch, retries)
    if data is None:
        return _read_local(cache_location(url))
    try:
        return ShardIndex.from_json(json.loads(data))
    except ValueError:
        log.warning("ignoring the unreadable shard index %s", redact(location))
        return None
