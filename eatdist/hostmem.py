"""Freed host memory kept for reuse: a forward pass on the CPU without a page fault per page.

torch allocates CPU tensors with the C library's ``malloc``. glibc serves a block of 128 KiB or
more (a threshold that rises, as such blocks are freed, to at most 32 MiB) straight from the
kernel with ``mmap`` and hands it back on ``free``, and returns free memory at the top of its
heap once more than twice that lies there. A network's activations are such blocks, allocated
and freed in every forward pass: each pass faults every page of them in again, zeroed by the
kernel. Measured on a 2-core machine, that is about 80 page faults per 64 px image and 10–15 %
of the CPU time of resnet18 inference at 224 px (launch/README.md, "Host memory").

:func:`keep_freed_memory` raises both thresholds once per process, so blocks up to the limit come
from the heap and freed ones stay there for the next pass: the process holds on to its peak
instead of giving memory back between batches. Processes forked afterwards (DataLoader workers,
encoding processes) inherit it. It changes nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)
ENV = "EATDIST_KEEP_FREED_MB"  # megabytes; 0 leaves the C library's own behaviour
DEFAULT_MB = 256
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def limit_mb() -> int:
    """Return the limit :func:`keep_freed_memory` applies: ``$EATDIST_KEEP_FREED_MB``, else 256."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_MB
    try:
        mb = int(value)
    except ValueError:
        mb = -1
    if mb < 0:
        log.warning("%s=%r is not a number of megabytes; using %d", ENV, value, DEFAULT_MB)
        return DEFAULT_MB
    return mb


def keep_freed_memory(mb: int | None = None) -> bool:
    """Have glibc serve blocks of up to ``mb`` MiB (default :func:`limit_mb`) from its heap and keep
    up to as much free memory there; return whether it took effect (False for 0, or without glibc)."""
    mb = limit_mb() if mb is None else mb
    if mb <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (musl has a mallopt that does nothing: glibc only)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    size = min(mb, 2047) << 20  # mallopt takes an int
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, size))
