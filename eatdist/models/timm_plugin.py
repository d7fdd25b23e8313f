"""The built-in plugin: any timm model as an eatdist backbone (registered as entry point ``timm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from eatdist.errors import BackboneError


def _probe_image(model: nn.Module) -> torch.Tensor:
    """Return an empty meta-device batch of one image of the size ``model`` was built for."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[1:]
    height, width = (size, size) if isinstance(size, int) else size
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = stem.in_channels if stem is not None else 3
    return torch.empty(1, channels, height, width, device="meta")


def _probe_features(backbone: nn.Module, image: torch.Tensor) -> tuple[torch.Size, list[str]]:
    """Run ``backbone`` on meta tensors: return its output shape and its head-only submodules.

    A head-only submodule is one ``backbone(image)`` never calls and whose parameters get no
    gradient (the ``pre_logits`` MLP of VGG, ConvNeXt's ``head.norm``, MobileNetV3's
    ``conv_head``, ViT's ``fc_norm`` with average pooling): timm keeps them with
    ``num_classes=0`` because its ``forward_head`` uses them. Only top-most such modules are
    named. Nothing is computed or allocated: weights and input are meta tensors.
    """
    called: set[str] = set()
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: called.add(name))
        for name, module in backbone.named_modules()
        if name
    ]
    was_training = backbone.training
    backbone.eval()
    try:
        params = {n: torch.empty_like(p, device="meta").requires_grad_() for n, p in backbone.named_parameters()}
        buffers = {n: torch.empty_like(b, device="meta") for n, b in backbone.named_buffers()}
        out = functional_call(backbone, {**params, **buffers}, (image,))
        grads = torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(was_training)
    unused = {name for name, grad in zip(params, grads, strict=True) if grad is None}
    head_only: list[str] = []
    for name, module in backbone.named_modules():
        if not name or name in called or any(name.startswith(f"{h}.") for h in head_only):
            continue
        # The gradient test as well: some models (EVA's qkv) use a submodule's weight without calling it.
        names = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if names and all(n in unused for n in names):
            head_only.append(name)
    return out.shape, head_only


class TimmBackbone(nn.Module):
    """A timm model without its classifier or head-only layers, exposing contract 2.

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
        shape: torch.Size | None = None
        head_only: list[str] = []
        try:
            shape, head_only = _probe_features(self, _probe_image(model))
        except Exception:
            # A model the meta probe cannot run (data-dependent shapes, tensors held outside its
            # parameters and buffers) is kept whole: it works, but DDP may then need
            # find_unused_parameters for its head-only layers.
            pass
        # Head-only layers would never get a gradient, which DDP rejects, and VGG's weigh 119M
        # parameters; forward_features never calls them, so Identity changes nothing it computes.
        for name in head_only:
            parent, _, attr = name.rpartition(".")
            setattr(self.get_submodule(parent), attr, nn.Identity())
        if shape is not None:
            # The width forward_features really gives: timm's num_features has named a head's
            # hidden width instead (4096 for VGG, whose features have 512 channels, in older timm).
            self.num_features = int(shape[1] if len(shape) == 4 else shape[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if features.ndim == 4 and self.channels_last_output:
            features = features.permute(0, 3, 1, 2)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the timm model's activations in backward (less memory, more time).

        Raises:
            BackboneError: when the timm model cannot checkpoint (VGG, Inception-v3).
        """
        toggle = getattr(self.model, "set_grad_checkpointing", None)
        try:
            if toggle is None:
                raise NotImplementedError
            toggle(enable)
        except (AssertionError, NotImplementedError):  # timm asserts for models without support
            raise BackboneError(
                f"timm model '{type(self.model).__name__}' does not support gradient checkpointing"
            ) from None


def timm_backbone(model_name: str, pretrained_path: str | None = None, **kwargs: Any) -> nn.Module:
    """Build timm model ``model_name`` as a backbone, never downloading weights.

    ``pretrained_path`` loads a local weights file (safetensors or a ``torch.save`` state dict,
    read with ``weights_only=True``), for instance ``model.safetensors`` of the Hugging Face hub
    repository ``timm/<model_name>``; the classifier's and head-only layers' keys are ignored.

    Raises:
        BackboneError: when the weights file is missing or lacks weights the backbone has.
    """
    import timm

    kwargs.pop("pretrained", None)
    backbone = TimmBackbone(timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs))
    if pretrained_path:
        from timm.models import load_checkpoint

        if not Path(pretrained_path).is_file():
            raise BackboneError(f"pretrained weights file not found: {pretrained_path}")
        result = load_checkpoint(backbone.model, pretrained_path, strict=False, weights_only=True)
        missing = list(getattr(result, "missing_keys", []) or [])
        if missing:
            raise BackboneError(
                f"{pretrained_path} does not fit timm model '{model_name}': "
                f"{len(missing)} weights missing (first: {missing[0]})"
            )
    return backbone
