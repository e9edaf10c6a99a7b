"""The text-match path (``items.text_match``): a learned text-kNN beside a model's ID scores.

    score(i | history) = h . v_i + (M q) . t_i

h (H,) the model's query state and v_i (H,) its item vectors (the ID part); t_i (F,) item i's text
view as the frozen encoder gave it (unit rows, zero for an item without text; item_repr.py keeps
it); q (F,) the mean of t_j over the last ``n`` items of the history; M (F, F) a trainable map
that starts at s * Identity (``items.text_match_scale``), so an untrained text part is exactly
s times text-kNN's score (models/text_knn.py: the mean cosine with the last n items) and training
learns from the warm items how a history's text predicts the next item (M = s I + D, D starts at
zero; weight decay pulls D, not s, so it pulls towards text-kNN, not towards no text).

MIPS-compatible by concatenation: a query is [h ; M q] (H + F,) and an item vector [v_i ; t_i]
(H + F,), so exact top-k, the ANN index over item_vectors(), evaluation and serving stay one dot
product. An item with no ID part (no training interaction, items.id_dropout, or added by
``itemgen items add``) has v_i = 0: it is scored by its text alone, at once.

q is computed from the item slots of a batch (training: at every label position, vectorised with
cumulative sums over the slots) or from the histories themselves (serving): both give the mean
of the same rows, and tests check they agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TextMatch(nn.Module):
    """M (F, F) = scale * I + delta, applied to history text means q (..., F)."""

    def __init__(self, text_dim: int, last_n: int, scale: float):
        super().__init__()
        if last_n < 1:
            raise ValueError(f"items.text_match={last_n}: the number of last history items must be >= 1")
        self.last_n = last_n
        self.scale = nn.Parameter(torch.tensor(float(scale)))  # s: a scalar, no weight decay (training/loop.py)
        self.delta = nn.Parameter(torch.zeros(text_dim, text_dim))  # (F, F) what training adds to s * I

    def matrix(self) -> torch.Tensor:
        """(F, F) M."""
        return self.scale * torch.eye(self.delta.shape[0], device=self.delta.device) + self.delta

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q (..., F) history text means -> (..., F) M q."""
        q = q.to(self.delta.dtype)
        return q * self.scale + q @ self.delta.T

    def slot_means(self, view: torch.Tensor, items: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """view (I, F) text rows; items (B, L) item index at item slots, -1 elsewhere; at (B, L)
        bool positions -> (N, F), row-major over ``at``: the mean text of the last n item slots at
        or before each position (zero where none). Cumulative sums over all slots of the batch
        (float64: a difference of two long sums keeps float32 accuracy), no loop over positions."""
        is_item = items >= 0  # (B, L)
        per_row = is_item.sum(1)  # (B,)
        G = torch.zeros(int(per_row.sum()) + 1, view.shape[1], dtype=torch.float64, device=view.device)
        G[1:] = view[items[is_item]].double().cumsum(0)  # (S + 1, F) slots in row-major order
        first = (per_row.cumsum(0) - per_row)[:, None].expand_as(items)[at]  # (N,) the row's first slot
        k = is_item.long().cumsum(1)[at]  # (N,) slots at or before the position
        n = k.clamp(max=self.last_n)
        return ((G[first + k] - G[first + k - n]) / n.clamp(min=1)[:, None]).to(view.dtype)

    def history_means(self, view: torch.Tensor, histories: list[np.ndarray]) -> torch.Tensor:
        """view (I, F), histories (item indices, oldest first) -> (B, F) the mean text of each
        history's last n items (zero for an empty history)."""
        last = [np.asarray(h, dtype=np.int64)[-self.last_n:] for h in histories]
        n = torch.as_tensor([len(h) for h in last], device=view.device)  # (B,)
        idx = torch.from_numpy(np.concatenate(last) if last else np.zeros(0, np.int64)).to(view.device)
        row = torch.arange(len(last), device=view.device).repeat_interleave(n)  # (N,)
        out = torch.zeros(len(last), view.shape[1], dtype=torch.float64, device=view.device)
        out.index_add_(0, row, view[idx].double())
        return (out / n.clamp(min=1)[:, None]).to(view.dtype)
