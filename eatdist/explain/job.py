"""Distributed batch explanation: input shards in, one explanation shard per input shard out.

Each rank takes whole input shards (``sorted(inputs)[rank::world]``). An output shard is
written under a temporary name and renamed when complete, with its report written just before;
a rerun skips every shard whose output exists, so a killed job rerun explains each input key
exactly once.
"""

from __future__ import annotations

import glob
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eatdist import dist
from eatdist.config import ExplainConfig
from eatdist.data.corpus import DATASET_FILE
from eatdist.data.pipeline import BadSample, Preprocess, build_transform, decode_image
from eatdist.data.shards import AtomicShardWriter, iter_shard
from eatdist.errors import ConfigError, DataError
from eatdist.explain.cam import explanation_maps, normalise_maps
from eatdist.explain.overlay import overlay
from eatdist.explain.text import attribute_contributions, explanation_text
from eatdist.models.eat import EATModel
from eatdist.models.package import PackageMeta, load_package

log = logging.getLogger(__name__)
REPORTS = "_reports"
SUMMARY = "explain_summary.json"


def resolve_inputs(pattern: str | list[str]) -> list[str]:
    """Return the sorted input shard paths: a folder's ``*.tar``, a glob, one file, or a list.

    Raises:
        DataError: when nothing matches, or a listed file is missing.
    """
    if isinstance(pattern, list):
        for p in pattern:
            if not Path(p).is_file():
                raise DataError(f"input shard not found: {p}")
        found = sorted(set(pattern))
    elif Path(pattern).is_dir():
        found = sorted(str(p) for p in Path(pattern).glob("*.tar"))
    else:
        found = sorted(glob.glob(pattern))
    if not found:
        raise DataError(f"no input shards match '{pattern}'")
    # One output shard per input name: two inputs of the same name would overwrite each other.
    names: dict[str, str] = {}
    for p in found:
        if Path(p).name in names:
            raise DataError(f"input shards {names[Path(p).name]} and {p} have the same name; explain them apart")
        names[Path(p).name] = p
    return found


def assign_shards(paths: list[str], rank: int, world: int) -> list[str]:
    """Return this rank's whole shards; ranks beyond the shard count get none."""
    return paths[rank::world]


@dataclass
class ShardReport:
    """What happened to one input shard."""

    input: str
    output: str
    rank: int = 0
    explained: int = 0
    undecodable: list[dict[str, str]] = field(default_factory=list)


class Explainer:
    """Explains batches of images with one model: class, attributes, text and maps."""

    def __init__(self, model: EATModel, meta: PackageMeta, cfg: ExplainConfig, device: torch.device) -> None:
        self.model, self.meta, self.cfg, self.device = model.to(device).eval(), meta, cfg, device
        self.preprocess = Preprocess.from_json(meta.preprocess)
        self.transform = build_transform(self.preprocess, train=False)
        self.class_attributes = (
            torch.tensor(meta.class_attributes, dtype=torch.float32, device=device)
            if meta.class_attributes is not None
            else None
        )
        for key, value in (("explain.batch_size", cfg.batch_size), ("explain.top_k", cfg.top_k)):
            if value < (1 if key == "explain.batch_size" else 0):
                raise ConfigError(f"config key '{key}': must be positive, got {value}")
        self.top_k = min(cfg.top_k, len(meta.attributes))

    @torch.no_grad()
    def explain(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Return one record per image: ``json`` fields, ``txt`` and the ``[1 + K, h, w]`` maps."""
        tensors = [self.transform(torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)) for im in images]
        batch = torch.stack(tensors).to(self.device)
        out = self.model(batch)
        class_probs = out.class_logits.float().softmax(1)
        confidence, classes = class_probs.max(1)
        attr_probs = out.attr_logits.float().sigmoid()
        contributions = attribute_contributions(attr_probs, classes, self.class_attributes)
        top = contributions.topk(self.top_k, dim=1).indices
        raw = explanation_maps(self.model, batch, out.features.float(), classes, top)
        peaks = raw.flatten(2).amax(2)
        maps = normalise_maps(raw).cpu().numpy().astype(np.float16)
        records = []
        for b in range(len(images)):
            c = int(classes[b])
            names = [self.meta.attributes[int(a)] for a in top[b]]
            text = explanation_text(self.meta.classes[c], float(confidence[b]), names)
            records.append(
                {
                    "json": {
                        "class": c,
                        "class_name": self.meta.classes[c],
                        "confidence": round(float(confidence[b]), 5),
                        "top_attributes": [
                            {
                                "index": int(a),
                                "name": self.meta.attributes[int(a)],
                                "probability": round(float(attr_probs[b, a]), 5),
                                "contribution": round(float(contributions[b, a]), 5),
                            }
                            for a in top[b]
                        ],
                        "attribute_probabilities": [round(float(p), 4) for p in attr_probs[b]],
                        "map_peaks": [round(float(p), 5) for p in peaks[b]],
                        "text": text,
                        "model_id": self.meta.model_id,
                    },
                    "txt": text,
                    "maps": maps[b],
                }
            )
        return records


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _true_class(sample: dict[str, Any]) -> int | None:
    try:
        label = json.loads(sample["json"]).get("class")
    except Exception:  # images alone, or a json we do not need: no ground truth
        return None
    return label if isinstance(label, int) and not isinstance(label, bool) else None


def explain_shard(
    explainer: Explainer, in_path: str, out_dir: Path, bar: tqdm | None = None, rank: int = 0
) -> ShardReport:
    """Explain every decodable image of ``in_path`` into ``out_dir/<same name>``; return the report."""
    name = Path(in_path).name
    report = ShardReport(input=in_path, output=str(out_dir / name), rank=rank)
    pending: list[tuple[dict[str, Any], Image.Image]] = []
    fmt = explainer.cfg.overlay_format

    def flush(writer: AtomicShardWriter) -> None:
        records = explainer.explain([im for _, im in pending])
        for (sample, image), rec in zip(pending, records, strict=True):
            record = dict(rec["json"], source_shard=name)
            truth = _true_class(sample)
            if truth is not None:
                record["true_class"] = truth
            writer.write(
                {
                    "__key__": sample["__key__"],
                    "json": json.dumps(record).encode(),
                    "txt": rec["txt"].encode(),
                    "heatmaps.npy": _npy_bytes(rec["maps"]),
                    f"overlay.{fmt}": overlay(
                        image, rec["maps"][0].astype(np.float32), explainer.cfg.overlay_alpha, fmt
                    ),
                }
            )
        report.explained += len(pending)
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    # A killed run may have left this shard's temporary file; only this rank writes this shard.
    for stale in out_dir.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
    with AtomicShardWriter(out_dir / name) as writer:
        for sample in iter_shard(in_path):
            try:
                image = decode_image(sample)
            except BadSample as exc:
                report.undecodable.append({"key": sample["__key__"], "reason": str(exc)})
                log.warning("cannot explain %s in %s: %s", sample["__key__"], name, exc)
                if bar is not None:
                    bar.update(1)
                continue
            pending.append((sample, image))
            if len(pending) == explainer.cfg.batch_size:
                flush(writer)
        if pending:
            flush(writer)
        # The report lands before the shard's rename: a finished shard always has its report.
        reports = out_dir / REPORTS
        reports.mkdir(exist_ok=True)
        (reports / f"{name}.json").write_text(json.dumps(report.__dict__, indent=1))
    return report


def _planned_samples(paths: list[str]) -> int | None:
    """Sum the counts ``dataset.json`` gives for ``paths``, when they come from a corpus."""
    counts: dict[str, int] = {}
    for folder in {Path(p).parent for p in paths}:
        try:
            data = json.loads((folder / DATASET_FILE).read_text())
            for shards in data.get("splits", {}).values():
                for s in shards:
                    counts[str(folder / s["file"])] = int(s["samples"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    try:
        return sum(counts[p] for p in paths)
    except KeyError:
        return None


def summarise(out_dir: Path, inputs: list[str]) -> dict[str, Any]:
    """Gather the per-shard reports of a finished job into one summary (and write it)."""
    explained, undecodable, missing = 0, [], []
    for path in inputs:
        report_file = out_dir / REPORTS / f"{Path(path).name}.json"
        if not report_file.is_file():
            missing.append(path)
            continue
        report = json.loads(report_file.read_text())
        explained += report["explained"]
        undecodable += [dict(u, shard=Path(path).name) for u in report["undecodable"]]
    summary = {
        "input_shards": len(inputs),
        "explained": explained,
        "undecodable": len(undecodable),
        "undecodable_samples": undecodable,
        "incomplete_shards": missing,
        "output": str(out_dir),
    }
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary


def run_explain(
    model_path: str | Path, pattern: str | list[str], output: str | Path, cfg: ExplainConfig
) -> dict[str, Any] | None:
    """Explain this rank's share of the input shards; rank 0 returns the job summary.

    Raises:
        DataError: when no input matches; ModelPackageError for a bad model package.
    """
    inputs = resolve_inputs(pattern)
    joined = dist.init_process_group()
    rank, world = dist.rank(), dist.world_size()
    device = dist.device()
    model, meta = load_package(model_path, device)
    explainer = Explainer(model, meta, cfg, device)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = assign_shards(inputs, rank, world)
    todo = [p for p in mine if not (out_dir / Path(p).name).exists()]
    if len(todo) < len(mine):
        log.info("rank %d: %d of %d shards already explained, skipping them", rank, len(mine) - len(todo), len(mine))
    bar = tqdm(total=_planned_samples(todo), desc="explain", unit="img", disable=rank != 0, dynamic_ncols=True)
    for path in todo:
        try:
            explain_shard(explainer, path, out_dir, bar, rank)
        except DataError as exc:  # an unreadable shard: report it, explain the others, rerun later
            log.error("rank %d: shard %s not explained: %s", rank, path, exc)
    bar.close()
    if joined:
        torch.distributed.barrier()
    return summarise(out_dir, inputs) if rank == 0 else None
