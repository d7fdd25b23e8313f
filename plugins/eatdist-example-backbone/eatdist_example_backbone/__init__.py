"""A small CNN backbone for eatdist: the template for a third-party plugin.

The contract (eatdist's DESIGN, contract 2): the factory returns an ``nn.Module`` with an int
``num_features`` and ``forward_features(x)`` giving ``[B, num_features, H, W]`` (or tokens
``[B, N, C]`` with ``num_prefix_tokens``). eatdist adds pooling and heads. An optional
``pretrained_cfg`` dict with ``mean``/``std`` sets the input normalisation.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyCNN(nn.Module):
    """Four conv blocks, total stride 8: a 64 px image gives an 8 × 8 feature map."""

    def __init__(self, width: int = 32, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = _block(in_chans, width, 2)
        self.stages = nn.Sequential(
            _block(width, width * 2, 2), _block(width * 2, width * 2, 1), _block(width * 2, width * 4, 2)
        )
        self.num_features = width * 4
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def tiny_cnn(width: int = 32, **kwargs: object) -> TinyCNN:
    """The entry point's factory; keyword arguments come from ``model.backbone_args``."""
    if kwargs:
        raise TypeError(f"tinycnn: unknown arguments {sorted(kwargs)}")
    return TinyCNN(width=width)
