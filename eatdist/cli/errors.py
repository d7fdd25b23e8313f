"""The CLI's one error path: what a user can cause or meet becomes one line on stderr.

``main()`` hands every exception that reaches it to :func:`describe`; what it recognises (an
:class:`~eatdist.errors.EatdistError`, an OS error about a path a user gave, a DataLoader
worker's wrapped copy of either, a collective broken by another rank's failure) becomes one line
``[rank N] eatdist: error: ...`` and an exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

from eatdist import dist
from eatdist.atomic import free_bytes, human_size
from eatdist.errors import EatdistError

# Exit codes of the ``eatdist`` command (also in ``eatdist --help``).
EXIT_OK = 0
EXIT_INCOMPLETE = 1  # the job ran but is not complete: explain shards left, check problems, backbone violations
EXIT_ERROR = 2  # a user error, one line on stderr (argparse uses 2 as well)
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: a checkpoint was saved; rerun with --resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES = (
    "exit codes: 0 done; 1 job incomplete (explain shards left, check or backbones --check found problems); "
    "2 error (one line 'eatdist: error: ...'); 75 preempted (checkpoint saved, rerun with --resume); "
    "130 interrupted"
)

ANOTHER_RANK_FAILED = "another process of the job failed (its error is above)"

# OS errors that a user causes or meets through a path they chose: said in words, with the path.
_OS_CAUSES = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or limit",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EEXIST: "already exists",
    errno.ENOTDIR: "a file is in the way where a folder is needed",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.ENOTEMPTY: "folder is not empty",
    errno.ENAMETOOLONG: "name too long",
}
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
_ERRNO_NAMES = {getattr(errno, name): name for name in dir(errno) if name.startswith("E")}
_ERRNO_TEXT = re.compile(r"^\[Errno (\d+)\] ([^:]*?)(?:: '(.*?)')?(?: -> '(.*)')?$", re.S)
# A collective that failed because a peer is gone: gloo, NCCL, the TCP store, timeouts.
_COLLECTIVE = re.compile(
    r"Connection closed by peer|Connection reset by peer|ProcessGroup|NCCL|gloo|"
    r"DistBackendError|DistNetworkError|DistStoreError|recvBytes|sendBytes|Socket Timeout|TCPStore",
)
# torch's DataLoader re-raises a worker's exception with this text before the worker's traceback.
_WORKER_MARK = "Original Traceback (most recent call last):"
_TRACEBACK_HEAD = re.compile(r"^(Original )?Traceback \(most recent call last\):$")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*): ?(.*)$", re.S)


def one_line(text: str) -> str:
    """Join a possibly multi-line message into one line, keeping every non-empty line."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _eatdist_error_names() -> set[str]:
    names: set[str] = set()
    todo: list[type] = [EatdistError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def unwrap_worker_error(text: str) -> tuple[str, str] | None:
    """Return (exception type name, message) of the original error in a DataLoader worker's
    wrapped message, or None when ``text`` is not such a message.

    The message is everything after the last traceback's frames, so a multi-line message (or a
    chained exception's final one) is kept whole.
    """
    if _WORKER_MARK not in text:
        return None
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if _TRACEBACK_HEAD.match(line.strip()))
    body = lines[start + 1 :]
    # Frames are indented ("  File ...", "    code"); the exception itself starts unindented.
    first = next((i for i, line in enumerate(body) if line and not line[0].isspace()), None)
    if first is None:
        return None
    match = _EXC_LINE.match("\n".join(body[first:]))
    if match is None:
        return None
    return match.group(1).rsplit(".", 1)[-1], match.group(2)


def _os_error_line(code: int | None, strerror: str, filename: object, filename2: object) -> str:
    cause = _OS_CAUSES.get(code) if code is not None else None
    cause = cause or (strerror or "").lower() or _ERRNO_NAMES.get(code or -1, "OS error")
    if filename2 is not None:
        return f"{filename} -> {filename2}: {cause}"
    if filename is None:
        # A full disk met through a stream that lost the file's name.
        return f"cannot write: {cause}" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else cause
    path = Path(os.fsdecode(filename)) if isinstance(filename, str | bytes) else None
    if path is not None and code == errno.EEXIST and path.exists() and not path.is_dir():
        return f"{path}: is a file, but a folder is needed there"
    if path is not None and code in (errno.ENOSPC, errno.EDQUOT):
        cause += f", {_free(path)} free"
    if path is not None and code in _WRITE_ERRORS and not path.exists():
        # The file was being created (often a temporary name): the folder is what the user chose.
        return f"cannot write in {path.parent}: {cause} (creating {path.name})"
    return f"{filename}: {cause}"


def _free(path: Path) -> str:
    free = free_bytes(path)
    return human_size(free) if free is not None else "unknown"


def describe_os_error(exc: OSError) -> str | None:
    """Return one line for an OS error a user can cause or meet (path and cause), else None."""
    if exc.errno not in _OS_CAUSES:
        return None
    return _os_error_line(exc.errno, exc.strerror or "", exc.filename, exc.filename2)


def _is_collective_failure(exc: BaseException) -> bool:
    if dist.world_size() <= 1 or not isinstance(exc, RuntimeError):
        return False
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - torch without distributed
        DistError = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(exc, DistError):
        return True
    return bool(_COLLECTIVE.search(str(exc)))


def describe(exc: BaseException) -> tuple[str, int] | None:
    """Return (one-line message, exit code) for an exception a user should see as one line.

    Returns None for anything else (a bug), which keeps its traceback.
    """
    if isinstance(exc, EatdistError) or isinstance(exc, RuntimeError | OSError):
        wrapped = unwrap_worker_error(str(exc))
        if wrapped is not None:
            name, message = wrapped
            if name in _eatdist_error_names():
                return one_line(message) or name, EXIT_ERROR
            found = _ERRNO_TEXT.match(message.strip())
            if found and int(found.group(1)) in _OS_CAUSES:
                return _os_error_line(int(found.group(1)), found.group(2), found.group(3), found.group(4)), EXIT_ERROR
            return None
    if isinstance(exc, EatdistError):
        return one_line(str(exc)) or type(exc).__name__, EXIT_ERROR
    if isinstance(exc, OSError):
        line = describe_os_error(exc)
        return (line, EXIT_ERROR) if line is not None else None
    if _is_collective_failure(exc):
        return ANOTHER_RANK_FAILED, EXIT_ERROR
    return None


def _progress_bar_open() -> bool:
    """True when a tqdm bar of this process may have left the cursor mid-line."""
    tqdm = sys.modules.get("tqdm")
    instances = getattr(getattr(tqdm, "tqdm", None), "_instances", None)
    return bool(instances)


def print_error(message: str) -> None:
    """Print ``[rank N] eatdist: error: MESSAGE`` on a line of its own, in one write.

    One ``write`` of the whole line (with the rank prefix under a launcher) keeps the lines of
    ranks that fail together from interleaving in the launcher's shared stderr.
    """
    prefix = f"[rank {dist.rank()}] " if dist.world_size() > 1 else ""
    # A bar of this process, or of another rank on a shared terminal, may be mid-line.
    newline = "\n" if _progress_bar_open() or (dist.world_size() > 1 and sys.stderr.isatty()) else ""
    line = f"{newline}{prefix}eatdist: error: {message}\n"
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    try:
        os.write(sys.stderr.fileno(), line.encode("utf-8", "replace"))
    except (OSError, ValueError, AttributeError):  # stderr replaced (pytest capture) or closed
        sys.stderr.write(line)
        sys.stderr.flush()
