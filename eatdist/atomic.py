"""Files written whole or not at all, and the one line for a disk that cannot take them.

Every output a user keeps (the model package, final metrics, reports, evaluation and explanation
summaries, exported models) is written under a temporary name beside its final one and renamed
into place when complete, so a full disk, a quota or a read-only folder leaves the previous file
or nothing, never a half-written one under the final name. Where the size is known beforehand
the free space is checked first; either way the failure becomes a :class:`DiskError` whose
message names the path, what it needed and what is free (the checkpoint path says the same).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eatdist.errors import EatdistError

# Room kept beyond an estimate: metadata, file-system blocks.
SPACE_MARGIN = 1.05
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)
# Libraries that write through their own I/O (safetensors' Rust writer, torch's zip writer) say
# the OS error in words only.
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
_WORDS = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS,
    "permission denied": errno.EACCES,
    "file too large": errno.EFBIG,
    "unexpected pos": errno.ENOSPC,  # torch's zip writer on a full disk
}


class DiskError(EatdistError):
    """An output that cannot be written: disk full, quota exceeded, read-only or forbidden folder."""


def human_size(n: float) -> str:
    """Return ``n`` bytes as a short readable size: '812 bytes', '37 KiB', '4.4 MiB', '1.2 GiB'."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if n < 10 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def free_bytes(path: str | Path) -> int | None:
    """Return the bytes free on the file system holding ``path`` (its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def os_error_code(exc: BaseException) -> int | None:
    """Return the errno behind ``exc``: its own, or one its message names ("No space left on device")."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    text = str(exc)
    found = _OS_ERROR_TEXT.search(text)
    if found:
        return int(found.group(1) or found.group(2))
    lower = text.lower()
    return next((c for words, c in _WORDS.items() if words in lower), None)


def full_disk_line(path: str | Path, what: str, needed: int | None) -> str:
    """Return 'disk full at PATH: WHAT needs about N, M free' (without the need when unknown)."""
    free = free_bytes(path)
    shown = human_size(free) if free is not None else "unknown"
    if needed is None:
        return f"disk full at {path}: {what} could not be written ({shown} free)"
    return f"disk full at {path}: {what} needs about {human_size(needed)}, {shown} free"


def write_error(exc: BaseException, path: str | Path, what: str, needed: int | None = None) -> DiskError | None:
    """Return the :class:`DiskError` for a failed write of ``what`` to ``path``, or None when ``exc`` is
    not a full, read-only or forbidden disk (a bug or another condition, raised as it is)."""
    if isinstance(exc, DiskError):
        return exc
    code = os_error_code(exc)
    if code in _FULL:
        cause = "disk quota exceeded" if code == errno.EDQUOT else None
        line = full_disk_line(path, what, needed)
        return DiskError(line.replace("disk full", cause, 1) if cause else line)
    if code in _DENIED:
        return DiskError(f"cannot write {what} to {path}: {os.strerror(code).lower()}")
    return None


def check_space(path: str | Path, what: str, needed: int) -> None:
    """Refuse to start writing ``what`` (``needed`` bytes) at ``path`` when the disk cannot hold it.

    Raises:
        DiskError: naming the path, the size needed and the space free.
    """
    free = free_bytes(path)
    if free is not None and free < needed * SPACE_MARGIN:
        raise DiskError(full_disk_line(path, what, needed))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder, to the disk: a full disk fails here, before the rename."""
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a folder already there is swapped out and then removed."""
    if tmp.is_dir() and final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_path(path: str | Path, what: str, needed: int | None = None, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write ``what`` into (a folder with ``folder``); on
    success rename it to ``path`` (replacing what was there), on failure remove it.

    ``needed`` (bytes), when known, is checked against the free space before anything is written.
    Raises:
        DiskError: naming ``path``, the size needed and the space free, when the disk is full, over
            quota or not writable; nothing is left under ``path`` or the temporary name.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if needed is not None:
            check_space(final, what, needed)
        if folder:
            tmp.mkdir()
        yield tmp
        _fsync(tmp)
        _publish(tmp, final)
    except BaseException as exc:
        _remove(tmp)
        error = write_error(exc, final, what, needed)
        if error is None or error is exc:
            raise
        raise error from None


def write_bytes(path: str | Path, data: bytes, what: str) -> Path:
    """Write ``data`` to ``path`` whole or not at all; return ``path``.

    Raises:
        DiskError: as :func:`atomic_path`.
    """
    with atomic_path(path, what, len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, what: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all; return ``path``.

    Raises:
        DiskError: as :func:`atomic_path`.
    """
    return write_bytes(path, text.encode("utf-8"), what)


def write_json(path: str | Path, data: Any, what: str, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON to ``path`` whole or not at all; return ``path``.

    Raises:
        DiskError: as :func:`atomic_path`.
    """
    return write_text(path, json.dumps(data, indent=indent), what)
