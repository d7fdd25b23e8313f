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
_PALETTE = bytes([255, 255, 255]) + _LUT[1:].tobytes()  # entry 0 is the contour's white: see _tint


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5)."""
    a, x = -0.5, np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
        np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0),
    )


@functools.lru_cache(maxsize=256)
def resize_weights(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` weights of PIL's bicubic resampling along one axis (its coefficients, exactly)."""
    scale = size_in / size_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    weights = np.zeros((size_out, size_in))
    for out in range(size_out):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size_in)
        taps = _bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = taps.sum()
        weights[out, lo:hi] = taps / total if total != 0.0 else taps
    return weights


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Return ``heatmap`` (``[h, w]``, or a stack ``[K, h, w]``) resized to ``size`` (width, height)
    by PIL's bicubic interpolation, clipped to [0, 1], float32.

    As PIL resamples: along the width, then the height, each pass with its coefficients
    (:func:`resize_weights`) in float64 and stored as float32; as two small matrix products, a
    stack of maps at once."""
    cols = resize_weights(heatmap.shape[-1], size[0])
    rows = resize_weights(heatmap.shape[-2], size[1])
    wide = (np.asarray(heatmap, dtype=np.float32).astype(np.float64) @ cols.T).astype(np.float32)
    return np.clip((rows @ wide.astype(np.float64)).astype(np.float32), 0.0, 1.0)


def _contour(full: np.ndarray) -> np.ndarray:
    """Pixels on the inside edge of the region where the map is at least half its peak; ``full`` is
    one ``[H, W]`` map or a stack ``[K, H, W]`` (each map its own peak and edge)."""
    peak = full.max(axis=(-2, -1), keepdims=True)
    inside = full >= CONTOUR_LEVEL * np.maximum(peak, 1e-12)
    # A pixel is interior when its four neighbours are inside too; past the border a pixel is its
    # own neighbour.
    interior = inside.copy()
    interior[..., 1:, :] &= inside[..., :-1, :]
    interior[..., :-1, :] &= inside[..., 1:, :]
    interior[..., :, 1:] &= inside[..., :, :-1]
    interior[..., :, :-1] &= inside[..., :, 1:]
    return inside & ~interior


@functools.lru_cache(maxsize=16)
def opacity_table(alpha: float) -> tuple[int, ...]:
    """The tint's opacity for each of the 256 map levels, ``floor(level * alpha)`` in float64."""
    return tuple((np.arange(256) * alpha).astype(np.uint8).tolist())


@functools.lru_cache(maxsize=16)
def _opacities(alpha: float) -> np.ndarray:
    """:func:`opacity_table` as an array, for lookups (read-only: it is shared)."""
    table = np.asarray(opacity_table(alpha), dtype=np.uint8)
    table.flags.writeable = False
    return table


def _tint(base: Image.Image, full: np.ndarray, edge: np.ndarray, alpha: float) -> Image.Image:
    """Return ``base`` (RGB) with the upsampled map ``full`` (``[H, W]`` in [0, 1]) and its contour
    ``edge`` drawn over it; see :func:`_tint_levels`."""
    return _tint_levels(base, (full * 255).astype(np.uint8), edge, alpha)


def _tint_levels(base: Image.Image, level: np.ndarray, edge: np.ndarray, alpha: float, *,
                 in_place: bool = False) -> Image.Image:  # fmt: skip
    """Return ``base`` (RGB) with a map's 8-bit ``level`` (``[H, W]``: ``floor(255 * map)``) and
    its contour ``edge`` drawn over it, on 8-bit planes in PIL's C code: the levels become colours
    and opacities through 256-entry tables (a palette, a lookup), then a paste through the
    opacities blends. ``level`` is changed (the contour's pixels); so is ``base`` when ``in_place``.

    Level 0 has no opacity, so its colour never shows: the contour takes that palette entry
    (white) at full opacity, drawn by the same paste."""
    opacity = np.take(_opacities(alpha), level)  # no tint at level 0
    np.copyto(level, 0, where=edge)
    np.copyto(opacity, 255, where=edge)
    heat = Image.fromarray(level, mode="L")
    heat.putpalette(_PALETTE)
    out = base if in_place else base.copy()
    out.paste(heat.convert("RGB"), None, Image.fromarray(opacity, mode="L"))  # Image.composite, in place
    return out


def blend(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Return ``image`` (RGB) with ``heatmap`` (``[h, w]`` in [0, 1]) drawn over it; see the module docstring.

    Within one level of the float blend (8-bit planes), several times faster.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    full = upsample(heatmap, rgb.size)
    return _tint(rgb, full, _contour(full), alpha)


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
    (width, height), gap, count = small.size, 2, len(maps)
    full = upsample(maps, small.size)  # [K, H, W]
    # The K tiles side by side, each followed by the gap (none after the last), drawn in one pass:
    # in the gaps the level is 0 (no tint) over white. Each row of the strip is the rows of the
    # K tiles, gap-padded: one strided copy per plane, not one per tile.
    span, stride = count * (width + gap) - gap, width + gap
    level = np.zeros((height, count, stride), dtype=np.uint8)
    level[:, :, :width] = (full * 255).astype(np.uint8).transpose(1, 0, 2)
    edge = np.zeros((height, count, stride), dtype=bool)
    edge[:, :, :width] = _contour(full).transpose(1, 0, 2)
    base = Image.new("RGB", (span, height), (255, 255, 255))
    for left in range(0, span, stride):
        base.paste(small, (left, 0))
    level_strip = np.ascontiguousarray(level.reshape(height, -1)[:, :span])
    drawn = _tint_levels(base, level_strip, edge.reshape(height, -1)[:, :span], alpha, in_place=True)
    return encode(drawn, fmt)
