"""Mistakes a user makes get one clear line naming the culprit and a non-zero exit."""

import sys

from conftest import run, write_corpus


def eatdist(*args):
    result = run([sys.executable, "-m", "eatdist", *args])
    lines = result.stderr.splitlines()
    lines = [line for line in lines if line.strip() and "Warning" not in line and not line.startswith(" ")]
    return result.returncode, lines


def assert_one_line_error(code, lines, *fragments):
    assert code != 0
    errors = [line for line in lines if line.startswith("eatdist: error:")]
    assert len(errors) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    for fragment in fragments:
        assert fragment in errors[0]


def test_unknown_config_key():
    assert_one_line_error(*eatdist("train", "train.epoch=3"), "unknown config key 'train.epoch'", "train.epochs")


def test_mistyped_config_value():
    assert_one_line_error(*eatdist("train", "data.batch_size=big"), "data.batch_size", "expected int")


def test_missing_shard_file(tmp_path):
    corpus = write_corpus(tmp_path / "c", {"train": [16, 16], "val": [8]})
    (corpus.root / "train-000001.tar").unlink()
    assert_one_line_error(*eatdist("train", f"data.root={corpus.root}"), "shard file not found", "train-000001.tar")


def test_unknown_backbone_with_close_matches(tmp_path):
    corpus = write_corpus(tmp_path / "c", {"train": [16], "val": [8]})
    assert_one_line_error(
        *eatdist("train", f"data.root={corpus.root}", "model.backbone=resnet5O"),
        "unknown backbone 'resnet5O'",
        "resnet50",
    )


def test_not_a_model_package(tmp_path):
    corpus = write_corpus(tmp_path / "c", {"test": [4]})
    assert_one_line_error(
        *eatdist("explain", "--model", str(tmp_path), "--input", str(corpus.root), "--output", str(tmp_path / "o")),
        "is not an eatdist model package",
    )


def test_no_input_shards(tmp_path):
    assert_one_line_error(
        *eatdist(
            "explain",
            "--model",
            str(tmp_path),
            "--input",
            str(tmp_path / "none-*.tar"),
            "--output",
            str(tmp_path / "o"),
        ),
        "no input shards match",
    )


def test_not_a_corpus(tmp_path):
    assert_one_line_error(*eatdist("train", f"data.root={tmp_path}"), "no dataset.json")
