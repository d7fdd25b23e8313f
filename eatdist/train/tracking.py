"""Experiment trackers through Accelerate (``train.log_with``): TensorBoard, W&B, MLflow, ...

eatdist chooses the names, where local trackers write, the hyper-parameters (the resolved config,
flattened) and how images are logged; Accelerate's trackers do the writing. Nothing here reaches
the network unless the user configured a tracker that does (W&B online, a remote MLflow server).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from eatdist.config import Config, TrainConfig, config_to_dict
from eatdist.errors import ConfigError, close_matches

log = logging.getLogger(__name__)
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"


def tracker_names(cfg: TrainConfig) -> list[str]:
    """Return the trackers ``train.log_with`` asks for, in order, without duplicates.

    Raises:
        ConfigError: for a name Accelerate does not know, or a tracker whose package is not installed.
    """
    asked = [cfg.log_with] if isinstance(cfg.log_with, str) else list(cfg.log_with)
    names = list(dict.fromkeys(n.strip().lower() for n in asked if n.strip().lower() not in ("", "none")))
    known = sorted(LOGGER_TYPE_TO_CLASS)
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"config key 'train.log_with': unknown tracker '{name}'{close_matches(name, known)}")
        if name not in available:
            raise ConfigError(f"config key 'train.log_with': tracker '{name}' is not installed (pip install {name})")
    return names


def hyperparameters(cfg: Config) -> dict[str, int | float | str | bool]:
    """Return the resolved config as flat ``section.key`` scalars (lists, mappings and None as JSON text)."""
    flat: dict[str, int | float | str | bool] = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            plain = isinstance(value, (int, float, str, bool))
            flat[f"{section}.{key}"] = value if plain else json.dumps(value)
    return flat


def init_kwargs(names: list[str], resume_step: int | None, mlflow_run_id: str | None) -> dict[str, dict[str, Any]]:
    """Return the per-tracker arguments of ``init_trackers``: where local trackers write, how they resume.

    TensorBoard's ``purge_step`` drops the events a killed run logged after its checkpoint;
    MLflow continues the run it logged to before (its history keeps what it was sent).
    """
    kwargs: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and resume_step is not None:
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    if "mlflow" in names and mlflow_run_id:
        kwargs["mlflow"] = {"run_id": mlflow_run_id}
    return kwargs


def prepare_local_stores(names: list[str], run_dir: Path) -> None:
    """Point MLflow at a file store in the run folder unless ``MLFLOW_TRACKING_URI`` is set."""
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow

        # MLflow 3 keeps its file store only on request; a local folder needs no server or database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((run_dir / MLFLOW_DIR).resolve().as_uri())


def start_trackers(acc: Accelerator, cfg: Config, resume_step: int | None, mlflow_run_id: str | None) -> str | None:
    """Start the trackers of ``train.log_with`` with the config as hyper-parameters (collective-free).

    Returns the MLflow run id (kept in the trainer state so that a resumed run logs to the same
    MLflow run), else None.
    """
    names = tracker_names(cfg.train)
    if not names:
        return None
    run_dir = Path(cfg.train.output_dir)
    if acc.is_main_process:
        prepare_local_stores(names, run_dir)
    acc.init_trackers(
        cfg.train.project, config=hyperparameters(cfg), init_kwargs=init_kwargs(names, resume_step, mlflow_run_id)
    )
    if "mlflow" in names and acc.is_main_process:
        run = acc.get_tracker("mlflow", unwrap=True)
        return getattr(getattr(run, "info", None), "run_id", None)
    return mlflow_run_id


def log_images(acc: Accelerator, tag: str, images: list[np.ndarray], step: int) -> None:
    """Log ``[H, W, 3]`` uint8 images to every tracker that takes images (main process only)."""
    if not images or not acc.is_main_process:
        return
    for tracker in acc.trackers:
        try:
            if tracker.name == "tensorboard":
                same = len({im.shape for im in images}) == 1
                batch = np.stack(images) if same else images[0][None]
                tracker.log_images({tag: batch}, step=step, dataformats="NHWC")
            elif tracker.name == "mlflow":
                import mlflow

                for i, image in enumerate(images):
                    mlflow.log_image(image, key=f"{tag}_{i}", step=step)
            elif hasattr(tracker, "log_images"):  # W&B, Aim, ClearML, SwanLab: lists of images
                tracker.log_images({tag: images}, step=step)
        except Exception as exc:  # a tracker's image call failing must not stop training
            log.warning("tracker %s could not log images: %s", tracker.name, exc)
