"""Run logs a person can plot: a JSON-lines file and TensorBoard, written by the main process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):  # a line cut by a kill: drop it
        return float("inf")


class MetricsLogger:
    """Append records to ``metrics.jsonl`` and scalars to TensorBoard under ``run_dir``.

    A resumed run opens the logs with ``resume_step``, the global step of its checkpoint: the
    records a killed run wrote after that step are dropped (they are about to be run again), so
    the logs hold every step once.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if enabled:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / "metrics.jsonl"
            if resume_step is not None and path.is_file():
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
            self._file = open(path, "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step makes TensorBoard drop the events a killed run logged past the checkpoint.
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency; tolerate a trimmed install
                self._tb = None

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` of type ``kind`` ("step", "epoch", "test") at global ``step``."""
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
