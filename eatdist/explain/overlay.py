"""The class heatmap laid over the image, for people."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A blue → cyan → yellow → red ramp; five anchors, linearly interpolated.
_RAMP = np.array([[0, 0, 130], [0, 120, 255], [40, 230, 200], [255, 220, 0], [220, 20, 20]], dtype=np.float32)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """Map a ``[H, W]`` array in [0, 1] to ``[H, W, 3]`` uint8 colours."""
    x = np.clip(heatmap, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


# The upsampled map is 8-bit, so the ramp is evaluated once on the 256 levels it can take (the
# same float32 values ``colorize`` sees): a table lookup gives identical colours several times faster.
_LUT = colorize(np.arange(256, dtype=np.float32) / np.float32(255.0))


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5, fmt: str = "jpg") -> bytes:
    """Return encoded ``image`` blended with the normalised ``heatmap`` upsampled to its size."""
    small = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8))
    levels = np.asarray(small.resize(image.size, Image.BILINEAR))
    colours = Image.fromarray(_LUT[levels])
    blended = Image.blend(image if image.mode == "RGB" else image.convert("RGB"), colours, alpha)
    buf = io.BytesIO()
    blended.save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 90} if fmt == "jpg" else {}))
    return buf.getvalue()
