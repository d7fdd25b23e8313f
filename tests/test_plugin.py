"""The example third-party plugin, installed with pip the way a user installs theirs."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env, run, write_corpus
from eatdist.data.shards import iter_shard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    # pip builds in the source folder: build a copy, so the checkout stays clean.
    source = shutil.copytree(REPO / "plugins" / "eatdist-example-backbone", tmp_path_factory.mktemp("src") / "plugin")
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
    return target


def test_installed_plugin_is_listed(plugin_path):
    result = run([sys.executable, "-m", "eatdist", "backbones"], env=cpu_env(PYTHONPATH=str(plugin_path)))
    assert result.returncode == 0
    assert "tinycnn" in result.stdout.split()


def test_train_and_explain_with_the_plugin_backbone(tmp_path, plugin_path):
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
    # TinyCNN has stride 8: a 32 px input gives 4 x 4 maps
    assert b"(4, 4, 4)" in sample["heatmaps.npy"][:128]
