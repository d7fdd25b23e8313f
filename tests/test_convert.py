"""Converters from each dataset's own on-disk format, the corpus checker, and the path from a
downloaded archive to explanations: convert, check, train one epoch, explain."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from conftest import REPO, cpu_env
from eatdist.cli.main import main
from eatdist.data.check import check_corpus
from eatdist.data.convert import ConvertOptions, convert_awa2, convert_cub, convert_folder, convert_sun, sample_key
from eatdist.data.convert.common import stratified_split
from eatdist.data.corpus import load_dataset_info
from eatdist.data.pipeline import decode_image
from eatdist.data.shards import AtomicShardWriter, iter_shard

PER_CLASS = 10
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "017.Cardinal"]
CUB_ATTRIBUTES = [
    "has_bill_shape::curved_(up_or_down)",
    "has_bill_shape::dagger",
    "has_wing_color::blue",
    "has_wing_color::brown",
    "has_size::small_(5_-_9_in)",
    "has_primary_color::red",
]
CUB_PARTS = ["back", "beak", "left eye"]


def save_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    pixels[size[1] // 3 :, : size[0] // 2] = 255 - np.array(colour, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def lines(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{row}\n" for row in rows))


def make_cub(base: Path) -> dict:
    """CUB_200_2011 as unpacked, attributes.txt one level above; returns the values it wrote."""
    rng = np.random.default_rng(1)
    root = base / "CUB_200_2011"
    lines(base / "attributes.txt", [f"{i + 1} {name}" for i, name in enumerate(CUB_ATTRIBUTES)])
    lines(root / "classes.txt", [f"{i + 1} {name}" for i, name in enumerate(CUB_CLASSES)])
    lines(root / "parts/parts.txt", [f"{i + 1} {name}" for i, name in enumerate(CUB_PARTS)])
    images, labels, split, boxes, locs, attr_rows = [], [], [], [], [], []
    truth: dict[int, dict] = {}
    for c, cname in enumerate(CUB_CLASSES):
        for n in range(PER_CLASS):
            ident = len(truth) + 1
            rel = f"{cname}/{cname.split('.')[1]}_{n + 1:04d}_{ident}.jpg"
            save_image(root / "images" / rel, (60 * c + 40, 90, 200 - 60 * c))
            x, y, w, h = rng.integers(0, 15), rng.integers(0, 10), rng.integers(5, 20), rng.integers(5, 15)
            visible = rng.integers(0, 2, len(CUB_PARTS))
            xy = rng.integers(1, 30, (len(CUB_PARTS), 2)).astype(float)
            present = rng.integers(0, 2, len(CUB_ATTRIBUTES))
            present[0] = int(c == 0 or n < 6)  # bill curved: the majority in every class
            present[5] = int(c == 2 and n < 8)  # red: only cardinals
            certainty = rng.integers(1, 5, len(CUB_ATTRIBUTES))
            images.append(f"{ident} {rel}")
            labels.append(f"{ident} {c + 1}")
            split.append(f"{ident} {int(n < 8)}")
            boxes.append(f"{ident} {x}.0 {y}.0 {w}.0 {h}.0")
            for p in range(len(CUB_PARTS)):
                px, py = xy[p] if visible[p] else (0.0, 0.0)
                locs.append(f"{ident} {p + 1} {px} {py} {visible[p]}")
            for a in range(len(CUB_ATTRIBUTES)):
                fields = [ident, a + 1, present[a], certainty[a]]
                if ident % 7 == 2 and a in (1, 3):  # the official file's malformed lines: an extra field
                    fields.append(0)
                attr_rows.append(" ".join(map(str, fields)) + f" {rng.uniform(1, 20):.3f}")
            truth[ident] = {
                "key": sample_key(rel),
                "class": c,
                "present": present.tolist(),
                "certainty": certainty.tolist(),
                "bbox": [float(x), float(y), float(x + w), float(y + h)],
                "parts": {CUB_PARTS[p]: xy[p].tolist() for p in range(len(CUB_PARTS)) if visible[p]},
                "train": n < 8,
            }
    assert any(len(r.split()) == 6 for r in attr_rows)
    lines(root / "images.txt", images)
    lines(root / "image_class_labels.txt", labels)
    lines(root / "train_test_split.txt", split)
    lines(root / "bounding_boxes.txt", boxes)
    lines(root / "parts/part_locs.txt", locs)
    lines(root / "attributes/image_attribute_labels.txt", attr_rows)
    continuous = rng.uniform(0, 100, (len(CUB_CLASSES), len(CUB_ATTRIBUTES))).round(6)
    lines(root / "attributes/class_attribute_labels_continuous.txt", [" ".join(map(str, r)) for r in continuous])
    return {"root": root, "images": truth, "continuous": continuous}


SUN_SCENES = ["a/abbey", "a/apartment_building/outdoor", "b/bathroom"]
SUN_ATTRIBUTES = ["sailing/ boating", "no horizon", "man-made", "natural light", "enclosed area"]


def make_sun(root: Path) -> dict:
    """The SUN Attribute .mat files (cell arrays as object arrays) and images/; returns the labels."""
    rng = np.random.default_rng(2)
    relpaths = [f"{scene}/sun_{scene[-3:]}{n:03d}.jpg" for scene in SUN_SCENES for n in range(PER_CLASS)]
    for i, rel in enumerate(relpaths):
        save_image(root / "images" / rel, (30 + 70 * (i // PER_CLASS), 120, 80))
    labels = rng.choice([0.0, 1 / 3, 2 / 3, 1.0], (len(relpaths), len(SUN_ATTRIBUTES)))
    scipy.io.savemat(root / "images.mat", {"images": np.array(relpaths, dtype=object).reshape(-1, 1)})
    scipy.io.savemat(root / "attributes.mat", {"attributes": np.array(SUN_ATTRIBUTES, dtype=object).reshape(-1, 1)})
    scipy.io.savemat(root / "attributeLabels_continuous.mat", {"labels_cv": labels})
    return {"root": root, "relpaths": relpaths, "labels": labels}


AWA_CLASSES = ["antelope", "grizzly+bear", "killer+whale"]
AWA_PREDICATES = ["black", "white", "furry", "flippers", "newworld"]


def make_awa2(root: Path) -> dict:
    """Animals_with_Attributes2: tab-separated lists, predicate matrices, JPEGImages/<class>/."""
    rng = np.random.default_rng(3)
    lines(root / "classes.txt", [f"{i + 1:6d}\t{name}" for i, name in enumerate(AWA_CLASSES)])
    lines(root / "predicates.txt", [f"{i + 1:6d}\t{name}" for i, name in enumerate(AWA_PREDICATES)])
    binary = rng.integers(0, 2, (len(AWA_CLASSES), len(AWA_PREDICATES)))
    continuous = rng.uniform(0, 100, binary.shape).round(2)
    lines(root / "predicate-matrix-binary.txt", [" ".join(map(str, r)) for r in binary])
    lines(root / "predicate-matrix-continuous.txt", ["  ".join(f"{v:.2f}" for v in r) for r in continuous])
    for c, name in enumerate(AWA_CLASSES):
        for n in range(PER_CLASS):
            save_image(root / "JPEGImages" / name / f"{name}_{10001 + n}.jpg", (50 + 80 * c, 60, 90))
    return {"root": root, "binary": binary, "continuous": continuous}


FOLDER_CLASSES = ["blue jay", "cardinal", "crow"]
FOLDER_ATTRIBUTES = ["red_body", "crested head", "black bill"]


def make_folder(root: Path, per_class_csv: bool) -> dict:
    """SRC/<class>/<image> (jpg, png, one bmp, one big) plus an attribute CSV per image or per class."""
    rng = np.random.default_rng(4)
    values: dict[str, list[float]] = {}
    for c, name in enumerate(FOLDER_CLASSES):
        for n in range(PER_CLASS):
            suffix = ".png" if n % 3 == 0 else ".bmp" if n == 1 else ".jpg"
            rel = f"{name}/img {n}.v2{suffix}"
            save_image(root / "images" / rel, (200 - 70 * c, 50, 60 * c), (120, 90) if n == 2 else (40, 30))
            values[rel] = rng.choice([0.0, 0.5, 1.0], len(FOLDER_ATTRIBUTES)).tolist()
    class_values = {name: rng.uniform(0, 1, len(FOLDER_ATTRIBUTES)).round(3).tolist() for name in FOLDER_CLASSES}
    table = class_values if per_class_csv else values
    with open(root / "attributes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class" if per_class_csv else "image", *FOLDER_ATTRIBUTES])
        writer.writerows([name, *row] for name, row in table.items())
    return {"root": root / "images", "csv": root / "attributes.csv", "values": values, "class_values": class_values}


def samples(corpus: Path) -> dict[str, dict]:
    """Every sample of a corpus by key: split, image size, image extension and json."""
    info = load_dataset_info(corpus)
    out = {}
    for split in info.splits:
        for path in info.shard_paths(split):
            for sample in iter_shard(path):
                ext = next(e for e in ("jpg", "png", "webp") if e in sample)
                out[sample["__key__"]] = {
                    "split": split,
                    "size": decode_image(sample).size,
                    "ext": ext,
                    "json": json.loads(sample["json"]),
                }
    return out


def options(out: Path, **kw) -> ConvertOptions:
    return ConvertOptions(out=out, **{"shard_size": 8, "workers": 1, "progress": False, **kw})


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Each dataset's fixture, converted once (CUB with 2 processes)."""
    base = tmp_path_factory.mktemp("convert")
    cub, sun = make_cub(base / "cub_src"), make_sun(base / "sun_src")
    awa, folder = make_awa2(base / "awa_src"), make_folder(base / "folder_src", per_class_csv=False)
    return {
        "cub": (cub, convert_cub(cub["root"], options(base / "cub", workers=2))),
        "sun": (sun, convert_sun(sun["root"], options(base / "sun"))),
        "awa2": (awa, convert_awa2(awa["root"], options(base / "awa2"))),
        "folder": (folder, convert_folder(folder["root"], folder["csv"], options(base / "folder"))),
    }


@pytest.mark.parametrize("name", ["cub", "sun", "awa2", "folder"])
def test_converted_corpus_passes_check(corpora, name):
    _, result = corpora[name]
    report = check_corpus(result.info.root, workers=2, progress=False)
    assert report.ok, report.summary()
    counts = {split: result.info.num_samples(split) for split in ("train", "val", "test")}
    # CUB: 8 official train images per class (1 carved off for val), 2 test; others 8 / 1 / 1
    expected = {"train": 21, "val": 3, "test": 6} if name == "cub" else {"train": 24, "val": 3, "test": 3}
    assert counts == expected
    assert all(s.samples <= 8 for shards in result.info.splits.values() for s in shards)
    assert "OK" in report.summary()


def test_cub_samples_carry_the_source_annotations(corpora):
    cub, result = corpora["cub"]
    info, got = result.info, samples(result.info.root)
    assert info.classes == ["Black footed Albatross", "Laysan Albatross", "Cardinal"]
    assert info.attributes[0] == "bill shape: curved (up or down)"
    assert info.attributes[4] == "size: small (5 - 9 in)"
    assert info.attribute_groups == {"bill shape": [0, 1], "wing color": [2, 3], "size": [4], "primary color": [5]}
    assert np.allclose(info.class_attributes, cub["continuous"] / 100, atol=1e-4)
    assert len(got) == 3 * PER_CLASS
    for ident, truth in cub["images"].items():
        sample = got[truth["key"]]
        record = sample["json"]
        assert "." not in truth["key"] and truth["key"].startswith(CUB_CLASSES[truth["class"]].replace(".", "_"))
        assert record["class"] == truth["class"]
        assert record["attributes"] == truth["present"]  # the 6-field lines included
        assert record["attr_mask"] == [1] * len(CUB_ATTRIBUTES)
        assert record["bbox"] == truth["bbox"]
        assert record["parts"] == truth["parts"]
        assert record["image_id"] == ident
        assert (sample["split"] == "test") == (not truth["train"])
        assert sample["ext"] == "jpg" and sample["size"] == (40, 30)


def test_cub_certainty_weights_and_common_subset(tmp_path, corpora):
    cub, _ = corpora["cub"]
    result = convert_cub(cub["root"], options(tmp_path / "c"), certainty=True, attr_subset="common", min_classes=3)
    # bill curved is the majority in all 3 classes; red only in one, so it is left out at 3
    assert result.info.attributes[0] == "bill shape: curved (up or down)"
    assert "primary color: red" not in result.info.attributes
    assert len(result.info.class_attributes[0]) == len(result.info.attributes) < len(CUB_ATTRIBUTES)
    got = samples(result.info.root)
    weight = {2: 0.75, 3: 0.9, 4: 1.0}
    for truth in cub["images"].values():
        record = got[truth["key"]]["json"]
        present, certainty = truth["present"][0], truth["certainty"][0]
        if certainty == 1:
            assert record["attr_mask"][0] == 0 and record["attributes"][0] == 0
        else:
            expected = weight[certainty] if present else 1 - weight[certainty]
            assert record["attr_mask"][0] == 1 and record["attributes"][0] == pytest.approx(expected)


def test_sun_attributes_and_scene_classes(corpora):
    sun, result = corpora["sun"]
    info, got = result.info, samples(result.info.root)
    assert info.classes == ["abbey", "apartment building outdoor", "bathroom"]
    assert info.attributes == ["sailing/ boating", "no horizon", "man-made", "natural light", "enclosed area"]
    for i, rel in enumerate(sun["relpaths"]):
        record = got[sample_key(rel)]["json"]
        assert record["class"] == i // PER_CLASS
        assert record["attributes"] == pytest.approx(sun["labels"][i], abs=1e-4)
    train = [k for k, s in got.items() if s["split"] == "train" and s["json"]["class"] == 1]
    mean = np.mean([got[k]["json"]["attributes"] for k in train], axis=0)
    assert info.class_attributes[1] == pytest.approx(mean, abs=1e-3)


def test_awa2_class_level_attributes(corpora):
    awa, result = corpora["awa2"]
    info, got = result.info, samples(result.info.root)
    assert info.classes == ["antelope", "grizzly bear", "killer whale"]
    assert info.attributes == AWA_PREDICATES
    assert np.allclose(info.class_attributes, awa["continuous"] / 100, atol=1e-4)
    key = sample_key("grizzly+bear/grizzly+bear_10003.jpg")
    assert key == "grizzly_bear/grizzly_bear_10003"
    assert got[key]["json"]["class"] == 1
    assert got[key]["json"]["attributes"] == awa["binary"][1].tolist()
    assert {s["split"] for s in got.values()} == {"train", "val", "test"}


def test_folder_per_image_csv_with_resize(tmp_path, corpora):
    folder, result = corpora["folder"]
    got = samples(result.info.root)
    assert result.info.classes == FOLDER_CLASSES
    assert result.info.attributes == ["red body", "crested head", "black bill"]
    for rel, values in folder["values"].items():
        sample = got[sample_key(rel)]
        assert sample["json"]["attributes"] == values
        assert sample["json"]["class"] == FOLDER_CLASSES.index(rel.split("/")[0])
        assert sample["ext"] == ("png" if rel.endswith((".png", ".bmp")) else "jpg")  # bmp re-encoded as png
    assert sample_key("blue jay/img 2.v2.jpg") == "blue_jay/img_2_v2"
    assert got["blue_jay/img_2_v2"]["size"] == (120, 90)  # original bytes kept by default
    small = convert_folder(folder["root"], folder["csv"], options(tmp_path / "small", max_side=60))
    resized = samples(small.info.root)
    assert resized["blue_jay/img_2_v2"]["size"] == (60, 45) and resized["blue_jay/img_2_v2"]["ext"] == "jpg"
    assert resized["crow/img_4_v2"]["size"] == (40, 30)


def test_folder_per_class_csv(tmp_path):
    folder = make_folder(tmp_path / "src", per_class_csv=True)
    result = convert_folder(folder["root"], folder["csv"], options(tmp_path / "out"))
    got = samples(result.info.root)
    assert result.info.class_attributes == [folder["class_values"][c] for c in FOLDER_CLASSES]
    assert got["cardinal/img_5_v2"]["json"]["attributes"] == folder["class_values"]["cardinal"]


def test_max_side_rescales_boxes_and_parts(tmp_path, corpora):
    cub, _ = corpora["cub"]
    result = convert_cub(cub["root"], options(tmp_path / "half", max_side=20))
    got = samples(result.info.root)
    truth = cub["images"][1]
    record = got[truth["key"]]["json"]
    assert got[truth["key"]]["size"] == (20, 15)
    assert record["bbox"] == pytest.approx([v / 2 for v in truth["bbox"]])
    assert record["parts"] == {k: pytest.approx([x / 2, y / 2]) for k, (x, y) in truth["parts"].items()}


def test_same_input_same_shards(tmp_path, corpora):
    awa, _ = corpora["awa2"]

    def digest(folder: Path) -> str:
        files = sorted(folder.glob("*.tar")) + [folder / "dataset.json"]
        return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()

    convert_awa2(awa["root"], options(tmp_path / "a", workers=2, shard_size=5))
    convert_awa2(awa["root"], options(tmp_path / "b", workers=1, shard_size=5))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    convert_awa2(awa["root"], options(tmp_path / "c", workers=1, shard_size=5, seed=1))
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_stratified_split_is_per_class_and_seeded():
    labels = [0] * 20 + [1] * 10 + [2] * 1
    split = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=0)
    assert split == stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=0)
    assert [split[:20].count(s) for s in ("train", "val", "test")] == [14, 2, 4]
    assert [split[20:30].count(s) for s in ("train", "val", "test")] == [7, 1, 2]
    assert split[30] == "train"  # a class keeps at least one training image


def test_unreadable_source_image_is_skipped_and_counted(tmp_path):
    folder = make_folder(tmp_path / "src", per_class_csv=True)
    (folder["root"] / "crow" / "img 4.v2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = convert_folder(folder["root"], folder["csv"], options(tmp_path / "out"))
    assert [s["key"] for s in result.skipped] == ["crow/img_4_v2"]
    assert sum(result.info.num_samples(s) for s in result.info.splits) == 3 * PER_CLASS - 1
    assert check_corpus(result.info.root, progress=False).ok
    assert "1 unreadable images skipped" in result.summary()


def test_check_finds_broken_samples(tmp_path, capsys, corpora):
    _, result = corpora["awa2"]
    info = load_dataset_info(result.info.root)
    first = info.shard_paths("train")[0]
    raw = list(iter_shard(first))
    raw[0]["jpg"] = b"broken"
    raw[1]["json"] = json.dumps({"class": 0, "attributes": [1.0]}).encode()
    raw[2]["__key__"] = raw[5]["__key__"]
    corpus = tmp_path / "broken"
    corpus.mkdir()
    for shard in info.splits["train"][1:]:
        (corpus / shard.file).write_bytes((info.root / shard.file).read_bytes())
    with AtomicShardWriter(corpus / Path(first).name) as writer:
        for sample in raw[:-1]:
            writer.write(sample)
    info.root = corpus
    info.splits = {"train": info.splits["train"]}
    info.save(corpus)
    assert main(["check", str(corpus)]) == 1
    text = capsys.readouterr().out
    assert "undecodable jpg" in text and "expected 5 values, got 1" in text
    assert f"key '{raw[5]['__key__']}' appears 2 times" in text
    print(text)
    assert "holds 7 samples, dataset.json lists 8" in text


def eatdist_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "eatdist", *args],
        env=cpu_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        print(out[-3000:], err[-3000:])
    return proc.returncode, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    errors = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(errors) == 1, err
    assert errors[0].startswith("eatdist: error:") and all(f in errors[0] for f in fragments), err


def test_wrong_cub_folder_gives_one_line_from_the_cli(tmp_path):
    """Run as a user does (two at once: a CLI start costs seconds): one line naming the file."""
    missing = make_cub(tmp_path / "missing")
    (missing["root"] / "attributes/image_attribute_labels.txt").unlink()
    bad = make_cub(tmp_path / "bad")
    box_file = bad["root"] / "bounding_boxes.txt"
    rows = box_file.read_text().splitlines()
    rows[2] = rows[2].rsplit(" ", 1)[0]
    box_file.write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    procs = [eatdist_cli("convert", "cub", str(src["root"]), "--out", out) for src in (missing, bad)]
    code, _, err = finish(procs[0])
    assert_one_line_error(code, err, "missing", "attributes/image_attribute_labels.txt")
    code, _, err = finish(procs[1])
    assert_one_line_error(code, err, "bounding_boxes.txt, line 3", "expected 5 fields, got 4")
    assert not (tmp_path / "out" / "dataset.json").exists()


def _no_attribute_names(tmp_path: Path) -> list[str]:
    make_cub(tmp_path)
    (tmp_path / "attributes.txt").unlink()
    return ["cub", str(tmp_path / "CUB_200_2011")]


def _no_sun_attributes(tmp_path: Path) -> list[str]:
    (make_sun(tmp_path)["root"] / "attributes.mat").unlink()
    return ["sun", str(tmp_path)]


def _no_predicates(tmp_path: Path) -> list[str]:
    (make_awa2(tmp_path)["root"] / "predicates.txt").unlink()
    return ["awa2", str(tmp_path)]


def _csv_value_out_of_range(tmp_path: Path) -> list[str]:
    folder = make_folder(tmp_path, per_class_csv=False)
    rows = folder["csv"].read_text().splitlines()
    rows[4] = rows[4].rsplit(",", 1)[0] + ",1.5"
    folder["csv"].write_text("\n".join(rows) + "\n")
    return ["folder", str(folder["root"]), "--attributes", str(folder["csv"])]


def _truncated_sun_labels(tmp_path: Path) -> list[str]:
    sun = make_sun(tmp_path)
    scipy.io.savemat(tmp_path / "attributeLabels_continuous.mat", {"labels_cv": sun["labels"][:-1]})
    return ["sun", str(tmp_path)]


@pytest.mark.parametrize(
    ("broken", "fragments"),
    [
        (_no_attribute_names, ["missing", "attributes.txt", "beside CUB_200_2011"]),
        (_no_sun_attributes, ["missing", "attributes.mat"]),
        (_truncated_sun_labels, ["attributeLabels_continuous.mat", "29 x 5, expected 30 x 5"]),
        (_no_predicates, ["missing", "predicates.txt"]),
        (_csv_value_out_of_range, ["attributes.csv, line 5", "[0, 1]"]),
        (lambda tmp_path: ["awa2", str(tmp_path / "nowhere")], ["source folder not found", "nowhere"]),
    ],
)
def test_wrong_source_gives_one_line(tmp_path, capsys, broken, fragments):
    code = main(["convert", *broken(tmp_path), "--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


@pytest.mark.slow
def test_convert_check_train_explain_each_dataset(tmp_path, capsys):
    """From each dataset's own format to explanations, through the commands a user runs: the CLI's
    entry point, called in this process (a start costs seconds; the CLI runs as a process above)."""
    sources = {
        "cub": ["cub", str(make_cub(tmp_path / "cub_src")["root"])],
        "sun": ["sun", str(make_sun(tmp_path / "sun_src")["root"])],
        "awa2": ["awa2", str(make_awa2(tmp_path / "awa_src")["root"])],
    }
    folder = make_folder(tmp_path / "folder_src", per_class_csv=True)
    sources["folder"] = ["folder", str(folder["root"]), "--attributes", str(folder["csv"])]

    def stage(commands: dict[str, list[str]]) -> dict[str, str]:
        outputs = {}
        for name, cmd in commands.items():
            capsys.readouterr()
            code = main(cmd)
            outputs[name] = capsys.readouterr().out
            assert code == 0, name
        return outputs

    corpus = {name: tmp_path / name for name in sources}
    run_dir = {name: tmp_path / f"run_{name}" for name in sources}
    converted = stage({n: ["convert", *src, "--out", str(corpus[n]), "--workers", "1"] for n, src in sources.items()})
    assert "cub corpus in" in converted["cub"] and "train 21, val 3, test 6" in converted["cub"]
    for name in sources:
        assert check_corpus(corpus[name], progress=False).ok, name
    train = [
        "model.backbone=test_resnet",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "train.epochs=1",
    ]
    stage({n: ["train", f"data.root={corpus[n]}", f"train.output_dir={run_dir[n]}", *train] for n in sources})
    stage(
        {
            n: [
                "explain",
                "--model",
                str(run_dir[n] / "model"),
                "--input",
                f"{corpus[n]}/test-*.tar",
                "--output",
                str(tmp_path / f"explained_{n}"),
            ]
            for n in sources
        }
    )
    for name in sources:
        info = load_dataset_info(corpus[name])
        explained = [s for p in sorted((tmp_path / f"explained_{name}").glob("*.tar")) for s in iter_shard(p)]
        keys = {s["__key__"] for p in info.shard_paths("test") for s in iter_shard(p)}
        assert {s["__key__"] for s in explained} == keys, name
        assert json.loads(explained[0]["json"])["class_name"] in info.classes
        assert explained[0]["txt"]


def test_converters_rewrite_dotted_keys_so_no_samples_merge(tmp_path):
    """WebDataset splits a member name at its first dot: img.001.jpg and img.002.jpg would merge
    into one sample 'img'. The converters replace the dots by '_' (README, "Keys must not contain dots")."""
    root = tmp_path / "src"
    for n in range(4):
        save_image(root / "images" / "crow" / f"img.{n:03d}.jpg", (40 * n, 90, 10))
    (root / "attributes.csv").write_text("image,black\ncrow,1.0\n")
    result = convert_folder(root / "images", root / "attributes.csv", options(tmp_path / "out", val_fraction=0.0,
                            test_fraction=0.0))  # fmt: skip
    got = samples(result.info.root)
    assert sorted(got) == ["crow/img_000", "crow/img_001", "crow/img_002", "crow/img_003"]
    assert all(s["json"]["source"].startswith("crow/img.") for s in got.values())
