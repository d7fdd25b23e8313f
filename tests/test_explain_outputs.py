"""What an explanation sample holds (explain.outputs), who encodes it, and pictures drawn on the device."""

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import eatdist
from conftest import untrained_package, write_corpus
from eatdist.config import ExplainConfig, load_config
from eatdist.data.pipeline import decode_image
from eatdist.data.shards import iter_shard
from eatdist.errors import ConfigError, DataError
from eatdist.explain import overlay as pil_path
from eatdist.explain import render
from eatdist.explain.job import run_explain
from eatdist.explain.report import write_report

EVERY_PART = ["json", "txt", "heatmaps.npy", "image", "overlay", "attr_maps"]


@pytest.fixture(scope="module")
def package(tmp_path_factory, tiny_corpus):
    return untrained_package(tiny_corpus, tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="module")
def every_part(tmp_path_factory, tiny_corpus, package):
    """The test split explained with every part, encoded by 2 processes, 8 images a batch."""
    out = tmp_path_factory.mktemp("every") / "out"
    cfg = ExplainConfig(batch_size=8, num_workers=1, encode_workers=2, outputs=EVERY_PART)
    run_explain(str(package), str(tiny_corpus.root / "test-*.tar"), str(out), cfg)
    return out


def samples(folder):
    return [s for p in sorted(folder.glob("*.tar")) for s in iter_shard(p)]


def test_encoding_processes_write_exactly_what_the_writer_thread_writes(tmp_path, tiny_corpus, package, every_part):
    inline = tmp_path / "inline"
    cfg = ExplainConfig(batch_size=8, num_workers=0, encode_workers=0, outputs=EVERY_PART)
    run_explain(str(package), str(tiny_corpus.root / "test-*.tar"), str(inline), cfg)
    # same keys in the input's order, same bytes in every part
    assert (every_part / "test-000000.tar").read_bytes() == (inline / "test-000000.tar").read_bytes()
    got = samples(every_part)
    assert [s["__key__"] for s in got] == [s["__key__"] for s in iter_shard(tiny_corpus.root / "test-000000.tar")]
    named = [len(json.loads(s["json"])["top_attributes"]) for s in got]
    assert {k for s in got for k in s} == {"__key__", "json", "txt", "heatmaps.npy", "image.jpg", "overlay.jpg",
                                           "attr_maps.jpg"} and any(named)  # fmt: skip
    assert all(("attr_maps.jpg" in s) == (k > 0) for s, k in zip(got, named, strict=True))


def test_a_cpu_model_encodes_inline_the_bytes_the_writer_thread_would(tmp_path, tiny_corpus, package):
    from eatdist.explain.explainer import Explainer
    from eatdist.explain.work import ShardWork
    from eatdist.models.package import load_package
    from eatdist.store import open_store

    cpu = torch.device("cpu")
    model, meta = load_package(package, cpu)
    cfg = ExplainConfig(batch_size=8, num_workers=0, encode_workers=0, outputs=EVERY_PART)
    explainer, shard = Explainer(model, meta, cfg, cpu), str(tiny_corpus.root / "test-000000.tar")
    written = {}
    for inline in (True, False):  # False: as on a GPU, the writer thread encodes
        work = ShardWork(explainer, open_store(tmp_path / str(inline)), cfg)
        assert work.writer.inline and work.writer.pool is None
        work.writer.inline, reports = inline, []
        try:
            assert work.explain(shard, "test", reports.append) is None
            work.drain()
        finally:
            work.close()
        assert reports[0].explained == 40
        written[inline] = (tmp_path / str(inline) / "test-000000.tar").read_bytes()
    assert written[True] == written[False]


def test_images_explained_in_groups_give_the_bytes_of_one_batch_at_a_time(tmp_path, package, monkeypatch):
    from eatdist.explain.explainer import Explainer

    calls = []
    results = Explainer.results
    monkeypatch.setattr(Explainer, "results", lambda self, *a: calls.append(len(a[1][0])) or results(self, *a))
    corpus = write_corpus(tmp_path / "c", {"test": [30, 11]}, corrupt={"test_0000004": "image"})
    mlp = untrained_package(corpus, tmp_path / "mlp", head_hidden=8)  # Grad-CAM: its own images per batch
    copy = ["json", "txt", "heatmaps.npy", "image"]  # the input JPEGs as they are: nothing drawn
    by_batch = {256: [3, 6, 7, 8, 8, 8]}  # pictures drawn, or Grad-CAM: one batch at a time
    for model, parts, grouped in ((package, copy, {12: [11, 14, 15], 256: [11, 29]}), (package, EVERY_PART, by_batch),
                                  (mlp, copy, by_batch)):  # fmt: skip
        written = {}
        for group in (0, *grouped):
            calls.clear()
            out = tmp_path / f"{model.parent.name}-{len(parts)}-{group}"
            cfg = ExplainConfig(batch_size=8, num_workers=0, group_images=group, outputs=parts)
            summary = run_explain(str(model), str(corpus.root), str(out), cfg)
            assert summary["explained"] == 40 and summary["undecodable"] == 1
            assert sorted(calls) == grouped.get(group, [3, 6, 7, 8, 8, 8]), group  # images per call, any shard first
            written[group] = [p.read_bytes() for p in sorted(out.glob("*.tar"))]
        assert all(shards == written[0] for shards in written.values())
    with pytest.raises(ConfigError, match=r"explain\.group_images': must be at least 0, got -1"):
        run_explain(str(package), str(corpus.root), str(tmp_path / "bad"), ExplainConfig(group_images=-1))


def test_pictures_are_encoded_by_default_where_they_cost_least(tmp_path, package):
    from eatdist.explain.writer import ShardWriterThread
    from eatdist.models.package import load_package
    from eatdist.store import open_store

    _, meta = load_package(package, torch.device("cpu"))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # the writer only reads the device's type here
    copy = ["json", "image"]  # the input JPEG as it is: nothing drawn
    # (device, config, encoding processes, encoded by the thread that hands the batch over)
    cases = (
        (cpu, ExplainConfig(num_workers=2), None, True),  # nothing drawn
        (cpu, ExplainConfig(num_workers=2, outputs=copy), None, True),
        (cpu, ExplainConfig(num_workers=2, outputs=EVERY_PART), None, False),  # the writer thread draws
        (cpu, ExplainConfig(num_workers=2, outputs=["json", "image.png"]), None, False),
        (cpu, ExplainConfig(num_workers=0, outputs=EVERY_PART), 1, False),  # the main thread decodes
        (cpu, ExplainConfig(num_workers=0, outputs=EVERY_PART, encode_workers=0), None, True),
        (cpu, ExplainConfig(num_workers=2, encode_workers=1), 1, False),
        (gpu, ExplainConfig(num_workers=3, outputs=EVERY_PART, render_device="cpu"), 3, False),
        (gpu, ExplainConfig(num_workers=3, outputs=EVERY_PART), None, False),  # drawn on the device
    )
    for device, cfg, processes, inline in cases:
        writer = ShardWriterThread(meta, cfg, open_store(tmp_path), device)
        try:
            assert (writer.pool.processes if writer.pool else None, writer.inline) == (processes, inline), cfg
        finally:
            writer.close()


def test_default_outputs_are_json_text_and_maps_and_report_draws_the_pictures(tmp_path, package):
    corpus = write_corpus(tmp_path / "c", {"test": [12]})
    out, full_out = tmp_path / "out", tmp_path / "full"
    summary = run_explain(str(package), str(corpus.root), str(out), ExplainConfig(batch_size=8))
    run_explain(str(package), str(corpus.root), str(full_out), ExplainConfig(batch_size=8, outputs=EVERY_PART))
    assert summary["explained"] == 12
    bare = samples(out)
    assert all(set(s) == {"__key__", "json", "txt", "heatmaps.npy"} for s in bare)
    full = {s["__key__"]: s for s in samples(full_out)}
    for s in bare:  # everything else is the same explanation
        assert s["json"] == full[s["__key__"]]["json"] and s["heatmaps.npy"] == full[s["__key__"]]["heatmaps.npy"]
    page = write_report(out, tmp_path / "r.html", samples=6).read_text()
    keys = re.findall(r'<div class="key">([^ <]+) ', page)
    cards = page.split('<div class="card')[1:]
    assert len(keys) == len(cards) == 6
    for key, card in zip(keys, cards, strict=True):
        # the pictures drawn from heatmaps.npy and the input are the ones explain writes when asked
        pictures = [base64.b64decode(x) for x in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', card)]
        written = [full[key][p] for p in ("image.jpg", "overlay.jpg", "attr_maps.jpg") if p in full[key]]
        assert pictures == written and len(pictures) >= 2
    assert "no pictures" not in page
    (corpus.root / "test-000000.tar").unlink()  # inputs gone: cards without pictures, and the page says why
    page = write_report(out, tmp_path / "r2.html", samples=6).read_text()
    assert "<img " not in page and "Some cards have no pictures" in page and "test-000000.tar" in page


def _picture(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(("workers", "parts"), [(0, ["json", "image", "overlay"]), (1, ["json", "image", "overlay"]),
                                              (1, ["json", "image"])])  # fmt: skip
def test_the_image_part_is_the_input_jpeg_itself_when_that_is_the_image_explained(tmp_path, package, workers, parts):
    from eatdist.data.shards import AtomicShardWriter

    y, x = np.mgrid[0:40, 0:56]
    photo = Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], axis=2).astype(np.uint8))  # smooth: JPEG keeps it
    rotated = Image.Exif()
    rotated[0x0112] = 6  # viewers turn it; the model saw it unturned
    inputs = {
        "rgb_jpeg": ("jpg", _picture(photo, "JPEG", quality=80)),
        "grey_jpeg": ("jpg", _picture(photo.convert("L"), "JPEG")),
        "exif_rotated": ("jpg", _picture(photo, "JPEG", exif=rotated)),
        "png": ("png", _picture(photo, "PNG")),
    }
    (tmp_path / "in").mkdir()
    with AtomicShardWriter(tmp_path / "in" / "mixed-000000.tar") as writer:
        for key, (ext, data) in inputs.items():
            writer.write({"__key__": key, ext: data, "json": b'{"class": 1}'})
    cfg = ExplainConfig(batch_size=3, num_workers=workers, outputs=parts)
    run_explain(str(package), str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"), cfg)
    got = {s["__key__"]: s for s in samples(tmp_path / "out")}
    assert got["rgb_jpeg"]["image.jpg"] == inputs["rgb_jpeg"][1]  # the input's own bytes, not encoded again
    for key, (ext, data) in inputs.items():
        copy = got[key]["image.jpg"]
        assert (copy == data) == (key == "rgb_jpeg")  # the others are the decoded RGB image, encoded
        explained = np.asarray(decode_image({ext: data}), dtype=np.float32)
        assert np.abs(np.asarray(Image.open(io.BytesIO(copy)), dtype=np.float32) - explained).mean() < 3
        assert Image.open(io.BytesIO(copy)).mode == "RGB"
        assert set(got[key]) == {"__key__", "json", "image.jpg"} | ({"overlay.jpg"} if "overlay" in parts else set())
        assert "overlay" not in parts or got[key]["overlay.jpg"][:2] == b"\xff\xd8"
    if parts == ["json", "image"]:  # nothing drawn: the pixels of an input that is its own copy stay in the loader
        from eatdist.explain.loader import ShardChunks

        chunks = ShardChunks(lambda t: t.float(), 4, keep_originals=True, drawn=False)
        chunks.select(str(tmp_path / "in" / "mixed-000000.tar"))
        (chunk,) = list(chunks)
        assert [a.size == 0 for a in chunk.images] == [True, False, False, False]
        assert chunk.originals[0] == inputs["rgb_jpeg"][1]


def test_an_explanation_sample_and_its_input_give_the_overlays_explain_writes(tiny_corpus, every_part):
    inputs = {s["__key__"]: s for s in iter_shard(tiny_corpus.root / "test-000000.tar")}
    for sample in samples(every_part)[:5]:
        bare = {k: sample[k] for k in ("__key__", "json", "heatmaps.npy")}
        explanation = eatdist.Explanation.from_sample(bare, decode_image(inputs[sample["__key__"]]))
        assert explanation.text == sample["txt"].decode()
        assert pil_path.encode(explanation.overlay()) == sample["overlay.jpg"]
    with pytest.raises(DataError, match="no heatmaps.npy"):
        eatdist.Explanation.from_sample({"__key__": "k", "json": b"{}"}, np.zeros((4, 4, 3), np.uint8))


def test_bad_outputs_are_one_line_config_errors(tmp_path, tiny_corpus, package):
    with pytest.raises(ConfigError, match=r"explain\.outputs\[1\].*'overlay'"):
        load_config(None, ["explain.outputs=[json, overlays]"])
    with pytest.raises(ConfigError, match="must include json"):
        run_explain(str(package), str(tiny_corpus.root / "test-*.tar"), str(tmp_path / "o"),
                    ExplainConfig(outputs=["txt", "heatmaps.npy"]))  # fmt: skip
    assert not (tmp_path / "o").exists()  # refused before any work
    with pytest.raises(ConfigError, match="overlay named more than once"):
        run_explain(str(package), str(tiny_corpus.root / "test-*.tar"), str(tmp_path / "o"),
                    ExplainConfig(outputs=["json", "overlay", "overlay.png"]))  # fmt: skip
    # The Python API is held to the same parts as YAML: no picture written under a format it does not have
    with pytest.raises(ConfigError, match=r"unknown part 'overlay\.jpeg'"):
        run_explain(str(package), str(tiny_corpus.root / "test-*.tar"), str(tmp_path / "o"),
                    ExplainConfig(outputs=["json", "overlay.jpeg"]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"unknown part 'overlays' "):  # named as the user wrote it
        run_explain(str(package), str(tiny_corpus.root / "test-*.tar"), str(tmp_path / "o"),
                    ExplainConfig(outputs=["json", "overlays"]))  # fmt: skip
    assert not (tmp_path / "o").exists()


def _chw(array):
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def test_device_drawing_equals_the_pil_path_on_cpu():
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (224, 224), (150, 300), (37, 53)]  # (height, width): squares, wide, odd
    for height, width in sizes:
        image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        maps = rng.random((4, 8, 8)).astype(np.float32)
        maps[2] = 0.0  # an all-zero map: no heat, no contour
        maps /= np.maximum(maps.reshape(4, -1).max(1), 1e-12)[:, None, None]
        for k in range(4):  # the overlay: the same picture but for float rounding of the upsampled map
            want = np.asarray(pil_path.blend(Image.fromarray(image), maps[k], 0.6)).astype(int)
            got = render.blend(_chw(image)[None], torch.from_numpy(maps[k])[None], 0.6)[0].permute(1, 2, 0).numpy()
            diff = np.abs(want - got)
            assert diff.max() <= 2 and (diff > 0).mean() < 1e-3, (height, width, k)
        strip = pil_path.attribute_strip(Image.fromarray(image), maps[1:], 0.6, "png")
        want = np.asarray(Image.open(io.BytesIO(strip)))
        got = render.strips(_chw(image)[None], torch.from_numpy(maps[1:])[None], [3])[0].permute(1, 2, 0).numpy()
        assert want.shape == got.shape  # thumbnail sizes as PIL rounds them
        assert np.abs(want.astype(int) - got.astype(int)).max() <= 2  # antialiased shrink: within 2 levels


def test_device_jpegs_decode_within_a_few_levels_of_the_pil_jpegs():
    rng = np.random.default_rng(1)
    images, maps, counts = [], [], [2, 0, 3]
    for height, width in [(96, 96), (96, 96), (80, 120)]:  # two of one size drawn together, one alone
        yy, xx = np.mgrid[:height, :width]
        smooth = np.stack([128 + 100 * np.sin(xx / 9.0 + c) * np.cos(yy / 13.0) for c in range(3)], -1)
        images.append(smooth.astype(np.uint8))  # photo-like: JPEG differences stay small
        maps.append(rng.random((4, 6, 6)).astype(np.float32))
    drawn = render.render_batch([_chw(i) for i in images], torch.from_numpy(np.stack(maps)), counts,
                                ["overlay.jpg", "attr_maps.jpg", "image.jpg"], 0.6)  # fmt: skip
    for image, m, k, parts in zip(images, maps, counts, drawn, strict=True):
        pil = Image.fromarray(image)
        want = {"image.jpg": pil_path.encode(pil), "overlay.jpg": pil_path.overlay(pil, m[0], 0.6)}
        if k:
            want["attr_maps.jpg"] = pil_path.attribute_strip(pil, m[1 : 1 + k], 0.6)
        assert set(parts) == set(want)
        for name, data in want.items():
            a = np.asarray(Image.open(io.BytesIO(data)), dtype=int)
            b = np.asarray(Image.open(io.BytesIO(parts[name])), dtype=int)
            assert a.shape == b.shape and np.abs(a - b).mean() < 1.5 and np.percentile(np.abs(a - b), 99) <= 8, name
    with pytest.raises(ValueError, match="JPEG only"):
        render.render_batch([_chw(images[0])], torch.from_numpy(maps[0][None]), [1], ["overlay.png"])


def test_inputs_decoded_where_the_model_runs_explain_as_the_loader_decoded_ones(tmp_path, package, every_part):
    # explain.decode_device=model: the loader passes JPEG bytes, the model's device decodes a batch
    # at a time (nvJPEG on a GPU; here the same functions on the CPU); a JPEG it refuses is listed
    corpus = write_corpus(tmp_path / "c", {"test": [10]}, corrupt={"test_0000003": "image"})
    outs = {}
    for where in ("cpu", "model"):
        cfg = ExplainConfig(batch_size=4, num_workers=1, encode_workers=0, outputs=EVERY_PART, decode_device=where)
        summary = run_explain(str(package), str(corpus.root / "test-*.tar"), str(tmp_path / where), cfg)
        assert summary["explained"] == 9 and summary["undecodable"] == 1
        outs[where] = samples(tmp_path / where)
    assert [s["__key__"] for s in outs["model"]] == [s["__key__"] for s in outs["cpu"]]
    assert "test_0000003" not in [s["__key__"] for s in outs["model"]]
    for a, b in zip(outs["cpu"], outs["model"], strict=True):
        ja, jb = json.loads(a["json"]), json.loads(b["json"])
        assert ja["class"] == jb["class"] and ja["confidence"] == pytest.approx(jb["confidence"], abs=0.02)
        assert np.abs(pixels(a["image.jpg"]) - pixels(b["image.jpg"])).mean() < 3  # a few levels of 255
    report = json.loads((tmp_path / "model" / "_reports" / "test-000000.tar.json").read_text())
    assert [u["key"] for u in report["undecodable"]] == ["test_0000003"]


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def test_tar_members_from_encoding_processes_equal_the_shard_writers_layout(tmp_path):
    from eatdist.data.shards import AtomicShardWriter
    from eatdist.explain.encode import tar_members

    parts = [{"__key__": f"d/k_{i}", "json": b"{}" * (i + 1), "txt": "é".encode() * i, "heatmaps.npy": bytes(700 + i)}
             for i in range(5)]  # fmt: skip
    with AtomicShardWriter(tmp_path / "a.tar") as writer:
        for sample in parts:
            writer.write(dict(sample))
    with AtomicShardWriter(tmp_path / "b.tar") as writer:
        writer.write_members(*tar_members([dict(s) for s in parts[:2]], "b.tar"))
        writer.write_members(*tar_members([dict(s) for s in parts[2:]], "b.tar"))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert (tmp_path / "a.tar.idx.json").read_bytes() == (tmp_path / "b.tar.idx.json").read_bytes()
    # and both are what WebDataset's own writer makes of the same samples
    with open(tmp_path / "c.tar", "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="eatdist",
                                                            group="eatdist") as tar:  # fmt: skip
        for sample in parts:
            tar.write(dict(sample))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "c.tar").read_bytes()
    with pytest.raises(DataError, match="contains a dot"):
        tar_members([{"__key__": "a.b", "json": b"{}"}], "b.tar")


def test_overlay_is_the_float_blend_within_a_few_levels_with_a_white_contour():
    from eatdist.explain.overlay import _contour, blend, colorize, upsample

    rng = np.random.default_rng(1)
    image = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    heat = rng.random((4, 5)).astype(np.float32)
    for alpha in (0.6, 1.0):
        out = np.asarray(blend(Image.fromarray(image), heat, alpha)).astype(float)
        full = upsample(heat, (40, 30))
        weight = (alpha * full)[..., None]
        expected = image * (1 - weight) + colorize(full) * weight
        edge = _contour(full)
        assert edge.any() and (out[edge] == 255).all()
        assert np.abs(out[~edge] - expected[~edge]).max() <= 5  # the 8-bit level on a steep ramp: 4


def test_upsample_is_pils_bicubic_resize_for_one_map_and_a_stack():
    from eatdist.explain.overlay import upsample

    rng = np.random.default_rng(2)
    for (h, w), size in (((2, 2), (64, 64)), ((7, 5), (224, 150)), ((4, 9), (31, 17)), ((40, 30), (12, 50))):
        maps = rng.random((3, h, w)).astype(np.float32) * 1.2 - 0.1  # past [0, 1]: clipped after resizing
        pil = [np.clip(np.asarray(Image.fromarray(m, mode="F").resize(size, Image.BICUBIC)), 0, 1) for m in maps]
        assert upsample(maps[0], size).shape == (size[1], size[0])
        np.testing.assert_allclose(upsample(maps[0], size), pil[0], atol=1e-6)
        np.testing.assert_allclose(upsample(maps, size), np.stack(pil), atol=1e-6)


def test_attribute_strip_is_each_maps_overlay_on_the_thumbnail_side_by_side():
    from eatdist.explain.overlay import STRIP_TILE, attribute_strip, blend

    rng = np.random.default_rng(3)
    image = Image.fromarray((rng.random((200, 150, 3)) * 255).astype(np.uint8))
    maps = rng.random((3, 7, 7)).astype(np.float32)
    maps[1] = 0.0  # an all-zero map: the thumbnail untouched, no contour
    strip = np.asarray(Image.open(io.BytesIO(attribute_strip(image, maps, 0.6, "png"))))
    small = image.copy()
    small.thumbnail((STRIP_TILE, STRIP_TILE), Image.BILINEAR)
    width, height = small.size
    assert strip.shape == (height, 3 * width + 2 * 2, 3)
    for k in range(3):
        tile = strip[:, k * (width + 2) : k * (width + 2) + width]
        assert np.array_equal(tile, np.asarray(blend(small, maps[k], 0.6))), k
        if k < 2:
            assert (strip[:, k * (width + 2) + width : (k + 1) * (width + 2)] == 255).all()  # the white gap
    assert np.array_equal(strip[:, width + 2 : 2 * width + 2], np.asarray(small))
    assert attribute_strip(image, maps[:0]) is None


def test_images_travel_in_one_shared_block_passed_on_without_a_copy():
    import pickle
    from multiprocessing.reduction import ForkingPickler  # what process pools and DataLoaders pickle with

    from eatdist.explain.loader import Chunk

    def travel(chunk):
        return pickle.loads(ForkingPickler.dumps(chunk))

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((5, 7, 3), (0, 0, 3), (2, 3, 3))]
    arrived = travel(Chunk(0, keys=["a", "b", "c"], images=images))
    assert [a.tolist() for a in arrived.images] == [a.tolist() for a in images]
    block = arrived.__getstate__()["images"][0]
    assert block.is_shared() and block.numel() == sum(a.size for a in images)
    assert arrived.__getstate__()["images"][0] is block  # passed on again: the same block
    arrived.images[1] = np.zeros((1, 1, 3), dtype=np.uint8)  # an image replaced: packed anew
    again = travel(arrived)
    assert again.images[1].shape == (1, 1, 3) and again.images[2].tolist() == images[2].tolist()


def test_member_headers_equal_tarfiles_for_every_name_and_size():
    import tarfile

    from eatdist.explain.encode import MemberHeaders

    headers = MemberHeaders()
    names = ["k.json", "d/k_0001.heatmaps.npy", "x" * 95 + ".json", "y" * 100, "z" * 101, "café.txt", "a\udcff.b"]
    for name in names:
        for size in (0, 1, 511, 512, 70_000, 8**11 - 1, 8**11):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "eatdist", "eatdist"
            expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            assert headers.header(name, size) == expected, (name, size)
        # made together for a batch of members (the regular ones as one array), each as it is alone
        sizes = [0, 1, 511, 512, 70_000, 8**11 - 1, 8**11]
        assert headers.headers([name] * len(sizes), sizes) == [headers.header(name, n) for n in sizes]
    assert headers.headers(names, [3] * len(names)) == [headers.header(n, 3) for n in names]
    assert headers.headers([], []) == []


def test_npy_bytes_equal_np_save_for_every_layout():
    from eatdist.explain.encode import npy_bytes

    rng = np.random.default_rng(0)
    arrays = [rng.random((3, 2, 2)).astype(np.float16), rng.random((1, 7, 7)).astype(np.float32)[:, ::2],
              np.zeros((0, 4), np.float16), np.arange(5), np.asfortranarray(rng.random((3, 4))), np.array(3.0),
              rng.random((2, 3)).astype(">f4")]  # fmt: skip
    for array in arrays:
        saved = io.BytesIO()
        np.save(saved, array, allow_pickle=False)
        assert npy_bytes(array) == npy_bytes(array) == saved.getvalue(), array.shape


def test_a_killed_encoding_process_fails_the_job_with_one_line_and_publishes_nothing(tmp_path, package):
    import os
    import signal

    from eatdist.errors import EatdistError
    from eatdist.explain.explainer import Explainer
    from eatdist.explain.job import ExplainJob
    from eatdist.models.package import load_package

    corpus = write_corpus(tmp_path / "c", {"test": [48]})
    model, meta = load_package(package)
    cfg = ExplainConfig(batch_size=4, num_workers=0, encode_workers=1, outputs=EVERY_PART)
    job = ExplainJob(Explainer(model, meta, cfg, torch.device("cpu")), [str(corpus.root / "test-000000.tar")],
                     tmp_path / "out", cfg)  # fmt: skip
    (pid,) = job.work.writer.pool._pool._processes  # the one encoding process, forked when the job was made
    os.kill(pid, signal.SIGKILL)
    try:
        with pytest.raises(EatdistError, match="an encoding process of explain died"):
            job.run()
    finally:
        with pytest.raises(EatdistError):  # close re-raises the writer's error
            job.close()
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").glob(".*.tmp"))
