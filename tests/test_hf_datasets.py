"""Corpus and explanation shards read by Hugging Face ``datasets`` (its ``webdataset`` builder), as the docs show."""

import io
import json

import numpy as np
import pytest
import torch

from conftest import untrained_package, write_corpus
from eatdist.config import ExplainConfig
from eatdist.data.shards import iter_shard
from eatdist.explain.job import run_explain

datasets = pytest.importorskip("datasets")
IMAGE = ("jpg", "png", "webp")


def features(members):
    """The docs' recipe: images as Image, every ``json`` kept whole (Json), text as strings, maps as arrays."""
    f = datasets.Features({"__key__": datasets.Value("string"), "__url__": datasets.Value("string")})
    for name in sorted(members):
        ext = name.rsplit(".", 1)[-1]
        f[name] = (datasets.Image() if ext in IMAGE else datasets.Json() if ext == "json"
                   else datasets.List(datasets.List(datasets.List(datasets.Value("float16")))) if ext == "npy"
                   else datasets.Value("string"))  # fmt: skip
    return f


def same(a, b):
    """Equal JSON values, floats to 1e-12 (datasets' Json re-encodes them, sometimes in the last digit)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return abs(a - b) <= 1e-12
    return a == b


def shard_samples(paths):
    return {s["__key__"]: s for path in paths for s in iter_shard(path)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), {"test": [24, 16]})


def test_a_corpus_loads_with_every_annotation(corpus, tmp_path):
    shards = sorted(str(p) for p in corpus.root.glob("test-*.tar"))
    found = features(["jpg", "json"])
    ds = datasets.load_dataset(
        "webdataset", data_files={"test": shards}, split="test", features=found, cache_dir=str(tmp_path / "hf")
    )
    raw = shard_samples(shards)
    assert sorted(ds["__key__"]) == sorted(raw) and len(ds) == 40
    for row in ds:
        sample = raw[row["__key__"]]
        assert same(row["json"], json.loads(sample["json"]))  # sparse attr_boxes and parts included
        assert row["jpg"].size == (32, 32) and len(row["json"]["attributes"]) == corpus.num_attributes


def test_an_explanation_output_loads_with_its_maps(corpus, tmp_path):
    torch.manual_seed(0)
    package = untrained_package(corpus, tmp_path)
    every_part = ["json", "txt", "heatmaps.npy", "image", "overlay", "attr_maps"]  # pictures too, not only the default
    run_explain(
        package, str(corpus.root / "test-*.tar"), tmp_path / "expl", ExplainConfig(num_workers=0, outputs=every_part)
    )
    shards = sorted(str(p) for p in (tmp_path / "expl").glob("*.tar"))
    raw = shard_samples(shards)
    members = {m for s in raw.values() for m in s if not m.startswith("__")}
    ds = datasets.load_dataset("webdataset", data_files={"test": shards}, split="test", features=features(members),
                               cache_dir=str(tmp_path / "hf"))  # fmt: skip
    assert sorted(ds["__key__"]) == sorted(raw) and len(ds) == 40
    for row in ds:
        sample = raw[row["__key__"]]
        record = json.loads(sample["json"])
        assert same(row["json"], record) and row["txt"] == sample["txt"].decode() == record["text"]
        maps = np.load(io.BytesIO(sample["heatmaps.npy"]), allow_pickle=False)
        np.testing.assert_array_equal(np.asarray(row["heatmaps.npy"], dtype=np.float16), maps)
        assert row["overlay.jpg"].size == row["image.jpg"].size
