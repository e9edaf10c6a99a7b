"""GRU4Rec (Hidasi et al., 2016): a GRU over item embeddings; every position predicts the next
item with cross-entropy over the full catalog (the strong CE variant of Hidasi & Karatzoglou
2018, not the original sampled ranking losses; loss.kind selects a sampled one)."""

from __future__ import annotations

import torch
from torch import nn

from itemgen.core.config import GRU4RecConfig
from itemgen.models.next_item import NextItemRecommender


class GRU4Rec(NextItemRecommender):
    name = "gru4rec"

    def __init__(self, n_items: int, cfg: GRU4RecConfig, max_len: int):
        super().__init__()
        self.n_items, self.max_len, self.cfg = n_items, max_len, cfg
        d = cfg.hidden
        self._item_table(n_items, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(d, d, num_layers=cfg.n_layers, batch_first=True,
                          dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.out = nn.Linear(d, d)  # GRU state -> the item embedding space (scores tie to item_emb)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) shifted ids -> (B, L, d) query states."""
        states, _ = self.gru(self.drop(self.item_emb(x)))  # (B, L, d)
        return self.out(self.drop(states))
