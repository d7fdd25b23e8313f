"""The EAT model (contract 3): backbone → feature map → global average pool → two heads."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from eatdist.errors import BackboneError, ConfigError
from eatdist.models.heads import HeadOptions, SpatialAttributeHead, attribute_cell_weights


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
    class or attribute is the closed-form CAM of :mod:`eatdist.explain.cam`; ``head`` chooses
    another attribute head (:mod:`eatdist.models.heads`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_attributes: int,
        head_hidden: int = 0,
        dropout: float = 0.0,
        backbone_name: str = "",
        head: HeadOptions | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        # Kept so that a contract violation found at the first forward names the backbone.
        self.backbone_name = backbone_name or type(backbone).__name__
        self.num_features = int(backbone.num_features)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        grid = getattr(backbone, "grid_size", None)
        self.grid_size = tuple(grid) if grid is not None else None
        self.head = head or HeadOptions()
        if self.head.spatial and head_hidden > 0:
            raise ConfigError("config key 'model.head_hidden': a spatial attribute head has no hidden layer; use 0")
        self.class_head = make_head(self.num_features, num_classes, head_hidden, dropout)
        self.attr_head: nn.Module
        if self.head.spatial:
            self.attr_head = SpatialAttributeHead(
                self.num_features, num_attributes, self.head.attr_pool, self.head.attr_topk, dropout
            )
        else:
            self.attr_head = make_head(self.num_features, num_attributes, head_hidden, dropout)

    @property
    def linear_heads(self) -> bool:
        """Both heads linear over the global average pool (the closed-form CAM holds)."""
        return linear_weight(self.class_head) is not None and linear_weight(self.attr_head) is not None

    @property
    def spatial(self) -> bool:
        """The attribute head gives one map per attribute (:class:`SpatialAttributeHead`)."""
        return isinstance(self.attr_head, SpatialAttributeHead)

    def attribute_directions(self) -> torch.Tensor | None:
        """Return each attribute's ``[A, C]`` direction in feature space, or None for an MLP head."""
        if isinstance(self.attr_head, SpatialAttributeHead):
            return self.attr_head.weight
        return linear_weight(self.attr_head)

    def cell_weights(self, attr_maps: torch.Tensor) -> torch.Tensor | None:
        """Return the ``[B, H, W]`` weights the class head pools with, or None for the plain mean."""
        return attribute_cell_weights(attr_maps) if self.head.class_pool == "attributes" else None

    def class_input(self, features: torch.Tensor, attr_maps: torch.Tensor | None = None) -> torch.Tensor:
        """Return the ``[B, C]`` vector the class head reads: the mean of the cells, or their attribute-weighted sum."""
        if self.head.class_pool == "attributes":
            if attr_maps is None:
                attr_maps = self.attr_head.maps(features)
            weights = attribute_cell_weights(attr_maps).to(features.dtype)
            return torch.einsum("bchw,bhw->bc", features, weights)
        return features.mean(dim=(2, 3))

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
        """Pool a ``[B, C, H, W]`` map and apply both heads; return (class logits, attribute logits)."""
        if isinstance(self.attr_head, SpatialAttributeHead):
            maps = self.attr_head.maps(features)
            return self.class_head(self.class_input(features, maps)), self.attr_head.pool(maps)
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
    entry_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (total loss, parts): cross-entropy + ``attr_weight`` × attribute loss.

    The attribute loss is BCE-with-logits on per-image labels (``"bce"``) or the squared error of
    the sigmoid against class-level strengths (``"mse"``), averaged over annotated entries only.
    ``attr_weight == 0`` is the plain classifier baseline; ``label_smoothing`` softens the
    class targets (timm's and torch's meaning). ``weight`` (1 per image, 0 for a
    stand-in of an unusable sample) leaves images out of both averages; a batch of stand-ins only
    gives a zero loss (and zero gradients), so its rank still joins the step. ``entry_weight``
    (``[B, A]``, see :func:`off_prototype_weights`) scales each attribute entry's loss; the
    average still divides by the annotated entries, so weights above 1 add emphasis.
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
    weighted = per_entry * attr_mask if entry_weight is None else per_entry * attr_mask * entry_weight
    attr = weighted.sum() / attr_mask.sum().clamp(min=1.0)
    # With attr_weight 0 the attribute head still joins the graph (times zero), so DDP sees every
    # parameter used and the baseline needs no find_unused_parameters.
    total = ce + attr_weight * attr
    return total, {"ce": ce.detach(), "attr": attr.detach()}


def localisation_loss(
    maps: torch.Tensor,
    boxes: torch.Tensor,
    box_mask: torch.Tensor,
    attributes: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return how far the attribute maps lie outside the attributes' boxes (``loss.localisation_weight``).

    Each map's cells are a softmax distribution; the loss is the mean, over attributes an image
    shows (label > 0.5) and has a box for (``box_mask``), of ``-log`` of the share of that
    distribution inside the box. ``boxes`` is ``[B, A, 4]`` in fractions of the input side
    (x0, y0, x1, y1): a cell is inside when its centre is, and the cell holding the box's centre
    always is, so a box smaller than a cell still has one. ``weight`` (1 per image, 0 for a
    stand-in) leaves images out, as in :func:`eat_loss`. Zero when no entry has a box.
    """
    b, a, h, w = maps.shape
    boxes = boxes.to(maps.device, torch.float32)
    ys = (torch.arange(h, device=maps.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=maps.device, dtype=torch.float32) + 0.5) / w
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    inside = ((ys >= y0) & (ys < y1))[..., :, None] & ((xs >= x0) & (xs < x1))[..., None, :]
    cy = ((y0 + y1) / 2 * h).long().clamp(0, h - 1)[..., 0]
    cx = ((x0 + x1) / 2 * w).long().clamp(0, w - 1)[..., 0]
    centre = F.one_hot(cy * w + cx, h * w).bool()
    inside = inside.flatten(2) | centre
    log_p = maps.float().flatten(2).log_softmax(2)
    log_inside = torch.logsumexp(log_p.masked_fill(~inside, float("-inf")), dim=2)
    use = box_mask.to(log_p) * (attributes > 0.5).to(log_p)
    if weight is not None:
        use = use * weight.to(log_p)[:, None]
    return -(log_inside * use).sum() / use.sum().clamp(min=1.0)


def off_prototype_weights(
    labels: torch.Tensor, attributes: torch.Tensor, prototypes: torch.Tensor, off_weight: float
) -> torch.Tensor:
    """Return ``[B, A]`` loss weights: 1 where an image agrees with its class's prototype, ``off_weight`` where not.

    ``prototypes`` is the ``[C, A]`` class × attribute matrix (``class_attributes``); an
    attribute is in a class's prototype at 0.5 or more. Off-prototype entries are the few (8 %
    of the groups on the synthetic corpus) where only the image, not the class, tells the answer.
    """
    off = (attributes > 0.5) != (prototypes[labels] >= 0.5)
    return 1.0 + (off_weight - 1.0) * off.to(attributes.dtype)
