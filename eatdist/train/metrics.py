"""Run logs a person can plot: a JSON-lines file (main process) and the Accelerate trackers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from eatdist.atomic import write_error, write_text


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):  # a line cut by a kill: drop it
        return float("inf")


class MetricsLogger:
    """Append records to ``metrics.jsonl`` under ``run_dir`` and their numbers to the trackers.

    A resumed run opens the log with ``resume_step``, the global step of its checkpoint: the
    records a killed run wrote after that step are dropped (they are about to be run again), so
    the log holds every step once (TensorBoard does the same through its ``purge_step``, see
    :mod:`eatdist.train.tracking`). Scalars reach the trackers as ``<kind>/<name>``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        resume_step: int | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.enabled = enabled
        self.accelerator = accelerator
        self._file = None
        if enabled:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / "metrics.jsonl"
            if resume_step is not None and path.is_file():
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
                write_text(path, "".join(line + "\n" for line in kept), "the metrics log")
            self.path = path
            self._file = open(path, "a", buffering=1)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` of type ``kind`` ("step", "epoch", "test") at global ``step``.

        Raises:
            DiskError: naming ``metrics.jsonl`` and the space free, when the disk is full or not writable.
        """
        if not self.enabled or self._file is None:
            return
        line = json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n"
        try:
            self._file.write(line)
        except OSError as exc:
            raise write_error(exc, self.path, "a metrics record", len(line)) or exc from None
        if self.accelerator is not None and self.accelerator.trackers:
            scalars = {
                f"{kind}/{name}": value
                for name, value in values.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            if scalars:
                self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
