"""The configuration reference, generated from the config dataclasses of ``eatdist/config.py``.

Every key of :class:`eatdist.config.Config` with its type, its default and the comment written
above it in the source, one table per section. Run as a script it prints the Markdown; as a
MkDocs hook (``hooks:`` in ``mkdocs.yml``) it fills the page ``configuration.md`` where that page
says ``<!-- config-reference -->``, so the site lists every key there is and cannot drift.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the tree being documented, whether or not eatdist is installed
    sys.path.insert(0, str(REPO))

PAGE = "configuration.md"
MARKER = "<!-- config-reference -->"
FIELD = re.compile(r"^\s+(\w+)\s*:\s*(.+?)(?:\s*=\s*(.+))?$")
# What a key does where config.py has no comment above it (a test checks each names a real key).
MORE: dict[str, str] = {
    "synth.out": "Folder the corpus is written to.",
    "synth.num_classes": "Classes, each a prototype pattern over the attribute groups.",
    "synth.image_size": "Side of the square images, in pixels.",
    "synth.train": "Images in the train split.",
    "synth.val": "Images in the val split.",
    "synth.test": "Images in the test split.",
    "synth.shard_size": "Samples per shard.",
    "synth.object_scale_max": "See `synth.object_scale_min`.",
    "synth.image_format": "How images are encoded in the shards.",
    "synth.seed": "Seed of the prototypes and of every sample.",
    "synth.workers": "Processes drawing and encoding.",
    "data.root": "The corpus: a folder or a URL (`https://`, `s3://`, `gs://`, `pipe:CMD`) holding `dataset.json`.",
    "data.train_split": "Split trained on.",
    "data.val_split": "Split evaluated after each epoch.",
    "data.test_split": "Split of the final test (null: none).",
    "data.image_size": "Side of the square model input, in pixels.",
    "data.batch_size": "Images per process and step (the global batch is this x processes x `train.grad_accum`).",
    "data.num_workers": "DataLoader processes per training process.",
    "data.shuffle_buffer": "Samples each loader worker shuffles together (a block of its share).",
    "model.backbone": "A timm model name, `hf-hub:org/name`, or a plugin's backbone name (`eatdist backbones`).",
    "model.backbone_args": "Keyword arguments for the backbone's factory (timm: `timm.create_model`).",
    "model.head_hidden": "Width of a hidden layer in the heads (0: linear heads, which make Grad-CAM equal CAM).",
    "model.dropout": "Dropout before the heads.",
    "model.grad_checkpointing": "Recompute the backbone's activations in backward: less memory, more time.",
    "model.channels_last": "Train in the channels-last memory layout (faster convolutions on GPUs).",
    "loss.attr_weight": "Weight of the attribute loss; 0 trains the plain classifier (the paper's baseline).",
    "loss.attr_loss": "`bce` for per-image labels, `mse` for class-level strengths.",
    "optim.lr": "Learning rate per `optim.lr_base_batch` images of global batch.",
    "optim.lr_base_batch": "Global batch `optim.lr` is given for; null uses `optim.lr` as it is.",
    "optim.weight_decay": "Decoupled weight decay.",
    "optim.warmup_epochs": "Epochs of linear warmup (fractions allowed).",
    "optim.min_lr_ratio": "The cosine schedule ends at this fraction of the learning rate.",
    "optim.clip_grad": "Gradient norm clipping (null: none).",
    "optim.momentum": "Momentum of `sgd` and `momentum`.",
    "optim.decay_epochs": "`step` schedule: epochs between decays.",
    "optim.decay_rate": "`step` schedule: factor at each decay.",
    "train.output_dir": "The run folder: config, logs, checkpoints, the model package.",
    "train.epochs": "Epochs to train.",
    "train.grad_accum": "Steps accumulated per optimizer update.",
    "train.mixed_precision": "Autocast precision (`bf16` on recent GPUs).",
    "train.seed": "Seed of the model, the shuffles and the augmentation.",
    "train.log_every": "Steps between loss logs.",
    "train.final_test": "Evaluate the test split after training.",
    "train.compile": "`torch.compile` the model.",
    "train.keep_checkpoints": "Checkpoints kept (the newest).",
    "train.ema_decay": "Decay of the weight average.",
    "explain.attr_threshold": "An attribute is named only when its probability is above this.",
    "explain.max_contrasts": "Characteristic attributes of the class the image lacks, said apart (at most).",
    "explain.min_attr_gain": "See `explain.min_attr_acc`.",
    "explain.batch_size": "Images per forward pass.",
    "explain.overlay_format": "Image format of the overlays.",
    "explain.channels_last": "See `explain.bf16`.",
}


def field_comments(cls: type) -> dict[str, str]:
    """Return each field's comment: the ``#`` lines just above it in the class body, joined, else
    the comment at the end of its own line."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = FIELD.match(line)
        if match and not stripped.startswith(("def ", "@")):
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            comments[match.group(1)] = " ".join(pending) or trailing
        pending = []
    return comments


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def keys(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Return (dotted key, type, default, comment) for every leaf key of ``cls`` (default: the whole Config)."""
    from eatdist.config import Config

    cls = cls or Config
    comments = field_comments(cls)
    found: list[tuple[str, str, Any, str]] = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        value = _default(field)
        if dataclasses.is_dataclass(value):
            found += keys(type(value), f"{key}.")
        else:
            found.append((key, str(field.type), value, comments.get(field.name) or MORE.get(key, "")))
    return found


def render() -> str:
    """Return the Markdown reference: one section per config section, one table row per key."""
    from eatdist.config import Config

    parts: list[str] = []
    for section in dataclasses.fields(Config):
        cls = type(_default(section))
        doc = " ".join((inspect.getdoc(cls) or "").split())
        parts += [f"## `{section.name}`", "", doc, "", "| key | type | default | what it does |"]
        parts += ["| --- | --- | --- | --- |"]
        for key, type_name, value, comment in keys(cls, f"{section.name}."):
            default = json.dumps(value)
            parts.append(f"| `{key}` | `{_cell(type_name)}` | `{_cell(default)}` | {_cell(comment) or '-'} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: put the generated reference into ``configuration.md``."""
    if page.file.src_uri == PAGE:
        return markdown.replace(MARKER, render())
    return markdown


if __name__ == "__main__":
    print(render())
