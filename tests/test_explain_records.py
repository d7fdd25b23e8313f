"""The json record of each explained image: what bulk jobs write equals what json.dumps writes."""

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch

from eatdist.explain.records import BatchResult, Records, round_rows
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
    probs[0, :4] = torch.tensor([1 / 32, 3 / 64, 0.5, 0.0])  # halves at the 4th and 5th decimal: ties
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
    scale = 10.0 ** torch.randint(-8, 3, (size, slots), generator=gen)  # tiny peaks keep 5 significant digits
    peaks = torch.rand(size, slots, generator=gen, dtype=dtype) * scale
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
    for result in (batch(m, 3), batch(m, 4, dtype=torch.float64)):
        for b in range(len(result)):
            record = records.record(result, b)
            assert record["attribute_probabilities"] == [round(p, 4) for p in result.attr_probs[b]]
            assert record["confidence"] == round(result.confidence[b], 5)
            for item in record["top_attributes"]:
                assert item["probability"] == round(result.attr_probs[b][item["index"]], 5)
                assert item["contribution"] == round(result.contributions[b][item["index"]], 5)
    # halves at the last decimal go to the even neighbour, as round does
    assert round_rows(np.array([[1 / 32, 3 / 32, 1 / 64, 3 / 64]]), 4) == [[0.0312, 0.0938, 0.0156, 0.0469]]
    assert round_rows(np.array([[1 / 64, 3 / 64]]), 5) == [[round(1 / 64, 5), round(3 / 64, 5)]] == [[0.01562, 0.04688]]
    # a float64 value times 1e5 is not exact: 2.5e-05 lies just above the half, and round says 3e-05
    assert round_rows(np.array([[2.5e-05, 0.5]]), 5) == [[round(2.5e-05, 5), 0.5]] == [[3e-05, 0.5]]
    values = np.random.default_rng(0).random((50, 40)).astype(np.float32).astype(np.float64)
    for digits in (4, 5):
        assert round_rows(values, digits) == [[round(v, digits) for v in row] for row in values.tolist()]
