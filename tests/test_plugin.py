"""The example third-party plugin, installed with pip the way a user installs theirs."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env, run, write_corpus
from eatdist.data.shards import iter_shard

pytestmark = pytest.mark.slow


def pip_install(source, target):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    # pip builds in the source folder: build a copy, so the checkout stays clean.
    source = shutil.copytree(REPO / "plugins" / "eatdist-example-backbone", tmp_path_factory.mktemp("src") / "plugin")
    pip_install(source, target)
    return target


BROKEN_PLUGIN = {
    "pyproject.toml": """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "very-broken-backbones"
version = "0.3.0"

[project.entry-points."eatdist.backbones"]
pooled = "broken_backbones:pooled"
tinycnn = "broken_backbones:pooled"

[tool.setuptools]
packages = ["broken_backbones"]
""",
    "broken_backbones/__init__.py": """
import torch


class Pooled(torch.nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward_features(self, x):
        return self.conv(x).mean(dim=(2, 3))  # flat [B, C]: no map to explain


def pooled(**kwargs):
    return Pooled()
""",
}


def test_backbones_check_names_a_broken_installed_plugin_and_the_clash(tmp_path, plugin_path):
    source = tmp_path / "broken"
    for name, text in BROKEN_PLUGIN.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text.lstrip())
    target = tmp_path / "site"
    pip_install(source, target)
    env = cpu_env(PYTHONPATH=f"{target}:{plugin_path}")
    result = run([sys.executable, "-m", "eatdist", "backbones", "--check"], env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "check: backbone plugin 'tinycnn' (package eatdist-example-backbone 0.1.0): ok" in result.stdout
    assert (
        "FAILED: backbone plugin 'pooled' (package very-broken-backbones 0.3.0): violates the backbone contract: "
        "backbone 'pooled': forward_features gave flat features of shape (2, 8)"
    ) in result.stderr
    # both register tinycnn: the same one wins whichever comes first on the path
    assert (
        "CLASH: backbone 'tinycnn' is registered by 2 packages: eatdist-example-backbone 0.1.0 is used, "
        "very-broken-backbones 0.3.0 hidden"
    ) in result.stderr
    swapped = run([sys.executable, "-m", "eatdist", "backbones"], env=cpu_env(PYTHONPATH=f"{plugin_path}:{target}"))
    # without --check a clash is a warning, not a failure
    assert "eatdist-example-backbone 0.1.0 is used" in swapped.stderr and swapped.returncode == 0


def test_installed_plugin_is_listed(plugin_path):
    result = run([sys.executable, "-m", "eatdist", "backbones"], env=cpu_env(PYTHONPATH=str(plugin_path)))
    assert result.returncode == 0
    assert "tinycnn" in result.stdout.split()


def test_train_and_explain_with_the_plugin_backbone(tmp_path, plugin_path, monkeypatch):
    corpus = write_corpus(tmp_path / "data", {"train": [64, 32], "val": [16], "test": [16]})
    env = cpu_env(PYTHONPATH=str(plugin_path))
    out = tmp_path / "run"
    result = run(
        [
            sys.executable,
            "-m",
            "eatdist",
            "train",
            "model.backbone=tinycnn",
            "model.backbone_args={width: 8}",
            f"data.root={corpus.root}",
            f"train.output_dir={out}",
            "data.image_size=32",
            "data.batch_size=16",
            "data.num_workers=0",
            "train.epochs=1",
        ],
        env=env,
    )
    assert result.returncode == 0
    meta = json.loads((out / "model" / "eatdist_model.json").read_text())
    assert meta["backbone"] == "tinycnn" and meta["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    result = run(
        [
            sys.executable,
            "-m",
            "eatdist",
            "explain",
            "--model",
            str(out / "model"),
            "--input",
            str(corpus.root / "test-*.tar"),
            "--output",
            str(tmp_path / "expl"),
        ],
        env=env,
    )
    assert result.returncode == 0
    sample = next(iter_shard(tmp_path / "expl" / "test-000000.tar"))
    assert json.loads(sample["json"])["model_id"].startswith("tiny-tinycnn-")
    # TinyCNN has stride 8: a 32 px input gives 4 x 4 maps, one for the class and each named attribute
    named = len(json.loads(sample["json"])["top_attributes"])
    assert f"({1 + named}, 4, 4)".encode() in sample["heatmaps.npy"][:128]
    # A Hub folder of the package names the plugin a loader must install, here where it is installed.
    from eatdist.models.export import export_package
    from eatdist.models.registry import reset_registry

    monkeypatch.syspath_prepend(str(plugin_path))
    reset_registry()
    try:
        hub = export_package(out / "model", "hub", tmp_path / "hub", repo="acme/tiny")
    finally:
        reset_registry()
    config = json.loads((hub / "config.json").read_text())
    plugin = {"name": "tinycnn", "package": "eatdist-example-backbone 0.1.0", "builtin": False}
    assert config["backbone_plugin"] == plugin
    assert "`pip install eatdist-example-backbone`" in (hub / "README.md").read_text()
