"""Reading, decoding and transforming one input shard at a time, in DataLoader workers.

A shard's samples are cut into chunks of ``batch_size`` consecutive samples; worker ``w`` of ``W``
decodes the chunks ``w, w + W, ...`` and skips the others undecoded. The DataLoader collects the
workers' outputs round-robin, so chunks reach the main process in shard order: the output shard
keeps the input's order. The workers persist from shard to shard; the shard to read is handed to
them through a small shared buffer read when they start each pass.

A shard that ends early (``iter_shard`` raises ``DataError`` after some samples) still yields every
chunk before the cut, the last one marked with the error; one that cannot be read at all gives a
single empty chunk with the error.

No sample is lost without a trace: samples whose keys hold a dot, which WebDataset merges into
one at the first dot (``photo.v2.jpg`` reads as key ``photo``), are taken apart again
(:func:`eatdist.data.tarscan.unmerge`) and explained under a safe key, the dots made ``_``, with
the original key recorded (``Chunk.renamed``); a sample that still cannot be decoded is listed
with the reason. Explained plus listed is every sample of the shard.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from eatdist.data.decode import decode_on_device, input_jpeg, jpeg_bytes
from eatdist.data.pipeline import BadSample, decode_image
from eatdist.data.shardindex import load_index
from eatdist.data.shards import iter_shard
from eatdist.data.tarscan import unmerge
from eatdist.errors import DataError

_URL_BYTES = 8192


class PackedImages(list):
    """Images unpacked from one shared-memory block (:func:`unpack_images`: views of it); while the
    list still holds exactly those views, :func:`pack_images` passes the block on as it is."""

    def __init__(self, data: torch.Tensor, shapes: list[tuple[int, ...]], views: list[np.ndarray]) -> None:
        super().__init__(views)
        self.data, self.shapes, self.views = data, shapes, tuple(views)

    def intact(self) -> bool:
        """Whether no image was replaced, added or removed since unpacking."""
        return len(self) == len(self.views) and all(a is b for a, b in zip(self, self.views, strict=True))


def pack_images(images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Return ``images`` copied into one flat uint8 tensor in shared memory, and their shapes.

    Between processes (DataLoader workers, the main process, encoding processes) the tensor
    travels as one shared-memory block: a batch of decoded images is copied once, not pickled
    and piped at every hop (images still in the block they arrived in are not copied again)."""
    if isinstance(images, PackedImages) and images.intact():
        return images.data, images.shapes
    data = torch.empty(sum(a.size for a in images), dtype=torch.uint8).share_memory_()
    flat, at = data.numpy(), 0
    for array in images:
        flat[at : at + array.size] = array.reshape(-1)
        at += array.size
    return data, [a.shape for a in images]


def unpack_images(data: torch.Tensor, shapes: list[tuple[int, ...]]) -> PackedImages:
    """Return the images of :func:`pack_images` as arrays (views of ``data``)."""
    flat, at, images = data.numpy(), 0, []
    for shape in shapes:
        size = int(np.prod(shape))
        images.append(flat[at : at + size].reshape(shape))
        at += size
    return PackedImages(data, shapes, images)


class SharesImages:
    """Pickled (to another process), an object's ``images`` (uint8 arrays) travel packed in shared
    memory (:func:`pack_images`) and arrive as views of it."""

    images: list[np.ndarray] | None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.images:
            state["images"] = pack_images(self.images)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["images"]:
            state["images"] = unpack_images(*state["images"])
        self.__dict__.update(state)


@dataclass
class Chunk(SharesImages):
    """Up to ``batch_size`` consecutive samples of a shard, decoded and ready for the model (its
    images travel in shared memory: :class:`SharesImages`)."""

    index: int
    keys: list[str] = field(default_factory=list)
    truths: list[int | None] = field(default_factory=list)
    pixels: torch.Tensor | None = None  # [n, 3, S, S] float, the model input
    images: list[np.ndarray] = field(default_factory=list)  # [H, W, 3] uint8, for the overlays
    bad: list[dict[str, str]] = field(default_factory=list)  # undecodable: key and reason
    renamed: dict[str, str] = field(default_factory=dict)  # safe key -> the original key with its dots
    jpegs: list[torch.Tensor | None] | None = None  # encoded JPEGs the model's device decodes, per key
    # per key, when the image part copies the input: its JPEG bytes (:func:`input_jpeg`) or None
    originals: list[bytes | None] = field(default_factory=list)
    read: int = 0  # samples of the shard read up to the end of this chunk
    error: str | None = None  # the shard ended here: why
    decode_s: float = 0.0

    def pin_memory(self) -> Chunk:
        """Pin only the model input (called by the DataLoader's pin thread)."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """Return one chunk holding the samples of ``chunks`` (consecutive chunks of one shard), in
    order: keys, truths, images, originals and renamed keys (what the writer reads), without the
    model input."""
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(
        chunks[0].index,
        keys=[k for c in chunks for k in c.keys],
        truths=[t for c in chunks for t in c.truths],
        images=[a for c in chunks for a in c.images],
        renamed={k: v for c in chunks for k, v in c.renamed.items()},
        originals=[o for c in chunks for o in c.originals],
        read=chunks[-1].read,
    )


def _true_class(sample: dict[str, Any]) -> int | None:
    try:
        label = json.loads(sample["json"]).get("class")
    except Exception:  # images alone, or a json we do not need: no ground truth
        return None
    return label if isinstance(label, int) and not isinstance(label, bool) else None


class ShardChunks(IterableDataset):
    """The chunks of the shard named in a shared buffer; set it with :meth:`select` before each pass."""

    def __init__(
        self,
        transform: v2.Compose,
        batch_size: int,
        keep_images: bool = True,
        jpegs_for: int = 0,
        keep_originals: bool = False,
        drawn: bool = True,
    ) -> None:
        super().__init__()
        self.transform, self.batch_size = transform, batch_size
        self.keep_images = keep_images  # False: ``Chunk.images`` stays empty (nothing is drawn from it)
        self.keep_originals = keep_originals  # True: ``Chunk.originals`` holds the input JPEGs
        # False: the images are kept only for the image copy, which a sample's input JPEG already
        # is (``Chunk.originals``): such a sample's image is an empty placeholder, never shipped
        self.drawn = drawn
        # > 0: JPEGs are passed on encoded (Chunk.jpegs) with a zero input of this size in their place
        self.jpegs_for = jpegs_for
        self._url = multiprocessing.Array("c", _URL_BYTES, lock=False)

    def select(self, url: str) -> None:
        """Make the next pass read ``url``.

        Raises:
            DataError: when the name is too long for the shared buffer.
        """
        data = url.encode()
        if len(data) >= _URL_BYTES:
            raise DataError(f"input shard name longer than {_URL_BYTES - 1} bytes: {url[:80]}...")
        self._url.value = data  # type: ignore[attr-defined]

    def _decode(self, chunk: Chunk, sample: dict[str, Any]) -> list[torch.Tensor]:
        """Decode ``sample`` (every sample WebDataset merged into it) into ``chunk``; return the
        model inputs of those that decode, list the others in ``chunk.bad``."""
        parts = unmerge(sample)
        found = (self._decode_one(chunk, part, part["__key__"] != sample["__key__"]) for part in parts)
        return [t for t in found if t is not None]

    def _decode_one(self, chunk: Chunk, sample: dict[str, Any], split: bool) -> torch.Tensor | None:
        original = sample["__key__"]
        try:
            jpeg = jpeg_bytes(sample) if self.jpegs_for else None
            image = decode_image(sample) if jpeg is None else None
        except BadSample as exc:
            reason = str(exc)
            dotted = [ext for ext in sample if "." in ext and not ext.startswith("__")]
            if dotted:
                reason += f" (members {', '.join(dotted)}: a key with a dot, which WebDataset splits there)"
            chunk.bad.append({"key": original, "reason": reason})
            return None
        key = original
        if split:  # a key with a dot: explained under one that reads back whole
            key = original.replace(".", "_")
            chunk.renamed[key] = original
        chunk.keys.append(key)
        chunk.truths.append(_true_class(sample))
        if self.keep_originals:
            chunk.originals.append(input_jpeg(sample))
        if self.jpegs_for:
            if chunk.jpegs is None:
                chunk.jpegs = []
            chunk.jpegs.append(jpeg)
        if jpeg is not None:  # decoded on the model's device (decode_chunk); its place kept meanwhile
            if self.keep_images:
                chunk.images.append(np.zeros((0, 0, 3), dtype=np.uint8))
            return torch.zeros(3, self.jpegs_for, self.jpegs_for)
        array = np.array(image, dtype=np.uint8)
        if self.keep_images:
            copied = not self.drawn and self.keep_originals and chunk.originals[-1] is not None
            chunk.images.append(np.zeros((0, 0, 3), dtype=np.uint8) if copied else array)
        return self.transform(torch.from_numpy(array).permute(2, 0, 1))

    def __iter__(self) -> Iterator[Chunk]:
        url = self._url.value.decode()  # type: ignore[attr-defined]
        if not url:  # the pass that only starts the workers
            return
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            index = load_index(url) if workers > 1 else None
        except DataError:
            index = None  # the sequential read below meets the same error and reports it
        if index is not None and not index.truncated:
            yield from self._own_chunks(url, worker, workers, index.count)
            return
        yield from self._all_chunks(url, worker, workers)

    def _own_chunks(self, url: str, worker: int, workers: int, count: int) -> Iterator[Chunk]:
        """Read only this worker's chunks, each straight from its first sample (the shard's index):
        over a network every byte of the shard is fetched once, whatever the worker count."""
        size = self.batch_size
        for index in range(worker, (count + size - 1) // size, workers):
            chunk, tensors, started = Chunk(index), [], time.perf_counter()
            read = index * size
            try:
                for sample in iter_shard(url, read, min(count, read + size)):
                    read += 1
                    tensors += self._decode(chunk, sample)
            except DataError as exc:  # the shard changed or vanished since its index was read
                chunk.error = str(exc)
            chunk.pixels = torch.stack(tensors) if tensors else None
            chunk.read, chunk.decode_s = read, time.perf_counter() - started
            yield chunk
            if chunk.error:
                return

    def _all_chunks(self, url: str, worker: int, workers: int) -> Iterator[Chunk]:
        """Read the shard from its start, decoding only this worker's chunks (no index at hand)."""
        size = self.batch_size
        chunk, tensors, read, started = None, [], 0, time.perf_counter()

        def finish(c: Chunk) -> Chunk:
            c.pixels = torch.stack(tensors) if tensors else None
            c.read, c.decode_s = read, time.perf_counter() - started
            tensors.clear()
            return c

        try:
            for sample in iter_shard(url):
                index = read // size
                if index % workers == worker:
                    if chunk is None:
                        chunk, started = Chunk(index), time.perf_counter()
                    tensors += self._decode(chunk, sample)
                read += 1
                if chunk is not None and read % size == 0:
                    yield finish(chunk)
                    chunk = None
        except DataError as exc:
            # Every worker meets the same cut; the owner of the chunk it falls in reports it
            # there, the others report it in a later slot, which the reader never reaches.
            chunk = chunk or Chunk(read // size if (read // size) % workers == worker else -1)
            chunk.error = str(exc)
            yield finish(chunk)
            return
        if chunk is not None:
            yield finish(chunk)


def decode_chunk(chunk: Chunk, transform: v2.Compose, device: torch.device) -> torch.Tensor | None:
    """Decode the chunk's encoded JPEGs on ``device`` into its model input, returned there.

    A JPEG the device's decoder refuses leaves the chunk (listed in ``chunk.bad``, as the loader
    lists what it cannot decode); the decoded images replace their placeholders in
    ``chunk.images`` when the chunk keeps images. None when nothing of the chunk is left.
    """
    assert chunk.jpegs is not None and chunk.pixels is not None
    slots = [i for i, jpeg in enumerate(chunk.jpegs) if jpeg is not None]
    decoded = decode_on_device([chunk.jpegs[i] for i in slots], [0] * len(slots), v2.Identity(), device, train=False)
    pixels = chunk.pixels.to(device, non_blocking=True)
    refused = set()
    for i, image in zip(slots, decoded, strict=True):
        if image is None:
            refused.add(i)
            continue
        pixels[i] = transform(image)
        if chunk.images:
            chunk.images[i] = image.permute(1, 2, 0).cpu().numpy()
    chunk.jpegs = None
    if refused:
        keep = [i for i in range(len(chunk.keys)) if i not in refused]
        for i in sorted(refused):
            chunk.bad.append({"key": chunk.keys[i], "reason": "undecodable jpg (the device's JPEG decoder refused it)"})
        chunk.keys = [chunk.keys[i] for i in keep]
        chunk.truths = [chunk.truths[i] for i in keep]
        chunk.images = [chunk.images[i] for i in keep] if chunk.images else []
        chunk.originals = [chunk.originals[i] for i in keep] if chunk.originals else []
        pixels = pixels[keep] if keep else None
    return pixels


def _identity(chunk: Chunk) -> Chunk:
    return chunk


def make_loader(dataset: ShardChunks, num_workers: int, pin_memory: bool) -> DataLoader:
    """Return the DataLoader over ``dataset``: workers persist across shards, two chunks ahead each."""
    return DataLoader(
        dataset,
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def shutdown(loader: DataLoader) -> None:
    """Stop ``loader``'s persistent workers now (and reap them), rather than whenever it is collected."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
