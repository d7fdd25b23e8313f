"""Backbone registry (plugins), the EAT model and the model package."""

from eatdist.models.eat import EATModel, EATOutput, eat_loss
from eatdist.models.package import PackageMeta, build_model, load_package, save_package
from eatdist.models.registry import create_backbone, is_backbone, list_backbones, load_failures

__all__ = [
    "EATModel",
    "EATOutput",
    "PackageMeta",
    "build_model",
    "create_backbone",
    "eat_loss",
    "is_backbone",
    "list_backbones",
    "load_failures",
    "load_package",
    "save_package",
]
