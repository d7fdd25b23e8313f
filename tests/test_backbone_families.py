"""The paper's five backbone families, built from their CUB recipes in ``configs/``.

Each is built the way the trainer builds it (recipe backbone name and arguments, only size or
width reduced so a CPU runs it in seconds), takes one training step and gives one closed-form
explanation that matches Grad-CAM by autograd.
"""

from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import REPO
from eatdist.config import load_config
from eatdist.errors import BackboneError
from eatdist.explain.cam import closed_form_maps, gradcam_autograd, normalise_maps
from eatdist.models.eat import eat_loss
from eatdist.models.package import IMAGENET_MEAN, IMAGENET_STD, backbone_preprocess, build_model
from eatdist.models.registry import create_backbone

CUB_CLASSES, CUB_ATTRIBUTES = 200, 312
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Family:
    recipe: str
    image_size: int  # the recipe's, and the size its weights were trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    test_size: int  # the reduced input the test runs at
    grid: int  # the feature grid at test_size
    reduce: dict[str, Any] = field(default_factory=dict)  # size/width kwargs over the recipe's


FAMILIES = [
    Family("cub_resnet50.yaml", 224, IMAGENET_MEAN, IMAGENET_STD, 64, 2),
    Family("cub_vgg16_bn.yaml", 224, IMAGENET_MEAN, IMAGENET_STD, 64, 2),
    # Inception-v3 needs 75 px at least, and gives a 1 x 1 map below 107 px: no heatmap to check.
    Family("cub_inception_v3.yaml", 299, HALF, HALF, 107, 2),
    Family("cub_densenet121.yaml", 224, IMAGENET_MEAN, IMAGENET_STD, 64, 2),
    # timm passes these through to the ViT class: a 2-block, 192-wide ViT with 16-px patches.
    Family(
        "cub_vit_base_patch16_224.yaml",
        224,
        HALF,
        HALF,
        64,
        4,
        {"img_size": 64, "depth": 2, "embed_dim": 192, "num_heads": 3},
    ),
]


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_every_family_has_a_recipe():
    recipes = {p.name for p in (REPO / "configs").glob("cub_*.yaml")}
    assert {f.recipe for f in FAMILIES} <= recipes


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.recipe.removeprefix("cub_").removesuffix(".yaml"))
def test_family_trains_and_explains_from_its_recipe(family: Family):
    cfg = load_config(REPO / "configs" / family.recipe)
    assert cfg.data.root == "data/cub" and cfg.data.image_size == family.image_size
    assert cfg.data.crop_scale_min < 1.0 and cfg.model.pretrained and cfg.model.pretrained_path is None
    # A ViT's position embeddings fit one input size: the recipe must build it for the data's.
    assert cfg.model.backbone_args.get("img_size", cfg.data.image_size) == cfg.data.image_size

    torch.manual_seed(0)
    model = build_model(
        cfg.model.backbone,
        {**cfg.model.backbone_args, **family.reduce},
        CUB_CLASSES,
        CUB_ATTRIBUTES,
        cfg.model.head_hidden,
        cfg.model.dropout,
    )
    assert tuple(model.backbone.pretrained_cfg["input_size"]) == (3, family.image_size, family.image_size)
    pre = backbone_preprocess(model, cfg.data.image_size)
    assert (pre.image_size, pre.mean, pre.std) == (family.image_size, family.mean, family.std)

    # One training step: every parameter gets a gradient (DDP needs no find_unused_parameters).
    images = torch.randn(3, 3, family.test_size, family.test_size)
    labels = torch.tensor([0, 17, 199])
    attributes = (torch.rand(3, CUB_ATTRIBUTES) < 0.1).float()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=cfg.optim.weight_decay)
    model.train()
    out = model(images)
    loss, _ = eat_loss(out, labels, attributes, torch.ones_like(attributes), cfg.loss.attr_weight, cfg.loss.attr_loss)
    assert torch.isfinite(loss)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert changed[0] and changed[-1]  # the stem and the attribute head: the step reached both ends

    # One explanation: the predicted class and top-k attributes, closed form = Grad-CAM.
    model.eval()
    with torch.no_grad():
        out = model(images)
        classes = out.class_logits.argmax(1)
        top = out.attr_logits.topk(cfg.explain.top_k, dim=1).indices
        closed = closed_form_maps(model, out.features, classes, top)
    assert out.features.shape == (3, model.num_features, family.grid, family.grid)
    assert closed.shape == (3, 1 + cfg.explain.top_k, family.grid, family.grid)
    assert (closed.flatten(2).amax(2) > 0).any()
    autograd = gradcam_autograd(model, images, classes, top)
    torch.testing.assert_close(normalise_maps(closed), normalise_maps(autograd), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,kwargs", [("test_convnext", {}), ("test_mambaout", {}), ("test_vit3", {"img_size": 64})])
def test_head_only_layers_are_dropped_so_every_parameter_trains(name: str, kwargs: dict[str, Any]):
    """timm keeps head layers with num_classes=0 (ConvNeXt's head norm, an attention pool)."""
    timm_model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    backbone = create_backbone(name, **kwargs)
    assert backbone.num_features == timm_model.num_features
    assert sum(p.numel() for p in backbone.parameters()) < sum(p.numel() for p in timm_model.parameters())
    features = backbone.forward_features(torch.randn(2, 3, 64, 64))
    if features.ndim == 4:
        assert features.shape[1] == backbone.num_features  # channels-last maps (MambaOut) are permuted
    features.sum().backward()
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []


def test_pretrained_file_with_head_weights_loads(tmp_path):
    """A whole timm checkpoint (classifier and head norm included) loads into the trimmed backbone."""
    torch.manual_seed(1)
    full = timm.create_model("test_convnext", pretrained=False, num_classes=10)
    path = tmp_path / "model.safetensors"
    save_file(full.state_dict(), str(path))
    backbone = create_backbone("test_convnext", pretrained_path=str(path))
    loaded = backbone.model.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, full.state_dict()[key], rtol=0, atol=0)
    assert "head.fc.weight" in full.state_dict() and "head.norm.weight" not in loaded


def test_grad_checkpointing_reaches_the_timm_model(monkeypatch):
    backbone = create_backbone("test_resnet")
    backbone.set_grad_checkpointing(True)
    assert backbone.model.grad_checkpointing

    def unsupported(enable: bool = True) -> None:
        assert not enable, "gradient checkpointing not supported"  # what timm's VGG and Inception do

    monkeypatch.setattr(backbone.model, "set_grad_checkpointing", unsupported)
    with pytest.raises(BackboneError, match="does not support gradient checkpointing"):
        backbone.set_grad_checkpointing(True)
