"""The EAT model (contract 3): backbone → feature map → global average pool → two heads."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from eatdist.errors import BackboneError


class EATOutput(NamedTuple):
    """Logits of one forward pass; ``features`` is the ``[B, C, H, W]`` map the heads pooled.

    A named tuple: callers read fields by name, while ``torch.jit.trace``, ``torch.export`` and
    the ONNX exporter see a plain tuple of three tensors.
    """

    class_logits: torch.Tensor
    attr_logits: torch.Tensor
    features: torch.Tensor


def make_head(in_features: int, out_features: int, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """Return a linear head (``hidden == 0``) or a one-hidden-layer MLP head."""
    # The dropout layer is there even at p=0 so that weight names do not depend on it: a package
    # rebuilt for inference (no dropout) loads the weights of a model trained with dropout.
    layers: list[nn.Module] = [nn.Dropout(dropout)]
    if hidden > 0:
        layers += [nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features)]
    else:
        layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)


def linear_weight(head: nn.Module) -> torch.Tensor | None:
    """Return the weight of a head that is linear at inference (dropout aside), else None."""
    layers = [m for m in head.modules() if not isinstance(m, (nn.Sequential, nn.Dropout))]
    if len(layers) == 1 and isinstance(layers[0], nn.Linear):
        return layers[0].weight
    return None


def tokens_to_grid(tokens: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int] | None) -> torch.Tensor:
    """Turn ``[B, N, C]`` tokens into a ``[B, C, H, W]`` map, dropping the prefix tokens.

    Raises:
        BackboneError: when the remaining tokens form neither ``grid_size`` nor a square.
    """
    spatial = tokens[:, num_prefix_tokens:]
    n = spatial.shape[1]
    if grid_size is not None and grid_size[0] * grid_size[1] == n:
        h, w = grid_size
    else:
        h = w = math.isqrt(n)
        if h * w != n:
            raise BackboneError(f"{n} spatial tokens, not a square grid; set the backbone's grid_size")
    return spatial.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class EATModel(nn.Module):
    """Class and attribute prediction from one backbone.

    ``forward`` returns :class:`EATOutput`. With linear heads (the default), Grad-CAM of any
    class or attribute is the closed-form CAM of :mod:`eatdist.explain.cam`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_attributes: int,
        head_hidden: int = 0,
        dropout: float = 0.0,
        backbone_name: str = "",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        # Kept so that a contract violation found at the first forward names the backbone.
        self.backbone_name = backbone_name or type(backbone).__name__
        self.num_features = int(backbone.num_features)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        grid = getattr(backbone, "grid_size", None)
        self.grid_size = tuple(grid) if grid is not None else None
        self.class_head = make_head(self.num_features, num_classes, head_hidden, dropout)
        self.attr_head = make_head(self.num_features, num_attributes, head_hidden, dropout)

    @property
    def linear_heads(self) -> bool:
        return linear_weight(self.class_head) is not None and linear_weight(self.attr_head) is not None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the backbone's features as ``[B, C, H, W]``.

        Raises:
            BackboneError: naming the backbone, when its output is neither a map nor tokens of width C.
        """
        features = self.backbone.forward_features(x)
        name, c = self.backbone_name, self.num_features
        needs = f"contract 2 needs a map [B, {c}, H, W] or tokens [B, N, {c}]"
        if not isinstance(features, torch.Tensor):
            raise BackboneError(f"backbone '{name}': forward_features gave a {type(features).__name__}; {needs}")
        if features.ndim == 2:
            raise BackboneError(
                f"backbone '{name}': forward_features gave flat features of shape {tuple(features.shape)} "
                f"(pooled, no spatial map to explain); {needs}"
            )
        if features.ndim == 3:
            try:
                features = tokens_to_grid(features, self.num_prefix_tokens, self.grid_size)
            except BackboneError as exc:
                raise BackboneError(f"backbone '{name}': {exc}") from None
        if features.ndim != 4 or features.shape[1] != c:
            raise BackboneError(f"backbone '{name}': forward_features gave shape {tuple(features.shape)}; {needs}")
        return features

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool a ``[B, C, H, W]`` map and apply both heads."""
        pooled = features.mean(dim=(2, 3))
        return self.class_head(pooled), self.attr_head(pooled)

    def forward(self, x: torch.Tensor) -> EATOutput:
        features = self.feature_map(x)
        class_logits, attr_logits = self.heads(features)
        return EATOutput(class_logits, attr_logits, features)


def eat_loss(
    out: EATOutput,
    labels: torch.Tensor,
    attributes: torch.Tensor,
    attr_mask: torch.Tensor,
    attr_weight: float,
    attr_loss: str = "bce",
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (total loss, parts): cross-entropy + ``attr_weight`` × attribute loss.

    The attribute loss is BCE-with-logits on per-image labels (``"bce"``) or the squared error of
    the sigmoid against class-level strengths (``"mse"``), averaged over annotated entries only.
    ``attr_weight == 0`` is the plain classifier baseline; ``label_smoothing`` softens the
    class targets (timm's and torch's meaning). ``weight`` (1 per image, 0 for a
    stand-in of an unusable sample) leaves images out of both averages; a batch of stand-ins only
    gives a zero loss (and zero gradients), so its rank still joins the step.
    """
    if weight is None:
        ce = F.cross_entropy(out.class_logits.float(), labels, label_smoothing=label_smoothing)
    else:
        per_image = F.cross_entropy(out.class_logits.float(), labels, reduction="none", label_smoothing=label_smoothing)
        ce = (per_image * weight).sum() / weight.sum().clamp(min=1.0)
        attr_mask = attr_mask * weight[:, None]
    logits = out.attr_logits.float()
    if attr_loss == "bce":
        per_entry = F.binary_cross_entropy_with_logits(logits, attributes, reduction="none")
    elif attr_loss == "mse":
        per_entry = (torch.sigmoid(logits) - attributes) ** 2
    else:
        raise ValueError(f"attr_loss must be 'bce' or 'mse', got {attr_loss!r}")
    attr = (per_entry * attr_mask).sum() / attr_mask.sum().clamp(min=1.0)
    # With attr_weight 0 the attribute head still joins the graph (times zero), so DDP sees every
    # parameter used and the baseline needs no find_unused_parameters.
    total = ce + attr_weight * attr
    return total, {"ce": ce.detach(), "attr": attr.detach()}
