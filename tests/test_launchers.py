"""One model under every launcher: real processes started as a user starts them, replicas compared,
two simulated nodes reading each sample once and explaining each shard once, torchrun restarting
its workers after a kill and continuing with the nodes that are left. DeepSpeed's launches are in
tests/test_cluster.py."""

import json
import os
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest

from conftest import REPO, cpu_env, free_port, latest_state, run, write_corpus
from eatdist.data.shards import iter_shard

pytestmark = pytest.mark.slow

# 96 training images in batches of 4: 12 steps per epoch on 2 ranks, a checkpoint every 3.
TRAIN = ["model.backbone=test_resnet", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
         "data.shuffle_buffer=20", "train.epochs=1", "train.checkpoint_every=3", "train.log_every=1"]  # fmt: skip
TEST_SAMPLES = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c"), {"train": [64, 32], "val": [12], "test": [12, 8]})


def plain_env(**extra):
    """What a user's shell has: no ACCELERATE_USE_CPU (torchrun and srun never set it)."""
    env = cpu_env(**extra)
    del env["ACCELERATE_USE_CPU"]
    return env


def torchrun(*launcher_args):
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "eatdist"]


def accelerate(config, processes=2):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "eatdist"]  # fmt: skip


def train_args(corpus, out, *extra):
    return ["train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={out}", *extra]


def digests(out, world=2):
    return [json.loads((out / "ranks" / f"rank-{r}.json").read_text())["parameter_sha256"] for r in range(world)]


def start(cmd, env, **kw):
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)  # fmt: skip


def finish(procs, timeout=400):
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]


def two_nodes(make_cmd, env):
    """Start node 0 and node 1 (one process each) on 127.0.0.1, ``make_cmd(rank, port)``, and wait for both."""
    port = free_port()
    finish([start(make_cmd(rank, port), env) for rank in range(2)])


def torchrun_script(**settings):
    """``bash launch/torchrun.sh`` as documented, on a free port; torchrun found next to this Python."""
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    env = plain_env(PATH=path, NPROC_PER_NODE="2", MAIN_PORT=str(free_port()), **settings)
    return ["bash", str(REPO / "launch" / "torchrun.sh")], env


@pytest.fixture(scope="module")
def torchrun_reference(corpus, tmp_path_factory):
    """The tiny run under launch/torchrun.sh, 2 CPU processes, without ACCELERATE_USE_CPU."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    cmd, env = torchrun_script()
    assert run(cmd + train_args(corpus, out), env=env, timeout=400).returncode == 0
    return out


@pytest.fixture(scope="module")
def two_node_run(corpus, tmp_path_factory):
    """The tiny run on two simulated nodes of one process each (launch/ddp_multinode.yaml, a static
    rendezvous on 127.0.0.1), recording the keys each rank reads."""
    out = tmp_path_factory.mktemp("two_nodes") / "run"

    def node(rank, port):
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch" / "ddp_multinode.yaml"), "--num_machines", "2", "--machine_rank", str(rank),
                "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                "-m", "eatdist", *train_args(corpus, out, "train.record_keys=true")]  # fmt: skip

    two_nodes(node, plain_env())
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "two_nodes"])
def test_every_launcher_trains_one_model_and_counts_the_whole_test_split(
    launcher, corpus, torchrun_reference, tmp_path, request
):
    out = tmp_path / "run"
    if launcher == "torchrun":
        out = torchrun_reference
    elif launcher == "accelerate":
        assert run(accelerate("cpu_2proc.yaml") + train_args(corpus, out), env=plain_env()).returncode == 0
    else:
        out = request.getfixturevalue("two_node_run")
    first, second = digests(out)
    assert first == second
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_samples"] == TEST_SAMPLES and final["val_samples"] == 12
    if launcher in ("accelerate", "two_nodes"):
        # the same DDP run whoever launched it: bitwise the same model
        assert first == digests(torchrun_reference)[0]


def test_two_simulated_nodes_read_each_sample_once_and_explain_each_shard_once(corpus, two_node_run, tmp_path):
    out = two_node_run
    reports = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert reports[0]["steps_per_epoch"] == reports[1]["steps_per_epoch"] == [(96 // 2) // 4]
    per_rank = [(out / "ranks" / f"keys-epoch0001-rank{r}.txt").read_text().split() for r in range(2)]
    counts = Counter(per_rank[0] + per_rank[1])
    assert set(counts.values()) == {1}  # no sample read by two ranks, or twice
    assert set(counts) == {s["__key__"] for p in corpus.shard_paths("train") for s in iter_shard(p)}  # 96 = 12 x 2 x 4

    expl = tmp_path / "expl"
    explain = ["explain", "--model", str(out / "model"), "--input", str(corpus.root / "*.tar"), "--output", str(expl)]

    def node(rank, port):
        return torchrun("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr",
                        "127.0.0.1", "--master_port", str(port)) + explain  # fmt: skip

    two_nodes(node, cpu_env())
    inputs = sorted(corpus.root.glob("*.tar"))
    reports = {p.name: json.loads((expl / "_reports" / f"{p.name}.json").read_text()) for p in inputs}
    by_rank = Counter(r["rank"] for r in reports.values())
    # each shard by exactly one process; which process takes which is claimed at run time
    assert set(by_rank) <= {0, 1} and sum(by_rank.values()) == len(inputs)
    counts = Counter(s["__key__"] for p in sorted(expl.glob("*.tar")) for s in iter_shard(p))
    assert set(counts) == {s["__key__"] for p in inputs for s in iter_shard(p)} and set(counts.values()) == {1}


def test_a_rank_that_forks_fails_the_run_in_one_line(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = torchrun("--nproc_per_node", "2", "--master_port", str(free_port())) + train_args(corpus, out)
    result = run(cmd, env=plain_env(EATDIST_TEST_DIVERGE_RANK="1"), timeout=400)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "eatdist: error:" in line]
    expected = "eatdist: error: replicas diverged at step 3: the parameters of rank 1 differ from rank 0's"
    assert len(lines) == 2 and all(expected in line for line in lines), lines
    # the workers print no traceback; the one there is torchrun's own report of the failed workers
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr
    assert not list((out / "checkpoints").glob("step-*"))  # a forked run leaves no checkpoint


def test_srun_without_a_launcher_is_refused_in_one_line(corpus, tmp_path, monkeypatch, capsys):
    from eatdist.cli.main import main

    # what srun sets for the second of 2 tasks started with no launcher in between
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert main(train_args(corpus, tmp_path / "run")) == 2
    assert capsys.readouterr().err == (
        "[rank 1] eatdist: error: srun started 2 tasks of 'eatdist train' with no launcher in between: each would "
        "train a model of its own; start it with torchrun, accelerate launch or launch/slurm.sh "
        "(see docs/launchers.md)\n"
    )
    assert not (tmp_path / "run").exists()


def workers(proc):
    """The eatdist processes under a torchrun process, by rank."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "eatdist" in child.cmdline():
                found[int(child.environ()["RANK"])] = child
        except (psutil.NoSuchProcess, KeyError):
            continue
    return found


def stop(proc):
    """Kill what is left of a torchrun process and its workers (a test that failed half-way)."""
    if proc.poll() is None:
        for child in [*workers(proc).values(), psutil.Process(proc.pid)]:
            child.kill()
    proc.communicate()


def wait_for_checkpoint(out, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((out / "checkpoints").glob("step-*/trainer_state.json")):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.002)
    raise AssertionError("no checkpoint in time")


def test_torchrun_restarts_a_killed_worker_and_ends_bitwise_equal(corpus, torchrun_reference, tmp_path):
    out = tmp_path / "run"
    cmd, env = torchrun_script(MAX_RESTARTS="2")
    proc = start(cmd + train_args(corpus, out), env)
    try:
        wait_for_checkpoint(out, proc)
        workers(proc)[1].kill()
        state = latest_state(out)
        assert state["epoch"] == 0 and 0 < state["epoch_step"] < 12  # killed mid-epoch, after a step checkpoint
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert "restart 1 of the worker group: continuing from the latest checkpoint" in stdout
    assert digests(out) == digests(torchrun_reference)  # bitwise the uninterrupted model
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in line]  # fmt: skip
    assert steps == list(range(1, 13))  # every step logged once across the restart


def test_torchrun_elastic_nodes_finish_without_the_stopped_one(corpus, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    rendezvous = ["--nnodes", "1:2", "--nproc_per_node", "1", "--max_restarts", "2", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "elastic-test"]  # fmt: skip
    args = train_args(corpus, out, "train.record_keys=true")
    # node 0 hosts the rendezvous store, so stopping node 1 leaves it standing; the last call
    # (how long a rendezvous with enough nodes waits for more) lets node 1 join the first one
    conf = "last_call_timeout=10,join_timeout=120,keep_alive_interval=1,keep_alive_max_attempt=3"
    node0 = start(torchrun(*rendezvous, "--rdzv_conf", f"is_host=true,{conf}") + args, plain_env())
    time.sleep(2)
    node1 = start(torchrun(*rendezvous, "--rdzv_conf", f"is_host=false,{conf}") + args, plain_env())
    try:
        wait_for_checkpoint(out, node0)
        # the whole node: its agent and its worker (torchrun starts workers in sessions of their own)
        for proc in [*workers(node1).values(), psutil.Process(node1.pid)]:
            proc.kill()
        node1.communicate()
        state = latest_state(out)
        assert state["phase"]["world"] == 2 and state["epoch"] == 0 and 0 < state["epoch_step"] < 12
        stdout, stderr = node0.communicate(timeout=400)
    finally:
        stop(node0)
        stop(node1)
    assert node0.returncode == 0, stderr[-3000:]
    assert json.loads((out / "ranks" / "rank-0.json").read_text())["world"] == 1
    logs = sorted((out / "ranks").glob("keys-epoch0001*-rank*.txt"))
    keys = [key for path in logs for key in path.read_text().split()]
    counts = Counter(keys)
    all_keys = {s["__key__"] for p in corpus.shard_paths("train") for s in iter_shard(p)}
    assert set(counts) <= all_keys and max(counts.values()) == 1  # no sample of the epoch read twice
    assert len(all_keys) - len(keys) < 4 + 1  # only the last phase's remainder (< one batch) is left out
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_samples"] == TEST_SAMPLES
