import hashlib
import json

from eatdist.config import SynthConfig
from eatdist.data.corpus import load_dataset_info
from eatdist.data.pipeline import decode_image
from eatdist.data.shards import iter_shard
from eatdist.data.synth import GROUPS, generate


def _small(**kw):
    return SynthConfig(**{"train": 300, "val": 60, "test": 60, "shard_size": 100, "image_size": 48, "workers": 1, **kw})


def test_corpus_follows_contract_1(tmp_path):
    info = generate(_small(), tmp_path, progress=False)
    loaded = load_dataset_info(tmp_path)
    assert loaded.num_classes >= 10 and loaded.num_attributes >= 20
    assert {g for g, _, _ in GROUPS} >= {"shape", "body colour", "pattern", "size", "top colour"}
    assert [s.samples for s in loaded.shards("train")] == [100, 100, 100]
    assert len(loaded.class_attributes) == loaded.num_classes
    keys = set()
    for split in info.splits:
        for path in loaded.shard_paths(split):
            for sample in iter_shard(path):
                record = json.loads(sample["json"])
                assert "." not in sample["__key__"]
                keys.add(sample["__key__"])
                assert decode_image(sample).size == (48, 48)
                assert len(record["attributes"]) == loaded.num_attributes
                assert 0 <= record["class"] < loaded.num_classes
                x0, y0, x1, y1 = record["bbox"]
                assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
                # one value per group is present, and each present attribute has its box
                assert sum(record["attributes"]) == len(GROUPS)
                present = {str(i) for i, v in enumerate(record["attributes"]) if v == 1.0}
                assert set(record["attr_boxes"]) == present
                top = loaded.attribute_groups["top colour"]
                top_attr = next(str(i) for i in top if record["attributes"][i] == 1.0)
                tb = record["attr_boxes"][top_attr]
                assert tb[1] >= y0 and tb[3] < y1  # the top part is a sub-region of the object
    assert len(keys) == 420


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def digest(folder):
        return hashlib.sha256(
            b"".join((folder / f).read_bytes() for f in sorted(p.name for p in folder.glob("*.tar")))
        ).hexdigest()

    generate(_small(seed=3), tmp_path / "a", progress=False)
    generate(_small(seed=3, workers=2), tmp_path / "b", progress=False)
    generate(_small(seed=4), tmp_path / "c", progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_attributes_vary_within_a_class(tmp_path):
    generate(_small(train=600, attr_noise=0.2), tmp_path, progress=False)
    info = load_dataset_info(tmp_path)
    per_class: dict[int, set] = {}
    for path in info.shard_paths("train"):
        for sample in iter_shard(path):
            record = json.loads(sample["json"])
            per_class.setdefault(record["class"], set()).add(tuple(record["attributes"]))
    assert all(len(v) > 1 for v in per_class.values())


def test_spurious_background_only_in_train(tmp_path):
    generate(_small(train=400, val=200, spurious_rate=1.0, num_classes=10), tmp_path, progress=False)
    info = load_dataset_info(tmp_path)

    def match_rate(split):
        hits = total = 0
        for path in info.shard_paths(split):
            for sample in iter_shard(path):
                r = json.loads(sample["json"])
                hits += abs(r["background_hue"] - (r["class"] + 0.5) / 10) < 1e-3
                total += 1
        return hits / total

    assert match_rate("train") == 1.0
    assert match_rate("val") < 0.1


def test_object_mask_and_background_swap_keep_the_object():
    import numpy as np

    from eatdist.data.synth import class_prototypes, render_object, render_sample, spurious_hue

    cfg = _small(num_classes=6)
    protos = class_prototypes(6, cfg.seed)
    for index in range(20):
        drawn = render_object(cfg, protos, "test", index)
        image, record = render_sample(cfg, protos, "test", index)
        assert np.array_equal(drawn.image, image) and drawn.record == record
        ys, xs = np.nonzero(drawn.mask)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == record["bbox"]  # the mask is the object
        other = (record["class"] + 1) % 6
        swapped = render_object(cfg, protos, "test", index, background_class=other)
        assert swapped.record["background_hue"] == round(spurious_hue(other, 6), 4)
        assert np.array_equal(swapped.mask, drawn.mask) and swapped.record["attributes"] == record["attributes"]
        # the object's pixels are drawn the same; the background differs
        same = np.abs(swapped.image.astype(int) - drawn.image.astype(int)).max(axis=2) == 0
        assert same[drawn.mask].mean() > 0.99 and same[~drawn.mask].mean() < 0.5


def test_corpus_knobs_for_the_cue_and_the_object_size(tmp_path):
    import numpy as np
    import pytest

    from eatdist.data.synth import class_prototypes, render_object
    from eatdist.errors import ConfigError

    protos = class_prototypes(10, 0)
    exact = _small(spurious_rate=1.0, num_classes=10)
    blurred = _small(spurious_rate=1.0, num_classes=10, spurious_hue_jitter=0.1)
    offsets = [abs(render_object(c, protos, "train", i).record["background_hue"]
                   - (render_object(c, protos, "train", i).record["class"] + 0.5) / 10)
               for c in (exact, blurred) for i in range(40)]  # fmt: skip
    assert max(offsets[:40]) < 1e-3 and 0.02 < np.mean(offsets[40:]) <= 0.1 + 1e-3
    small = _small(object_scale_min=0.5, object_scale_max=0.6)
    large = _small(object_scale_min=1.2, object_scale_max=1.3)
    area = [np.mean([render_object(c, protos, "val", i).mask.mean() for i in range(30)]) for c in (small, large)]
    assert area[1] > 3 * area[0]
    with pytest.raises(ConfigError, match="object_scale"):
        generate(_small(object_scale_min=1.2, object_scale_max=1.0), tmp_path, progress=False)
