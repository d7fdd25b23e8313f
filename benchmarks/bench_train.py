"""Training throughput: eatdist against a hand-written Accelerate + timm loop, and eatdist's
loader against plain WebDataset decoding, on the same shards, model, batch and workers.

Two tables, each from interleaved rounds (A, B, A, B, ...) with medians:

  train   eatdist's ``Trainer.train_epoch`` (planned reads, uint8 batches normalised on the
          device, losses summed on the device) against a loop written as the Accelerate and
          WebDataset docs show it: ``wds.WebDataset(...).decode("pil")``, torchvision
          transforms to float in the workers, ``loss.item()`` each step. Same EAT model (timm
          backbone + the two linear heads), same AdamW, same batch and workers.
  loader  batches per second of the data alone: eatdist's ``ShardStream`` against the plain
          WebDataset pipeline of the hand-written loop, at 64 px sources (64 px input) and at
          224 / 448 px sources (224 px input: a 448 px JPEG is decoded at half scale).

Ratios > 1 favour eatdist. "CPU/img" is process CPU time (workers included) per image: the
figure to size loader cores by. Goals: train >= 0.98x, loader >= 1.2x. Not a test: prints
tables.

    python benchmarks/bench_train.py [--rounds 3] [--workers 1] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from accelerate import Accelerator
from torchvision.transforms import v2

from eatdist.config import Config, SynthConfig
from eatdist.data.corpus import load_dataset_info
from eatdist.data.pipeline import ShardStream, make_loader
from eatdist.data.synth import generate
from eatdist.hostmem import ENV, keep_freed_memory, limit_mb
from eatdist.models.eat import eat_loss
from eatdist.models.package import backbone_preprocess, build_model
from eatdist.train.trainer import Trainer


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_corpus(root: Path, size: int, count: int) -> Path:
    """A synthetic corpus whose train split is ``count`` images at ``size`` px, in 4 shards."""
    cfg = SynthConfig(image_size=size, train=count, val=32, test=0, shard_size=max(8, count // 4), workers=2)
    generate(cfg, root, progress=False)
    return root


def wds_loader(corpus: Path, image_size: int, batch: int, workers: int, train: bool) -> torch.utils.data.DataLoader:
    """The plain WebDataset pipeline of the docs: PIL decode, float transforms in the workers."""
    info = load_dataset_info(corpus)
    urls = [str(corpus / s.file) for s in info.shards("train")]
    steps: list[Any] = [v2.PILToTensor(), v2.Resize((image_size, image_size), antialias=True)]
    if train:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    transform = v2.Compose(steps)

    def label(record: dict[str, Any]) -> int:
        return record["class"]

    def attributes(record: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(record["attributes"], dtype=torch.float32)

    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
        .decode("pil")
        .to_tuple("jpg", "json", "json")
        .map_tuple(transform, label, attributes)
        .batched(batch, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def eatdist_loader(corpus: Path, image_size: int, batch: int, workers: int) -> tuple[Any, ShardStream]:
    info = load_dataset_info(corpus)
    model = build_model("test_resnet", {}, info.num_classes, info.num_attributes)
    stream = ShardStream(
        info, "train", preprocess=backbone_preprocess(model, image_size), batch_size=batch, train=True,
        num_workers=workers, shuffle_buffer=64,
    )  # fmt: skip
    return make_loader(stream, workers), stream


def time_batches(make: Any, steps: int) -> tuple[float, float]:
    """Return (images/s, CPU s per image) over ``steps`` batches of a freshly made loader."""
    loader = make()
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    for i, batch in enumerate(loader):
        images += len(batch["keys"]) if isinstance(batch, dict) else len(batch[0])
        if i + 1 == steps:
            break
    del loader  # workers exit and their CPU time lands in RUSAGE_CHILDREN
    time.sleep(0.2)
    return images / (time.perf_counter() - wall), (cpu_seconds() - cpu) / max(1, images)


def hand_loop(corpus: Path, backbone: str, size: int, batch: int, workers: int, steps: int) -> tuple[float, float]:
    """The loop as Accelerate's and WebDataset's examples write it."""
    info = load_dataset_info(corpus)
    acc = Accelerator(cpu=True)
    model = build_model(backbone, {}, info.num_classes, info.num_attributes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    loader = wds_loader(corpus, size, batch, workers, train=True)
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    for i, (x, labels, attrs) in enumerate(loader):
        out = model(x.to(acc.device))
        loss, _ = eat_loss(out, labels.to(acc.device), attrs.to(acc.device), torch.ones_like(attrs), 1.0)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # what a progress bar or logger reads each step
        images += len(labels)
        if i + 1 == steps:
            break
    del loader
    time.sleep(0.2)
    return images / (time.perf_counter() - wall), (cpu_seconds() - cpu) / max(1, images)


def eatdist_train(corpus: Path, backbone: str, image_size: int, batch: int, workers: int, out: Path):
    """One epoch of eatdist's Trainer (the corpus holds exactly the benchmark's steps)."""
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size = str(corpus), image_size, batch
    cfg.data.num_workers, cfg.data.shuffle_buffer = workers, 64
    cfg.model.backbone, cfg.model.backbone_args = backbone, {}
    cfg.train.output_dir, cfg.train.log_every, cfg.train.epochs = str(out), 1000, 1
    cfg.optim.clip_grad = None  # the hand-written loop does not clip either
    trainer = Trainer(cfg)
    try:
        wall, cpu = time.perf_counter(), cpu_seconds()
        assert trainer.train_epoch() is not None
        trainer.batches.close()  # the persistent workers exit, so their CPU time counts
        time.sleep(0.2)
        images = trainer.steps_per_epoch * batch
        return images / (time.perf_counter() - wall), (cpu_seconds() - cpu) / images
    finally:
        trainer.close()


def rounds(pairs: dict[str, Any], n: int) -> dict[str, tuple[float, float]]:
    """Run each named measurement ``n`` times, interleaved; return the medians."""
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in pairs}
    for _ in range(n):
        for name, fn in pairs.items():
            results[name].append(fn())
    return {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept = keep_freed_memory()  # as the eatdist command does (eatdist.hostmem), for both loops alike
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    sizes = {64: (64, "test_resnet"), 224: (224, "resnet18"), 448: (224, "resnet18")}
    corpora = {src: make_corpus(tmp / f"c{src}", src, args.batch * args.steps) for src in sizes}
    print(f"{args.workers} loader worker(s), batch {args.batch}, {args.steps} steps, {args.rounds} rounds, CPU, "
          f"freed host memory kept: {f'{limit_mb()} MB' if kept else 'no'} ({ENV})\n")  # fmt: skip
    print("loader alone (batches of the training split)")
    cols = f"{'CPU ms/img':>10} | {'eatdist img/s':>13} {'CPU ms/img':>10} | {'speed':>6} {'CPU':>6}"
    print(f"{'source':>7} {'input':>6} | {'wds img/s':>10} {cols}")
    per_core = {}
    for src, (size, _) in sizes.items():
        c = corpora[src]

        def plain(c: Path = c, size: int = size) -> tuple[float, float]:
            return time_batches(lambda: wds_loader(c, size, args.batch, args.workers, True), args.steps)

        def ours(c: Path = c, size: int = size) -> tuple[float, float]:
            return time_batches(lambda: eatdist_loader(c, size, args.batch, args.workers)[0], args.steps)

        (w_ips, w_cpu), (e_ips, e_cpu) = rounds({"wds": plain, "eat": ours}, args.rounds).values()
        per_core[src] = 1.0 / e_cpu
        print(f"{src:>5}px {size:>4}px | {w_ips:>10.0f} {w_cpu * 1e3:>10.2f} | {e_ips:>13.0f} {e_cpu * 1e3:>10.2f}"
              f" | {e_ips / w_ips:>5.2f}x {w_cpu / e_cpu:>5.2f}x")  # fmt: skip
    print("\ntraining (same model, batch, workers)")
    print(f"{'source':>7} {'model':>12} | {'hand img/s':>10} {cols}")
    runs = iter(range(10_000))
    for src in (64, 224):
        size, backbone = sizes[src]
        c = corpora[src]

        def hand(c: Path = c, size: int = size, backbone: str = backbone) -> tuple[float, float]:
            return hand_loop(c, backbone, size, args.batch, args.workers, args.steps)

        def eat(c: Path = c, size: int = size, backbone: str = backbone) -> tuple[float, float]:
            return eatdist_train(c, backbone, size, args.batch, args.workers, tmp / f"run{next(runs)}")

        (h_ips, h_cpu), (e_ips, e_cpu) = rounds({"hand": hand, "eat": eat}, args.rounds).values()
        print(f"{src:>5}px {backbone:>12} | {h_ips:>10.1f} {h_cpu * 1e3:>10.1f} | {e_ips:>13.1f} {e_cpu * 1e3:>10.1f}"
              f" | {e_ips / h_ips:>5.2f}x {h_cpu / e_cpu:>5.2f}x")  # fmt: skip
    print("\nimages a loader core decodes per second (eatdist, this machine): "
          + ", ".join(f"{src} px sources {rate:.0f}/s" for src, rate in per_core.items()))  # fmt: skip
    print(json.dumps({"per_core_images_per_s": {str(k): round(v, 1) for k, v in per_core.items()}}))


if __name__ == "__main__":
    main()
