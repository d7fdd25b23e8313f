"""Sanity checks of class maps: do they depend on the weights, and on what the prediction rests on?

- **Cascading parameter randomisation** (Adebayo et al., "Sanity checks for saliency maps",
  NeurIPS 2018): re-initialise the model from the top (heads, then the backbone's last blocks)
  and compare its maps with the trained model's by Spearman rank correlation. A map that
  survives randomisation (high ρ) shows the input, not what the model learned.
- **Deletion against random maps**: remove the cells a map ranks highest (set to the mean
  colour, 0 after normalisation) and measure the drop in the predicted class's probability. A
  map that found the evidence makes the prediction fall further than a random map of the same
  resolution does. ROAD (Rong et al., ICML 2022: imputation instead of a flat colour, so the
  removed shape itself gives nothing away) is cross-checked in the tests with pytorch-grad-cam.

The maps are the explainer's (:func:`eatdist.explain.cam.explanation_maps`), for the class the
trained model predicts.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from eatdist.explain.cam import explanation_maps
from eatdist.models.eat import EATModel


def class_maps(model: EATModel, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Return ``[B, h, w]`` class maps of ``classes`` at feature resolution."""
    with torch.no_grad():
        features = model.feature_map(images)
    empty = torch.zeros(len(images), 0, dtype=torch.long)
    return explanation_maps(model, images, features, classes, empty)[:, 0].detach()


def _reinit(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every weight of ``module`` (normal, matched to its scale) and zero its biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
            else:  # normalisation scales
                p.fill_(1.0)


def cascade_stages(model: EATModel) -> list[tuple[str, list[nn.Module]]]:
    """Return the randomisation cascade: (label, modules re-initialised so far), from the heads down.

    The backbone's blocks come from its top-level children that hold parameters (timm CNNs:
    ``layer4``, ``layer3``, ...); the stem is never randomised alone.
    """
    root = model.backbone
    while len(list(root.children())) == 1:  # wrappers (a plugin's module around the timm model)
        root = next(root.children())
    blocks = [(n, m) for n, m in root.named_children() if any(True for _ in m.parameters())]
    stages: list[tuple[str, list[nn.Module]]] = []
    taken: list[nn.Module] = [model.class_head, model.attr_head]
    stages.append(("heads", list(taken)))
    for name, block in reversed(blocks[1:]):
        taken.append(block)
        stages.append((f"heads+{name}", list(taken)))
    return stages


def randomised(model: EATModel, modules: list[nn.Module], seed: int = 0) -> EATModel:
    """Return a copy of ``model`` whose ``modules`` (modules of ``model``) are re-initialised."""
    ids = {id(m) for m in modules}
    clone = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    for (_, original), (_, copied) in zip(model.named_modules(), clone.named_modules(), strict=True):
        if id(original) in ids:
            _reinit(copied, generator)
    return clone


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the ``[B]`` Spearman rank correlations of ``[B, ...]`` maps (ties get their mean rank)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1).double()
        order = flat.argsort(1)
        r = torch.empty_like(flat)
        r.scatter_(1, order, torch.arange(flat.shape[1], dtype=flat.dtype).expand_as(flat).contiguous())
        # mean rank over ties: average the ranks of equal values
        out = torch.empty_like(r)
        for i in range(len(flat)):
            _, inverse = flat[i].unique(return_inverse=True)
            sums = torch.zeros(int(inverse.max()) + 1, dtype=r.dtype).index_add_(0, inverse, r[i])
            counts = torch.zeros_like(sums).index_add_(0, inverse, torch.ones_like(r[i]))
            out[i] = (sums / counts)[inverse]
        return out

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp(min=1e-12)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear ``[B, h, w]`` → ``[B, H, W]``, as the overlays and the pointing game do."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def deletion_drop(
    model: EATModel, images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, fraction: float = 0.2
) -> torch.Tensor:
    """Return the ``[B]`` drop in ``classes``' probability when the top ``fraction`` of pixels by ``maps`` is removed.

    ``maps`` are ``[B, h, w]`` at any resolution (upsampled to the image); removed pixels get 0,
    the mean colour after normalisation. Ties are broken by a fixed tiny ramp.
    """
    b, _, h, w = images.shape
    heat = upsample(maps, (h, w)).flatten(1) + torch.linspace(0, 1e-6, h * w)
    cut = heat.topk(max(1, round(fraction * h * w)), dim=1).values[:, -1:]
    keep = (heat < cut).view(b, 1, h, w)
    with torch.no_grad():
        before = model(images).class_logits.softmax(1).gather(1, classes[:, None])[:, 0]
        after = model(images * keep).class_logits.softmax(1).gather(1, classes[:, None])[:, 0]
    return before - after


def random_maps(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform random maps of ``like``'s shape: the reference a real map must beat."""
    return torch.rand(like.shape, generator=torch.Generator().manual_seed(seed))
