"""Rank and world size from whatever launcher started the process (or none)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where needed: the CLI starts without it
    import torch


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def rank() -> int:
    """Global rank: torchrun / accelerate (RANK) or SLURM (SLURM_PROCID); 0 alone."""
    return _env_int("RANK", "SLURM_PROCID", default=0)


def world_size() -> int:
    """Number of processes in the job; 1 alone."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def device() -> torch.device:
    """This process's device: its local GPU when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(timeout_hours: float = 24.0) -> bool:
    """Join the launcher's process group when there are several processes; return True if joined.

    Explanation ranks work independently and only meet at the end, so the timeout is long.
    """
    import torch

    if world_size() <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            from eatdist.errors import EatdistError

            raise EatdistError(
                f"{world_size()} processes but no MASTER_ADDR/MASTER_PORT to meet at: start under torchrun, "
                "accelerate launch or launch/slurm.sh"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device())
        torch.distributed.init_process_group(
            backend, rank=rank(), world_size=world_size(), timeout=timedelta(hours=timeout_hours)
        )
    return True


def destroy_process_group() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
