"""Top-k over the catalog from query states: ``topk(query, k, exclude, histories) -> (scores, ids)``.
``histories``, when the caller has them, are the histories the queries came from: decoders of a
model with a repeat bias (models/repeat_bias.py) add it at their items.

``ExactTopK`` scores every item (the reference every faster decoder is tested against)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from itemgen.models.recommender import Recommender


def check_k(k: int, n_items: int) -> None:
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be between 1 and the catalog size {n_items}, got {k}")


def mask_items(scores: torch.Tensor, exclude: list[np.ndarray] | None) -> torch.Tensor:
    """Set excluded items (e.g. each user's history) to -inf; scores (B, I). Not in place."""
    if exclude is None:
        return scores
    cols = [np.asarray(ex, dtype=np.int64).reshape(-1) for ex in exclude]
    if len(cols) == 1:  # one row (batch 1): a fill of its columns, no row indices
        return scores if not len(cols[0]) else \
            scores.index_fill(1, torch.from_numpy(cols[0]).to(scores.device), float("-inf"))
    n = [len(c) for c in cols]
    if not sum(n):
        return scores
    rows = torch.from_numpy(np.repeat(np.arange(len(cols)), n)).to(scores.device)  # (P,) one put for the batch
    cols = torch.from_numpy(np.concatenate(cols)).to(scores.device)  # (P,)
    return scores.index_put((rows, cols), _minus_inf(scores.dtype, scores.device))


@functools.lru_cache(maxsize=None)
def _minus_inf(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """-inf as a 0-d tensor, made once (mask_items' fill value): a normal tensor, so that it may
    also enter ops outside inference mode."""
    with torch.inference_mode(False):
        return torch.tensor(float("-inf"), dtype=dtype, device=device)


class ExactTopK:
    name = "exact"

    def __init__(self, model: Recommender, **_):  # ignores checkpoint_dir etc., like the others
        self.model = model

    @torch.inference_mode()
    def topk(self, query: torch.Tensor, k: int, exclude=None, histories=None) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k, self.model.n_items)
        scores = mask_items(self.model.ranking_scores(query, histories), exclude)  # (B, I)
        return torch.topk(scores, k, dim=1)
