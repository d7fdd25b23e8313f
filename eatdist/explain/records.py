"""A batch's predictions on the host, and each image's ``json`` record and text made from them.

:class:`BatchResult` is what :class:`~eatdist.explain.explainer.Explainer` hands over per batch;
:class:`Records` turns one image of it into the fields of its ``json`` part (contract 4) and its
explanation text. A bulk job encodes a record for every image, so :meth:`Records.encode` writes
the json text from pieces made once per package (attribute and class names, groups) and numbers
rounded once per batch, instead of building a dict for ``json.dumps`` to walk: it gives byte for
byte what ``json.dumps`` gives for :meth:`Records.record`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eatdist.explain.text import Named, explanation_text
from eatdist.models.package import PackageMeta


def round_rows(array: np.ndarray, digits: int) -> list[list[float]]:
    """Return the rows of ``array`` (float64) with every value as ``round(value, digits)`` gives it,
    for ``digits`` <= 5.

    A float32 value times ``10**digits`` (at most 17 significant bits) is exact in float64, so one
    array operation rounds it exactly as ``round`` does (half to even on the exact product, then
    the nearest double to the quotient); other values are rounded one by one.
    """
    if array.size and not (array.astype(np.float32) == array)[np.isfinite(array)].all():
        return [[round(v, digits) for v in row] for row in array.tolist()]
    return (np.rint(array * 10.0**digits) / 10.0**digits).tolist()


@dataclass
class BatchResult:
    """A batch's predictions as host arrays and lists (one device-to-host copy per field)."""

    classes: list[int]
    confidence: list[float]
    named: list[list[Named]]  # per image: the attributes its text names (reasons, contrasts, then against)
    contrasts: list[list[tuple[int, int | None]]]  # per image: (characteristic attribute lacked, shown instead)
    contributions: list[list[float]]  # [B, A], see :func:`attribute_contributions`
    attr_probs: list[list[float]]  # [B, A]
    peaks: list[list[float]]  # [B, 1 + K] map maxima before normalisation (0: an all-zero map)
    maps: np.ndarray  # [B, 1 + K, h, w] float16, each map scaled to a maximum of 1; K = the most named
    check: dict[str, Any] = field(default_factory=dict)  # :func:`attribute_check` of the model
    _rounded: dict[str, list[list[float]]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _json: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)
    _finite: bool | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of_arrays(
        cls,
        classes: list[int],
        confidence: np.ndarray,
        attr_probs: np.ndarray,
        contributions: np.ndarray,
        peaks: np.ndarray,
        named: list[list[Named]],
        contrasts: list[list[tuple[int, int | None]]],
        maps: np.ndarray,
        check: dict[str, Any],
    ) -> BatchResult:
        """Return the result of host arrays (``confidence`` ``[B, 1]``), which the records then round
        without turning the lists back into arrays."""
        arrays = {"confidence": confidence, "attr_probs": attr_probs, "contributions": contributions, "peaks": peaks}
        arrays = {name: np.asarray(array, dtype=np.float64) for name, array in arrays.items()}
        result = cls(classes, arrays["confidence"][:, 0].tolist(), named, contrasts, arrays["contributions"].tolist(),
                     arrays["attr_probs"].tolist(), arrays["peaks"].tolist(), maps, check)  # fmt: skip
        result._arrays.update(arrays)
        return result

    def __getstate__(self) -> dict[str, Any]:
        # Sent to an encoding process: the host arrays, not the lists made of them, and each named
        # attribute as a plain tuple (pickling thousands of small objects costs the sender dearly).
        state = {name: getattr(self, name) for name in ("classes", "contrasts", "maps", "check")}
        state["named"] = [[(n.index, n.role, n.instead_of) for n in row] for row in self.named]
        state["arrays"] = {name: self._array(name) for name in ("confidence", "attr_probs", "contributions", "peaks")}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        arrays = state.pop("arrays")
        named = [[Named(*n) for n in row] for row in state.pop("named")]
        lists = {name: array.tolist() for name, array in arrays.items()}
        self.__init__(  # type: ignore[misc]
            named=named, confidence=[c for c, in lists["confidence"]], contributions=lists["contributions"],
            attr_probs=lists["attr_probs"], peaks=lists["peaks"], **state
        )  # fmt: skip
        self._arrays.update(arrays)

    def __len__(self) -> int:
        return len(self.classes)

    def image_maps(self, b: int) -> np.ndarray:
        """Return image ``b``'s ``[1 + k, h, w]`` maps: the class, then its k named attributes."""
        return self.maps[b, : 1 + len(self.named[b])]

    def _array(self, name: str) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None:
            rows = [[c] for c in self.confidence] if name == "confidence" else getattr(self, name)
            array = self._arrays[name] = np.asarray(rows, dtype=np.float64)
        return array

    def rounded(self, name: str) -> list[list[float]]:
        """Return the batch's ``name``, a row per image, as records give it, rounded for the whole
        batch at once: ``"attr_probs"``, ``"contributions"`` and ``"confidence"`` (rows of one) to 5
        decimals, ``"probs4"`` (the attribute probabilities) to 4."""
        values = self._rounded.get(name)
        if values is None:
            array = self._array("attr_probs" if name == "probs4" else name)
            values = self._rounded[name] = round_rows(array, 4 if name == "probs4" else 5)
        return values

    def json_rows(self, name: str) -> list[str]:
        """Return each image's row of :meth:`rounded` as json writes it, without its brackets
        (``"0.5, 0.25"``): one json call for the batch."""
        rows = self._json.get(name)
        if rows is None:
            rows = self._json[name] = json.dumps(self.rounded(name))[2:-2].split("], [") if len(self) else []
        return rows

    def peaks_of(self, b: int) -> list[float]:
        """Return the peaks of image ``b``'s maps to 5 significant digits (tiny peaks stay above 0)."""
        return [float(f"{p:.5g}") for p in self.peaks[b][: 1 + len(self.named[b])]]

    def finite(self) -> bool:
        """Whether every number of the batch is finite (json then holds no NaN or Infinity)."""
        if self._finite is None:
            names = ("confidence", "attr_probs", "contributions", "peaks")
            self._finite = all(bool(np.isfinite(self._array(name)).all()) for name in names)
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
            "zero_maps": sum(p <= 0.0 for p in peaks),
            "attribute_check": result.check,
            "text": self.text(result, b) if text is None else text,
            "model_id": self.meta.model_id,
        }

    def encode(self, result: BatchResult, b: int, text: str, extra: dict[str, Any]) -> bytes:
        """Return ``json.dumps(record(result, b, text) | extra).encode()``, written from its pieces
        (``extra``: fields the record does not hold, such as ``source_shard``)."""
        if not result.finite():  # json's NaN and Infinity: left to json
            return json.dumps(self.record(result, b, text) | extra).encode()
        c, names = result.classes[b], self._names
        probs, contribs = result.rounded("attr_probs")[b], result.rounded("contributions")[b]
        top = []
        for n in result.named[b]:
            i = n.index
            tail = f', "instead_of": {names[n.instead_of]}}}' if n.instead_of is not None else "}"
            top.append(f'{self._top[i]}{probs[i]!r}, "contribution": {contribs[i]!r}, "role": "{n.role}"{tail}')
        lacks = [f'{self._lacks[a]}{probs[a]!r}, "shows_instead": {names[s] if s is not None else "null"}}}'
                 for a, s in result.contrasts[b]]  # fmt: skip
        peaks = result.peaks_of(b)
        if self._check is None or self._check[0] != result.check:
            self._check = (dict(result.check), json.dumps(result.check))
        more = ", ".join(f"{_string(k)}: {_json_value(v)}" for k, v in extra.items())
        return "".join((
            f'{{"class": {c}, "class_name": {self._classes[c]}, "confidence": {result.rounded("confidence")[b][0]!r}',
            f', "top_attributes": [{", ".join(top)}], "lacks": [{", ".join(lacks)}]',
            f', "attribute_probabilities": [{result.json_rows("probs4")[b]}]',
            f', "map_peaks": [{", ".join(map(repr, peaks))}], "zero_maps": {sum(p <= 0.0 for p in peaks)}',
            f', "attribute_check": {self._check[1]}, "text": {_string(text)}, "model_id": {self._model_id}',
            f", {more}}}" if more else "}",
        )).encode()  # fmt: skip
