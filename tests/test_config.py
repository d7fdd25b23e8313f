import pytest

from eatdist.config import load_config, save_config
from eatdist.errors import ConfigError


def test_defaults_yaml_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  backbone: test_vit\n")
    cfg = load_config(path, ["train.epochs=5", "optim.lr=1e-4", "model.backbone_args={img_size: 32}"])
    assert cfg.train.epochs == 5
    assert cfg.model.backbone == "test_vit"
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.backbone_args == {"img_size": 32}


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*train.epochs"):
        load_config(None, ["train.epoch=3"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match="data.batchsize"):
        load_config(path)


@pytest.mark.parametrize(
    "override",
    [
        "train.epochs=abc",
        "train.epochs=1.5",
        "data.augment_typo=1",
        "train.mixed_precision=fp8",
        "loss.attr_weight=[1]",
    ],
)
def test_wrong_type_or_choice_is_an_error(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_int_widens_to_float_and_none_allowed():
    cfg = load_config(None, ["optim.lr=1", "optim.clip_grad=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.clip_grad is None


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "model.backbone=test_vit"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_shipped_configs_load():
    from conftest import REPO

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
