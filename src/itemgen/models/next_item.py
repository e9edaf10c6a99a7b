"""What SASRec and GRU4Rec share: item ids in, every position predicts the next item, scores
tied to the item embedding table. Subclasses define ``hidden`` (the sequence encoder) only."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itemgen.data.dataset import earlier_items, history_pairs
from itemgen.heads.softmax import exclude_items, exclude_pairs
from itemgen.models.recommender import Recommender


class NextItemRecommender(Recommender):
    distillable = True

    def _item_table(self, n_items: int, d: int) -> None:
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # index 0 = padding, item i -> i + 1
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) shifted ids, right-padded -> (B, L, d); position p must see only <= p."""
        raise NotImplementedError

    def _pad(self, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad (shifted) item ids: a causal encoder never lets real positions see padding."""
        L = max(len(s) for s in seqs)
        x = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, s in enumerate(seqs):
            x[b, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64) + 1)
        return x, torch.as_tensor([len(s) for s in seqs])

    def train_batch(self, seqs, rng):
        seqs = [np.asarray(s)[-(self.max_len + 1):] for s in seqs]
        x, _ = self._pad([s[:-1] for s in seqs])
        y, _ = self._pad([s[1:] for s in seqs])
        batch = {"x": x, "y": y - 1}  # y: item index, -1 at padding
        if self.exclude_history:  # (P, 2) (label, earlier item), labels in y's row-major order
            batch["exclude"] = torch.from_numpy(earlier_items(seqs))
        if self.repeat is not None:  # (P, 3) (label, earlier item, recency), labels as above
            batch["repeat"] = torch.from_numpy(history_pairs(seqs))
        return batch

    def n_labels(self, seqs) -> int:
        return sum(min(len(s), self.max_len + 1) - 1 for s in seqs)

    def queries(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """x (B, L) shifted ids, at (B, L) bool -> (N, D) query states at ``at``, row-major
        (SASRec adds its text-match part here)."""
        return self.hidden(x)[at]

    def loss(self, batch):
        sel = batch["y"] >= 0
        h = self.queries(batch["x"], sel)  # (N, D) label positions only
        if self.sampled_loss is not None:  # loss.kind != full (losses.py)
            return self.sampled_loss(h, batch["y"][sel], self.item_vectors())
        logits = self.with_repeat((h @ self.item_vectors().T).float(), batch)  # (N, I)
        logits = exclude_items(logits, self.unseen_in_training())
        ce = F.cross_entropy(exclude_pairs(logits, batch.get("exclude")), batch["y"][sel], reduction="sum")
        if self.distillation is not None:
            return self.distillation(ce, logits, batch["teacher_scores"])
        return ce

    def unseen_in_training(self) -> torch.Tensor | None:
        """(I,) bool items left out of the training softmax (none here; SASRec with a text view:
        the items the training split never shows, item_repr.py)."""
        return None

    def with_repeat(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """logits (N, I) at a train_batch's labels + the repeat bias at each label's earlier items."""
        return logits if self.repeat is None else self.repeat.add_pairs(logits, batch.get("repeat"))

    def label_scores(self, batch):
        return self.with_repeat(self.queries(batch["x"], batch["y"] >= 0) @ self.item_vectors().T, batch)  # (N, I)

    def query_batch(self, histories):
        x, lengths = self._pad([np.asarray(h)[-self.max_len:] for h in histories])
        return {"x": x, "lengths": lengths}

    def encode(self, batch):
        x = batch["x"]
        pos = (batch["lengths"].to(x.device) - 1) % x.shape[1]  # (B,) the last item's position
        last = torch.arange(x.shape[1], device=x.device)[None] == pos[:, None]  # (B, L)
        return self.queries(x, last)  # (B, D): one position per row, the last item's

    def score_items(self, query):
        return query @ self.item_vectors().T  # (B, I)

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight[1:]
