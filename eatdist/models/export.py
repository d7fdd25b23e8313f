"""Export a model package to ONNX or TorchScript, for serving without eatdist, or as a Hub folder.

The exported model takes the normalised image batch ``image`` (float32 ``[B, 3, S, S]``, the
package's ``preprocess``: resize to S × S, scale to [0, 1], subtract ``mean``, divide by ``std``)
and returns ``class_logits [B, classes]``, ``attr_logits [B, attributes]`` and ``features
[B, C, h, w]``; the batch size is dynamic. The closed-form maps follow from the features and the
heads' weights (``relu(W[k] · features)``, see :mod:`eatdist.explain.cam`). A JSON file beside the
model (``<out>.json``) holds the package metadata: preprocessing, class and attribute names.
The ``hub`` format writes a folder for the Hugging Face Hub instead (:mod:`eatdist.models.hub`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch

from eatdist.atomic import atomic_path, write_json
from eatdist.errors import EatdistError
from eatdist.models.eat import EATModel
from eatdist.models.package import PackageMeta, load_package

ExportFormat = Literal["onnx", "torchscript", "hub"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "hub")
INPUT_NAME = "image"
OUTPUT_NAMES = ("class_logits", "attr_logits", "features")
# An example batch of 2, not 1: torch.export specialises a dimension whose example size is 1.
EXAMPLE_BATCH = 2


class ExportError(EatdistError):
    """A model that cannot be exported in the format asked for."""


def example_input(meta: PackageMeta, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    """Return a random normalised input batch at the package's image size."""
    size = int(meta.preprocess["image_size"])
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def export_onnx(model: EATModel, example: torch.Tensor, out: Path, opset: int | None = None) -> None:
    """Write ``model`` as ONNX with a dynamic batch dimension (torch's dynamo exporter).

    Raises:
        ExportError: when the exporter (or onnxscript, which it needs) is missing or fails.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; say so before it fails deeper)
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    # The exporter's passes log every rewrite at INFO: noise for a user of ``eatdist export``.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the cause is what a user needs
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if program is None:
        raise ExportError("ONNX export produced no program")
    program.save(str(out))


def export_torchscript(model: EATModel, example: torch.Tensor, out: Path) -> None:
    """Write ``model`` traced to TorchScript; its outputs are a tuple in ``OUTPUT_NAMES`` order.

    Raises:
        ExportError: when tracing fails.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks in Python
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as exc:
        raise ExportError(f"TorchScript export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    traced.save(str(out))


def export_package(
    package: str | Path, fmt: str, out: str | Path, opset: int | None = None, repo: str | None = None
) -> Path:
    """Export the model package at ``package`` to ``out`` in ``fmt`` ("onnx", "torchscript" or "hub").

    Writes ``out`` and ``<out>.json`` (the package metadata and the input/output names) and
    returns ``out``; "hub" writes the folder ``out`` for Hub repository ``repo`` (see
    :func:`eatdist.models.hub.write_hub_folder`). Raises:
        ExportError: for an unknown format or a failed export;
        DiskError: naming ``out``, the size needed and the space free, on a full or read-only disk
            (nothing is left under ``out``);
        ModelPackageError: when ``package`` is not a usable model package.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    if fmt == "hub":
        from eatdist.models.hub import write_hub_folder

        return write_hub_folder(package, out, repo)
    model, meta = load_package(package, "cpu")
    target = Path(out)
    example = example_input(meta)
    # about the weights' size, plus the graph
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + (1 << 20)
    with atomic_path(target, f"the {fmt} model", needed) as tmp:
        if fmt == "onnx":
            export_onnx(model, example, tmp, opset)
        else:
            export_torchscript(model, example, tmp)
    sidecar = {
        "format": fmt,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, example.shape[2], example.shape[3]], "dtype": "float32"},
        "outputs": list(OUTPUT_NAMES),
        "package": asdict(meta),
    }
    write_json(f"{target}.json", sidecar, "the exported model's metadata")
    return target
