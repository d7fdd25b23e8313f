"""The Python API: any image in, the CLI's explanation out; the examples of the README and the docs run as written."""

import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import eatdist
from conftest import REPO, untrained_package
from eatdist.config import ExplainConfig
from eatdist.data.shards import AtomicShardWriter, iter_shard
from eatdist.errors import DataError
from eatdist.explain.job import run_explain


@pytest.fixture(scope="module")
def package(tmp_path_factory, tiny_corpus):
    torch.manual_seed(1)
    return untrained_package(tiny_corpus, tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="module")
def model(package):
    return eatdist.load_model(package, device="cpu")


def images():
    """Non-square images in the modes users meet."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return {
        "rgb": rgb,
        "gray": rgb.convert("L"),
        "rgba": rgb.convert("RGBA"),
        "palette": rgb.convert("P"),
        "tall": Image.fromarray(rng.integers(0, 256, (70, 20, 3), dtype=np.uint8)),
    }


@pytest.mark.parametrize("mode", ["rgb", "gray", "rgba", "palette", "tall"])
def test_explain_takes_any_mode_and_size(model, mode):
    image = images()[mode]
    result = model.explain(image, top_k=2)
    assert isinstance(result, eatdist.Explanation)
    assert result.class_name == model.classes[result.class_index] and 0 < result.confidence <= 1
    assert result.text.startswith(result.class_name)
    k = len(result.attributes)  # up to top_k reasons, then what the image shows instead of a lacked attribute
    assert sum(a.role == "supports" for a in result.attributes) <= 2
    assert result.maps.shape == (1 + k, 2, 2) and result.maps.dtype == np.float32
    for a in result.attributes:
        assert a.name == model.attributes[a.index] and 0 <= a.probability <= 1
    assert result.upsampled_maps().shape == (1 + k, image.height, image.width)
    overlay = result.overlay()
    assert overlay.size == image.size and overlay.mode == "RGB"
    # the same image given as a path, a CHW uint8 tensor and an HWC array gives the same answer
    rgb = np.array(image.convert("RGB"))
    for other in (torch.from_numpy(rgb).permute(2, 0, 1), rgb):
        again = model.explain(other, top_k=2)
        assert again.record == result.record
        np.testing.assert_array_equal(again.maps, result.maps)


def test_grayscale_tensor_and_path_inputs(model, tmp_path):
    gray = images()["gray"]
    path = tmp_path / "gray.png"
    gray.save(path)
    from_path, from_tensor = model.predict([path, torch.from_numpy(np.array(gray))])
    direct = model.predict(gray)
    assert from_path.class_index == from_tensor.class_index == direct.class_index
    assert from_path.attributes == pytest.approx(direct.attributes, abs=1e-6)
    assert set(direct.attributes) == set(model.attributes)
    assert direct.class_probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs_are_one_line_errors(model, tmp_path):
    with pytest.raises(DataError, match="uint8"):
        model.predict(torch.rand(3, 8, 8))
    (tmp_path / "not.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable image"):
        model.explain(str(tmp_path / "not.png"))
    with pytest.raises(DataError, match="shape"):
        model.predict(np.zeros((2, 3, 4, 5), dtype=np.uint8))


def test_api_explanations_equal_the_cli_for_the_same_images(model, package, tmp_path):
    pictures = list(images().values())
    shard = tmp_path / "in" / "pics-000000.tar"
    shard.parent.mkdir()
    paths = []
    with AtomicShardWriter(shard) as writer:
        for i, image in enumerate(pictures):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            writer.write({"__key__": f"img{i}", "png": buf.getvalue()})
            paths.append(tmp_path / f"img{i}.png")
            paths[-1].write_bytes(buf.getvalue())
    cfg = ExplainConfig(top_k=3, batch_size=64, num_workers=0)
    run_explain(str(package), str(shard), str(tmp_path / "out"), cfg)
    cli = list(iter_shard(tmp_path / "out" / shard.name))
    api = model.explain(paths, top_k=3)
    assert len(cli) == len(api) == len(pictures)
    for sample, result in zip(cli, api, strict=True):
        record = json.loads(sample["json"])  # the CLI adds where the sample came from
        assert {key: record[key] for key in result.record} == result.record
        assert sample["txt"].decode() == result.text
        maps = np.load(io.BytesIO(sample["heatmaps.npy"]), allow_pickle=False)
        np.testing.assert_array_equal(maps.astype(np.float32), result.maps)


@pytest.mark.parametrize("page", ["README.md", "docs/api.md", "docs/getting-started.md"])
def test_readme_example_runs(package, tmp_path, monkeypatch, page):
    text = (REPO / page).read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)  # the page's first Python example
    monkeypatch.chdir(tmp_path)
    shutil.copytree(package, tmp_path / "runs" / "synthetic" / "model")
    images()["rgba"].save(tmp_path / "example.png")
    exec(compile(code, f"{page} (Python API example)", "exec"), {})
    assert Image.open(tmp_path / "explained.png").size == (56, 40)
