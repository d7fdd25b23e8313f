"""Step checkpoints, preemption and elastic resume, with real processes and real signals."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, accelerate_launch, cpu_env, latest_state, run, write_corpus
from eatdist.data.shards import iter_shard

pytestmark = pytest.mark.slow

TRAIN = ["model.backbone=test_resnet", "data.image_size=32", "data.batch_size=8", "data.num_workers=2",
         "data.shuffle_buffer=20", "train.log_every=1", "optim.warmup_epochs=0.5",
         "train.final_test=false"]  # fmt: skip
EVERY = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c"), {"train": [96, 64, 32], "val": [16]})


def train_args(corpus, out, *extra):
    return ["train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={out}", *extra]


def command(corpus, out, processes, *extra):
    args = train_args(corpus, out, *extra)
    if processes == 1:
        return [sys.executable, "-m", "eatdist", *args]
    return accelerate_launch(args, processes)


def digest(out):
    return json.loads((out / "ranks" / "rank-0.json").read_text())["parameter_sha256"]


def logged_steps(out):
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    return [json.loads(line)["step"] for line in lines if '"kind": "step"' in line]


def start(cmd):
    return subprocess.Popen(cmd, env=cpu_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def process_tree(proc):
    import psutil

    try:
        return [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [proc.pid]


def kill_group(proc, tree=None):
    """SIGKILL the run and every process under it (the launcher starts ranks in sessions of their own).

    ``tree``, listed beforehand, is killed first: no time lost listing it when the moment matters.
    """
    import psutil

    killed = []
    for pids in (tree or [], process_tree(proc)):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    proc.wait()
    psutil.wait_procs([p for p in psutil.process_iter() if p.pid in killed and p.pid != proc.pid], timeout=30)


def partials(out):
    folder = out / "checkpoints"
    return [p for p in folder.iterdir() if p.name.endswith(".partial")] if folder.is_dir() else []


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("timed out")


def wait_for_write(out, proc, stale, timeout=240):
    """Wait until a checkpoint is being written (a new ``.partial``); return the processes to kill,
    listed ahead so the kill is instant, or None when the run ended first."""
    tree, listed = [proc.pid], 0.0
    deadline = time.time() + timeout
    while time.time() < deadline:
        if set(partials(out)) - stale:
            return tree
        if proc.poll() is not None:
            return None
        if time.time() - listed > 0.2:  # ranks and loader workers start late: keep the list fresh
            tree, listed = process_tree(proc), time.time()
        time.sleep(0.001)
    raise AssertionError("timed out")


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_at_random_steps_resumes_to_bitwise_equal_weights(tmp_path, corpus, processes):
    extra = ["train.epochs=2", f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=2"]
    reference = tmp_path / "reference"
    assert run(command(corpus, reference, processes, *extra), timeout=400).returncode == 0
    out = tmp_path / "killed"
    rng = random.Random(processes)
    kills, during_write, attempts = 0, 0, 0
    resume = []
    # two kills: one while a checkpoint is written, then one at a random step of the resumed run
    while (kills < 2 or not during_write) and attempts < 8:
        attempts += 1
        proc = start(command(corpus, out, processes, *extra, *resume))
        resume = ["--resume"]
        if not during_write:
            # a kill that lands while a checkpoint is being written (retried until one does)
            stale = set(partials(out))  # left by an earlier kill; the next save removes it
            tree = wait_for_write(out, proc, stale)
            landed = tree is not None
        else:
            target = len(logged_steps(out)) + rng.randint(1, 10)
            landed, tree = wait_for(lambda target=target: len(logged_steps(out)) >= target, proc), None
        if not landed:  # the run finished before the kill: nothing left to interrupt
            break
        kill_group(proc, tree)
        kills += 1
        if not during_write:
            during_write += bool(set(partials(out)) - stale)
        steps = logged_steps(out)
        saved = latest_state(out)["global_step"] if list((out / "checkpoints").glob("step-*")) else 0
        assert max(steps) - saved <= EVERY  # work lost per kill: at most checkpoint_every steps
    assert kills >= 2 and during_write >= 1
    result = run(command(corpus, out, processes, *extra, "--resume"), timeout=400)
    assert result.returncode == 0
    assert not partials(out)  # the interrupted write was cleaned up
    assert digest(out) == digest(reference)
    # metrics continue without duplicated or missing steps
    assert logged_steps(out) == logged_steps(reference)
    final, expected = (json.loads((d / "final_metrics.json").read_text()) for d in (out, reference))
    assert final["train_loss"] == expected["train_loss"] and final["train_skipped_total"] == 0
    for r in range(processes):
        report = json.loads((out / "ranks" / f"rank-{r}.json").read_text())
        assert report["steps_per_epoch"] == [(192 // processes) // 8] * 2


def test_sigterm_saves_at_a_step_boundary_and_resume_continues(tmp_path, corpus, capsys):
    from eatdist.cli.main import main

    out = tmp_path / "run"
    cmd = command(corpus, out, 1, "train.epochs=2")
    proc = start(cmd)
    wait_for(lambda: len(logged_steps(out)) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "received SIGTERM: stopping at the next step boundary" in err
    state = latest_state(out)
    assert state["epoch"] == 0 and 5 <= state["epoch_step"] < 24 and state["global_step"] == state["epoch_step"]
    # the same command without --resume (the CLI's entry point in this process) is refused
    capsys.readouterr()
    assert main(train_args(corpus, out, "train.epochs=2")) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--resume" in err
    result = run([*cmd, "train.explain_split=val", "--resume"], timeout=300)
    assert result.returncode == 0
    assert f"resumed at epoch 1, step {state['global_step']}" in result.stdout
    steps = logged_steps(out)
    assert steps == list(range(1, 49))  # every step once, across the preemption
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in lines if e["kind"] == "epoch"] == [1, 2]  # each epoch ends once
    assert latest_state(out)["global_step"] == 48
    explained = [s["__key__"] for s in iter_shard(out / "explanations" / "val-000000.tar")]
    assert explained == [s["__key__"] for s in iter_shard(corpus.root / "val-000000.tar")]


def epoch_keys(out):
    """Every key trained on in epoch 1, from all phases and ranks."""
    return [
        key for path in sorted((out / "ranks").glob("keys-epoch0001*-rank*.txt")) for key in path.read_text().split()
    ]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_reads_no_sample_twice(tmp_path, corpus, before, after):
    out = tmp_path / "run"
    extra = ["train.epochs=1", "train.checkpoint_every=3", "train.record_keys=true", "data.batch_size=4"]
    proc = start(command(corpus, out, before, *extra))
    wait_for(lambda: len(logged_steps(out)) >= 7, proc)
    kill_group(proc)
    state = latest_state(out)
    assert 0 < state["epoch_step"] and state["phase"]["world"] == before
    result = run(command(corpus, out, after, *extra, "--resume"), timeout=400)
    assert result.returncode == 0
    keys = epoch_keys(out)
    counts = Counter(keys)
    assert max(counts.values()) == 1  # no sample of the epoch read twice
    all_keys = {s["__key__"] for p in corpus.shard_paths("train") for s in iter_shard(p)}
    assert set(counts) <= all_keys
    # left out: only the new phase's remainder (< one batch per rank + M % world per rank)
    assert len(all_keys) - len(keys) < after * 4 + after
    assert Path(out / "model" / "model.safetensors").is_file()


def test_low_disk_prunes_old_checkpoints_first_and_full_disk_is_one_line(tmp_path, corpus, mount):
    # 12 MiB holds two checkpoints of this model (4.4 MiB each) but not three: the oldest goes first
    out = mount(12) / "run"
    extra = ["train.epochs=1", "train.checkpoint_every=2", "train.keep_checkpoints=2", "data.num_workers=0"]
    result = run(command(corpus, out, 1, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "low disk space: removing checkpoint" in result.stderr
    assert len(list((out / "checkpoints").glob("step-*"))) == 2 and (out / "model" / "model.safetensors").is_file()
    # 4 MiB cannot hold a single checkpoint: one line naming the folder, nothing partial left
    out = mount(4) / "run"
    result = run(command(corpus, out, 1, *extra))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "eatdist: error:" in line]
    assert errors == [f"eatdist: error: disk full at {out / 'checkpoints'}: a checkpoint needs about 5 MiB, 4 MiB free"]
    assert "Traceback" not in result.stderr and not partials(out)
