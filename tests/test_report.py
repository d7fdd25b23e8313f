"""The HTML report, checked the way people see it: rendered by headless Chromium."""

import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from conftest import write_corpus
from eatdist.config import ExplainConfig
from eatdist.data.shards import iter_shard
from eatdist.explain.evaluate import evaluate_explanations
from eatdist.explain.job import run_explain
from eatdist.explain.report import write_report
from eatdist.models.package import PackageMeta, build_model, save_package

# After load, count the images the browser decoded (naturalWidth > 0) and those it could not.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.getElementById('f-which').value = 'wrong';
  document.getElementById('f-which').dispatchEvent(new Event('change'));
  document.body.dataset.visible = Array.from(document.querySelectorAll('.card'))
    .filter(c => c.style.display !== 'none').length;
});
</script></body>"""


def _chromium() -> str:
    """Return a Chromium executable, installing the Debian package when absent; skip when impossible."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed and cannot be (no apt-get, or not root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"cannot install Chromium ({' '.join(cmd)}): {result.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no 'chromium' executable is on PATH")
    return found


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """An explanation job of an untrained model (most predictions wrong), evaluated."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("report")
    corpus = write_corpus(root / "c", {"test": [12, 10]})
    model = build_model("test_resnet", {"output_stride": 8}, corpus.num_classes, corpus.num_attributes)
    meta = PackageMeta(backbone="test_resnet", backbone_args={"output_stride": 8},
                       classes=["<b>cls</b>", *corpus.classes[1:]], attributes=corpus.attributes,
                       attribute_groups=corpus.attribute_groups, class_attributes=corpus.class_attributes,
                       preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                       metrics={"val_attr_acc": 0.5})  # fmt: skip
    package = save_package(root / "model", model.eval(), meta)
    out = root / "expl"
    run_explain(str(package), str(corpus.root), str(out), ExplainConfig())
    evaluate_explanations(out, corpus.root)
    return out


def test_report_orders_cards_and_says_what_it_shows(job, tmp_path):
    records = [json.loads(s["json"]) for p in sorted(job.glob("*.tar")) for s in iter_shard(p)]
    page = write_report(job, tmp_path / "r.html", samples=8).read_text()
    assert "Showing 8 of 22 explanations" in page and "Class accuracy" in page and "Pointing game" in page
    assert "<b>cls</b>" not in page  # names are escaped
    assert "attributes unreliable" in page  # the package's near-chance attribute head is flagged on top
    keys = re.findall(r'<div class="key">([^ <]+) ', page)
    by_key = {s["__key__"]: json.loads(s["json"]) for p in sorted(job.glob("*.tar")) for s in iter_shard(p)}
    shown = [by_key[k] for k in keys]
    wrong = [r["class"] != r["true_class"] for r in shown]
    assert wrong == sorted(wrong, reverse=True)  # mistakes first
    assert sum(r["class"] != r["true_class"] for r in records) >= sum(wrong)
    first_right = [r["confidence"] for r in shown if r["class"] == r["true_class"]]
    assert first_right == sorted(first_right)  # then least confident first
    assert "Per class" in page and "Per attribute" in page and "Confusion" in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_image(job, tmp_path):
    chromium = _chromium()
    page = write_report(job, tmp_path / "report.html")
    text = page.read_text()
    images = text.count("<img ")
    assert images >= 3 * 22  # image, class map and attribute maps per card
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE, 1))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.search(r"<body[^>]*>", result.stdout)
    assert body, result.stdout[:500]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(0)))
    assert attrs.get("loaded") == str(images) and attrs.get("broken") == "0", body.group(0)
    wrong = sum(json.loads(s["json"])["class"] != json.loads(s["json"])["true_class"]
                for p in sorted(job.glob("*.tar")) for s in iter_shard(p))  # fmt: skip
    assert attrs.get("visible") == str(wrong)  # the "mistakes only" filter leaves the mistakes
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=180)  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 10_000
