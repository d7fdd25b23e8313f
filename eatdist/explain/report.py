"""A self-contained HTML page of an explanation job, for people: overlays, texts and scores."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from eatdist.data.shards import iter_shard
from eatdist.errors import DataError
from eatdist.explain.evaluate import EVALUATION_FILE
from eatdist.explain.job import SUMMARY

REPORT_FILE = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table.metrics td { padding: 2px 12px 2px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.card { width: 230px; border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 13px; }
.card img { width: 100%; image-rendering: pixelated; border-radius: 4px; }
.card.wrong { border-color: #d33; background: #fff4f4; }
.key { color: #777; font-size: 11px; word-break: break-all; }
.attrs td { padding: 0 6px 0 0; }
"""


def _card(sample: dict[str, Any], classes_seen: dict[int, str]) -> str:
    record = json.loads(sample["json"])
    overlay_ext = next((k for k in sample if k.startswith("overlay.")), None)
    image = ""
    if overlay_ext is not None:
        mime = "image/jpeg" if overlay_ext.endswith("jpg") else "image/png"
        image = f'<img alt="class heatmap" src="data:{mime};base64,{base64.b64encode(sample[overlay_ext]).decode()}">'
    truth = record.get("true_class")
    wrong = truth is not None and truth != record["class"]
    truth_line = ""
    if truth is not None:
        name = classes_seen.get(truth, f"class {truth}")
        truth_line = f"<div>{'✗' if wrong else '✓'} true: {html.escape(name)}</div>"
    rows = "".join(
        f"<tr><td>{html.escape(a['name'])}</td><td>{a['probability']:.2f}</td><td>{a['contribution']:.2f}</td></tr>"
        for a in record.get("top_attributes", [])
    )
    return (
        f'<div class="card{" wrong" if wrong else ""}">{image}'
        f"<div><b>{html.escape(record['text'])}</b></div>{truth_line}"
        f'<table class="attrs"><tr><th>attribute</th><th>p</th><th>contrib.</th></tr>{rows}</table>'
        f'<div class="key">{html.escape(sample["__key__"])}</div></div>'
    )


def write_report(explanations: str | Path, out: str | Path | None = None, samples: int = 48) -> Path:
    """Write an HTML page with ``samples`` explained images and the job's scores; return its path.

    Images are embedded, so the page can be mailed or archived alone. Raises:
        DataError: when ``explanations`` holds no explanation shards.
    """
    folder = Path(explanations)
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise DataError(f"no explanation shards (*.tar) in {folder}")
    picked: list[dict[str, Any]] = []
    classes_seen: dict[int, str] = {}
    for shard in shards:
        for sample in iter_shard(shard):
            record = json.loads(sample["json"])
            classes_seen[record["class"]] = record["class_name"]
            if len(picked) < samples:
                picked.append(sample)
    metrics: dict[str, Any] = {}
    for name in (SUMMARY, EVALUATION_FILE):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            metrics.update({k: v for k, v in data.items() if isinstance(v, (int, float, str)) and k != "output"})
    metric_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in metrics.items()
    )
    model_id = json.loads(picked[0]["json"]).get("model_id", "") if picked else ""
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>eatdist report: {html.escape(folder.name)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>Explanations in {html.escape(str(folder))}</h1><p>model {html.escape(model_id)}</p>"
        f"<table class='metrics'>{metric_rows}</table>"
        f"<h2>{len(picked)} explained images</h2><div class='grid'>"
        + "".join(_card(s, classes_seen) for s in picked)
        + "</div></body></html>"
    )
    target = Path(out) if out is not None else folder / REPORT_FILE
    target.write_text(page, encoding="utf-8")
    return target
