import io
import json
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import REPO, cpu_env, untrained_package, write_corpus
from eatdist.config import ExplainConfig
from eatdist.data.shards import iter_shard
from eatdist.explain.job import resolve_inputs, run_explain
from eatdist.explain.text import attribute_check, choose_attributes, explanation_text
from eatdist.models.package import build_model, load_package


@pytest.fixture(scope="module")
def package(tmp_path_factory, tiny_corpus):
    """An (untrained) model package over the tiny corpus: explanation mechanics need no training."""
    return untrained_package(tiny_corpus, tmp_path_factory.mktemp("pkg"))


def keys_of(paths):
    return [s["__key__"] for p in paths for s in iter_shard(p)]


def test_package_round_trip_gives_same_outputs(package):
    import torch

    model, meta = load_package(package)
    again, _ = load_package(package)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x).class_logits, again(x).class_logits)
    assert meta.model_id.startswith("tiny-test_resnet-")


def test_explanation_shards_follow_contract_4(tmp_path, tiny_corpus, package):
    out = tmp_path / "out"
    every_part = ["json", "txt", "heatmaps.npy", "image", "overlay", "attr_maps"]
    summary = run_explain(
        str(package), str(tiny_corpus.root / "val-*.tar"), str(out), ExplainConfig(top_k=3, batch_size=16,
                                                                                   outputs=every_part)
    )  # fmt: skip
    assert summary["explained"] == 80 and summary["undecodable"] == 0
    inputs = resolve_inputs(str(tiny_corpus.root / "val-*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]
    assert keys_of(sorted(out.glob("*.tar"))) == keys_of(inputs)  # same keys, same order
    sample = next(iter_shard(out / "val-000000.tar"))
    record = json.loads(sample["json"])
    assert record["class_name"] == tiny_corpus.classes[record["class"]]
    records = [json.loads(s["json"]) for p in sorted(out.glob("*.tar")) for s in iter_shard(p)]
    for r in records:  # only what the model predicts present, reasons best first
        supports = [a for a in r["top_attributes"] if a["role"] == "supports"]
        assert len(supports) <= 3
        assert all(a["contribution"] >= 0 for a in supports)  # > 0 before rounding to 5 places
        assert [a["contribution"] for a in supports] == sorted((a["contribution"] for a in supports), reverse=True)
        # (the json rounds to 5 digits: an untrained model's 0.500002 reads 0.5)
        assert all(a["probability"] >= 0.5 for a in r["top_attributes"])
        assert all(x["probability"] <= 0.5 for x in r["lacks"])
        assert r["attribute_check"]["status"] == "unknown"  # an untrained package records no metrics
    assert any(r["top_attributes"] for r in records)
    assert sample["txt"].decode() == record["text"]
    assert record["text"].startswith(f"{record['class_name']} (")
    assert "true_class" in record and record["model_id"]
    maps = np.load(io.BytesIO(sample["heatmaps.npy"]), allow_pickle=False)
    k = len(record["top_attributes"])
    assert maps.dtype == np.float16 and maps.shape == (1 + k, 2, 2)
    assert len(record["map_peaks"]) == 1 + k and record["zero_maps"] == sum(p == 0 for p in record["map_peaks"])
    assert Image.open(io.BytesIO(sample["overlay.jpg"])).size == (32, 32)
    assert Image.open(io.BytesIO(sample["image.jpg"])).size == (32, 32)
    if k:
        assert Image.open(io.BytesIO(sample["attr_maps.jpg"])).size == (k * 32 + (k - 1) * 2, 32)


def test_text_lists_attributes_in_words():
    assert (
        explanation_text("red disc", 0.94, ["red body", "striped pattern", "small size"])
        == "red disc (94%): because it has a red body, a striped pattern and a small size"
    )
    assert explanation_text("x", 0.5, ["orange top"]) == "x (50%): because it has an orange top"
    # what the image lacks is said apart, with what it shows instead
    text = explanation_text("x", 0.9, ["red body"], [("white top", "black top"), ("dotted pattern", None)])
    assert (
        text == "x (90%): because it has a red body, although it has a black top rather than a white top "
        "and it lacks a dotted pattern"
    )
    # an attribute is said once: shown instead of the lacked one but a reason already, it is not repeated
    text = explanation_text("x", 0.9, ["black top", "red body"], [("white top", "black top")])
    assert text == "x (90%): because it has a black top and a red body, although it lacks a white top"
    # CUB-style names: one group's values are joined, contrasts name the group once
    cub = explanation_text(
        "Cardinal",
        0.8,
        ["bill shape: cone", "wing color: red", "bill shape: short"],
        [("crown color: red", "crown color: black")],
        groups=["bill shape", "wing color", "bill shape"],
        warning="attributes unreliable",
    )
    assert cub == (
        "Cardinal (80%): because it has bill shape: cone and short; wing color: red, "
        "although its crown color is black, not red [attributes unreliable]"
    )


def test_choose_attributes_names_only_present_ones_and_contrasts():
    probs = [0.9, 0.2, 0.7, 0.95, 0.1, 0.6]
    contrib = [0.5, 3.0, 1.5, -0.2, 2.0, 0.1]
    groups = {0: "g0", 1: "g0", 2: "g1", 3: "g2", 4: "g2", 5: "g3"}
    class_row = [0.1, 0.9, 0.8, 0.05, 0.92, 0.1]  # characteristic: 1, 2 and 4
    named, contrasts = choose_attributes(probs, contrib, class_row, groups, top_k=2, threshold=0.5, max_contrasts=2)
    # 5 is present although the class usually lacks it, and no reason (top_k): said as "against"
    assert [(n.index, n.role) for n in named] == [(2, "supports"), (0, "supports"), (3, "instead"), (5, "against")]
    assert contrasts == [(4, 3), (1, 0)]  # most characteristic first; 1's group shows 0, already a reason
    assert named[2].instead_of == 4 and all(probs[n.index] > 0.5 for n in named)
    _, contrasts = choose_attributes(probs, contrib, class_row, {}, top_k=2, threshold=0.5, max_contrasts=1)
    assert contrasts == [(4, None)]  # without groups nothing is shown "instead"
    # ties keep the attributes' order: reasons of equal contribution, "against" ones of equal probability
    named, _ = choose_attributes([0.9, 0.8, 0.6, 0.6, 0.9], [1.0, 2.0, -1.0, -1.0, 1.0], [0.9, 0.9, 0.1, 0.1, 0.9],
                                 {}, top_k=3, threshold=0.5, max_contrasts=0)  # fmt: skip
    assert [(n.index, n.role) for n in named] == [(1, "supports"), (0, "supports"), (4, "supports"),
                                                  (2, "against"), (3, "against")]  # fmt: skip


def rule_image_by_image(probs, contributions, class_row, groups, top_k, threshold, max_contrasts):
    """The naming rule stated attribute by attribute, for one image (what the batch chooser must give)."""
    present = [a for a, p in enumerate(probs) if p > threshold]
    supports = sorted([a for a in present if contributions[a] > 0], key=lambda a: -contributions[a])[:top_k]
    named, contrasts = [(a, "supports", None) for a in supports], []
    if class_row is None:
        return named, contrasts
    if max_contrasts > 0:
        missing = [a for a, f in enumerate(class_row) if f >= 0.5 and probs[a] <= threshold]
        for a in sorted(missing, key=lambda a: (-class_row[a], probs[a]))[:max_contrasts]:
            shown = [b for b in present if a in groups and groups.get(b) == groups[a]]
            best = max(shown, key=lambda b: probs[b]) if shown else None  # the first of equal maxima
            contrasts.append((a, best))
            if best is not None and best not in [n[0] for n in named]:
                named.append((best, "instead", a))
    taken = [n[0] for n in named]
    unusual = [a for a in present if class_row[a] < 0.5 and a not in taken]
    return named + [(a, "against", None) for a in sorted(unusual, key=lambda a: -probs[a])], contrasts


@pytest.mark.parametrize("seed", range(4))
def test_the_batch_chooser_names_what_the_rule_names_image_by_image(seed):
    import torch

    from eatdist.explain.text import AttributeChooser

    gen = torch.Generator().manual_seed(seed)
    count, attributes, classes = 24, 13, 5
    # values on a coarse grid, so that ties in every ranking are common; float32 as the model gives them
    probs = (torch.rand(count, attributes, generator=gen) * 10).round() / 10
    contributions = (torch.randn(count, attributes, generator=gen) * 2).round() / 2
    contributions[0, :3] = float("nan")
    rows = ((torch.rand(classes, attributes, generator=gen) * 4).round() / 4).tolist()
    groups = {a: f"g{a % 4}" for a in range(attributes) if a % 5}  # some attributes in no group
    predicted = torch.randint(classes, (count,), generator=gen).tolist()
    p64, c64 = probs.double().numpy(), contributions.double().numpy()
    for top_k, threshold, max_contrasts in [(3, 0.5, 2), (0, 0.3, 1), (13, 0.7, 13), (2, 0.5, 0)]:
        for class_rows in (rows, None):
            chooser = AttributeChooser(class_rows, groups, attributes, top_k, threshold, max_contrasts)
            named, contrasts = chooser.choose(p64, c64, predicted)
            for b, c in enumerate(predicted):
                want = rule_image_by_image(probs[b].tolist(), contributions[b].tolist(),
                                           class_rows[c] if class_rows else None, groups, top_k, threshold,
                                           max_contrasts)  # fmt: skip
                assert ([(n.index, n.role, n.instead_of) for n in named[b]], contrasts[b]) == want


def test_contributions_are_the_class_score_along_each_attribute_direction():
    import torch

    from eatdist.explain.text import attribute_contributions
    from eatdist.models.eat import linear_weight

    torch.manual_seed(0)
    model = build_model("test_resnet", {"output_stride": 16}, 4, 6).eval()
    features = torch.rand(3, model.num_features, 2, 2)
    classes = torch.tensor([0, 2, 3])
    got = attribute_contributions(model, features, classes)
    f = features.mean((2, 3))
    w, u = linear_weight(model.class_head), linear_weight(model.attr_head)
    for b in range(3):
        for a in range(6):
            unit = u[a] / u[a].norm()
            assert got[b, a].item() == pytest.approx(((w[classes[b]] @ unit) * (f[b] @ unit)).item(), rel=1e-4)
    mlp = build_model("test_resnet", {"output_stride": 16}, 4, 6, head_hidden=8).eval()
    assert attribute_contributions(mlp, features, classes).shape == (3, 6)  # the gradient route runs


def test_attribute_check_flags_a_near_chance_head():
    class_attributes = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]  # chance (common value): 0.75
    assert attribute_check({"val_attr_acc": 0.51}, class_attributes, 0.6, 0.02)["status"] == "near_chance"
    assert attribute_check({"val_attr_acc": 0.76}, class_attributes, 0.6, 0.02)["reliable"] is False
    assert attribute_check({"val_attr_acc": 0.97}, class_attributes, 0.6, 0.02)["status"] == "ok"
    assert attribute_check({}, class_attributes, 0.6, 0.02)["status"] == "unknown"


def test_undecodable_images_counted_listed_and_job_goes_on(tmp_path, package):
    corpus = write_corpus(
        tmp_path / "c", {"test": [10, 10]}, corrupt={"test_0000004": "image", "test_0000015": "nojson"}
    )
    summary = run_explain(str(package), str(corpus.root), str(tmp_path / "out"), ExplainConfig())
    assert summary["explained"] == 19 and summary["undecodable"] == 1
    assert summary["undecodable_samples"][0]["key"] == "test_0000004"
    assert "test_0000015" in keys_of(sorted((tmp_path / "out").glob("*.tar")))  # images alone are fine


@pytest.mark.slow
def test_killed_explain_rerun_explains_every_key_exactly_once(tmp_path, package):
    corpus = write_corpus(tmp_path / "c", {"test": [40] * 8})
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "eatdist",
        "explain",
        "--model",
        str(package),
        "--input",
        str(corpus.root / "*.tar"),
        "--output",
        str(out),
        "explain.batch_size=4",
    ]
    proc = subprocess.Popen(cmd, env=cpu_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (len(list(out.glob("*.tar"))) < 2 or not list(out.glob(".*.tmp"))):
        time.sleep(0.01)
    helpers = psutil.Process(proc.pid).children(recursive=True)  # loader workers and encoding processes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(helpers, timeout=20)
    assert not alive, f"processes of the killed job still running: {[p.pid for p in alive]}"
    finished = sorted(out.glob("*.tar"))
    assert 2 <= len(finished) < 8, "the kill should land part-way"
    for shard in finished:  # no partial shard under a final name
        assert len(keys_of([shard])) == 40
    assert list(out.glob(".*.tmp")), "the killed shard is left under its temporary name"
    mtimes = {p.name: p.stat().st_mtime_ns for p in finished}
    result = subprocess.run(cmd, env=cpu_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in finished} == mtimes  # finished shards skipped
    counts = Counter(keys_of(sorted(out.glob("*.tar"))))
    assert set(counts) == set(keys_of(sorted(corpus.root.glob("*.tar")))) and set(counts.values()) == {1}
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "explain_summary.json").read_text())["explained"] == 320


def test_unreadable_shard_is_reported_and_the_others_explained(tmp_path, package):
    corpus = write_corpus(tmp_path / "c", {"test": [6, 6]})
    (corpus.root / "test-000001.tar").write_bytes(b"this is not a tar archive" * 40)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "eatdist", "explain", "--model", str(package), "--input", str(corpus.root),
           "--output", str(out)]  # fmt: skip
    result = subprocess.run(cmd, env=cpu_env(), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "1 shard(s) not explained" in result.stderr and "test-000001.tar" in result.stderr
    assert "explain:" not in result.stderr  # TQDM_DISABLE=1 (cpu_env) turns the progress bar off
    assert len(keys_of([out / "test-000000.tar"])) == 6 and not (out / "test-000001.tar").exists()
    summary = json.loads((out / "explain_summary.json").read_text())
    assert summary["incomplete_shards"] == [str(corpus.root / "test-000001.tar")]


def test_two_inputs_with_one_name_are_refused(tmp_path):
    from eatdist.errors import DataError

    for folder in ("a", "b"):
        write_corpus(tmp_path / folder, {"test": [2]})
    with pytest.raises(DataError, match="have the same name"):
        resolve_inputs(str(tmp_path / "*" / "test-000000.tar"))
