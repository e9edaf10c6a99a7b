"""SASRec (Kang & McAuley, 2018): causal self-attention over item ids, every position predicts
the next item, cross-entropy over the full catalog (the strong variant, not sampled BCE)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itemgen.config import SASRecConfig
from itemgen.recommender import Recommender


class SASRec(Recommender):
    name = "sasrec"

    def __init__(self, n_items: int, cfg: SASRecConfig, max_len: int):
        super().__init__()
        self.n_items, self.max_len, self.cfg = n_items, max_len, cfg
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # index 0 = padding, item i -> i + 1
        self.pos_emb = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, dim_feedforward=d, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def _pad(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad (shifted) item ids: with a causal mask real positions never see padding."""
        L = max(len(s) for s in seqs)
        x = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, s in enumerate(seqs):
            x[b, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64) + 1)
        return x, torch.as_tensor([len(s) for s in seqs])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) shifted ids -> (B, L, d)."""
        L = x.shape[1]
        pos = torch.arange(L, device=x.device)
        h = self.drop(self.item_emb(x) * (self.cfg.hidden ** 0.5) + self.pos_emb(pos)[None])
        causal = nn.Transformer.generate_square_subsequent_mask(L, device=x.device)
        return self.norm(self.blocks(h, mask=causal, is_causal=True))

    def train_batch(self, seqs, rng):
        seqs = [np.asarray(s)[-(self.max_len + 1):] for s in seqs]
        x, lengths = self._pad([s[:-1] for s in seqs])
        y, _ = self._pad([s[1:] for s in seqs])
        return {"x": x, "y": y - 1}  # y: item index, -1 at padding

    def n_labels(self, seqs) -> int:
        return sum(min(len(s), self.max_len + 1) - 1 for s in seqs)

    def loss(self, batch):
        h = self.hidden(batch["x"])  # (B, L, d)
        sel = batch["y"] >= 0
        if self.sampled_loss is not None:  # loss.kind != full (losses.py)
            return self.sampled_loss(h[sel], batch["y"][sel], self.item_emb.weight[1:])
        logits = h[sel] @ self.item_emb.weight[1:].T  # (N, I), label positions only
        return F.cross_entropy(logits.float(), batch["y"][sel], reduction="sum")

    def query_batch(self, histories):
        x, lengths = self._pad([np.asarray(h)[-self.max_len:] for h in histories])
        return {"x": x, "lengths": lengths}

    def encode(self, batch):
        h = self.hidden(batch["x"])  # (B, L, d)
        return h[torch.arange(h.shape[0], device=h.device), batch["lengths"] - 1]  # (B, d)

    def score_items(self, query):
        return query @ self.item_emb.weight[1:].T  # (B, I)

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight[1:]
