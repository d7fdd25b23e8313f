"""The model package: everything ``explain`` needs, without the training config.

A folder holding ``model.safetensors`` (weights) and ``eatdist_model.json`` (backbone name and
arguments, head shape, class and attribute names, the class × attribute matrix, preprocessing).
Wherever a package path is read, ``hf-hub:org/name[@revision]`` names one on the Hugging Face
Hub, read through its cache (:mod:`eatdist.models.hub`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from eatdist.atomic import atomic_path
from eatdist.data.pipeline import Preprocess
from eatdist.errors import EatdistError, ModelPackageError
from eatdist.models.eat import EATModel
from eatdist.models.heads import HeadOptions
from eatdist.models.hub import download_package, is_hub_name
from eatdist.models.registry import create_backbone

META_FILE = "eatdist_model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "eatdist-model/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PackageMeta:
    """What a model package says about its model."""

    backbone: str
    backbone_args: dict[str, Any]
    classes: list[str]
    attributes: list[str]
    preprocess: dict[str, Any]
    head_hidden: int = 0
    attribute_groups: dict[str, list[int]] = field(default_factory=dict)
    class_attributes: list[list[float]] | None = None
    dataset: str = ""
    model_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    # Where the backbone's starting weights came from: source ("hf-hub:timm/resnet50.a1_in1k", a
    # URL or a file), revision (the Hub commit) and file; empty when training started from scratch.
    pretrained: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    # the attribute-head design (HeadOptions); packages written before it have linear heads
    head: dict[str, Any] = field(default_factory=dict)


def build_model(
    backbone: str,
    backbone_args: dict[str, Any],
    num_classes: int,
    num_attributes: int,
    head_hidden: int = 0,
    dropout: float = 0.0,
    pretrained_path: str | None = None,
    pretrained: bool = False,
    head: HeadOptions | None = None,
) -> EATModel:
    """Create the backbone through the registry and put the EAT heads on it (``head``: linear by default).

    ``pretrained`` asks the backbone's plugin for its pretrained weights (timm: the Hub through
    the Hugging Face cache); ``pretrained_path`` gives it a local weights file instead.
    """
    kwargs = dict(backbone_args)
    if pretrained_path:
        kwargs["pretrained_path"] = pretrained_path
    if pretrained:
        kwargs["pretrained"] = True
    module = create_backbone(backbone, **kwargs)
    return EATModel(module, num_classes, num_attributes, head_hidden, dropout, backbone_name=backbone, head=head)


def weights_source(model: EATModel) -> dict[str, str]:
    """Return where ``model``'s backbone took its starting weights from (see :class:`PackageMeta`), or {}."""
    return dict(getattr(model.backbone, "weights_source", None) or {})


def backbone_preprocess(model: EATModel, image_size: int) -> Preprocess:
    """Return the preprocessing for ``model``: its backbone's mean/std, else ImageNet's."""
    cfg = getattr(model.backbone, "pretrained_cfg", None) or getattr(model.backbone, "default_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    return Preprocess(image_size, mean, std)  # type: ignore[arg-type]


def save_package(path: str | Path, model: nn.Module, meta: PackageMeta) -> Path:
    """Write weights and metadata into folder ``path``; set ``meta.model_id``; return the folder.

    The package is written in a temporary folder beside ``path`` and swapped in when complete, so
    ``path`` holds the previous package or the new one, never a mix or a half-written file.
    Raises:
        DiskError: naming ``path``, the size needed and the space free, when the disk is full or
            not writable.
    """
    folder = Path(path)
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + (64 << 10)
    with atomic_path(folder, "the model package", needed, folder=True) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_model(model, str(weights))
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
        meta.model_id = f"{meta.dataset or 'eat'}-{meta.backbone.replace('/', '_')}-{digest}"
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=1))
    return folder


def package_folder(path: str | Path) -> Path:
    """Return the local folder of package ``path``: the path itself, or the cached snapshot of ``hf-hub:org/name``.

    Raises:
        ModelPackageError: when a Hub package cannot be had (see :func:`eatdist.models.hub.download_package`).
    """
    return download_package(path) if is_hub_name(path) else Path(path)  # type: ignore[arg-type]


def read_meta(path: str | Path) -> PackageMeta:
    """Read a package's metadata (``path``: a folder or ``hf-hub:org/name``).

    Raises:
        ModelPackageError: when ``path`` is not an eatdist model package.
    """
    folder = package_folder(path)
    meta_file = folder / META_FILE
    if not folder.is_dir() or not meta_file.is_file():
        raise ModelPackageError(f"{folder} is not an eatdist model package (no {META_FILE})")
    try:
        data = json.loads(meta_file.read_text())
        meta = PackageMeta(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelPackageError(f"{meta_file}: malformed model metadata ({exc})") from None
    if meta.format != FORMAT:
        raise ModelPackageError(f"{meta_file}: unsupported package format {meta.format!r} (expected {FORMAT})")
    return meta


def _weights_mismatch(model: nn.Module, weights: Path) -> str:
    """Describe how the tensors in ``weights`` differ from ``model``'s (first few), or ''."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"{k} is {list(found[k])}, the metadata needs {list(shape)}"
                for k, shape in expected.items() if k in found and found[k] != shape]  # fmt: skip
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return shown


def load_package(path: str | Path, device: str | torch.device = "cpu") -> tuple[EATModel, PackageMeta]:
    """Rebuild the model of a package (a folder or ``hf-hub:org/name``), load its weights, return it in eval mode
    with its meta.

    Raises:
        ModelPackageError: naming the package, when the folder is not a package, its backbone
            cannot be built, or its weights do not fit the model its metadata describes.
    """
    path = package_folder(path)
    meta = read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelPackageError(f"{path} is not a complete eatdist model package (no {WEIGHTS_FILE})")
    try:
        model = build_model(
            meta.backbone, meta.backbone_args, len(meta.classes), len(meta.attributes), meta.head_hidden,
            head=HeadOptions.from_json(meta.head),
        )  # fmt: skip
    except EatdistError as exc:
        raise ModelPackageError(f"model package {path}: {exc}") from None
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except Exception as exc:
        try:
            detail = _weights_mismatch(model, weights) or " ".join(str(exc).split())
        except Exception as read_exc:  # not a readable safetensors file at all
            detail = f"cannot read {WEIGHTS_FILE}: {' '.join(str(read_exc).split())}"
        raise ModelPackageError(
            f"model package {path}: {WEIGHTS_FILE} does not fit {META_FILE} (backbone '{meta.backbone}', "
            f"{len(meta.classes)} classes, {len(meta.attributes)} attributes): {detail}"
        ) from None
    return model.to(device).eval(), meta
