"""A damaged corpus loses nothing without a trace: every planned position that gives no usable
sample is counted by cause, in training with one and two processes, and every sample of a shard
with dotted keys is explained or listed."""

import json
import sys
import tarfile

import pytest
import webdataset as wds

from conftest import TINY_TRAIN, accelerate_launch, run, untrained_package, write_corpus
from eatdist.cli.main import main
from eatdist.data.corpus import ShardInfo, load_dataset_info
from eatdist.data.pipeline import SKIP_CAUSES, Preprocess, ShardStream, make_loader
from eatdist.data.shards import iter_shard
from eatdist.data.tarscan import unmerge

UNDECODABLE = [f"train_{i:07d}" for i in (1, 5, 9, 13, 17, 21)]
# 128 listed, 32 unusable: 6 undecodable, 2 dotted keys (shard 0), 8 beyond the cut of a truncated
# shard (1), an empty shard listed with 8 (2), a shard listed with 8 more samples than it holds (3)
EXPECTED = {"undecodable": 6, "missing": 16, "bad_key": 2, "truncated": 8}


def rewrite_foreign(path, samples):
    """Write ``samples`` as a tool other than eatdist would: WebDataset's TarWriter, keys as given, no index."""
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def damaged_corpus(root):
    info = write_corpus(root, {"train": [32, 24, 8, 24, 32], "val": [16]}, corrupt=dict.fromkeys(UNDECODABLE, "image"))
    shards = info.splits["train"]
    paths = [root / s.file for s in shards]
    for path in paths[:3]:
        (root / f"{path.name}.idx.json").unlink()
    samples = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in iter_shard(paths[0])]
    for i in (3, 7):
        samples[i]["__key__"] = f"photo{i}.v2"
    rewrite_foreign(paths[0], samples)
    with tarfile.open(paths[1]) as tar:
        cut = tar.getmembers()[2 * 16].offset + 700  # inside the first member of sample 17
    paths[1].write_bytes(paths[1].read_bytes()[:cut])
    paths[2].write_bytes(b"")
    shards[3] = ShardInfo(shards[3].file, 32)
    info.save(root)
    return load_dataset_info(root)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    return damaged_corpus(tmp_path_factory.mktemp("damaged"))


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_every_unusable_position_is_counted_by_cause(damaged, world, workers):
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    skipped, by_cause, used = 0, [0] * len(SKIP_CAUSES), []
    for rank in range(world):
        stream = ShardStream(damaged, "train", preprocess=pre, batch_size=8, train=True, rank=rank, world=world,
                             num_workers=workers, shuffle_buffer=20)  # fmt: skip
        for batch in make_loader(stream, workers):
            skipped += batch["skipped"]
            by_cause = [a + int(b) for a, b in zip(by_cause, batch["skipped_by"], strict=True)]
            used += batch["keys"]
    assert damaged.num_samples("train") == 128
    assert skipped == 32 and dict(zip(SKIP_CAUSES, by_cause, strict=True)) == EXPECTED
    assert len(used) == len(set(used)) == 96 and not set(UNDECODABLE) & set(used)


def test_unmerge_takes_apart_only_the_samples_webdataset_merged_at_a_dot():
    plain = {"__key__": "a", "__shard__": "s.tar", "jpg": b"1", "json": b"{}"}
    assert unmerge(plain)[0] is plain
    mask = {"__key__": "a", "jpg": b"1", "json": b"{}", "seg.png": b"2"}  # a dotted extension of its own
    assert unmerge(mask)[0] is mask
    neighbour = {"__key__": "a", "jpg": b"1", "json": b"{}", "b.jpg": b"2", "b.json": b"{}"}
    assert [(p["__key__"], p["jpg"]) for p in unmerge(neighbour)] == [("a", b"1"), ("a.b", b"2")]
    merged = {"__key__": "pic", "__shard__": "s.tar", "1.jpg": b"1", "2.v3.jpg": b"2", "2.v3.json": b"{}"}
    parts = unmerge(merged)
    assert [(p["__key__"], sorted(p)) for p in parts] == [
        ("pic.1", ["__key__", "__shard__", "jpg"]), ("pic.2.v3", ["__key__", "__shard__", "jpg", "json"])
    ]  # fmt: skip


def epoch_records(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "epoch"]


def assert_counted(out, stdout, epochs, world):
    for record in epoch_records(out):
        assert record["train_skipped"] == 32
        assert {c: record[f"train_skipped_{c}"] for c in SKIP_CAUSES} == EXPECTED
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["train_skipped_total"] == 32 * epochs
    assert {c: final[f"train_skipped_total_{c}"] for c in SKIP_CAUSES} == {c: n * epochs for c, n in EXPECTED.items()}
    words = "6 undecodable, 16 missing from their shard, 2 with a bad key, 8 cut off by a truncated shard"
    assert f"epoch 1: skipped 32 unusable training samples ({words}; see warnings)" in stdout
    totals = {c: n * epochs for c, n in EXPECTED.items()}
    assert f"skipped {32 * epochs} unusable training samples over {epochs} epoch(s): " in stdout
    for r in range(world):  # every rank's view of the run agrees
        report = json.loads((out / "ranks" / f"rank-{r}.json").read_text())
        assert report["train_skipped"] == 32 * epochs and report["train_skipped_by"] == totals


@pytest.mark.slow
def test_train_skipped_counts_every_unusable_position_with_one_and_two_processes(tmp_path, damaged):
    args = ["train", *TINY_TRAIN, "data.num_workers=1", f"data.root={damaged.root}", "train.final_test=false"]
    out = tmp_path / "one"
    result = run([sys.executable, "-m", "eatdist", *args, f"train.output_dir={out}", "train.epochs=2"])
    assert result.returncode == 0
    assert_counted(out, result.stdout, 2, 1)
    out = tmp_path / "two"
    result = run(accelerate_launch([*args, f"train.output_dir={out}", "train.epochs=1"]), timeout=400)
    assert result.returncode == 0
    assert_counted(out, result.stdout, 1, 2)


@pytest.mark.slow
def test_every_sample_of_a_shard_with_dotted_keys_is_explained_or_listed(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", {"test": [8]}, corrupt={"test_0000002": "image"})
    shard = corpus.root / "test-000000.tar"
    samples = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in iter_shard(shard)]
    # 's3.b' follows 's3' (merged into it by WebDataset), 'pic.1' and 'pic.2' merge into 'pic'
    keys = ["s0", "s1", "s2", "s3", "s3.b", "pic.1", "pic.2", "s7"]
    for sample, key in zip(samples, keys, strict=True):
        sample["__key__"] = key
    foreign = tmp_path / "foreign" / "photos-000000.tar"
    foreign.parent.mkdir()
    rewrite_foreign(foreign, samples)
    assert len(list(iter_shard(foreign))) == 6  # what WebDataset makes of the 8

    package = untrained_package(corpus, tmp_path)
    args = ["explain", "--model", str(package), "--input", str(foreign), "--output", str(tmp_path / "out"),
            "explain.batch_size=3", "explain.num_workers=1"]  # fmt: skip
    assert main(args) == 0
    assert "; 1 undecodable, 3 under a safe key (a dot in the key)," in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "explain_summary.json").read_text())
    explained = {s["__key__"]: json.loads(s["json"]) for s in iter_shard(tmp_path / "out" / foreign.name)}
    assert summary["explained"] == len(explained) == 7 and summary["undecodable"] == 1
    assert summary["explained"] + summary["undecodable"] == len(keys)
    assert set(explained) == {"s0", "s1", "s3", "s3_b", "pic_1", "pic_2", "s7"}
    assert {k: r.get("original_key") for k, r in explained.items() if "original_key" in r} == {
        "s3_b": "s3.b", "pic_1": "pic.1", "pic_2": "pic.2"
    }  # fmt: skip
    assert summary["renamed"] == 3 and [u["key"] for u in summary["undecodable_samples"]] == ["s2"]
