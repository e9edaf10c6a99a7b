"""Output layers over text tokens V and items I (method.md section 4).

Every head is called only on hidden states at label positions, (N, H): no vocabulary-sized
logits are ever computed at positions without a label.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FullSoftmaxHead(nn.Module):
    """P(t | h) = softmax over V u I of h . w_t. Items have their own output vectors (I, H);
    text tokens use the backbone's output embedding (V, H)."""

    def __init__(self, n_items: int, hidden: int, text_weight: Callable[[], torch.Tensor] | None):
        super().__init__()
        self.item_out = nn.Parameter(torch.randn(n_items, hidden) * 0.02)  # (I, H)
        self._text_weight = text_weight  # None: normalise over items only

    @property
    def n_items(self) -> int:
        return self.item_out.shape[0]

    def item_vectors(self) -> torch.Tensor:
        return self.item_out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, H) -> (N, V + I) logits, text tokens first."""
        item = h @ self.item_out.T  # (N, I)
        if self._text_weight is None:
            return item
        text = h @ self._text_weight().T  # (N, V)
        return torch.cat([text, item], dim=1)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """h (N, H), targets (N,) item indices -> summed cross-entropy."""
        logits = self.logits(h).float()
        offset = logits.shape[1] - self.n_items  # = |V| or 0
        return F.cross_entropy(logits, targets + offset, reduction="sum")

    def item_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, H) -> (B, I) log P(item | h), normalised over V u I."""
        logits = self.logits(h).float()
        return logits[:, logits.shape[1] - self.n_items:] - torch.logsumexp(logits, dim=1, keepdim=True)
