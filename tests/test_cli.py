"""Mistakes a user makes get one clear line naming the culprit and a non-zero exit.

The first mistake is made in a real ``python -m eatdist`` process (exit status and stderr as a
shell sees them); the others call the same entry point in this process, so none pays the start-up.
"""

import sys

import pytest

from conftest import run, write_corpus
from eatdist.cli.main import main


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line and not line.startswith(" ")]


@pytest.fixture
def eatdist(capsys):
    """eatdist(*args) -> (exit code, stderr lines) of the CLI run in this process."""

    def call(*args):
        capsys.readouterr()
        code = main(list(args))
        return code, error_lines(capsys.readouterr().err)

    return call


def assert_one_line_error(code, lines, *fragments):
    assert code != 0
    errors = [line for line in lines if line.startswith("eatdist: error:")]
    assert len(errors) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    for fragment in fragments:
        assert fragment in errors[0]


def test_unknown_config_key():
    result = run([sys.executable, "-m", "eatdist", "train", "train.epoch=3"])
    assert_one_line_error(result.returncode, error_lines(result.stderr), "unknown config key 'train.epoch'",
                          "train.epochs")  # fmt: skip


def test_mistyped_config_value(eatdist):
    assert_one_line_error(*eatdist("train", "data.batch_size=big"), "data.batch_size", "expected int")


def test_missing_shard_file(tmp_path, eatdist):
    corpus = write_corpus(tmp_path / "c", {"train": [16, 16], "val": [8]})
    (corpus.root / "train-000001.tar").unlink()
    assert_one_line_error(*eatdist("train", f"data.root={corpus.root}"), "shard file not found", "train-000001.tar")


def test_unknown_backbone_with_close_matches(tmp_path, eatdist):
    corpus = write_corpus(tmp_path / "c", {"train": [16], "val": [8]})
    assert_one_line_error(
        *eatdist("train", f"data.root={corpus.root}", "model.backbone=resnet5O"),
        "unknown backbone 'resnet5O'",
        "resnet50",
    )


def test_not_a_model_package(tmp_path, eatdist):
    corpus = write_corpus(tmp_path / "c", {"test": [4]})
    assert_one_line_error(
        *eatdist("explain", "--model", str(tmp_path), "--input", str(corpus.root), "--output", str(tmp_path / "o")),
        "is not an eatdist model package",
    )


def test_no_input_shards(tmp_path, eatdist):
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


def test_not_a_corpus(tmp_path, eatdist):
    assert_one_line_error(*eatdist("train", f"data.root={tmp_path}"), "no dataset.json")
