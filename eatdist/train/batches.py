"""The loaders of a training run and the way from a loader batch to model inputs on the device.

Loaders are made once and kept: their workers persist across epochs and evaluations. Batches
arrive as uint8 images (or, with ``data.decode_device=cuda``, as JPEG bytes decoded here on the
GPU) and are normalised on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from eatdist.config import Config
from eatdist.data.corpus import DatasetInfo
from eatdist.data.decode import Preprocess, decode_on_device
from eatdist.data.pipeline import ShardStream, make_loader


class Batches:
    """The training loader, one loader per evaluation split, and :meth:`to_device`."""

    def __init__(self, cfg: Config, info: DatasetInfo, preprocess: Preprocess, accelerator: Accelerator) -> None:
        self.cfg, self.info, self.preprocess, self.acc = cfg, info, preprocess, accelerator
        self.train_stream = self.stream(cfg.data.train_split, train=True)
        self._train: DataLoader | None = None
        self._evaluation: dict[str, DataLoader] = {}

    def stream(self, split: str, train: bool) -> ShardStream:
        """This rank's stream of ``split``: shuffled, augmented and planned in equal steps with ``train``."""
        cfg = self.cfg
        return ShardStream(
            self.info,
            split,
            train=train,
            preprocess=self.preprocess,
            batch_size=cfg.data.batch_size,
            rank=self.acc.process_index,
            world=self.acc.num_processes,
            num_workers=cfg.data.num_workers,
            seed=cfg.train.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            crop_scale_min=cfg.data.crop_scale_min,
            step_multiple=cfg.train.grad_accum,
            retries=cfg.data.retries,
            decoder=cfg.data.decoder,
            decode_device=cfg.data.decode_device,
            boxes=train and cfg.loss.localisation_weight > 0,
        )

    def _loader(self, stream: ShardStream) -> DataLoader:
        pin = self.acc.device.type == "cuda"  # pinned host memory: the copy overlaps compute
        return make_loader(stream, self.cfg.data.num_workers, pin_memory=pin)

    def train(self) -> DataLoader:
        """The training loader, made once: its workers persist across epochs (see make_loader)."""
        if self._train is None:
            self._train = self._loader(self.train_stream)
        return self._train

    def evaluation(self, split: str) -> DataLoader:
        """The loader of an evaluation split, made on first use and kept (persistent workers)."""
        if split not in self._evaluation:
            stream = self.stream(split, train=False)
            self._evaluation[split] = self._loader(stream)
        return self._evaluation[split]

    def to_device(self, batch: dict[str, Any], stream: ShardStream, dtype: torch.dtype) -> dict[str, Any]:
        """Move a batch of ``stream`` to the device; decode (``data.decode_device``) and normalise
        its images there, as ``dtype`` in the configured memory format."""
        device = self.acc.device
        out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if batch.get("jpeg") is not None:
            self._decode_on_device(out, stream)
        memory_format = torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format
        out["image"] = self.preprocess.normalize(out["image"], dtype).contiguous(memory_format=memory_format)
        return out

    def _decode_on_device(self, out: dict[str, Any], stream: ShardStream) -> None:
        """Put the device-decoded JPEGs into the batch; one the decoder refuses gets weight 0."""
        slots = [i for i, jpeg in enumerate(out["jpeg"]) if jpeg is not None]
        decoded = decode_on_device(
            [out["jpeg"][i] for i in slots], [out["seeds"][i] for i in slots], stream.transform,
            self.acc.device, stream.train,
        )  # fmt: skip
        for i, image in zip(slots, decoded, strict=True):
            if image is None:
                out["weight"][i] = 0.0
            else:
                out["image"][i] = image

    def close(self) -> None:
        """Let go of the loaders: their worker processes exit."""
        self._train, self._evaluation = None, {}
