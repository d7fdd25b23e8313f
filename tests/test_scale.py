import pytest
import torch

from eatdist.config import load_config
from eatdist.errors import BackboneError, ConfigError
from eatdist.models.eat import EATModel
from eatdist.models.registry import create_backbone
from eatdist.train.scale import apply_model_options, scaled_lr


def test_lr_is_per_256_images_of_global_batch():
    cfg = load_config(None, ["optim.lr=0.008", "data.batch_size=32", "train.grad_accum=2"])
    assert scaled_lr(cfg, processes=2) == pytest.approx(0.008 * 128 / 256)
    assert scaled_lr(cfg, processes=8) == pytest.approx(0.008 * 512 / 256)
    cfg = load_config(None, ["optim.lr=0.01", "optim.lr_base_batch=null"])
    assert scaled_lr(cfg, processes=8) == 0.01
    with pytest.raises(ConfigError, match="optim.lr_base_batch"):
        scaled_lr(load_config(None, ["optim.lr_base_batch=0"]), 1)


def test_channels_last_and_gradient_checkpointing_toggles():
    cfg = load_config(None, ["model.channels_last=true", "model.grad_checkpointing=true"])
    model = apply_model_options(EATModel(create_backbone("test_resnet"), 3, 4), cfg)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.backbone.model.grad_checkpointing
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    out = model(x)
    (out.class_logits.sum() + out.attr_logits.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_grad_checkpointing_on_a_backbone_without_it_is_named():
    class Plain(torch.nn.Module):
        num_features = 4

        def forward_features(self, x):
            return x[:, :1].repeat(1, 4, 1, 1)

    cfg = load_config(None, ["model.grad_checkpointing=true", "model.backbone=plain"])
    with pytest.raises(BackboneError, match="backbone 'plain' has no set_grad_checkpointing"):
        apply_model_options(EATModel(Plain(), 2, 2), cfg)
