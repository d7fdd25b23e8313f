"""Preemption: SIGTERM or SIGUSR1 (what SLURM and most schedulers send before a kill) ends the
run at a step boundary that every rank agrees on, after a checkpoint.

A signal may reach one rank only, or each rank at a different moment. At every optimizer step
each rank starts an asynchronous all-reduce (MAX) of its "signalled" flag on a CPU (gloo) group
and reads the previous step's result: all ranks therefore see the same answer at the same step,
one step after the first signal, without a device synchronisation in the step loop.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import torch

log = logging.getLogger(__name__)
# The exit code of a preempted run (EX_TEMPFAIL: "try again"): a checkpoint was saved and
# `eatdist train ... --resume` continues from it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Catches the preemption signals and tells every rank, in step, when to stop."""

    def __init__(self, distributed: bool) -> None:
        self.signalled: int | None = None
        self._previous: dict[int, Any] = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._group = None
        if distributed:
            # Called on every rank in the same order (a collective); gloo keeps the flag on the CPU.
            self._group = torch.distributed.new_group(backend="gloo")
        self._flag = torch.zeros(1)
        self._pending: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled is None:
            log.warning(
                "received %s: stopping at the next step boundary to save a checkpoint", signal.Signals(signum).name
            )
        self.signalled = signum

    def should_stop(self) -> bool:
        """Return True when the run must stop now; call once per optimizer step on every rank."""
        if self._group is None:
            return self.signalled is not None
        stop = False
        if self._pending is not None:
            self._pending.wait()
            stop = bool(self._flag.item() > 0)
        self._flag = torch.tensor([1.0 if self.signalled is not None else 0.0])
        self._pending = torch.distributed.all_reduce(
            self._flag, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True
        )
        return stop

    def close(self) -> None:
        """Finish the last reduction and give the signals back their previous handlers."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
