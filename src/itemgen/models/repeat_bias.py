"""A learned awareness of repeats (config ``repeat``): a learned bias added to the score of every
item already in the user's history, as a function of how far back the user had it.

Models compose it (``model.repeat``, built by models/registry.py): the full-catalog training
softmax sees it (so on data where no user takes an item twice it learns a large negative value, on
data with repeats whatever fits), and so does every path that ranks the catalog from a history
(``Recommender.scores``, the exact and ANN decoders). Serving masks the history by default, which
makes the bias moot there. Its values are added after any normalisation the model applies at
inference (ItemLM's log-softmax): they change the ranking, not a normaliser shared by the row.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from itemgen.core.config import RepeatConfig
from itemgen.data.dataset import history_pairs


class RepeatBias(nn.Module):
    # the bias is SCALE * a raw parameter: Adam moves a parameter by about lr per step, and the
    # value this needs (several logits) would take tens of thousands of steps at ItemLM's lr 3e-4
    SCALE = 10.0

    def __init__(self, kind: str, max_history: int):
        super().__init__()
        if kind not in ("scalar", "recency"):
            raise ValueError(f"repeat.bias={kind!r}: scalar|recency")
        self.kind, self.max_history = kind, max_history
        # recency buckets: 0 (the last item), 1, 2-3, 4-7, ... items further back
        n = 1 if kind == "scalar" else self.bucket_of(max(max_history - 1, 0)) + 1
        self.raw = nn.Parameter(torch.zeros(n))

    @staticmethod
    def bucket_of(recency: int) -> int:
        return 0 if recency <= 0 else int(math.floor(math.log2(recency))) + 1

    def values(self) -> torch.Tensor:
        """(n_buckets,) the bias per recency bucket (scalar: one)."""
        return self.raw * self.SCALE

    def bias(self, recency: torch.Tensor) -> torch.Tensor:
        """recency (P,) items back (0 = the last one) -> (P,) the bias of each."""
        if self.kind == "scalar":
            return self.values()[torch.zeros_like(recency)]
        bucket = torch.where(recency > 0, torch.floor(torch.log2(recency.clamp_min(1).float())).long() + 1, 0)
        return self.values()[bucket.clamp_max(len(self.raw) - 1)]

    def add_pairs(self, logits: torch.Tensor, pairs: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
        """logits (N, V + I) + the bias at (label, offset + item) for each row of pairs (P, 3)
        (data.dataset.history_pairs: label, item, recency). Not in place."""
        if pairs is None or not len(pairs):
            return logits
        pairs = pairs.to(logits.device)
        return logits.index_put((pairs[:, 0], pairs[:, 1] + offset), self.bias(pairs[:, 2]).to(logits.dtype),
                                accumulate=True)

    def pairs(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(P, 3) (row, item, recency): each distinct item of each history as the model reads it
        (its last ``max_history`` items), rows in order, items in order of first appearance."""
        seqs = [np.append(np.asarray(h, dtype=np.int64)[-self.max_history:], -1) for h in histories]  # -1: the label
        return torch.from_numpy(history_pairs(seqs, last_only=True))

    def add_histories(self, scores: torch.Tensor, histories: list[np.ndarray]) -> torch.Tensor:
        """scores (B, I) for ``histories`` -> the same with each history item's bias added. Not in place."""
        return self.add_pairs(scores, self.pairs(histories))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, max_history={self.max_history}"


def make_repeat_bias(cfg: RepeatConfig, max_history: int) -> RepeatBias | None:
    return None if cfg.bias == "none" else RepeatBias(cfg.bias, max_history)
