import logging

import numpy as np
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
    # uint8 from the workers: the device normalises (Preprocess.normalize)
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.uint8
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


def test_uint8_batches_normalised_on_the_device_equal_the_float_path(tiny_corpus):
    from eatdist.data.decode import build_transform, decode_image
    from eatdist.data.shards import iter_shard

    pre = Preprocess(24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    samples = list(iter_shard(tiny_corpus.shard_paths("val")[0], 0, 8))
    images = [torch.from_numpy(np.array(decode_image(s))).permute(2, 0, 1) for s in samples]
    as_float = torch.stack([build_transform(pre, train=False)(im) for im in images])
    as_uint8 = torch.stack([build_transform(pre, train=False, normalize=False)(im) for im in images])
    assert as_uint8.dtype == torch.uint8
    torch.testing.assert_close(pre.normalize(as_uint8), as_float, rtol=0, atol=1e-5)


def test_reduced_size_jpeg_decoding_is_within_tolerance_of_full_decoding():
    import io

    from PIL import Image
    from torchvision.transforms import v2

    from eatdist.data.decode import decode_tensor

    rng = np.random.default_rng(0)
    # a smooth photo-like 448 x 336 image: gradients and a few blobs
    y, x = np.mgrid[0:336, 0:448] / 100.0
    rgb = np.stack([np.sin(x) * 80 + 120, np.cos(y * 1.3) * 70 + 110, np.sin(x + y) * 60 + 100], axis=2)
    rgb += rng.normal(0, 4, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    sample = {"jpg": buf.getvalue()}
    resize = v2.Resize((112, 112), antialias=True)
    full = resize(decode_tensor(sample, decoder="pil")).float()
    for target in (112, 150):  # a 4x and a 2x reduced decode
        reduced = decode_tensor(sample, target=target)
        assert min(reduced.shape[1:]) >= target and reduced.shape[2] < 448  # decoded smaller, never too small
        diff = (resize(reduced).float() - full).abs()
        assert diff.mean() < 2.0 and diff.max() < 40
    fast = decode_tensor(sample, target=300)  # not 2x larger: torchvision's decoder at full size
    assert tuple(fast.shape) == (3, 336, 448)
    assert (fast.float() - decode_tensor(sample, decoder="pil").float()).abs().mean() < 1.0


def test_persistent_workers_follow_each_epochs_plan(tiny_corpus):
    s = stream(tiny_corpus, "train", True, workers=2, batch=8)
    loader = make_loader(s, 2)
    epochs = []
    for epoch in range(3):
        s.set_epoch(epoch)
        epochs.append([k for b in loader for k in b["keys"]])
        if epoch == 0:
            workers = loader._iterator._workers  # the worker processes of the first pass
    assert loader._iterator._workers == workers and all(w.is_alive() for w in workers)  # no re-fork
    for epoch, keys in enumerate(epochs):
        fresh = stream(tiny_corpus, "train", True, workers=2, batch=8, epoch=epoch)
        assert keys == [k for b in make_loader(fresh, 2) for k in b["keys"]]  # each epoch's own plan
        assert len(keys) == len(set(keys))
    assert epochs[0] != epochs[1]


def test_device_decoding_gives_the_worker_images_and_drops_a_refused_jpeg(tmp_path):
    from eatdist.data.decode import decode_on_device

    info = write_corpus(tmp_path, {"train": [24]})
    on_cpu = list(make_loader(stream(info, "train", True, batch=8), 0))
    s = ShardStream(
        info, "train", preprocess=PRE, batch_size=8, train=True, shuffle_buffer=50, decode_device="cuda"
    )  # fmt: skip  (workers only carry the JPEG bytes)
    s.set_epoch(0)
    deferred = list(make_loader(s, 0))
    for a, b in zip(on_cpu, deferred, strict=True):
        assert a["keys"] == b["keys"] and all(j is not None for j in b["jpeg"])
        # the same code the trainer runs on the GPU, here on the CPU
        images = decode_on_device(b["jpeg"], b["seeds"], s.transform, torch.device("cpu"), train=True)
        torch.testing.assert_close(torch.stack(images), a["image"], rtol=0, atol=1)  # same flips, same pixels
    broken = torch.frombuffer(bytearray(b"\xff\xd8 not a jpeg"), dtype=torch.uint8)
    images = decode_on_device([deferred[0]["jpeg"][0], broken], [0, 1], s.transform, torch.device("cpu"), True)
    assert images[0] is not None and images[1] is None
