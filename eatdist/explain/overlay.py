"""Heatmaps laid over the image, for people.

A map a few cells wide is upsampled smoothly (bicubic on the float map) to the image. The heat
colour is blended with an opacity that grows with the map, so where the model does not look
the image keeps its own colours, and even where it looks most the object shows through
(``alpha`` < 1). A white contour marks where the map passes half its peak.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

# A blue → cyan → yellow → red ramp; five anchors, linearly interpolated.
_RAMP = np.array([[0, 0, 130], [0, 120, 255], [40, 230, 200], [255, 220, 0], [220, 20, 20]], dtype=np.float32)
CONTOUR_LEVEL = 0.5
STRIP_TILE = 128  # the longer side of an attribute tile, in pixels


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """Map a ``[H, W]`` array in [0, 1] to ``[H, W, 3]`` uint8 colours."""
    x = np.clip(heatmap, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


# The upsampled map is quantised to 8 bits, so the ramp is evaluated once on the 256 levels it
# can take: a table lookup gives the same colours several times faster.
_LUT = colorize(np.arange(256, dtype=np.float32) / np.float32(255.0))
_PALETTE = _LUT.tobytes()


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Return ``heatmap`` resized to ``size`` (width, height) by bicubic interpolation, clipped to [0, 1]."""
    small = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    return np.clip(np.asarray(small.resize(size, Image.BICUBIC)), 0.0, 1.0)


def _contour(full: np.ndarray) -> np.ndarray:
    """Pixels on the inside edge of the region where the map is at least half its peak."""
    inside = full >= CONTOUR_LEVEL * max(float(full.max()), 1e-12)
    if not full.any():
        return np.zeros_like(inside)
    padded = np.pad(inside, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


@functools.lru_cache(maxsize=16)
def opacity_table(alpha: float) -> tuple[int, ...]:
    """The tint's opacity for each of the 256 map levels, ``floor(level * alpha)`` in float64."""
    return tuple((np.arange(256) * alpha).astype(np.uint8).tolist())


def blend(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Return ``image`` (RGB) with ``heatmap`` (``[h, w]`` in [0, 1]) drawn over it; see the module docstring.

    The blend runs in PIL on 8-bit planes (``Image.composite`` with the opacity as its mask):
    within one level of the float blend, several times faster. The map's 8-bit levels become
    colours and opacities through 256-entry tables (a palette, a point table), in PIL's C code.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    full = upsample(heatmap, rgb.size)
    level = Image.fromarray((full * 255).astype(np.uint8), mode="L")
    opacity = level.point(opacity_table(alpha))  # no tint where the map is 0
    heat = level.copy()
    heat.putpalette(_PALETTE)
    out = Image.composite(heat.convert("RGB"), rgb, opacity)
    out.paste((255, 255, 255), mask=Image.fromarray(_contour(full).astype(np.uint8) * 255, mode="L"))
    return out


def encode(image: Image.Image, fmt: str = "jpg") -> bytes:
    """Return ``image`` encoded as JPEG (quality 90) or PNG."""
    buf = io.BytesIO()
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    rgb.save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 90} if fmt == "jpg" else {}))
    return buf.getvalue()


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.6, fmt: str = "jpg") -> bytes:
    """Return encoded ``image`` with the normalised ``heatmap`` drawn over it (see :func:`blend`)."""
    return encode(blend(image, heatmap, alpha), fmt)


def attribute_strip(
    image: Image.Image, maps: np.ndarray, alpha: float = 0.6, fmt: str = "jpg", tile: int = STRIP_TILE
) -> bytes | None:
    """Return one encoded image of the ``[K, h, w]`` attribute maps over ``image``, side by side.

    Tile ``k`` is attribute ``k`` of the explanation's ``top_attributes``, at most ``tile`` pixels
    on its longer side (the maps have a few cells: a thumbnail shows them whole, at a fraction of
    the cost of full-size tiles), separated by a 2-pixel white gap. None when ``maps`` is empty.
    """
    if len(maps) == 0:
        return None
    small = image if image.mode == "RGB" else image.convert("RGB")
    if max(small.size) > tile:
        small = small.copy()
        small.thumbnail((tile, tile), Image.BILINEAR)
    width, height = small.size
    gap = 2
    strip = Image.new("RGB", (len(maps) * width + (len(maps) - 1) * gap, height), (255, 255, 255))
    for k, heat in enumerate(maps):
        strip.paste(blend(small, heat, alpha), (k * (width + gap), 0))
    return encode(strip, fmt)
