"""The text-match path (``items.text_match``): a learned text-kNN beside a model's ID scores.

    score(i | history) = h . v_i + (M q) . t_i

h (H,) the model's query state and v_i (H,) its item vectors (the ID part); t_i (F,) item i's text
view as the frozen encoder gave it (unit rows, zero for an item without text; item_repr.py keeps
it); q (F,) the mean of t_j over the last ``n`` items of the history; M (F, F) a trainable map
that starts at s * Identity (``items.text_match_scale``), so an untrained text part is exactly
s times text-kNN's score (models/text_knn.py: the mean cosine with the last n items) and training
learns from the warm items how a history's text predicts the next item (M = s I + D, D starts at
zero; weight decay pulls D, not s, so it pulls towards text-kNN, not towards no text).

MIPS-compatible by concatenation: a query is [h ; M q ; 1] (H + F + 1,) and an item vector
[v_i ; t_i ; c_i] (H + F + 1,), so exact top-k, the ANN index over item_vectors(), evaluation and
serving stay one dot product. An item with no ID part (no training interaction, items.id_dropout,
or added by ``itemgen items add``) has v_i = 0: it is scored by its text alone, at once, plus
c_i = the closed-item prior (items.closed_prior, chosen on validation: evaluation/closed_prior.py;
0 for the others and in training).

The item-side gate (``items.text_gate``, :class:`TextGate`): one text weight cannot serve every
item. An item with a well-trained ID vector needs little of its text, one seen a few times or never
needs much of it (office: text_match_scale 8 is best on all users, 50 on the tail, measured on
validation). So item i's text part is weighed by g(b_i) and gets a bias c(b_i), learned per bucket:

    score(i | history) = h . v_i + g(b_i) (M q) . t_i + c(b_i)

b_i is "ID closed" (an item with no training interaction, one items.id_dropout hides in this
training step, one added by ``itemgen items add``) or the item's training-count bucket. Still
MIPS: the item vector is [v_i ; g(b_i) t_i ; c(b_i) (+ the closed prior)], the query [h ; M q ; 1]. The closed bucket
is learned from the id_dropout draws, where a warm item is scored exactly as a new item will be:
how much a text-only candidate should weigh, and how likely it is a priori, are learned from the
warm items, which raw cosine cannot. g starts at 1 and c at 0, the ungated scores exactly.

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


class TextGate(nn.Module):
    """g (B,) and c (B,) per item bucket: 0 = ID closed, 1.. = training-count buckets cut at ``edges``.

    Parametrised as g = exp(GAIN a), c = GAIN b, with a and b starting at zero: Adam moves a
    parameter by about lr a step whatever its gradient, so over a CPU recipe's run (lr 3e-4,
    cosine, ~800 steps: a summed lr of ~0.12) a plain scalar moves by ~0.1 (the learned text
    scale s barely moved, measured); the gain lets log g and c move by up to ~2.4."""

    GAIN = 20.0

    def __init__(self, edges: tuple[int, ...], learn_open: bool = True):
        super().__init__()
        self.edges = tuple(int(e) for e in edges)
        n = len(self.edges) + 2  # closed, then counts [1, e0), [e0, e1), ..., [e_last, inf)
        self.log_weight = nn.Parameter(torch.zeros(n))  # a: g = exp(GAIN a); no weight decay (1-D)
        self.bias = nn.Parameter(torch.zeros(n))  # b: c = GAIN b
        # which buckets learn (items.text_gate_open): the others keep g = 1, c = 0 (no gradient)
        self.register_buffer("learns", torch.ones(n) if learn_open else torch.eye(n)[0], persistent=False)

    def buckets(self, counts: torch.Tensor) -> torch.Tensor:
        """counts (I,) training interactions -> (I,) long bucket (0 for count 0: no ID part)."""
        counts = torch.as_tensor(counts, dtype=torch.long)
        edges = torch.as_tensor(self.edges, dtype=torch.long, device=counts.device)
        b = 1 + (counts[:, None] >= edges).sum(1) if self.edges else torch.ones_like(counts)
        return torch.where(counts > 0, b, torch.zeros_like(b))

    def forward(self, bucket: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bucket (I,) long -> g (I,), c (I,)."""
        a, b = self.log_weight * self.learns, self.bias * self.learns
        return torch.exp(self.GAIN * a)[bucket], (self.GAIN * b)[bucket]

    def weights(self) -> dict[str, tuple[float, float]]:
        """bucket name -> (g, c): what the gate learned (for logs and docs)."""
        lo = (1,) + self.edges
        names = ["closed"] + [f"{a}-{b - 1}" for a, b in zip(lo, self.edges)] + [f"{lo[-1]}+"]
        with torch.no_grad():
            g, c = torch.exp(self.GAIN * self.log_weight * self.learns), self.GAIN * self.bias * self.learns
        return {n: (float(g[i]), float(c[i])) for i, n in enumerate(names)}
