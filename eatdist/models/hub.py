"""Model packages on the Hugging Face Hub: ``hf-hub:org/name`` downloads, Hub-ready folders.

A Hub repository of an eatdist model holds the package itself (``model.safetensors`` and
``eatdist_model.json``), so a snapshot of it is a package folder; ``config.json`` (the shape of
the model, its preprocessing and the plugin that serves its backbone), ``attribute_metrics.json``
(the run's per-attribute tables by split) and ``README.md`` (the model card: test metrics, the
attribute table, how to load it) are for the Hub and its readers.
Downloads go through ``huggingface_hub`` into its cache (``HF_HOME``); with ``HF_HUB_OFFLINE=1``
the cache alone is read, as on cluster nodes without network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from eatdist.errors import ModelPackageError

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
TABLES_FILE = "attribute_metrics.json"
LIBRARY = "eatdist"
# A training run writes its final metrics (with the per-attribute tables) beside its package folder.
RUN_METRICS = "final_metrics.json"


def is_hub_name(path: str | Path) -> bool:
    """Return True when ``path`` names a Hub repository (``hf-hub:org/name[@revision]``)."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def repo_name(package: str | Path) -> str:
    """Return the repository ``org/name`` to publish ``package`` as: its own for a Hub name, else "ORG/NAME"."""
    if is_hub_name(package):
        return str(package).removeprefix(HUB_PREFIX).partition("@")[0]
    return "ORG/NAME"


def hub_cache() -> str:
    """Return the Hugging Face cache folder downloads use (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def not_cached(what: str) -> str:
    """Return the message for ``what`` missing from the cache: offline by choice, or the Hub out of reach."""
    from huggingface_hub import constants

    why = "downloading is off (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    fix = "fill the cache where there is network, or set HF_HOME"
    return f"{what} not in the Hugging Face cache {hub_cache()} and {why}: {fix}"


def download_package(name: str) -> Path:
    """Return the local folder of Hub package ``hf-hub:org/name[@revision]``, downloading it once into the cache.

    Raises:
        ModelPackageError: one line naming the repository, when it is not in the cache while
            ``HF_HUB_OFFLINE`` is set, does not exist, or cannot be downloaded.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from eatdist.models.package import META_FILE, WEIGHTS_FILE

    repo, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    try:
        folder = snapshot_download(
            repo,
            revision=revision or None,
            allow_patterns=[WEIGHTS_FILE, META_FILE, CONFIG_FILE, CARD_FILE, TABLES_FILE],
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ModelPackageError(not_cached(f"model package {name} is")) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:  # unknown repository, network, bad name
        raise ModelPackageError(
            f"cannot download model package {name} into {hub_cache()}: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())}"
        ) from None
    return Path(folder)


def _plugin(backbone: str) -> dict[str, Any]:
    """The plugin that serves ``backbone`` here: its name and package, and whether eatdist ships it."""
    from eatdist.models.registry import OWN_PACKAGE, backbone_provider

    found = backbone_provider(backbone)
    if found is None:
        return {"name": "", "package": "", "builtin": False}
    plugin, package = found
    return {"name": plugin, "package": package, "builtin": package.split()[0] == OWN_PACKAGE}


def _run_tables(package: Path) -> dict[str, Any]:
    """The per-attribute tables (by split) a Hub folder carries, else those of the run that wrote ``package``, or {}."""
    try:
        if (package / TABLES_FILE).is_file():
            return dict(json.loads((package / TABLES_FILE).read_text()))
        return dict(json.loads((package.parent / RUN_METRICS).read_text()).get("attribute_metrics") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(meta: Any, plugin: dict[str, Any], tables: dict[str, Any], repo: str = "ORG/NAME") -> str:
    """Return the Markdown model card of package metadata ``meta`` (YAML front matter for the Hub first)."""
    split = "test" if "test" in tables else next(iter(tables), "")
    front = ["---", f"library_name: {LIBRARY}", "pipeline_tag: image-classification", "tags:"]
    tags = (LIBRARY, "image-classification", "explainable-ai", "attributes", plugin["name"])
    front += [f"- {tag}" for tag in tags if tag]
    source = (meta.pretrained or {}).get("source", "")
    if source.startswith(HUB_PREFIX):
        front += [f"base_model: {source.removeprefix(HUB_PREFIX)}"]
    front += ["---", ""]
    lines = [
        f"# {meta.model_id or 'eatdist model'}",
        "",
        f"An eatdist EAT model trained on `{meta.dataset or 'a corpus'}`: backbone `{meta.backbone}` with a class "
        f"head ({len(meta.classes)} classes) and an attribute head ({len(meta.attributes)} attributes); each "
        "prediction is explained by the attributes the model sees, with a heatmap for each.",
        "",
        "## Use",
        "",
    ]
    if not plugin["builtin"] and plugin["package"]:
        lines += [
            f"The backbone comes from the eatdist plugin `{plugin['name']}` of package `{plugin['package']}`: "
            f"install it first (`pip install {plugin['package'].split()[0]}`).",
            "",
        ]
    lines += [
        "```python",
        "import eatdist",
        "",
        f'model = eatdist.load_model("{HUB_PREFIX}{repo}")',
        'result = model.explain("bird.jpg")',
        "print(result.text)",
        "```",
        "",
        f"or `eatdist explain --model {HUB_PREFIX}{repo} --input 'shards/*.tar' --output explanations/`.",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    metrics = {k: v for k, v in sorted(meta.metrics.items()) if k.startswith(("test_", "val_"))}
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()] or ["| (none recorded) | - |"]
    lines += ["", "## Attributes", ""]
    rows = (tables.get(split) or {}).get("attributes") or []
    if rows:
        lines += [f"On the {split} split:", "", "| attribute | accuracy | AP | AUC | positives | annotated |"]
        lines += ["| --- | --- | --- | --- | --- | --- |"]
        lines += [
            f"| {r['name']} | {_fmt(r['accuracy'])} | {_fmt(r['ap'])} | {_fmt(r['auc'])} | "
            f"{int(r['positives'])} | {int(r['count'])} |"
            for r in rows
        ]
    else:
        lines += ["| attribute |", "| --- |", *(f"| {name} |" for name in meta.attributes)]
    pre = meta.preprocess
    lines += [
        "",
        "## Preprocessing",
        "",
        f"RGB resized to {pre.get('image_size')} x {pre.get('image_size')} (no crop), scaled to [0, 1], "
        f"normalised with mean {pre.get('mean')} and std {pre.get('std')}.",
    ]
    if source:
        revision = meta.pretrained.get("revision", "")
        lines += ["", f"The backbone started from `{source}`" + (f" at revision `{revision}`." if revision else ".")]
    return "\n".join(front + lines) + "\n"


def write_hub_folder(package: str | Path, out: str | Path, repo: str | None = None) -> Path:
    """Write a Hub-ready folder of the model package at ``package`` into ``out`` and return it.

    The folder holds the package's ``model.safetensors`` and ``eatdist_model.json`` as they are,
    ``config.json``, the run's per-attribute tables when there are any (``attribute_metrics.json``)
    and the model card ``README.md``; ``hf upload ORG/NAME out`` or ``huggingface_hub.upload_folder``
    publishes it. The card names ``repo`` (default: :func:`repo_name`). Raises:
        ModelPackageError: when ``package`` is not a usable model package;
        OSError: when ``out`` cannot be written.
    """
    from eatdist.models.package import META_FILE, WEIGHTS_FILE, load_package, package_folder

    source = package_folder(package)
    _, meta = load_package(source, "cpu")  # refuse a package whose weights do not fit its metadata
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, META_FILE):
        shutil.copyfile(source / name, target / name)
    plugin = _plugin(meta.backbone)
    config = {
        "library_name": LIBRARY,
        "format": meta.format,
        "model_id": meta.model_id,
        "backbone": meta.backbone,
        "backbone_args": meta.backbone_args,
        "backbone_plugin": plugin,
        "num_classes": len(meta.classes),
        "num_attributes": len(meta.attributes),
        "head_hidden": meta.head_hidden,
        "preprocess": meta.preprocess,
        "pretrained": meta.pretrained,
    }
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    tables = _run_tables(source)
    if tables:
        (target / TABLES_FILE).write_text(json.dumps(tables, indent=1))
    (target / CARD_FILE).write_text(model_card(meta, plugin, tables, repo or repo_name(package)))
    return target
