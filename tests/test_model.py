import pytest
import torch

from eatdist.errors import BackboneError
from eatdist.models.eat import EATModel, eat_loss, linear_weight, tokens_to_grid
from eatdist.models.registry import create_backbone


def test_forward_shapes_cnn_and_vit():
    for name, kwargs, grid in [("test_resnet", {"output_stride": 16}, 2), ("test_vit", {"img_size": 32}, 2)]:
        model = EATModel(create_backbone(name, **kwargs), num_classes=5, num_attributes=7)
        out = model(torch.randn(2, 3, 32, 32))
        assert out.class_logits.shape == (2, 5) and out.attr_logits.shape == (2, 7)
        assert out.features.shape == (2, model.num_features, grid, grid)


def test_attribute_loss_respects_mask_and_weight():
    model = EATModel(create_backbone("test_resnet"), 3, 4)
    out = model(torch.randn(2, 3, 32, 32))
    labels = torch.tensor([0, 2])
    attrs = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]])
    full, parts = eat_loss(out, labels, attrs, torch.ones(2, 4), 0.5)
    assert full.item() == pytest.approx((parts["ce"] + 0.5 * parts["attr"]).item(), rel=1e-6)
    baseline, _ = eat_loss(out, labels, attrs, torch.ones(2, 4), 0.0)
    assert baseline.item() == pytest.approx(parts["ce"].item(), rel=1e-6)
    # a masked-out entry has no effect, whatever its label
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    flipped = attrs.clone()
    flipped[0, 3] = 1.0
    a, _ = eat_loss(out, labels, attrs, mask, 1.0)
    b, _ = eat_loss(out, labels, flipped, mask, 1.0)
    assert a.item() == pytest.approx(b.item())
    mse, _ = eat_loss(out, labels, attrs, mask, 1.0, "mse")
    assert mse.item() != pytest.approx(a.item())


def test_baseline_still_gives_attribute_head_a_gradient_path():
    model = EATModel(create_backbone("test_resnet"), 3, 4)
    out = model(torch.randn(2, 3, 32, 32))
    loss, _ = eat_loss(out, torch.tensor([0, 1]), torch.zeros(2, 4), torch.ones(2, 4), 0.0)
    loss.backward()
    weight = linear_weight(model.attr_head)
    assert weight.grad is not None  # DDP needs every parameter in the graph
    assert weight.grad.abs().sum() == 0


def test_tokens_must_form_a_grid():
    with pytest.raises(BackboneError, match="not a square grid"):
        tokens_to_grid(torch.randn(1, 1 + 6, 8), 1, None)
    assert tokens_to_grid(torch.randn(1, 1 + 6, 8), 1, (2, 3)).shape == (1, 8, 2, 3)


def test_weights_of_a_model_trained_with_dropout_load_into_the_inference_model():
    trained = EATModel(create_backbone("test_resnet"), 3, 4, dropout=0.3)
    EATModel(create_backbone("test_resnet"), 3, 4).load_state_dict(trained.state_dict())
