"""The json record of each explained image: what bulk jobs write equals what json.dumps writes."""

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch

from eatdist.explain.records import BatchResult, Records, round_rows, significant, unit_json_rows
from eatdist.explain.text import choose_attributes
from eatdist.models.package import PackageMeta

GROUPS = {"bill shape": [0, 1, 2], "wing color": [3, 4, 5], "crown": [6, 7]}
NAMES = ["bill shape: cone", "bill shape: dagger", "bill shape: hooked", "wing color: red", "wing color: blüe",
         'wing color: "grey"', "crown: black", "crown: white", "striped pattern", "orange top",
         "small size"]  # fmt: skip


def meta(groups=True):
    return PackageMeta(
        backbone="test_resnet",
        backbone_args={},
        classes=["Cardinal", "Blue Jay", "Möwe", "Robin"],
        attributes=NAMES,
        preprocess={},
        attribute_groups=GROUPS if groups else {},
        class_attributes=[
            [float(random.Random(c * 31 + a).random() > 0.5) for a in range(len(NAMES))] for c in range(4)
        ],  # fmt: skip
        model_id="cub-test_resnet-0123abcd",
    )


def batch(m, seed, size=16, dtype=torch.float32, check=None):
    """A batch as Explainer.results makes it: float32 numbers, attributes chosen from them."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(size, len(NAMES), generator=gen, dtype=dtype)
    probs[0, :6] = torch.tensor([1 / 32, 3 / 64, 0.5, 0.0, 1.0, 0.99995])  # halves at the 4th and 5th decimal: ties
    contribs = (torch.randn(size, len(NAMES), generator=gen, dtype=dtype) * 2).round(decimals=1)  # ties in the ranking
    confidence, classes = torch.rand(size, 4, generator=gen, dtype=dtype).softmax(1).max(1)
    groups = {i: g for g, members in m.attribute_groups.items() for i in members}
    named, contrasts = [], []
    for b, c in enumerate(classes.tolist()):
        chosen, pairs = choose_attributes(probs[b].tolist(), contribs[b].tolist(), m.class_attributes[c], groups,
                                          3, 0.5, 2)  # fmt: skip
        named.append(chosen)
        contrasts.append(pairs)
    slots = max(len(n) for n in named) + 1
    low = -10 if seed % 2 else -7  # tiny peaks keep 5 significant digits (odd seeds: below 1e-8 too)
    scale = 10.0 ** torch.randint(low, 3, (size, slots), generator=gen)
    peaks = (0.2 + torch.rand(size, slots, generator=gen, dtype=dtype)) * scale
    peaks[1, :] = 0.0  # all-zero maps
    return BatchResult(
        classes=classes.tolist(),
        confidence=confidence.tolist(),
        named=named,
        contrasts=contrasts,
        contributions=contribs.tolist(),
        attr_probs=probs.tolist(),
        peaks=peaks.tolist(),
        maps=np.zeros((size, slots, 2, 2), np.float16),
        check=check or {"status": "ok", "reliable": True, "val_attr_acc": 0.91, "chance": 0.5, "message": ""},
    )


EXTRAS = [
    {"source_shard": "test-000001.tar"},
    {"source_shard": "s3://bucket/out/test-000002.tar", "true_class": 3},
    {"source_shard": "t.tar", "true_class": 0, "original_key": "img.2017.ünïcode"},
]


@pytest.mark.parametrize("groups", [True, False])
def test_encoded_records_are_json_dumps_of_the_record_byte_for_byte(groups):
    m = meta(groups)
    records = Records(m)
    unreliable = {"status": "near_chance", "reliable": False, "val_attr_acc": 0.52, "chance": 0.5,
                  "message": "attributes unreliable: near chance"}  # fmt: skip
    cases = [batch(m, seed) for seed in range(6)] + [batch(m, 9, check=unreliable), batch(m, 7, dtype=torch.float64)]
    nan = batch(m, 8)
    nan.contributions[2][0], nan.peaks[3][0] = math.nan, math.inf  # json's NaN and Infinity
    seen = set()
    for result in [*cases, nan]:
        sent = pickle.loads(pickle.dumps(result))  # as an encoding process receives it
        for b in range(len(result)):
            text = records.text(result, b)
            record = records.record(result, b, text)
            extra = EXTRAS[b % len(EXTRAS)]
            assert records.encode(result, b, text, extra) == json.dumps(record | extra).encode()
            assert records.encode(sent, b, records.text(sent, b), extra) == json.dumps(record | extra).encode()
            assert record["text"] == records.text(result, b) == records.record(result, b)["text"]
            seen |= {item["role"] for item in record["top_attributes"]}
            seen |= {"instead_of" for item in record["top_attributes"] if "instead_of" in item}
            seen |= {"none shown" for item in record["lacks"] if item["shows_instead"] is None}
    # every kind of item was written ("instead" needs groups to pick from)
    assert {"supports", "against", "none shown"} | ({"instead_of"} if groups else set()) <= seen


def test_records_round_as_python_does_whatever_the_numbers():
    m = meta()
    records = Records(m)
    for result in (batch(m, 2), batch(m, 3), batch(m, 4, dtype=torch.float64)):
        for b in range(len(result)):
            record = records.record(result, b)
            assert record["attribute_probabilities"] == [round(p, 4) for p in result.attr_probs[b]]
            assert record["confidence"] == round(result.confidence[b], 5)
            for item in record["top_attributes"]:
                assert item["probability"] == round(result.attr_probs[b][item["index"]], 5)
                assert item["contribution"] == round(result.contributions[b][item["index"]], 5)
            peaks = result.peaks[b][: 1 + len(result.named[b])].tolist()
            assert record["map_peaks"] == [float(f"{p:.5g}") for p in peaks]
            assert record["zero_maps"] == sum(p == 0.0 for p in peaks)
    # halves at the last decimal go to the even neighbour, as round does
    assert round_rows(np.array([[1 / 32, 3 / 32, 1 / 64, 3 / 64]]), 4) == [[0.0312, 0.0938, 0.0156, 0.0469]]
    assert round_rows(np.array([[1 / 64, 3 / 64]]), 5) == [[round(1 / 64, 5), round(3 / 64, 5)]] == [[0.01562, 0.04688]]
    # a float64 value times 1e5 is not exact: 2.5e-05 lies just above the half, and round says 3e-05
    assert round_rows(np.array([[2.5e-05, 0.5]]), 5) == [[round(2.5e-05, 5), 0.5]] == [[3e-05, 0.5]]
    values = np.random.default_rng(0).random((50, 40)).astype(np.float32).astype(np.float64)
    for digits in (4, 5):
        assert round_rows(values, digits) == [[round(v, digits) for v in row] for row in values.tolist()]


def test_batch_rounding_shortcuts_give_what_python_gives_value_by_value():
    rng = np.random.default_rng(1)
    # peaks: 5 significant digits over every magnitude, ties (1.03125) and values the shortcut leaves alone
    peaks = (10.0 ** rng.uniform(-10, 6, (40, 50))).astype(np.float32).astype(np.float64)
    peaks[0, :12] = [0.0, 1.0, 1.03125, 10.3125, 99999.5, 1e5, 1e-8, 1e-9, 3.4e38, 12345.5, 0.1, 65504.0]
    in_range = peaks[(peaks < 1e5) & ((peaks >= 1.01e-8) | (peaks == 0.0))]
    for values in (peaks, in_range, peaks + 1e-12):  # all, the shortcut's range, float64 values
        assert significant(values).ravel().tolist() == [float(f"{v:.5g}") for v in values.ravel().tolist()]
    # probabilities to 4 decimals, looked up: json's text of round(p, 4)
    probs = rng.random((30, 40)).astype(np.float32).astype(np.float64)
    probs[0, :6] = np.float32([0.0, 1.0, 1 / 32, 3 / 64, 0.00005, 0.99995])
    assert unit_json_rows(probs, 4) == [", ".join(json.dumps(round(p, 4)) for p in row) for row in probs.tolist()]
    for outside in (np.array([[-0.0, 0.5]]), np.array([[1.5, 0.5]]), np.array([[0.1, 0.5]]), np.array([[math.nan]])):
        assert unit_json_rows(outside, 4) is None  # -0.0, above 1, not float32, NaN: json writes those


def test_cells_a_record_names_are_written_as_json_writes_the_whole_rounded_row():
    m = meta()
    for result in (batch(m, 5), batch(m, 6, dtype=torch.float64)):
        rows = result.rounded("numbers")
        width = len(rows[0])
        columns = {b: [(b * 7 + j * 3) % width for j in range(b % 4)] for b in (3, 0, 5, 1)}  # any order, any count
        columns[2] = [0, 0, width - 1]  # a column twice
        expected = [[json.dumps(rows[b][c]) for c in cols] for b, cols in columns.items()]
        assert result.json_cells(columns) == expected
    assert result.json_cells({0: [], 1: []}) == [[], []]
