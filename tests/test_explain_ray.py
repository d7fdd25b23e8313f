"""The ray engine on a real local Ray cluster: a head and two worker nodes on 127.0.0.1.

The cluster, moto's S3 server and the jobs run inside a private PID and network namespace
(``unshare``, root only), so Ray finds 127.0.0.1 without probing a public address and every Ray
process ends with the namespace. ``tests/ray_cluster_job.py`` runs the jobs there once per module
(an actor SIGKILLed mid-shard, then the driver SIGKILLed; the command rerun, losing a worker node);
the tests below check what it saw and the output shards it left.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

import pytest

from conftest import REPO, untrained_package, write_corpus
from eatdist.config import ExplainConfig
from eatdist.data.shards import AtomicShardWriter, iter_shard
from eatdist.explain.ray_engine import actor_shape
from eatdist.store.local import LocalStore

SHARDS, PER_SHARD = 12, 16


def can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "--net", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    pytest.importorskip("ray")
    pytest.importorskip("moto.server")
    if not can_unshare():
        pytest.skip("needs root and unshare(1) for a private network namespace")
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), {"test": [PER_SHARD] * SHARDS})
    package = untrained_package(corpus, tmp_path_factory.mktemp("pkg"))
    work = tmp_path_factory.mktemp("ray")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    spec = {"package": str(package), "corpus": str(corpus.root), "work": str(work),
            "result": str(work / "result.json"), "ray_temp": temp}  # fmt: skip
    (work / "spec.json").write_text(json.dumps(spec))
    script = f"ip link set lo up && exec {sys.executable} {REPO / 'tests' / 'ray_cluster_job.py'} {work / 'spec.json'}"
    try:
        run = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "--net", "bash", "-c", script],
                             cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((work / "result.json").read_text()), corpus, work


def keys(paths):
    return Counter(s["__key__"] for p in paths for s in iter_shard(p))


def test_actor_shapes_follow_the_cluster():
    cfg = ExplainConfig(num_workers=2)
    assert actor_shape(cfg, {"CPU": 16.0}, 100) == (5, 3.0, 0.0)  # a core each plus its loader workers
    assert actor_shape(cfg, {"CPU": 64.0, "GPU": 8.0}, 100) == (8, 3.0, 1.0)
    assert actor_shape(ExplainConfig(ray_gpus_per_actor=0.5), {"CPU": 64.0, "GPU": 2.0}, 3) == (3, 3.0, 0.5)
    assert actor_shape(ExplainConfig(ray_actors=2), {"CPU": 64.0}, 100)[0] == 2


def test_a_folders_leftovers_of_killed_writers_are_found_from_one_listing(tmp_path):
    store = LocalStore(tmp_path)
    killed = AtomicShardWriter(tmp_path / "test-000001.tar")  # a writer killed mid-way: never closed
    killed.write({"__key__": "a", "json": b"{}"})
    assert killed.tmp_path.exists()
    (tmp_path / ".test-000003.tar.idx.0123abcd.tmp").write_bytes(b"")  # an index being written
    (tmp_path / ".test-000004.tar2.0123abcd.tmp").write_bytes(b"")  # another shard's name
    (tmp_path / "test-000002.tar").write_bytes(b"")
    names = {f"test-00000{i}.tar" for i in range(1, 5)}
    assert store.partial_among(names, store.list("")) == {"test-000001.tar", "test-000003.tar"}
    for name in ("test-000001.tar", "test-000003.tar"):
        store.clean_partial(name)
    assert store.partial_among(names, store.list("")) == set()
    assert (tmp_path / ".test-000004.tar2.0123abcd.tmp").exists()


@pytest.mark.slow
def test_killed_actor_and_killed_driver_leave_only_unfinished_shards_to_the_rerun(cluster_run):
    result, corpus, work = cluster_run
    first, rerun = result["first"], result["rerun"]
    assert first["victim"] and first["requeued"], first["stderr"]  # the killed actor's shard went back
    done = first["done_at_kill"]
    assert 3 <= len(done) < SHARDS, "the driver should die mid-job"
    assert first["actors_gone"]  # its actors went with it
    assert rerun["rc"] == 0, rerun["stderr"]
    left = (SHARDS - len(done)) * PER_SHARD
    assert f"explaining {SHARDS - len(done)} of {SHARDS} shards" in rerun["stderr"]
    assert f"explained {SHARDS * PER_SHARD} images from {SHARDS} shards into s3://bucket/expl" in rerun["stdout"]
    assert f"({left} by this process)" in rerun["stdout"]  # only the shards not finished before
    assert {name: result["after"][name] for name in done} == done  # finished shards were not written again
    assert "testing-secret" not in first["stderr"] + rerun["stderr"] + rerun["stdout"]


@pytest.mark.slow
def test_every_key_once_in_the_bucket_after_a_lost_worker_node(cluster_run):
    result, corpus, work = cluster_run
    rerun = result["rerun"]
    # the node held one of the job's actors and went while the job ran
    seen = {k: rerun[k] for k in ("actor_on_lost_node", "running_when_killed", "killed_processes", "actor_appeared_s")}
    seen |= {"rerun_s": rerun["seconds"], "done_before_rerun": len(result["first"]["done_at_kill"])}  # why, if not
    assert rerun["actor_on_lost_node"] and rerun["running_when_killed"] and rerun["killed_processes"] >= 1, seen
    assert rerun["rc"] == 0, rerun["stderr"]
    assert result["status"]["rc"] == 0 and f"done {SHARDS}, claimed 0" in result["status"]["stdout"]
    copy = work / "copy"
    assert sorted(p.name for p in copy.glob("*.tar")) == sorted(p.name for p in corpus.root.glob("*.tar"))
    for shard in copy.glob("*.tar"):  # no partial object under a final name
        assert keys([shard]) == keys([corpus.root / shard.name])
    assert keys(sorted(copy.glob("*.tar"))) == keys(sorted(corpus.root.glob("*.tar")))  # every key exactly once
    assert not list(copy.glob("_claims/*")) and not list(copy.rglob("*.tmp"))
    assert json.loads((copy / "explain_summary.json").read_text())["explained"] == SHARDS * PER_SHARD


def explained_two_shards(run, out, pattern):
    assert run["rc"] == 0, run["stderr"]
    assert f"explained {2 * PER_SHARD} images from 2 shards" in run["stdout"]
    assert keys(sorted(out.glob("*.tar"))) == keys(sorted(pattern))  # every key once


@pytest.mark.slow
def test_a_driver_joins_through_ray_client(cluster_run):
    result, corpus, work = cluster_run
    explained_two_shards(result["client"], work / "client-out", corpus.root.glob("test-00000[01].tar"))


@pytest.mark.slow
def test_a_driver_without_an_address_starts_its_own_cluster(cluster_run):
    result, corpus, work = cluster_run
    explained_two_shards(result["local"], work / "local-out", corpus.root.glob("test-00000[23].tar"))
    assert not result["local"]["left"]  # the cluster it started ends with it
    # what a writer killed in an earlier run left is found in the first listing and cleaned
    assert not list((work / "local-out").rglob("*.tmp"))
