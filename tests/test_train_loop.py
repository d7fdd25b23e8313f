"""The step loop: losses accumulated on the device and read only every log_every steps."""

import json
import sys

import pytest

from conftest import run, write_corpus

pytestmark = pytest.mark.slow


def step_losses(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if r["kind"] == "step"]


def test_logged_loss_is_the_exact_mean_of_the_steps_since_the_last_log(tmp_path):
    corpus = write_corpus(tmp_path / "c", {"train": [64, 64], "val": [16]})
    args = ["train", "model.backbone=test_resnet", "data.image_size=32", "data.batch_size=8",
            "data.num_workers=1", f"data.root={corpus.root}", "train.epochs=1", "train.final_test=false"]  # fmt: skip
    every, grouped = tmp_path / "every", tmp_path / "grouped"
    assert (
        run([sys.executable, "-m", "eatdist", *args, f"train.output_dir={every}", "train.log_every=1"]).returncode == 0
    )
    assert (
        run([sys.executable, "-m", "eatdist", *args, f"train.output_dir={grouped}", "train.log_every=4"]).returncode
        == 0
    )
    per_step = step_losses(every)
    assert [s for s, _ in per_step] == list(range(1, 17))
    expected = [(s, sum(loss for _, loss in per_step[s - 4 : s]) / 4) for s in range(4, 17, 4)]
    got = step_losses(grouped)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
