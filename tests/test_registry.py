import contextlib
import io

import pytest
import torch

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


def backbones_command(*args):
    """``eatdist backbones ARGS`` through the CLI's entry point in this process, which sees the fake
    plugins on its path (tests/test_plugin.py runs it as a process over pip-installed plugins)."""
    from eatdist.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["backbones", *args])
    return code, out.getvalue(), err.getvalue()


def test_backbones_command_lists_and_reports_failures(fake_plugins):
    code, stdout, stderr = backbones_command()
    assert "goodnet" in stdout and "timm" in stdout
    assert "FAILED: backbone plugin 'broken' (package fake-plugins 1.2)" in stderr
    assert code == 1


def _dist_info(site, package, version, entries):
    info = site / f"{package.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[eatdist.backbones]\n{lines}")


CONTRACT_BREAKERS = (
    "import torch\n"
    "class Flat(torch.nn.Module):\n"
    "    num_features = 4\n"
    "    def __init__(self):\n"
    "        super().__init__(); self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)\n"
    "    def forward_features(self, x):\n"
    "        return self.conv(x).mean((2, 3))\n"
    "class Narrow(Flat):\n"
    "    num_features = 16\n"
    "    def forward_features(self, x):\n"
    "        return self.conv(x)\n"
    "def flat(**kw):\n"
    "    return Flat()\n"
    "def narrow(**kw):\n"
    "    return Narrow()\n"
    "def shadow(**kw):\n"
    "    return Narrow()\n"
)


@pytest.fixture
def checked_plugins(fake_plugins):
    """Besides fake_plugins: a package with contract breakers, two packages registering one name."""
    (fake_plugins / "breakers.py").write_text(CONTRACT_BREAKERS)
    _dist_info(fake_plugins, "zz-breakers", "0.1", {"flatnet": "breakers:flat", "narrownet": "breakers:narrow",
                                                      "goodnet": "breakers:shadow"})  # fmt: skip
    _dist_info(fake_plugins, "aa-shadow", "3.0", {"timm": "breakers:shadow"})
    registry.reset_registry()
    return fake_plugins


def test_flat_features_error_names_the_backbone(checked_plugins):
    from eatdist.models.package import build_model

    model = build_model("flatnet", {}, 3, 2)
    with pytest.raises(BackboneError, match=r"backbone 'flatnet': forward_features gave flat features of shape \(1, 4"):
        model(torch.randn(1, 3, 32, 32))


def test_name_clashes_are_reported_and_resolved_the_same_way_every_time(checked_plugins):
    clashes = {c.name: c for c in registry.name_clashes()}
    # eatdist's own entry point wins over any other package; else the name sorting first
    assert clashes["timm"].used.startswith("eatdist ") and clashes["timm"].hidden == ("aa-shadow 3.0",)
    assert clashes["goodnet"].used == "fake-plugins 1.2" and clashes["goodnet"].hidden == ("zz-breakers 0.1",)
    assert registry.create_backbone("goodnet").num_features == 4  # fake-plugins' goodnet, not the shadow's 16
    assert registry.create_backbone("test_resnet").num_features > 4


def test_check_plugins_builds_each_and_names_violations(checked_plugins):
    results = {r.name: r for r in registry.check_plugins()}
    assert results["goodnet"].ok and results["timm"].ok and "timm/test_resnet" in results["timm"].detail
    assert not results["flatnet"].ok and "package zz-breakers 0.1" in str(results["flatnet"])
    assert "backbone 'flatnet': forward_features gave flat features" in results["flatnet"].detail
    assert "gave shape (2, 4, 16, 16)" in results["narrownet"].detail and "[B, 16, H, W]" in results["narrownet"].detail
    assert "needs a positive int attribute 'num_features'" in results["nofeatures"].detail
    assert "broken" not in results  # failed to load: a load failure, reported as such


def test_backbones_check_command(checked_plugins):
    code, stdout, stderr = backbones_command("--check")
    assert code == 1 and "Traceback" not in stderr
    failed = "FAILED: backbone plugin 'flatnet' (package zz-breakers 0.1): violates the backbone contract: "
    assert failed in stderr
    assert any(line.startswith("CLASH: backbone 'goodnet' is registered by 2 packages: fake-plugins 1.2 is used")
               for line in stderr.splitlines())  # fmt: skip
    assert "check: backbone plugin 'goodnet' (package fake-plugins 1.2): ok" in stdout
