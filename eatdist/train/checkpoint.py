"""Checkpoints of a run: written whole or not at all, pruned to the newest few, disk space checked.

A checkpoint is a folder ``checkpoints/step-<global step>`` holding Accelerate's files (model,
optimizer, RNG states; DeepSpeed's shards under ZeRO) and ``trainer_state.json``. It is written
as ``.step-<N>.partial`` and renamed once every rank's files and the state are on disk, so a run
killed while writing leaves a partial folder that is ignored and removed, never a checkpoint that
looks whole.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from eatdist.errors import EatdistError

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
# Room kept beyond the estimate: optimizer files grow a little as their state fills in.
SPACE_MARGIN = 1.2


class CheckpointError(EatdistError):
    """A checkpoint that cannot be written (disk full, read-only folder)."""


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class CheckpointStore:
    """The checkpoints under ``folder``, newest ``keep`` kept; every method is called on all ranks."""

    def __init__(self, folder: Path, keep: int, accelerator: Accelerator) -> None:
        self.folder, self.keep, self.acc = folder, keep, accelerator

    def complete(self) -> list[Path]:
        """Return the complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    def load_state(self, path: Path) -> dict[str, Any]:
        return json.loads((path / STATE_FILE).read_text())

    def written_at(self, path: Path) -> float:
        """Return when checkpoint ``path`` was completed (its state file lands last), as a Unix time."""
        return (path / STATE_FILE).stat().st_mtime

    def _estimate(self, model: torch.nn.Module) -> int:
        """Bytes the next checkpoint needs: the last one's size, else weights + two Adam moments."""
        done = self.complete()
        if done:
            return folder_size(done[-1])
        return 3 * sum(p.numel() * p.element_size() for p in model.parameters())

    def _make_room(self, needed: int) -> str | None:
        """Prune the oldest checkpoints when the disk cannot hold another; return an error or None."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".step-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        done = self.complete()
        while shutil.disk_usage(self.folder).free < needed * SPACE_MARGIN and done and len(done) >= self.keep:
            log.warning("low disk space: removing checkpoint %s before writing the next", done[0])
            shutil.rmtree(done.pop(0), ignore_errors=True)
        free = shutil.disk_usage(self.folder).free
        if free < needed * SPACE_MARGIN:
            return (
                f"disk full at {self.folder}: a checkpoint needs about {needed * SPACE_MARGIN / 2**20:.0f} MiB, "
                f"{free / 2**20:.0f} MiB free"
            )
        return None

    def _agree(self, message: str | None) -> None:
        """Raise on every rank when any rank met an error (``message`` on the rank that met it)."""
        failed = message is not None
        if self.acc.num_processes > 1:
            flag = torch.tensor([float(failed)], device=self.acc.device)
            failed = float(self.acc.reduce(flag, "sum")) > 0
        if failed:
            raise CheckpointError(message or f"writing a checkpoint under {self.folder} failed on another rank")

    def save(self, step: int, state: dict[str, Any], model: torch.nn.Module) -> Path:
        """Write checkpoint ``step-<step>`` holding Accelerate's state and ``state``; return its path.

        Raises:
            CheckpointError: on every rank, naming the folder, when the disk is full or not writable.
        """
        acc = self.acc
        final = self.folder / f"step-{step:09d}"
        partial = self.folder / f".step-{step:09d}.partial"
        error: list[str | None] = [None]
        if acc.is_main_process:
            try:
                error = [self._make_room(self._estimate(model))]
            except OSError as exc:
                error = [_describe(exc, self.folder)]
        if acc.num_processes > 1:
            broadcast_object_list(error)
        self._agree(error[0])
        message = None
        try:
            acc.save_state(str(partial))
        except (OSError, RuntimeError) as exc:
            message = _describe(exc, self.folder)
        acc.wait_for_everyone()
        if message is None and acc.is_main_process:
            try:
                # The state lands last: a folder without it is incomplete whatever else it holds.
                tmp = partial / f"{STATE_FILE}.tmp"
                with open(tmp, "w") as f:
                    f.write(json.dumps(state))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, partial / STATE_FILE)
                if final.exists():  # the same step saved before a kill; the new one replaces it
                    shutil.rmtree(final)
                os.replace(partial, final)
                for old in self.complete()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as exc:
                message = _describe(exc, self.folder)
        if message is not None and acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        self._agree(message)
        acc.wait_for_everyone()
        return final


def _describe(exc: BaseException, folder: Path) -> str:
    """One line for a failed checkpoint write: disk full and read-only said as such."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in text or "No space left" in text:
        return (
            f"disk full at {folder}: the checkpoint could not be written ({shutil.disk_usage(folder).free} bytes free)"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write checkpoints to {folder}: {os.strerror(code)}"
    cause = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return f"cannot write a checkpoint to {folder}: {cause}"
