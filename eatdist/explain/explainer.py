"""The model side of explanation: one forward per batch, predictions and maps moved to the host once."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from eatdist.config import ExplainConfig
from eatdist.data.pipeline import Preprocess, build_transform
from eatdist.errors import ConfigError
from eatdist.explain.cam import explanation_maps, normalise_maps
from eatdist.explain.text import Named, attribute_check, attribute_contributions, choose_attributes, explanation_text
from eatdist.models.eat import EATModel
from eatdist.models.package import PackageMeta

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """A batch's predictions as host arrays and lists (one device-to-host copy per field)."""

    classes: list[int]
    confidence: list[float]
    named: list[list[Named]]  # per image: the attributes its text names (reasons, contrasts, then against)
    contrasts: list[list[tuple[int, int | None]]]  # per image: (characteristic attribute lacked, shown instead)
    contributions: list[list[float]]  # [B, A], see :func:`attribute_contributions`
    attr_probs: list[list[float]]  # [B, A]
    peaks: list[list[float]]  # [B, 1 + K] map maxima before normalisation (0: an all-zero map)
    maps: np.ndarray  # [B, 1 + K, h, w] float16, each map scaled to a maximum of 1; K = the most named
    check: dict[str, Any] = field(default_factory=dict)  # :func:`attribute_check` of the model
    _rounded: list[list[float]] | None = field(default=None, init=False, repr=False, compare=False)

    def rounded_probs(self, b: int) -> list[float]:
        """Return image ``b``'s attribute probabilities to 4 decimals, exactly as ``round(p, 4)``:
        a float32 probability times 1e4 is exact in float64, so one array operation rounds the batch."""
        if self._rounded is None:
            self._rounded = (np.rint(np.asarray(self.attr_probs, dtype=np.float64) * 1e4) / 1e4).tolist()
        return self._rounded[b]

    def __len__(self) -> int:
        return len(self.classes)

    def image_maps(self, b: int) -> np.ndarray:
        """Return image ``b``'s ``[1 + k, h, w]`` maps: the class, then its k named attributes."""
        return self.maps[b, : 1 + len(self.named[b])]

    def record(self, b: int, meta: PackageMeta) -> dict[str, Any]:
        """Return image ``b``'s ``json`` fields (the text included)."""
        c = self.classes[b]
        groups = _group_of(meta)
        probs, contribs = self.attr_probs[b], self.contributions[b]
        supports = [n for n in self.named[b] if n.role == "supports"]
        warning = None if self.check.get("reliable", True) else self.check["message"]
        text = explanation_text(
            meta.classes[c],
            self.confidence[b],
            [meta.attributes[n.index] for n in supports],
            [(meta.attributes[a], meta.attributes[s] if s is not None else None) for a, s in self.contrasts[b]],
            [groups.get(n.index) for n in supports],
            warning,
            [meta.attributes[n.index] for n in self.named[b] if n.role == "against"],
        )
        peaks = self.peaks[b][: 1 + len(self.named[b])]
        top = []
        for n in self.named[b]:
            item = {"index": n.index, "name": meta.attributes[n.index], "group": groups.get(n.index),
                    "probability": round(probs[n.index], 5), "contribution": round(contribs[n.index], 5),
                    "role": n.role}  # fmt: skip
            if n.instead_of is not None:
                item["instead_of"] = meta.attributes[n.instead_of]
            top.append(item)
        return {
            "class": c,
            "class_name": meta.classes[c],
            "confidence": round(self.confidence[b], 5),
            "top_attributes": top,
            "lacks": [
                {
                    "index": a,
                    "name": meta.attributes[a],
                    "probability": round(probs[a], 5),
                    "shows_instead": meta.attributes[s] if s is not None else None,
                }
                for a, s in self.contrasts[b]
            ],  # fmt: skip
            "attribute_probabilities": self.rounded_probs(b),
            "map_peaks": [float(f"{p:.5g}") for p in peaks],  # significant digits: tiny peaks stay > 0
            "zero_maps": sum(p <= 0.0 for p in peaks),
            "attribute_check": self.check,
            "text": text,
            "model_id": meta.model_id,
        }


def _group_of(meta: PackageMeta) -> dict[int, str]:
    return {i: group for group, indices in meta.attribute_groups.items() for i in indices}


class Explainer:
    """Explains batches of images with one model: class, attributes, text and maps."""

    def __init__(self, model: EATModel, meta: PackageMeta, cfg: ExplainConfig, device: torch.device) -> None:
        if not 0.0 <= cfg.attr_threshold < 1.0:
            raise ConfigError(f"config key 'explain.attr_threshold': must be in [0, 1), got {cfg.attr_threshold}")
        limits = (("explain.batch_size", cfg.batch_size, 1), ("explain.top_k", cfg.top_k, 0),
                  ("explain.max_contrasts", cfg.max_contrasts, 0))  # fmt: skip
        for key, value, least in limits:
            if value < least:
                raise ConfigError(f"config key '{key}': must be at least {least}, got {value}")
        self.meta, self.cfg, self.device = meta, cfg, device
        self.on_gpu = device.type == "cuda"
        self.channels_last = cfg.channels_last and self.on_gpu
        self.model = model.to(device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = Preprocess.from_json(meta.preprocess)
        self.transform = build_transform(self.preprocess, train=False)
        self.class_attributes = (
            torch.tensor(meta.class_attributes, dtype=torch.float32, device=device)
            if meta.class_attributes is not None
            else None
        )
        self.top_k = min(cfg.top_k, len(meta.attributes))
        self.groups = _group_of(meta)
        self.check = attribute_check(meta.metrics, meta.class_attributes, cfg.min_attr_acc, cfg.min_attr_gain)
        if not self.check["reliable"]:
            log.warning("model %s: %s", meta.model_id, self.check["message"])

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.bf16 and self.on_gpu:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run the model on a ``[B, 3, S, S]`` batch; return (the batch on the device, the outputs)."""
        batch = pixels.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return batch, self.model(batch)

    def results(self, batch: torch.Tensor, out: Any) -> BatchResult:
        """Named attributes and maps for the outputs of :meth:`forward`, moved to the host as arrays."""
        class_probs = out.class_logits.float().softmax(1)
        confidence, classes = class_probs.max(1)
        attr_probs = out.attr_logits.float().sigmoid()
        contributions = attribute_contributions(self.model, out.features, classes)
        probs_h, contribs_h, classes_h = attr_probs.tolist(), contributions.tolist(), classes.tolist()
        named, contrasts = [], []
        for b, c in enumerate(classes_h):
            row = self.meta.class_attributes[c] if self.meta.class_attributes is not None else None
            chosen, pairs = choose_attributes(probs_h[b], contribs_h[b], row, self.groups, self.top_k,
                                                self.cfg.attr_threshold, self.cfg.max_contrasts)  # fmt: skip
            named.append(chosen)
            contrasts.append(pairs)
        # One map slot per possible name; slots past an image's names are computed and dropped.
        slots = max(1, max(len(n) for n in named))
        indices = torch.tensor([[x.index for x in n] + [0] * (slots - len(n)) for n in named], device=batch.device)
        raw = explanation_maps(self.model, batch, out.features.float(), classes, indices)
        peaks = raw.flatten(2).amax(2)
        maps = normalise_maps(raw).to(torch.float16)
        return BatchResult(
            classes=classes_h,
            confidence=confidence.tolist(),
            named=named,
            contrasts=contrasts,
            contributions=contribs_h,
            attr_probs=probs_h,
            peaks=peaks.tolist(),
            maps=maps.cpu().numpy(),
            check=self.check,
        )

    def inference(self) -> contextlib.AbstractContextManager[Any]:
        """The autograd mode the maps allow: inference mode, but MLP heads need autograd (Grad-CAM)."""
        return torch.inference_mode() if self.model.linear_heads or self.model.spatial else torch.no_grad()

    def infer(self, pixels: torch.Tensor) -> BatchResult:
        """Return the predictions and maps of a transformed ``[B, 3, S, S]`` batch."""
        with self.inference():
            batch, out = self.forward(pixels)
            return self.results(batch, out)

    def explain(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Return one record per image: ``json`` fields, ``txt`` and the ``[1 + K, h, w]`` maps."""
        tensors = [self.transform(torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1))
                   for im in images]  # fmt: skip
        result = self.infer(torch.stack(tensors))
        records = []
        for b in range(len(images)):
            record = result.record(b, self.meta)
            records.append({"json": record, "txt": record["text"], "maps": result.image_maps(b)})
        return records
