"""Reading a tar shard member by member, and members into WebDataset samples, knowing every byte offset.

Python's ``tarfile`` (which WebDataset uses) reads a stream without saying where each member
starts, ends silently at a truncated header, and WebDataset's grouping drops the last complete
sample when the archive is cut. Seeking into a shard, resuming a read where it failed and
telling a cut archive from a complete one all need those offsets, so headers are read here,
each parsed by ``tarfile.TarInfo.frombuf`` (ustar, GNU and pax, as ``tarfile`` writes them).

Samples follow WebDataset's rules: a member ``dir/key.ext.more`` belongs to key ``dir/key``
(the split is at the first dot of the file name) with extension ``ext.more`` in lower case;
consecutive members with the same key form one sample; ``__*__`` members are skipped.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from webdataset.tariterators import base_plus_ext

from eatdist.data.remote import ByteReader

BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(BLOCK)
_META = re.compile(r"__[^/]*__($|/)")


class Cut(Exception):
    """The bytes ended inside a member, or before the archive's end blocks, at ``offset``."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"the archive ends at byte {offset}, inside a member or before its end blocks")
        self.offset = offset


class Corrupt(Exception):
    """A header at ``offset`` is not a tar header (bad checksum, garbage)."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"no valid tar header at byte {offset} ({reason})")
        self.offset = offset


@dataclass
class Member:
    """One regular file of the archive: where its first header starts, where its data ends."""

    start: int
    end: int
    name: str
    data: bytes | None


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length if length > 0 else len(data)
    return records


def iter_members(src: ByteReader, read_data: bool = True) -> Iterator[Member]:
    """Yield the regular files of the archive in ``src`` from its current position.

    Stops at the end blocks or where ``src`` reaches its ``end``. With ``read_data=False`` the data
    is skipped (seeked over where ``src`` can seek) and ``Member.data`` is None. Raises:
        Cut: when the bytes end inside a member or before the end blocks.
        Corrupt: when a header is invalid.
    """
    first: int | None = None
    pax: dict[str, str] = {}
    longname: str | None = None
    while True:
        if src.at_end():
            return
        pos = src.pos
        header = src.read(BLOCK)
        if len(header) < BLOCK:
            raise Cut(src.pos)
        if header == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise Corrupt(pos, str(exc)) from None
        first = pos if first is None else first
        size = int(pax.get("size", info.size)) if info.type not in (tarfile.XHDTYPE, tarfile.XGLTYPE) else info.size
        padded = -(-size // BLOCK) * BLOCK
        if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME):
            data = src.read(padded)
            if len(data) < padded:
                raise Cut(src.pos)
            if info.type == tarfile.GNUTYPE_LONGNAME:
                longname = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                pax.update(_pax_records(data[:size]))
            continue
        name = pax.get("path") or longname or info.name
        if info.type in tarfile.REGULAR_TYPES:
            data = src.read(size) if read_data else None
            rest = padded - (size if read_data else 0)
            if (data is not None and len(data) < size) or src.skip(rest) < rest:
                raise Cut(src.pos)
            yield Member(first, src.pos, name, data)
        elif src.skip(padded) < padded:
            raise Cut(src.pos)
        first, pax, longname = None, {}, None


def split_name(name: str) -> tuple[str, str] | None:
    """Return WebDataset's ``(key, extension)`` for a member name, or None for a member it skips."""
    if "/" not in name and name.startswith("__") and name.endswith("__") or _META.match(name):
        return None
    key, ext = base_plus_ext(name)
    if key is None:
        return None
    return key, ext.lower()


@dataclass
class Sample:
    """One sample: its members' data by extension, and its byte range in the archive."""

    key: str
    start: int
    end: int
    fields: dict[str, Any]

    def raw(self) -> dict[str, Any]:
        """Return the sample as WebDataset gives it: ``{"__key__": key, ext: bytes, ...}``."""
        return {"__key__": self.key, **self.fields}


class DuplicateMember(Exception):
    """Two members of one sample have the same extension."""


def iter_samples(members: Iterator[Member], boundaries: set[int] | None = None) -> Iterator[Sample]:
    """Group consecutive members with the same key into samples, yielding each as soon as it is complete.

    A sample is complete when the next sample's first header is read, or the archive (or range)
    ends. When the bytes are cut (:class:`Cut`), the sample in progress is yielded only if it is
    complete: its end is a sample boundary of the shard's index (``boundaries``), or, without an
    index, all its members were read and it has the same extensions as the sample before it.
    Then ``Cut`` is raised. Raises:
        Cut, Corrupt: from the member reader; DuplicateMember: two members ``key.ext`` in one sample.
    """
    current: Sample | None = None
    previous_exts: set[str] | None = None
    try:
        for member in members:
            parts = split_name(member.name)
            if parts is None:
                continue
            key, ext = parts
            if current is not None and key != current.key:
                previous_exts = set(current.fields)
                yield current
                current = None
            if current is None:
                current = Sample(key, member.start, member.end, {})
            if ext in current.fields:
                raise DuplicateMember(f"sample '{key}' has two '{ext}' members")
            current.fields[ext] = member.data
            current.end = member.end
    except Cut:
        if current is not None and (
            current.end in boundaries if boundaries is not None else set(current.fields) == previous_exts
        ):
            yield current
        raise
    if current is not None:
        yield current


# Extensions that make a group of members a sample of its own (an image), and labels beside it.
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def unmerge(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the samples WebDataset merged into ``sample`` because their keys hold a dot.

    WebDataset splits a member name at the first dot of its file name, so ``photo.v2.jpg`` and
    ``photo.v2.json`` come as key ``photo`` with extensions ``v2.jpg`` and ``v2.json``, grouped with
    a neighbour ``photo`` if there is one. A group of dotted extensions that holds an image is taken
    for a sample of its own (key ``photo.v2``, extensions ``jpg`` and ``json``) when the sample has
    no image of its own, or when the group has the same extensions as the sample's own members;
    any other dotted extension (``seg.png`` beside a ``jpg``) stays a field of ``sample``. Returns
    ``[sample]`` itself when nothing was merged; ``__*__`` entries are copied to every part.
    """
    if not any("." in k for k in sample if not k.startswith("__")):
        return [sample]  # the common case, checked first: it runs for every training sample
    meta = {k: v for k, v in sample.items() if k.startswith("__")}
    own = {k: v for k, v in sample.items() if not k.startswith("__") and "." not in k}
    groups: dict[str, dict[str, Any]] = {}
    for ext, value in sample.items():
        if not ext.startswith("__") and "." in ext:
            prefix, sub = ext.rsplit(".", 1)
            groups.setdefault(prefix, {})[sub] = value
    has_image = any(e in own for e in _IMAGE_EXTS)
    parts = {
        prefix: fields
        for prefix, fields in groups.items()
        if any(e in fields for e in _IMAGE_EXTS) and (not has_image or set(fields) == set(own))
    }
    if not parts:
        return [sample]
    key = str(sample.get("__key__", ""))
    rest = {ext: v for ext, v in sample.items() if not ext.startswith("__") and "." in ext
            and ext.rsplit(".", 1)[0] not in parts}  # fmt: skip
    out = [{**meta, **own, **rest}] if own or rest else []
    out += [{**meta, "__key__": f"{key}.{prefix}", **fields} for prefix, fields in parts.items()]
    return out


def scan_offsets(src: ByteReader) -> tuple[list[int], int, bool]:
    """Read only the headers of the archive in ``src``; return ``(starts, end, cut)``.

    ``starts`` are the offsets of the samples' first headers and ``end`` the offset just past the
    last one. When the archive is cut (``cut`` True) they cover its complete samples only.
    Raises:
        Corrupt, DuplicateMember: as :func:`iter_samples`.
    """
    starts: list[int] = []
    end = src.pos
    try:
        for sample in iter_samples(iter_members(src, read_data=False)):
            starts.append(sample.start)
            end = sample.end
    except Cut:
        return starts, end, True
    return starts, end, False
