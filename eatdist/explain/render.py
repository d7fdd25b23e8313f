"""Overlays, attribute strips and image copies drawn with torch ops where the batch is (a GPU).

The same pictures as :mod:`eatdist.explain.overlay` (the PIL path), computed the same way on
tensors: the map is upsampled with PIL's bicubic coefficients (as a matrix product: two small
matmuls per image), quantised to 8 bits, coloured through the same lookup table, composited with
PIL's integer blend and edged with the same contour; tiles are shrunk with antialiased bilinear
resizing (PIL's filter). JPEGs are encoded with ``torchvision.io.encode_jpeg``, on the GPU
(nvJPEG) when the tensors are there, a batch at a time. Images of the same size are drawn
together, so a batch of equal-sized images costs a few kernels per part, not per image.
On a CPU the functions run as they are: tests compare them with the PIL path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg

from eatdist.explain.overlay import _LUT, CONTOUR_LEVEL, STRIP_TILE, opacity_table, resize_weights

JPEG_QUALITY = 90  # as the PIL path
GAP = 2  # white pixels between the tiles of a strip


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Return ``[..., h, w]`` maps resized to ``size`` (height, width) as PIL's bicubic does, clipped to [0, 1]."""
    h, w = maps.shape[-2:]
    rows = torch.from_numpy(resize_weights(h, size[0])).to(maps.device, torch.float32)
    cols = torch.from_numpy(resize_weights(w, size[1])).to(maps.device, torch.float32)
    return (rows @ maps.float() @ cols.T).clamp(0.0, 1.0)


_TABLES: dict[tuple[torch.device, float], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour of each of the 256 levels and the opacity PIL's path gives it (``floor(level * alpha)``)."""
    key = (device, alpha)
    if key not in _TABLES:
        opacity = torch.tensor(opacity_table(alpha), dtype=torch.uint8)  # the PIL path's table
        _TABLES[key] = (torch.from_numpy(_LUT).to(device), opacity.to(device))
    return _TABLES[key]


def blend(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Return ``maps`` (``[N, h, w]`` in [0, 1]) drawn over ``images`` (uint8 ``[N, 3, H, W]``), uint8 ``[N, 3, H, W]``.

    The same picture as :func:`eatdist.explain.overlay.blend`: ``out = (rgb·(255-m) + colour·m) / 255``
    rounded as PIL rounds it, ``m`` the opacity of the map's level, white on the half-peak contour.
    """
    colours, opacities = _tables(images.device, alpha)
    full = upsample(maps, images.shape[-2:])  # [N, H, W]
    level = (full * 255).to(torch.uint8).long()  # truncation, as numpy's astype
    colour = colours[level].permute(0, 3, 1, 2).int()  # [N, 3, H, W]
    m = opacities[level].int()[:, None]
    mixed = images.int() * (255 - m) + colour * m + 128
    out = ((mixed >> 8) + mixed) >> 8
    peak = full.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    inside = (full >= CONTOUR_LEVEL * peak).float()[:, None]
    padded = F.pad(inside, (1, 1, 1, 1), mode="replicate")
    interior = padded[..., :-2, 1:-1] * padded[..., 2:, 1:-1] * padded[..., 1:-1, :-2] * padded[..., 1:-1, 2:]
    edge = (inside > 0) & (interior == 0) & (full.flatten(1).amax(1) > 0)[:, None, None, None]
    return torch.where(edge, 255, out).to(torch.uint8)


def thumbnail_size(width: int, height: int, tile: int = STRIP_TILE) -> tuple[int, int]:
    """Return the (width, height) PIL's ``thumbnail((tile, tile))`` gives an image of that size (its rounding)."""
    if width <= tile and height <= tile:
        return width, height
    aspect = width / height

    def nearest(number: float, key: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if aspect <= 1.0:
        return nearest(tile * aspect, lambda n: abs(aspect - n / tile)), tile
    return tile, nearest(tile / aspect, lambda n: 0 if n == 0 else abs(aspect - tile / n))


def shrink(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Return uint8 ``[N, 3, H, W]`` images resized to ``size`` (height, width), antialiased bilinear as PIL."""
    if tuple(images.shape[-2:]) == size:
        return images
    small = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return small.round().clamp(0, 255).to(torch.uint8)


def strips(images: torch.Tensor, maps: torch.Tensor, counts: list[int], alpha: float = 0.6,
           tile: int = STRIP_TILE) -> list[torch.Tensor | None]:  # fmt: skip
    """Return per image its first ``counts[i]`` maps over the image's thumbnail, side by side (uint8 ``[3, h, W]``).

    ``images``: uint8 ``[N, 3, H, W]``; ``maps``: ``[N, K, h, w]``. None for an image with no map
    (as :func:`eatdist.explain.overlay.attribute_strip`).
    """
    n, k = maps.shape[:2]
    if k == 0 or max(counts, default=0) == 0:
        return [None] * n
    width, height = thumbnail_size(images.shape[-1], images.shape[-2], tile)
    small = shrink(images, (height, width))
    tiles = blend(small.repeat_interleave(k, 0), maps.flatten(0, 1), alpha).view(n, k, 3, height, width)
    out: list[torch.Tensor | None] = []
    for i, count in enumerate(counts):
        if count == 0:
            out.append(None)
            continue
        strip = torch.full((3, height, count * width + (count - 1) * GAP), 255, dtype=torch.uint8, device=images.device)
        for j in range(count):
            strip[:, :, j * (width + GAP) : j * (width + GAP) + width] = tiles[i, j]
        out.append(strip)
    return out


def render_batch(images: list[torch.Tensor], maps: torch.Tensor, counts: list[int], parts: list[str],
                 alpha: float = 0.6) -> list[dict[str, bytes]]:  # fmt: skip
    """Return per image its JPEG image parts (``overlay.jpg``, ``attr_maps.jpg``, ``image.jpg`` among ``parts``).

    ``images``: uint8 ``[3, H, W]`` each, on the device; ``maps``: ``[B, 1 + K, h, w]`` in [0, 1]
    there; ``counts[b]``: how many attribute maps image ``b`` names. All JPEGs are encoded in one
    call. Raises:
        ValueError: for a part that is not a JPEG.
    """
    if any(not p.endswith(".jpg") for p in parts):
        raise ValueError(f"device rendering encodes JPEG only, not {[p for p in parts if not p.endswith('.jpg')]}")
    pictures: list[dict[str, torch.Tensor]] = [{} for _ in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for b, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(b)
    for indices in groups.values():
        batch = torch.stack([images[b] for b in indices])
        group_maps = maps[indices].float()
        if "overlay.jpg" in parts:
            for b, picture in zip(indices, blend(batch, group_maps[:, 0], alpha), strict=True):
                pictures[b]["overlay.jpg"] = picture
        if "attr_maps.jpg" in parts:
            drawn = strips(batch, group_maps[:, 1:], [counts[b] for b in indices], alpha)
            for b, strip in zip(indices, drawn, strict=True):
                if strip is not None:
                    pictures[b]["attr_maps.jpg"] = strip
        if "image.jpg" in parts:
            for b in indices:
                pictures[b]["image.jpg"] = images[b]
    flat = [(b, name, t.contiguous()) for b, picture in enumerate(pictures) for name, t in picture.items()]
    if not flat:
        return [{} for _ in images]
    encoded = encode_jpeg([t for _, _, t in flat], quality=JPEG_QUALITY)
    out: list[dict[str, bytes]] = [{} for _ in images]
    for (b, name, _), data in zip(flat, encoded, strict=True):
        out[b][name] = data.cpu().numpy().tobytes()
    return out
