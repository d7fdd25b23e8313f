"""Explanations of trained tiny models: the text says what the image shows, and a λ = 0 model is flagged.

Two models are trained once for the module on a small synthetic corpus (48 px, CPU, about two
minutes alone on 2 cores): EAT (attr_weight 1) and the plain classifier (attr_weight 0). The
test split is drawn with a high ``attr_noise``, so many of its images depart from their class
prototype in one attribute group.
"""

import json
import sys

import pytest

from conftest import cpu_env, run
from eatdist.config import ExplainConfig, SynthConfig
from eatdist.data.corpus import load_dataset_info
from eatdist.data.shards import iter_shard
from eatdist.data.synth import GROUPS, class_prototypes, generate
from eatdist.explain.job import run_explain
from eatdist.models.package import read_meta

pytestmark = pytest.mark.slow
SEED = 5
# The tiny model does not see every departure (it misses most shapes): the floor on the share
# of departures named; 0.50 (68 of 136) was measured with this recipe.
SHOWN_RATE = 0.4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    base = dict(num_classes=8, image_size=48, val=200, test=0, shard_size=500, workers=1, seed=SEED)
    # attr_noise 0.3: attributes vary within classes enough that the head learns them, not the class
    generate(SynthConfig(train=2500, attr_noise=0.3, **base), root / "data", progress=False)
    # The test split alone, with many one-group departures (same prototypes: same seed and classes).
    generate(SynthConfig(train=0, attr_noise=0.3, **{**base, "val": 0, "test": 400}), root / "deviant", progress=False)
    packages = {}
    for weight, epochs in ((1.0, 10), (0.0, 1)):
        out = root / f"run_{weight:g}"
        result = run(
            [sys.executable, "-m", "eatdist", "train", f"data.root={root / 'data'}", f"train.output_dir={out}",
             f"loss.attr_weight={weight}", f"train.epochs={epochs}", "data.image_size=48", "data.num_workers=1",
             "train.final_test=false", "optim.lr=0.03", f"train.seed={SEED}"],
            env=cpu_env(),  # one thread: faster than two on a busy machine
            timeout=900,  # a minute alone on 2 cores; much more on a shared machine
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        packages[weight] = out / "model"
    explained = root / "explained"
    run_explain(str(packages[1.0]), str(root / "deviant" / "test-*.tar"), str(explained), ExplainConfig())
    return root, packages, explained


def _records(folder):
    return [json.loads(s["json"]) for p in sorted(folder.glob("*.tar")) for s in iter_shard(p)]


def test_eat_model_is_accurate_enough_for_the_checks_to_mean_something(trained):
    _, packages, _ = trained
    meta = read_meta(packages[1.0])
    assert meta.metrics["val_top1"] > 0.5 and meta.metrics["val_attr_acc"] > 0.9


def test_no_explanation_names_an_attribute_the_model_scores_absent(trained):
    _, _, explained = trained
    records = _records(explained)
    named = [(r, a) for r in records for a in r["top_attributes"]]
    assert len(named) > len(records)  # most texts name several attributes
    for r, a in named:
        assert r["attribute_probabilities"][a["index"]] > 0.5, (r["text"], a)
    assert all(r["attribute_check"]["status"] == "ok" for r in records)


def test_text_names_the_attribute_an_image_shows_where_it_departs_from_its_class(trained):
    root, _, explained = trained
    info = load_dataset_info(root / "deviant")
    protos = class_prototypes(8, SEED)
    groups = [info.attribute_groups[g] for g, _, _ in GROUPS]
    truth = {s["__key__"]: json.loads(s["json"]) for p in info.shard_paths("test") for s in iter_shard(p)}
    shown_named = prototype_named = total = seen = seen_named = 0
    for shard in sorted(explained.glob("*.tar")):
        for sample in iter_shard(shard):
            record, t = json.loads(sample["json"]), truth[sample["__key__"]]
            if record["class"] != t["class"]:
                continue  # a contrast is drawn against the predicted class's prototype
            present = [next(a for a in g if t["attributes"][a] == 1.0) for g in groups]
            departs = [i for i, g in enumerate(groups) if present[i] != g[protos[t["class"]][i]]]
            if len(departs) != 1:
                continue
            g = departs[0]
            total += 1
            named = info.attributes[present[g]] in record["text"]  # as a reason, or in "rather than"
            shown_named += named
            if record["attribute_probabilities"][present[g]] > 0.5:  # the model sees the departure
                seen += 1
                seen_named += named
            reasons = {a["index"] for a in record["top_attributes"] if a["role"] == "supports"}
            prototype = groups[g][protos[t["class"]][g]]
            # the class's usual value, which this image lacks, is a reason only if the model (wrongly) sees it
            prototype_named += prototype in reasons and record["attribute_probabilities"][prototype] <= 0.5
    print(f"departures {total}: shown attribute named {shown_named}; seen by the model {seen}, named {seen_named}")
    assert total >= 60, f"only {total} one-group departures: too few to mean something"
    # Ranking by the class prior named the shown attribute in 0 % of such images. Now the text
    # names it when the model sees it (unless the model also sees the prototype value), and the
    # missing prototype value is never a reason unless the model sees it.
    assert seen >= 20 and seen_named / seen >= 0.9, f"named {seen_named} of the {seen} departures the model saw"
    assert shown_named / total >= SHOWN_RATE, f"named the shown attribute in {shown_named} of {total}"
    assert prototype_named == 0


def test_a_model_without_the_attribute_task_is_flagged(trained, tmp_path):
    root, packages, _ = trained
    meta = read_meta(packages[0.0])
    assert meta.metrics["val_attr_acc"] < 0.8  # the head was never trained
    assert meta.metrics["attr_weight"] == 0.0  # and the package says why
    out = tmp_path / "expl"
    run_explain(str(packages[0.0]), str(root / "deviant" / "test-*.tar"), str(out), ExplainConfig())
    records = _records(out)
    assert records and all(r["attribute_check"]["status"] == "near_chance" for r in records)
    assert all("attributes unreliable" in r["text"] for r in records)
