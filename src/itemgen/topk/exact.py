"""Top-k over the catalog from query states: ``topk(query, k, exclude, histories) -> (scores, ids)``.
``histories``, when the caller has them, are the histories the queries came from: decoders of a
model with a repeat bias (models/repeat_bias.py) add it at their items.

``ExactTopK`` scores every item (the reference every faster decoder is tested against)."""

from __future__ import annotations

import numpy as np
import torch

from itemgen.models.recommender import Recommender


def check_k(k: int, n_items: int) -> None:
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be between 1 and the catalog size {n_items}, got {k}")


def mask_items(scores: torch.Tensor, exclude: list[np.ndarray] | None) -> torch.Tensor:
    """Set excluded items (e.g. each user's history) to -inf; scores (B, I)."""
    if exclude is None:
        return scores
    scores = scores.clone()
    for b, ex in enumerate(exclude):
        if len(ex):
            scores[b, torch.as_tensor(np.asarray(ex, dtype=np.int64), device=scores.device)] = float("-inf")
    return scores


class ExactTopK:
    name = "exact"

    def __init__(self, model: Recommender, **_):  # ignores checkpoint_dir etc., like the others
        self.model = model

    @torch.inference_mode()
    def topk(self, query: torch.Tensor, k: int, exclude=None, histories=None) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k, self.model.n_items)
        scores = mask_items(self.model.history_scores(self.model.score_items(query), histories), exclude)  # (B, I)
        return torch.topk(scores, k, dim=1)
