"""Evaluation during training: class top-1, attribute accuracy, loss and the per-attribute table,
each sample counted once across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator

from eatdist.config import Config
from eatdist.data.corpus import DatasetInfo
from eatdist.errors import EatdistError
from eatdist.metrics.attributes import AttributeScores
from eatdist.metrics.prototype import prototype_metrics
from eatdist.models.eat import EATModel, eat_loss
from eatdist.train.batches import Batches
from eatdist.train.scale import zero_stage


class Evaluator:
    """Evaluates a model on the splits of a corpus with the run's loaders."""

    def __init__(self, cfg: Config, info: DatasetInfo, accelerator: Accelerator, batches: Batches) -> None:
        self.cfg, self.info, self.acc, self.batches = cfg, info, accelerator, batches

    @torch.no_grad()
    def evaluate(self, model: EATModel, split: str, dtype: torch.dtype) -> tuple[dict[str, float], dict[str, Any]]:
        """Return (metrics, per-attribute table) of ``model`` on ``split``.

        The metrics are class top-1, attribute accuracy, loss, mean attribute AP and AUC, samples
        and skipped samples. The table (see :func:`eatdist.metrics.attributes.attribute_table`) is
        computed by torchmetrics from every rank's scores, so every rank returns the same one.
        """
        acc, cfg = self.acc, self.cfg
        self._sync_buffers(model)
        model.eval()
        # correct, samples, attribute hits, annotated entries, skipped, class CE, attribute loss
        sums = torch.zeros(7, dtype=torch.float64, device=acc.device)
        scores = AttributeScores(self.info.num_attributes).to(acc.device)  # gathers every rank's entries
        loader = self.batches.evaluation(split)
        for batch in self._batches(loader):
            sums[4] += int(batch.pop("skipped"))
            if not batch["keys"]:
                if zero_stage(acc) == 3:  # keep the parameter all-gathers in step with busy ranks
                    size = self.batches.preprocess.image_size
                    model(torch.zeros(1, 3, size, size, device=acc.device, dtype=dtype))
                continue
            batch = self.batches.to_device(batch, loader.dataset, dtype)
            with acc.autocast():
                out = model(batch["image"])
            mask, n = batch["attr_mask"], len(batch["keys"])
            predicted = (out.attr_logits.float() > 0).float()
            truth = (batch["attributes"] > 0.5).float()
            sums[0] += (out.class_logits.argmax(1) == batch["label"]).sum()
            sums[1] += n
            sums[2] += ((predicted == truth).float() * mask).sum()
            sums[3] += mask.sum()
            _, parts = eat_loss(out, batch["label"], batch["attributes"], mask, 0.0, cfg.loss.attr_loss)
            sums[5] += parts["ce"] * n
            sums[6] += parts["attr"] * mask.sum()
            scores.update(out.attr_logits.float().sigmoid(), batch["attributes"], mask, batch["label"])
        sums = acc.reduce(sums, "sum")
        self._check_counted(split, int(sums[1]), int(sums[4]))
        table = scores.table(self.info.attributes, self.info.attribute_groups)
        probs, truth, kept, labels = (t.numpy() for t in scores.entries())
        prototype = prototype_metrics(probs, truth, kept, labels, self.info.class_attributes)
        samples, annotated = sums[1].clamp(min=1), sums[3].clamp(min=1)
        metrics = {
            f"{split}_top1": float(sums[0] / samples),
            f"{split}_attr_acc": float(sums[2] / annotated),
            f"{split}_loss": float(sums[5] / samples + cfg.loss.attr_weight * sums[6] / annotated),
            f"{split}_attr_mean_ap": table["mean_ap"],
            f"{split}_attr_mean_auc": table["mean_auc"],
            f"{split}_samples": int(sums[1]),
            f"{split}_skipped": int(sums[4]),
        }
        # on/off-prototype accuracy and AP: does the attribute head read the image or repeat the class?
        metrics.update({f"{split}_{k}": v for k, v in prototype.items()})
        return metrics, table

    def _check_counted(self, split: str, samples: int, skipped: int) -> None:
        """Make sure every sample of ``split`` was counted once across the ranks (used or skipped).

        Raises:
            EatdistError: when the count differs from ``dataset.json``'s, e.g. ranks that evaluated
                alone because the launcher joined no process group.
        """
        expected = self.info.num_samples(split)
        if samples + skipped != expected:
            raise EatdistError(
                f"evaluating '{split}' counted {samples + skipped} samples ({skipped} skipped) over "
                f"{self.acc.num_processes} process(es), but dataset.json lists {expected}: the ranks did not "
                "split it between them (see docs/launchers.md)"
            )

    def _batches(self, loader: Any) -> Iterator[dict[str, Any]]:
        """Yield the loader's batches; under ZeRO-3 also empty ones until every rank is done.

        Ranks may hold different numbers of evaluation batches. The unwrapped model runs no
        collective under DDP, so each rank just runs its own; under ZeRO-3 every forward
        all-gathers parameters, so ranks agree each step on whether anyone still has data.
        """
        if zero_stage(self.acc) != 3:
            yield from loader
            return
        iterator = iter(loader)
        while True:
            batch = next(iterator, None)
            flag = torch.tensor([0.0 if batch is None else 1.0], device=self.acc.device)
            if float(self.acc.reduce(flag, "sum")) == 0:
                return
            yield batch if batch is not None else {"keys": [], "image": torch.zeros(0), "skipped": 0}

    def _sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), those the package will hold.

        DDP broadcasts buffers before each training forward, but the forward then updates them
        with the local batch, so after training they differ slightly between ranks.
        """
        if self.acc.num_processes > 1 and torch.distributed.is_initialized():
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)
