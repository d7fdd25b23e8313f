"""A batch's predictions on the host, and each image's ``json`` record and text made from them.

:class:`BatchResult` is what :class:`~eatdist.explain.explainer.Explainer` hands over per batch;
:class:`Records` turns one image of it into the fields of its ``json`` part (contract 4) and its
explanation text. A bulk job encodes a record for every image, so :meth:`Records.encode` writes
the json text from pieces made once per package (attribute and class names, groups) and numbers
rounded once per batch, instead of building a dict for ``json.dumps`` to walk: it gives byte for
byte what ``json.dumps`` gives for :meth:`Records.record`.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eatdist.explain.text import Named, explanation_text
from eatdist.models.package import PackageMeta


def _float32_valued(array: np.ndarray) -> bool:
    """Whether every finite value of ``array`` (float64) is a float32 value."""
    same = array.astype(np.float32) == array
    return bool(same.all()) or bool(same[np.isfinite(array)].all())


def round_rows(array: np.ndarray, digits: int) -> list[list[float]]:
    """Return the rows of ``array`` (float64) with every value as ``round(value, digits)`` gives it,
    for ``digits`` <= 5.

    A float32 value times ``10**digits`` (at most 17 significant bits) is exact in float64, so one
    array operation rounds it exactly as ``round`` does (half to even on the exact product, then
    the nearest double to the quotient); other values are rounded one by one.
    """
    if not _float32_valued(array):
        return [[round(v, digits) for v in row] for row in array.tolist()]
    return (np.rint(array * 10.0**digits) / 10.0**digits).tolist()


_POWERS = np.array([float(10**k) for k in range(13)])


def significant(array: np.ndarray, digits: int = 5) -> np.ndarray:
    """Return ``float(f"{value:.{digits}g}")`` of every value of ``array`` (float64, ``digits`` <= 5).

    A float32 value of magnitude in [1e-8, ``10**digits``) times ``10**k`` (``k`` <= 12: 52
    significant bits at most) is exact, so one array operation rounds it as the format does (half
    to even on the exact value, then the nearest double to the decimal); arrays holding other
    values are rounded value by value.
    """
    size = np.abs(array)
    shown = size > 0
    if not (size < 10.0**digits).all() or not (size[shown] >= 1e-8).all() or not _float32_valued(array):
        return np.array([float(f"{v:.{digits}g}") for v in array.ravel().tolist()]).reshape(array.shape)
    exponent = np.floor(np.log10(np.where(shown, size, 1.0))).astype(np.int64)
    scale = _POWERS[digits - 1 - exponent]
    return np.rint(array * scale) / scale


@functools.cache
def unit_cells(digits: int) -> tuple[np.ndarray, np.ndarray]:
    """Return json's text of ``k / 10**digits`` followed by ``", "``, for every ``k`` from 0 to
    ``10**digits`` (each value of [0, 1] rounded to ``digits`` decimals, as ``json.dumps`` writes
    it: ``"0.0, "``, ``"0.25, "``), as the rows of a uint8 array padded with zeros, and each length."""
    texts = [f"{k / 10**digits!r}, ".encode() for k in range(10**digits + 1)]
    cells = np.zeros((len(texts), max(map(len, texts))), dtype=np.uint8)
    for k, text in enumerate(texts):
        cells[k, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    return cells, np.array([len(text) for text in texts], dtype=np.int64)


def unit_json_rows(array: np.ndarray, digits: int) -> list[str] | None:
    """Return each row of ``array`` (float64) rounded to ``digits`` (<= 4) decimals as json writes
    it, without brackets, from :func:`unit_cells` for the whole array at once (a float's repr per
    value costs more); None unless every value is a float32 value in [0, 1] (not -0.0)."""
    if not array.size or np.signbit(array).any() or not array.max() <= 1.0 or not _float32_valued(array):
        return None
    cells, lengths = unit_cells(digits)
    steps = np.rint(array * 10.0**digits).astype(np.int64)
    used = lengths[steps]
    used[:, -1] -= 2  # no ", " after a row's last value
    text = cells[steps][np.arange(cells.shape[1]) < used[:, :, None]].tobytes().decode("ascii")
    ends = np.cumsum(used.sum(1)).tolist()
    return [text[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


@dataclass
class BatchResult:
    """A batch's predictions on the host: float64 arrays (one device-to-host copy for the batch).

    The arrays may be given as lists; they are kept as float64 arrays. The values of a model's
    float32 outputs are exact in float64, so records round them as Python rounds the float32 values.
    """

    classes: list[int]
    confidence: np.ndarray  # [B]
    named: list[list[Named]]  # per image: the attributes its text names (reasons, contrasts, then against)
    contrasts: list[list[tuple[int, int | None]]]  # per image: (characteristic attribute lacked, shown instead)
    contributions: np.ndarray  # [B, A], see :func:`attribute_contributions`
    attr_probs: np.ndarray  # [B, A]
    peaks: np.ndarray  # [B, 1 + K] map maxima before normalisation (0: an all-zero map)
    maps: np.ndarray  # [B, 1 + K, h, w] float16, each map scaled to a maximum of 1; K = the most named
    check: dict[str, Any] = field(default_factory=dict)  # :func:`attribute_check` of the model
    _rounded: dict[str, list[list[float]]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _json: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _finite: bool | None = field(default=None, init=False, repr=False, compare=False)
    _peaks: tuple[list[list[float]], list[int]] | None = field(default=None, init=False, repr=False, compare=False)
    _numbers: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        count = len(self.classes)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(count)
        for name in ("contributions", "attr_probs", "peaks"):
            array = np.asarray(getattr(self, name), dtype=np.float64)
            setattr(self, name, array if array.ndim == 2 else array.reshape(count, 0))

    def __getstate__(self) -> dict[str, Any]:
        # Sent to an encoding process: the arrays, and each named attribute as a plain tuple
        # (pickling thousands of small objects costs the sender dearly); not what was made of them.
        names = ("classes", "confidence", "contrasts", "contributions", "attr_probs", "peaks", "maps", "check")
        state = {name: getattr(self, name) for name in names}
        state["named"] = [[(n.index, n.role, n.instead_of) for n in row] for row in self.named]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        named = [[Named(*n) for n in row] for row in state.pop("named")]
        self.__init__(named=named, **state)  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.classes)

    def image_maps(self, b: int) -> np.ndarray:
        """Return image ``b``'s ``[1 + k, h, w]`` maps: the class, then its k named attributes."""
        return self.maps[b, : 1 + len(self.named[b])]

    def numbers(self) -> np.ndarray:
        """Return ``[B, 1 + 2A]``: each image's confidence, attribute probabilities and contributions."""
        if self._numbers is None:
            self._numbers = np.concatenate([self.confidence[:, None], self.attr_probs, self.contributions], axis=1)
        return self._numbers

    def rounded(self, name: str) -> list[list[float]]:
        """Return the batch's ``name``, a row per image, as records give it, rounded for the whole
        batch at once: ``"numbers"`` (the rows of :meth:`numbers`), ``"attr_probs"``,
        ``"contributions"`` and ``"confidence"`` (rows of one) to 5 decimals, ``"probs4"`` (the
        attribute probabilities) to 4."""
        values = self._rounded.get(name)
        if values is None:
            if name == "numbers":
                values = round_rows(self.numbers(), 5)
            elif name == "probs4":
                values = round_rows(self.attr_probs, 4)
            else:  # a part of each row of "numbers"
                a = self.attr_probs.shape[1]
                start, stop = {"confidence": (0, 1), "attr_probs": (1, 1 + a), "contributions": (1 + a, None)}[name]
                values = [row[start:stop] for row in self.rounded("numbers")]
            self._rounded[name] = values
        return values

    def json_rows(self, name: str) -> list[str]:
        """Return each image's row of :meth:`rounded` (or ``"peaks"``: of :meth:`peaks_of`) as json
        writes it, without its brackets (``"0.5, 0.25"``), for the batch at once."""
        rows = self._json.get(name)
        if rows is None:
            rows = unit_json_rows(self.attr_probs, 4) if name == "probs4" else None
            if rows is None:
                values = self.peak_rows()[0] if name == "peaks" else self.rounded(name)
                rows = json.dumps(values)[2:-2].split("], [") if len(self) else []
            self._json[name] = rows
        return rows

    def json_cells(self, columns: dict[int, list[int]]) -> list[list[str]]:
        """Return, for each image ``b`` of ``columns`` (in its order), json's text of the values at
        ``columns[b]`` of its row of :meth:`rounded` ``("numbers")``: only those values are rounded
        and written, for the batch at once (a record names a few of an image's numbers; writing
        every one costs more)."""
        counts = [len(row) for row in columns.values()]
        total = sum(counts)
        if not total:
            return [[] for _ in counts]
        images = np.repeat(np.fromiter(columns, np.int64, len(columns)), counts)
        values = self.numbers()[images, np.fromiter(itertools.chain.from_iterable(columns.values()), np.int64, total)]
        texts = json.dumps(round_rows(values[None, :], 5)[0])[1:-1].split(", ")
        ends = itertools.accumulate(counts)
        return [texts[end - n : end] for n, end in zip(counts, ends, strict=True)]

    def peaks_of(self, b: int) -> list[float]:
        """Return the peaks of image ``b``'s maps to 5 significant digits (tiny peaks stay above 0)."""
        return self.peak_rows()[0][b]

    def zero_maps(self, b: int) -> int:
        """Return how many of image ``b``'s maps are all zero (a peak of 0)."""
        return self.peak_rows()[1][b]

    def peak_rows(self) -> tuple[list[list[float]], list[int]]:
        """Each image's peaks (:meth:`peaks_of`) and its count of all-zero maps, for the batch at once."""
        if self._peaks is None:
            array = self.peaks
            counts = [1 + len(named) for named in self.named]
            shown = np.arange(array.shape[1]) < np.asarray(counts, dtype=np.int64)[:, None]
            zeros = ((array <= 0.0) & shown).sum(1).tolist()
            rows = [row[:n] for row, n in zip(significant(array).tolist(), counts, strict=True)]
            self._peaks = (rows, zeros)
        return self._peaks

    def finite(self) -> bool:
        """Whether every number of the batch is finite (json then holds no NaN or Infinity)."""
        if self._finite is None:
            self._finite = bool(np.isfinite(self.numbers()).all()) and bool(np.isfinite(self.peaks).all())
        return self._finite


_string = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


def _json_value(v: Any) -> str:
    """``json.dumps(v)``, with the common str and int (not bool) values written directly."""
    if type(v) is str:
        return _string(v)
    return str(v) if type(v) is int else json.dumps(v)


def group_index(meta: PackageMeta) -> dict[int, str]:
    """Return each grouped attribute's group: ``{attribute index: group name}``."""
    return {i: group for group, indices in meta.attribute_groups.items() for i in indices}


class Records:
    """The json records and texts of one package's images (:meth:`record`, :meth:`encode`, :meth:`text`)."""

    def __init__(self, meta: PackageMeta) -> None:
        self.meta = meta
        self.groups = group_index(meta)
        dumps = json.dumps
        self._names = [dumps(name) for name in meta.attributes]
        self._classes = [dumps(name) for name in meta.classes]
        self._top = [f'{{"index": {i}, "name": {name}, "group": {dumps(self.groups.get(i))}, "probability": '
                     for i, name in enumerate(self._names)]  # fmt: skip
        self._lacks = [f'{{"index": {i}, "name": {name}, "probability": ' for i, name in enumerate(self._names)]
        self._model_id = dumps(meta.model_id)
        self._check: tuple[dict[str, Any], str] | None = None

    def text(self, result: BatchResult, b: int) -> str:
        """Return image ``b``'s explanation (:func:`~eatdist.explain.text.explanation_text`)."""
        names, check = self.meta.attributes, result.check
        supports = [n.index for n in result.named[b] if n.role == "supports"]
        return explanation_text(
            self.meta.classes[result.classes[b]],
            result.confidence[b],
            [names[a] for a in supports],
            [(names[a], names[s] if s is not None else None) for a, s in result.contrasts[b]],
            [self.groups.get(a) for a in supports],
            None if check.get("reliable", True) else check["message"],
            [names[n.index] for n in result.named[b] if n.role == "against"],
        )

    def record(self, result: BatchResult, b: int, text: str | None = None) -> dict[str, Any]:
        """Return image ``b``'s ``json`` fields (``text``: its :meth:`text`, when made already)."""
        c, names = result.classes[b], self.meta.attributes
        probs, contribs = result.rounded("attr_probs")[b], result.rounded("contributions")[b]
        top = []
        for n in result.named[b]:
            item = {"index": n.index, "name": names[n.index], "group": self.groups.get(n.index),
                    "probability": probs[n.index], "contribution": contribs[n.index], "role": n.role}  # fmt: skip
            if n.instead_of is not None:
                item["instead_of"] = names[n.instead_of]
            top.append(item)
        lacks = [{"index": a, "name": names[a], "probability": probs[a],
                  "shows_instead": names[s] if s is not None else None} for a, s in result.contrasts[b]]  # fmt: skip
        peaks = result.peaks_of(b)
        return {
            "class": c,
            "class_name": self.meta.classes[c],
            "confidence": result.rounded("confidence")[b][0],
            "top_attributes": top,
            "lacks": lacks,
            "attribute_probabilities": result.rounded("probs4")[b],
            "map_peaks": peaks,
            "zero_maps": result.zero_maps(b),
            "attribute_check": result.check,
            "text": self.text(result, b) if text is None else text,
            "model_id": self.meta.model_id,
        }

    def encode(self, result: BatchResult, b: int, text: str, extra: dict[str, Any]) -> bytes:
        """Return ``json.dumps(record(result, b, text) | extra).encode()``, written from its pieces
        (``extra``: fields the record does not hold, such as ``source_shard``); see :meth:`encode_all`."""
        return self.encode_all(result, {b: text}, {b: extra})[0]

    def encode_all(self, result: BatchResult, texts: dict[int, str], extras: dict[int, dict[str, Any]]) -> list[bytes]:
        """Return :meth:`encode` of the images ``texts`` names (in its order), written for the batch
        at once: the rows rounded, the lookups made and json's checks of the batch done once."""
        if not result.finite():  # json's NaN and Infinity: left to json
            return [json.dumps(self.record(result, b, text) | extras[b]).encode() for b, text in texts.items()]
        if self._check is None or self._check[0] != result.check:
            self._check = (dict(result.check), json.dumps(result.check))
        tail = f', "attribute_check": {self._check[1]}, "text": '
        names, items, lacking, classes, model_id = self._names, self._top, self._lacks, self._classes, self._model_id
        probs4, peaks = result.json_rows("probs4"), result.json_rows("peaks")
        zeros, named, contrasts = result.peak_rows()[1], result.named, result.contrasts
        at = 1 + result.attr_probs.shape[1]  # where a row's contributions start, after its probabilities
        # the numbers each record names, as json writes them: its confidence, each named
        # attribute's probability and contribution, each lacked one's probability
        wanted = {}
        for b in texts:
            shown = [i for n in named[b] for i in (1 + n.index, at + n.index)]
            wanted[b] = [0, *shown, *(1 + a for a, _ in contrasts[b])]
        cells = result.json_cells(wanted)
        encoded = []
        for (b, text), row in zip(texts.items(), cells, strict=True):
            c, pairs, lacked = result.classes[b], iter(row[1:]), row[1 + 2 * len(named[b]) :]
            top = ", ".join(
                [
                    f'{items[n.index]}{next(pairs)}, "contribution": {next(pairs)}, "role": "{n.role}"'
                    + (f', "instead_of": {names[n.instead_of]}}}' if n.instead_of is not None else "}")
                    for n in named[b]
                ]
            )
            lacks = ", ".join([f'{lacking[a]}{p}, "shows_instead": {names[s] if s is not None else "null"}}}'
                               for (a, s), p in zip(contrasts[b], lacked, strict=True)])  # fmt: skip
            more = "".join([f", {_string(k)}: {_json_value(v)}" for k, v in extras[b].items()])
            encoded.append("".join((
                f'{{"class": {c}, "class_name": {classes[c]}, "confidence": {row[0]}',
                f', "top_attributes": [{top}], "lacks": [{lacks}], "attribute_probabilities": [{probs4[b]}]',
                f', "map_peaks": [{peaks[b]}], "zero_maps": {zeros[b]}{tail}{_string(text)}, "model_id": {model_id}',
                more, "}",
            )).encode())  # fmt: skip
        return encoded
