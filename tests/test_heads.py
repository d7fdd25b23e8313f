"""Attribute heads: the spatial head's maps are its explanation, the class logit splits exactly over
the class map, packages remember the head, and the on/off-prototype metrics count what they say."""

import numpy as np
import pytest
import torch

from eatdist.config import load_config
from eatdist.errors import ConfigError
from eatdist.explain.cam import explanation_maps
from eatdist.explain.text import attribute_contributions, choose_attributes, explanation_text
from eatdist.metrics.prototype import prototype_metrics
from eatdist.models.eat import EATModel, eat_loss, off_prototype_weights
from eatdist.models.heads import HeadOptions
from eatdist.models.package import PackageMeta, build_model, load_package, read_meta, save_package
from eatdist.models.registry import create_backbone


def _model(**head):
    torch.manual_seed(0)
    return EATModel(create_backbone("test_resnet", output_stride=8), 5, 7, head=HeadOptions("spatial", **head)).eval()


@pytest.mark.parametrize("pool", ["max", "topk", "attention"])
def test_spatial_head_maps_are_the_attribute_maps_and_pool_to_the_logits(pool):
    model = _model(attr_pool=pool, class_pool="attributes")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        maps = model.attr_head.maps(out.features)
        explained = explanation_maps(
            model, images, out.features, out.class_logits.argmax(1), torch.tensor([[0, 6]] * 3)
        )
    assert out.attr_logits.shape == (3, 7) and maps.shape == (3, 7, 4, 4)
    torch.testing.assert_close(explained[:, 1:], torch.stack([maps[:, 0], maps[:, 6]], 1).relu())
    if pool == "max":
        torch.testing.assert_close(out.attr_logits, maps.flatten(2).amax(2))


def test_the_class_logit_is_the_sum_of_its_signed_map_over_the_cells_plus_the_bias():
    model = _model(class_pool="attributes")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        classes = torch.tensor([1, 4])
        weights = model.class_head[1].weight[classes]
        signed = torch.einsum("bc,bchw->bhw", weights, out.features) * model.cell_weights(
            model.attr_head.maps(out.features)
        )
        total = signed.flatten(1).sum(1) + model.class_head[1].bias[classes]
    torch.testing.assert_close(total, out.class_logits.gather(1, classes[:, None])[:, 0])


def test_contributions_of_a_spatial_head_read_the_cells_where_each_attribute_is_seen():
    model = _model()
    features = torch.rand(2, model.num_features, 4, 4)
    got = attribute_contributions(model, features, torch.tensor([0, 3]))
    assert got.shape == (2, 7) and torch.isfinite(got).all()
    # an attribute seen nowhere (its map negative everywhere) contributes nothing
    with torch.no_grad():
        model.attr_head.conv.bias[2] = -1e6
    assert attribute_contributions(model, features, torch.tensor([0, 3]))[:, 2].abs().max() == 0


def test_packages_remember_the_head_and_old_packages_load_linear(tmp_path):
    model = build_model("test_resnet", {"output_stride": 8}, 5, 7, head=HeadOptions("spatial", "topk", 2, "attributes"))
    meta = PackageMeta(backbone="test_resnet", backbone_args={"output_stride": 8}, classes=list("abcde"),
                       attributes=list("pqrstuv"), preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                       head=HeadOptions("spatial", "topk", 2, "attributes").to_json())  # fmt: skip
    save_package(tmp_path / "p", model.eval(), meta)
    loaded, _ = load_package(tmp_path / "p")
    assert loaded.spatial and loaded.head == HeadOptions("spatial", "topk", 2, "attributes")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).attr_logits, model(x).attr_logits)
    old = build_model("test_resnet", {"output_stride": 8}, 5, 7)
    save_package(tmp_path / "old", old.eval(), PackageMeta(**{**meta.__dict__, "head": {}}))
    assert read_meta(tmp_path / "old").head == {} and load_package(tmp_path / "old")[0].linear_heads


def test_bad_head_options_name_the_key():
    with pytest.raises(ConfigError, match="model.attr_pool"):
        HeadOptions("spatial", "median")
    with pytest.raises(ConfigError, match="model.class_pool"):
        HeadOptions("linear", class_pool="attributes")
    with pytest.raises(ConfigError, match="model.attr_head"):
        load_config(None, ["model.attr_head=conv"])


def test_off_prototype_entries_weigh_more_in_the_attribute_loss():
    prototypes = torch.tensor([[0.9, 0.1, 0.9], [0.1, 0.9, 0.1]])
    labels = torch.tensor([0, 1])
    attributes = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # entry (0, 1) and (1, 2) depart
    weights = off_prototype_weights(labels, attributes, prototypes, 5.0)
    assert weights.tolist() == [[1.0, 5.0, 1.0], [1.0, 1.0, 5.0]]
    model = _model()
    out = model(torch.randn(2, 3, 32, 32))
    out = type(out)(out.class_logits[:, :2], out.attr_logits[:, :3], out.features)
    plain, _ = eat_loss(out, labels, attributes, torch.ones(2, 3), 1.0)
    heavy, parts = eat_loss(out, labels, attributes, torch.ones(2, 3), 1.0, entry_weight=weights)
    assert heavy.item() > plain.item() and parts["attr"].item() > 0


def test_prototype_metrics_split_the_entries_by_the_class_prototype():
    matrix = [[0.9, 0.1], [0.1, 0.9]]
    labels = np.array([0, 0, 1, 1])
    truth = np.array([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=float)  # (1, 1) and (3, 0) depart: present, unusual
    probs = np.array([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6], [0.3, 0.9]])
    m = prototype_metrics(probs, truth, None, labels, matrix)
    assert m["on_prototype_entries"] == 6 and m["off_prototype_entries"] == 2 and m["off_prototype_present"] == 2
    assert m["attr_acc_on_prototype"] == 1.0
    assert m["attr_acc_off_prototype"] == 0.5 and m["off_prototype_detected"] == 0.5  # (1, 1) seen, (3, 0) missed
    assert prototype_metrics(probs, truth, None, labels, None) == {}
    masked = prototype_metrics(probs, truth, np.array([[1, 1], [1, 1], [1, 1], [0, 1]]), labels, matrix)
    assert masked["attr_acc_off_prototype"] == 1.0 and masked["off_prototype_entries"] == 1


def test_an_attribute_that_argues_against_the_class_is_said_as_such():
    # the class is usually diamond (1) and plain (2); this image is seen as a cross (0) with plain pattern
    probs, contrib = [0.9, 0.1, 0.8, 0.7], [-0.4, 0.0, 1.0, -0.1]
    class_row = [0.05, 0.9, 0.9, 0.1]
    groups = {0: "shape", 1: "shape", 2: "pattern", 3: "size"}
    named, contrasts = choose_attributes(probs, contrib, class_row, groups, 3, 0.5, 0)
    assert [(n.index, n.role) for n in named] == [(2, "supports"), (0, "against"), (3, "against")]
    text = explanation_text("x", 0.9, ["plain pattern"], None, None, None, ["cross shape", "large size"])
    assert text == "x (90%): because it has a plain pattern, although it has a cross shape and a large size"
    text = explanation_text("x", 0.9, [], [("diamond shape", "cross shape")], None, None, ["large size"])
    assert text == "x (90%): although it has a cross shape rather than a diamond shape and it also has a large size"
