"""GRU4Rec (Hidasi et al., 2016): a GRU over item embeddings; every position predicts the next
item with cross-entropy over the full catalog (the strong CE variant of Hidasi & Karatzoglou
2018, not the original sampled ranking losses; loss.kind selects a sampled one)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itemgen.config import GRU4RecConfig
from itemgen.recommender import Recommender


class GRU4Rec(Recommender):
    name = "gru4rec"

    def __init__(self, n_items: int, cfg: GRU4RecConfig, max_len: int):
        super().__init__()
        self.n_items, self.max_len, self.cfg = n_items, max_len, cfg
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # index 0 = padding, item i -> i + 1
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(d, d, num_layers=cfg.n_layers, batch_first=True,
                          dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.out = nn.Linear(d, d)  # GRU state -> the item embedding space (scores tie to item_emb)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def _pad(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad shifted ids: a recurrence never looks ahead, so real positions never see padding."""
        L = max(len(s) for s in seqs)
        x = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, s in enumerate(seqs):
            x[b, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64) + 1)
        return x, torch.as_tensor([len(s) for s in seqs])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) shifted ids -> (B, L, d) query states."""
        states, _ = self.gru(self.drop(self.item_emb(x)))  # (B, L, d)
        return self.out(self.drop(states))

    def train_batch(self, seqs, rng):
        seqs = [np.asarray(s)[-(self.max_len + 1):] for s in seqs]
        x, _ = self._pad([s[:-1] for s in seqs])
        y, _ = self._pad([s[1:] for s in seqs])
        return {"x": x, "y": y - 1}  # y: item index, -1 at padding

    def n_labels(self, seqs) -> int:
        return sum(min(len(s), self.max_len + 1) - 1 for s in seqs)

    def loss(self, batch):
        h = self.hidden(batch["x"])  # (B, L, d)
        sel = batch["y"] >= 0
        if self.sampled_loss is not None:
            return self.sampled_loss(h[sel], batch["y"][sel], self.item_vectors())
        logits = h[sel] @ self.item_vectors().T  # (N, I), label positions only
        return F.cross_entropy(logits.float(), batch["y"][sel], reduction="sum")

    def query_batch(self, histories):
        x, lengths = self._pad([np.asarray(h)[-self.max_len:] for h in histories])
        return {"x": x, "lengths": lengths}

    def encode(self, batch):
        h = self.hidden(batch["x"])  # (B, L, d)
        return h[torch.arange(h.shape[0], device=h.device), batch["lengths"] - 1]  # (B, d)

    def score_items(self, query):
        return query @ self.item_vectors().T  # (B, I)

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight[1:]
