"""Per-attribute accuracy, AP and AUC: brute-force definitions, groups, sums equal to the aggregate."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from eatdist.metrics.attributes import (
    AttributeScores,
    attribute_table,
    average_precision,
    ranked,
    roc_auc,
    summary_line,
)


def brute_auc(scores, labels):
    """P(score of a positive > score of a negative), ties counting half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_ap(scores, labels):
    """Sum over distinct thresholds t (high to low) of (recall gained at t) x precision at t."""
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        chosen = scores >= t
        tp = (labels[chosen] == 1).sum()
        recall = tp / (labels == 1).sum()
        ap += (recall - last_recall) * tp / chosen.sum()
        last_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_ap_and_auc_match_their_definitions_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40) / 5.0  # many ties
    labels = (rng.random(40) < 0.3).astype(float)
    labels[:2] = [0, 1]
    assert roc_auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-6)  # torchmetrics: float32 curves
    assert average_precision(scores, labels) == pytest.approx(brute_ap(scores, labels), abs=1e-6)


def test_masked_entries_are_left_out_and_undefined_metrics_are_none():
    scores = np.array([0.9, 0.8, 0.1, 0.7])
    labels = np.array([1.0, 0.0, 0.0, 1.0])
    mask = np.array([1.0, 1.0, 1.0, 0.0])
    assert roc_auc(scores, labels, mask) == roc_auc(scores[:3], labels[:3]) == 1.0
    assert average_precision(np.ones(3), np.zeros(3)) is None
    assert roc_auc(np.ones(3), np.ones(3)) is None


def test_table_rows_and_groups_add_up_to_the_aggregate_accuracy():
    rng = np.random.default_rng(0)
    n, a = 200, 6
    truth = (rng.random((n, a)) < 0.4).astype(float)
    probs = np.clip(truth * 0.6 + rng.random((n, a)) * 0.5, 0, 1)
    mask = (rng.random((n, a)) < 0.9).astype(float)
    names = [f"has {i}" for i in range(a)]
    table = attribute_table(probs, truth, mask, names, {"even": [0, 2, 4], "odd": [1, 3, 5]})
    aggregate = (((probs > 0.5) == (truth > 0.5)) * mask).sum() / mask.sum()
    assert table["accuracy"] == pytest.approx(aggregate, abs=1e-5)
    rows = table["attributes"]
    assert sum(r["correct"] for r in rows) / sum(r["count"] for r in rows) == pytest.approx(aggregate, abs=1e-12)
    assert sum(g["correct"] for g in table["groups"]) == pytest.approx(sum(r["correct"] for r in rows))
    even = table["groups"][0]
    assert even["mean_auc"] == pytest.approx(np.mean([rows[i]["auc"] for i in (0, 2, 4)]), abs=1e-5)
    keep = mask[:, 1] > 0
    assert rows[1]["auc"] == pytest.approx(brute_auc(probs[keep, 1], truth[keep, 1]), abs=1e-5)
    worst, best = ranked(table, 2)
    assert worst[0]["accuracy"] == min(r["accuracy"] for r in rows)
    assert best[0]["accuracy"] == max(r["accuracy"] for r in rows)
    line = summary_line(table)
    assert "worst attributes: " + worst[0]["name"] in line and "mean AP" in line


def reference_curve(scores, labels, weights):
    """Weighted true/false-positive totals at each distinct score, highest first (the code torchmetrics replaced)."""
    keep = weights > 0
    if not keep.any():
        return np.zeros(0), np.zeros(0)
    scores, labels, weights = scores[keep].astype(np.float64), labels[keep].astype(np.float64), weights[keep]
    order = np.argsort(-scores, kind="mergesort")
    s, y, w = scores[order], labels[order], weights[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    return np.cumsum(y * w)[ends], np.cumsum((1.0 - y) * w)[ends]


def reference_ap(scores, labels, weights):
    tps, fps = reference_curve(scores, labels, weights)
    if not len(tps) or tps[-1] <= 0:
        return None
    return float(np.sum(np.diff(np.r_[0.0, tps / tps[-1]]) * tps / (tps + fps)))


def reference_auc(scores, labels, weights):
    tps, fps = reference_curve(scores, labels, weights)
    if not len(tps) or tps[-1] <= 0 or fps[-1] <= 0:
        return None
    tpr, fpr = np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def corpus_like(seed, n=400, a=12):
    """Predictions with ties, masked entries, an attribute with no positive, one never annotated."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, a)) < 0.4).astype(float)
    probs = np.round(np.clip(truth * 0.5 + rng.random((n, a)) * 0.6, 0, 1), 2).astype(np.float32)
    mask = (rng.random((n, a)) < 0.85).astype(float)
    truth[:, 3], mask[:, 4], truth[:, 5] = 0.0, 0.0, 1.0
    return probs, truth, mask


@pytest.mark.parametrize("seed", range(3))
def test_torchmetrics_scores_equal_the_hand_written_ones(seed):
    probs, truth, mask = corpus_like(seed)
    a = probs.shape[1]
    names, groups = [f"has {i}" for i in range(a)], {"first": [0, 1, 2, 3], "rest": list(range(4, a))}
    scores = AttributeScores(a, sync_on_compute=False)
    for part in np.array_split(np.arange(len(probs)), 3):  # batches, as the trainer feeds them
        scores.update(*(torch.tensor(x[part]) for x in (probs, truth, mask)))
    raw = scores.compute()
    table = scores.table(names, groups)
    assert table == attribute_table(probs, truth, mask, names, groups)
    for k in range(a):
        for reference, ours, batched in (
            (reference_ap, average_precision, raw["ap"]),
            (reference_auc, roc_auc, raw["auc"]),
        ):
            expected = reference(probs[:, k], truth[:, k], mask[:, k])
            if expected is None:
                assert torch.isnan(batched[k]) and ours(probs[:, k], truth[:, k], mask[:, k]) is None
            else:
                assert abs(float(batched[k]) - expected) <= 1e-6
                assert abs(ours(probs[:, k], truth[:, k], mask[:, k]) - expected) <= 1e-6
        correct = (((probs[:, k] > 0.5) == (truth[:, k] > 0.5)) * mask[:, k]).sum()
        assert table["attributes"][k]["correct"] == correct and table["attributes"][k]["count"] == mask[:, k].sum()


def _rank_scores(rank, world, port, shares, out):
    """One process of a gloo group: feed this rank's batches of each share, write the tables the group computes."""
    import json

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        probs, truth, mask = corpus_like(0)
        tables = []
        for share in shares:
            scores = AttributeScores(probs.shape[1])
            for part in share[rank]:
                scores.update(*(torch.tensor(x[part]) for x in (probs, truth, mask)))
            tables.append(scores.table([f"has {i}" for i in range(probs.shape[1])]))
        Path(out, f"rank{rank}.json").write_text(json.dumps(tables))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_gather_their_entries_through_torchmetrics(tmp_path):
    """Two ranks with uneven shares, then with one rank holding none, compute the table of the whole split."""
    import json

    import torch.multiprocessing as mp

    from conftest import free_port

    probs, truth, mask = corpus_like(0)
    index = np.arange(len(probs))
    shares = [[[index[:150], index[150:170]], [index[170:]]], [[index[:200], index[200:]], []]]
    mp.spawn(_rank_scores, args=(2, free_port(), shares, str(tmp_path)), nprocs=2, join=True)
    expected = attribute_table(probs, truth, mask, [f"has {i}" for i in range(probs.shape[1])])
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [expected, expected]
