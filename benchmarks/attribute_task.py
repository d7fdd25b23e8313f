"""The EAT claim on the synthetic corpus, over several seeds: does the attribute task move attention onto the object?

For each seed: write a corpus whose train backgrounds give the class away (``--spurious``;
val/test backgrounds are random), train the same model with ``loss.attr_weight`` 0 (the plain
classifier) and 1 (EAT) on it, and score both on the test split:

- test top-1 (random backgrounds);
- background swap: every test object redrawn, by the corpus's own renderer, on another class's
  spurious background; the share of images classified as the *background's* class;
- where the class map looks, against the object's pixel mask (not its box): pointing game (the
  upsampled map's peak on the object) and map mass on the object, each split by correct and
  wrong predictions; mass is also divided by the ceiling an ideal map reaches at the map's
  resolution (the mask averaged into the map's cells, upsampled the same way);
- deletion and insertion AUC (Petsiuk et al., RISE): the predicted class's probability as the
  pixels are removed (set to the mean colour) or inserted (into a blurred copy) in the order of
  the class map, 10 steps; lower deletion and higher insertion mean the map found what the
  prediction rests on.

- attribute accuracy where the image departs from its class's prototype (and where it agrees),
  :mod:`eatdist.metrics.prototype`;
- sanity checks (:mod:`eatdist.explain.sanity`): the mean Spearman ρ between the class maps and
  those of the model with its heads and top block re-initialised (lower: the maps depend on the
  weights), and the class-probability drop when the top 20 % of pixels by the class map are
  removed, minus the drop for random maps of the same resolution (higher: the map found the evidence).

The baseline is the plain classifier (``loss.attr_weight=0``, linear heads over the global
average pool); EAT uses the attribute head ``--head`` names (default ``localised``, the synthetic
recipe's: the spatial head with the class pooled through its maps and the localisation loss;
``spatial`` without that loss; ``linear`` is the original EAT head).

It prints each seed's numbers and the paired differences EAT − baseline (mean ± sd over seeds,
the 95 % t-interval of the mean, and how many seeds agree in sign), and writes them to
``<workdir>/results.json``. An experiment, not a test: it reports what it measures.

    python benchmarks/attribute_task.py [--seeds 5] [--train 4000] [--epochs 6] [--image-size 64]
        [--output-stride 8] [--spurious 0.9] [--attr-noise 0.08] [--hue-jitter 0.0] [--head localised]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eatdist.config import ExplainConfig, SynthConfig
from eatdist.data.corpus import load_dataset_info
from eatdist.data.shards import iter_shard
from eatdist.data.synth import class_prototypes, generate, render_object
from eatdist.explain.cam import explanation_maps
from eatdist.explain.explainer import Explainer
from eatdist.explain.sanity import cascade_stages, class_maps, deletion_drop, random_maps, randomised, spearman
from eatdist.metrics.prototype import prototype_metrics
from eatdist.models.package import load_package

STEPS = 10  # deletion / insertion fractions 0, 0.1, ..., 1
# EAT's head per --head; the baseline is always the plain classifier (linear heads, mean pool)
HEADS = {
    "linear": ["model.attr_head=linear", "model.class_pool=mean"],
    "spatial": ["model.attr_head=spatial", "model.class_pool=attributes", "loss.off_prototype_weight=5"],
    # the synthetic recipe's: the spatial head, its maps kept inside the attributes' boxes
    "localised": [
        "model.attr_head=spatial",
        "model.class_pool=attributes",
        "loss.off_prototype_weight=10",
        "loss.localisation_weight=1",
    ],
}
# t quantiles (0.975) for 95 % intervals of a mean over n seeds (df = n - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def train(data: Path, run: Path, weight: float, seed: int, args: argparse.Namespace) -> None:
    head = HEADS[args.head] if weight > 0 else HEADS["linear"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "eatdist", "train", f"data.root={data}", f"train.output_dir={run}",
           f"loss.attr_weight={weight}", f"train.epochs={args.epochs}", f"train.seed={seed}",
           f"data.image_size={args.image_size}", f"model.backbone_args={{output_stride: {args.output_stride}}}",
           "data.num_workers=1", "train.final_test=false", "train.log_every=1000", *head]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def _encode_decode(image: np.ndarray) -> np.ndarray:
    """JPEG round trip at the corpus's quality, so redrawn images look like the stored ones."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _ideal_mass(mask: torch.Tensor, map_hw: tuple[int, int]) -> torch.Tensor:
    """Mass on the object of the best-placed map at resolution ``map_hw``: the mask averaged into cells."""
    ideal = F.adaptive_avg_pool2d(mask[:, None], map_hw)
    up = F.interpolate(ideal, size=mask.shape[-2:], mode="bilinear", align_corners=False)[:, 0].clamp(min=0)
    return (up * mask).flatten(1).sum(1) / up.flatten(1).sum(1).clamp(min=1e-12)


def _auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under ``[B, STEPS + 1]`` scores over fractions 0..1."""
    return ((curve[:, 1:] + curve[:, :-1]) / 2).mean(1)


class Scorer:
    """One trained model: predictions, class maps and the scores above for batches of images."""

    def __init__(self, package: Path) -> None:
        model, meta = load_package(package)
        self.explainer = Explainer(model, meta, ExplainConfig(top_k=0), torch.device("cpu"))
        self.model = self.explainer.model

    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        t = self.explainer.transform
        return torch.stack([t(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)) for im in images])

    @torch.inference_mode()
    def probs_and_maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(batch)
        probs = out.class_logits.float().softmax(1)
        classes = probs.argmax(1)
        empty = torch.zeros(len(batch), 0, dtype=torch.long)
        maps = explanation_maps(self.model, batch, out.features.float(), classes, empty)[:, 0]
        return probs, maps

    @torch.inference_mode()
    def attribute_probs(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch).attr_logits.float().sigmoid()

    def sanity(self, batch: torch.Tensor, classes: torch.Tensor) -> tuple[float, float]:
        """(mean Spearman rho against the model with heads and top block re-initialised, 3 draws;
        deletion drop of the class map minus that of random maps)."""
        maps = class_maps(self.model, batch, classes)
        _, modules = cascade_stages(self.model)[1]
        rho = np.mean([spearman(maps, class_maps(randomised(self.model, modules, s), batch, classes)).mean().item()
                       for s in range(3)])  # fmt: skip
        gain = deletion_drop(self.model, batch, maps, classes) - deletion_drop(
            self.model, batch, random_maps(maps), classes
        )
        return float(rho), float(gain.mean())

    @torch.inference_mode()
    def curves(self, batch: torch.Tensor, heat: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Deletion and insertion curves of ``target``'s probability, pixels taken in ``heat``'s order."""
        b, _, h, w = batch.shape
        # Ties (flat zero regions) are broken by a fixed tiny ramp, the same for both models.
        order = (heat.flatten(1) + torch.linspace(0, 1e-6, h * w)).argsort(1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(h * w).expand(b, -1).contiguous())
        rank = rank.view(b, 1, h, w)
        blurred = torch.stack([self._blur(x) for x in batch])  # insertion starts from the image without detail
        deletion, insertion = [], []
        for step in range(STEPS + 1):
            taken = rank < round(step / STEPS * h * w)
            deleted = torch.where(taken, torch.zeros_like(batch), batch)  # 0 = the mean colour after normalising
            inserted = torch.where(taken, batch, blurred)
            both = self.model(torch.cat([deleted, inserted])).class_logits.float().softmax(1)
            p = both.gather(1, torch.cat([target, target])[:, None])[:, 0]
            deletion.append(p[:b])
            insertion.append(p[b:])
        return _auc(torch.stack(deletion, 1)), _auc(torch.stack(insertion, 1))

    @staticmethod
    def _blur(x: torch.Tensor) -> torch.Tensor:
        k = 9
        g = torch.exp(-((torch.arange(k) - k // 2) ** 2) / (2 * 2.5**2))
        g = (g / g.sum()).to(x)
        y = F.conv2d(F.pad(x[:, None], (k // 2, k // 2, 0, 0), mode="reflect"), g.view(1, 1, 1, k))
        return F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), g.view(1, 1, k, 1))[:, 0]


def score(package: Path, cfg: SynthConfig, data: Path, curve_images: int, batch_size: int = 100) -> dict[str, float]:
    """Return every metric of one model on ``data``'s test split (see the module docstring)."""
    scorer = Scorer(package)
    protos = class_prototypes(cfg.num_classes, cfg.seed)
    info = load_dataset_info(data)
    samples = [s for p in info.shard_paths("test") for s in iter_shard(p)]
    names = ("correct", "swap_follows", "swap_correct", "point", "mass", "ceiling", "zero_map", "area")
    attr_rows: list[tuple[np.ndarray, np.ndarray, int]] = []
    sanity: list[tuple[float, float]] = []
    rows: dict[str, list[float]] = {k: [] for k in (*names, "deletion", "insertion")}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        indices = [int(s["__key__"].rsplit("_", 1)[1]) for s in chunk]
        images = [np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in chunk]
        drawn = [render_object(cfg, protos, "test", i) for i in indices]
        labels = torch.tensor([d.record["class"] for d in drawn])
        # another class's background, chosen deterministically and spread over the classes
        n = cfg.num_classes
        others = [(int(lab) + 1 + i % (n - 1)) % n for lab, i in zip(labels, indices, strict=True)]
        swapped = [_encode_decode(render_object(cfg, protos, "test", i, background_class=o).image)
                   for i, o in zip(indices, others, strict=True)]  # fmt: skip
        batch = scorer.pixels(images)
        probs, maps = scorer.probs_and_maps(batch)
        pred = probs.argmax(1)
        swap_pred = scorer.probs_and_maps(scorer.pixels(swapped))[0].argmax(1)
        mask = torch.from_numpy(np.stack([d.mask for d in drawn])).float()
        heat = F.interpolate(maps[:, None], size=mask.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        heat = heat.clamp(min=0)
        total = heat.flatten(1).sum(1)
        zero = total <= 0
        peak = heat.flatten(1).argmax(1)
        point = mask.flatten(1).gather(1, peak[:, None])[:, 0] > 0
        mass = (heat * mask).flatten(1).sum(1) / total.clamp(min=1e-12)
        rows["correct"] += (pred == labels).float().tolist()
        rows["swap_follows"] += (swap_pred == torch.tensor(others)).float().tolist()
        rows["swap_correct"] += (swap_pred == labels).float().tolist()
        rows["point"] += (point & ~zero).float().tolist()  # an all-zero map points nowhere: a miss
        rows["mass"] += torch.where(zero, torch.zeros_like(mass), mass).tolist()
        rows["ceiling"] += _ideal_mass(mask, tuple(maps.shape[-2:])).tolist()
        rows["zero_map"] += zero.float().tolist()
        rows["area"] += mask.flatten(1).mean(1).tolist()
        for p, d in zip(scorer.attribute_probs(batch).numpy(), drawn, strict=True):
            attr_rows.append((p, np.asarray(d.record["attributes"]), d.record["class"]))
        if len(rows["deletion"]) < curve_images:
            sanity.append(scorer.sanity(batch, pred))
            d, ins = scorer.curves(batch, heat, pred)
            rows["deletion"] += d.tolist()
            rows["insertion"] += ins.tolist()
    correct = np.array(rows["correct"]) > 0.5
    point, mass, ceiling = (np.array(rows[k]) for k in ("point", "mass", "ceiling"))

    def part(values: np.ndarray, where: np.ndarray) -> float:
        return float(values[where].mean()) if where.any() else float("nan")

    probs_a, truth_a = np.stack([r[0] for r in attr_rows]), np.stack([r[1] for r in attr_rows])
    split = prototype_metrics(probs_a, truth_a, None, np.array([r[2] for r in attr_rows]), info.class_attributes)

    return {
        "top1": float(correct.mean()),
        "swap_follows_background": float(np.mean(rows["swap_follows"])),
        "swap_top1": float(np.mean(rows["swap_correct"])),
        "pointing": float(point.mean()),
        "pointing_correct": part(point, correct),
        "pointing_wrong": part(point, ~correct),
        "mass": float(mass.mean()),
        "mass_norm": float((mass / ceiling).mean()),
        "mass_norm_correct": part(mass / ceiling, correct),
        "mass_norm_wrong": part(mass / ceiling, ~correct),
        "ideal_mass": float(ceiling.mean()),
        "object_area": float(np.mean(rows["area"])),  # what a uniform map's mass would be
        "zero_maps": float(np.sum(rows["zero_map"])),
        "deletion_auc": float(np.mean(rows["deletion"])),
        "insertion_auc": float(np.mean(rows["insertion"])),
        "map_hw": float(maps.shape[-1]),
        "attr_acc_off_prototype": float(split["attr_acc_off_prototype"]),
        "attr_acc_on_prototype": float(split["attr_acc_on_prototype"]),
        "randomisation_rho": float(np.mean([r for r, _ in sanity])),
        "deletion_vs_random": float(np.mean([g for _, g in sanity])),
    }


# (key, label, +1 when larger is better for EAT's claim, -1 when smaller is)
METRICS: list[tuple[str, str, int]] = [
    ("top1", "test top-1", 1),
    ("attr_acc_off_prototype", "attr acc, off-prototype", 1),
    ("attr_acc_on_prototype", "attr acc, on-prototype", 1),
    ("swap_follows_background", "swap: follows background", -1),
    ("swap_top1", "swap: top-1", 1),
    ("pointing", "pointing game (all)", 1),
    ("pointing_correct", "pointing, correct preds", 1),
    ("pointing_wrong", "pointing, wrong preds", 1),
    ("mass", "map mass on object", 1),
    ("mass_norm", "mass / ideal ceiling", 1),
    ("mass_norm_correct", "mass / ceiling, correct", 1),
    ("mass_norm_wrong", "mass / ceiling, wrong", 1),
    ("deletion_auc", "deletion AUC (lower better)", -1),
    ("insertion_auc", "insertion AUC", 1),
    ("zero_maps", "all-zero class maps", -1),
    ("randomisation_rho", "rho vs randomised top (lower)", -1),
    ("deletion_vs_random", "deletion drop - random maps'", 1),
]


def interval(diffs: list[float]) -> tuple[float, float, float, float]:
    """Return (mean, sd, 95 % interval low, high) of paired differences (t-interval over seeds)."""
    if not diffs:
        return (float("nan"),) * 4
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = statistics.stdev(diffs)
    half = T975.get(len(diffs) - 1, 1.96) * sd / len(diffs) ** 0.5
    return mean, sd, mean - half, mean + half


def _table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'metric':30s} " + " ".join(f"{'seed ' + str(r['seed']):>17s}" for r in results)
             + f" {'EAT - baseline (mean ± sd)':>27s} {'95 % interval':>18s} {'EAT better':>11s}"]  # fmt: skip
    lines.append(f"{'':30s} " + " ".join(f"{'base / EAT':>17s}" for _ in results))
    for key, label, sign in METRICS:
        cells, diffs = [], []
        for r in results:
            b, e = r["baseline"][key], r["eat"][key]
            cells.append(f"{b:8.3f}/{e:<8.3f}" if key != "zero_maps" else f"{b:8.0f}/{e:<8.0f}")
            if not (np.isnan(b) or np.isnan(e)):
                diffs.append(e - b)
        mean, sd, low, high = interval(diffs)
        agree = sum(np.sign(d) == sign for d in diffs)
        lines.append(f"{label:30s} " + " ".join(f"{c:>17s}" for c in cells)
                     + f" {mean:+13.3f} ± {sd:<11.3f} [{low:+7.3f}, {high:+7.3f}] "
                     + f"{agree:>8d}/{len(diffs)}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/attribute_task")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--spurious", type=float, default=0.9)
    parser.add_argument("--hue-jitter", type=float, default=0.0)
    parser.add_argument("--attr-noise", type=float, default=0.08)
    parser.add_argument("--curve-images", type=int, default=100, help="test images for deletion/insertion")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per training process")
    parser.add_argument("--head", choices=sorted(HEADS), default="localised", help="EAT's attribute head")
    args = parser.parse_args()
    root = Path(args.workdir)
    started = time.time()
    results: list[dict[str, Any]] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = SynthConfig(train=args.train, val=300, test=args.test, image_size=args.image_size,
                          spurious_rate=args.spurious, spurious_hue_jitter=args.hue_jitter,
                          attr_noise=args.attr_noise, seed=seed, workers=1)  # fmt: skip
        data = root / f"seed{seed}" / "data"
        generate(cfg, data, progress=False)
        row: dict[str, Any] = {"seed": seed}
        for name, weight in (("baseline", 0.0), ("eat", 1.0)):
            run = root / f"seed{seed}" / f"attr_weight_{weight:g}"
            t0 = time.time()
            train(data, run, weight, seed, args)
            row[name] = score(run / "model", cfg, data, args.curve_images)
            row[name]["val_attr_acc"] = json.loads((run / "final_metrics.json").read_text()).get("val_attr_acc")
            row[name]["seconds"] = round(time.time() - t0, 1)
            print(f"seed {seed} {name}: " + json.dumps({k: round(v, 4) for k, v in row[name].items()
                                                        if isinstance(v, float)}), flush=True)  # fmt: skip
        results.append(row)
    minutes = (time.time() - started) / 60
    settings = {k: v for k, v in vars(args).items() if k != "workdir"}
    settings["synth"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("seed", "out", "workers")}
    print(f"\nsettings: {json.dumps(settings)}")
    print(f"run time: {minutes:.1f} min for {args.seeds} seeds x 2 models\n")
    print(_table(results))
    (root / "results.json").write_text(
        json.dumps({"settings": settings, "minutes": minutes, "seeds": results}, indent=1)
    )


if __name__ == "__main__":
    main()
