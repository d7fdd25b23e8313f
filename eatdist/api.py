"""The Python API (contract 6): load a model package, predict and explain images in a notebook.

    import eatdist
    model = eatdist.load_model("runs/synthetic/model")    # or "hf-hub:org/name" from the Hugging Face Hub
    result = model.explain("bird.jpg")          # one image in, one result out; a list gives a list
    print(result.text); result.overlay()          # a PIL image

Images are PIL images of any mode (grayscale, RGBA, palette, ...), file paths, or uint8 tensors
or arrays (``[H, W]``, ``[C, H, W]`` or ``[H, W, C]`` with C = 1, 3 or 4) of any size. They are
preprocessed exactly as training and ``eatdist explain`` do: converted to RGB by PIL (an alpha
channel is dropped, not composited), then resized to the package's square ``image_size`` with
antialiasing, the whole image without cropping (a non-square image is squashed, as in training),
then normalised with the package's mean and std. :meth:`ExplainedModel.explain` runs the very
code ``eatdist explain`` runs (:class:`eatdist.explain.explainer.Explainer`), so its class,
attributes, text and maps equal the CLI's for the same image.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias, overload

import numpy as np
import torch
from PIL import Image

from eatdist import dist
from eatdist.config import ExplainConfig
from eatdist.errors import DataError
from eatdist.explain.explainer import Explainer
from eatdist.explain.overlay import blend, upsample
from eatdist.models.eat import EATModel
from eatdist.models.package import PackageMeta, load_package

ImageInput: TypeAlias = Image.Image | str | Path | torch.Tensor | np.ndarray


@dataclass
class Prediction:
    """One image's class and attribute probabilities."""

    class_index: int
    class_name: str
    confidence: float  # softmax probability of the class
    attributes: dict[str, float]  # every attribute's name → predicted probability
    class_probabilities: np.ndarray  # [classes] softmax


@dataclass
class AttributeScore:
    """One attribute named by an explanation (``role``: "supports" the class, or shown "instead")."""

    index: int
    name: str
    probability: float
    contribution: float
    role: str = "supports"


@dataclass
class Explanation:
    """One image explained: class, named attributes, text and ``[1 + K, h, w]`` maps (class first).

    ``record`` is the ``json`` of an explanation shard, exactly as ``eatdist explain`` writes it.
    """

    class_index: int
    class_name: str
    confidence: float
    attributes: list[AttributeScore]
    text: str
    maps: np.ndarray  # [1 + K, h, w] float32 in [0, 1], at feature resolution
    image: Image.Image  # the input as RGB, at its own size
    record: dict[str, Any] = field(repr=False)
    alpha: float = 0.6

    def upsampled_maps(self) -> np.ndarray:
        """Return the maps resized to the image, ``[1 + K, H, W]`` float32 in [0, 1] (bicubic, as the overlays)."""
        return np.stack([upsample(m, self.image.size) for m in self.maps]) if len(self.maps) else self.maps

    def overlay(self, index: int = 0, alpha: float | None = None) -> Image.Image:
        """Return map ``index`` (0: the class; k: the k-th named attribute) drawn over the image, as PIL RGB.

        Raises:
            IndexError: when there is no map ``index``.
        """
        if not 0 <= index < len(self.maps):
            raise IndexError(f"no map {index}: this explanation has {len(self.maps)} (class first)")
        return blend(self.image, self.maps[index], self.alpha if alpha is None else alpha)

    @classmethod
    def from_sample(cls, sample: dict[str, Any], image: ImageInput, alpha: float = 0.6) -> Explanation:
        """Return the explanation an explanation-shard sample holds (its ``json`` and ``heatmaps.npy``)
        over ``image``, the input it explains: :meth:`overlay` then draws what a shard written
        without overlays (``explain.outputs``) does not hold, as ``eatdist explain`` draws it.

        Raises:
            DataError: when the sample lacks ``json`` or ``heatmaps.npy``, or ``image`` cannot be read.
        """
        missing = [part for part in ("json", "heatmaps.npy") if part not in sample]
        if missing:
            raise DataError(f"sample {sample.get('__key__', '?')}: no {' or '.join(missing)} to explain it from")
        record = json.loads(sample["json"])
        maps = np.load(io.BytesIO(sample["heatmaps.npy"]), allow_pickle=False).astype(np.float32)
        attributes = [
            AttributeScore(a["index"], a["name"], a["probability"], a["contribution"], a.get("role", "supports"))
            for a in record.get("top_attributes", [])
        ]
        return cls(record["class"], record["class_name"], record["confidence"], attributes, record["text"], maps,
                   to_pil(image), record, alpha)  # fmt: skip


def to_pil(image: ImageInput) -> Image.Image:
    """Return ``image`` as an RGB PIL image, converted the way training decodes samples.

    Raises:
        DataError: for a path that is not a readable image, or an array of the wrong type or shape.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(f"{image}: not a readable image ({type(exc).__name__}: {exc})") from None
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DataError(f"image arrays must be uint8 (0-255), got {image.dtype}; convert with (x * 255).byte()")
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # CHW → HWC
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4)):
            return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
        raise DataError(
            f"cannot read an image array of shape {tuple(image.shape)}: expected [H, W], [C, H, W] or [H, W, C]"
        )
    raise DataError(f"cannot read an image from a {type(image).__name__}: give a PIL image, a path or a uint8 tensor")


class ExplainedModel:
    """A model package ready for :meth:`predict` and :meth:`explain` (see :func:`load_model`)."""

    def __init__(
        self, model: EATModel, meta: PackageMeta, device: torch.device, cfg: ExplainConfig | None = None
    ) -> None:
        self.model, self.meta, self.device = model, meta, device
        self.cfg = cfg or ExplainConfig()
        self._explainers: dict[int, Explainer] = {}
        self.explainer = self._explainer(self.cfg.top_k)

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @property
    def attributes(self) -> list[str]:
        return self.meta.attributes

    def _explainer(self, top_k: int) -> Explainer:
        if top_k not in self._explainers:
            self._explainers[top_k] = Explainer(self.model, self.meta, replace(self.cfg, top_k=top_k), self.device)
        return self._explainers[top_k]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Return the model input ``[B, 3, S, S]`` of RGB PIL images (the CLI's transform)."""
        transform = self.explainer.transform
        return torch.stack(
            [transform(torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)) for im in images]
        )

    @overload
    def predict(self, images: ImageInput) -> Prediction: ...
    @overload
    def predict(self, images: list[ImageInput]) -> list[Prediction]: ...

    def predict(self, images: ImageInput | list[ImageInput]) -> Prediction | list[Prediction]:
        """Return the class and attribute probabilities of one image, or of each image of a list.

        Raises:
            DataError: for an input that is not an image (see :func:`to_pil`).
        """
        single = not isinstance(images, (list, tuple))
        pils = [to_pil(im) for im in ([images] if single else images)]  # type: ignore[list-item]
        found: list[Prediction] = []
        for start in range(0, len(pils), self.cfg.batch_size):
            with torch.inference_mode():
                _, out = self.explainer.forward(self.preprocess(pils[start : start + self.cfg.batch_size]))
                class_probs = out.class_logits.float().softmax(1).cpu().numpy()
                attr_probs = out.attr_logits.float().sigmoid().cpu().numpy()
            for cp, ap in zip(class_probs, attr_probs, strict=True):
                c = int(cp.argmax())
                found.append(Prediction(c, self.meta.classes[c], float(cp[c]),
                                        dict(zip(self.meta.attributes, map(float, ap), strict=True)), cp))  # fmt: skip
        return found[0] if single else found

    @overload
    def explain(self, images: ImageInput, top_k: int | None = None) -> Explanation: ...
    @overload
    def explain(self, images: list[ImageInput], top_k: int | None = None) -> list[Explanation]: ...

    def explain(
        self, images: ImageInput | list[ImageInput], top_k: int | None = None
    ) -> Explanation | list[Explanation]:
        """Explain one image, or each image of a list: class, named attributes, text and maps.

        ``top_k`` caps the attributes named (default ``explain.top_k``, 3). Raises:
            DataError: for an input that is not an image (see :func:`to_pil`).
            ConfigError: for a negative ``top_k``.
        """
        single = not isinstance(images, (list, tuple))
        pils = [to_pil(im) for im in ([images] if single else images)]  # type: ignore[list-item]
        explainer = self._explainer(self.cfg.top_k if top_k is None else top_k)
        found: list[Explanation] = []
        for start in range(0, len(pils), self.cfg.batch_size):
            batch = pils[start : start + self.cfg.batch_size]
            for image, item in zip(batch, explainer.explain(batch), strict=True):
                found.append(self._explanation(image, item["json"], item["maps"]))
        return found[0] if single else found

    def _explanation(self, image: Image.Image, record: dict[str, Any], maps: np.ndarray) -> Explanation:
        named = [
            AttributeScore(a["index"], a["name"], a["probability"], a["contribution"], a.get("role", "supports"))
            for a in record["top_attributes"]
        ]
        return Explanation(record["class"], record["class_name"], record["confidence"], named, record["text"],
                           np.asarray(maps, dtype=np.float32), image, record, self.cfg.overlay_alpha)  # fmt: skip


def load_model(path: str | Path, device: str | torch.device | None = None) -> ExplainedModel:
    """Load the model package at ``path`` for :meth:`~ExplainedModel.predict` and :meth:`~ExplainedModel.explain`.

    ``path`` is a package folder or ``"hf-hub:org/name"`` (optionally ``@revision``): a package on the
    Hugging Face Hub, downloaded once into its cache and read from there (``HF_HUB_OFFLINE=1``: from
    the cache alone). ``device`` defaults to this process's GPU when there is one, else the CPU. Raises:
        ModelPackageError: when ``path`` is not a usable model package, or a Hub package cannot be had.
    """
    target = torch.device(device) if device is not None else dist.device()
    model, meta = load_package(path, target)
    return ExplainedModel(model, meta, target)
