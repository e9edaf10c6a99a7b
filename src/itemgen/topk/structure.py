"""The structure decoder: the exact top-k of a two-level softmax without scoring every item."""

from __future__ import annotations

import numpy as np
import torch

from itemgen.heads.softmax import TwoLevelHead, _GatherDot
from itemgen.models.recommender import Recommender
from itemgen.topk.exact import check_k


class StructureTopK:
    """Exact top-k for the two-level softmax (method.md 4.3): since P(t | h) <= P(c(t) | h), open
    clusters in decreasing P(c | h), score their members, keep the k best; stop once the next
    cluster's P(c | h) is below the k-th best full probability. Scores are log P(t | h) + log Z_1(h)
    (the level-1 normaliser over text tokens and clusters is the same for every item, so the ranking
    is exact, and skipping it saves a (B, V) product); ``normalized=True`` returns exact log P(t | h).
    ``stats()`` reports how many clusters were opened per query. Batched in rounds: each round,
    every query still running opens its next cluster (one padded, chunked gather for all)."""

    name = "structure"
    margin = 1e-4  # open a cluster even if its bound is this far below: float rounding never cuts one

    def __init__(self, model: Recommender, normalized: bool = False, **_):
        self.head = getattr(model, "head", None)
        if not isinstance(self.head, TwoLevelHead):
            raise ValueError("decoder 'structure' needs a two-level head (itemlm.head=two_level); "
                             f"{model.name} with this head decodes with 'exact' or 'ann'")
        self.model, self.normalized = model, normalized
        self.opened, self.queries = 0, 0
        self.last_opened: torch.Tensor | None = None  # (B,) clusters opened for the last batch

    def stats(self) -> dict:
        return {"clusters": self.head.n_clusters, "queries": self.queries,
                "clusters_opened_mean": round(self.opened / max(self.queries, 1), 3)}

    @torch.inference_mode()
    def topk(self, query: torch.Tensor, k: int, exclude=None, histories=None) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k, self.model.n_items)
        head = self.head
        h = query.to(head.item_out.dtype)  # (B, H)
        B, C, dev = h.shape[0], head.n_clusters, h.device
        # the repeat bias enters the level-2 logits of the history items (TwoLevelHead.with_item_bias):
        # level 2 stays a softmax, so P(t | h) <= P(c(t) | h) still bounds every member
        bias = self.history_bias(histories, dev)
        lpc = (h @ head.centroids.T).float()  # (B, C) unnormalised cluster scores
        if self.normalized:
            log_z1 = torch.logsumexp(lpc, dim=1)
            if head._text_weight is not None:
                log_z1 = torch.logaddexp(log_z1, torch.logsumexp((h @ head._text_weight().T).float(), dim=1))
            lpc = lpc - log_z1[:, None]  # log P(c | h)
        order = torch.argsort(lpc, dim=1, descending=True)  # (B, C) clusters, most likely first
        bound = lpc.gather(1, order)  # (B, C) log P(c | h) in opening order
        best = torch.full((B, k), float("-inf"), device=dev)  # (B, k) sorted descending
        best_ids = torch.full((B, k), -1, dtype=torch.long, device=dev)
        ptr = torch.zeros(B, dtype=torch.long, device=dev)  # next cluster to open, per query
        opened = torch.zeros(B, dtype=torch.long, device=dev)
        excl = None if exclude is None else [torch.as_tensor(np.asarray(e, dtype=np.int64), device=dev)
                                             for e in exclude]
        active = torch.arange(B, device=dev)
        while active.numel():
            active = active[bound[active, ptr[active]] + self.margin >= best[active, k - 1]]
            if not active.numel():
                break
            cs = order[active, ptr[active]]  # (A,) cluster each active query opens now
            size = head.sizes[cs]  # (A,)
            slot = torch.arange(int(size.max()), device=dev)  # (S,)
            valid = slot[None] < size[:, None]  # (A, S)
            mem = head.order[(head.offsets[cs][:, None] + slot[None]).clamp(max=head.n_items - 1)]  # (A, S)
            logit = _GatherDot.apply(h[active], head.item_out, mem, False).float()  # (A, S), chunked gather
            if bias is not None:
                logit = logit + bias.lookup(active, mem, valid)
            logit = logit.masked_fill(~valid, float("-inf"))
            mem = mem.masked_fill(~valid, -1)  # padding slots never name an item
            lp = lpc[active, cs][:, None] + logit - torch.logsumexp(logit, dim=1, keepdim=True)
            if excl is not None:
                for j, r in enumerate(active.tolist()):
                    if excl[r].numel():
                        lp[j, torch.isin(mem[j], excl[r])] = float("-inf")
            cand = torch.cat([best[active], lp], dim=1)  # (A, k + S)
            cand_ids = torch.cat([best_ids[active], mem], dim=1)
            top = torch.topk(cand, k, dim=1)
            best[active], best_ids[active] = top.values, cand_ids.gather(1, top.indices)
            opened[active] += 1
            ptr[active] += 1
            active = active[ptr[active] < C]
        self.opened += int(opened.sum())
        self.queries += B
        self.last_opened = opened
        return best, best_ids

    def history_bias(self, histories, device) -> "_SparseBias | None":
        repeat = getattr(self.model, "repeat", None)
        if repeat is None or histories is None:
            return None
        pairs = repeat.pairs(histories).to(device)  # (P, 3) row, item, recency
        if not len(pairs):
            return None
        return _SparseBias(pairs[:, 0], pairs[:, 1], repeat.bias(pairs[:, 2]).float(), self.head.n_items)


class _SparseBias:
    """Values at (row, item) pairs, looked up for a padded (A, S) block of items without an
    (B, I) table: keys row * I + item sorted, found by binary search."""

    def __init__(self, rows: torch.Tensor, items: torch.Tensor, values: torch.Tensor, n_items: int):
        keys = rows * n_items + items  # (P,) distinct: a history lists each item once
        order = torch.argsort(keys)
        self.keys, self.values, self.n_items = keys[order], values[order], n_items

    def lookup(self, rows: torch.Tensor, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """rows (A,), items (A, S), valid (A, S) -> (A, S) the value at each (row, item), 0 where none."""
        q = rows[:, None] * self.n_items + items.clamp(min=0)  # (A, S)
        at = torch.searchsorted(self.keys, q).clamp(max=len(self.keys) - 1)
        hit = (self.keys[at] == q) & valid
        return torch.where(hit, self.values[at], torch.zeros((), dtype=self.values.dtype, device=q.device))

