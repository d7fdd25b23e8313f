"""The training loop: EAT multi-task training on streamed shards, one process or many.

Accelerate does the device placement, DDP wrapping, mixed precision, gradient accumulation and
checkpoint files; this module plans the data, runs the steps and writes what a user reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm import tqdm

from eatdist import dist
from eatdist.config import Config, save_config
from eatdist.data.corpus import DatasetInfo, load_dataset_info
from eatdist.data.pipeline import ShardStream, make_loader
from eatdist.errors import ConfigError
from eatdist.models.eat import EATModel, eat_loss
from eatdist.models.package import PackageMeta, backbone_preprocess, build_model, save_package
from eatdist.train.metrics import MetricsLogger
from eatdist.train.scale import (
    apply_model_options,
    configure_deepspeed,
    gathered,
    scaled_lr,
    uses_deepspeed,
    zero_stage,
)
from eatdist.train.schedule import warmup_cosine

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^epoch-(\d+)$")
KEEP_CHECKPOINTS = 2


def make_accelerator(cfg: Config) -> Accelerator:
    """Return the Accelerator for a run: gloo where there is no CUDA (CPU clusters, laptops)."""
    several = dist.world_size() > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if several and not torch.cuda.is_available() else []
    return Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=handlers,
    )


def parameter_digest(model: torch.nn.Module) -> str:
    """Return a SHA-256 over every parameter's values (as float32), in name order.

    Equal digests mean equal parameters; run it inside :func:`gathered` under ZeRO-3.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _validate(cfg: Config) -> None:
    for key, value in (
        ("data.batch_size", cfg.data.batch_size),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer),
        ("train.epochs", cfg.train.epochs),
        ("train.grad_accum", cfg.train.grad_accum),
        ("train.log_every", cfg.train.log_every),
    ):
        if value < 1:
            raise ConfigError(f"config key '{key}': must be at least 1, got {value}")
    if cfg.data.num_workers < 0:
        raise ConfigError("config key 'data.num_workers': must be >= 0")


class Trainer:
    """Trains an :class:`EATModel` per the config; ``fit()`` runs everything, ``close()`` cleans up."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None) -> None:
        _validate(cfg)
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        acc = self.accelerator
        set_seed(cfg.train.seed)
        self.run_dir = Path(cfg.train.output_dir)
        self.info: DatasetInfo = load_dataset_info(cfg.data.root)
        # Wrong split names fail now, not after an epoch of training.
        for split in (cfg.data.val_split, cfg.train.explain_split):
            if split:
                self.info.shard_paths(split)
        if cfg.data.test_split and cfg.data.test_split not in self.info.splits:
            log.warning("corpus %s has no split '%s': no final test", self.info.root, cfg.data.test_split)
        model = build_model(
            cfg.model.backbone,
            cfg.model.backbone_args,
            self.info.num_classes,
            self.info.num_attributes,
            cfg.model.head_hidden,
            cfg.model.dropout,
            cfg.model.pretrained_path,
        )
        model = apply_model_options(model, cfg)
        self.preprocess = backbone_preprocess(model, cfg.data.image_size)
        stream_args = dict(
            preprocess=self.preprocess,
            batch_size=cfg.data.batch_size,
            rank=acc.process_index,
            world=acc.num_processes,
            num_workers=cfg.data.num_workers,
            seed=cfg.train.seed,
        )
        self.train_data = ShardStream(
            self.info,
            cfg.data.train_split,
            train=True,
            shuffle_buffer=cfg.data.shuffle_buffer,
            step_multiple=cfg.train.grad_accum,
            crop_scale_min=cfg.data.crop_scale_min,
            **stream_args,
        )
        self.steps_per_epoch = self.train_data.steps
        self.updates_per_epoch = max(1, self.steps_per_epoch // cfg.train.grad_accum)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=scaled_lr(cfg, acc.num_processes),
        )
        total_updates = self.updates_per_epoch * cfg.train.epochs
        warmup = min(total_updates, max(1, round(cfg.optim.warmup_epochs * self.updates_per_epoch)))
        self.scheduler = warmup_cosine(optimizer, warmup, total_updates, cfg.optim.min_lr_ratio)
        configure_deepspeed(acc, cfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if cfg.train.compile:
            if uses_deepspeed(acc):
                raise ConfigError("config key 'train.compile': not supported together with DeepSpeed")
            self.model = torch.compile(self.model)
        # Under DeepSpeed bf16/fp16 the parameters themselves are low precision: inputs follow.
        self.input_dtype = next(acc.unwrap_model(self.model).parameters()).dtype
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimizer updates
        self.skipped_train = 0
        self.rank_steps: list[int] = []
        self.logger = MetricsLogger(self.run_dir, enabled=acc.is_main_process)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Return the loop's own state (the rest lives in Accelerate's checkpoint files)."""
        return {"epoch": self.epoch, "global_step": self.global_step, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.scheduler.load_state_dict(state["scheduler"])

    def checkpoints(self) -> list[Path]:
        """Return the saved checkpoints of this run, oldest first."""
        folder = self.run_dir / "checkpoints"
        found = [
            p for p in folder.glob("epoch-*") if CHECKPOINT_RE.match(p.name) and (p / "trainer_state.json").is_file()
        ]
        return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    def save(self) -> Path:
        """Save an Accelerate checkpoint of the completed epoch and prune old ones."""
        path = self.run_dir / "checkpoints" / f"epoch-{self.epoch:04d}"
        self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()  # every rank's part is on disk before the marker
        if self.accelerator.is_main_process:
            # trainer_state.json is written last, atomically: a checkpoint without it is incomplete.
            tmp = path / "trainer_state.json.tmp"
            tmp.write_text(json.dumps(self.state_dict()))
            os.replace(tmp, path / "trainer_state.json")
            for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def resume(self) -> bool:
        """Load the latest complete checkpoint of the run; return False when there is none."""
        found = self.checkpoints()
        if not found:
            return False
        latest = found[-1]
        self.accelerator.load_state(str(latest))
        self.load_state_dict(json.loads((latest / "trainer_state.json").read_text()))
        log.info("resumed from %s (epoch %d, step %d)", latest, self.epoch, self.global_step)
        return True

    # ----------------------------------------------------------------------------- steps
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.accelerator.device
        out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        memory_format = torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format
        out["image"] = out["image"].to(dtype=self.input_dtype, memory_format=memory_format)
        return out

    def train_step(self, batch: dict[str, Any]) -> float:
        """Run one micro-batch forward/backward (an optimizer update every ``grad_accum``)."""
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.model):
            with acc.autocast():
                out = self.model(batch["image"])
            loss, _ = eat_loss(
                out, batch["label"], batch["attributes"], batch["attr_mask"], cfg.loss.attr_weight, cfg.loss.attr_loss
            )
            acc.backward(loss)
            if acc.sync_gradients:
                if cfg.optim.clip_grad:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.scheduler.step()
                self.global_step += 1
        return float(loss.detach())

    def train_epoch(self) -> dict[str, float]:
        """Run one epoch of exactly ``steps_per_epoch`` micro-batches; return its metrics."""
        acc = self.accelerator
        self.model.train()
        self.train_data.set_epoch(self.epoch)
        loader = make_loader(self.train_data, self.cfg.data.num_workers)
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}",
            unit="step",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        loss_sum, steps, skipped = 0.0, 0, 0
        keys: list[str] = []
        start = time.time()
        # The plan makes every rank's loader yield steps_per_epoch batches; zip caps it anyway.
        for _, batch in zip(range(self.steps_per_epoch), loader, strict=False):
            skipped += int(batch.pop("skipped"))
            if self.cfg.train.record_keys:
                keys += batch["keys"]
            loss = self.train_step(self._to_device(batch))
            loss_sum += loss
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if acc.is_main_process and steps % self.cfg.train.log_every == 0:
                self.logger.log("step", self.global_step, {"loss": loss, "lr": self.scheduler.get_last_lr()[0]})
        bar.close()
        self.rank_steps.append(steps)
        if self.cfg.train.record_keys:
            folder = self.run_dir / "ranks"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"keys-epoch{self.epoch + 1:04d}-rank{acc.process_index}.txt").write_text("\n".join(keys) + "\n")
        totals = acc.reduce(torch.tensor([loss_sum, steps, skipped], dtype=torch.float64, device=acc.device), "sum")
        self.skipped_train += int(totals[2])
        if int(totals[2]):
            acc.print(f"epoch {self.epoch + 1}: skipped {int(totals[2])} corrupt training samples (see warnings)")
        images_per_s = steps * self.cfg.data.batch_size * acc.num_processes / max(1e-9, time.time() - start)
        return {
            "train_loss": float(totals[0] / totals[1]),
            "train_skipped": int(totals[2]),
            "images_per_s": round(images_per_s, 1),
        }

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Return class top-1 and attribute accuracy on ``split``, each sample counted once."""
        acc = self.accelerator
        stream = ShardStream(
            self.info,
            split,
            train=False,
            preprocess=self.preprocess,
            batch_size=self.cfg.data.batch_size,
            rank=acc.process_index,
            world=acc.num_processes,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed,
        )
        model: EATModel = acc.unwrap_model(self.model)
        self._sync_buffers(model)
        model.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=acc.device)
        for batch in self._eval_batches(make_loader(stream, self.cfg.data.num_workers)):
            sums[4] += int(batch.pop("skipped"))
            if not batch["keys"]:
                if zero_stage(acc) == 3:  # keep the parameter all-gathers in step with busy ranks
                    model(self._dummy_input())
                continue
            batch = self._to_device(batch)
            with acc.autocast():
                out = model(batch["image"])
            mask = batch["attr_mask"]
            predicted = (out.attr_logits.float() > 0).float()
            truth = (batch["attributes"] > 0.5).float()
            sums[0] += (out.class_logits.argmax(1) == batch["label"]).sum()
            sums[1] += len(batch["keys"])
            sums[2] += ((predicted == truth).float() * mask).sum()
            sums[3] += mask.sum()
        sums = acc.reduce(sums, "sum")
        return {
            f"{split}_top1": float(sums[0] / sums[1].clamp(min=1)),
            f"{split}_attr_acc": float(sums[2] / sums[3].clamp(min=1)),
            f"{split}_samples": int(sums[1]),
            f"{split}_skipped": int(sums[4]),
        }

    def _eval_batches(self, loader: Any) -> Any:
        """Yield the loader's batches; under ZeRO-3 also empty ones until every rank is done.

        Ranks may hold different numbers of evaluation batches. The unwrapped model runs no
        collective under DDP, so each rank just runs its own; under ZeRO-3 every forward
        all-gathers parameters, so ranks agree each step on whether anyone still has data.
        """
        if zero_stage(self.accelerator) != 3:
            yield from loader
            return
        iterator = iter(loader)
        while True:
            batch = next(iterator, None)
            flag = torch.tensor([0.0 if batch is None else 1.0], device=self.accelerator.device)
            if float(self.accelerator.reduce(flag, "sum")) == 0:
                return
            yield batch if batch is not None else {"keys": [], "image": torch.zeros(0), "skipped": 0}

    def _dummy_input(self) -> torch.Tensor:
        size = self.preprocess.image_size
        return torch.zeros(1, 3, size, size, device=self.accelerator.device, dtype=self.input_dtype)

    def _sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), those the package will hold.

        DDP broadcasts buffers before each training forward, but the forward then updates them
        with the local batch, so after training they differ slightly between ranks.
        """
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    # ----------------------------------------------------------------------------- run
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train for the configured epochs (continuing from the latest checkpoint with ``resume``),
        export the model package and return the final metrics."""
        acc, cfg = self.accelerator, self.cfg
        if not resume and self.checkpoints():
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints of a run: pass --resume to continue it, "
                "or choose another train.output_dir"
            )
        if resume and not self.resume():
            acc.print(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting from scratch")
        acc.print(
            f"training {cfg.model.backbone} on {self.info.name}: {self.info.num_samples(cfg.data.train_split)} "
            f"images, {acc.num_processes} process(es), {self.steps_per_epoch} steps/epoch per process"
        )
        metrics: dict[str, Any] = {}
        if self.epoch >= cfg.train.epochs:  # resumed a finished run: report its model again
            metrics = self.evaluate(cfg.data.val_split)
        while self.epoch < cfg.train.epochs:
            metrics = self.train_epoch()
            metrics.update(self.evaluate(cfg.data.val_split))
            self.epoch += 1
            self.logger.log("epoch", self.global_step, {"epoch": self.epoch, **metrics})
            acc.print(
                f"epoch {self.epoch}: loss {metrics['train_loss']:.4f}  "
                f"val top-1 {metrics[f'{cfg.data.val_split}_top1']:.4f}  "
                f"val attr acc {metrics[f'{cfg.data.val_split}_attr_acc']:.4f}"
            )
            self.save()
        if cfg.train.final_test and cfg.data.test_split and cfg.data.test_split in self.info.splits:
            test = self.evaluate(cfg.data.test_split)
            self.logger.log("test", self.global_step, test)
            metrics.update(test)
        metrics["train_skipped_total"] = self.skipped_train
        self.export(metrics)
        self._write_rank_report()
        return metrics

    def export(self, metrics: dict[str, Any]) -> Path:
        """Write the model package to ``<run>/model`` and the final metrics next to it.

        The weights are the whole model (gathered from all ranks under ZeRO-3), in float32, in a
        fresh model: loading the package needs neither DeepSpeed nor the training config.
        """
        acc = self.accelerator
        path = self.run_dir / "model"
        state = acc.get_state_dict(self.model)  # a collective under ZeRO-3
        if acc.is_main_process:
            cfg = self.cfg
            model = build_model(
                cfg.model.backbone, cfg.model.backbone_args, self.info.num_classes, self.info.num_attributes,
                cfg.model.head_hidden,
            )  # fmt: skip
            # torch.compile's wrapper prefixes every name with _orig_mod.
            state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
            meta = PackageMeta(
                backbone=self.cfg.model.backbone,
                backbone_args=dict(self.cfg.model.backbone_args),
                head_hidden=self.cfg.model.head_hidden,
                classes=self.info.classes,
                attributes=self.info.attributes,
                attribute_groups=self.info.attribute_groups,
                class_attributes=self.info.class_attributes,
                preprocess=self.preprocess.to_json(),
                dataset=self.info.name,
                metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
            )
            save_package(path, model, meta)
            (self.run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1))
            acc.print(f"model package: {path}")
        acc.wait_for_everyone()
        return path

    def _write_rank_report(self) -> None:
        """Each rank records its step counts and a digest of its parameters (divergence check)."""
        acc = self.accelerator
        folder = self.run_dir / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        model = acc.unwrap_model(self.model)
        with gathered(model, acc):
            digest = parameter_digest(model)
        report = {
            "rank": acc.process_index,
            "world": acc.num_processes,
            "zero_stage": zero_stage(acc),
            "steps_per_epoch": self.rank_steps,
            "parameter_sha256": digest,
        }
        (folder / f"rank-{acc.process_index}.json").write_text(json.dumps(report))

    def close(self) -> None:
        """Flush logs and leave the process group (avoids an abort at interpreter exit)."""
        self.logger.close()
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
