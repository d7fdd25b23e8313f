"""The output samples of one batch: the parts ``explain.outputs`` names, rendered and encoded.

:func:`encode_batch` turns a batch's results (and its decoded images, when an image part is asked
for) into the samples of the output shard, in input order. It runs in the writer thread when
there are no encoding processes, else in an :class:`EncoderPool` of worker processes, so that
encoding grows with cores the way decoding does and the main process only runs the device.
Images already drawn on the device (:mod:`eatdist.explain.render`) arrive encoded and are only
placed in their samples.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import tarfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from eatdist.config import ExplainConfig
from eatdist.data.shards import check_key
from eatdist.errors import ConfigError
from eatdist.explain.loader import SharesImages
from eatdist.explain.overlay import attribute_strip, encode, overlay
from eatdist.explain.records import BatchResult, Records
from eatdist.models.package import PackageMeta

PARTS = ("json", "txt", "heatmaps.npy", "overlay", "attr_maps", "image")
IMAGE_PARTS = ("overlay", "attr_maps", "image")
DEFAULT_OUTPUTS = ["json", "txt", "heatmaps.npy"]
# Every part a sample can hold, by full name: the picture parts as JPEG or PNG.
FULL_NAMES = (*PARTS[:3], *(f"{stem}.{ext}" for stem in IMAGE_PARTS for ext in ("jpg", "png")))


@dataclass(frozen=True)
class Outputs:
    """The parts of each output sample (full names, such as ``overlay.jpg``) and the overlay opacity."""

    parts: tuple[str, ...]
    alpha: float = 0.6

    @classmethod
    def from_config(cls, cfg: ExplainConfig) -> Outputs:
        """Return the parts of ``cfg.outputs``; a part named without extension takes ``cfg.overlay_format``.

        Raises:
            ConfigError: when a part is unknown, json is missing or a part is named twice.
        """
        parts = tuple(p if p in PARTS[:3] or "." in p else f"{p}.{cfg.overlay_format}" for p in cfg.outputs)
        unknown = [given for given, p in zip(cfg.outputs, parts, strict=True) if p not in FULL_NAMES]  # as written
        if unknown:
            raise ConfigError(
                f"config key 'explain.outputs': unknown part {unknown[0]!r} (parts: {', '.join(PARTS)}; "
                "pictures as .jpg or .png)"
            )
        stems = [p.split(".", 1)[0] if p != "heatmaps.npy" else p for p in parts]
        if "json" not in stems:
            raise ConfigError("config key 'explain.outputs': must include json (evaluate and report read it)")
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise ConfigError(f"config key 'explain.outputs': {', '.join(twice)} named more than once")
        return cls(parts, cfg.overlay_alpha)

    def name(self, stem: str) -> str | None:
        """Return the full name of the part ``stem`` (``overlay`` → ``overlay.jpg``), None when not asked for."""
        return next((p for p in self.parts if p == stem or p.startswith(stem + ".")), None)

    @property
    def images(self) -> list[str]:
        """The image parts asked for (full names)."""
        return [p for p in self.parts if p.split(".", 1)[0] in IMAGE_PARTS]

    @property
    def drawn(self) -> list[str]:
        """The image parts drawn from the decoded image: all but a JPEG copy of the input (which
        a JPEG input is as it is: see :attr:`copies_input`)."""
        return [p for p in self.images if p != "image.jpg"]

    @property
    def copies_input(self) -> bool:
        """Whether the image part is a JPEG, which an input JPEG can be as it is (no second encoding)."""
        return self.name("image") == "image.jpg"


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def npy_bytes(array: np.ndarray) -> bytes:
    """Return ``array`` in ``.npy`` format (no pickles), byte for byte as ``np.save`` writes it; the
    header of each dtype and shape is made once."""
    flags = array.flags
    if not flags.c_contiguous:
        if flags.f_contiguous:  # np.save keeps Fortran order
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=False)
            return buf.getvalue()
        array = array.copy(order="C")
    key = (array.dtype.str, array.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.save(buf, np.zeros(array.shape, array.dtype), allow_pickle=False)
        header = buf.getvalue()[: len(buf.getvalue()) - array.nbytes]
        if len(_NPY_HEADERS) < 256:  # a job sees a handful of map shapes
            _NPY_HEADERS[key] = header
    return header + array.tobytes()


@dataclass
class EncodeTask(SharesImages):
    """One batch for :func:`encode_batch`: what the samples are made of (its images travel to an
    encoding process in shared memory)."""

    keys: list[str]
    truths: list[int | None]
    source_shard: str
    result: BatchResult
    images: list[np.ndarray] | None = None  # [H, W, 3] uint8, when image parts are drawn here
    originals: list[bytes | None] | None = None  # per key: the input JPEG the image part copies, or None
    rendered: list[dict[str, bytes]] | None = None  # image parts drawn and encoded on the device
    renamed: dict[str, str] = field(default_factory=dict)  # safe key -> the original key with its dots


def render_images(
    image: np.ndarray, maps: np.ndarray, outputs: Outputs, original: bytes | None = None
) -> dict[str, bytes]:
    """Return the image parts of one image, drawn on the CPU: ``maps`` is its ``[1 + k, h, w]`` float32.

    ``original``: the input's JPEG bytes when they decode to ``image`` (:func:`~eatdist.data.decode.input_jpeg`);
    a JPEG image part is then those bytes, not a second encoding of the decoded pixels.
    """
    parts: dict[str, bytes] = {}
    pil: Image.Image | None = None  # not made for an image copied as it is (its pixels may be left out)
    for name in outputs.images:
        stem, fmt = name.split(".", 1)
        if name == "image.jpg" and original is not None:
            parts[name] = original
            continue
        pil = pil or Image.fromarray(image)
        if stem == "image":
            parts[name] = encode(pil, fmt)
        elif stem == "overlay":
            parts[name] = overlay(pil, maps[0], outputs.alpha, fmt)
        else:
            strip = attribute_strip(pil, maps[1:], outputs.alpha, fmt)
            if strip is not None:  # no attribute named, no strip (contract 4)
                parts[name] = strip
    return parts


def encode_batch(task: EncodeTask, records: Records, outputs: Outputs) -> list[dict[str, Any]]:
    """Return the output samples of ``task``, one per key, holding the parts of ``outputs``."""
    result = task.result
    texts = {b: records.text(result, b) for b in range(len(task.keys))}
    extras: dict[int, dict[str, Any]] = {}
    for b, key in enumerate(task.keys):
        extra = extras[b] = {"source_shard": task.source_shard}
        if task.truths[b] is not None:
            extra["true_class"] = task.truths[b]
        if key in task.renamed:
            extra["original_key"] = task.renamed[key]
    jsons = records.encode_all(result, texts, extras)
    txt, npy = "txt" in outputs.parts, "heatmaps.npy" in outputs.parts
    samples = []
    for b, key in enumerate(task.keys):
        sample: dict[str, Any] = {"__key__": key, "json": jsons[b]}
        if txt:
            sample["txt"] = texts[b].encode()
        maps = result.image_maps(b)
        if npy:
            sample["heatmaps.npy"] = npy_bytes(maps)
        original = task.originals[b] if task.originals else None
        if task.rendered is not None:
            sample.update(task.rendered[b])
            if original is not None and outputs.copies_input:
                sample["image.jpg"] = original
        elif task.images is not None:
            sample.update(render_images(task.images[b], maps.astype(np.float32), outputs, original))
        samples.append(sample)
    return samples


class MemberHeaders:
    """Tar headers of regular members as ``webdataset.TarWriter`` writes them (PAX format, mode 0444,
    mtime 0, owner eatdist), made from one template that tarfile itself wrote: only the name, size
    and checksum differ between members. A name that is not ASCII or longer than 100 bytes, or a
    size of 8 GiB or more, needs a PAX extended header: tarfile writes those."""

    def __init__(self) -> None:
        block = bytearray(self._tarfile("", 0))
        block[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
        template = bytes(block)
        self.base = sum(block) - sum(block[124:136])  # without the size field
        self._block = np.frombuffer(template, dtype=np.uint8)

    @staticmethod
    def _tarfile(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "eatdist", "eatdist"
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def header(self, name: str, size: int) -> bytes:
        """Return the header block(s) of the member ``name`` holding ``size`` bytes."""
        return self.headers([name], [size])[0]

    def headers(self, names: list[str], sizes: list[int]) -> list[bytes]:
        """Return the header block(s) of every member, the regular ones made together as one array."""
        raw = [name.encode("utf-8", "surrogateescape") for name in names]
        count = len(raw)
        if not count:
            return []
        lengths, size = np.array([len(r) for r in raw]), np.array(sizes, dtype=np.int64)
        blocks = np.tile(self._block, (count, 1))
        blocks[:, :100] = np.array(raw, dtype="S100").view(np.uint8).reshape(count, 100)  # zero-padded
        blocks[:, 124:135] = (size[:, None] >> _OCTAL[-11:]) % 8 + 48  # "%011o\0": the NUL is there
        checksum = self.base + blocks[:, :100].sum(1, dtype=np.int64) + blocks[:, 124:135].sum(1, dtype=np.int64)
        blocks[:, 148:154] = (checksum[:, None] >> _OCTAL[-6:]) % 8 + 48  # "%06o\0 "
        blocks[:, 154] = 0
        done = blocks.tobytes()
        special = ((lengths > 100) | (size >= 8**11)).tolist()
        return [
            self._tarfile(names[i], sizes[i]) if special[i] or not raw[i].isascii() else done[i * 512 : i * 512 + 512]
            for i in range(count)
        ]


_OCTAL = np.arange(10, -1, -1, dtype=np.int64) * 3  # the shifts of 11 octal digits, most significant first
_HEADERS = MemberHeaders()
_PADDING = [bytes(n) for n in range(tarfile.BLOCKSIZE)]


def tar_members(samples: list[dict[str, Any]], where: str) -> tuple[bytes, list[int]]:
    """Return ``samples`` as tar members, laid out byte for byte as the shard writer's
    ``webdataset.TarWriter`` lays them out (parts sorted by name, :class:`MemberHeaders`), and where
    each sample starts; built here so that encoding processes do it.

    Raises:
        DataError: for a key WebDataset would read back split (a dot), naming ``where``.
    """
    names, datas, firsts = [], [], []
    for sample in samples:
        key = str(sample["__key__"])
        check_key(key, where)
        firsts.append(len(names))
        for ext in sorted(sample):
            if ext != "__key__":
                names.append(f"{key}.{ext}")
                datas.append(sample[ext])
    sizes = [len(data) for data in datas]
    pieces, at, starts = [], 0, []
    for header, data, size in zip(_HEADERS.headers(names, sizes), datas, sizes, strict=True):
        starts.append(at)
        pad = _PADDING[-size % tarfile.BLOCKSIZE]
        pieces += (header, data, pad)
        at += len(header) + size + len(pad)
    starts.append(at)
    return b"".join(pieces), [starts[first] for first in firsts]


@dataclass
class Encoded:
    """A batch's output samples as tar members (:func:`tar_members`), and the CPU seconds they took."""

    members: bytes
    offsets: list[int]
    cpu_s: float


def encode_members(task: EncodeTask, records: Records, outputs: Outputs) -> Encoded:
    """Return the samples of ``task`` (:func:`encode_batch`) as tar members; see :func:`tar_members`."""
    started = time.thread_time()
    members, offsets = tar_members(encode_batch(task, records, outputs), task.source_shard)
    return Encoded(members, offsets, time.thread_time() - started)


_WORKER: tuple[Records, Outputs] | None = None


def _init_worker(meta: PackageMeta, outputs: Outputs) -> None:
    global _WORKER
    _WORKER = (Records(meta), outputs)
    # A SIGKILLed explain process cannot stop its encoders, and they would wait for work forever
    # (each holds the task queue open itself): they leave when their parent is gone.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _encode_in_worker(task: EncodeTask) -> Encoded:
    assert _WORKER is not None
    return encode_members(task, *_WORKER)


def _ready() -> None:
    return None


class EncoderPool:
    """``processes`` worker processes running :func:`encode_batch`; results come back per batch, in order.

    The workers are forked when the pool is made: make it before the process starts threads.
    A worker that dies fails the batches it holds (``BrokenProcessPool`` from :meth:`Future.result`).
    """

    def __init__(self, processes: int, meta: PackageMeta, outputs: Outputs) -> None:
        self.processes = processes
        fork = multiprocessing.get_context("fork")
        self._pool = ProcessPoolExecutor(processes, mp_context=fork, initializer=_init_worker, initargs=(meta, outputs))
        # The first submit forks every worker at once, before any other thread exists.
        self._pool.submit(_ready).result()

    def submit(self, task: EncodeTask) -> Future[Encoded]:
        """Start encoding ``task``; the future gives its tar members (:func:`encode_members`)."""
        return self._pool.submit(_encode_in_worker, task)

    def close(self) -> None:
        """Stop the workers (queued batches are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
