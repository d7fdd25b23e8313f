"""What explanation costs beyond plain inference, measured in one run against that baseline.

For each (backbone, image size, input size): a synthetic corpus and a model package (random
backbone, heads fitted to synthetic training images in seconds: its explanations name a few
attributes per image, as a trained model's do; ``--heads random`` keeps random heads, which name
6-11), then rounds that alternate (forward and reverse order) between
  plain     read, decode, transform (in the same DataLoader workers) and forward, nothing kept
  explain   the explanation job: the same, plus top-k, maps and the parts of one output row
            (default: json, txt, heatmaps.npy; +overlay, +attr_maps, +image; all), tar writing
on the same shards, batch size and workers (encoding processes: explain's default), for every
worker count of ``--workers`` in the same rounds.
Prints medians over the rounds: images/s (wall) and CPU ms per image (this process and all its
children: loader workers and encoding processes), their ratios, the medians of the same ratios
taken within each round ("per round": throughput / CPU), explain's time split; how images/s
grow from one worker count to the next, plain and per row, with the median per round of each
row's growth over plain's (1.0: explanation scales as plain inference does); and the main
process's peak memory early in a run against the end of it (flat when equal). On a machine
shared with other work, wall time swings: the CPU ratio is the steadier figure.

``--command N`` instead times whole commands, the way a user runs them: ``eatdist explain`` on N
images at 64 px against a plain-inference command over the same shards, CPU of each whole
process tree. Not a test: timings depend on the machine.

    python benchmarks/bench_explain.py [--cases test_resnet:64:4096,resnet18:224:576,resnet18:224:288:448]
        [--workers 0,2] [--rows default,+overlay,+attr_maps,+image,all] [--batch 32] [--rounds 3]
        [--bf16] [--channels-last] [--render-device auto|cpu] [--decode-device cpu|model]
        [--encode-workers N] [--threads N]
    python benchmarks/bench_explain.py --command 6000 [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eatdist import dist
from eatdist.config import ExplainConfig, SynthConfig
from eatdist.data.corpus import DatasetInfo, ShardInfo
from eatdist.data.decode import Preprocess, build_transform
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
from eatdist.explain.loader import ShardChunks, decode_chunk, make_loader, shutdown
from eatdist.hostmem import ENV, keep_freed_memory, limit_mb
from eatdist.models.package import PackageMeta, build_model, load_package, save_package

SHARD = SynthConfig().shard_size  # samples per input shard, as the synthetic corpus writes them


def write_corpus(root: Path, images: int, size: int, shard: int = SHARD) -> DatasetInfo:
    cfg = SynthConfig(num_classes=12, image_size=size)
    protos = class_prototypes(cfg.num_classes, 0)
    shards, index = [], 0
    root.mkdir(parents=True)
    while index < images:
        name, count = f"test-{len(shards):06d}.tar", min(shard, images - index)
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


def make_package(folder: Path, backbone: str, size: int, info: DatasetInfo, heads: str = "fitted") -> Path:
    """A package of ``backbone`` (random weights) for ``info``'s classes and attributes; its heads
    fitted (:func:`fit_heads`) unless ``heads`` is ``"random"``."""
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
    if heads == "fitted":
        class_acc, attr_acc = fit_heads(model, meta, info.num_classes)
        print(f"{backbone} {size}px: heads fitted to {FIT_IMAGES} training images "
              f"(class accuracy {class_acc:.2f}, attribute accuracy {attr_acc:.2f} on them)", flush=True)  # fmt: skip
    return save_package(folder / f"{backbone}-{size}", model.eval(), meta)


FIT_IMAGES = 384


def fit_heads(model: torch.nn.Module, meta: PackageMeta, num_classes: int, steps: int = 300) -> tuple[float, float]:
    """Fit ``model``'s two heads to synthetic training images, its random backbone frozen (a probe
    of its features), and return their class and attribute accuracy on those images.

    What explanation writes depends on what the model predicts: the attributes named (and so the
    tiles of a strip, the maps kept) follow the attribute probabilities. Random heads put every
    probability near 0.5 and name 6-11 attributes per image (most of them as unusual for the
    class); fitted heads name what they see, a few per image as a trained model does."""
    size = meta.preprocess["image_size"]
    cfg = SynthConfig(num_classes=num_classes, image_size=size)
    protos = class_prototypes(num_classes, 0)
    transform = build_transform(Preprocess.from_json(meta.preprocess), train=False)
    device = dist.device()
    model.to(device).eval()  # the backbone's normalisation layers as inference runs them, left as they are
    features, classes, attributes = [], [], []
    with torch.no_grad():
        for start in range(0, FIT_IMAGES, 32):
            drawn = [render_sample(cfg, protos, "train", i) for i in range(start, start + 32)]
            pixels = torch.stack(
                [transform(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)) for im, _ in drawn]
            )
            features.append(model.feature_map(pixels.to(device)))
            classes += [record["class"] for _, record in drawn]
            attributes += [record["attributes"] for _, record in drawn]
    x = torch.cat(features)
    y, a = torch.tensor(classes, device=device), torch.tensor(attributes, device=device)
    params = [p for head in (model.class_head, model.attr_head) for p in head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        class_logits, attr_logits = model.heads(x)
        loss = F.cross_entropy(class_logits, y) + F.binary_cross_entropy_with_logits(attr_logits, a)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        class_logits, attr_logits = model.heads(x)
        class_acc = (class_logits.argmax(1) == y).float().mean().item()
        attr_acc = ((attr_logits > 0) == (a > 0.5)).float().mean().item()
    return class_acc, attr_acc


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader workers, once shut down)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def plain(explainer: Explainer, inputs: list[str], cfg: ExplainConfig, split: dict | None = None) -> int:
    """Plain inference: the job's loader (no decoded images kept; JPEGs decoded where the job
    decodes them, ``explain.decode_device``), the forward, nothing written. ``split`` gets the
    seconds of decoding (summed over the workers) and of the forward, as the job counts them."""
    size = explainer.preprocess.image_size if cfg.decode_device == "model" else 0
    dataset = ShardChunks(explainer.transform, cfg.batch_size, keep_images=False, jpegs_for=size)
    loader = make_loader(dataset, cfg.num_workers, pin_memory=explainer.on_gpu)
    count, decode, forward = 0, 0.0, 0.0
    with torch.inference_mode():
        for url in inputs:
            dataset.select(url)
            for chunk in loader:
                started = time.perf_counter()
                decode += chunk.decode_s
                pixels = chunk.pixels
                if chunk.jpegs is not None and pixels is not None:
                    pixels = decode_chunk(chunk, explainer.transform, explainer.device)
                    decoded = time.perf_counter()
                    decode, started = decode + decoded - started, decoded
                if pixels is not None:
                    explainer.forward(pixels)  # on a GPU: its launch (one sync at the end, below)
                forward += time.perf_counter() - started
                count += len(chunk.keys)
    if explainer.on_gpu:
        torch.cuda.synchronize()
    shutdown(loader)  # reaps the workers, so their CPU time is counted
    if split is not None:
        split.update(decode=decode, forward=forward)
    return count


def explain(explainer: Explainer, inputs: list[str], cfg: ExplainConfig, out: Path, rss: list[float]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    stop = threading.Event()

    def sample() -> None:  # a few times a second: each wake-up takes a core from the forward's threads
        while not stop.wait(0.2):
            rss.append(rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    job = ExplainJob(explainer, inputs, out, cfg)
    try:
        job.run()
    finally:
        job.close()  # stops the loader workers and the encoding processes: their CPU time is counted
        stop.set()
        sampler.join()
    return asdict(job.timings)


DEFAULT = ["json", "txt", "heatmaps.npy"]
ROWS = {
    "default": DEFAULT,
    "+overlay": [*DEFAULT, "overlay"],
    "+attr_maps": [*DEFAULT, "attr_maps"],
    "+image": [*DEFAULT, "image"],
    "all": [*DEFAULT, "overlay", "attr_maps", "image"],
}


def bench_case(backbone: str, size: int, images: int, source: int, args: argparse.Namespace, tmp: Path) -> None:
    info = write_corpus(tmp / f"corpus-{source}-{images}", images, source, args.shard)
    inputs = resolve_inputs(str(info.root))
    package = make_package(tmp, backbone, size, info, args.heads)
    model, meta = load_package(package, dist.device())
    case = f"{backbone} {size}px" + (f" from {source}px" if source != size else "")
    # Every worker count runs in the same rounds: a slow spell weighs on each alike, so the
    # figures of different counts (and the scaling between them) compare.
    configs: dict[tuple[int, str], ExplainConfig] = {}
    explainers: dict[int, Explainer] = {}
    for workers in args.workers:
        base = dict(batch_size=args.batch, num_workers=workers, bf16=args.bf16, channels_last=args.channels_last,
                    render_device=args.render_device, decode_device=args.decode_device,
                    encode_workers=args.encode_workers, group_images=args.group_images)  # fmt: skip
        configs[workers, "plain"] = ExplainConfig(**base)
        configs |= {(workers, row): ExplainConfig(**base, outputs=ROWS[row]) for row in args.rows}
        explainers[workers] = Explainer(model, meta, configs[workers, "plain"], dist.device())
        plain(explainers[workers], inputs[:1], configs[workers, "plain"])  # warm-up
    runs: dict[tuple[int, str], list[tuple[float, float]]] = {k: [] for k in configs}
    splits: dict[tuple[int, str], list[dict]] = {k: [] for k in configs}
    rss_early, rss_late = [], []
    for r in range(args.rounds):
        for key in list(configs) if r % 2 == 0 else list(configs)[::-1]:
            workers, kind = key
            wall, cpu = time.perf_counter(), cpu_seconds()
            if kind == "plain":
                splits[key].append({})
                plain(explainers[workers], inputs, configs[key], splits[key][-1])
            else:
                rss: list[float] = []
                splits[key].append(explain(explainers[workers], inputs, configs[key], tmp / "out", rss))
                if len(rss) >= 4:
                    rss_early.append(max(rss[: len(rss) // 4]))
                    rss_late.append(max(rss))
            runs[key].append((time.perf_counter() - wall, cpu_seconds() - cpu))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    for workers in args.workers:
        plain_key = (workers, "plain")
        split = {k: statistics.median(s[k] for s in splits[plain_key]) / images * 1e3 for k in splits[plain_key][0]}
        print(f"{case:<26} w={workers} n={images:<4} plain   {images / med[plain_key][0]:7.1f} img/s "
              f"{med[plain_key][1] / images * 1e3:7.2f} CPU ms/img | split ms/img: "
              f"{' '.join(f'{k} {v:.2f}' for k, v in split.items())}", flush=True)  # fmt: skip
        for row in args.rows:
            key = (workers, row)
            split = {k: statistics.median(s[k] for s in splits[key]) / images * 1e3 for k in splits[key][0]}
            print_row(case, workers, row, images, med[plain_key], med[key], split, paired(runs[plain_key], runs[key]))
    for fewer, more in itertools.pairwise(args.workers):
        print_scaling(case, fewer, more, args.rows, runs)
    named = named_per_image(tmp / "out")
    if named:
        print(f"{'':<26} attributes named per image (the tiles of attr_maps): mean {statistics.mean(named):.1f}, "
              f"{min(named)}-{max(named)}", flush=True)  # fmt: skip
    early, late = max(rss_early, default=0), max(rss_late, default=0)
    on_gpu = dist.device().type == "cuda"
    peak = f", peak device memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if on_gpu else ""
    print(f"{'':<26} RSS MB (main process) early {early:.0f} end {late:.0f}{peak}", flush=True)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()


def named_per_image(out: Path) -> list[int]:
    """How many attributes each explanation of the last explain run (in ``out``) names: what an
    attribute strip draws, and what the maps hold."""
    counts = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json") and (data := tar.extractfile(member)) is not None:
                    counts.append(len(json.loads(data.read())["top_attributes"]))
    return counts


def print_scaling(case: str, fewer: int, more: int, rows: list[str], runs: dict) -> None:
    """How throughput grows from ``fewer`` to ``more`` workers, plain and for each row; and, per
    round, each row's growth over plain's (1.0: it scales as plain inference does)."""

    def growth(kind: str) -> float:
        return statistics.median(w for w, _ in runs[fewer, kind]) / statistics.median(w for w, _ in runs[more, kind])

    def per_round(kind: str) -> float:
        rounds = zip(runs[fewer, "plain"], runs[more, "plain"], runs[fewer, kind], runs[more, kind], strict=True)
        return statistics.median((e1[0] / e2[0]) / (p1[0] / p2[0]) for p1, p2, e1, e2 in rounds)

    shown = "  ".join(f"{row} x{growth(row):.3f} (per round x{per_round(row):.3f} of plain's)" for row in rows)
    print(f"{case:<26} img/s from w={fewer} to w={more}: plain x{growth('plain'):.3f}  {shown}", flush=True)


def paired(plain: list[tuple[float, float]], run: list[tuple[float, float]]) -> tuple[float, float]:
    """Medians of the ratios within each round (throughput, CPU): a slow spell of the machine that
    spans a round weighs on both runs of its pair alike."""
    pairs = list(zip(plain, run, strict=True))
    return statistics.median(p[0] / r[0] for p, r in pairs), statistics.median(r[1] / p[1] for p, r in pairs)


def print_row(
    case: str, workers: int, row: str, images: int, plain: tuple, run: tuple, split: dict, pairs: tuple
) -> None:
    shown = " ".join(f"{k} {v:.2f}" for k, v in split.items() if v)
    print(f"{case:<26} w={workers} n={images:<4} {row:<11} {images / run[0]:7.1f} img/s {run[1] / images * 1e3:7.2f} "
          f"CPU ms/img | throughput x{plain[0] / run[0]:.3f}  CPU x{run[1] / plain[1]:.3f} "
          f"| per round x{pairs[0]:.3f} / x{pairs[1]:.3f} | split ms/img: {shown}", flush=True)  # fmt: skip


def plain_command(package: str, corpus: str, workers: int, batch: int) -> None:
    """The plain-inference command of ``--command``: read, decode, resize and forward every input, keep nothing."""
    model, meta = load_package(package, dist.device())
    cfg = ExplainConfig(batch_size=batch, num_workers=workers)
    count = plain(Explainer(model, meta, cfg, dist.device()), resolve_inputs(corpus), cfg)
    print(f"plain inference: {count} images")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_command(images: int, args: argparse.Namespace, tmp: Path) -> None:
    """``eatdist explain`` (its defaults) against the plain-inference command, each a whole process tree."""
    info = write_corpus(tmp / "corpus-command", images, 64, args.shard)
    package = make_package(tmp, "test_resnet", 64, info, args.heads)
    cfg = ExplainConfig()
    commands = {
        "plain": [sys.executable, __file__, "--plain", str(package), str(info.root), str(cfg.num_workers),
                  str(cfg.batch_size)],
        "explain": [sys.executable, "-m", "eatdist", "explain", "--model", str(package), "--input", str(info.root),
                    "--output", str(tmp / "out-command")],
    }  # fmt: skip
    env = dict(os.environ, TQDM_DISABLE="1")
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for r in range(args.rounds):
        for kind in list(commands) if r % 2 == 0 else list(commands)[::-1]:
            shutil.rmtree(tmp / "out-command", ignore_errors=True)
            wall, cpu = time.perf_counter(), children_cpu()
            subprocess.run(commands[kind], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs[kind].append((time.perf_counter() - wall, children_cpu() - cpu))
    for kind, values in runs.items():
        rounds = ", ".join(f"{c:.1f}" for _, c in values)
        print(
            f"{kind:<8} {images} images at 64 px: wall {statistics.median(w for w, _ in values):.1f} s, "
            f"CPU {statistics.median(c for _, c in values):.1f} s (rounds: {rounds})"
        )
    ratios = [e[1] / p[1] for p, e in zip(runs["plain"], runs["explain"], strict=True)]
    print(
        f"eatdist explain / plain inference, CPU of the process tree: x{statistics.median(ratios):.3f} "
        f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        default="test_resnet:64:4096,resnet18:224:576,resnet18:224:288:448",
        help="backbone:size:images[:input size], comma-separated",
    )
    parser.add_argument("--workers", default="0,2", help="DataLoader workers to compare at, comma-separated")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"output rows, comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shard", type=int, default=SHARD, help="samples per input shard")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--render-device", default="auto", choices=["auto", "cpu"])
    parser.add_argument(
        "--decode-device",
        default="cpu",
        choices=["cpu", "model"],
        help="where JPEG inputs are decoded, for plain inference and explanation alike",
    )
    parser.add_argument("--encode-workers", type=int, default=None,
                        help="explain.encode_workers (default: explain's own)")  # fmt: skip
    parser.add_argument("--group-images", type=int, default=ExplainConfig.group_images,
                        help="explain.group_images: images explained together (0: one batch at a time)")  # fmt: skip
    parser.add_argument("--heads", default="fitted", choices=["fitted", "random"],
                        help="the package's heads: fitted to synthetic training images (names a few attributes "
                        "per image, as a trained model does), or random (names 6-11)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    parser.add_argument("--command", type=int, default=0, help="time whole commands on this many 64 px images")
    parser.add_argument("--plain", nargs=4, metavar=("PACKAGE", "CORPUS", "WORKERS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # As the eatdist command does (eatdist.hostmem), for plain inference and explanation alike.
    kept = keep_freed_memory()
    if args.plain:
        plain_command(args.plain[0], args.plain[1], int(args.plain[2]), int(args.plain[3]))
        return
    args.workers = [int(w) for w in args.workers.split(",")]
    args.rows = args.rows.split(",")
    if args.threads:
        # Cores shared with other work make OpenMP threads spin: fewer threads, steadier CPU figures.
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the commands of --command too
    torch.manual_seed(0)
    print(f"device {dist.device()}, torch threads {torch.get_num_threads()}, batch {args.batch}, rounds {args.rounds}, "
          f"freed host memory kept: {f'{limit_mb()} MB' if kept else 'no'} ({ENV})")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench_explain-"))
    try:
        if args.command:
            bench_command(args.command, args, tmp)
            return
        for case in args.cases.split(","):
            backbone, size, images, *source = case.split(":")
            bench_case(backbone, int(size), int(images), int(source[0]) if source else int(size), args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
