"""Every failure a user can cause or meet ends in one line ``eatdist: error: ...`` naming the path
or key and the cause, exit code 2, on every rank; real conditions where they can be made here:
read-only and tiny tmpfs mounts, a file where a folder is expected, a broken plugin, a launcher."""

import errno
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import REPO, accelerate_launch, cpu_env, run, untrained_package, write_corpus
from eatdist.cli.errors import ANOTHER_RANK_FAILED, describe, one_line, unwrap_worker_error
from eatdist.cli.main import main
from eatdist.errors import DataError, EatdistError, ModelPackageError
from eatdist.models.package import load_package

TRAIN = ["data.image_size=32", "data.batch_size=16", "data.num_workers=0", "train.epochs=1",
         "model.backbone=test_resnet", "train.final_test=false"]  # fmt: skip


def error_lines(stderr):
    """The lines of ``stderr`` that are not library warnings."""
    return [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line]


@pytest.fixture
def eatdist(capsys):
    """eatdist(*args) -> (exit code, stderr lines that are not library warnings): the CLI's entry point
    called in this process, as a start costs seconds (the full-disk explanation and the launcher
    tests below start real processes)."""

    def call(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        return code, error_lines(capsys.readouterr().err)

    return call


def the_error(code, lines):
    """Assert one error line and no traceback; return the line."""
    errors = [line for line in lines if "eatdist: error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    assert errors[0].startswith("eatdist: error: ")
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny corpus and a model package over it (untrained: the errors below do not depend on the weights)."""
    base = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(base / "data", {"train": [32], "val": [16], "test": [8]})
    return corpus, untrained_package(corpus, base)


# ----------------------------------------------------------------------------- the error path itself


class _Failing(Dataset):
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        raise self.exc


def _raised_in_worker(exc: Exception) -> BaseException:
    with pytest.raises(Exception) as caught:
        next(iter(DataLoader(_Failing(exc), num_workers=1)))
    return caught.value


def test_errors_from_dataloader_workers_are_unwrapped_whole(tmp_path):
    wrapped = _raised_in_worker(DataError("shard /data/train-000001.tar:\nsample 7 has no json"))
    assert "Original Traceback" in str(wrapped)
    assert describe(wrapped) == ("shard /data/train-000001.tar: sample 7 has no json", 2)
    secret = tmp_path / "secret.tar"
    secret.write_bytes(b"")
    wrapped = _raised_in_worker(PermissionError(errno.EACCES, "Permission denied", str(secret)))
    assert describe(wrapped) == (f"{secret}: permission denied", 2)
    assert describe(_raised_in_worker(ValueError("a bug"))) is None  # a bug keeps its traceback
    assert unwrap_worker_error("no worker here") is None


def test_os_errors_name_the_path_and_cause(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert describe(FileExistsError(errno.EEXIST, "File exists", str(afile)))[0] == (
        f"{afile}: is a file, but a folder is needed there"
    )
    line, code = describe(OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".x.tmp")))
    assert line == f"cannot write in {tmp_path}: read-only file system (creating .x.tmp)" and code == 2
    full = describe(OSError(errno.ENOSPC, "No space left on device"))
    assert full == ("cannot write: disk full (no space left on device)", 2)
    assert describe(OSError(errno.EIO, "Input/output error")) is None
    assert one_line("a\n  b\n\n c ") == "a b c"
    assert describe(EatdistError("first\nsecond")) == ("first second", 2)


def test_collective_error_after_another_rank_failed_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
    assert describe(gloo) == (ANOTHER_RANK_FAILED, 2)
    assert describe(torch.distributed.DistBackendError("NCCL watchdog timeout")) == (ANOTHER_RANK_FAILED, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert describe(gloo) is None  # alone, it is a bug


# ----------------------------------------------------------------------------- configs and packages


def test_yaml_syntax_error_gives_file_line_and_column(tmp_path, eatdist):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n   lr: 1\n")
    line = the_error(*eatdist("report", "--explanations", tmp_path, "--config", bad))
    assert line == f"eatdist: error: config file {bad}, line 3, column 6: not valid YAML: " + (
        "mapping values are not allowed here"
    )
    bad.write_text("train:\n  epochs: [1, 2\nmodel:\n  backbone: x\n")
    line = the_error(*eatdist("report", "--explanations", tmp_path, "--config", bad))
    assert f"config file {bad}, line 3" in line and "started at line 2, column 11" in line


@pytest.mark.slow
def test_package_whose_metadata_disagrees_with_its_weights_is_named(tmp_path, trained, eatdist):
    corpus, model = trained
    package = shutil.copytree(model, tmp_path / "pkg")
    meta = json.loads((package / "eatdist_model.json").read_text())
    meta["classes"] = meta["classes"] + ["extra"]
    (package / "eatdist_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError) as caught:
        load_package(package)
    message = str(caught.value)
    assert f"model package {package}: model.safetensors does not fit eatdist_model.json" in message
    assert "5 classes" in message and "class_head.1.weight is [4, " in message and "\n" not in message
    line = the_error(*eatdist("explain", "--model", package, "--input", corpus.root / "test-000000.tar",
                              "--output", tmp_path / "out"))  # fmt: skip
    assert f"model package {package}" in line and "class_head.1.bias is [4], the metadata needs [5]" in line
    meta["backbone"] = "no_such_backbone_xyz"
    (package / "eatdist_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelPackageError, match=rf"model package {package}: unknown backbone 'no_such_backbone_xyz'"):
        load_package(package)


# ----------------------------------------------------------------------------- paths a user gives


@pytest.mark.slow
def test_train_into_a_read_only_folder_or_under_a_file(tmp_path, trained, mount, eatdist):
    corpus, _ = trained
    read_only = mount(1, read_only=True)
    line = the_error(*eatdist("train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={read_only}/run"))
    assert line == f"eatdist: error: cannot write in {read_only}: read-only file system (creating run)"
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    line = the_error(*eatdist("train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={afile}/run"))
    assert str(afile) in line and ("folder" in line)


@pytest.mark.slow
def test_explain_into_a_read_only_folder_or_a_file(tmp_path, trained, mount, eatdist):
    corpus, model = trained
    inputs = corpus.root / "test-000000.tar"
    read_only = mount(1, read_only=True)
    line = the_error(*eatdist("explain", "--model", model, "--input", inputs, "--output", read_only))
    assert line.startswith(f"eatdist: error: cannot write in {read_only}: read-only file system")
    line = the_error(*eatdist("explain", "--model", model, "--input", inputs, "--output", read_only / "sub"))
    assert line == f"eatdist: error: cannot write in {read_only}: read-only file system (creating sub)"
    afile = tmp_path / "out.tar"
    afile.write_text("an existing file")
    line = the_error(*eatdist("explain", "--model", model, "--input", inputs, "--output", afile))
    assert line == f"eatdist: error: {afile}: is a file, but a folder is needed there"
    assert afile.read_text() == "an existing file"


@pytest.mark.slow
def test_explain_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, trained, mount):
    corpus, model = trained
    out = mount(1) / "expl"
    # fill the disk but for a few KiB: the job file fits, an output shard does not
    filler = out.parent / "filler"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * (1024 * 1024 - 32 * 1024))
        except OSError:
            pass
    cmd = [sys.executable, "-m", "eatdist", "explain", "--model", str(model), "--input",
           str(corpus.root / "test-000000.tar"), "--output", str(out)]  # fmt: skip
    result = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=30, cwd=REPO)
    line = the_error(result.returncode, error_lines(result.stderr))
    assert "disk full" in line and str(out) in line
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".tar")]


# ----------------------------------------------------------------------------- under a launcher

RANK_FAILING_PLUGIN = textwrap.dedent(
    """
    import os, time
    import timm
    from eatdist.errors import BackboneError

    def make(**kwargs):
        if os.environ.get("RANK") == "1":
            time.sleep(2)  # rank 0 is waiting in a collective by now
            raise BackboneError("backbone 'rankfail': no weights for rank 1 at /nowhere/weights.pt")
        return timm.create_model("test_resnet", num_classes=0)
    """
)


@pytest.mark.slow
def test_one_rank_fails_under_accelerate_launch(tmp_path, trained):
    """Rank 1 meets a user error, rank 0 a broken collective: each says one line of its own,
    before the launcher's traceback, and nobody prints gloo's."""
    corpus, _ = trained
    (tmp_path / "rankfail.py").write_text(RANK_FAILING_PLUGIN)
    info = tmp_path / "rankfail-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rankfail\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[eatdist.backbones]\nrankfail = rankfail:make\n")
    args = ["train", *TRAIN, "data.batch_size=8", "model.backbone=rankfail", f"data.root={corpus.root}",
            f"train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    result = run(accelerate_launch(args, 2), env=cpu_env(PYTHONPATH=str(tmp_path)))
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    ours = [i for i, line in enumerate(lines) if "eatdist: error:" in line]
    rank1 = [lines[i] for i in ours if lines[i].startswith("[rank 1] ")]
    assert rank1 == ["[rank 1] eatdist: error: backbone 'rankfail': no weights for rank 1 at /nowhere/weights.pt"]
    # rank 0 says one line, unless the launcher's SIGTERM came first; never gloo's traceback
    assert [lines[i] for i in ours if not lines[i].startswith("[rank 1] ")] in (
        [],
        [f"[rank 0] eatdist: error: {ANOTHER_RANK_FAILED}"],
    )
    assert "Connection closed by peer" not in result.stderr
    launcher = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    assert len(launcher) <= 1 and all(i < launcher[0] for i in ours) if launcher else True


# ----------------------------------------------------------------------------- a full disk at every output

LEFT_OVER = (".tmp", ".partial", ".old")


def fill(folder, leave):
    """Fill the file system of ``folder`` but for ``leave`` bytes (a filler file, rewritten); return it."""
    filler = folder / "filler"
    filler.unlink(missing_ok=True)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))
    return filler


@pytest.mark.slow
def test_a_full_disk_at_every_output_is_one_line_and_the_same_commands_complete_once_freed(tmp_path, mount, capsys):
    corpus = write_corpus(tmp_path / "data", {"train": [32], "val": [16]})
    disk = mount(16)
    run_dir, explanations = disk / "run", disk / "run" / "explanations"
    train = ["train", *TRAIN, f"data.root={corpus.root}", f"train.output_dir={run_dir}"]
    assert main([*train, "train.explain_split=val"]) == 0
    weights = (run_dir / "model" / "model.safetensors").read_bytes()
    # what each command is left: a resumed run gets past its config and logs, then meets the disk
    commands = {
        "train --resume of a finished run": ([*train, "--resume"], 64 << 10),  # fails at the model package
        "train --resume of an unfinished run": ([*train, "train.epochs=2", "--resume"], 64 << 10),
        "export": (
            ["export", "--model", str(run_dir / "model"), "--format", "torchscript", "--out", str(disk / "m.pt")],
            64 << 10,
        ),  # fmt: skip
        "report": (["report", "--explanations", str(explanations)], 4 << 10),
        "evaluate": (["evaluate", "--explanations", str(explanations), "--data", str(corpus.root)], 1 << 10),
    }
    capsys.readouterr()
    for name, (args, leave) in commands.items():
        filler = fill(disk, leave)
        code = main(args)
        line = the_error(code, error_lines(capsys.readouterr().err))
        assert line.startswith(f"eatdist: error: disk full at {disk}") and " free" in line, (name, line)
        assert not [p for p in disk.rglob("*") if p.name.endswith(LEFT_OVER)], name
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights  # the package as it was
    assert not (disk / "m.pt").exists() and not (explanations / "report.html").exists()
    assert not (explanations / "evaluation.json").exists()
    assert all(json.loads(p.read_text()) is not None for p in disk.rglob("*.json"))  # every JSON whole

    filler.unlink()
    for name, (args, _) in commands.items():
        assert main(args) == 0, name
    assert load_package(run_dir / "model")[1].model_id
    assert json.loads((run_dir / "final_metrics.json").read_text())["train_skipped_total"] == 0
    assert (disk / "m.pt").is_file() and (explanations / "report.html").is_file()
    assert json.loads((explanations / "evaluation.json").read_text())["samples"] == 16
