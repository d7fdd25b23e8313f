"""Heatmaps for classes and attributes.

Both heads are linear over a global average pool, so the Grad-CAM weight of channel ``c`` for
target ``k`` is ``W[k, c] / (H * W)`` and Grad-CAM equals CAM up to that constant:
``map_k = relu(sum_c W[k, c] * A[c])``. All maps of a batch come from one forward pass and one
einsum, with no backward. Non-linear heads fall back to Grad-CAM by batched autograd.

A spatial attribute head (:mod:`eatdist.models.heads`) computes its attribute maps in the
forward pass: they are the explanation's attribute maps (``relu`` of the logit map, so a cell
shows where the attribute is seen). Its class map is the class's CAM, weighted by the cells the
class head pooled with when ``model.class_pool`` is ``attributes``: the class logit is exactly
the sum of that map's signed cells plus the bias.
"""

from __future__ import annotations

import torch

from eatdist.models.eat import EATModel, linear_weight


def normalise_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each ``[..., H, W]`` map to a maximum of 1 (all-zero maps stay zero)."""
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return maps / peak.clamp(min=eps)


def closed_form_maps(
    model: EATModel,
    features: torch.Tensor,
    classes: torch.Tensor,
    attributes: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``[B, 1 + K, H, W]`` maps: the class ``classes[b]``, then attributes ``attributes[b]``.

    ``features`` is the ``[B, C, H, W]`` map from :meth:`EATModel.feature_map`; ``attributes`` is
    ``[B, K]`` attribute indices; ``weights``: :func:`head_weights` of ``model``, when a caller
    keeps them. Raises:
        ValueError: when the heads are not linear (use :func:`gradcam_autograd`).
    """
    weights = weights if weights is not None else head_weights(model)
    w_class = linear_weight(model.class_head)
    if weights is None or w_class is None:
        raise ValueError("closed-form maps need linear heads; use gradcam_autograd")
    rows = torch.cat([classes[:, None], attributes + len(w_class)], dim=1)  # attribute rows follow the classes
    b, _, h, w = features.shape
    picked = weights.index_select(0, rows.reshape(-1)).view(b, -1, weights.shape[1]).to(features.dtype)  # [B, 1 + K, C]
    return torch.bmm(picked, features.reshape(b, features.shape[1], h * w)).relu_().view(b, -1, h, w)


def head_weights(model: EATModel) -> torch.Tensor | None:
    """Return the class head's rows, then the attribute head's (``[N + A, C]``), or None unless both are linear."""
    w_class, w_attr = linear_weight(model.class_head), linear_weight(model.attr_head)
    if w_class is None or w_attr is None:
        return None
    return torch.cat([w_class, w_attr]).detach()


def spatial_head_maps(
    model: EATModel, features: torch.Tensor, classes: torch.Tensor, attributes: torch.Tensor
) -> torch.Tensor:
    """Return ``[B, 1 + K, H, W]`` maps of a model with a spatial attribute head, same layout as closed form.

    Raises:
        ValueError: when the model has no spatial attribute head, or its class head is not linear.
    """
    w_class = linear_weight(model.class_head)
    if not model.spatial or w_class is None:
        raise ValueError("spatial head maps need a spatial attribute head and a linear class head")
    attr_maps = model.attr_head.maps(features)  # type: ignore[operator]
    class_map = torch.einsum("bc,bchw->bhw", w_class[classes].to(features.dtype), features)
    cells = model.cell_weights(attr_maps)
    if cells is not None:  # scaled by the cell count so that uniform weights give the plain CAM
        class_map = class_map * cells.to(class_map.dtype) * cells[0].numel()
    chosen = attr_maps.gather(1, attributes[:, :, None, None].expand(-1, -1, *attr_maps.shape[2:]))
    return torch.relu(torch.cat([class_map[:, None], chosen], dim=1))


def gradcam_autograd(
    model: EATModel, images: torch.Tensor, classes: torch.Tensor, attributes: torch.Tensor
) -> torch.Tensor:
    """Grad-CAM by autograd for any heads: ``[B, 1 + K, H, W]``, same layout as closed form.

    One backward pass for all targets (``is_grads_batched``), never one per target.
    """
    with torch.enable_grad():
        features = model.feature_map(images)
        class_logits, attr_logits = model.heads(features)
        scores = torch.cat([class_logits.gather(1, classes[:, None]), attr_logits.gather(1, attributes)], dim=1)
        targets = scores.shape[1]
        # grad_outputs[t] selects target t of every image; images are independent in eval mode.
        selectors = torch.eye(targets, dtype=scores.dtype, device=scores.device)[:, None, :].expand(
            targets, *scores.shape
        )
        (grads,) = torch.autograd.grad(scores, features, grad_outputs=selectors.contiguous(), is_grads_batched=True)
    alphas = grads.mean(dim=(3, 4))  # [T, B, C]
    return torch.relu(torch.einsum("tbc,bchw->bthw", alphas, features.detach()))


def explanation_maps(
    model: EATModel,
    images: torch.Tensor | None,
    features: torch.Tensor,
    classes: torch.Tensor,
    attributes: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return class and attribute maps by the cheapest exact route for ``model``'s heads
    (``weights``: see :func:`closed_form_maps`); only Grad-CAM (MLP heads) reads ``images``.

    Raises:
        ValueError: when Grad-CAM is the route and ``images`` is None.
    """
    if model.spatial:
        return spatial_head_maps(model, features, classes, attributes)
    if model.linear_heads:
        return closed_form_maps(model, features, classes, attributes, weights)
    if images is None:
        raise ValueError("Grad-CAM maps (MLP heads) need the model's input images")
    return gradcam_autograd(model, images, classes, attributes)
