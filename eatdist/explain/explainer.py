"""The model side of explanation: one forward per batch, predictions and maps moved to the host once."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from eatdist.config import ExplainConfig
from eatdist.data.pipeline import Preprocess, build_transform
from eatdist.errors import ConfigError
from eatdist.explain.cam import explanation_maps, head_weights
from eatdist.explain.records import BatchResult, Records
from eatdist.explain.text import AttributeChooser, attribute_check, attribute_contributions, attribute_directions
from eatdist.models.eat import EATModel, EATOutput
from eatdist.models.package import PackageMeta

log = logging.getLogger(__name__)


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
        self.records = Records(meta)
        self.chooser = AttributeChooser(meta.class_attributes, self.records.groups, len(meta.attributes),
                                        self.top_k, cfg.attr_threshold, cfg.max_contrasts)  # fmt: skip
        self._heads: tuple[tuple[int, int], ...] = ()
        self._head_ids: tuple[int, ...] = ()
        self._layers: list[torch.nn.Module] = []
        self._constants()
        self.check = attribute_check(meta.metrics, meta.class_attributes, cfg.min_attr_acc, cfg.min_attr_gain)
        if not self.check["reliable"]:
            log.warning("model %s: %s", meta.model_id, self.check["message"])

    def _constants(self) -> None:
        """Compute the heads' constants (:func:`attribute_directions`, the closed-form maps' weights)
        again whenever a head's weights changed (a model fine-tuned between calls, weights loaded)."""
        modules = (self.model.class_head, self.model.attr_head)
        if tuple(map(id, modules)) != self._head_ids:  # a head replaced: its layers listed again
            self._head_ids = tuple(map(id, modules))
            self._layers = [layer for head in modules for layer in head.modules()]
        heads = tuple(
            (id(p), p._version) for layer in self._layers for p in layer._parameters.values() if p is not None
        )
        if heads != self._heads:
            self._heads = heads
            self.directions = attribute_directions(self.model)
            self.head_weights = head_weights(self.model)  # None unless both heads are linear

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

    @property
    def groups(self) -> bool:
        """Whether the outputs of several forwards can be explained together (:meth:`results_of`):
        the maps come from the features alone (linear or spatial heads). Grad-CAM runs the model
        again on a batch's images, so such a model explains each batch on its own."""
        return self.model.spatial or self.model.linear_heads

    def results_of(self, forwards: list[tuple[torch.Tensor | None, Any]]) -> BatchResult:
        """Return :meth:`results` for the outputs of several :meth:`forward` calls at once, in order.

        The host's work per call (choosing the attributes, scaling the maps, later encoding the
        records) has a fixed cost that a forward pass makes larger (it leaves the caches cold), so
        a group of small batches is explained in one call (see ``explain.group_images``).

        Raises:
            ValueError: for several forwards of a model whose maps need its images (:attr:`groups`).
        """
        if len(forwards) == 1:
            return self.results(*forwards[0])
        if not self.groups:
            raise ValueError("Grad-CAM maps need each batch's images: explain its forwards one at a time")
        outs = [out for _, out in forwards]
        return self.results(None, EATOutput(*(torch.cat(parts) for parts in zip(*outs, strict=True))))

    def results(self, batch: torch.Tensor | None, out: Any) -> BatchResult:
        """Named attributes and maps for the outputs of :meth:`forward`, moved to the host as arrays.

        Few device operations per batch (each costs more than its arithmetic on small batches);
        the attributes are chosen on the host for the whole batch, and the maps are scaled there.
        ``batch`` (the model input) is needed only for Grad-CAM (not :attr:`groups`).
        """
        self._constants()
        features = out.features.float()
        confidence, classes = out.class_logits.float().softmax(1).max(1)
        contributions = attribute_contributions(self.model, features, classes, self.directions)
        numbers = torch.cat([confidence[:, None], out.attr_logits.float().sigmoid(), contributions], 1)
        numbers_h = numbers.cpu().numpy().astype(np.float64)  # float32 values, exact in float64
        classes_h = classes.tolist()
        attributes = len(self.meta.attributes)
        probs_h, contribs_h = numbers_h[:, 1 : 1 + attributes], numbers_h[:, 1 + attributes :]
        named, contrasts = self.chooser.choose(probs_h, contribs_h, classes_h)
        # One map slot per possible name; slots past an image's names are computed and dropped.
        counts = np.array([len(row) for row in named], dtype=np.int64)
        indices = np.zeros((len(named), max(1, int(counts.max()))), dtype=np.int64)
        indices[np.arange(indices.shape[1]) < counts[:, None]] = [n.index for row in named for n in row]  # row by row
        indices_d = torch.from_numpy(indices).to(features.device)
        raw = explanation_maps(self.model, batch, features, classes, indices_d, self.head_weights)
        raw_h = raw.float().cpu().numpy()
        peaks = raw_h.reshape(*raw_h.shape[:2], -1).max(2)
        maps = (raw_h / np.maximum(peaks, np.float32(1e-12))[..., None, None]).astype(np.float16)
        return BatchResult(classes_h, numbers_h[:, 0], named, contrasts, contribs_h, probs_h, peaks, maps, self.check)

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
        explained = []
        for b in range(len(images)):
            record = self.records.record(result, b)
            explained.append({"json": record, "txt": record["text"], "maps": result.image_maps(b)})
        return explained
