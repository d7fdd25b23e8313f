"""Explanation outputs in object storage: the store against moto's S3 server on 127.0.0.1, the claims
engine bucket to bucket with processes killed while they hold claims, and every path option a
user gives either written where it names or refused in one line.
"""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, moto_s3, untrained_package, write_corpus
from eatdist.cli.main import main
from eatdist.data.shards import iter_shard
from eatdist.errors import DataError
from eatdist.store import open_store


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with an empty ``bucket``; yields the client environment."""
    with moto_s3() as env:
        yield env


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("pc"), {"test": [1]})
    return untrained_package(corpus, tmp_path_factory.mktemp("pkg"))


def bucket_copy(prefix: str, into: Path) -> Path:
    """Download every object under ``s3://bucket/<prefix>`` into a local folder; return it."""
    store = open_store(f"s3://bucket/{prefix}")
    store.fs.invalidate_cache()
    for key in store.fs.find(store.base):
        target = into / key[len(store.base) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.fs.cat_file(key))
    return into


def keys(paths) -> Counter[str]:
    return Counter(s["__key__"] for p in paths for s in iter_shard(p))


def test_store_creates_once_and_keeps_the_store_clock(s3):
    store = open_store("s3://bucket/store-test")
    assert store.create("_claims/a.claim-0", b"mine")
    assert not store.create("_claims/a.claim-0", b"theirs")  # If-None-Match: * refused by the server
    assert store.get("_claims/a.claim-0") == b"mine"
    assert store.list("_claims") == ["a.claim-0"] and store.list("nothing") == []
    stamp = store.mtime_ns("_claims/a.claim-0")
    time.sleep(1.1)  # Last-Modified has one-second resolution
    assert store.touch("_claims/a.claim-0", b"mine") and store.mtime_ns("_claims/a.claim-0") > stamp
    assert abs(store.now("_claims/.clock") - time.time()) < 30
    store.delete("_claims/a.claim-0")
    store.delete("_claims/a.claim-0")  # already gone: fine
    assert not store.exists("_claims/a.claim-0") and not store.touch("_claims/a.claim-0", b"mine")
    with pytest.raises(FileNotFoundError):
        store.get("_claims/a.claim-0")


def claims_of(pid: int) -> list[str]:
    store = open_store("s3://bucket/expl")
    found = []
    for entry in store.list("_claims"):
        if ".claim-" not in entry:
            continue
        try:
            if json.loads(store.get(f"_claims/{entry}"))["owner"]["pid"] == pid:
                found.append(entry.split(".claim-")[0])
        except (FileNotFoundError, ValueError, KeyError, DataError):
            continue
    return found


@pytest.mark.slow
def test_bucket_job_with_killed_claim_holders_explains_every_key_once(s3, package, tmp_path):
    corpus = write_corpus(tmp_path / "c", {"test": [32] * 12})
    env = cpu_env(**s3)
    out = "s3://bucket/expl"
    cmd = [sys.executable, "-m", "eatdist", "explain", "--model", str(package), "--input", str(corpus.root),
           "--output", out, "explain.batch_size=4", "explain.num_workers=1", "explain.lease_s=3"]  # fmt: skip

    def start():
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start() for _ in range(3)]
    rng = random.Random()
    store = open_store(out)
    held: dict[int, list[str]] = {}
    deadline = time.time() + 240
    while len(held) < 2 and time.time() < deadline:
        for proc in rng.sample(procs, 3):
            names = claims_of(proc.pid) if proc.pid not in held else []
            if names:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                held[proc.pid] = [n for n in names if not store.exists(n)]
                time.sleep(rng.uniform(0.0, 0.3))
                break
        time.sleep(0.05)
    assert len(held) == 2, "two processes should die holding claims"
    survivor = next(p for p in procs if p.pid not in held)
    late = start()  # a fourth process joins the running job
    for p in (survivor, late):
        stdout, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert "testing-secret" not in stdout + err
        assert "explained 384 images from 12 shards into s3://bucket/expl" in stdout

    copy = bucket_copy("expl", tmp_path / "copy")
    finals = sorted(copy.glob("*.tar"))
    assert [p.name for p in finals] == sorted(p.name for p in corpus.root.glob("*.tar"))
    for shard in finals:  # no partial object under a final name
        assert keys([shard]) == keys([corpus.root / shard.name])
    assert keys(finals) == keys(sorted(corpus.root.glob("*.tar")))  # every key exactly once
    for pid, names in held.items():  # the killed processes' shards, completed by the others
        for name in names:
            report = json.loads((copy / "_reports" / f"{name}.json").read_text())
            assert not report["owner"].endswith(f":{pid}")
    assert not list((copy / "_claims").glob("*.claim-*")) and not list(copy.rglob("*.tmp"))
    assert json.loads((copy / "explain_summary.json").read_text())["explained"] == 384

    # the CLI, in this process: --status, evaluate and report read the bucket and write beside it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", io.StringIO())
        assert main(["explain", "--status", out]) == 0
        assert "done 12, claimed 0, failed 0, remaining 0" in sys.stdout.getvalue()
        assert main(["evaluate", "--explanations", out, "--data", str(corpus.root)]) == 0
        assert main(["report", "--explanations", out, "--out", "s3://bucket/pages/expl.html"]) == 0
    assert json.loads(store.get("evaluation.json"))["samples"] == 384
    html = open_store("s3://bucket/pages").get("expl.html").decode()
    assert "384 images explained" in html and "Class accuracy" in html


def test_every_path_option_writes_where_it_names_or_refuses_in_one_line(s3, package, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "attrs.csv").write_text("image,a\n")
    local_only = {
        "train.output_dir": lambda url: ["train", f"train.output_dir={url}"],
        "synth --out": lambda url: ["synth", "--out", url],
        "synth.out": lambda url: ["synth", f"synth.out={url}"],
        "convert --out": lambda url: ["convert", "folder", "src", "--attributes", "attrs.csv", "--out", url],
        "export --out": lambda url: ["export", "--model", str(package), "--format", "onnx", "--out", url],
        "demo --workdir": lambda url: ["demo", "--workdir", url],
    }
    through_store = {
        "explain --output": lambda url: [
            "explain",
            "--model",
            str(package),
            "--input",
            str(tmp_path / "none"),
            "--output",
            url,
        ],  # fmt: skip
        "report --out": lambda url: ["report", "--explanations", str(tmp_path / "none"), "--out", url],
        "evaluate --explanations": lambda url: ["evaluate", "--explanations", url, "--data", str(tmp_path)],
        "explain --status": lambda url: ["explain", "--status", url],
    }
    gcsfs_missing = True
    try:
        import gcsfs  # noqa: F401

        gcsfs_missing = False
    except ImportError:
        pass
    for option, argv in {**local_only, **through_store}.items():
        for url in ("s3://bucket/x", "gs://bucket/x", "foo://bucket/x"):
            if url.startswith("gs://") and option in through_store and not gcsfs_missing:
                continue  # a real Google client: nothing of it may run in a test
            code = main(argv(url))
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if "eatdist: error:" in line]
            if option in local_only:
                assert code == 2 and len(lines) == 1, (option, url, err)
                assert f"{option.split()[-1]}={url}" in lines[0] and "local" in lines[0], lines[0]
            elif url.startswith("foo://"):
                assert code == 2 and len(lines) == 1 and "foo://bucket/x" in lines[0], (option, err)
                assert "Protocol not known" in lines[0] or "foo" in lines[0]
            elif url.startswith("gs://"):
                assert code == 2 and len(lines) == 1 and "eatdist[gcs]" in lines[0], (option, err)
            else:  # s3: reached the bucket, and failed for the missing inputs or job, not the URL
                assert code in (1, 2) and "Traceback" not in err, (option, err)
                assert "local" not in "".join(lines), (option, err)
            assert "Traceback" not in err
    # never a local folder named after a scheme
    assert not [p for p in tmp_path.rglob("*") if p.name in ("s3:", "gs:", "foo:")]
    assert not [p for p in Path(REPO).iterdir() if p.name in ("s3:", "gs:", "foo:")]


def test_a_second_job_into_the_same_bucket_prefix_is_refused(s3, package, tmp_path):
    from eatdist.config import ExplainConfig
    from eatdist.explain.job import run_explain

    a = write_corpus(tmp_path / "a", {"test": [2]})
    b = write_corpus(tmp_path / "b", {"val": [2]})
    summary = run_explain(str(package), str(a.root), "s3://bucket/twice", ExplainConfig(num_workers=0))
    assert summary["explained"] == 2 and summary["output"] == "s3://bucket/twice"
    with pytest.raises(DataError, match="holds a job over 1 other input shards"):
        run_explain(str(package), str(b.root), "s3://bucket/twice", ExplainConfig(num_workers=0))
    copy = bucket_copy("twice", tmp_path / "copy")
    assert keys([copy / "test-000000.tar"]) == keys([a.root / "test-000000.tar"])
