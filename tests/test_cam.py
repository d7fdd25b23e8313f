import copy
import functools

import pytest
import torch

from eatdist.explain.cam import closed_form_maps, gradcam_autograd, normalise_maps
from eatdist.models.eat import EATModel
from eatdist.models.registry import create_backbone

BACKBONES = [("test_resnet", {"output_stride": 16}), ("test_convnext", {}), ("test_vit", {"img_size": 64})]


@pytest.mark.parametrize("name,kwargs", BACKBONES)
def test_closed_form_equals_autograd_gradcam(name, kwargs):
    torch.manual_seed(0)
    model = EATModel(create_backbone(name, **kwargs), num_classes=6, num_attributes=9).eval()
    images = torch.randn(3, 3, 64, 64)
    classes = torch.tensor([0, 4, 5])
    attributes = torch.tensor([[1, 2, 8], [0, 3, 7], [5, 6, 4]])
    with torch.no_grad():
        out = model(images)
        closed = closed_form_maps(model, out.features, classes, attributes)
    autograd = gradcam_autograd(model, images, classes, attributes)
    assert closed.shape == autograd.shape == (3, 4, *out.features.shape[2:])
    assert (closed.flatten(2).amax(2) > 0).any()
    torch.testing.assert_close(normalise_maps(closed), normalise_maps(autograd), atol=1e-5, rtol=0)


def test_nonlinear_heads_use_batched_autograd():
    model = EATModel(create_backbone("test_resnet"), 4, 5, head_hidden=16).eval()
    assert not model.linear_heads
    with pytest.raises(ValueError, match="linear heads"):
        closed_form_maps(model, torch.randn(1, model.num_features, 2, 2), torch.tensor([0]), torch.tensor([[1]]))
    maps = gradcam_autograd(model, torch.randn(2, 3, 64, 64), torch.tensor([1, 2]), torch.tensor([[0, 1], [2, 3]]))
    assert maps.shape == (2, 3, 2, 2) and (maps >= 0).all()


@pytest.mark.parametrize("head_hidden", [0, 16])
def test_explainer_maps_and_contributions_are_those_of_the_cam_functions(head_hidden):
    from eatdist.config import ExplainConfig
    from eatdist.explain.cam import explanation_maps
    from eatdist.explain.explainer import Explainer
    from eatdist.explain.text import attribute_contributions
    from eatdist.models.package import PackageMeta

    torch.manual_seed(0)
    model = EATModel(create_backbone("test_resnet"), 4, 7, head_hidden=head_hidden).eval()
    preprocess = {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    meta = PackageMeta(backbone="test_resnet", backbone_args={}, classes=list("abcd"),
                       attributes=[f"attr {a}" for a in range(7)], preprocess=preprocess,
                       class_attributes=[[float((a + c) % 2) for a in range(7)] for c in range(4)])  # fmt: skip
    explainer = Explainer(model, meta, ExplainConfig(), torch.device("cpu"))
    images = torch.randn(5, 3, 64, 64)
    explainer.infer(images)

    def in_place():
        with torch.no_grad():
            for p in [*model.class_head.parameters(), *model.attr_head.parameters()]:
                p.mul_(-1.5)

    def replaced():
        model.attr_head = copy.deepcopy(model.attr_head)
        with torch.no_grad():
            for p in model.attr_head.parameters():
                p.copy_(torch.randn_like(p))

    for change in (in_place, replaced):  # weights changed after the explainer was made (fine-tuned, loaded)
        change()
        result = explainer.infer(images)
        with explainer.inference():
            out = model(images)
            classes = torch.tensor(result.classes)
            contributions = attribute_contributions(model, out.features, classes)  # no cached directions
            slots = result.maps.shape[1] - 1
            picked = torch.tensor([[n.index for n in row] + [0] * (slots - len(row)) for row in result.named])
            maps = explanation_maps(model, images, out.features, classes, picked)
        assert classes.tolist() == out.class_logits.argmax(1).tolist()
        close = functools.partial(
            torch.testing.assert_close, rtol=1e-5, msg=lambda m, name=change.__name__: f"{name}: {m}"
        )
        close(torch.from_numpy(result.contributions).float(), contributions, atol=1e-5)
        close(torch.from_numpy(result.maps).float(), normalise_maps(maps), atol=1e-3, rtol=0)
        close(torch.from_numpy(result.peaks).float(), maps.flatten(2).amax(2), atol=1e-6)
