"""Where shards live: local paths and URLs, opened with fsspec or WebDataset's ``gopen``, with retries.

A shard or ``dataset.json`` is named by a local path, a ``file://`` URL, an fsspec URL
(``http(s)://``, ``s3://`` with s3fs, ``gs://`` with gcsfs, any other protocol fsspec knows) or a
``pipe:CMD`` whose standard output is the file (opened by WebDataset's ``gopen``).

HTTP goes through fsspec's ``HTTPFileSystem`` (aiohttp) rather than curl through ``gopen``: it
gives exact ranged reads (a reader that starts inside a shard fetches only its bytes), reports a
404 as ``FileNotFoundError`` like every other fsspec store, needs no curl binary on the nodes and
no subprocess per shard, and is the same code path as ``s3://`` and ``gs://``.

Credentials are never handled here: s3fs/botocore and gcsfs read them from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for an
S3-compatible store, ``GOOGLE_APPLICATION_CREDENTIALS``...). A URL may still carry some
(``https://user:pass@host/...``, a presigned query string): every message shows it through
:func:`redact`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from eatdist.errors import DataError

PIPE = "pipe:"
DEFAULT_RETRIES = 3
# Seconds before the first retry; each further retry waits twice as long (at most MAX_BACKOFF).
DEFAULT_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# HTTP: a stalled server is a failure (retried), never a hang.
HTTP_TIMEOUTS = {"sock_connect": 30.0, "sock_read": 60.0}

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_QUERY = re.compile(r"(://[^\s?#'\"]*)\?[^\s#'\"]*")
T = TypeVar("T")


def is_remote(url: str) -> bool:
    """Return True for a URL or ``pipe:`` command, False for a local path (or ``file://`` URL)."""
    return url.startswith(PIPE) or (bool(_SCHEME.match(url)) and not url.startswith("file://"))


def is_pipe(url: str) -> bool:
    """Return True for a ``pipe:CMD`` source."""
    return url.startswith(PIPE)


def local_path(url: str) -> str:
    """Return the file system path of a local path or ``file://`` URL."""
    return url[len("file://") :] if url.startswith("file://") else url


def redact(text: str) -> str:
    """Return ``text`` with the credentials of every URL in it removed (``user:pass@`` and query strings)."""
    return _QUERY.sub(r"\1?…", _USERINFO.sub(r"\1", text))


def join(root: str | Path, file: str) -> str:
    """Return where a shard ``file`` listed in the ``dataset.json`` at ``root`` lives.

    ``file`` may be absolute or a URL (kept as it is) or relative to ``root``. Under a
    ``pipe:CMD`` root, a relative file is the same command with ``dataset.json`` replaced by it.
    Raises:
        DataError: for a relative file under a ``pipe:`` root whose command does not name ``dataset.json``.
    """
    if is_remote(file) or os.path.isabs(local_path(file)):
        return file
    root = str(root)
    if is_pipe(root):
        if "dataset.json" not in root:
            raise DataError(f"shard '{file}' is relative, but the root {redact(root)} does not name dataset.json")
        return root.replace("dataset.json", file)
    if is_remote(root):
        base, query = (root.split("?", 1) + [""])[:2]
        return base.rstrip("/") + "/" + file + (f"?{query}" if query else "")
    return str(Path(local_path(root)) / file)


def name_of(url: str) -> str:
    """Return a shard's file name: the last path part of a path or URL (for a pipe, of its last word)."""
    if is_pipe(url):
        words = url[len(PIPE) :].split()
        url = next((w for w in reversed(words) if ".tar" in w), words[-1] if words else url)
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def filesystem(url: str) -> tuple[Any, str]:
    """Return fsspec's ``(filesystem, path)`` for a remote URL (not ``pipe:``).

    Raises:
        DataError: when the protocol is unknown or its package (s3fs, gcsfs) is not installed.
    """
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    options: dict[str, Any] = {}
    if protocol in ("http", "https"):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, **HTTP_TIMEOUTS)}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        hint = f"; pip install 'eatdist[{extra}]'" if extra else ""
        raise DataError(f"cannot open {redact(url)}: {exc}{hint}") from None
    except ValueError as exc:
        raise DataError(f"cannot open {redact(url)}: {redact(str(exc))}") from None


def is_permanent(exc: BaseException) -> bool:
    """Return True for failures that a retry cannot mend: missing, forbidden, not a file."""
    return isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError | DataError)


def describe(exc: BaseException) -> str:
    """Return a one-line, credential-free description of an I/O failure."""
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}" if not isinstance(exc, OSError) else str(text)).splitlines()[0]


def backoff_delay(attempt: int, base: float = DEFAULT_BACKOFF) -> float:
    """Return the wait before retry number ``attempt`` (1-based): ``base * 2**(attempt - 1)``, capped."""
    return min(MAX_BACKOFF, base * 2 ** (attempt - 1))


def with_retries(what: str, action: Callable[[], T], retries: int = DEFAULT_RETRIES) -> T:
    """Return ``action()``, retried up to ``retries`` times with exponential backoff on transient failures.

    Raises:
        DataError: naming ``what`` (credentials stripped) when it still fails or fails permanently.
    """
    attempt = 0
    while True:
        try:
            return action()
        except DataError:
            raise
        except Exception as exc:  # network stacks raise many types; each is retried, then reported
            attempt += 1
            if is_permanent(exc) or attempt > retries:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise DataError(f"cannot read {redact(what)}: {describe(exc)}{tries}") from None
            time.sleep(backoff_delay(attempt))


def read_bytes(url: str, start: int = 0, end: int | None = None) -> bytes:
    """Return bytes ``[start, end)`` of a file (all from ``start`` when ``end`` is None), in one request.

    Fewer bytes come back when the file is shorter. Raises the store's own errors (for example
    ``FileNotFoundError``); wrap calls in :func:`with_retries`.
    """
    if end is not None and end <= start:
        return b""
    if not is_remote(url):
        with open(local_path(url), "rb", buffering=0) as f:
            return os.pread(f.fileno(), (end - start) if end is not None else os.fstat(f.fileno()).st_size, start)
    if is_pipe(url):
        from webdataset.gopen import gopen

        stream = gopen(url, "rb")
        try:
            data = stream.read()
        finally:
            stream.close()
        return data[start:end]
    fs, path = filesystem(url)
    data = fs.cat_file(path, start=start, end=end)
    want = None if end is None else end - start
    if want is not None and len(data) > want:
        # A server that ignores Range sends the whole file.
        data = data[start:end]
    return data


def size(url: str) -> int:
    """Return a file's size in bytes (one HEAD or stat). Raises the store's own errors."""
    if not is_remote(url):
        return os.path.getsize(local_path(url))
    fs, path = filesystem(url)
    return int(fs.size(path))


def glob(pattern: str) -> list[str]:
    """Return the URLs matching a remote glob pattern (``s3://bucket/corpus/*.tar``), sorted.

    Raises:
        DataError: when the store cannot be listed.
    """
    fs, path = filesystem(pattern)
    found = with_retries(pattern, lambda: fs.glob(path))
    return sorted(fs.unstrip_protocol(p) for p in found)


class ByteReader:
    """Sequential reads of bytes ``[start, end)`` of one file, fetched in chunks that never pass ``end``.

    A local file is read with ``pread``, a remote one with one ranged request per chunk (so a
    reader fetches exactly the bytes it asked for), a ``pipe:`` by reading its output (a start
    inside it is reached by discarding). ``end=None`` reads to the end of the file (a remote one
    costs a HEAD request for its size). Opening and reading raise the store's own errors.
    """

    def __init__(self, url: str, start: int = 0, end: int | None = None, chunk: int = 8 << 20) -> None:
        self.url, self.pos, self.end, self.chunk = url, start, end, chunk
        # A range end the caller gave is a clean stop; a file's own end before the tar's end blocks is a cut.
        self.bounded = end is not None
        self._buf, self._off = b"", 0
        self._fd: int | None = None
        self._stream: Any = None
        self._fs: Any = None
        if not is_remote(url):
            self._fd = os.open(local_path(url), os.O_RDONLY)
            if self.end is None:
                self.end = os.fstat(self._fd).st_size
        elif is_pipe(url):
            from webdataset.gopen import gopen

            self._stream = gopen(url, "rb")
            if start:
                self.pos = 0
                self.skip(start)
        else:
            self._fs, self._path = filesystem(url)
            if self.end is None:
                self.end = int(self._fs.size(self._path))

    @property
    def seekable(self) -> bool:
        return self._stream is None

    def at_end(self) -> bool:
        """Return True when the caller gave ``end`` and every byte up to it was read."""
        return self.bounded and self.end is not None and self.pos >= self.end

    def _fetch(self, n: int) -> bytes:
        if self.end is not None:
            n = min(n, self.end - self.pos)
        if n <= 0:
            return b""
        if self._fd is not None:
            return os.pread(self._fd, n, self.pos)
        if self._stream is not None:
            return self._stream.read(n)
        data = self._fs.cat_file(self._path, start=self.pos, end=self.pos + n)
        # A server that ignores Range sends the whole file.
        return data[self.pos : self.pos + n] if len(data) > n else data

    def read(self, n: int) -> bytes:
        """Return the next ``n`` bytes; fewer only where the file (or ``end``) stops."""
        parts = []
        while n > 0:
            if self._off >= len(self._buf):
                self._buf, self._off = self._fetch(max(n, self.chunk)), 0
                if not self._buf:
                    break
            part = self._buf[self._off : self._off + n]
            self._off += len(part)
            self.pos += len(part)
            n -= len(part)
            parts.append(part)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Move ``n`` bytes on without fetching them where the source can seek; return the bytes passed."""
        buffered = min(n, len(self._buf) - self._off)
        self._off += buffered
        self.pos += buffered
        rest = n - buffered
        if rest <= 0:
            return n
        if self.seekable:
            limit = rest if self.end is None else min(rest, self.end - self.pos)
            self.pos += limit
            return buffered + limit
        passed = buffered
        while rest > 0:
            data = self.read(min(rest, 1 << 20))
            if not data:
                break
            passed += len(data)
            rest -= len(data)
        return passed

    def close(self, check: bool = False) -> None:
        """Release the file, connection or process.

        With ``check``, raise ``OSError`` when a ``pipe:`` command exited with an error (a pipe
        closed early is not checked: its command is stopped on purpose).
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                stream.close()
            except Exception:
                if check:
                    raise
