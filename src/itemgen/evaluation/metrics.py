"""Ranking metrics as pure functions of the target's rank (1 = best) over the full catalog.

Ties count against the model: an item scoring exactly as high as the target is ranked above it.
"""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (B, I), targets (B,) -> rank (B,) int64: 1 + #items scoring >= the target, others."""
    t = scores.gather(1, targets[:, None])  # (B, 1)
    return (scores >= t).sum(dim=1).to(torch.int64)  # counts the target itself once


def ranking_metrics(ranks, mrr_cutoff: int | None = None) -> dict[str, float]:
    """Recall@K, NDCG@K, MRR of target ranks. ``mrr_cutoff``: ranks are only known up to it (a
    top-k decoder); a target beyond it adds 0 to MRR, not 1 / rank."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to evaluate")
    if (r < 1).any():
        raise ValueError("ranks start at 1")
    out = {f"recall@{k}": float(np.mean(r <= k)) for k in RECALL_KS}
    out.update({f"ndcg@{k}": float(np.mean(ndcg_gains(r, k))) for k in NDCG_KS})
    # standard error of the NDCG@10 estimate: how far apart two checkpoints must be to tell them apart
    out["ndcg@10_se"] = float(np.std(ndcg_gains(r, 10)) / np.sqrt(r.size))
    rr = 1.0 / r if mrr_cutoff is None else np.where(r <= mrr_cutoff, 1.0 / r, 0.0)
    out["mrr"] = float(np.mean(rr))
    out["users"] = int(r.size)
    return out


def ndcg_gains(ranks, k: int = 10) -> np.ndarray:
    """(n,) ranks -> (n,) each example's NDCG@k (one relevant item: 1 / log2(rank + 1) within k)."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-example scores of two models on the SAME examples -> the mean of a - b, its standard
    error (far tighter than either model's own, as both see the same users) and mean(a) / mean(b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired scores need two equal-length 1-d arrays, got {a.shape} and {b.shape}")
    d = a - b
    return {"diff": float(d.mean()), "se": float(d.std() / np.sqrt(d.size)),
            "ratio": float(a.mean() / b.mean()) if b.mean() > 0 else None}  # None, not inf: strict JSON has no Infinity


COLLAPSE_SHARE = 0.2  # a model giving one item as top-1 to more users than this is collapsed


def diversity(top: np.ndarray) -> dict:
    """top (n, k) each user's top-k item indices, best first -> the share of users receiving the
    most common top-1 item, the number of distinct items over all top-k lists, and whether the
    model is collapsed (a popularity predictor that ignores the history)."""
    top = np.asarray(top)
    if top.ndim != 2 or top.shape[0] == 0 or top.shape[1] == 0:
        raise ValueError("diversity needs a non-empty (users, k) array of top-k items")
    share = float(np.bincount(top[:, 0]).max() / top.shape[0])
    return {"top1_share": share, f"distinct_top{top.shape[1]}": int(np.unique(top).size),
            "collapsed": share > COLLAPSE_SHARE}
