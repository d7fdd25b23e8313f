"""The built-in plugin: any timm model as an eatdist backbone (registered as entry point ``timm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class TimmBackbone(nn.Module):
    """A timm model without its classifier, exposing contract 2.

    ``forward_features`` gives ``[B, C, H, W]`` for CNNs and ``[B, N, C]`` tokens for ViT-style
    models (``num_prefix_tokens`` leading tokens, then a ``grid_size`` grid); channels-last
    feature maps (e.g. Swin) are permuted to ``[B, C, H, W]``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"
        patch_embed = getattr(model, "patch_embed", None)
        grid = getattr(patch_embed, "grid_size", None)
        self.grid_size = tuple(grid) if grid is not None else None
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if features.ndim == 4 and self.channels_last_output:
            features = features.permute(0, 3, 1, 2)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward (timm's own checkpointing of its stages/blocks)."""
        self.model.set_grad_checkpointing(enable)


def timm_backbone(model_name: str, pretrained_path: str | None = None, **kwargs: Any) -> nn.Module:
    """Build timm model ``model_name`` as a backbone, never downloading weights.

    ``pretrained_path`` loads a local weights file (safetensors or a ``torch.save`` state dict,
    read with ``weights_only=True``); the classifier's keys are ignored.
    """
    import timm

    kwargs.pop("pretrained", None)
    model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    if pretrained_path:
        from timm.models import load_checkpoint

        from eatdist.errors import BackboneError

        if not Path(pretrained_path).is_file():
            raise BackboneError(f"pretrained weights file not found: {pretrained_path}")
        result = load_checkpoint(model, pretrained_path, strict=False, weights_only=True)
        missing = list(getattr(result, "missing_keys", []) or [])
        if missing:
            raise BackboneError(
                f"{pretrained_path} does not fit timm model '{model_name}': "
                f"{len(missing)} weights missing (first: {missing[0]})"
            )
    return TimmBackbone(model)
