"""SASRec (Kang & McAuley, 2018): causal self-attention over item ids, every position predicts
the next item, cross-entropy over the full catalog (the strong variant, not sampled BCE)."""

from __future__ import annotations

import torch
from torch import nn

from itemgen.core.config import SASRecConfig
from itemgen.models.next_item import NextItemRecommender


class SASRec(NextItemRecommender):
    name = "sasrec"

    def __init__(self, n_items: int, cfg: SASRecConfig, max_len: int):
        super().__init__()
        self.n_items, self.max_len, self.cfg = n_items, max_len, cfg
        d = cfg.hidden
        self._item_table(n_items, d)
        self.pos_emb = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        pre = cfg.layout == "pre_ln"
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, dim_feedforward=cfg.ffn or d, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=pre)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)  # pre_ln: after the blocks; post_ln: on the input embeddings
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) shifted ids -> (B, L, d)."""
        L = x.shape[1]
        pos = self.pos_emb(torch.arange(L, device=x.device))[None]  # (1, L, d)
        causal = nn.Transformer.generate_square_subsequent_mask(L, device=x.device)
        if self.cfg.layout == "post_ln":
            h = self.drop(self.norm(self.item_emb(x) + pos))
            return self.blocks(h, mask=causal, is_causal=True)
        h = self.drop(self.item_emb(x) * (self.cfg.hidden ** 0.5) + pos)
        return self.norm(self.blocks(h, mask=causal, is_causal=True))
