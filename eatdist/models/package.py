"""The model package: everything ``explain`` needs, without the training config.

A folder holding ``model.safetensors`` (weights) and ``eatdist_model.json`` (backbone name and
arguments, head shape, class and attribute names, the class × attribute matrix, preprocessing).
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

from eatdist.data.pipeline import Preprocess
from eatdist.errors import EatdistError, ModelPackageError
from eatdist.models.eat import EATModel
from eatdist.models.heads import HeadOptions
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
    head: HeadOptions | None = None,
) -> EATModel:
    """Create the backbone through the registry and put the EAT heads on it (``head``: linear by default)."""
    kwargs = dict(backbone_args)
    if pretrained_path:
        kwargs["pretrained_path"] = pretrained_path
    module = create_backbone(backbone, **kwargs)
    return EATModel(module, num_classes, num_attributes, head_hidden, dropout, backbone_name=backbone, head=head)


def backbone_preprocess(model: EATModel, image_size: int) -> Preprocess:
    """Return the preprocessing for ``model``: its backbone's mean/std, else ImageNet's."""
    cfg = getattr(model.backbone, "pretrained_cfg", None) or getattr(model.backbone, "default_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    return Preprocess(image_size, mean, std)  # type: ignore[arg-type]


def save_package(path: str | Path, model: nn.Module, meta: PackageMeta) -> Path:
    """Write weights and metadata into folder ``path``; set ``meta.model_id``; return the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    save_model(model, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    meta.model_id = f"{meta.dataset or 'eat'}-{meta.backbone.replace('/', '_')}-{digest}"
    (folder / META_FILE).write_text(json.dumps(asdict(meta), indent=1))
    return folder


def read_meta(path: str | Path) -> PackageMeta:
    """Read a package's metadata.

    Raises:
        ModelPackageError: when ``path`` is not an eatdist model package.
    """
    folder = Path(path)
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
    """Rebuild the model of a package, load its weights and return it in eval mode with its meta.

    Raises:
        ModelPackageError: naming the package, when the folder is not a package, its backbone
            cannot be built, or its weights do not fit the model its metadata describes.
    """
    meta = read_meta(path)
    weights = Path(path) / WEIGHTS_FILE
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
