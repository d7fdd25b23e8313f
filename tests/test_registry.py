import subprocess
import sys

import pytest
import torch

from conftest import REPO, cpu_env
from eatdist.errors import BackboneError
from eatdist.models import registry


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Install (on sys.path) one broken plugin, one contract-breaking plugin and one good one."""
    (tmp_path / "goodplug.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    num_features = 4\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)\n"
        "    def forward_features(self, x):\n"
        "        return self.conv(x)\n"
        "def make(**kw):\n"
        "    return Net()\n"
        "def no_features(**kw):\n"
        "    return torch.nn.Linear(2, 2)\n"
    )
    dist = tmp_path / "fake_plugins-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text(
        "[eatdist.backbones]\n"
        "broken = module_that_does_not_exist_xyz:factory\n"
        "goodnet = goodplug:make\n"
        "nofeatures = goodplug:no_features\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reset_registry()
    yield tmp_path
    registry.reset_registry()


def test_timm_models_are_served_by_the_builtin_plugin():
    assert "timm" in registry.list_backbones()
    assert registry.is_backbone("resnet50") and registry.is_backbone("timm/resnet50")
    cnn = registry.create_backbone("test_resnet")
    assert cnn.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, cnn.num_features, 2, 2)
    vit = registry.create_backbone("timm/test_vit", img_size=32)
    tokens = vit.forward_features(torch.randn(1, 3, 32, 32))
    assert tokens.ndim == 3 and vit.num_prefix_tokens == 1 and vit.grid_size == (2, 2)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet5O'.*did you mean:.*resnet50"):
        registry.create_backbone("resnet5O")


def test_broken_plugin_reported_by_name_and_package_others_work(fake_plugins):
    names = registry.list_backbones(load=True)
    assert "goodnet" in names and "timm" in names and "broken" not in names
    failures = {f.name: f for f in registry.load_failures()}
    assert "fake-plugins 1.2" in str(failures["broken"]) and "ModuleNotFoundError" in str(failures["broken"])
    with pytest.raises(BackboneError, match=r"'broken' \(package fake-plugins 1.2\)"):
        registry.create_backbone("broken")
    assert registry.create_backbone("goodnet").num_features == 4
    assert registry.create_backbone("test_resnet").num_features > 0


def test_contract_breaking_plugin_is_named(fake_plugins):
    with pytest.raises(BackboneError, match="backbone 'nofeatures': needs a positive int attribute 'num_features'"):
        registry.create_backbone("nofeatures")


def test_backbones_command_lists_and_reports_failures(fake_plugins):
    env = cpu_env(PYTHONPATH=str(fake_plugins))
    result = subprocess.run(
        [sys.executable, "-m", "eatdist", "backbones"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert "goodnet" in result.stdout and "timm" in result.stdout
    assert "FAILED: backbone plugin 'broken' (package fake-plugins 1.2)" in result.stderr
    assert result.returncode == 1
