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


def restart_count() -> int:
    """How many times torchrun restarted this worker group (``TORCHELASTIC_RESTART_COUNT``); 0 otherwise."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", default=0)


def launcher_start_time() -> float | None:
    """When the process that started this one (torchrun's agent under torchrun) started, as a Unix
    time; None when unknown."""
    try:
        import psutil

        return float(psutil.Process(os.getppid()).create_time())
    except Exception:  # no psutil, or the parent is gone: nothing to go by
        return None


def check_training_world(processes: int | None = None) -> None:
    """Refuse a training launch that cannot give one data-parallel model.

    ``processes`` is the number of processes Accelerate joined (None: before it started). A
    process the launcher counts but Accelerate left out would train a replica of its own.

    Raises:
        EatdistError: naming the launcher's environment and what to start instead.
    """
    from eatdist.errors import EatdistError

    use = "start it with torchrun, accelerate launch or launch/slurm.sh (see docs/launchers.md)"
    if os.environ.get("WORLD_SIZE") in (None, ""):
        tasks = _env_int("SLURM_STEP_NUM_TASKS", default=1)
        if tasks > 1:
            raise EatdistError(
                f"srun started {tasks} tasks of 'eatdist train' with no launcher in between: each would train a model "
                f"of its own; {use}"
            )
        return
    if processes is not None and processes != world_size():
        raise EatdistError(
            f"the launcher set WORLD_SIZE={world_size()} but Accelerate joined {processes} process(es): each would "
            f"train a model of its own; {use}"
        )


def join_restarted_group() -> bool:
    """After a torchrun restart, join the new worker group through the agent's store under a key
    prefix of this restart; return True if joined here (Accelerate then uses the group as it is).

    torchrun keeps its store across restarts, and torch 2.14's workers no longer key their process
    group by the restart: a restarted group would read the addresses of the previous group's dead
    workers and hang. Nothing to do before the first restart, or without the agent's store.
    """
    import torch

    if restart_count() == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    if world_size() <= 1 or torch.distributed.is_initialized():
        return False
    timeout = timedelta(minutes=30)
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(), is_master=False, timeout=timeout
    )
    store = torch.distributed.PrefixStore(f"eatdist/restart-{restart_count()}", store)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    torch.distributed.init_process_group(backend, store=store, rank=rank(), world_size=world_size(), timeout=timeout)
    return True
