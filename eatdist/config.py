"""Typed experiment configuration: YAML into dataclasses, with ``section.key=value`` overrides.

Unknown keys and values of the wrong type are errors naming the key, so a typo in a config
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from eatdist.atomic import write_text
from eatdist.errors import ConfigError, close_matches


@dataclass
class SynthConfig:
    """The procedurally drawn attribute corpus (``eatdist synth``)."""

    out: str = "data/synthetic"
    num_classes: int = 12
    image_size: int = 64
    train: int = 8000
    val: int = 1000
    test: int = 1000
    shard_size: int = 500
    # Chance each attribute group of an image differs from its class prototype; drawn
    # independently of the background, so it varies attributes within a class whatever the cue.
    attr_noise: float = 0.08
    # Chance a train background hue is its class's own (val/test: never): how often the cue is there.
    spurious_rate: float = 0.0
    # Uniform jitter (± hue units) around the class hue when the cue is there: 0 is an exact
    # giveaway, ~0.5 / num_classes makes neighbouring classes' cues overlap (a weaker cue).
    spurious_hue_jitter: float = 0.0
    # The object's radius is its size attribute's radius times U(object_scale_min, object_scale_max).
    object_scale_min: float = 0.92
    object_scale_max: float = 1.08
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    seed: int = 0
    workers: int = 2


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    root: str = "data/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str | None = "test"
    image_size: int = 64
    batch_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 500
    # 1.0 keeps the whole image (the synthetic "size" attribute is relative to the frame);
    # real photos usually train with 0.35 or lower.
    crop_scale_min: float = 1.0
    # "auto": JPEGs at least twice the input size decode at a reduced scale (PIL draft), others
    # through torchvision.io.decode_jpeg; "pil": PIL at full size for everything.
    decoder: Literal["auto", "pil"] = "auto"
    # "cuda": loader workers send JPEG bytes and the GPU decodes them (nvJPEG via torchvision)
    # with the resize, crop and flip; for hosts with few cores per GPU.
    decode_device: Literal["cpu", "cuda"] = "cpu"
    # Retries (exponential backoff from 0.5 s) when opening or reading a shard fails; a read
    # resumes at the sample where it failed. A shard that still fails is skipped and counted.
    retries: int = 3


@dataclass
class ModelConfig:
    """Backbone and heads (contract 3)."""

    backbone: str = "test_resnet"
    backbone_args: dict[str, Any] = field(default_factory=lambda: {"output_stride": 16})
    # timm's pretrained weights for the backbone, from the Hugging Face Hub through its cache
    # (HF_HOME; HF_HUB_OFFLINE=1 reads a cache filled elsewhere); source and revision go into the package.
    pretrained: bool = False
    # Or a local weights file (safetensors or a torch state dict) for the backbone.
    pretrained_path: str | None = None
    head_hidden: int = 0
    # The attribute head (eatdist.models.heads): "linear" over the pooled features (closed-form
    # CAM), or "spatial": one map per attribute, pooled by attr_pool (max, topk of attr_topk
    # cells, attention); class_pool "attributes" makes the class head read the cells the
    # attribute maps light up instead of the plain mean (spatial heads only).
    attr_head: Literal["linear", "spatial"] = "linear"
    attr_pool: Literal["max", "topk", "attention"] = "max"  # how a spatial head pools its maps to logits
    attr_topk: int = 4  # cells averaged by attr_pool "topk"
    class_pool: Literal["mean", "attributes"] = "mean"  # "attributes": class head pools through the maps
    dropout: float = 0.0
    grad_checkpointing: bool = False
    channels_last: bool = False


@dataclass
class LossConfig:
    """Cross-entropy on the class plus ``attr_weight`` times the attribute loss."""

    attr_weight: float = 1.0
    attr_loss: Literal["bce", "mse"] = "bce"
    # Softened class targets for the training loss (validation loss uses hard ones).
    label_smoothing: float = 0.0
    # Weight of the attribute entries where an image departs from its class's prototype
    # (class_attributes >= 0.5): the few entries only the image can answer. 1: no emphasis.
    off_prototype_weight: float = 1.0
    # Weight of the localisation loss: each attribute map's softmax mass kept inside the
    # attribute's box (``attr_boxes`` of the records; needs model.attr_head=spatial). 0: off.
    localisation_weight: float = 0.0


@dataclass
class OptimConfig:
    """timm's optimizer ``name`` (default AdamW) and schedule ``sched`` (default linear warmup, then cosine).

    ``lr`` is given per ``lr_base_batch`` images of global batch (batch_size x processes x
    grad_accum) and scaled linearly to the actual global batch; ``lr_base_batch: null`` uses
    ``lr`` as it is.
    """

    lr: float = 8e-3
    lr_base_batch: int | None = 256
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    clip_grad: float | None = 1.0
    # Any name timm.optim.create_optimizer_v2 knows: adamw, sgd (Nesterov momentum), momentum, lamb, lion, ...
    name: str = "adamw"
    momentum: float = 0.9
    # After the warmup: cosine to min_lr_ratio x lr, step (x decay_rate every decay_epochs), or constant.
    sched: Literal["cosine", "step", "constant"] = "cosine"
    decay_epochs: float = 30.0
    decay_rate: float = 0.1


@dataclass
class TrainConfig:
    """The training run."""

    output_dir: str = "runs/synthetic"
    epochs: int = 8
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    log_every: int = 20
    final_test: bool = True
    compile: bool = False
    # After training, explain this split with the model package into <output_dir>/explanations.
    explain_split: str | None = None
    # Each rank writes the keys it trained on per epoch (ranks/keys-*.txt): a data-split audit.
    record_keys: bool = False
    # A checkpoint every N optimizer steps (0: at epoch ends only), and how many to keep.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # Accelerate trackers: tensorboard, wandb, mlflow, ... (one name, a list, or [] for none).
    # metrics.jsonl is written whatever this says. MLflow logs to <output_dir>/mlruns unless
    # MLFLOW_TRACKING_URI says otherwise.
    log_with: str | list[str] = "tensorboard"
    # Project (W&B) or experiment (MLflow) name; TensorBoard logs to <output_dir>/tensorboard/<project>.
    project: str = "eatdist"
    # Validation images explained and logged per epoch to trackers that take images (0: none).
    log_images: int = 4
    # A moving average of the weights (timm's ModelEmaV3): evaluated and exported instead of the raw weights.
    ema: bool = False
    ema_decay: float = 0.9998
    # EMA warmup: the decay grows from 0 towards ema_decay over the first updates.
    ema_warmup: bool = True
    # Also export the package of the best epoch by this validation metric to <output_dir>/model_best
    # (e.g. val_top1, val_attr_acc, val_attr_mean_ap, val_loss; losses are minimised).
    keep_best: str | None = None


@dataclass
class ExplainConfig:
    """Batch explanation (``eatdist explain``)."""

    # The text names at most top_k attributes the model predicts present (p > attr_threshold),
    # ranked by their evidence for the class in this image, then at most max_contrasts
    # characteristic attributes of the class the image lacks (docs/explaining.md).
    top_k: int = 3
    attr_threshold: float = 0.5
    max_contrasts: int = 2
    # Explanations are flagged when the package's validation attribute accuracy is below
    # min_attr_acc or within min_attr_gain of always answering each attribute's common value.
    min_attr_acc: float = 0.6
    min_attr_gain: float = 0.02
    batch_size: int = 64
    # Images explained together: the outputs of consecutive forward batches (of one shard) have
    # their attributes chosen, maps scaled and records encoded in one go, which pays the host's
    # fixed cost per call once for them all; never fewer than one batch. One batch at a time
    # where pictures are drawn (overlay, attr_maps, a re-encoded image) and for Grad-CAM models.
    # Their feature maps wait on the device meanwhile.
    group_images: int = 256
    # What each output sample holds (docs/explain-outputs.md gives the cost of each part): json
    # (required), txt, heatmaps.npy, and for people overlay, attr_maps and image (the format from
    # overlay_format, or named: overlay.png). The default suits bulk jobs; `eatdist report` and
    # the Python API draw overlays from heatmaps.npy and the input image when a shard holds none.
    outputs: list[
        Literal["json", "txt", "heatmaps.npy", "overlay", "attr_maps", "image", "overlay.jpg", "overlay.png",
                "attr_maps.jpg", "attr_maps.png", "image.jpg", "image.png"]
    ] = field(default_factory=lambda: ["json", "txt", "heatmaps.npy"])  # fmt: skip
    overlay_format: Literal["jpg", "png"] = "jpg"
    # The heat colour's opacity where the map peaks; it fades to 0 where the map is low.
    overlay_alpha: float = 0.6
    # DataLoader processes that read, decode and transform; 0 does it in the main process.
    num_workers: int = 2
    # Batches (groups of group_images) waiting for the writer thread: bounds memory while the
    # device runs ahead.
    queue_batches: int = 4
    # Processes that render and encode the outputs. Null: none unless pictures are drawn on the
    # CPU (json, text, maps and a copy of the input JPEG cost less to encode than to ship); then
    # as many as num_workers beside a GPU, and beside a CPU model one without loader workers,
    # none with them. Without processes the writer thread encodes, except on a CPU where nothing
    # is drawn or there are no loader workers: there the main thread does, in line.
    encode_workers: int | None = None
    # Where overlays, attribute strips and image copies are drawn and JPEG-encoded: "auto" on the
    # model's GPU when it runs on one (nvJPEG), else on the CPU (encode_workers); "cpu" always there.
    render_device: Literal["auto", "cpu"] = "auto"
    # Where JPEG inputs are decoded: "cpu" in the DataLoader processes; "model" where the model
    # runs, a batch at a time (nvJPEG on a GPU: the loader processes only read bytes).
    decode_device: Literal["cpu", "model"] = "cpu"
    # Seconds without a heartbeat after which another process takes a shard's claim over.
    lease_s: float = 60.0
    # On a GPU: bfloat16 autocast for the forward, channels_last memory layout.
    bf16: bool = False
    channels_last: bool = False
    # Who schedules the shards: "claims" (processes claim shards in the output, the default) or
    # "ray" (this process drives a Ray cluster whose actors hold the model; pip install 'eatdist[ray]').
    engine: Literal["claims", "ray"] = "claims"
    # Ray: the cluster to join ("" = RAY_ADDRESS, else a new local one; "auto" = the one `ray start`
    # began on this machine, "ray://host:10001" = through Ray Client); actors (0 = as many as the
    # cluster's resources fit); each actor's share.
    ray_address: str = ""
    ray_actors: int = 0  # 0: as many as the cluster's resources fit
    ray_cpus_per_actor: float = 0.0  # 0: one core plus one per loader worker
    ray_gpus_per_actor: float = 1.0  # used where the cluster has GPUs; 0 runs CPU actors


@dataclass
class Config:
    """A whole experiment; each subcommand reads the sections it needs."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"config key '{key}': expected one of {choices}, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    return value


def _apply(obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            known = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown config key '{key}'{close_matches(key, known)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
            _apply(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Return ', line L, column C: problem' for a YAML error (one line, 1-based like editors)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if context and context_mark is not None:
        context += f" started at line {context_mark.line + 1}, column {context_mark.column + 1}"
    what = f"{problem} ({context})" if context else problem
    return f"{where}: not valid YAML: " + " ".join(what.split())


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value`` into the dotted key and the YAML-parsed value.

    Raises:
        ConfigError: when there is no ``=`` or the value is not valid YAML.
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is{_yaml_problem(exc).split(':', 1)[1]}") from None
    return key.strip(), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and overrides, in that order.

    Raises:
        ConfigError: for a missing or malformed file, an unknown key or a value of the wrong type.
    """
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}{_yaml_problem(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        _apply(cfg, data, "")
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config as plain data, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the record saved with every run)."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "the run's config")
