"""What changes at cluster scale: DeepSpeed ZeRO through Accelerate, LR scaling, memory toggles."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from eatdist.config import Config
from eatdist.errors import BackboneError, ConfigError

log = logging.getLogger(__name__)

# Accelerate sizes these "auto" buckets from a transformers model's config.hidden_size, which
# image backbones do not have. These are DeepSpeed's own defaults, fine for CNNs and ViTs alike.
IMAGE_BUCKETS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


def uses_deepspeed(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc: Accelerator) -> int:
    """Return the ZeRO stage of the run (0 without DeepSpeed)."""
    if not uses_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(acc: Accelerator, cfg: Config) -> None:
    """Resolve the DeepSpeed config's "auto" values from eatdist's config, before ``prepare``.

    The optimizer and schedule stay eatdist's (a torch AdamW stepped by DeepSpeed), so nothing
    is compiled; micro-batch, clipping and precision follow the eatdist config.

    Raises:
        ConfigError: when the DeepSpeed file asks for its own optimizer or scheduler.
    """
    if not uses_deepspeed(acc):
        return
    ds: dict[str, Any] = acc.state.deepspeed_plugin.deepspeed_config
    for own in ("optimizer", "scheduler"):
        if own in ds:
            raise ConfigError(f"the DeepSpeed config sets '{own}': eatdist uses its own; remove that section")
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    elif ds["train_micro_batch_size_per_gpu"] != cfg.data.batch_size:
        raise ConfigError(
            f"config key 'data.batch_size' ({cfg.data.batch_size}) differs from the DeepSpeed config's "
            f'train_micro_batch_size_per_gpu ({ds["train_micro_batch_size_per_gpu"]}); set it to "auto"'
        )
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(cfg.optim.clip_grad or 0.0)
    zero = ds.setdefault("zero_optimization", {})
    for key, value in IMAGE_BUCKETS.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("stage") == 3:
        # The model package needs the whole model gathered on the main process at the end.
        zero["stage3_gather_16bit_weights_on_model_save"] = True


@contextlib.contextmanager
def gathered(model: nn.Module, acc: Accelerator) -> Iterator[None]:
    """Make every parameter whole on every rank inside the block (ZeRO-3 partitions them).

    A collective: all ranks must enter it.
    """
    if zero_stage(acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


def scaled_lr(cfg: Config, processes: int) -> float:
    """Return the learning rate for the actual global batch (``optim.lr`` is per ``lr_base_batch``)."""
    if cfg.optim.lr_base_batch is None:
        return cfg.optim.lr
    if cfg.optim.lr_base_batch < 1:
        raise ConfigError("config key 'optim.lr_base_batch': must be a positive int or null")
    global_batch = cfg.data.batch_size * processes * cfg.train.grad_accum
    return cfg.optim.lr * global_batch / cfg.optim.lr_base_batch


def apply_model_options(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply gradient checkpointing and channels-last to the model before it is wrapped.

    Raises:
        BackboneError: when gradient checkpointing is asked of a backbone that cannot do it.
    """
    if cfg.model.grad_checkpointing:
        backbone = model.backbone  # type: ignore[attr-defined]
        toggle = getattr(backbone, "set_grad_checkpointing", None)
        if toggle is None:
            raise BackboneError(
                f"backbone '{cfg.model.backbone}' has no set_grad_checkpointing(); set model.grad_checkpointing=false"
            )
        toggle(True)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
