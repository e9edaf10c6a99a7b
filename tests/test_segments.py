"""Evaluation segments (evaluation/segments.py) on hand-made data with known answers."""

import numpy as np
import pytest

from itemgen.data.dataset import Example, ItemTable, SequenceDataset
from itemgen.evaluation.metrics import ndcg_gains, paired_difference
from itemgen.evaluation.segments import (dataset_segments, paired_by_segment, segment_masks, segment_metrics,
                                         training_counts)


def _dataset() -> SequenceDataset:
    # 6 items; training part = sequence less its last two items
    seqs = [
        [0, 0, 1, 2, 3, 5],  # train [0, 0, 1, 2]; test target 5 (never trained), history 5 items
        [0, 0, 0, 1, 4, 2],  # train [0, 0, 0, 1]; test target 2, history 5
        [0, 0, 0, 0, 0, 0, 0, 3, 0],  # train 7 x item 0; test target 0, history 8
        [1, 4],  # too short to evaluate: all training
    ]
    items = ItemTable([f"i{k}" for k in range(6)])
    return SequenceDataset("t", items, [f"u{k}" for k in range(4)], [np.asarray(s) for s in seqs])


def test_training_counts_and_segments_known_answer():
    ds = _dataset()
    counts = training_counts(ds)
    # item 0: 2 + 3 + 7 = 12 (u0, u1, u2 training parts); item 1: u0, u1, u3 = 3; item 4: u3 = 1
    assert counts.tolist() == [12, 3, 1, 0, 1, 0]
    m = dataset_segments(ds, "test")  # targets 5 (0 interactions), 2 (1), 0 (12); histories 5, 5, 8
    assert m["pop:0"].tolist() == [True, False, False]
    assert m["pop:1-4"].tolist() == [False, True, False]
    assert m["pop:5-19"].tolist() == [False, False, True]
    assert m["pop:20+"].tolist() == [False, False, False]
    assert m["tail"].tolist() == [True, True, False]
    assert m["head"].tolist() == [False, False, True]
    assert m["hist:short"].tolist() == [True, True, False]
    assert m["hist:long"].tolist() == [False, False, True]
    assert "cold" not in m and "warm" not in m


def test_pop_bucket_edges_and_cold():
    counts = np.array([0, 1, 4, 5, 19, 20])
    ex = [Example(0, np.arange(h), t) for t, h in zip(range(6), [1, 5, 6, 2, 9, 5])]
    m = segment_masks(ex, counts, cold_items=np.array([0, 3]))
    assert np.flatnonzero(m["pop:0"]).tolist() == [0]
    assert np.flatnonzero(m["pop:1-4"]).tolist() == [1, 2]
    assert np.flatnonzero(m["pop:5-19"]).tolist() == [3, 4]
    assert np.flatnonzero(m["pop:20+"]).tolist() == [5]
    assert np.flatnonzero(m["hist:short"]).tolist() == [0, 1, 3, 5]
    assert np.flatnonzero(m["cold"]).tolist() == [0, 3] and np.flatnonzero(m["warm"]).tolist() == [1, 2, 4, 5]


def test_segment_metrics_and_paired_differences():
    masks = {"tail": np.array([True, True, False, False]), "head": np.array([False, False, True, True]),
             "pop:20+": np.zeros(4, dtype=bool)}
    ranks = np.array([1, 3, 11, 1])
    seg = segment_metrics(ranks, masks)
    assert set(seg) == {"tail", "head"}  # an empty segment is left out
    assert seg["tail"]["users"] == 2 and seg["tail"]["ndcg@10"] == pytest.approx((1 + 0.5) / 2)
    assert seg["head"]["recall@10"] == pytest.approx(0.5) and seg["head"]["mrr"] == pytest.approx((1 / 11 + 1) / 2)
    a, b = ndcg_gains(ranks), ndcg_gains(np.array([2, 3, 1, 1]))
    pd = paired_by_segment(a, b, masks)
    assert pd["all"]["users"] == 4 and pd["all"]["diff"] == pytest.approx(paired_difference(a, b)["diff"])
    assert pd["tail"]["diff"] == pytest.approx((1 - 1 / np.log2(3)) / 2)
    assert pd["head"]["diff"] == pytest.approx(-0.5) and pd["head"]["users"] == 2
    assert "pop:20+" not in pd
    with pytest.raises(ValueError, match="segment 'tail' has 4 entries for 3"):
        paired_by_segment(a[:3], b[:3], masks)
