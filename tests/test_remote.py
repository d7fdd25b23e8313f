"""Corpora from anywhere: real HTTP and S3-compatible servers on 127.0.0.1, flaky, missing and cut shards.

The HTTP server is a threaded ``http.server`` that honours Range requests, counts the bytes it
sends, can drop the connection mid-body for the first N requests of a path, and answers 404 for
a removed shard. The S3 server is moto's, read through s3fs. Both listen on a free port and are
stopped by their fixture.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import webdataset as wds

from conftest import TINY_TRAIN, accelerate_launch, cpu_env, moto_s3, run, untrained_package, write_corpus
from eatdist.data.check import check_corpus
from eatdist.data.corpus import load_dataset_info
from eatdist.data.inputs import resolve_shards
from eatdist.data.remote import redact
from eatdist.data.shardindex import INDEX_SUFFIX, load_index
from eatdist.data.shards import AtomicShardWriter, iter_shard
from eatdist.errors import DataError

SIZES = {"train": [40, 24, 16], "val": [12, 8], "test": [10]}


# ----------------------------------------------------------------------------- servers


class ShardServer(ThreadingHTTPServer):
    """Serves ``root`` over HTTP/1.1 with Range support, byte counting and injected failures."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()  # body bytes per path
        self.requests: Counter[str] = Counter()
        self.drops: dict[str, int] = {}  # path -> how many more requests to cut mid-body
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.sent.clear()
            self.requests.clear()
            self.drops.clear()


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ShardServer

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, directory=str(kwargs.pop("directory", None) or "."), **kwargs)

    def translate_path(self, path: str) -> str:
        return str(self.server.root / unquote(urlparse(path).path).lstrip("/"))

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = urlparse(self.path).path
        file = Path(self.translate_path(self.path))
        if file.is_dir():
            # Directory listings (links) let fsspec list a prefix.
            return super().do_GET() if body else super().do_HEAD()
        if not file.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        data = file.read_bytes()
        status, lo, hi = HTTPStatus.OK, 0, len(data)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            lo = int(match.group(1))
            hi = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Length", str(hi - lo))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        with self.server.lock:
            self.server.requests[path] += 1
            drop = self.server.drops.get(path, 0) > 0
            if drop:
                self.server.drops[path] -= 1
        chunk = data[lo:hi]
        if drop:
            # Half the promised body, then the connection goes: a transient failure mid-file.
            chunk = chunk[: len(chunk) // 2]
        self.wfile.write(chunk)
        with self.server.lock:
            self.server.sent[path] += len(chunk)
        if drop:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShardServer]:
    """An HTTP server over a folder holding ``corpus/`` (a tiny synthetic corpus)."""
    root = tmp_path_factory.mktemp("www")
    write_corpus(root / "corpus", SIZES)
    server = ShardServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def http(served: ShardServer) -> ShardServer:
    served.reset()
    return served


@pytest.fixture(scope="module")
def s3(served: ShardServer) -> Iterator[dict[str, str]]:
    """moto's S3 server with ``s3://bucket/corpus`` (the same corpus); yields the client environment."""
    with moto_s3() as env:
        import boto3

        client = boto3.client("s3")
        for file in sorted((served.root / "corpus").iterdir()):
            client.upload_file(str(file), "bucket", f"corpus/{file.name}")
        yield env


def keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def local_samples(served: ShardServer, name: str) -> list[dict]:
    return list(iter_shard(served.root / "corpus" / name))


# ----------------------------------------------------------------------------- unit behaviour


def test_credentials_never_shown():
    assert redact("https://alice:s3cr3t@host/c/x.tar") == "https://host/c/x.tar"
    signed = "https://bucket.s3.amazonaws.com/x.tar?X-Amz-Credential=AK&X-Amz-Signature=abc"
    assert "Signature" not in redact(signed) and "AK" not in redact(signed)
    assert redact("pipe:curl -s https://u:p@h/x.tar?sig=1 | cat") == "pipe:curl -s https://h/x.tar?… | cat"


def test_seek_reads_only_the_bytes_of_its_samples(http):
    url = f"{http.url}/corpus/train-000000.tar"
    whole = local_samples(http, "train-000000.tar")
    got = list(iter_shard(url, 25, 31))
    assert got == whole[25:31]
    index = json.loads((http.root / "corpus" / f"train-000000.tar{INDEX_SUFFIX}").read_text())
    assert http.sent["/corpus/train-000000.tar"] == index["offsets"][31] - index["offsets"][25]
    # the whole shard, from its start, through the same reader
    assert list(iter_shard(url)) == whole


def test_flaky_server_gives_the_same_samples_exactly_once(http):
    name = "train-000001.tar"
    http.drops[f"/corpus/{name}"] = 2
    assert list(iter_shard(f"{http.url}/corpus/{name}", retries=3)) == local_samples(http, name)
    assert http.requests[f"/corpus/{name}"] >= 3
    # and mid-shard, through the index
    http.drops[f"/corpus/{name}"] = 2
    assert list(iter_shard(f"{http.url}/corpus/{name}", 5, 20, retries=3)) == local_samples(http, name)[5:20]


def test_a_server_that_keeps_failing_is_named(http):
    name = "train-000002.tar"
    http.drops[f"/corpus/{name}"] = 100
    url = f"http://bob:hunter2@127.0.0.1:{http.server_address[1]}/corpus/{name}"
    with pytest.raises(DataError) as err:
        list(iter_shard(url, retries=1))
    assert f"127.0.0.1:{http.server_address[1]}/corpus/{name}" in str(err.value)
    assert "hunter2" not in str(err.value) and "bob" not in str(err.value)


def test_missing_remote_shard_is_named(http):
    with pytest.raises(DataError, match=r"/corpus/gone-000000.tar.*not found"):
        list(iter_shard(f"{http.url}/corpus/gone-000000.tar"))


def cut_copy(src: Path, dst: Path, inside_sample: int, extra: int = 700) -> int:
    """Copy ``src`` cut ``extra`` bytes into sample ``inside_sample`` (its index is not copied)."""
    offsets = json.loads(Path(f"{src}{INDEX_SUFFIX}").read_text())["offsets"]
    dst.write_bytes(src.read_bytes()[: offsets[inside_sample] + extra])
    return offsets[inside_sample] + extra


@pytest.mark.parametrize("where", ["local", "http"])
def test_truncated_shard_yields_every_complete_sample(http, tmp_path, where):
    src = http.root / "corpus" / "train-000000.tar"
    whole = list(iter_shard(src))
    folder = tmp_path if where == "local" else http.root / "cut"
    folder.mkdir(exist_ok=True)
    cut_copy(src, folder / "cut.tar", inside_sample=17)
    url = str(folder / "cut.tar") if where == "local" else f"{http.url}/cut/cut.tar"
    for start in (0, 4):
        got = []
        with pytest.raises(DataError, match=rf"truncated.*read {17 - start} complete samples"):
            for sample in iter_shard(url, start, retries=1):
                got.append(sample)
        assert got == whole[start:17]  # including sample 16, the last complete one


def test_sample_count_mismatch_is_reported(tmp_path, caplog):
    info = write_corpus(tmp_path / "c", {"train": [16, 8]})
    data = json.loads((tmp_path / "c" / "dataset.json").read_text())
    data["splits"]["train"][0]["samples"] = 8  # the shard holds 16
    (tmp_path / "c" / "dataset.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        load_dataset_info(tmp_path / "c").shard_paths("train")
    assert "train-000000.tar holds 16 samples, dataset.json lists 8" in caplog.text
    report = check_corpus(info.root, progress=False)
    assert not report.ok and "train-000000.tar: holds 16 samples, dataset.json lists 8" in report.summary()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(list(iter_shard(tmp_path / "c" / "train-000001.tar", 0, 10, listed=10))) == 8
    assert "holds 8 samples, dataset.json lists 10" in caplog.text


def test_keys_with_dots_are_refused_and_named(tmp_path):
    with pytest.raises(DataError, match=r"key 'img\.001' contains a dot.*'img'"):
        with AtomicShardWriter(tmp_path / "w.tar") as writer:
            writer.write({"__key__": "img.001", "jpg": b"x"})
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
    # a shard written by another tool: check names the cause, not "no json"
    info = write_corpus(tmp_path / "c", {"train": [4]})
    shard = tmp_path / "c" / "train-000000.tar"
    samples = list(iter_shard(shard))
    shard.unlink()
    Path(f"{shard}{INDEX_SUFFIX}").unlink()
    with open(shard, "wb") as f, wds.TarWriter(f) as tar:
        for i, s in enumerate(samples):
            tar.write({"__key__": f"img.{i:03d}", "jpg": s["jpg"], "json": s["json"]})
    summary = check_corpus(info.root, progress=False).summary()
    assert "keys with a dot" in summary and "img.000.jpg" in summary


def test_index_is_built_and_cached_for_shards_without_one(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c", {"train": [30]})
    shard = tmp_path / "c" / "train-000000.tar"
    written = json.loads(Path(f"{shard}{INDEX_SUFFIX}").read_text())
    Path(f"{shard}{INDEX_SUFFIX}").unlink()
    assert [s["__key__"] for s in iter_shard(shard, 28)] == ["train_0000028", "train_0000029"]
    assert json.loads(Path(f"{shard}{INDEX_SUFFIX}").read_text()) == written
    # where nothing can be written beside the shard (here a folder holds the index's name, which
    # works even as root), the index goes to the user cache
    Path(f"{shard}{INDEX_SUFFIX}").unlink()
    Path(f"{shard}{INDEX_SUFFIX}").mkdir()
    monkeypatch.setenv("EATDIST_CACHE_DIR", str(tmp_path / "cache"))
    assert load_index(str(shard)).offsets == written["offsets"]
    assert len(list((tmp_path / "cache").rglob(f"*{INDEX_SUFFIX}"))) == 1
    assert [s["__key__"] for s in iter_shard(shard, 29)] == ["train_0000029"]


def test_resolve_shards_names_anything(http, tmp_path):
    corpus = http.root / "corpus"
    local = sorted(str(p) for p in corpus.glob("*.tar"))
    assert resolve_shards(str(corpus)) == local
    assert resolve_shards(str(corpus / "train-*.tar")) == local[1:4]
    assert resolve_shards(str(corpus / "train-{000000..000001}.tar")) == local[1:3]
    assert resolve_shards([local[0], str(corpus / "val-*.tar")]) == [local[0], *local[4:]]
    urls = [f"{http.url}/corpus/{Path(p).name}" for p in local]
    assert resolve_shards(f"{http.url}/corpus/train-{{000000..000002}}.tar") == urls[1:4]
    assert resolve_shards(f"{http.url}/corpus/") == urls
    pipe = f"pipe:cat {local[0]}"
    assert resolve_shards([pipe, urls[1]]) == sorted([pipe, urls[1]])
    with pytest.raises(DataError, match="same name"):
        resolve_shards([local[0], urls[0]])
    with pytest.raises(DataError, match="no input shards match"):
        resolve_shards(str(tmp_path / "none-*.tar"))


def test_remote_corpus_description_and_check(http, s3):
    for root in (f"{http.url}/corpus", "s3://bucket/corpus", f"pipe:cat {http.root}/corpus/dataset.json"):
        info = load_dataset_info(root)
        assert info.num_samples("train") == 80
        paths = info.shard_paths("train")
        assert list(iter_shard(paths[1], 3, 6)) == local_samples(http, "train-000001.tar")[3:6]
    report = check_corpus(f"{http.url}/corpus", progress=False)
    assert report.ok, report.summary()
    with pytest.raises(DataError, match=r"no dataset.json found at http://127.0.0.1:\d+/nothing/dataset.json"):
        load_dataset_info(f"{http.url}/nothing")


def test_s3_reads_seek_with_the_index(s3, http):
    got = list(iter_shard("s3://bucket/corpus/train-000000.tar", 30, 40))
    assert got == local_samples(http, "train-000000.tar")[30:40]
    with pytest.raises(DataError, match="s3://bucket/corpus/nope.tar"):
        list(iter_shard("s3://bucket/corpus/nope.tar"))


# ----------------------------------------------------------------------------- acceptance: real runs

TRAIN = [*TINY_TRAIN, "train.epochs=1"]


def rank0(out: Path) -> dict:
    return json.loads((out / "ranks" / "rank-0.json").read_text())


@pytest.mark.slow
def test_two_process_training_over_flaky_http_equals_local(http, tmp_path):
    local_out, remote_out = tmp_path / "local", tmp_path / "remote"
    corpus = http.root / "corpus"
    assert (
        run(accelerate_launch(["train", *TRAIN, f"data.root={corpus}", f"train.output_dir={local_out}"])).returncode
        == 0
    )
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        http.drops[f"/corpus/{name}"] = 1  # each first request of these is cut mid-body
    result = run(accelerate_launch(["train", *TRAIN, f"data.root={http.url}/corpus", f"train.output_dir={remote_out}"]))
    assert result.returncode == 0
    assert rank0(remote_out)["parameter_sha256"] == rank0(local_out)["parameter_sha256"]
    assert sum(http.requests.values()) > 0 and all(v == 0 for v in http.drops.values())


@pytest.mark.slow
def test_missing_shard_is_named_counted_and_ranks_stay_equal(http, tmp_path):
    # a copy of the corpus with one training shard removed (404)
    shutil.copytree(http.root / "corpus", http.root / "holed")
    (http.root / "holed" / "train-000002.tar").unlink()
    out = tmp_path / "run"
    result = run(accelerate_launch(["train", *TRAIN, f"data.root={http.url}/holed", f"train.output_dir={out}"]))
    assert result.returncode == 0
    assert "holed/train-000002.tar" in result.stdout + result.stderr
    reports = [json.loads((out / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert reports[0]["steps_per_epoch"] == reports[1]["steps_per_epoch"]
    final = json.loads((out / "final_metrics.json").read_text())
    skipped = final.get("train_skipped", final.get("train_skipped_total"))
    assert skipped is not None and skipped > 0, final


@pytest.fixture(scope="module")
def package(served: ShardServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained package over the served corpus: where the shards come from needs no training."""
    return untrained_package(load_dataset_info(served.root / "corpus"), tmp_path_factory.mktemp("model"))


def explained_keys(folder: Path) -> Counter[str]:
    return Counter(s["__key__"] for p in sorted(folder.glob("*.tar")) for s in iter_shard(p))


@pytest.mark.slow
def test_training_and_explanation_from_s3(s3, http, tmp_path):
    env = cpu_env(**s3)
    out = tmp_path / "run"
    args = ["train", *TRAIN, "data.num_workers=1", "data.root=s3://bucket/corpus", f"train.output_dir={out}"]
    result = run([sys.executable, "-m", "eatdist", *args], env=env)
    assert result.returncode == 0
    assert "testing-secret" not in result.stdout + result.stderr
    expl = tmp_path / "expl"
    cmd = [sys.executable, "-m", "eatdist", "explain", "--model", str(out / "model"),
           "--input", "s3://bucket/corpus/val-*.tar", "--output", str(expl)]  # fmt: skip
    assert run(cmd, env=env).returncode == 0
    want = Counter(s["__key__"] for n in ("val-000000.tar", "val-000001.tar") for s in local_samples(http, n))
    assert explained_keys(expl) == want


@pytest.mark.slow
def test_explanation_from_http_urls_and_a_pipe(http, package, tmp_path):
    http.drops["/corpus/val-000001.tar"] = 1
    for name, item in (
        ("urls", f"{http.url}/corpus/val-{{000000..000001}}.tar"),
        ("pipe", f"pipe:cat {http.root / 'corpus' / 'test-000000.tar'}"),
    ):
        cmd = [sys.executable, "-m", "eatdist", "explain", "--model", str(package),
               "--input", item, "--output", str(tmp_path / name)]  # fmt: skip
        assert run(cmd).returncode == 0
    want = Counter(s["__key__"] for n in ("val-000000.tar", "val-000001.tar") for s in local_samples(http, n))
    assert explained_keys(tmp_path / "urls") == want
    assert explained_keys(tmp_path / "pipe") == Counter(keys(local_samples(http, "test-000000.tar")))
