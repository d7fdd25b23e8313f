"""From a sample's bytes to model inputs: decoding, checking labels, resizing, normalising.

Training batches travel from the loader workers as uint8 ``[B, 3, S, S]`` tensors (4x less
memory traffic than float32) and are normalised on the device by :meth:`Preprocess.normalize`.
JPEGs much larger than the model's input are decoded at a reduced size (libjpeg's DCT scaling
through PIL's draft mode); others go through ``torchvision.io.decode_jpeg``, faster than PIL's
decode plus the copy into a tensor.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from eatdist.data.corpus import IMAGE_EXTENSIONS

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (not a dependency here);
# decode_jpeg still works and is the fastest decoder at hand (1.1-1.8x PIL's path, measured),
# so its per-call warning is silenced by message, nothing else.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

Decoder = Literal["auto", "pil"]
# A JPEG at least this many times the input size (on its short side) is decoded reduced.
DRAFT_FACTOR = 2


class BadSample(ValueError):
    """A sample that cannot be used; the message says why."""


@dataclass(frozen=True)
class Preprocess:
    """Input size and normalisation a model expects."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocess:
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))  # type: ignore[arg-type]

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return uint8 ``[B, 3, H, W]`` images as normalised ``dtype``, computed where they are."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * 255.0
        return ((images.float() - mean) / std).to(dtype)


def build_transform(
    pre: Preprocess, train: bool, crop_scale_min: float = 1.0, hflip: bool = True, normalize: bool = True
) -> v2.Compose:
    """Return the uint8 CHW tensor → model-size tensor transform.

    With ``normalize`` it ends in a normalised float tensor; without, it stays uint8 (resize,
    crop and flip work on uint8) for :meth:`Preprocess.normalize` on the device.
    """
    size = (pre.image_size, pre.image_size)
    steps: list[Any] = []
    if train and crop_scale_min < 1.0:
        steps.append(v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), antialias=True))
    else:
        steps.append(v2.Resize(size, antialias=True))
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    if normalize:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]
    return v2.Compose(steps)


def image_ext(sample: dict[str, Any]) -> str:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample(f"no image ({'/'.join(IMAGE_EXTENSIONS)})")
    return ext


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """Return the sample's image as RGB.

    Raises:
        BadSample: when there is no image or it cannot be decoded.
    """
    ext = image_ext(sample)
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken bytes
        raise BadSample(f"undecodable {ext} image ({type(exc).__name__})") from None


def decode_tensor(sample: dict[str, Any], target: int | None = None, decoder: Decoder = "auto") -> torch.Tensor:
    """Return the sample's image as a uint8 ``[3, H, W]`` tensor (RGB).

    With ``target`` (the model's input size), a JPEG at least ``DRAFT_FACTOR`` times larger on its
    short side is decoded at the smallest DCT scale that keeps both sides >= ``target``; the
    result differs from a full decode plus resize only within JPEG decoder tolerance.
    ``decoder="pil"`` decodes everything with PIL at full size. Raises:
        BadSample: when there is no image or it cannot be decoded.
    """
    return decode_sized(sample, target, decoder)[0]


def decode_sized(
    sample: dict[str, Any], target: int | None = None, decoder: Decoder = "auto"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Return :func:`decode_tensor`'s image and the stored image's (width, height), which a JPEG
    decoded reduced no longer has (coordinates in its record refer to the stored size)."""
    ext = image_ext(sample)
    data = sample[ext]
    if decoder == "pil" or ext not in ("jpg", "jpeg"):
        return _sized(_to_tensor(decode_image(sample)))
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if target is not None and min(img.size) >= DRAFT_FACTOR * target and img.format == "JPEG":
                stored = img.size
                img.draft("RGB", (target, target))
                return _to_tensor(img.convert("RGB")), stored
            if img.format != "JPEG":  # a PNG named .jpg: PIL reads what it is
                return _sized(_to_tensor(img.convert("RGB")))
    except Exception as exc:  # PIL raises many types for broken bytes
        raise BadSample(f"undecodable {ext} image ({type(exc).__name__})") from None
    try:
        return _sized(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
    except RuntimeError:  # a JPEG flavour libjpeg's fast path refuses (e.g. CMYK): PIL converts it
        return _sized(_to_tensor(decode_image(sample)))


def _sized(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    return tensor, (tensor.shape[2], tensor.shape[1])


def input_jpeg(sample: dict[str, Any]) -> bytes | None:
    """Return the sample's image bytes when they are a JPEG that decodes to what :func:`decode_image`
    gives (colour, no EXIF rotation), else None: a copy of the input can be the bytes themselves."""
    data = _jpeg(sample)
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            plain = img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001  (an image PIL cannot open is reported by decode_image)
        return None
    return data if plain else None


def jpeg_bytes(sample: dict[str, Any]) -> torch.Tensor | None:
    """Return a JPEG sample's encoded bytes as a uint8 tensor (for decoding on a GPU), else None.

    Raises:
        BadSample: when the sample has no image.
    """
    data = _jpeg(sample)
    return None if data is None else torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _jpeg(sample: dict[str, Any]) -> bytes | None:
    """The sample's image bytes when it is a JPEG (by name and by its first bytes), else None.
    Raises BadSample when the sample has no image."""
    ext = image_ext(sample)
    data = sample[ext]
    return data if ext in ("jpg", "jpeg") and data.startswith(b"\xff\xd8") else None


def decode_on_device(
    jpegs: list[torch.Tensor], seeds: list[int], transform: v2.Transform, device: torch.device, train: bool
) -> list[torch.Tensor | None]:
    """Decode a batch of JPEGs on ``device`` (nvJPEG on CUDA) and apply ``transform`` to each.

    Each image's augmentation is drawn from its own seed (as in the loader workers) without
    touching the training RNG. Returns one uint8 ``[3, S, S]`` tensor per input, None for an
    image the decoder refuses.
    """
    try:
        images: list[torch.Tensor | None] = list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the batch call: decode one by one to find it
        images = []
        for jpeg in jpegs:
            try:
                images.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    out: list[torch.Tensor | None] = []
    for image, seed in zip(images, seeds, strict=True):
        if image is None or not train:
            out.append(None if image is None else transform(image))
            continue
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator alone: cheap
            out.append(transform(image))
    return out


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def parse_labels(sample: dict[str, Any], num_classes: int, num_attributes: int) -> tuple[int, list[float], list[float]]:
    """Return (class, attributes, attr_mask) from the sample's ``json``, checked against the corpus.

    Raises:
        BadSample: when the json is missing, malformed or inconsistent with ``dataset.json``.
    """
    if "json" not in sample:
        raise BadSample("no json")
    try:
        record = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSample("malformed json") from None
    if not isinstance(record, dict):
        raise BadSample("json is not an object")
    label = record.get("class")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
        raise BadSample(f"class {label!r} not an integer in [0, {num_classes})")
    attrs = record.get("attributes")
    if not isinstance(attrs, list) or len(attrs) != num_attributes:
        n = len(attrs) if isinstance(attrs, list) else type(attrs).__name__
        raise BadSample(f"attributes: expected {num_attributes} values, got {n}")
    mask = record.get("attr_mask", [1.0] * num_attributes)
    if not isinstance(mask, list) or len(mask) != num_attributes:
        raise BadSample(f"attr_mask: expected {num_attributes} values")
    try:
        values = [float(a) for a in attrs]
        mask_values = [float(m) for m in mask]
    except (TypeError, ValueError):
        raise BadSample("attributes or attr_mask hold non-numbers") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise BadSample("attribute values outside [0, 1]")
    return label, values, mask_values
