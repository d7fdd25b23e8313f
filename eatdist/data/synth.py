"""The built-in synthetic attribute corpus: one drawn object on a textured background.

A stand-in for CUB where nothing can be downloaded. Attributes come in groups (shape, body
colour, pattern, size, and the part-level top colour); each class is a prototype value per
group, and each image resamples every group with probability ``attr_noise``, so attributes vary
within a class (independently of the background). With ``spurious_rate`` > 0 the train split's
background hue follows the class (``spurious_hue_jitter`` blurs that cue); val and test
backgrounds are random, which is where attention on the object pays off.

:func:`render_object` also returns the object's pixel mask and can redraw the same object on
another class's background (the background-swap test of ``benchmarks/attribute_task.py``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from eatdist.config import SynthConfig
from eatdist.data.corpus import DatasetInfo, ShardInfo
from eatdist.data.shards import AtomicShardWriter, shard_pool
from eatdist.errors import ConfigError

SHAPES = ["round", "square", "triangular", "diamond", "cross"]
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 50, 170),
}
PATTERNS = ["plain", "striped", "dotted"]
SIZES = ["small", "medium", "large"]
SIZE_RADIUS = {"small": 0.17, "medium": 0.25, "large": 0.33}
TOPS = {"white": (245, 245, 245), "black": (20, 20, 20), "cyan": (40, 220, 230), "orange": (250, 140, 20)}

# (group, values, readable attribute name per value)
GROUPS: list[tuple[str, list[str], list[str]]] = [
    ("shape", SHAPES, [f"{s} shape" for s in SHAPES]),
    ("body colour", list(COLOURS), [f"{c} body" for c in COLOURS]),
    ("pattern", PATTERNS, [f"{p} pattern" for p in PATTERNS]),
    ("size", SIZES, [f"{s} size" for s in SIZES]),
    ("top colour", list(TOPS), [f"{t} top" for t in TOPS]),
]
SHAPE_NOUNS = {"round": "disc", "square": "square", "triangular": "triangle", "diamond": "diamond", "cross": "cross"}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def attribute_names() -> list[str]:
    """Return the readable names of all attributes, group by group."""
    return [name for _, _, names in GROUPS for name in names]


def attribute_groups() -> dict[str, list[int]]:
    """Return group name → attribute indices."""
    groups: dict[str, list[int]] = {}
    start = 0
    for group, values, _ in GROUPS:
        groups[group] = list(range(start, start + len(values)))
        start += len(values)
    return groups


def class_prototypes(num_classes: int, seed: int) -> list[tuple[int, ...]]:
    """Choose one value index per group for each class, as far apart as possible.

    Prototypes differ in at least 3 groups when that many classes fit, so one noisy group never
    makes an image closer to another class.

    Raises:
        ConfigError: when more classes are asked for than distinct prototypes exist.
    """
    sizes = [len(values) for _, values, _ in GROUPS]
    combos = list(product(*[range(n) for n in sizes]))
    if num_classes > len(combos) or num_classes < 2:
        raise ConfigError(f"config key 'synth.num_classes': must be between 2 and {len(combos)}")
    order = np.random.default_rng(seed).permutation(len(combos))
    for min_distance in (3, 2, 1):
        chosen: list[tuple[int, ...]] = []
        for idx in order:
            combo = combos[idx]
            if all(sum(a != b for a, b in zip(combo, c, strict=True)) >= min_distance for c in chosen):
                chosen.append(combo)
                if len(chosen) == num_classes:
                    return chosen
    raise AssertionError("unreachable: distance 1 admits every combination")


def class_name(proto: tuple[int, ...]) -> str:
    shape, colour, pattern, size, top = (GROUPS[g][1][v] for g, v in enumerate(proto))
    pattern_word = "" if pattern == "plain" else f"{pattern} "
    return f"{size} {pattern_word}{colour} {SHAPE_NOUNS[shape]} with {top} top"


def class_attribute_matrix(prototypes: list[tuple[int, ...]], noise: float) -> list[list[float]]:
    """Return the expected frequency of each attribute in each class (C × A)."""
    rows = []
    for proto in prototypes:
        row: list[float] = []
        for g, (_, values, _) in enumerate(GROUPS):
            n = len(values)
            row.extend(1.0 - noise if v == proto[g] else noise / (n - 1) for v in range(n))
        rows.append([round(x, 4) for x in row])
    return rows


@dataclass(frozen=True)
class _Job:
    split: str
    shard_index: int
    start: int
    count: int
    path: str


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "round":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.1
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    # triangle pointing up: inside when below both slanted edges and above the base
    top, base = cy - r, cy + r * 0.8
    half_width = (yy - top) / (base - top) * r * 1.05
    return (yy >= top) & (yy <= base) & (np.abs(dx) <= half_width)


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@dataclass(frozen=True)
class Rendered:
    """One drawn sample: the ``[S, S, 3]`` uint8 image, its ``json`` record and the object's ``[S, S]`` mask."""

    image: np.ndarray
    record: dict[str, Any]
    mask: np.ndarray


def render_sample(
    cfg: SynthConfig, prototypes: list[tuple[int, ...]], split: str, index: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw sample ``index`` of ``split``: the RGB image and its contract-1 ``json`` record.

    Deterministic in (seed, split, index), whatever process draws it.
    """
    drawn = render_object(cfg, prototypes, split, index)
    return drawn.image, drawn.record


def spurious_hue(label: int, num_classes: int) -> float:
    """Return the background hue that gives class ``label`` away when the cue is on."""
    return (label + 0.5) / num_classes


def render_object(
    cfg: SynthConfig,
    prototypes: list[tuple[int, ...]],
    split: str,
    index: int,
    background_class: int | None = None,
) -> Rendered:
    """Draw sample ``index`` of ``split`` with its object mask; see :func:`render_sample`.

    With ``background_class`` the very same object (shape, colours, place, noise) is drawn on
    that class's spurious background hue instead of the sample's own: the object stays, the
    cue changes. Every random draw is made either way, so the object does not move.
    """
    rng = np.random.default_rng([cfg.seed, SPLIT_IDS.get(split, 3), index])
    size = cfg.image_size
    label = int(rng.integers(len(prototypes)))
    values = list(prototypes[label])
    for g, (_, options, _) in enumerate(GROUPS):
        if rng.random() < cfg.attr_noise:
            values[g] = int((values[g] + rng.integers(1, len(options))) % len(options))
    shape, colour, pattern, size_name, top = (GROUPS[g][1][v] for g, v in enumerate(values))

    # Background: a low-saturation hue with a soft wave and grain. In train, with probability
    # spurious_rate the hue is the class's own, a shortcut the val/test splits do not offer.
    if split == "train" and rng.random() < cfg.spurious_rate:
        hue = spurious_hue(label, len(prototypes))
        if cfg.spurious_hue_jitter > 0:  # drawn only when asked, so jitter 0 keeps the bytes as before
            hue = float((hue + rng.uniform(-cfg.spurious_hue_jitter, cfg.spurious_hue_jitter)) % 1.0)
    else:
        hue = float(rng.random())
    if background_class is not None:
        hue = spurious_hue(background_class, len(prototypes))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = _hsv_to_rgb(hue, 0.35, 0.75)
    angle, freq = rng.random() * np.pi, 2 * np.pi / (size * rng.uniform(0.25, 0.6))
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq)[..., None]
    img = base[None, None, :] * (1.0 + 0.12 * wave) + rng.normal(0, 10, (size, size, 3))

    r = SIZE_RADIUS[size_name] * size * rng.uniform(cfg.object_scale_min, cfg.object_scale_max)
    margin = r + 2
    cx, cy = rng.uniform(margin, size - margin, 2)
    mask = _shape_mask(shape, xx, yy, cx, cy, r)
    if not mask.any():  # cannot happen for the radii above; guard the bbox anyway
        mask[int(cy), int(cx)] = True
    body = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 8, 3)
    fill = np.broadcast_to(body, (size, size, 3)).copy()
    if pattern == "striped":
        period = max(3.0, r / 2.2)
        stripes = ((xx + yy) / period).astype(int) % 2 == 0
        fill[stripes] *= 0.45
    elif pattern == "dotted":
        period = max(3.0, r / 2.5)
        dots = ((xx - cx) % period - period / 2) ** 2 + ((yy - cy) % period - period / 2) ** 2 <= (period * 0.28) ** 2
        fill[dots] = 255 - fill[dots] * 0.3
    box = _box(mask)
    top_limit = box[1] + 0.35 * (box[3] - box[1])
    top_mask = mask & (yy < top_limit)
    body_mask = mask & ~top_mask
    fill[top_mask] = TOPS[top]
    img[mask] = fill[mask] + rng.normal(0, 6, (int(mask.sum()), 3))
    image = np.clip(img, 0, 255).astype(np.uint8)

    attrs = [0.0] * sum(len(v) for _, v, _ in GROUPS)
    groups = attribute_groups()
    attr_boxes: dict[str, list[int]] = {}
    for g, (group, _, _) in enumerate(GROUPS):
        a = groups[group][values[g]]
        attrs[a] = 1.0
        region = top_mask if group == "top colour" else body_mask if group in ("body colour", "pattern") else mask
        attr_boxes[str(a)] = _box(region if region.any() else mask)
    top_box = _box(top_mask if top_mask.any() else mask)
    body_box = _box(body_mask if body_mask.any() else mask)
    record = {
        "class": label,
        "attributes": attrs,
        "bbox": box,
        "attr_boxes": attr_boxes,
        "parts": {
            "top": [(top_box[0] + top_box[2]) / 2, (top_box[1] + top_box[3]) / 2],
            "body": [(body_box[0] + body_box[2]) / 2, (body_box[1] + body_box[3]) / 2],
        },
        "background_hue": round(hue, 4),
    }
    return Rendered(image, record, mask)


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    Image.fromarray(image).save(buf, format=pil_format, **({"quality": 92} if fmt != "png" else {}))
    return buf.getvalue()


def _write_shard(args: tuple[SynthConfig, list[tuple[int, ...]], _Job]) -> int:
    cfg, prototypes, job = args
    with AtomicShardWriter(job.path) as writer:
        for i in range(job.start, job.start + job.count):
            image, record = render_sample(cfg, prototypes, job.split, i)
            writer.write(
                {
                    "__key__": f"{job.split}_{i:07d}",
                    cfg.image_format: _encode(image, cfg.image_format),
                    "json": json.dumps(record).encode(),
                }
            )
    return job.count


def generate(cfg: SynthConfig, out: str | Path | None = None, progress: bool = True) -> DatasetInfo:
    """Write the synthetic corpus (shards and ``dataset.json``) and return its description.

    Raises:
        ConfigError: for sizes or rates out of range.
    """
    for key in ("image_size", "shard_size"):
        if getattr(cfg, key) < (32 if key == "image_size" else 1):
            raise ConfigError(f"config key 'synth.{key}': too small ({getattr(cfg, key)})")
    for key in ("attr_noise", "spurious_rate", "spurious_hue_jitter"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"config key 'synth.{key}': must be in [0, 1]")
    # the largest object (radius 0.33 of the frame) must fit inside it with its margin
    if not 0.0 < cfg.object_scale_min <= cfg.object_scale_max <= 1.3:
        raise ConfigError("config keys 'synth.object_scale_min/max': need 0 < min <= max <= 1.3")
    root = Path(out if out is not None else cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    prototypes = class_prototypes(cfg.num_classes, cfg.seed)
    jobs: list[_Job] = []
    splits: dict[str, list[ShardInfo]] = {}
    for split in ("train", "val", "test"):
        total = getattr(cfg, split)
        splits[split] = []
        for shard_index, start in enumerate(range(0, total, cfg.shard_size)):
            count = min(cfg.shard_size, total - start)
            name = f"{split}-{shard_index:06d}.tar"
            jobs.append(_Job(split, shard_index, start, count, str(root / name)))
            splits[split].append(ShardInfo(name, count))
    tasks = [(cfg, prototypes, job) for job in jobs]
    bar = tqdm(total=sum(j.count for j in jobs), desc="synth", unit="img", disable=not progress)
    if cfg.workers > 1 and len(jobs) > 1:
        with shard_pool(cfg.workers) as pool:
            for n in pool.imap_unordered(_write_shard, tasks):
                bar.update(n)
    else:
        for task in tasks:
            bar.update(_write_shard(task))
    bar.close()
    info = DatasetInfo(
        name="synthetic",
        classes=[class_name(p) for p in prototypes],
        attributes=attribute_names(),
        splits=splits,
        attribute_groups=attribute_groups(),
        class_attributes=class_attribute_matrix(prototypes, cfg.attr_noise),
        root=root,
    )
    info.save(root)
    return info
