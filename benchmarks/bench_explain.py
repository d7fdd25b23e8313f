"""What explanation costs beyond plain inference, measured in one run against that baseline.

For each (backbone, image size): a synthetic corpus and an untrained model package, then rounds
that alternate between
  plain     read, decode, transform (in the same DataLoader workers) and forward, nothing kept
  explain   the explanation job: the same, plus top-k, maps, json/text/npy/overlay, tar writing
on the same shards, batch size and workers. Prints medians over the rounds: images/s (wall) and
CPU ms per image (this process and its workers), their ratios, explain's time split, and the
main process's peak memory early in a run against the end of it (flat when equal).
Not a test: timings depend on the machine.

    python benchmarks/bench_explain.py [--cases test_resnet:64:512,resnet18:224:192,resnet50:224:96]
        [--workers 0,2] [--batch 32] [--rounds 3] [--bf16] [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from eatdist import dist
from eatdist.config import ExplainConfig, SynthConfig
from eatdist.data.corpus import DatasetInfo, ShardInfo
from eatdist.data.shards import AtomicShardWriter
from eatdist.data.synth import (
    _encode,
    attribute_names,
    class_attribute_matrix,
    class_name,
    class_prototypes,
    render_sample,
)
from eatdist.explain.explainer import Explainer
from eatdist.explain.job import ExplainJob, resolve_inputs
from eatdist.explain.loader import ShardChunks, make_loader, shutdown
from eatdist.models.package import PackageMeta, build_model, load_package, save_package

SHARD = 64


def write_corpus(root: Path, images: int, size: int) -> DatasetInfo:
    cfg = SynthConfig(num_classes=12, image_size=size)
    protos = class_prototypes(cfg.num_classes, 0)
    shards, index = [], 0
    root.mkdir(parents=True)
    while index < images:
        name, count = f"test-{len(shards):06d}.tar", min(SHARD, images - index)
        with AtomicShardWriter(root / name) as writer:
            for _ in range(count):
                image, record = render_sample(cfg, protos, "test", index)
                writer.write(
                    {"__key__": f"test_{index:07d}", "jpg": _encode(image, "jpg"), "json": json.dumps(record).encode()}
                )
                index += 1
        shards.append(ShardInfo(name, count))
    info = DatasetInfo(
        name="bench",
        classes=[class_name(p) for p in protos],
        attributes=attribute_names(),
        splits={"test": shards},
        class_attributes=class_attribute_matrix(protos, cfg.attr_noise),
        root=root,
    )
    info.save(root)
    return info


def make_package(folder: Path, backbone: str, size: int, info: DatasetInfo) -> Path:
    model = build_model(backbone, {}, info.num_classes, info.num_attributes)
    meta = PackageMeta(
        backbone=backbone,
        backbone_args={},
        classes=info.classes,
        attributes=info.attributes,
        class_attributes=info.class_attributes,
        dataset="bench",
        preprocess={"image_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    )
    return save_package(folder / f"{backbone}-{size}", model.eval(), meta)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader workers, once shut down)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def plain(explainer: Explainer, inputs: list[str], cfg: ExplainConfig) -> int:
    dataset = ShardChunks(explainer.transform, cfg.batch_size)
    loader = make_loader(dataset, cfg.num_workers, pin_memory=explainer.on_gpu)
    count = 0
    with torch.inference_mode():
        for url in inputs:
            dataset.select(url)
            for chunk in loader:
                explainer.forward(chunk.pixels)
                count += len(chunk.keys)
    if explainer.on_gpu:
        torch.cuda.synchronize()
    shutdown(loader)  # reaps the workers, so their CPU time is counted
    return count


def explain(explainer: Explainer, inputs: list[str], cfg: ExplainConfig, out: Path, rss: list[float]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            rss.append(rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    job = ExplainJob(explainer, inputs, out, cfg)
    try:
        job.run()
    finally:
        job.close()
        stop.set()
        sampler.join()
    return asdict(job.timings)


def bench_case(backbone: str, size: int, images: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    info = write_corpus(tmp / f"corpus-{size}-{images}", images, size)
    inputs = resolve_inputs(str(info.root))
    package = make_package(tmp, backbone, size, info)
    model, meta = load_package(package, dist.device())
    rows = []
    for workers in args.workers:
        cfg = ExplainConfig(
            batch_size=args.batch, num_workers=workers, bf16=args.bf16, channels_last=args.channels_last
        )
        explainer = Explainer(model, meta, cfg, dist.device())
        plain(explainer, inputs[:1], cfg)  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "explain": []}
        splits, rss_early, rss_late = [], [], []
        for r in range(args.rounds):
            for kind in ("plain", "explain") if r % 2 == 0 else ("explain", "plain"):
                wall, cpu = time.perf_counter(), cpu_seconds()
                if kind == "plain":
                    plain(explainer, inputs, cfg)
                else:
                    rss: list[float] = []
                    splits.append(explain(explainer, inputs, cfg, tmp / "out", rss))
                    if len(rss) >= 4:
                        rss_early.append(max(rss[: len(rss) // 4]))
                        rss_late.append(max(rss))
                runs[kind].append((time.perf_counter() - wall, cpu_seconds() - cpu))
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
        split = {k: statistics.median(s[k] for s in splits) / images * 1e3 for k in splits[0]}
        rows.append(
            {
                "case": f"{backbone} {size}px",
                "workers": workers,
                "images": images,
                "plain_ips": images / med["plain"][0],
                "explain_ips": images / med["explain"][0],
                "plain_cpu_ms": med["plain"][1] / images * 1e3,
                "explain_cpu_ms": med["explain"][1] / images * 1e3,
                "split_ms": split,
                "rss_early": max(rss_early, default=0.0),
                "rss_late": max(rss_late, default=0.0),
            }
        )
        print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    tput = row["explain_ips"] / row["plain_ips"]
    cpu = row["explain_cpu_ms"] / row["plain_cpu_ms"]
    split = " ".join(f"{k} {v:.2f}" for k, v in row["split_ms"].items())
    print(
        f"{row['case']:<18} w={row['workers']} n={row['images']:<4} | plain {row['plain_ips']:7.1f} img/s "
        f"{row['plain_cpu_ms']:7.2f} CPU ms/img | explain {row['explain_ips']:7.1f} img/s "
        f"{row['explain_cpu_ms']:7.2f} CPU ms/img | throughput x{tput:.3f}  CPU x{cpu:.3f} | "
        f"split ms/img: {split} | RSS MB early {row['rss_early']:.0f} end {row['rss_late']:.0f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        default="test_resnet:64:512,resnet18:224:192,resnet50:224:96",
        help="backbone:size:images, comma-separated",
    )
    parser.add_argument("--workers", default="0,2", help="DataLoader workers to compare at, comma-separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    torch.manual_seed(0)
    print(f"device {dist.device()}, torch threads {torch.get_num_threads()}, batch {args.batch}, rounds {args.rounds}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_explain-"))
    try:
        for case in args.cases.split(","):
            backbone, size, images = case.split(":")
            bench_case(backbone, int(size), int(images), args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
