"""Optimizer and learning-rate schedule, both timm's: what ``optim.name`` and ``optim.sched`` choose.

The schedule steps once per optimizer update (``step_update(updates_done)``), warmup included:
a linear warmup from ``lr / warmup_updates`` to ``lr``, then cosine decay to ``min_lr_ratio`` × lr,
step decay by ``decay_rate`` every ``decay_epochs``, or a constant rate.
"""

from __future__ import annotations

from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.optim import Optimizer

from eatdist.config import OptimConfig
from eatdist.errors import ConfigError, close_matches

SCHEDULES = ("cosine", "step", "constant")


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> Optimizer:
    """Return timm's optimizer ``cfg.name`` over ``model`` at learning rate ``lr``.

    Biases and normalisation weights (parameters of one dimension) get no weight decay.
    Raises:
        ConfigError: for an optimizer name timm does not know.
    """
    known = list_optimizers()
    if cfg.name.lower() not in known:
        raise ConfigError(f"config key 'optim.name': unknown optimizer '{cfg.name}'{close_matches(cfg.name, known)}")
    extra = {"momentum": cfg.momentum} if cfg.name.lower() in ("sgd", "momentum", "nesterov") else {}
    return create_optimizer_v2(model, opt=cfg.name.lower(), lr=lr, weight_decay=cfg.weight_decay, **extra)


def warmup_updates(cfg: OptimConfig, updates_per_epoch: int, total_updates: int) -> int:
    """Return the number of warmup updates: ``warmup_epochs`` of updates, at least 1, at most all."""
    return min(total_updates, max(1, round(cfg.warmup_epochs * updates_per_epoch)))


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, updates_per_epoch: int, epochs: int) -> Scheduler:
    """Return timm's per-update scheduler ``cfg.sched`` for a run of ``epochs`` epochs.

    Its state (plain numbers) goes into the trainer state; ``step_update(n)`` sets the rate for
    update ``n + 1``. Raises:
        ConfigError: for an unknown schedule or a non-positive ``decay_epochs``.
    """
    total = updates_per_epoch * epochs
    warmup = warmup_updates(cfg, updates_per_epoch, total)
    base = optimizer.param_groups[0]["lr"]
    common = dict(warmup_t=warmup, warmup_lr_init=base / warmup, warmup_prefix=True, t_in_epochs=False)
    if cfg.sched == "cosine":
        return CosineLRScheduler(
            optimizer,
            t_initial=max(1, total - warmup),
            lr_min=base * cfg.min_lr_ratio,
            **common,  # type: ignore[arg-type]
        )
    if cfg.sched in ("step", "constant"):
        if cfg.decay_epochs <= 0:
            raise ConfigError(f"config key 'optim.decay_epochs': must be positive, got {cfg.decay_epochs}")
        decay_t = max(1, round(cfg.decay_epochs * updates_per_epoch)) if cfg.sched == "step" else max(1, total)
        rate = cfg.decay_rate if cfg.sched == "step" else 1.0
        return StepLRScheduler(optimizer, decay_t=decay_t, decay_rate=rate, **common)  # type: ignore[arg-type]
    raise ConfigError(f"config key 'optim.sched': expected one of {', '.join(SCHEDULES)}, got {cfg.sched!r}")


def current_lr(optimizer: Optimizer) -> float:
    """Return the learning rate of the optimizer's first parameter group."""
    return float(optimizer.param_groups[0]["lr"])
