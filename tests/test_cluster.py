"""Cluster scale on one machine: DeepSpeed ZeRO through accelerate launch (simulated nodes: tests/test_launchers.py)."""

import json
import sys

import pytest

from conftest import REPO, cpu_env, free_port, latest_state, run, write_corpus
from eatdist.models.package import load_package
from eatdist.train.trainer import parameter_digest

pytestmark = pytest.mark.slow

TRAIN = ["model.backbone=test_resnet", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
         "data.shuffle_buffer=20"]  # fmt: skip


def ds_env(**extra):
    # DeepSpeed JIT-builds small C++ ops once; keep them in the project, not in ~/.cache. Without
    # CUDA it runs on the CPU by itself; ACCELERATE_USE_CPU would turn DeepSpeed off.
    env = cpu_env(TORCH_EXTENSIONS_DIR=str(REPO / ".torch_extensions"), **extra)
    del env["ACCELERATE_USE_CPU"]
    return env


def accelerate(config, args, processes=2, extra=()):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), *extra,
            "-m", "eatdist", *args]  # fmt: skip


def rank_reports(out, world=2):
    return [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(world)]


def epochs_of(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e["kind"] == "epoch"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c"), {"train": [96, 64, 32], "val": [24], "test": [16, 16]})


@pytest.fixture(scope="module")
def no_deepspeed(tmp_path_factory):
    """A PYTHONPATH entry that makes `import deepspeed` fail."""
    path = tmp_path_factory.mktemp("block")
    (path / "deepspeed").mkdir()
    (path / "deepspeed" / "__init__.py").write_text("raise ImportError('deepspeed is not installed here')\n")
    return path


def check_package(out):
    reports = rank_reports(out)
    assert reports[0]["parameter_sha256"] == reports[1]["parameter_sha256"]
    model, _ = load_package(out / "model")
    assert parameter_digest(model) == reports[0]["parameter_sha256"]  # the package is the gathered model


def check_explains_without_deepspeed(out, corpus, no_deepspeed, tmp_path):
    result = run([sys.executable, "-m", "eatdist", "explain", "--model", str(out / "model"), "--input",
                  str(corpus.root / "test-*.tar"), "--output", str(tmp_path / "expl")],
                 env=cpu_env(PYTHONPATH=str(no_deepspeed)))  # fmt: skip
    assert result.returncode == 0
    assert "explained 32 images" in result.stdout


def test_zero2_trains_equal_ranks_and_resumes(tmp_path, corpus, no_deepspeed):
    out = tmp_path / "run"
    args = ["train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={out}"]
    assert run(accelerate("zero2.yaml", [*args, "train.epochs=1"]), env=ds_env(), timeout=400).returncode == 0
    assert [r["zero_stage"] for r in rank_reports(out)] == [2, 2]
    first = latest_state(out)
    result = run(accelerate("zero2.yaml", [*args, "train.epochs=2", "--resume"]), env=ds_env(), timeout=400)
    assert result.returncode == 0
    assert [e["epoch"] for e in epochs_of(out)] == [1, 2]  # resumed: epoch 1 not repeated
    second = latest_state(out)
    assert second["global_step"] == 2 * first["global_step"]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_samples"] == 32 and final["val_samples"] == 24  # each sample counted once across ranks
    check_package(out)
    check_explains_without_deepspeed(out, corpus, no_deepspeed, tmp_path)


def test_zero3_gathers_the_whole_model_into_the_package(tmp_path, corpus):
    out = tmp_path / "run"
    args = ["train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={out}", "train.epochs=1"]
    assert run(accelerate("zero3.yaml", args), env=ds_env(), timeout=400).returncode == 0
    assert [r["zero_stage"] for r in rank_reports(out)] == [3, 3]
    # val has 24 samples over 2 ranks; under ZeRO-3 evaluation runs in lockstep and counts each once
    assert epochs_of(out)[0]["val_samples"] == 24
    # the package holds whole tensors, like ZeRO-2's, which explain without DeepSpeed (above)
    check_package(out)
