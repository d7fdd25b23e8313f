"""Attribute heads (contract 3): how the feature map becomes attribute logits and attribute maps.

Two designs behind one small interface, chosen by ``model.attr_head``:

- ``linear``: a linear (or MLP) head over the globally averaged features; its maps are the
  closed-form CAMs of :mod:`eatdist.explain.cam`. Every image's attributes are read from the
  same pooled vector the class head reads, so they tend to repeat what the class looks like.
- ``spatial``: a 1x1 convolution gives one logit map per attribute, pooled to the attribute
  logit by ``max``, ``topk`` (mean of the k highest cells) or ``attention`` (softmax-weighted
  mean). An attribute must then be found *somewhere* in the image, at feature resolution, and
  its map is the heatmap the explanation shows (no CAM needed).

With a spatial head the class head may also read the features through the attribute maps
(``model.class_pool: attributes``): each cell is weighted by how strongly any attribute is seen
there, so the class score rests on the object the attributes describe rather than the
background. The class map is then that cell weight times the class's CAM, an exact split of the
class logit over the cells.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from eatdist.errors import ConfigError

ATTRIBUTE_HEADS = ("linear", "spatial")
ATTRIBUTE_POOLS = ("max", "topk", "attention")
CLASS_POOLS = ("mean", "attributes")


@dataclass(frozen=True)
class HeadOptions:
    """The head design of a model, as stored in its package (``eatdist_model.json`` key ``head``)."""

    attr_head: str = "linear"
    attr_pool: str = "max"
    attr_topk: int = 4
    class_pool: str = "mean"

    def __post_init__(self) -> None:
        for key, value, allowed in (("attr_head", self.attr_head, ATTRIBUTE_HEADS),
                                    ("attr_pool", self.attr_pool, ATTRIBUTE_POOLS),
                                    ("class_pool", self.class_pool, CLASS_POOLS)):  # fmt: skip
            if value not in allowed:
                raise ConfigError(f"config key 'model.{key}': must be one of {', '.join(allowed)}, got {value!r}")
        if self.attr_topk < 1:
            raise ConfigError(f"config key 'model.attr_topk': must be at least 1, got {self.attr_topk}")
        if self.class_pool == "attributes" and self.attr_head != "spatial":
            raise ConfigError("config key 'model.class_pool': 'attributes' needs model.attr_head=spatial")

    @property
    def spatial(self) -> bool:
        return self.attr_head == "spatial"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HeadOptions:
        """Options from a package's ``head`` entry; a package without one has linear heads.

        Raises:
            ConfigError: for unknown keys or values.
        """
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown head option(s) {', '.join(unknown)}")
        return cls(**data)


class SpatialAttributeHead(nn.Module):
    """One logit map per attribute from a ``[B, C, H, W]`` map (1x1 convolution), pooled to ``[B, A]``."""

    def __init__(self, in_features: int, num_attributes: int, pool: str = "max", topk: int = 4,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.pool_name, self.topk = pool, topk
        # Dropout2d drops whole channels: a feature is missing at every cell, as dropout before a linear head does.
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(in_features, num_attributes, kernel_size=1)

    @property
    def weight(self) -> torch.Tensor:
        """The ``[A, C]`` direction of each attribute in feature space."""
        return self.conv.weight[:, :, 0, 0]

    def maps(self, features: torch.Tensor) -> torch.Tensor:
        """Return the ``[B, A, H, W]`` attribute logit maps."""
        return self.conv(self.dropout(features))

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Pool ``[B, A, H, W]`` logit maps to ``[B, A]`` logits."""
        flat = maps.flatten(2)
        if self.pool_name == "max":
            return flat.amax(2)
        if self.pool_name == "topk":
            return flat.topk(min(self.topk, flat.shape[2]), dim=2).values.mean(2)
        return (flat.softmax(2) * flat).sum(2)  # attention: cells weighted by their own evidence

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.pool(self.maps(features))


def attribute_cell_weights(maps: torch.Tensor) -> torch.Tensor:
    """Return ``[B, H, W]`` weights summing to 1 per image: how strongly any attribute is seen in each cell.

    The strongest attribute probability of a cell, normalised over the cells: on the synthetic
    corpus every object cell shows some attribute (its shape at least) and background cells
    none, so the weights spread over the object.
    """
    strength = torch.sigmoid(maps.float()).amax(1)
    return strength / strength.flatten(1).sum(1).clamp(min=1e-12)[:, None, None]
