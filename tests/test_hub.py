"""The Hugging Face Hub without a network: timm's pretrained weights and eatdist packages through a cache folder.

The cache is built the way huggingface_hub lays it out (``hub/models--org--name/refs/main`` naming a
snapshot, ``snapshots/<commit>/<files>``); every process reads it with ``HF_HUB_OFFLINE=1``.
"""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import eatdist
from conftest import TINY_TRAIN, cpu_env, run, write_corpus
from eatdist.cli.main import main
from eatdist.models.package import read_meta

PRETRAINED = "test_resnet.r160_in1k"
REVISION = "5f1e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6"


def place_in_cache(home: Path, repo: str, files: dict[str, Path], revision: str = REVISION) -> Path:
    """Put ``files`` into the Hugging Face cache under ``home`` as snapshot ``revision`` of ``repo`` (its main)."""
    entry = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    return snapshot


def offline(home: Path) -> dict[str, str]:
    return cpu_env(HF_HOME=str(home), HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def hub_weights(tmp_path_factory):
    """A cache holding weights made here for timm/test_resnet.r160_in1k; returns (HF_HOME, the weights)."""
    home = tmp_path_factory.mktemp("hf_home")
    torch.manual_seed(1234)  # not the training seed: equal weights can only come from the cache
    model = timm.create_model(PRETRAINED, pretrained=False)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("made") / "model.safetensors"
    save_file(weights, path)
    place_in_cache(home, f"timm/{PRETRAINED}", {"model.safetensors": path})
    return home, weights


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c"), {"train": [32], "val": [16], "test": [16]})


TRAIN = [*TINY_TRAIN, "train.epochs=1", "train.log_with=[]", "train.log_images=0",
         f"model.backbone={PRETRAINED}", "model.pretrained=true"]  # fmt: skip


def train(corpus, out, home, *extra):
    cmd = [sys.executable, "-m", "eatdist", "train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={out}"]
    return run([*cmd, *extra], env=offline(home), timeout=400)


@pytest.fixture(scope="module")
def pretrained_run(corpus, hub_weights, tmp_path_factory):
    """A run from the cached weights with a zero learning rate: its weights are the ones it started from."""
    home, _ = hub_weights
    out = tmp_path_factory.mktemp("runs") / "pretrained"
    result = train(corpus, out, home, "optim.lr=0", "optim.weight_decay=0")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_training_starts_from_the_cached_pretrained_weights(pretrained_run, hub_weights):
    _, made = hub_weights
    package = load_file(pretrained_run / "model" / "model.safetensors")
    backbone = {k.removeprefix("backbone.model."): v for k, v in package.items() if k.startswith("backbone.model.")}
    parameters = [name for name, _ in timm.create_model(PRETRAINED, num_classes=0).named_parameters()]
    assert parameters and set(parameters) <= set(backbone)
    for name in parameters:  # BatchNorm statistics move in training; parameters do not at lr 0
        assert backbone[name].equal(made[name]), name
    meta = read_meta(pretrained_run / "model")
    assert meta.pretrained == {"source": f"hf-hub:timm/{PRETRAINED}", "revision": REVISION, "file": "model.safetensors"}


def test_pretrained_requests_timm_cannot_serve_are_one_line_errors():
    from eatdist.errors import BackboneError
    from eatdist.models.registry import create_backbone

    with pytest.raises(BackboneError, match="timm model 'nf_resnet26' has no pretrained weights"):
        create_backbone("nf_resnet26", pretrained=True)  # checked before anything is fetched
    with pytest.raises(BackboneError, match="both set"):
        create_backbone(PRETRAINED, pretrained=True, pretrained_path="weights.safetensors")


def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]


def probabilities(model):
    return [p.class_probabilities.tolist() + list(p.attributes.values()) for p in model.predict(images())]


@pytest.fixture(scope="module")
def hub_folder(pretrained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hub"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the CLI's own entry point, in this process
        code = main(["export", "--model", str(pretrained_run / "model"), "--format", "hub", "--out", str(out),
                     "--repo", "acme/eat-tiny"])  # fmt: skip
    assert code == 0 and "hf upload acme/eat-tiny" in printed.getvalue()
    return out


@pytest.mark.slow
def test_hub_export_is_a_package_with_a_card(hub_folder, pretrained_run):
    assert sorted(p.name for p in hub_folder.iterdir()) == [
        "README.md", "attribute_metrics.json", "config.json", "eatdist_model.json", "model.safetensors"
    ]  # fmt: skip
    original = eatdist.load_model(pretrained_run / "model", device="cpu")
    exported = eatdist.load_model(hub_folder, device="cpu")
    assert probabilities(exported) == probabilities(original)
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["backbone"] == PRETRAINED and config["backbone_plugin"]["name"] == "timm"
    assert config["num_attributes"] == len(original.attributes)
    card = (hub_folder / "README.md").read_text()
    final = json.loads((pretrained_run / "final_metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: eatdist\n") and 'load_model("hf-hub:acme/eat-tiny")' in card
    assert f"| test_top1 | {final['test_top1']:.4f} |" in card
    assert f"base_model: timm/{PRETRAINED}" in card
    for row in final["attribute_metrics"]["test"]["attributes"]:  # the attribute table, one row each
        assert f"| {row['name']} | {row['accuracy']:.4f} |" in card


OFFLINE = """
import contextlib, io, json, sys
import numpy as np
from PIL import Image
import eatdist
from eatdist.cli.main import main
from eatdist.errors import ModelPackageError
args = json.loads(sys.argv[1])
rng = np.random.default_rng(3)
images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]
model = eatdist.load_model("hf-hub:acme/eat-tiny", device="cpu")
found = {"probabilities": [p.class_probabilities.tolist() + list(p.attributes.values()) for p in model.predict(images)]}
try:
    eatdist.load_model("hf-hub:acme/absent")
except ModelPackageError as exc:
    found["absent"] = str(exc)
found["export"] = main(["export", "--model", "hf-hub:acme/eat-tiny", "--format", "hub", "--out", args["again"]])
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):  # the cache holds the package, not timm's weights
    found["train"] = main(["train", *args["train"]])
found["train_stderr"] = stderr.getvalue()
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def offline_results(hub_folder, corpus, tmp_path_factory):
    """One offline process reads a cache that holds the exported package as hf-hub:acme/eat-tiny, nothing else."""
    home = tmp_path_factory.mktemp("home")
    place_in_cache(home, "acme/eat-tiny", {p.name: p for p in hub_folder.iterdir()})
    again = tmp_path_factory.mktemp("again")
    args = {"again": str(again), "train": [*TRAIN, f"data.root={corpus.root}", f"train.output_dir={again / 'run'}"]}
    result = run([sys.executable, "-c", OFFLINE, json.dumps(args)], env=offline(home))
    assert result.returncode == 0, result.stderr[-2000:]
    return home, again, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_hub_name_loads_offline_from_the_cache(offline_results, hub_folder, pretrained_run):
    home, again, found = offline_results
    original = eatdist.load_model(pretrained_run / "model", device="cpu")
    np.testing.assert_allclose(found["probabilities"], probabilities(original), rtol=0, atol=1e-6)
    assert "hf-hub:acme/absent" in found["absent"] and str(home / "hub") in found["absent"]
    # the CLI's --model takes the Hub name too: exporting it again gives the same files
    assert found["export"] == 0
    for name in ("model.safetensors", "eatdist_model.json", "attribute_metrics.json", "README.md"):
        assert (again / name).read_bytes() == (hub_folder / name).read_bytes()


@pytest.mark.slow
def test_missing_pretrained_cache_entry_is_one_line(offline_results):
    home, _, found = offline_results
    assert found["train"] == 2
    lines = found["train_stderr"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in found["train_stderr"]
    assert PRETRAINED in lines[0] and str(home / "hub") in lines[0] and "HF_HUB_OFFLINE" in lines[0]
