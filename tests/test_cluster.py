"""Cluster scale on one machine: DeepSpeed ZeRO through accelerate launch, simulated nodes."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO, cpu_env, free_port, latest_state, run, write_corpus
from eatdist.data.shards import iter_shard
from eatdist.models.package import load_package
from eatdist.train.trainer import parameter_digest

pytestmark = pytest.mark.slow

TRAIN = ["model.backbone=test_resnet", "data.image_size=32", "data.batch_size=8", "data.num_workers=1",
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


def check_package_and_explain(out, corpus, no_deepspeed, tmp_path):
    reports = rank_reports(out)
    assert reports[0]["parameter_sha256"] == reports[1]["parameter_sha256"]
    model, _ = load_package(out / "model")
    assert parameter_digest(model) == reports[0]["parameter_sha256"]  # the package is the gathered model
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
    check_package_and_explain(out, corpus, no_deepspeed, tmp_path)


def test_zero3_gathers_the_whole_model_into_the_package(tmp_path, corpus, no_deepspeed):
    out = tmp_path / "run"
    args = ["train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={out}", "train.epochs=1"]
    assert run(accelerate("zero3.yaml", args), env=ds_env(), timeout=400).returncode == 0
    assert [r["zero_stage"] for r in rank_reports(out)] == [3, 3]
    # val has 24 samples over 2 ranks; under ZeRO-3 evaluation runs in lockstep and counts each once
    assert epochs_of(out)[0]["val_samples"] == 24
    check_package_and_explain(out, corpus, no_deepspeed, tmp_path)


def two_nodes(make_cmd, env):
    """Start node 0 and node 1 (one process each) on 127.0.0.1 and wait for both."""
    port = free_port()
    procs = [subprocess.Popen(make_cmd(rank, port), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def test_two_simulated_nodes_train_and_explain(tmp_path, corpus):
    out = tmp_path / "run"
    args = ["train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={out}", "train.epochs=3",
            "train.record_keys=true", "optim.warmup_epochs=0.5"]  # fmt: skip

    def train_cmd(rank, port):
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch" / "ddp_multinode.yaml"), "--num_machines", "2", "--machine_rank", str(rank),
                "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                "-m", "eatdist", *args]  # fmt: skip

    two_nodes(train_cmd, cpu_env())
    reports = rank_reports(out)
    assert reports[0]["parameter_sha256"] == reports[1]["parameter_sha256"]
    assert reports[0]["steps_per_epoch"] == reports[1]["steps_per_epoch"] == [(192 // 2) // 8] * 3
    all_keys = {s["__key__"] for p in corpus.shard_paths("train") for s in iter_shard(p)}
    for epoch in (1, 2, 3):
        per_rank = [(out / "ranks" / f"keys-epoch{epoch:04d}-rank{r}.txt").read_text().split() for r in range(2)]
        counts = Counter(per_rank[0] + per_rank[1])
        assert set(counts.values()) == {1}  # no sample read by two ranks, or twice
        assert len(all_keys - set(counts)) < 2 * 8 + 2  # only the equal-steps remainder is left out
    losses = [e["train_loss"] for e in epochs_of(out)]
    assert losses[-1] < losses[0]

    expl = tmp_path / "expl"

    def explain_cmd(rank, port):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                "-m", "eatdist", "explain", "--model", str(out / "model"), "--input", str(corpus.root / "*.tar"),
                "--output", str(expl)]  # fmt: skip

    two_nodes(explain_cmd, cpu_env())
    inputs = sorted(corpus.root.glob("*.tar"))
    reports = {p.name: json.loads((expl / "_reports" / f"{p.name}.json").read_text()) for p in inputs}
    by_rank = Counter(r["rank"] for r in reports.values())
    # each shard by exactly one process; which process takes which is claimed at run time
    assert set(by_rank) <= {0, 1} and sum(by_rank.values()) == len(inputs)
    counts = Counter(s["__key__"] for p in sorted(expl.glob("*.tar")) for s in iter_shard(p))
    assert set(counts) == {s["__key__"] for p in inputs for s in iter_shard(p)} and set(counts.values()) == {1}
