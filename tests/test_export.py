"""Export: the ONNX file run by onnxruntime and the TorchScript file give PyTorch's outputs."""

import json

import numpy as np
import pytest
import torch

from eatdist.cli.main import main
from eatdist.models.package import PackageMeta, build_model, load_package, save_package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("test_resnet", {"output_stride": 16}, 5, 7)
    meta = PackageMeta(backbone="test_resnet", backbone_args={"output_stride": 16}, classes=list("abcde"),
                       attributes=[f"attr {i}" for i in range(7)],
                       preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})  # fmt: skip
    return save_package(tmp_path_factory.mktemp("pkg") / "model", model.eval(), meta)


def reference(package, x):
    model, _ = load_package(package)
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return [t.numpy() for t in out]


def test_forward_output_is_a_named_tuple_that_torch_export_accepts(package):
    model, _ = load_package(package)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert isinstance(out, tuple) and out._fields == ("class_logits", "attr_logits", "features")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    again = program.module()(torch.randn(3, 3, 32, 32))
    assert [t.shape[0] for t in again] == [3, 3, 3]


def test_onnx_export_matches_pytorch_at_two_batch_sizes(package, tmp_path, capsys):
    import onnxruntime

    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(package), "--format", "onnx", "--out", str(out)]) == 0
    assert "dynamic batch size" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["class_logits", "attr_logits", "features"]
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = session.run(None, {"image": x})
        for a, b in zip(got, reference(package, x), strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["package"]["classes"] == list("abcde") and sidecar["outputs"][0] == "class_logits"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.14 deprecates torch.jit for torch.export
def test_torchscript_export_matches_pytorch(package, tmp_path):
    out = tmp_path / "model.pt"
    assert main(["export", "--model", str(package), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    for batch in (1, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        with torch.no_grad():
            got = scripted(torch.from_numpy(x))
        for a, b in zip(got, reference(package, x), strict=True):
            np.testing.assert_allclose(a.numpy(), b, atol=1e-5, rtol=0)


def test_export_errors_are_one_line(package, tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "none"), "--format", "onnx", "--out", str(tmp_path / "m")]) == 2
    assert "not an eatdist model package" in capsys.readouterr().err
