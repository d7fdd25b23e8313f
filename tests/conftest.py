"""Shared fixtures: tiny corpora written by the project's own generator, CPU only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from eatdist.config import SynthConfig
from eatdist.data.corpus import DatasetInfo, ShardInfo
from eatdist.data.shards import AtomicShardWriter
from eatdist.data.synth import (
    _encode,
    attribute_groups,
    attribute_names,
    class_attribute_matrix,
    class_name,
    class_prototypes,
    render_sample,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
# A tiny training run: test_resnet on 32 px images, 2 loader workers, logs every 5 steps.
TINY_TRAIN = [
    "model.backbone=test_resnet",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=2",
    "data.shuffle_buffer=20",
    "train.log_every=5",
]


def write_corpus(
    root: Path,
    sizes: dict[str, list[int]],
    corrupt: dict[str, str] | None = None,
    num_classes: int = 4,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
) -> DatasetInfo:
    """Write a synthetic corpus whose shards have exactly ``sizes`` samples each.

    ``corrupt`` maps a sample key to how it is broken: "image" (undecodable bytes), "json"
    (malformed), "nojson", "attrs" (wrong attribute count).
    """
    corrupt = corrupt or {}
    cfg = SynthConfig(num_classes=num_classes, image_size=image_size, seed=seed)
    protos = class_prototypes(num_classes, seed)
    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[ShardInfo]] = {}
    for split, counts in sizes.items():
        splits[split] = []
        index = 0
        for shard_index, count in enumerate(counts):
            name = f"{split}-{shard_index:06d}.tar"
            with AtomicShardWriter(root / name) as writer:
                for _ in range(count):
                    image, record = render_sample(cfg, protos, split, index)
                    key = f"{split}_{index:07d}"
                    sample = {"__key__": key, "jpg": _encode(image, "jpg"), "json": json.dumps(record).encode()}
                    kind = corrupt.get(key)
                    if kind == "image":
                        sample["jpg"] = b"\xff\xd8 not really a jpeg"
                    elif kind == "json":
                        sample["json"] = b"{not json"
                    elif kind == "nojson":
                        del sample["json"]
                    elif kind == "attrs":
                        sample["json"] = json.dumps(dict(record, attributes=[1.0, 0.0])).encode()
                    writer.write(sample)
                    index += 1
            splits[split].append(ShardInfo(name, count))
    info = DatasetInfo(
        name="tiny",
        classes=[class_name(p) for p in protos],
        attributes=attribute_names(),
        splits=splits,
        attribute_groups=attribute_groups(),
        class_attributes=class_attribute_matrix(protos, cfg.attr_noise),
        root=root,
    )
    info.save(root)
    return info


def untrained_package(corpus: DatasetInfo, folder: Path, head_hidden: int = 0) -> Path:
    """An untrained test_resnet package over ``corpus`` (32 px): explanation mechanics need no training.
    ``head_hidden``: MLP heads of that width (maps by Grad-CAM) instead of linear ones."""
    from eatdist.models.package import PackageMeta, build_model, save_package

    model = build_model("test_resnet", {"output_stride": 16}, corpus.num_classes, corpus.num_attributes, head_hidden)
    meta = PackageMeta(
        backbone="test_resnet",
        backbone_args={"output_stride": 16},
        head_hidden=head_hidden,
        classes=corpus.classes,
        attributes=corpus.attributes,
        attribute_groups=corpus.attribute_groups,
        class_attributes=corpus.class_attributes,
        preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        dataset="tiny",
    )
    return save_package(folder / "model", model.eval(), meta)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> DatasetInfo:
    """Train 3 shards (160, 96, 64), val 2 shards, test 1 shard, 32 px."""
    return write_corpus(tmp_path_factory.mktemp("tiny"), {"train": [160, 96, 64], "val": [50, 30], "test": [40]})


def latest_state(run_dir: Path) -> dict:
    """The trainer state of a run's newest complete checkpoint."""
    found = sorted((run_dir / "checkpoints").glob("step-*/trainer_state.json"))
    assert found, f"no complete checkpoint in {run_dir}"
    return json.loads(found[-1].read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Credentials for moto's S3 server; the secret must never appear in output.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-never-printed",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3(bucket: str = "bucket") -> Iterator[dict[str, str]]:
    """Run moto's S3 server on 127.0.0.1 with an empty ``bucket`` and its client environment set;
    yield that environment (for subprocesses) and stop the server at the end."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = dict(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    # fsspec caches a file system per set of arguments: one made for another module's server (the
    # endpoint comes from the environment) must not be reused here, nor this one after it.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            import boto3

            boto3.client("s3").create_bucket(Bucket=bucket)
            yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: CPU only, one thread each, quiet warnings."""
    env = dict(os.environ)
    env.update(
        {
            "ACCELERATE_USE_CPU": "1",
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONWARNINGS": "ignore",
            "TQDM_DISABLE": "1",
        }
    )
    env.update(extra)
    return env


def accelerate_launch(args: list[str], processes: int = 2) -> list[str]:
    """The command a user types: ``accelerate launch --multi_gpu --num_processes N -m eatdist ...``."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "eatdist",
        *args,
    ]


def descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to the end; past ``timeout`` every process of it prints its threads' stacks, then fails."""
    env = dict(env or cpu_env(), PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # faulthandler answers SIGABRT with every thread's stack: where a hung run stood
        for pid in [*descendants(proc.pid), proc.pid]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in [*descendants(proc.pid), proc.pid]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate()
        print(out[-4000:])
        print(err[-20000:])
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if result.returncode != 0:
        print(result.stdout[-4000:])
        print(result.stderr[-4000:])
    return result


@pytest.fixture(scope="session", autouse=True)
def _clear_stale_extension_locks() -> None:
    """A run killed while DeepSpeed JIT-compiled an op leaves a lock that hangs later builds."""
    import time

    for lock in (REPO / ".torch_extensions").glob("*/lock"):
        built = any(lock.parent.glob("*.so"))
        if not built and time.time() - lock.stat().st_mtime > 120:
            lock.unlink(missing_ok=True)


@pytest.fixture
def mount(tmp_path):
    """mount(size_mib, read_only=False) -> a fresh tmpfs folder; skipped where mount is not allowed."""
    mounted = []

    def make(mib=1, read_only=False):
        folder = tmp_path / f"mnt{len(mounted)}"
        folder.mkdir()
        options = f"size={mib}m" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
