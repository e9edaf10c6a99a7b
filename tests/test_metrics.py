import numpy as np
import pytest
import torch

from itemgen.evaluation.metrics import ndcg_gains, paired_difference, ranking_metrics, target_ranks


def test_ranks_count_ties_against_the_model():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2],   # target 1 ties with item 2 -> rank 2
                           [0.9, 0.1, 0.1, 0.1],   # target 0 strictly best -> rank 1
                           [0.3, 0.3, 0.3, 0.3]])  # all tied -> rank 4
    ranks = target_ranks(scores, torch.tensor([1, 0, 3]))
    assert ranks.tolist() == [2, 1, 4]


def test_metrics_hand_computed():
    m = ranking_metrics([1, 2, 4, 11, 30])
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["recall@5"] == pytest.approx(3 / 5)
    assert m["recall@10"] == pytest.approx(3 / 5)
    assert m["recall@20"] == pytest.approx(4 / 5)
    ndcg10 = (1 + 1 / np.log2(3) + 1 / np.log2(5)) / 5
    assert m["ndcg@10"] == pytest.approx(ndcg10)
    assert m["ndcg@5"] == pytest.approx(ndcg10)
    assert m["ndcg@20"] == pytest.approx(ndcg10 + 1 / np.log2(12) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 11 + 1 / 30) / 5)
    assert m["users"] == 5


def test_mrr_of_a_top_k_list_counts_misses_as_zero():
    # a decoder returning its top 20: rank 21 means "not found", which adds 0, not 1/21
    m = ranking_metrics([1, 4, 21, 21], mrr_cutoff=20)
    assert m["mrr"] == pytest.approx((1 + 1 / 4) / 4)
    assert m["recall@20"] == pytest.approx(2 / 4)
    assert ranking_metrics([1, 4, 21, 21])["mrr"] == pytest.approx((1 + 1 / 4 + 2 / 21) / 4)  # full ranks


def test_metrics_reject_bad_ranks():
    with pytest.raises(ValueError):
        ranking_metrics([])
    with pytest.raises(ValueError):
        ranking_metrics([0, 1])


def test_ndcg_gains_and_the_paired_difference_hand_computed():
    g = ndcg_gains([1, 3, 11], k=10)
    assert np.allclose(g, [1.0, 0.5, 0.0])
    assert np.isclose(ranking_metrics([1, 3, 11])["ndcg@10"], g.mean())
    a, b = np.array([1.0, 0.5, 0.0, 0.5]), np.array([0.5, 0.5, 0.0, 0.0])
    p = paired_difference(a, b)  # differences 0.5, 0, 0, 0.5: mean 0.25, std 0.25
    assert np.isclose(p["diff"], 0.25) and np.isclose(p["se"], 0.25 / 2) and np.isclose(p["ratio"], 2.0)
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(a, b[:3])
