"""Real multi-process runs, started the way a user starts them (accelerate launch, torchrun)."""

import json
import sys
from collections import Counter

import pytest

from conftest import TINY_TRAIN, accelerate_launch, free_port, latest_state, run, write_corpus
from eatdist.data.shards import iter_shard
from eatdist.models.package import load_package

pytestmark = pytest.mark.slow

TRAIN = TINY_TRAIN


def test_two_process_training_on_uneven_shards(tmp_path):
    # 5 shards of different sizes, 2 ranks x 2 workers: fewer samples than a naive split expects.
    # Two corrupt training samples and one corrupt val sample must not unbalance the ranks.
    corrupt = {"train_0000005": "image", "train_0000100": "json", "val_0000003": "attrs"}
    corpus = write_corpus(
        tmp_path / "data", {"train": [53, 7, 91, 30, 12], "val": [17, 9], "test": [21]}, corrupt=corrupt
    )
    out = tmp_path / "run"
    result = run(
        accelerate_launch(["train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={out}", "train.epochs=2"]),
        timeout=400,
    )
    assert result.returncode == 0
    reports = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    expected = (193 // 2) // 8
    assert reports[0]["steps_per_epoch"] == reports[1]["steps_per_epoch"] == [expected, expected]
    assert reports[0]["parameter_sha256"] == reports[1]["parameter_sha256"]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    # each good val sample counted once across ranks, the corrupt one skipped and counted
    assert all(e["val_samples"] == 25 and e["val_skipped"] == 1 for e in epochs)
    # each epoch meets both corrupt samples unless the equal-steps rule left one unread
    assert 3 <= sum(e["train_skipped"] for e in epochs) <= 4
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["test_samples"] == 21
    model, meta = load_package(out / "model")
    assert meta.classes == corpus.classes and (out / "config.yaml").is_file()
    assert (out / "tensorboard").is_dir() and latest_state(out)["epoch"] == 2

    # explanation with 2 processes under torchrun: whole shards per rank, every key exactly once
    explained = tmp_path / "explained"

    def torchrun_explain(pattern, output):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "eatdist", "explain", "--model", str(out / "model"), "--input",
                str(corpus.root / pattern), "--output", str(output)]  # fmt: skip

    cmd = torchrun_explain("train-*.tar", explained)
    result = run(cmd, timeout=300)
    assert result.returncode == 0
    counts = Counter(s["__key__"] for p in sorted(explained.glob("*.tar")) for s in iter_shard(p))
    inputs = [s["__key__"] for p in sorted(corpus.root.glob("train-*.tar")) for s in iter_shard(p)]
    # the undecodable image is listed, not explained; the one with a broken json is explained
    assert set(counts) == set(inputs) - {"train_0000005"} and set(counts.values()) == {1}
    assert "explained 192 images from 5 shards" in result.stdout and "; 1 undecodable" in result.stdout

    # one input shard, two ranks: the rank without a shard exits cleanly
    result = run(torchrun_explain("test-*.tar", tmp_path / "one"))
    assert result.returncode == 0
    assert "explained 21 images from 1 shards" in result.stdout
