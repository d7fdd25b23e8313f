"""A moving average of the model's weights (timm's ``ModelEmaV3``), kept in every checkpoint.

The average lives on each rank beside the model and is updated after every optimizer update, on
the device, with no host sync. Its weights ride in Accelerate's checkpoint folder as
``ema.safetensors`` (written by a save hook, read by a load hook), so a resumed run continues the
exact average and nothing of ours is pickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from eatdist.errors import ConfigError

EMA_FILE = "ema.safetensors"


class WeightAverage:
    """The exponential moving average of ``model``'s parameters and buffers.

    With ``warmup`` the decay grows as ``1 - (1 + step) ** -0.75`` towards ``decay`` (timm's
    warmup), so the average follows the fast-changing early weights instead of the random start.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool, accelerator: Accelerator) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"config key 'train.ema_decay': must be in (0, 1), got {decay}")
        self.acc = accelerator
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=0.75)
        accelerator.register_save_state_pre_hook(self._save)
        accelerator.register_load_state_pre_hook(self._load)

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode, no gradients)."""
        return self.ema.module

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model``'s current weights in after optimizer update number ``step``."""
        self.ema.update(model, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def _save(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if self.acc.is_main_process:
            save_file(self.state_dict(), str(Path(output_dir) / EMA_FILE))

    def _load(self, models: list[nn.Module], input_dir: str) -> None:
        path = Path(input_dir) / EMA_FILE
        if not path.is_file():
            raise ConfigError(
                f"checkpoint {input_dir} has no {EMA_FILE}: it was written with train.ema=false; "
                "resume with train.ema=false, or start a new run"
            )
        state = load_file(str(path), device=str(next(self.module.parameters()).device))
        self.module.load_state_dict(state, strict=True)
