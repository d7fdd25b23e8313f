"""The training loop: EAT multi-task training on streamed shards, one process or many.

Accelerate does the device placement, DDP wrapping, mixed precision, gradient accumulation and
checkpoint files; this module plans the data, runs the steps and writes what a user reads.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from tqdm import tqdm

from eatdist import dist
from eatdist.atomic import write_json
from eatdist.config import Config, save_config
from eatdist.data.corpus import DatasetInfo, load_dataset_info
from eatdist.data.pipeline import SKIP_CAUSES, skip_causes_line
from eatdist.data.plan import Phase
from eatdist.data.remote import redact
from eatdist.errors import ConfigError
from eatdist.metrics.attributes import summary_line
from eatdist.metrics.prototype import prototype_line
from eatdist.models.eat import EATModel, eat_loss, localisation_loss, off_prototype_weights
from eatdist.models.heads import HeadOptions
from eatdist.models.package import PackageMeta, backbone_preprocess, build_model, save_package, weights_source
from eatdist.store import require_local
from eatdist.train.batches import Batches
from eatdist.train.checkpoint import CheckpointStore
from eatdist.train.ema import WeightAverage
from eatdist.train.evaluation import Evaluator
from eatdist.train.metrics import MetricsLogger
from eatdist.train.preempt import EXIT_PREEMPTED, PreemptionWatch
from eatdist.train.replicas import check_replicas, diverge_for_test, parameter_digest  # noqa: F401 (re-exported)
from eatdist.train.scale import (
    apply_model_options,
    configure_deepspeed,
    scaled_lr,
    uses_deepspeed,
    zero_stage,
)
from eatdist.train.schedule import build_optimizer, build_scheduler, current_lr
from eatdist.train.tracking import TENSORBOARD_DIR, log_images, start_trackers, tracker_names

log = logging.getLogger(__name__)
# The epoch's running sums: loss, steps, skipped samples, then skipped samples per cause (SKIP_CAUSES).
SUMS = 3 + len(SKIP_CAUSES)
TRAIN_OUTPUT = "training writes checkpoints, logs and the model package to a local folder"


def make_accelerator(cfg: Config) -> Accelerator:
    """Return the Accelerator for a run: gloo where there is no CUDA (CPU clusters, laptops), the
    trackers of ``train.log_with`` writing under the run folder.

    Raises:
        ConfigError: for an unknown or uninstalled tracker.
        EatdistError: when the launcher started processes that would not train one model.
    """
    dist.check_training_world()
    dist.join_restarted_group()
    several = dist.world_size() > 1
    cpu_world = several and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu_world else []
    # Without CUDA, Accelerate joins the launcher's processes only when told to use the CPU
    # (ACCELERATE_USE_CPU, which torchrun, srun and the deepspeed launcher do not set): else each
    # process trains alone. DeepSpeed finds the CPU itself, and the CPU flag would turn it off.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    run_dir = require_local(cfg.train.output_dir, "train.output_dir", TRAIN_OUTPUT)
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD_DIR))
    acc = Accelerator(
        cpu=cpu_world and not deepspeed,
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=handlers,
        log_with=tracker_names(cfg.train) or None,
        project_config=project,
    )
    dist.check_training_world(acc.num_processes if acc.distributed_type != DistributedType.NO else 1)
    return acc


def head_options(cfg: Config) -> HeadOptions:
    """The attribute-head design ``cfg.model`` asks for (raises ConfigError for a bad combination)."""
    m = cfg.model
    return HeadOptions(m.attr_head, m.attr_pool, m.attr_topk, m.class_pool)


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
    if cfg.data.decode_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'data.decode_device': 'cuda' needs a GPU; none is visible")
    if cfg.train.checkpoint_every < 0:
        raise ConfigError("config key 'train.checkpoint_every': must be >= 0 (0: at epoch ends only)")
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError("config key 'train.keep_checkpoints': must be at least 1")
    if cfg.train.log_images < 0:
        raise ConfigError("config key 'train.log_images': must be >= 0")
    if cfg.loss.off_prototype_weight <= 0:
        raise ConfigError(f"config key 'loss.off_prototype_weight': must be > 0, got {cfg.loss.off_prototype_weight}")
    head = head_options(cfg)
    if cfg.loss.localisation_weight < 0:
        raise ConfigError(f"config key 'loss.localisation_weight': must be >= 0, got {cfg.loss.localisation_weight}")
    if cfg.loss.localisation_weight > 0 and not head.spatial:
        raise ConfigError("config key 'loss.localisation_weight': needs model.attr_head=spatial (maps to localise)")
    if cfg.loss.localisation_weight > 0 and cfg.data.decode_device != "cpu":
        raise ConfigError("config key 'loss.localisation_weight': boxes follow CPU augmentation; "
                          "set data.decode_device=cpu")  # fmt: skip
    if not 0.0 <= cfg.loss.label_smoothing < 1.0:
        raise ConfigError(f"config key 'loss.label_smoothing': must be in [0, 1), got {cfg.loss.label_smoothing}")
    best_metric(cfg)


# What evaluate() reports per split, as ``<split>_<name>``; a loss is better when lower.
EVAL_METRICS = ("top1", "attr_acc", "loss", "attr_mean_ap", "attr_mean_auc")


def best_metric(cfg: Config) -> tuple[str, bool] | None:
    """Return (the validation metric ``train.keep_best`` names, whether higher is better), or None.

    ``top1`` is accepted for ``<val_split>_top1``. Raises:
        ConfigError: for a name evaluate() does not report.
    """
    name = cfg.train.keep_best
    if not name:
        return None
    split = cfg.data.val_split
    known = [f"{split}_{m}" for m in EVAL_METRICS]
    full = name if name in known else f"{split}_{name}"
    if full not in known:
        raise ConfigError(f"config key 'train.keep_best': unknown metric '{name}' (choose from {', '.join(known)})")
    return full, not full.endswith("_loss")


class Trainer:
    """Trains an :class:`EATModel` per the config; ``fit()`` runs everything, ``close()`` cleans up."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None) -> None:
        _validate(cfg)
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        acc = self.accelerator
        set_seed(cfg.train.seed)
        self.run_dir = require_local(cfg.train.output_dir, "train.output_dir", TRAIN_OUTPUT)
        self.info: DatasetInfo = load_dataset_info(cfg.data.root)
        # Wrong split names fail now, not after an epoch of training.
        for split in (cfg.data.val_split, cfg.train.explain_split):
            if split:
                self.info.shard_paths(split)
        if cfg.train.final_test and cfg.data.test_split and cfg.data.test_split not in self.info.splits:
            log.warning("corpus %s has no split '%s': no final test", redact(str(self.info.root)), cfg.data.test_split)
        model = build_model(
            cfg.model.backbone,
            cfg.model.backbone_args,
            self.info.num_classes,
            self.info.num_attributes,
            cfg.model.head_hidden,
            cfg.model.dropout,
            cfg.model.pretrained_path,
            cfg.model.pretrained,
            head_options(cfg),
        )
        self.weights_source = weights_source(model)
        model = apply_model_options(model, cfg)
        self.preprocess = backbone_preprocess(model, cfg.data.image_size)
        self.batches = Batches(cfg, self.info, self.preprocess, acc)
        self.train_data = self.batches.train_stream
        self.steps_per_epoch = self.train_data.steps
        self.updates_per_epoch = max(1, self.steps_per_epoch // cfg.train.grad_accum)
        optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg, acc.num_processes))
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.updates_per_epoch, cfg.train.epochs)
        configure_deepspeed(acc, cfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # The bare model inside whatever prepare() wrapped it in (DDP, a DeepSpeed engine): the one
        # acc.unwrap_model returns, without the DeepSpeed import it makes whenever DeepSpeed is installed.
        self.module: EATModel = model
        self.ema: WeightAverage | None = None
        if cfg.train.ema:
            if zero_stage(acc) == 3:
                raise ConfigError("config key 'train.ema': not supported with DeepSpeed ZeRO-3 (partitioned weights)")
            self.ema = WeightAverage(self.module, cfg.train.ema_decay, cfg.train.ema_warmup, acc)
        if cfg.train.compile:
            if uses_deepspeed(acc):
                raise ConfigError("config key 'train.compile': not supported together with DeepSpeed")
            self.model = torch.compile(self.model)
        # Under DeepSpeed bf16/fp16 the parameters themselves are low precision: inputs follow.
        self.input_dtype = next(self.module.parameters()).dtype
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimizer updates
        # Where the current epoch stands: its finished phases and the steps of the current one.
        self.phases: list[Phase] = []
        self.epoch_step = 0
        # Sums over all ranks of the epoch's steps so far that are in a checkpoint (see SUMS).
        self.epoch_base = [0.0] * SUMS
        self.keys: list[str] = []  # this rank's keys of the current phase, one line per step
        self.skipped_train = 0
        self.skipped_by = dict.fromkeys(SKIP_CAUSES, 0)  # the run's skipped training samples, by cause
        self.epoch_steps: list[int] = []  # steps per rank of each finished epoch
        self.last_metrics: dict[str, Any] = {}
        # Per-attribute tables of the latest evaluation of each split (final_metrics.json).
        self.attribute_tables: dict[str, Any] = {}
        self.best: dict[str, Any] = {"value": None, "epoch": 0}  # train.keep_best so far
        self.mlflow_run_id: str | None = None
        self._preview: list[Any] | None = None  # validation images explained for the trackers
        self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.train.keep_checkpoints, acc)
        self.watch = PreemptionWatch(distributed=acc.num_processes > 1 and torch.distributed.is_initialized())
        self.logger: MetricsLogger | None = None
        self.evaluator = Evaluator(cfg, self.info, acc, self.batches)
        self._prototypes: torch.Tensor | None = None  # class_attributes on the device, for the loss weights
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Return the loop's own state (model, optimizer and RNGs live in Accelerate's files).

        The data position is the epoch, its finished phases and the steps of the current phase;
        with the metric counters it lets a resumed run continue at the exact step.
        """
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "scheduler": self.scheduler.state_dict(),
            "phase": self.train_data.phase.to_json(),
            "phases": [p.to_json() for p in self.phases],
            "epoch_step": self.epoch_step,
            "epoch_sums": self._epoch_totals(),
            "skipped_train": self.skipped_train,
            "skipped_train_by": self.skipped_by,
            "epoch_steps": self.epoch_steps,
            "last_metrics": self.last_metrics,
            "attribute_tables": self.attribute_tables,
            "best": self.best,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loop's state; a different process or worker count starts a new phase."""
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.phases = [Phase.from_json(p) for p in state.get("phases", [])]
        self.epoch_step = int(state.get("epoch_step", 0))
        base = [float(v) for v in state.get("epoch_sums", [])]
        self.epoch_base = base + [0.0] * (SUMS - len(base))  # older checkpoints kept no causes
        self.skipped_train = int(state.get("skipped_train", 0))
        self.skipped_by = {c: int(state.get("skipped_train_by", {}).get(c, 0)) for c in SKIP_CAUSES}
        self.epoch_steps = [int(n) for n in state.get("epoch_steps", [])]
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.attribute_tables = dict(state.get("attribute_tables", {}))
        self.best = dict(state.get("best", {"value": None, "epoch": 0}))
        self.mlflow_run_id = state.get("mlflow_run_id")
        saved = Phase.from_json(state["phase"]) if "phase" in state else self.train_data.phase
        if self.epoch_step and saved.layout() != self.train_data.phase.layout():
            # Another world size or worker count: close the interrupted phase, plan the rest anew.
            self.phases.append(Phase(**{**saved.to_json(), "steps_done": self.epoch_step}))
            self.epoch_step = 0
        if saved.world != self.train_data.phase.world:
            if zero_stage(self.accelerator) > 0:
                raise ConfigError(
                    f"{self.run_dir}: a DeepSpeed ZeRO checkpoint resumes with the same number of processes "
                    f"(saved with {saved.world}, now {self.train_data.phase.world})"
                )
            log.warning(
                "resuming with %d processes instead of %d: the epoch continues without re-reading a sample, "
                "but the run is no longer bitwise equal to an uninterrupted one",
                self.train_data.phase.world,
                saved.world,
            )

    def checkpoints(self) -> list[Path]:
        """Return the complete checkpoints of this run, oldest first."""
        return self.store.complete()

    def save(self) -> Path:
        """Save a checkpoint at the current step (collective) and prune old ones.

        Raises:
            ReplicaError: when the ranks' parameters differ; no checkpoint of a forked run is written.
        """
        check_replicas(self.module, self.accelerator, self.global_step)
        self._write_keys()
        path = self.store.save(self.global_step, self.state_dict(), self.module)
        log.info("checkpoint %s at step %d", path, self.global_step)
        return path

    def resume(self) -> bool:
        """Load the latest complete checkpoint of the run; return False when there is none."""
        found = self.checkpoints()
        if not found:
            return False
        latest = found[-1]
        self.accelerator.load_state(str(latest))
        self.load_state_dict(self.store.load_state(latest))
        self._read_keys()
        log.info("resumed from %s (epoch %d, step %d)", latest, self.epoch + 1, self.global_step)
        return True

    def _epoch_totals(self) -> list[float]:
        """Sums over all ranks of the epoch so far (collective): see :data:`SUMS`."""
        totals = self.accelerator.reduce(self.sums.clone(), "sum") if hasattr(self, "sums") else torch.zeros(SUMS)
        return [float(t) + b for t, b in zip(totals.tolist(), self.epoch_base, strict=True)]

    def _keys_file(self) -> Path:
        phase = f"-phase{len(self.phases)}" if self.phases else ""
        return (
            self.run_dir / "ranks" / f"keys-epoch{self.epoch + 1:04d}{phase}-rank{self.accelerator.process_index}.txt"
        )

    def _write_keys(self) -> None:
        """Write this rank's keys of the current phase (``train.record_keys``): one line per step."""
        if not self.cfg.train.record_keys:
            return
        path = self._keys_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in self.keys))
        os.replace(tmp, path)

    def _read_keys(self) -> None:
        path = self._keys_file()
        if self.cfg.train.record_keys and path.is_file():
            self.keys = path.read_text().splitlines()[: self.epoch_step]

    # ----------------------------------------------------------------------------- steps
    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Run one micro-batch forward/backward (an optimizer update every ``grad_accum``).

        Returns the loss as a detached device tensor: reading it would synchronise the device.
        """
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.model):
            with acc.autocast():
                out = self.model(batch["image"])
            loss, _ = eat_loss(
                out,
                batch["label"],
                batch["attributes"],
                batch["attr_mask"],
                cfg.loss.attr_weight,
                cfg.loss.attr_loss,
                weight=batch["weight"],
                label_smoothing=cfg.loss.label_smoothing,
                entry_weight=self._entry_weights(batch),
            )
            if cfg.loss.localisation_weight > 0:
                with acc.autocast():
                    maps = self.module.attr_head.maps(out.features)
                loss = loss + cfg.loss.localisation_weight * localisation_loss(
                    maps, batch["attr_boxes"], batch["box_mask"], batch["attributes"], batch["weight"]
                )
            acc.backward(loss)
            if acc.sync_gradients:
                if cfg.optim.clip_grad:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.global_step += 1
                self.scheduler.step_update(self.global_step)
                if self.global_step == 1:
                    diverge_for_test(self.module, acc)
                if self.ema is not None:
                    self.ema.update(self.module, self.global_step)
        return loss.detach()

    def _entry_weights(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Attribute loss weights with ``loss.off_prototype_weight``; None without emphasis or a prototype matrix."""
        weight, prototypes = self.cfg.loss.off_prototype_weight, self.info.class_attributes
        if weight == 1.0 or prototypes is None:
            return None
        if self._prototypes is None:
            self._prototypes = torch.tensor(prototypes, dtype=torch.float32, device=batch["attributes"].device)
        return off_prototype_weights(batch["label"], batch["attributes"].float(), self._prototypes, weight)

    def train_epoch(self) -> dict[str, float] | None:
        """Run the rest of the current epoch; return its metrics, or None when preempted."""
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        steps = self.train_data.set_epoch(self.epoch, self.phases, self.epoch_step)
        before = sum(p.steps_done for p in self.phases)
        bar = tqdm(
            total=before + steps,
            initial=before + self.epoch_step,
            desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
            unit="step",
            dynamic_ncols=True,
            **({} if acc.is_main_process else {"disable": True}),  # TQDM_DISABLE=1 applies on the main process
        )
        # Per-rank sums of this process's steps (see SUMS); on the device, read rarely.
        self.sums = torch.zeros(SUMS, dtype=torch.float64, device=acc.device)
        window = torch.zeros(2, dtype=torch.float64, device=acc.device)
        start, images = time.time(), 0
        loader = self.batches.train()
        try:
            for _, batch in zip(range(steps - self.epoch_step), loader, strict=False):
                images += self._run_step(batch, window)
                bar.update(1)
                # checkpoints and stops only on optimizer-update boundaries
                if self.epoch_step % cfg.train.grad_accum == 0 and self._after_update(window, bar, steps):
                    return None
        finally:
            bar.close()
        totals = self._epoch_totals()
        self.skipped_train += int(totals[2])
        causes = dict(zip(SKIP_CAUSES, (int(t) for t in totals[3:]), strict=True))
        for cause, n in causes.items():
            self.skipped_by[cause] += n
        self.epoch_steps.append(before + self.epoch_step)
        self._write_keys()
        if int(totals[2]):
            acc.print(
                f"epoch {self.epoch + 1}: skipped {int(totals[2])} unusable training samples "
                f"({skip_causes_line(causes)}; see warnings)"
            )
        images_per_s = images * acc.num_processes / max(1e-9, time.time() - start)
        return {
            "train_loss": totals[0] / max(1.0, totals[1]),
            "train_skipped": int(totals[2]),
            **{f"train_skipped_{cause}": n for cause, n in causes.items()},
            "images_per_s": round(images_per_s, 1),
        }

    def _run_step(self, batch: dict[str, Any], window: torch.Tensor) -> int:
        """Train on one batch and add to the running sums; return the number of usable images."""
        skipped = int(batch.pop("skipped"))
        causes = batch.pop("skipped_by")
        if self.cfg.train.record_keys:
            self.keys.append(" ".join(batch["keys"]))
        loss = self.train_step(self.batches.to_device(batch, self.train_data, self.input_dtype)).double()
        self.epoch_step += 1
        self.sums[0] += loss
        self.sums[1] += 1
        self.sums[2] += skipped
        self.sums[3:] += causes.to(self.sums)
        window[0] += loss
        window[1] += 1
        return len(batch["keys"])

    def _after_update(self, window: torch.Tensor, bar: tqdm, steps: int) -> bool:
        """Log, checkpoint or stop after an optimizer update; return True when preempted."""
        cfg = self.cfg
        if self.global_step % cfg.train.log_every == 0:
            # The only host sync of the loop: the mean loss of the steps since the last log.
            mean, lr = float(window[0] / window[1]), current_lr(self.scheduler.optimizer)
            window.zero_()
            bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.2e}")
            if self.logger is not None:
                self.logger.log("step", self.global_step, {"loss": mean, "lr": lr})
        if self.watch.should_stop():
            bar.close()
            self.save()
            return True
        every = cfg.train.checkpoint_every
        if every and self.global_step % every == 0 and self.epoch_step < steps:
            self.save()
        return False

    def eval_model(self) -> EATModel:
        """Return the model that is evaluated and exported: the weight average with ``train.ema``."""
        if self.ema is not None:
            return self.ema.module  # type: ignore[return-value]
        return self.module

    def evaluate(self, split: str) -> dict[str, float]:
        """Evaluate the model that is exported on ``split``; keep its per-attribute table."""
        metrics, self.attribute_tables[split] = self.evaluator.evaluate(self.eval_model(), split, self.input_dtype)
        return metrics

    # ----------------------------------------------------------------------------- run
    def fit(self, resume: bool = False) -> dict[str, Any] | None:
        """Train for the configured epochs (continuing from the latest checkpoint with ``resume``),
        export the model package and return the final metrics; None when preempted (a checkpoint
        was saved: rerun with ``--resume``)."""
        acc, cfg = self.accelerator, self.cfg
        if not resume and self._restarted_by_launcher():
            acc.print(f"restart {dist.restart_count()} of the worker group: continuing from the latest checkpoint")
            resume = True
        if not resume and self.checkpoints():
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints of a run: pass --resume to continue it, "
                "or choose another train.output_dir"
            )
        resumed = resume and self.resume()
        if resume and not resumed:
            acc.print(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting from scratch")
        # A resumed run (or a rerun of one killed before its first checkpoint) drops the records
        # logged after the step it continues from.
        resume_step = self.global_step if resume else None
        self.mlflow_run_id = start_trackers(acc, cfg, resume_step, self.mlflow_run_id)
        self.logger = MetricsLogger(self.run_dir, enabled=acc.is_main_process, resume_step=resume_step, accelerator=acc)
        acc.print(
            f"training {cfg.model.backbone} on {self.info.name}: {self.info.num_samples(cfg.data.train_split)} "
            f"images, {acc.num_processes} process(es), {self.steps_per_epoch} steps/epoch per process"
            + (f"; resumed at epoch {self.epoch + 1}, step {self.global_step}" if resumed else "")
        )
        metrics: dict[str, Any] = dict(self.last_metrics)
        val = cfg.data.val_split
        while self.epoch < cfg.train.epochs:
            epoch_metrics = self.train_epoch()
            if epoch_metrics is None:
                acc.print(
                    f"preempted: checkpoint saved at epoch {self.epoch + 1}, step {self.global_step}; "
                    f"continue with 'eatdist train ... --resume' (exit code {EXIT_PREEMPTED})"
                )
                return None
            metrics = {**epoch_metrics, "lr": current_lr(self.scheduler.optimizer)}
            metrics.update(self.evaluate(val))
            self.epoch += 1
            self.phases, self.epoch_step, self.epoch_base, self.keys = [], 0, [0.0] * SUMS, []
            del self.sums
            self.last_metrics = dict(metrics)
            self.logger.log("epoch", self.global_step, {"epoch": self.epoch, **metrics})
            self._log_explained_images()
            acc.print(
                f"epoch {self.epoch}: loss {metrics['train_loss']:.4f}  val loss {metrics[f'{val}_loss']:.4f}  "
                f"val top-1 {metrics[f'{val}_top1']:.4f}  val attr acc {metrics[f'{val}_attr_acc']:.4f}"
            )
            self._keep_best(metrics)
            self.save()
        if cfg.train.final_test and cfg.data.test_split and cfg.data.test_split in self.info.splits:
            test = self.evaluate(cfg.data.test_split)
            self.logger.log("test", self.global_step, test)
            metrics.update(test)
        metrics["train_skipped_total"] = self.skipped_train
        metrics.update({f"train_skipped_total_{cause}": n for cause, n in self.skipped_by.items()})
        if self.skipped_train:
            acc.print(
                f"skipped {self.skipped_train} unusable training samples over {self.epoch} epoch(s): "
                f"{skip_causes_line(self.skipped_by)}"
            )
        if self.best["value"] is not None:
            metrics["best_epoch"] = self.best["epoch"]
        metrics["attribute_metrics"] = self.attribute_tables
        self.export(metrics)
        self._print_summary(metrics)
        self._write_rank_report()
        return metrics

    def _restarted_by_launcher(self) -> bool:
        """True when torchrun restarted the worker group of this job and the run has a checkpoint.

        The checkpoint must be newer than torchrun's agent: one left by an earlier job in the same
        folder is not continued without ``--resume``. Rank 0 decides for all.
        """
        found = self.checkpoints() if dist.restart_count() > 0 else []
        started = dist.launcher_start_time()
        decision = [bool(found) and (started is None or self.store.written_at(found[-1]) >= started)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision)
        return decision[0]

    def _print_summary(self, metrics: dict[str, Any]) -> None:
        """Print the final scores: test (else validation) top-1, attribute accuracy, worst and best attributes."""
        cfg = self.cfg
        split = cfg.data.test_split if f"{cfg.data.test_split}_top1" in metrics else cfg.data.val_split
        if f"{split}_top1" not in metrics:
            return
        self.accelerator.print(
            f"{split}: top-1 {metrics[f'{split}_top1']:.4f}  attribute accuracy {metrics[f'{split}_attr_acc']:.4f}"
            f"  ({metrics[f'{split}_samples']} images)"
        )
        if split in self.attribute_tables:
            self.accelerator.print(f"{split} attributes: {summary_line(self.attribute_tables[split])}")
        self.accelerator.print(f"{split}: {prototype_line(metrics, f'{split}_')}")

    def _keep_best(self, metrics: dict[str, Any]) -> None:
        """Export ``<run>/model_best`` when this epoch beats the best so far on ``train.keep_best``."""
        chosen = best_metric(self.cfg)
        if chosen is None:
            return
        name, higher = chosen
        value, best = metrics.get(name), self.best["value"]
        if value is None:
            return
        if best is None or (value > best if higher else value < best):
            self.best = {"value": value, "epoch": self.epoch, "metric": name}
            self.export({**metrics, "epoch": float(self.epoch)}, folder="model_best")
            self.accelerator.print(f"best {name} so far ({value:.4f}): {self.run_dir / 'model_best'}")

    def _log_explained_images(self) -> None:
        """Explain a few validation images with the current model and log their overlays to the trackers."""
        acc, n = self.accelerator, self.cfg.train.log_images
        if not n or not acc.is_main_process or not acc.trackers or zero_stage(acc) == 3:
            return
        from eatdist.api import ExplainedModel
        from eatdist.data.pipeline import decode_image
        from eatdist.data.shards import iter_shard

        if self._preview is None:
            self._preview = []
            for path in self.info.shard_paths(self.cfg.data.val_split):
                for sample in iter_shard(path):
                    try:
                        self._preview.append(decode_image(sample))
                    except Exception:  # an undecodable sample: skip it, the next one will do
                        continue
                    if len(self._preview) >= n:
                        break
                if len(self._preview) >= n:
                    break
        model = self.eval_model()
        explainer = ExplainedModel(model, self._package_meta({}), acc.device)
        overlays = [np.asarray(result.overlay()) for result in explainer.explain(self._preview)]
        log_images(acc, "val/explained", overlays, self.global_step)

    def _package_meta(self, metrics: dict[str, Any]) -> PackageMeta:
        cfg = self.cfg
        return PackageMeta(
            backbone=cfg.model.backbone,
            backbone_args=dict(cfg.model.backbone_args),
            head_hidden=cfg.model.head_hidden,
            head=head_options(cfg).to_json(),
            classes=self.info.classes,
            attributes=self.info.attributes,
            attribute_groups=self.info.attribute_groups,
            class_attributes=self.info.class_attributes,
            preprocess=self.preprocess.to_json(),
            dataset=self.info.name,
            # loss.attr_weight travels with the package: explanations of a baseline (0) are flagged.
            metrics={**{k: v for k, v in metrics.items() if isinstance(v, float)}, "attr_weight": cfg.loss.attr_weight},
            pretrained=self.weights_source,
        )

    def export(self, metrics: dict[str, Any], folder: str = "model") -> Path:
        """Write the model package to ``<run>/<folder>`` (and, for ``model``, the final metrics next to it).

        The weights are the evaluated model's (the weight average with ``train.ema``; else the
        whole model, gathered from all ranks under ZeRO-3), in float32, in a fresh model: loading
        the package needs neither DeepSpeed nor the training config.
        """
        acc = self.accelerator
        path = self.run_dir / folder
        if self.ema is not None:
            state = self.ema.state_dict()
        elif uses_deepspeed(acc):
            state = acc.get_state_dict(self.model)  # a collective under ZeRO-3
        else:
            state = self.module.state_dict()
        if acc.is_main_process:
            cfg = self.cfg
            model = build_model(
                cfg.model.backbone, cfg.model.backbone_args, self.info.num_classes, self.info.num_attributes,
                cfg.model.head_hidden, head=head_options(cfg),
            )  # fmt: skip
            # torch.compile's wrapper prefixes every name with _orig_mod.
            state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
            save_package(path, model, self._package_meta(metrics))
            if folder == "model":
                write_json(self.run_dir / "final_metrics.json", metrics, "the final metrics")
                acc.print(f"model package: {path}" + (" (EMA weights)" if self.ema is not None else ""))
        acc.wait_for_everyone()
        return path

    def _write_rank_report(self) -> None:
        """Each rank records its step counts and the digest of its parameters, checked equal on all ranks."""
        acc = self.accelerator
        folder = self.run_dir / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        digest = check_replicas(self.module, acc, self.global_step)
        report = {
            "rank": acc.process_index,
            "world": acc.num_processes,
            "zero_stage": zero_stage(acc),
            "steps_per_epoch": self.epoch_steps,
            "train_skipped": self.skipped_train,
            "train_skipped_by": self.skipped_by,
            "parameter_sha256": digest,
        }
        write_json(folder / f"rank-{acc.process_index}.json", report, "the rank report", indent=None)

    def close(self) -> None:
        """Flush logs and leave the process group (avoids an abort at interpreter exit)."""
        self.watch.close()
        if self.logger is not None:
            self.logger.close()
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
