"""The built-in plugin: any timm model as an eatdist backbone (registered as entry point ``timm``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from eatdist.errors import BackboneError

log = logging.getLogger(__name__)


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
        # Where pretrained weights came from (source, revision, file); empty without them.
        self.weights_source: dict[str, str] = {}
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


def _weights_source(model: nn.Module) -> dict[str, str]:
    """Where timm took ``model``'s pretrained weights from: ``source``, ``revision`` and ``file``.

    For Hub weights the revision is the commit of the cache snapshot that holds them (the one
    the cache's ``refs`` resolve to, as timm's download did); for URL weights it is empty.
    """
    from huggingface_hub import try_to_load_from_cache

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return {"source": str(cfg.get("url") or cfg.get("file") or ""), "revision": "", "file": ""}
    repo, _, pinned = str(hub_id).partition("@")
    revision = pinned or None
    names = [cfg.get("hf_hub_filename"), "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]
    for name in filter(None, names):
        found = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(found, str):
            return {"source": f"hf-hub:{repo}", "revision": Path(found).parent.name, "file": name}
    return {"source": f"hf-hub:{repo}", "revision": revision or "", "file": ""}


def _create_pretrained(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Create timm model ``model_name`` with timm's pretrained weights (the Hub through its cache).

    Raises:
        BackboneError: one line naming the model, when timm has no weights for it, or they are
            not in the cache while ``HF_HUB_OFFLINE`` is set, or the download fails.
    """
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from eatdist.models.hub import hub_cache, not_cached

    if not model_name.startswith("hf-hub:"):
        cfg = timm.models.get_pretrained_cfg(model_name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            tagged = list(timm.list_pretrained(f"{model_name.split('.')[0]}.*"))[:3]
            hint = f" (tagged weights: {', '.join(tagged)})" if tagged else ""
            raise BackboneError(f"timm model '{model_name}' has no pretrained weights{hint}; drop model.pretrained")
    # timm logs where it loads from before it knows whether it can: eatdist says it once, after.
    timm_log = logging.getLogger("timm.models._builder")
    level = timm_log.level
    timm_log.setLevel(logging.WARNING)
    try:
        return timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise BackboneError(not_cached(f"pretrained weights of timm model '{model_name}' are")) from None
    except OSError as exc:  # the network, a full disk, a cache folder that cannot be written
        raise BackboneError(
            f"cannot fetch pretrained weights of timm model '{model_name}' into {hub_cache()}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None
    finally:
        timm_log.setLevel(level)


def timm_backbone(
    model_name: str, pretrained_path: str | None = None, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """Build timm model ``model_name`` as a backbone.

    ``pretrained`` loads timm's own pretrained weights for the model, the way ``timm.create_model
    (..., pretrained=True)`` does: from the Hugging Face Hub through its cache (``HF_HOME``,
    ``HF_HUB_OFFLINE=1`` for nodes without network that read a cache filled elsewhere); an
    ``hf-hub:org/name`` model name takes the architecture and weights from that repository. The
    backbone's ``weights_source`` then says where they came from (source, revision, file).
    ``pretrained_path`` instead loads a local weights file (safetensors or a ``torch.save`` state
    dict, read with ``weights_only=True``), for instance ``model.safetensors`` of the Hugging Face
    hub repository ``timm/<model_name>``. The classifier's and head-only layers' keys are ignored.

    Raises:
        BackboneError: when both are asked for, when the weights cannot be had (see
            ``_create_pretrained``), or the file is missing or lacks weights the backbone has.
    """
    import timm

    if pretrained and pretrained_path:
        raise BackboneError("model.pretrained and model.pretrained_path are both set: choose one")
    if pretrained:
        model = _create_pretrained(model_name, kwargs)
        backbone = TimmBackbone(model)
        backbone.weights_source = _weights_source(model)
        source = backbone.weights_source
        log.info("pretrained weights of %s: %s %s", model_name, source["source"], source["revision"])
        return backbone
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
