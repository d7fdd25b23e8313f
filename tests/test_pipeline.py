import logging

import pytest
import torch

from conftest import write_corpus
from eatdist.data.corpus import load_dataset_info
from eatdist.data.pipeline import Preprocess, ShardStream, make_loader
from eatdist.errors import DataError

PRE = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def stream(info, split, train, rank=0, world=1, workers=0, batch=16, epoch=0):
    s = ShardStream(
        info,
        split,
        preprocess=PRE,
        batch_size=batch,
        train=train,
        rank=rank,
        world=world,
        num_workers=workers,
        shuffle_buffer=50,
    )
    s.set_epoch(epoch)
    return s


def test_train_batches_have_the_model_inputs(tiny_corpus):
    batch = next(iter(make_loader(stream(tiny_corpus, "train", True), 0)))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (16,) and batch["attributes"].shape == (16, tiny_corpus.num_attributes)
    assert batch["attr_mask"].eq(1).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_planned_steps_on_uneven_shards(tmp_path, workers):
    info = write_corpus(tmp_path, {"train": [53, 7, 91, 30, 12]})
    counts, keys = [], []
    for rank in range(2):
        batches = list(make_loader(stream(info, "train", True, rank=rank, world=2, workers=workers, batch=8), workers))
        counts.append(len(batches))
        keys += [k for b in batches for k in b["keys"]]
    assert counts == [(193 // 2) // 8] * 2
    assert len(keys) == len(set(keys))  # no sample read twice in the epoch


def test_eval_reads_each_sample_once_across_ranks(tiny_corpus):
    keys = []
    for rank in range(3):
        for b in make_loader(stream(tiny_corpus, "val", False, rank=rank, world=3, workers=2, batch=7), 2):
            keys += b["keys"]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 80


def test_shuffle_differs_by_epoch(tiny_corpus):
    first = [k for b in make_loader(stream(tiny_corpus, "train", True, epoch=0), 0) for k in b["keys"]]
    second = [k for b in make_loader(stream(tiny_corpus, "train", True, epoch=1), 0) for k in b["keys"]]
    assert first != second and len(first) == len(second)


def test_corrupt_samples_skipped_counted_and_replaced(tmp_path, caplog):
    bad = {"train_0000003": "image", "train_0000010": "json", "train_0000020": "nojson", "train_0000031": "attrs"}
    info = write_corpus(tmp_path, {"train": [40, 24], "val": [20]}, corrupt=bad | {"val_0000002": "image"})
    with caplog.at_level(logging.WARNING):
        batches = list(make_loader(stream(info, "train", True, batch=8), 0))
    assert len(batches) == 64 // 8  # still the planned steps: the gap is refilled
    assert sum(b["skipped"] for b in batches) >= 4
    assert not set(bad) & {k for b in batches for k in b["keys"]}
    assert "undecodable" in caplog.text and "malformed json" in caplog.text and "expected 20 values" in caplog.text
    val = list(make_loader(stream(info, "val", False, batch=8), 0))
    assert sum(b["skipped"] for b in val) == 1 and sum(len(b["keys"]) for b in val) == 19


def test_missing_shard_named(tmp_path):
    write_corpus(tmp_path, {"train": [20, 20]})
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="train-000001.tar"):
        stream(load_dataset_info(tmp_path), "train", True)


def test_unknown_split_named(tiny_corpus):
    with pytest.raises(DataError, match="no split 'tarin'.*did you mean: train"):
        stream(tiny_corpus, "tarin", True)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_the_same_batches(tiny_corpus, workers):
    def batches(start_step):
        s = stream(tiny_corpus, "train", True, workers=workers, batch=8)
        s.set_epoch(1, start_step=start_step)
        return list(make_loader(s, workers))

    whole, resumed = batches(0), batches(13)
    assert len(whole) == 13 + len(resumed)
    for a, b in zip(whole[13:], resumed, strict=True):
        assert a["keys"] == b["keys"]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)  # augmentation seeded per sample
