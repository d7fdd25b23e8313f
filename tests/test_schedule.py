"""Optimizers and schedules come from timm and follow the config."""

import pytest
import torch

from eatdist.config import OptimConfig
from eatdist.errors import ConfigError
from eatdist.train.schedule import build_optimizer, build_scheduler, current_lr


def rates(cfg, updates_per_epoch=10, epochs=3, lr=0.1):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer(model, cfg, lr)
    sched = build_scheduler(opt, cfg, updates_per_epoch, epochs)
    seen = [current_lr(opt)]
    for n in range(1, updates_per_epoch * epochs):
        sched.step_update(n)
        seen.append(current_lr(opt))
    return opt, seen


def test_default_is_adamw_with_warmup_then_cosine_to_the_floor():
    opt, seen = rates(OptimConfig(warmup_epochs=1.0, min_lr_ratio=0.01))
    assert type(opt).__name__ == "AdamW"
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.05]  # biases and norm weights get none
    assert seen[0] == pytest.approx(0.01) and seen[10] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(seen[:10], seen[1:11], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(seen[10:], seen[11:], strict=False))  # cosine falls
    assert 0.001 < seen[-1] < 0.002  # one update before the end of the cosine, at 0.01 x lr


@pytest.mark.parametrize("name,cls,momentum", [("sgd", "SGD", 0.8), ("momentum", "SGD", 0.9), ("lamb", "Lamb", None)])
def test_timm_optimizers(name, cls, momentum):
    opt, _ = rates(OptimConfig(name=name, momentum=momentum or 0.9))
    assert type(opt).__name__ == cls
    if momentum:
        assert opt.param_groups[0]["momentum"] == momentum


def test_step_and_constant_schedules():
    _, step = rates(OptimConfig(sched="step", decay_epochs=1.0, decay_rate=0.5, warmup_epochs=0.5))
    assert step[5] == pytest.approx(0.1) and step[15] == pytest.approx(0.05) and step[25] == pytest.approx(0.025)
    _, constant = rates(OptimConfig(sched="constant", warmup_epochs=0.5))
    assert constant[:5] == sorted(constant[:5]) and constant[5:] == pytest.approx([0.1] * 25)


def test_unknown_optimizer_names_the_key():
    with pytest.raises(ConfigError, match="optim.name.*adamw"):
        rates(OptimConfig(name="adamww"))
