"""The model side of explanation: one forward per batch, predictions and maps moved to the host once."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from eatdist.config import ExplainConfig
from eatdist.data.pipeline import Preprocess, build_transform
from eatdist.errors import ConfigError
from eatdist.explain.cam import explanation_maps, normalise_maps
from eatdist.explain.text import attribute_contributions, explanation_text
from eatdist.models.eat import EATModel
from eatdist.models.package import PackageMeta


@dataclass
class BatchResult:
    """A batch's predictions as host arrays and lists (one device-to-host copy per field)."""

    classes: list[int]
    confidence: list[float]
    top: list[list[int]]  # [B, K] attribute indices, by contribution
    top_probs: list[list[float]]
    top_contributions: list[list[float]]
    attr_probs: list[list[float]]  # [B, A]
    peaks: list[list[float]]  # [B, 1 + K] map maxima before normalisation
    maps: np.ndarray  # [B, 1 + K, h, w] float16, each map scaled to a maximum of 1

    def __len__(self) -> int:
        return len(self.classes)

    def record(self, b: int, meta: PackageMeta) -> dict[str, Any]:
        """Return image ``b``'s ``json`` fields (the text included)."""
        c = self.classes[b]
        names = [meta.attributes[a] for a in self.top[b]]
        text = explanation_text(meta.classes[c], self.confidence[b], names)
        return {
            "class": c,
            "class_name": meta.classes[c],
            "confidence": round(self.confidence[b], 5),
            "top_attributes": [
                {"index": a, "name": name, "probability": round(p, 5), "contribution": round(q, 5)}
                for a, name, p, q in zip(self.top[b], names, self.top_probs[b], self.top_contributions[b], strict=True)
            ],
            "attribute_probabilities": [round(p, 4) for p in self.attr_probs[b]],
            "map_peaks": [round(p, 5) for p in self.peaks[b]],
            "text": text,
            "model_id": meta.model_id,
        }


class Explainer:
    """Explains batches of images with one model: class, attributes, text and maps."""

    def __init__(self, model: EATModel, meta: PackageMeta, cfg: ExplainConfig, device: torch.device) -> None:
        for key, value, least in (("explain.batch_size", cfg.batch_size, 1), ("explain.top_k", cfg.top_k, 0)):
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
        """Top attributes and maps for the outputs of :meth:`forward`, moved to the host as arrays."""
        class_probs = out.class_logits.float().softmax(1)
        confidence, classes = class_probs.max(1)
        attr_probs = out.attr_logits.float().sigmoid()
        contributions = attribute_contributions(attr_probs, classes, self.class_attributes)
        top = contributions.topk(self.top_k, dim=1).indices
        raw = explanation_maps(self.model, batch, out.features.float(), classes, top)
        peaks = raw.flatten(2).amax(2)
        maps = normalise_maps(raw).to(torch.float16)
        return BatchResult(
            classes=classes.tolist(),
            confidence=confidence.tolist(),
            top=top.tolist(),
            top_probs=attr_probs.gather(1, top).tolist(),
            top_contributions=contributions.gather(1, top).tolist(),
            attr_probs=attr_probs.tolist(),
            peaks=peaks.tolist(),
            maps=maps.cpu().numpy(),
        )

    def infer(self, pixels: torch.Tensor) -> BatchResult:
        """Return the predictions and maps of a transformed ``[B, 3, S, S]`` batch."""
        # Non-linear heads need autograd for their maps, which inference mode forbids.
        mode = torch.inference_mode() if self.model.linear_heads else torch.no_grad()
        with mode:
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
            records.append({"json": record, "txt": record["text"], "maps": result.maps[b]})
        return records
