"""A self-contained HTML page of an explanation job, for people.

The page opens with the scores in plain words (each with what it means), per-class and
per-attribute accuracy and a confusion overview (when ``evaluate`` has run), then cards: the
original image, the class map over it, the maps of the named attributes, the text, and true
against predicted class. Mistakes come first, then the least confident predictions; buttons
filter the cards by class and by right/wrong. A job of any size gives a page of at most
``samples`` cards: every explanation is read once for the counts, and the cards shown are the
mistakes and the least confident correct predictions, as the page says. Shards written without
pictures (``explain.outputs``, whose default holds none) get them drawn for the cards shown from
their ``heatmaps.npy`` and the input images the job's ``_job.json`` names.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eatdist.atomic import write_text
from eatdist.data.decode import input_jpeg
from eatdist.data.pipeline import BadSample, decode_image
from eatdist.data.remote import is_remote
from eatdist.data.shards import iter_shard
from eatdist.errors import DataError
from eatdist.explain.encode import Outputs, render_images
from eatdist.explain.evaluate import BREAKDOWN_FILE, EVALUATION_FILE
from eatdist.explain.job import JOB_FILE, SUMMARY, output_name, read_job
from eatdist.store import Store, open_store

log = logging.getLogger(__name__)
DRAWN_PARTS = ("image.jpg", "overlay.jpg", "attr_maps.jpg")  # what a card shows

REPORT_FILE = "report.html"

# (key, plain name, what it means); shown in this order when present
METRIC_TEXT: list[tuple[str, str, str]] = [
    ("explained", "Images explained", "Images the job wrote an explanation for."),
    ("undecodable", "Images that could not be read", "Counted and listed in explain_summary.json."),
    ("top1", "Class accuracy", "Share of images whose predicted class is the true class."),
    (
        "attr_acc",
        "Attribute accuracy",
        "Share of (image, attribute) answers that are right, present "
        "meaning p > 0.5. Near the share of the more common answer means the attributes carry little.",
    ),  # fmt: skip
    (
        "attr_acc_on_prototype",
        "… where the image matches its class",
        "Attribute accuracy on the answers where the image has its class's usual value (most answers).",
    ),  # fmt: skip
    (
        "attr_acc_off_prototype",
        "… where the image departs from its class",
        "Attribute accuracy on the answers where the image differs from what its class usually looks like: "
        "only an attribute head that reads the image gets these right; one that repeats the class gets them wrong.",
    ),  # fmt: skip
    (
        "off_prototype_detected",
        "Unusual attributes detected",
        "Share of the attributes images show although their class usually lacks them that the model sees.",
    ),  # fmt: skip
    (
        "off_prototype_named",
        "Unusual attributes named",
        "Of those, on correctly classified images: the share the explanation names.",
    ),  # fmt: skip
    ("class_map_pointing", "Pointing game", "Share of images whose class-map peak falls on the object's box."),
    (
        "class_map_mass_on_object",
        "Class-map mass on the object",
        "Share of the class map's heat inside "
        "the object's box (see the next line for what a map spread evenly would score).",
    ),  # fmt: skip
    ("object_area_fraction", "Object area", "The object box's share of the image: the mass of a flat map."),
    (
        "attribute_map_pointing",
        "Attribute pointing game",
        "Share of named attributes whose map peaks inside the region where that attribute is visible.",
    ),  # fmt: skip
    (
        "attribute_map_mass_on_box",
        "Attribute-map mass on its region",
        "Share of an attribute map's heat inside the region where that attribute is visible.",
    ),  # fmt: skip
    (
        "zero_class_maps",
        "All-zero class maps",
        "Class maps with no positive evidence anywhere: they point nowhere and are left out of the map scores.",
    ),  # fmt: skip
    (
        "zero_attribute_maps",
        "All-zero attribute maps",
        "Named attributes whose map is zero everywhere (of 'attribute maps drawn').",
    ),  # fmt: skip
    ("attribute_maps", "Attribute maps drawn", "Maps of named attributes over all explanations."),
    ("attr_mean_ap", "Attribute mean AP", "Average precision per attribute, averaged."),
]

# how a named attribute's role is shown beside its name on a card
ROLE_NOTE = {"instead": " (instead)", "against": " (unusual for the class)"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; max-width: 1400px; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table.t { border-collapse: collapse; font-size: 13px; }
table.t td, table.t th { padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
table.t td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meaning { color: #666; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 8px 12px; border-radius: 6px; }
.cols { display: flex; gap: 40px; flex-wrap: wrap; }
.bar { display: inline-block; height: 10px; background: #4a7; vertical-align: middle; }
table.conf td { width: 18px; height: 18px; padding: 0; text-align: center; font-size: 10px; }
.controls { position: sticky; top: 0; background: #fff; padding: 8px 0; z-index: 2; border-bottom: 1px solid #eee; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; margin-top: 10px; }
.card { width: 300px; border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 13px; }
.card.wrong { border-color: #d33; background: #fff6f6; }
.pair { display: flex; gap: 4px; }
.pair figure { margin: 0; flex: 1; }
.pair img, .strip img { width: 100%; border-radius: 3px; display: block; }
figcaption, .caps { color: #666; font-size: 11px; }
.caps { display: flex; justify-content: space-around; gap: 4px; }
.key { color: #888; font-size: 11px; word-break: break-all; }
.verdict.wrong { color: #c22; font-weight: 600; } .verdict.right { color: #282; }
"""

_SCRIPT = """
function applyFilters() {
  const cls = document.getElementById('f-class').value;
  const which = document.getElementById('f-which').value;
  let shown = 0;
  document.querySelectorAll('.card').forEach(c => {
    const ok = (cls === 'all' || c.dataset.pred === cls || c.dataset.true === cls)
      && (which === 'all' || c.dataset.which === which);
    c.style.display = ok ? '' : 'none';
    if (ok) shown += 1;
  });
  document.getElementById('f-count').textContent = shown + ' cards shown';
}
document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('f-class').addEventListener('change', applyFilters);
  document.getElementById('f-which').addEventListener('change', applyFilters);
  applyFilters();
});
"""


@dataclass
class _Entry:
    shard: int
    key: str
    pred: int
    truth: int | None
    confidence: float

    @property
    def wrong(self) -> bool:
        return self.truth is not None and self.truth != self.pred


def _img(data: bytes | None, name: str, alt: str) -> str:
    if data is None:
        return ""
    mime = "image/jpeg" if name.endswith("jpg") else "image/png"
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _find(sample: dict[str, Any], stem: str) -> tuple[str, bytes] | tuple[None, None]:
    key = next((k for k in sample if k.startswith(stem + ".")), None)
    return (key, sample[key]) if key is not None else (None, None)


def _drawn_parts(sample: dict[str, Any], image: tuple[Image.Image, bytes | None] | None) -> dict[str, Any]:
    """Return ``sample`` with the image parts it lacks drawn from its ``heatmaps.npy`` over ``image``
    (its input, and its JPEG bytes when the copy can be them), as ``eatdist explain`` draws them;
    unchanged without an image or maps."""
    if image is None or "heatmaps.npy" not in sample or _find(sample, "overlay")[0] is not None:
        return sample
    maps = np.load(io.BytesIO(sample["heatmaps.npy"]), allow_pickle=False).astype(np.float32)
    drawn = render_images(np.asarray(image[0]), maps, Outputs(("json", *DRAWN_PARTS)), image[1])
    return {**drawn, **sample}


def _input_images(
    store: Store, shard: str, keys: set[str]
) -> tuple[dict[str, tuple[Image.Image, bytes | None]], str | None]:
    """Return the images of ``keys`` in the input shard of the output shard ``shard`` (named in the
    job's ``_job.json``), each with its JPEG bytes when the copy can be them (:func:`input_jpeg`),
    and why some could not be read (None when all were)."""
    try:
        url = next(u for u in read_job(store)["inputs"] if output_name(u) == shard)
    except (DataError, StopIteration, KeyError, TypeError):
        return {}, f"{shard}: no input shard recorded in {JOB_FILE}"
    found: dict[str, tuple[Image.Image, bytes | None]] = {}
    try:
        for sample in iter_shard(url):
            if sample["__key__"] in keys:
                found[sample["__key__"]] = (decode_image(sample), input_jpeg(sample))
                if len(found) == len(keys):
                    break
    except (DataError, BadSample, OSError) as exc:
        return found, f"{url}: {exc}"
    return found, None if len(found) == len(keys) else f"{url}: {len(keys) - len(found)} key(s) not found"


def _card(sample: dict[str, Any], names: dict[int, str]) -> str:
    record = json.loads(sample["json"])
    truth, pred = record.get("true_class"), record["class"]
    wrong = truth is not None and truth != pred
    image_name, image = _find(sample, "image")
    overlay_name, overlay = _find(sample, "overlay")
    strip_name, strip = _find(sample, "attr_maps")
    figures = []
    if image is not None and image_name is not None:
        figures.append(f"<figure>{_img(image, image_name, 'image')}<figcaption>image</figcaption></figure>")
    if overlay is not None and overlay_name is not None:
        figures.append(f"<figure>{_img(overlay, overlay_name, 'class map')}<figcaption>class map</figcaption></figure>")
    attrs = record.get("top_attributes", [])
    strip_html = ""
    if strip is not None and strip_name is not None and attrs:
        caps = "".join(f"<span>{html.escape(a['name'])}</span>" for a in attrs)
        width = min(100, 25 * len(attrs))  # tiles as wide as in a 4-tile strip, whatever their number
        strip_img = _img(strip, strip_name, "attribute maps")
        strip_html = f'<div class="strip" style="width:{width}%">{strip_img}<div class="caps">{caps}</div></div>'
    if truth is None:
        verdict = "<div>true class unknown</div>"
    else:
        mark = "✗ wrong" if wrong else "✓ right"
        verdict = (f'<div class="verdict {"wrong" if wrong else "right"}">{mark}: true '
                   f"{html.escape(names.get(truth, f'class {truth}'))}</div>")  # fmt: skip
    rows = "".join(
        f"<tr><td>{html.escape(a['name'])}{ROLE_NOTE.get(a.get('role', ''), '')}</td>"
        f"<td class='num'>{a['probability']:.2f}</td><td class='num'>{a['contribution']:+.2f}</td></tr>"
        for a in attrs
    )
    table = (f"<table class='t'><tr><th>attribute</th><th>p</th><th>evidence</th></tr>{rows}</table>"
             if rows else "")  # fmt: skip
    which = "wrong" if wrong else "right" if truth is not None else "unknown"
    return (
        f'<div class="card{" wrong" if wrong else ""}" data-pred="{pred}" data-true="{truth}" data-which="{which}">'
        f'<div class="pair">{"".join(figures)}</div>{strip_html}'
        f"<div><b>{html.escape(record['text'])}</b></div>{verdict}{table}"
        f'<div class="key">{html.escape(sample["__key__"])} · confidence {record["confidence"]:.2f}</div></div>'
    )


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = []
    for key, name, meaning in METRIC_TEXT:
        value = metrics.get(key)
        if value is None:
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))
        rows.append(f"<tr><td>{name}</td><td class='num'><b>{shown}</b></td><td class='meaning'>{meaning}</td></tr>")
    return f"<table class='t'>{''.join(rows)}</table>"


def _accuracy_tables(metrics: dict[str, Any]) -> str:
    def bar(x: float) -> str:
        return f"<span class='bar' style='width:{int(80 * x)}px'></span>"

    per_class = metrics.get("per_class") or []
    per_attr = metrics.get("per_attribute") or []
    if not per_class and not per_attr:
        return "<p>Run <code>eatdist evaluate</code> on this folder for per-class and per-attribute accuracy.</p>"
    classes = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td class='num'>{r['images']}</td>"
        f"<td class='num'>{r['top1']:.3f}</td><td>{bar(r['top1'])}</td></tr>"
        for r in sorted(per_class, key=lambda r: r["top1"])
    )
    attrs = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td class='num'>{r['acc']:.3f}</td><td>{bar(r['acc'])}</td></tr>"
        for r in sorted(per_attr, key=lambda r: r["acc"])
    )
    return (
        "<div class='cols'><div><h3>Per class (worst first)</h3><table class='t'><tr><th>class</th>"
        f"<th>images</th><th>accuracy</th><th></th></tr>{classes}</table></div>"
        "<div><h3>Per attribute (worst first)</h3><table class='t'><tr><th>attribute</th><th>accuracy</th>"
        f"<th></th></tr>{attrs}</table></div></div>"
    )


def _confusion(metrics: dict[str, Any], names: dict[int, str]) -> str:
    cells = metrics.get("confusion") or []
    if not cells:
        return ""
    off = sorted((c for c in cells if c[0] != c[1]), key=lambda c: -c[2])[:15]
    pairs = "".join(
        f"<tr><td>{html.escape(names.get(t, str(t)))}</td><td>→ {html.escape(names.get(p, str(p)))}</td>"
        f"<td class='num'>{n}</td></tr>"
        for t, p, n in off
    )
    listing = (f"<h3>Most frequent confusions</h3><table class='t'><tr><th>true</th><th>predicted as</th>"
               f"<th>images</th></tr>{pairs}</table>" if off else "<p>No confusions.</p>")  # fmt: skip
    classes = sorted({c[0] for c in cells} | {c[1] for c in cells})
    if len(classes) > 40:  # a matrix that large is unreadable; the list says it
        return f"<h2>Confusion</h2>{listing}"
    counts = {(t, p): n for t, p, n in cells}
    totals = {t: sum(n for (tt, _), n in counts.items() if tt == t) for t in classes}
    rows = []
    for t in classes:
        tds = []
        for p in classes:
            n = counts.get((t, p), 0)
            share = n / totals[t] if totals[t] else 0.0
            colour = f"rgba(40,120,60,{share:.2f})" if t == p else f"rgba(210,40,40,{min(1.0, 3 * share):.2f})"
            tip = html.escape(f"true {names.get(t, t)} → predicted {names.get(p, p)}: {n}")
            tds.append(f"<td title='{tip}' style='background:{colour}'>{n or ''}</td>")
        rows.append(f"<tr><th class='num'>{t}</th>{''.join(tds)}</tr>")
    header = "".join(f"<th>{p}</th>" for p in classes)
    legend = "".join(f"<tr><td class='num'>{c}</td><td>{html.escape(names.get(c, str(c)))}</td></tr>" for c in classes)
    matrix = (f"<table class='conf'><tr><th>true ↓ / predicted →</th>{header}</tr>{''.join(rows)}</table>"
              f"<p class='meaning'>Rows: true class; columns: predicted. Green: right; red: confused.</p>")  # fmt: skip
    return (f"<h2>Confusion</h2><div class='cols'><div>{matrix}</div><div>{listing}</div>"
            f"<div><h3>Classes</h3><table class='t'>{legend}</table></div></div>")  # fmt: skip


def write_report(explanations: str | Path | Store, out: str | Path | None = None, samples: int = 240) -> Path | str:
    """Write the HTML page of the job in ``explanations`` (see the module docstring); return its path or URL.

    ``explanations`` and ``out`` may be folders or URLs (``out`` defaults to ``report.html`` beside
    the explanations). At most ``samples`` cards: mistakes first, then the least confident
    predictions. Images are embedded, so the page can be mailed or archived alone. Raises:
        DataError: when ``explanations`` holds no explanation shards, or ``out`` cannot be written;
        DiskError: naming the page, the size needed and the space free, on a full or read-only disk.
    """
    store = explanations if isinstance(explanations, Store) else open_store(explanations, "--explanations")
    target: Store | None = None
    if out is not None and is_remote(str(out)):  # a URL that cannot be written fails before any reading
        parent, _, page_name = str(out).rstrip("/").rpartition("/")
        target = open_store(parent, "--out", str(out))
    shards = [store.url(n) for n in sorted(store.list("")) if n.endswith(".tar")]
    if not shards:
        raise DataError(f"no explanation shards (*.tar) in {store.root}")
    entries: list[_Entry] = []
    names: dict[int, str] = {}
    model_id, check = "", {}
    for s, shard in enumerate(shards):
        for sample in iter_shard(shard):
            record = json.loads(sample["json"])
            names[record["class"]] = record["class_name"]
            model_id = model_id or record.get("model_id", "")
            check = check or record.get("attribute_check", {})
            entries.append(_Entry(s, sample["__key__"], record["class"], record.get("true_class"),
                                  float(record.get("confidence", 0.0))))  # fmt: skip
    ordered = sorted(entries, key=lambda e: (not e.wrong, e.confidence))
    chosen = ordered[:samples]
    wanted = {(e.shard, e.key): i for i, e in enumerate(chosen)}
    cards: list[str] = [""] * len(chosen)
    unreadable: list[str] = []
    for s in sorted({e.shard for e in chosen}):
        picked = [(wanted[s, x["__key__"]], x) for x in iter_shard(shards[s]) if (s, x["__key__"]) in wanted]
        # Shards written without pictures (explain.outputs) get them drawn from the input images.
        bare = {sample["__key__"] for _, sample in picked if _find(sample, "overlay")[0] is None}
        images, problem = _input_images(store, output_name(shards[s]), bare) if bare else ({}, None)
        if problem:
            unreadable.append(problem)
        for i, sample in picked:
            cards[i] = _card(_drawn_parts(sample, images.get(sample["__key__"])), names)
    metrics: dict[str, Any] = {}
    for name in (SUMMARY, EVALUATION_FILE, BREAKDOWN_FILE):
        try:
            metrics.update(json.loads(store.get(name)))
        except FileNotFoundError:
            continue
    wrong = sum(e.wrong for e in entries)
    known = sum(e.truth is not None for e in entries)
    shown_wrong = sum(e.wrong for e in chosen)
    if len(chosen) < len(entries):
        sampling = (f"Showing {len(chosen)} of {len(entries)} explanations: {shown_wrong} of the {wrong} "
                    "mistakes, then the least confident of the rest (in that order, not at random).")  # fmt: skip
    else:
        sampling = f"Showing all {len(entries)} explanations, mistakes first, then by rising confidence."
    warning = ""
    if check and not check.get("reliable", True):
        warning = f"<p class='warn'>⚠ {html.escape(check.get('message', ''))}</p>"
    if unreadable:
        log.warning("report: some cards have no pictures: %s", "; ".join(unreadable))
        warning += (f"<p class='warn'>Some cards have no pictures (their shards hold none and the input "
                    f"images could not be read): {html.escape('; '.join(unreadable))}</p>")  # fmt: skip
    class_options = "".join(
        f"<option value='{c}'>{html.escape(n)}</option>" for c, n in sorted(names.items(), key=lambda x: x[1])
    )
    controls = (
        "<div class='controls'>Class: <select id='f-class'><option value='all'>all classes</option>"
        f"{class_options}</select> Show: <select id='f-which'><option value='all'>right and wrong</option>"
        "<option value='wrong'>mistakes only</option><option value='right'>right only</option></select> "
        "<span id='f-count'></span></div>"
    )
    title = f"eatdist report: {store.root.rstrip('/').rsplit('/', 1)[-1]}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f"<h1>Explanations in {html.escape(store.root)}</h1>"
        f"<p>Model <code>{html.escape(model_id)}</code>; {len(entries)} images explained"
        + (f", {wrong} of {known} with a known class predicted wrong" if known else "")
        + f".</p>{warning}<h2>Summary</h2>{_metrics_table(metrics)}"
        f"<h2>Accuracy by class and attribute</h2>{_accuracy_tables(metrics)}{_confusion(metrics, names)}"
        f"<h2>Explanations</h2><p>{sampling} Each card: the image, the class map over it (heat fades to "
        "transparent where the model does not look; the white line is where the map passes half its peak), "
        "the maps of the named attributes in the order of the table, the text, and the true class. "
        "'evidence' is the part of the class score along the attribute (see the README).</p>"
        f"{controls}<div class='grid'>{''.join(cards)}</div></body></html>"
    )
    if out is None:
        store.put(REPORT_FILE, page.encode("utf-8"))
        return store.url(REPORT_FILE) if is_remote(store.url(REPORT_FILE)) else Path(store.url(REPORT_FILE))
    if target is not None:
        target.put(page_name, page.encode("utf-8"))
        return target.url(page_name)
    return write_text(out, page, "the report page")
