"""Run inside a private PID and network namespace by tests/test_explain_ray.py: a local Ray cluster
(a head and two worker nodes on 127.0.0.1), moto's S3 server, and ``eatdist explain --engine ray
--output s3://bucket/expl`` twice: the first run loses an actor mid-shard and then its driver,
the rerun loses a worker node; then two shards through Ray Client (``ray://``) into a folder, and
two more by a driver that starts a local Ray cluster of its own (no address).
Writes what it saw to a JSON file; the test asserts on it and on the output shards. Every
process ends with the namespace.

usage: python ray_cluster_job.py SPEC.json   (SPEC: package, corpus, work, result, ray_temp)
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes() -> dict[int, str]:
    """pid → command line of every process in this namespace."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return found


def raylets() -> set[int]:
    return {pid for pid, cmd in processes().items() if "/raylet " in cmd or cmd.startswith("raylet")}


def explaining_actors() -> list[int]:
    """Actors running a shard now (Ray names the process after the method it runs)."""
    return [pid for pid, cmd in processes().items() if cmd.startswith("ray::ShardActor.explain")]


def actors() -> list[int]:
    return [pid for pid, cmd in processes().items() if cmd.startswith("ray::ShardActor")]


def wait_until(check, timeout: float, step: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    return None


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TQDM_DISABLE="1",
        # no token auth: a private test cluster, whatever ~/.ray/auth_token another Ray run left
        RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret", AWS_DEFAULT_REGION="us-east-1",
        # a lost node is declared dead in about a second, not thirty
        RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3",
        RAY_health_check_initial_delay_ms="0",
    )  # fmt: skip
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    from moto.server import ThreadedMotoServer

    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{s3_port}"
    os.environ.update(env)
    import boto3
    import fsspec

    boto3.client("s3").create_bucket(Bucket="bucket")

    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = spec["ray_temp"]  # short: Ray's socket paths have a length limit
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    client_port = free_port()  # Ray Client's server on the head: ray://127.0.0.1:client_port
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard=false",
                    "--ray-client-server-port", str(client_port), *node], env=env, check=True,
                   capture_output=True)  # fmt: skip
    before = raylets()
    subprocess.run([RAY, "start", "--address", address, *node], env=env, check=True, capture_output=True)
    subprocess.run([RAY, "start", "--address", address, *node], env=env, check=True, capture_output=True)
    worker_nodes = raylets() - before
    env["RAY_ADDRESS"] = address
    result: dict = {"nodes_started": 3}

    def explain(output: str, log: Path, inputs: str = spec["corpus"], *extra: str, environ=env) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "eatdist", "explain", "--engine", "ray", "--model", spec["package"], "--input",
               inputs, "--output", output, "explain.batch_size=4", "explain.num_workers=0",
               # every picture: shards long enough for the kills below to land while actors work
               "explain.outputs=[json, txt, heatmaps.npy, image, overlay, attr_maps]", *extra]  # fmt: skip
        return subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)

    def finish(proc: subprocess.Popen, log: Path) -> dict:
        out, _ = proc.communicate(timeout=300)
        return {"rc": proc.returncode, "stdout": out, "stderr": log.read_text()[-6000:]}

    fs = fsspec.filesystem("s3")

    def published(prefix: str) -> dict[str, str]:
        """Output shards under s3://bucket/PREFIX → their Last-Modified."""
        fs.invalidate_cache()
        found = fs.ls(f"bucket/{prefix}", detail=True) if fs.exists(f"bucket/{prefix}") else []
        return {e["name"].rsplit("/", 1)[-1]: str(e["LastModified"]) for e in found if e["name"].endswith(".tar")}

    def copy_bucket(prefix: str, into: Path) -> None:
        fs.invalidate_cache()
        for key in fs.find(f"bucket/{prefix}"):
            target = into / key[len(f"bucket/{prefix}/") :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fs.cat_file(key))

    work = Path(spec["work"])
    rng = random.Random()

    # First run: an actor SIGKILLed while it explains a shard, later the driver SIGKILLed.
    clock = time.monotonic()
    log = work / "first.log"
    proc = explain("s3://bucket/expl", log)
    victim = wait_until(explaining_actors, 240)
    if victim:
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(victim[0], signal.SIGKILL)
    requeued = wait_until(lambda: "goes back to the queue" in log.read_text(), 120) is not None
    wait_until(lambda: len(published("expl")) >= 3, 240)
    proc.kill()
    proc.wait()
    gone = wait_until(lambda: not actors(), 60, 0.2) is not None  # the driver's actors die with it
    done = published("expl")
    result["first"] = {"victim": bool(victim), "requeued": requeued, "stderr": log.read_text()[-6000:],
                       "done_at_kill": done, "actors_gone": gone, "seconds": time.monotonic() - clock}  # fmt: skip

    # The same command again; a worker node with one of its actors lost while it runs (its raylet killed, and
    # the processes it started with it).
    clock = time.monotonic()
    log = work / "rerun.log"
    old = set(actors())  # a first-run actor still ending is not the rerun's
    proc = explain("s3://bucket/expl", log)

    def on_worker_nodes(pids: list[int]) -> list[tuple[int, int]]:
        """(actor, its node's raylet) for the rerun's actors on a worker node, the raylet read now."""
        return [(p, r) for p in pids if p not in old and (r := _parent(p)) in worker_nodes]

    # a worker node that holds one of the job's actors, killed while the job runs: as soon as that
    # actor explains a shard, or a second after it appeared (a short job may end before it explains)
    started = wait_until(lambda: on_worker_nodes(actors()), 120)
    appeared = time.monotonic() - clock
    busy = wait_until(lambda: on_worker_nodes(explaining_actors()), 1, 0.005) if started else None
    _, raylet = (busy or started or [(None, min(worker_nodes))])[0]
    running = proc.poll() is None
    children = [p for p in processes() if _parent(p) == raylet]
    for pid in (raylet, *children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lost = {"actor_on_lost_node": bool(started), "running_when_killed": running, "explaining_when_killed": bool(busy),
            "killed_processes": 1 + len(children), "actor_appeared_s": appeared}  # fmt: skip
    result["rerun"] = finish(proc, log) | lost | {"seconds": time.monotonic() - clock}
    result["after"] = published("expl")
    status = subprocess.run([sys.executable, "-m", "eatdist", "explain", "--status", "s3://bucket/expl"],
                            env=env, capture_output=True, text=True)  # fmt: skip
    result["status"] = {"rc": status.returncode, "stdout": status.stdout}
    copy_bucket("expl", work / "copy")

    # Through Ray Client (explain.ray_address=ray://...), into a local folder: two shards.
    clock = time.monotonic()
    log = work / "client.log"
    client = explain(str(work / "client-out"), log, str(Path(spec["corpus"]) / "test-00000[01].tar"),
                     f"explain.ray_address=ray://127.0.0.1:{client_port}")  # fmt: skip
    result["client"] = finish(client, log) | {"seconds": time.monotonic() - clock}
    if result["client"]["rc"] != 0:  # Ray Client's server logs say why; the temp folder goes with the test
        logs = sorted(Path(temp).glob("session_latest/logs/ray_client_server*"))
        result["client"]["stderr"] += "".join(f"\n== {p.name}\n" + p.read_text()[-3000:] for p in logs)

    # No address at all: the driver starts a Ray cluster of its own (this one stopped first, so
    # the two cores are free), explains two shards into a folder, and takes it down on exit.
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    alone = {k: v for k, v in env.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": f"{temp}/own"}
    clock = time.monotonic()
    log = work / "local.log"
    (work / "local-out").mkdir()
    (work / "local-out" / ".test-000002.tar.0123abcd.tmp").write_bytes(b"left by a writer killed mid-way")
    local = explain(str(work / "local-out"), log, str(Path(spec["corpus"]) / "test-00000[23].tar"), environ=alone)
    result["local"] = finish(local, log) | {"seconds": time.monotonic() - clock}
    result["local"]["left"] = [c for c in processes().values() if "raylet" in c or "gcs_server" in c]

    Path(spec["result"]).write_text(json.dumps(result))
    s3.stop()


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


if __name__ == "__main__":
    main()
