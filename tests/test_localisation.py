"""The localisation loss: attribute boxes travel with their image through augmentation, the loss
measures how much of each attribute map lies outside its box, and training adds it."""

import json
import math
import sys

import pytest
import torch

from conftest import cpu_env, run, write_corpus
from eatdist.config import load_config
from eatdist.data.pipeline import Preprocess, ShardStream, make_loader
from eatdist.data.shards import iter_shard
from eatdist.errors import ConfigError
from eatdist.models.eat import localisation_loss
from eatdist.train.trainer import _validate


def stream(info, train, boxes, size=16):
    s = ShardStream(info, "train", preprocess=Preprocess(size, (0.5,) * 3, (0.5,) * 3), batch_size=8, train=train,
                    shuffle_buffer=1, boxes=boxes)  # fmt: skip
    s.set_epoch(0)
    return s


def test_boxes_are_flipped_and_scaled_with_their_image(tmp_path):
    info = write_corpus(tmp_path, {"train": [24]})
    records = {s["__key__"]: json.loads(s["json"]) for s in iter_shard(tmp_path / "train-000000.tar")}
    plain = {}
    for batch in make_loader(stream(info, False, False), 0):
        plain.update(zip(batch["keys"], batch["image"], strict=True))
    augmented = list(make_loader(stream(info, True, True), 0))
    unboxed = list(make_loader(stream(info, True, False), 0))
    flips = 0
    for batch, same in zip(augmented, unboxed, strict=True):
        assert torch.equal(batch["image"], same["image"])  # boxes change nothing of the random draw
        for i, key in enumerate(batch["keys"]):
            flipped = torch.equal(batch["image"][i], plain[key].flip(-1))
            assert flipped or torch.equal(batch["image"][i], plain[key])
            flips += flipped
            given = records[key]["attr_boxes"]
            assert batch["box_mask"][i].sum() == len(given)
            for a, (x0, y0, x1, y1) in given.items():
                want = [x0 / 32, y0 / 32, x1 / 32, y1 / 32]
                if flipped:
                    want = [1 - want[2], want[1], 1 - want[0], want[3]]
                torch.testing.assert_close(batch["attr_boxes"][i, int(a)], torch.tensor(want))
    assert 0 < flips < 24  # both kinds were seen


def test_the_loss_is_low_when_the_map_lies_in_its_box_and_counts_only_present_boxed_attributes():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    inside = torch.full((1, 2, 4, 4), -10.0)
    inside[0, 0, :2, :2] = 10.0
    inside[0, 1, 2:, 2:] = 10.0
    outside = inside.flip(-1).flip(-2)
    present, both = torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    low = localisation_loss(inside, boxes, both, present)
    high = localisation_loss(outside, boxes, both, present)
    assert low < 1e-3 and high > 10
    assert localisation_loss(outside, boxes, torch.zeros(1, 2), present) == 0  # no box: no loss
    assert localisation_loss(outside, boxes, both, torch.zeros(1, 2)) == 0  # absent attribute: no loss
    assert localisation_loss(outside, boxes, both, present, weight=torch.zeros(1)) == 0  # a stand-in image
    # a box smaller than a cell still has the cell holding its centre: one of the four lit cells
    tiny = torch.tensor([[[0.30, 0.30, 0.32, 0.32]] * 2])
    assert localisation_loss(inside, tiny, both, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(4), 1e-4)
    # its gradient moves the mass into the box
    maps = torch.zeros(1, 2, 4, 4, requires_grad=True)
    localisation_loss(maps, boxes, both, present).backward()
    assert (maps.grad[0, 0, :2, :2] < 0).all() and (maps.grad[0, 0, 2:, 2:] > 0).all()


def test_localisation_needs_the_spatial_head_and_cpu_augmentation():
    with pytest.raises(ConfigError, match="'loss.localisation_weight': needs model.attr_head=spatial"):
        _validate(load_config(None, ["loss.localisation_weight=1"]))
    with pytest.raises(ConfigError, match="'loss.localisation_weight': must be >= 0"):
        _validate(load_config(None, ["model.attr_head=spatial", "loss.localisation_weight=-1"]))
    _validate(load_config(None, ["model.attr_head=spatial", "loss.localisation_weight=1"]))


@pytest.mark.slow
def test_training_adds_the_localisation_loss(tmp_path):
    corpus = write_corpus(tmp_path / "c", {"train": [32], "val": [8]})
    args = [sys.executable, "-m", "eatdist", "train", "model.backbone=test_resnet", "model.attr_head=spatial",
            "model.backbone_args={output_stride: 8}", "data.image_size=32", "data.batch_size=8",
            "data.num_workers=0", f"data.root={corpus.root}", "train.epochs=1", "train.final_test=false",
            "train.log_every=1"]  # fmt: skip
    losses = {}
    for weight in (0, 2):
        out = tmp_path / f"w{weight}"
        result = run([*args, f"train.output_dir={out}", f"loss.localisation_weight={weight}"], env=cpu_env())
        assert result.returncode == 0
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[weight] = next(r["loss"] for r in lines if r["kind"] == "step")
    # the first step sees the same weights and images either way: the difference is the added term
    assert losses[2] > losses[0] + 0.1
