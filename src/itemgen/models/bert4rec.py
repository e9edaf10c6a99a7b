"""BERT4Rec (Sun et al., 2019): a bidirectional transformer over item ids trained like a masked
language model; at test time a mask token is appended to the history and its state ranks the
catalog. Cross-entropy over the full catalog at masked positions only (or a sampled loss).

Masking is random in position but fixed in number: a training sequence of length L masks
max(1, ceil(mask_prob * L)) positions, so ``n_labels`` depends on the lengths alone (the train
loop normalises by the global label count before the batch is built). As in the paper, some
training samples also mask the last item, which is the test-time task: with probability
``mask_last_prob`` the last position is one of the masked ones (the count stays the same)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itemgen.core.config import BERT4RecConfig
from itemgen.models.recommender import Recommender


class BERT4Rec(Recommender):
    name = "bert4rec"

    def __init__(self, n_items: int, cfg: BERT4RecConfig, max_history: int):
        super().__init__()
        self.n_items, self.cfg = n_items, cfg
        self.max_len = max_history + 1  # history + the appended mask at test time
        self.mask_token = n_items + 1  # index 0 = padding, item i -> i + 1, then the mask
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + 2, d, padding_idx=0)
        self.pos_emb = nn.Embedding(self.max_len, d)
        self.emb_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, dim_feedforward=4 * d, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def n_masks(self, length: int) -> int:
        return max(1, math.ceil(self.cfg.mask_prob * length))

    def _pad(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (already shifted) right-padded to (B, L), and lengths (B,); attention ignores padding."""
        L = max(len(s) for s in seqs)
        x = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, s in enumerate(seqs):
            x[b, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        return x, torch.as_tensor([len(s) for s in seqs])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) token ids (0 = padding) -> (B, L, d), every position sees the whole sequence."""
        # positions count back from the last real item (as the paper's left padding does), so the
        # appended test-time mask always sits at position 0, whatever the history's length
        lengths = (x != 0).sum(1, keepdim=True)  # (B, 1)
        pos = (lengths - 1 - torch.arange(x.shape[1], device=x.device)[None]).clamp(min=0)  # (B, L)
        # BERT-style: item and position embeddings at the same scale, so attention can learn to find
        # the mask's neighbours by position (the mask token itself carries no item information)
        h = self.drop(self.emb_norm(self.item_emb(x) + self.pos_emb(pos)))
        return self.norm(self.blocks(h, src_key_padding_mask=x == 0))

    # ---- training ----------------------------------------------------------------------
    def train_batch(self, seqs, rng):
        inputs, labels = [], []
        for s in seqs:
            s = np.asarray(s, dtype=np.int64)[-self.max_len:]
            tokens = s + 1
            y = np.full(len(s), -1, dtype=np.int64)
            n = self.n_masks(len(s))
            if rng.random() < self.cfg.mask_last_prob:  # the last item plus n - 1 random others
                at = np.append(rng.choice(len(s) - 1, n - 1, replace=False), len(s) - 1)
            else:
                at = rng.choice(len(s), n, replace=False)
            y[at] = s[at]
            tokens[at] = self.mask_token
            inputs.append(tokens)
            labels.append(y)
        x, _ = self._pad(inputs)
        y = torch.full(x.shape, -1, dtype=torch.long)
        for b, lab in enumerate(labels):
            y[b, : len(lab)] = torch.as_tensor(lab)
        return {"x": x, "y": y}  # y: item index at masked positions, -1 elsewhere

    def n_labels(self, seqs) -> int:
        return sum(self.n_masks(min(len(s), self.max_len)) for s in seqs)

    def loss(self, batch):
        h = self.hidden(batch["x"])  # (B, L, d)
        sel = batch["y"] >= 0
        if self.sampled_loss is not None:
            return self.sampled_loss(h[sel], batch["y"][sel], self.item_vectors())
        logits = h[sel] @ self.item_vectors().T  # (N, I), masked positions only
        return F.cross_entropy(logits.float(), batch["y"][sel], reduction="sum")

    # ---- inference ---------------------------------------------------------------------
    def query_batch(self, histories):
        seqs = [np.append(np.asarray(h, dtype=np.int64)[-(self.max_len - 1):] + 1, self.mask_token)
                for h in histories]
        x, lengths = self._pad(seqs)
        return {"x": x, "lengths": lengths}

    def encode(self, batch):
        h = self.hidden(batch["x"])  # (B, L, d)
        return h[torch.arange(h.shape[0], device=h.device), batch["lengths"] - 1]  # (B, d) at the mask

    def score_items(self, query):
        return query @ self.item_vectors().T  # (B, I)

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight[1: self.n_items + 1]  # (I, d): no padding, no mask token
