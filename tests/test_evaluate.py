import json
import sys

import numpy as np
import pytest
import torch

from conftest import run, write_corpus
from eatdist.config import ExplainConfig
from eatdist.data.shards import iter_shard
from eatdist.explain.evaluate import box_scores, evaluate_explanations
from eatdist.explain.job import run_explain
from eatdist.models.package import PackageMeta, build_model, save_package


def test_box_scores_find_where_the_map_looks():
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0
    mass, hit = box_scores(heat, (64, 64), [0, 0, 32, 32])
    assert mass > 0.9 and hit
    mass, hit = box_scores(heat, (64, 64), [32, 32, 64, 64])
    assert mass < 0.05 and not hit
    assert box_scores(np.zeros((4, 4)), (64, 64), [0, 0, 8, 8]) is None
    uniform, _ = box_scores(np.ones((4, 4)), (64, 64), [0, 0, 32, 64])
    assert uniform == pytest.approx(0.5, abs=0.02)


def test_evaluate_scores_an_explanation_job(tmp_path):
    torch.manual_seed(0)  # an untrained model; some seeds give all-zero class maps, which score nothing
    corpus = write_corpus(tmp_path / "c", {"test": [12, 9]})
    model = build_model("test_resnet", {"output_stride": 16}, corpus.num_classes, corpus.num_attributes)
    meta = PackageMeta(backbone="test_resnet", backbone_args={"output_stride": 16}, classes=corpus.classes,
                       attributes=corpus.attributes, class_attributes=corpus.class_attributes,
                       preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})  # fmt: skip
    package = save_package(tmp_path / "model", model.eval(), meta)
    out = tmp_path / "expl"
    run_explain(str(package), str(corpus.root), str(out), ExplainConfig(top_k=5))
    result = evaluate_explanations(out, corpus.root)
    records = [json.loads(s["json"]) for p in sorted(out.glob("*.tar")) for s in iter_shard(p)]
    assert result["samples"] == 21 and result["unmatched"] == 0
    assert result["top1"] == pytest.approx(np.mean([r["class"] == r["true_class"] for r in records]), abs=1e-5)
    for key in ("attr_acc", "class_map_mass_on_object", "class_map_pointing", "object_area_fraction"):
        assert 0.0 <= result[key] <= 1.0
    assert result["scored_attribute_maps"] > 0
    # all-zero maps are counted, not skipped silently
    peaks = [r["map_peaks"] for r in records]
    assert result["zero_class_maps"] == sum(p[0] == 0 for p in peaks)
    assert result["zero_attribute_maps"] == sum(x == 0 for p in peaks for x in p[1:])
    assert result["attribute_maps"] == sum(len(p) - 1 for p in peaks)
    breakdown = json.loads((out / "breakdown.json").read_text())
    assert sum(r["images"] for r in breakdown["per_class"]) == 21
    assert sum(n for _, _, n in breakdown["confusion"]) == 21
    correct = sum(n for t, p, n in breakdown["confusion"] if t == p)
    assert correct == round(result["top1"] * 21)
    assert len(breakdown["per_attribute"]) == corpus.num_attributes
    assert json.loads((out / "evaluation.json").read_text()) == result

    cli = run([sys.executable, "-m", "eatdist", "evaluate", "--explanations", str(out), "--data", str(corpus.root)])
    assert cli.returncode == 0 and "class_map_mass_on_object" in cli.stdout


def test_report_page_shows_overlays_texts_and_scores(tmp_path):
    import html

    from eatdist.explain.report import write_report

    torch.manual_seed(0)

    corpus = write_corpus(tmp_path / "c", {"test": [7]})
    model = build_model("test_resnet", {}, corpus.num_classes, corpus.num_attributes)
    preprocess = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    meta = PackageMeta(backbone="test_resnet", backbone_args={}, classes=["<b>cls</b>", *corpus.classes[1:]],
                       attributes=corpus.attributes, preprocess=preprocess)  # fmt: skip
    package = save_package(tmp_path / "model", model.eval(), meta)
    out = tmp_path / "expl"
    run_explain(str(package), str(corpus.root), str(out), ExplainConfig())
    evaluate_explanations(out, corpus.root)
    page = write_report(out, samples=5).read_text()
    assert page.count('<div class="card') == 5 and "Showing 5 of 7 explanations" in page
    assert page.count('alt="image" src="data:image/jpeg;base64,') == 5  # the original beside each overlay
    assert page.count('alt="class map" src="data:image/jpeg;base64,') == 5
    page = write_report(out, samples=50).read_text()
    texts = [json.loads(s["json"])["text"] for s in iter_shard(out / "test-000000.tar")]
    assert all(html.escape(t) in page for t in texts) and "Showing all 7 explanations" in page
    assert "<b>cls</b>" not in page  # names are escaped
    assert "Class-map mass on the object" in page and "Images explained" in page
