"""Training img/s on one device: eatdist's Trainer against a hand-written Accelerate + timm loop.

The step of ``benchmarks/gpu_check.sh`` that compares training speed: the same EAT model (timm
backbone + the two linear heads), AdamW, batch, loader workers, mixed precision and memory
layout; the hand-written loop reads the shards as the WebDataset docs do (``bench_train.py``'s
loop, moved to the device). Rounds alternate; the first round of each warms up (cuDNN autotune,
allocator) and is left out of the medians when there are more. Prints img/s, the ratio and the
peak device memory of each. Not a test: timings depend on the machine.

    python benchmarks/gpu_train.py [--backbone resnet50] [--size 224] [--batch 128] [--steps 30]
        [--workers 8] [--rounds 3] [--bf16] [--channels-last] [--heads]

``--heads`` adds eatdist with the synthetic recipe's head (spatial attribute maps, the class read
through them, the localisation loss) to the rounds and prints its step time against the linear head's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import make_corpus, wds_loader  # noqa: E402  (a sibling script, not a package)

from eatdist.config import Config  # noqa: E402
from eatdist.data.corpus import load_dataset_info  # noqa: E402
from eatdist.models.eat import eat_loss  # noqa: E402
from eatdist.models.package import build_model  # noqa: E402
from eatdist.train.trainer import Trainer  # noqa: E402


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    """Peak device memory since the last call, GiB (0 on a CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def hand_loop(corpus: Path, args: argparse.Namespace) -> float:
    """img/s of the loop as Accelerate's and timm's examples write it."""
    info = load_dataset_info(corpus)
    acc = Accelerator(mixed_precision="bf16" if args.bf16 else "no")
    model = build_model(args.backbone, {}, info.num_classes, info.num_attributes)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    loader = wds_loader(corpus, args.size, args.batch, args.workers, train=True)
    images, start = 0, None
    for i, (x, labels, attrs) in enumerate(loader):
        if i == 1:  # the first batch pays for the workers' start
            synchronize()
            start = time.perf_counter()
        x = x.to(acc.device, non_blocking=True).contiguous(memory_format=layout)
        with acc.autocast():
            out = model(x)
        attrs = attrs.to(acc.device)
        loss, _ = eat_loss(out, labels.to(acc.device), attrs, torch.ones_like(attrs), 1.0)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # what a progress bar or logger reads each step
        images += len(labels) if i >= 1 else 0
        if i + 1 == args.steps:
            break
    synchronize()
    del loader
    return images / (time.perf_counter() - start)


# The synthetic recipe's head (--heads): spatial attribute maps, the class read through them, the
# localisation loss from the corpus's attr_boxes.
RECIPE_HEAD = {"attr_head": "spatial", "class_pool": "attributes"}
RECIPE_LOSS = {"off_prototype_weight": 10.0, "localisation_weight": 1.0}


def eatdist_epoch(corpus: Path, args: argparse.Namespace, out: Path, recipe_head: bool = False) -> float:
    """img/s of one epoch of eatdist's Trainer (the corpus holds exactly ``args.steps`` batches)."""
    cfg = Config()
    if recipe_head:
        for key, value in RECIPE_HEAD.items():
            setattr(cfg.model, key, value)
        for key, value in RECIPE_LOSS.items():
            setattr(cfg.loss, key, value)
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size = str(corpus), args.size, args.batch
    cfg.data.num_workers, cfg.data.shuffle_buffer = args.workers, 64
    cfg.model.backbone, cfg.model.backbone_args, cfg.model.channels_last = args.backbone, {}, args.channels_last
    cfg.train.output_dir, cfg.train.log_every, cfg.train.epochs = str(out), 1000, 1
    cfg.train.mixed_precision = "bf16" if args.bf16 else "no"
    cfg.train.log_with, cfg.train.log_images, cfg.train.final_test = [], 0, False
    cfg.optim.clip_grad = None  # the hand-written loop does not clip either
    trainer = Trainer(cfg)
    try:
        synchronize()
        wall = time.perf_counter()
        metrics = trainer.train_epoch()
        synchronize()
        assert metrics is not None
        return trainer.steps_per_epoch * args.batch / (time.perf_counter() - wall)
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--heads",
        action="store_true",
        help="also time eatdist with the synthetic recipe's head (spatial maps + localisation loss)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_train_"))
    corpus = make_corpus(tmp / "corpus", args.size, args.batch * args.steps)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device}: {args.backbone} {args.size}px batch {args.batch} x {args.steps} steps, {args.workers} workers, "
          f"bf16 {args.bf16}, channels_last {args.channels_last}, {args.rounds} rounds", flush=True)  # fmt: skip
    kinds = ("hand", "eatdist", "spatial") if args.heads else ("hand", "eatdist")
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    peaks: dict[str, float] = dict.fromkeys(kinds, 0.0)
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            if kind == "hand":
                ips = hand_loop(corpus, args)
            else:
                ips = eatdist_epoch(corpus, args, tmp / f"run{r}-{kind}", recipe_head=kind == "spatial")
            runs[kind].append(ips)
            peaks[kind] = max(peaks[kind], peak_gib())
            print(f"  round {r + 1} {kind:<8} {ips:8.1f} img/s", flush=True)
    steady = {k: v[1:] if len(v) > 1 else v for k, v in runs.items()}
    hand, ours = (statistics.median(steady[k]) for k in ("hand", "eatdist"))
    print(f"train img/s: hand-written Accelerate+timm {hand:.1f}, eatdist {ours:.1f}, ratio x{ours / hand:.3f}; "
          f"peak device memory GiB: hand {peaks['hand']:.2f}, eatdist {peaks['eatdist']:.2f}")  # fmt: skip
    if args.heads:
        spatial = statistics.median(steady["spatial"])
        print(f"heads img/s: linear {ours:.1f}, spatial + localisation loss {spatial:.1f}; step time "
              f"x{ours / spatial:.3f} of the linear head's; peak device memory GiB {peaks['spatial']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
