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
    every query still running opens its next w clusters (one padded, chunked gather for all), w
    doubling from 1 while the round's gather stays under ``max_slots`` member vectors: a lone
    query that needs n clusters takes about log2(n) rounds instead of n, and opens at most about
    twice as many as it needs (an extra cluster only adds candidates scored exactly: the top-k
    stays exact). A refining head (TwoLevelHead.refine = M) scores its M highest clusters' members
    for their exact log Z_c anyway: those candidates enter the top-k first and the search opens
    the other C - M clusters only (each cluster's members gathered once a query)."""

    name = "structure"
    margin = 1e-4  # open a cluster even if its bound is this far below: float rounding never cuts one
    # a round gathers at most about this many member vectors over all running queries (w clusters x
    # largest size x queries): a lone query opens many clusters a round, a batch one each
    max_slots = 8192

    def __init__(self, model: Recommender, normalized: bool = False, **_):
        self.head = getattr(model, "head", None)
        if not isinstance(self.head, TwoLevelHead):
            raise ValueError("decoder 'structure' needs a two-level head (itemlm.head=two_level); "
                             f"{model.name} with this head decodes with 'exact' or 'ann'")
        self.model, self.normalized = model, normalized
        self.opened, self.queries, self.rounds = 0, 0, 0
        self.last_opened: torch.Tensor | None = None  # (B,) clusters opened for the last batch

    def stats(self) -> dict:
        return {"clusters": self.head.n_clusters, "queries": self.queries,
                "clusters_opened_mean": round(self.opened / max(self.queries, 1), 3), "rounds": self.rounds}

    @torch.inference_mode()
    def topk(self, query: torch.Tensor, k: int, exclude=None, histories=None) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k, self.model.n_items)
        head = self.head
        h = query.to(head.item_out.dtype)  # (B, H)
        B, C, dev = h.shape[0], head.n_clusters, h.device
        # the repeat bias enters the level-2 logits of the history items (TwoLevelHead.with_item_bias):
        # level 2 stays a softmax, so P(t | h) <= P(c(t) | h) still bounds every member
        bias = self.history_bias(histories, dev)
        lpc = head.item_cluster_logits(h).float()  # (B, C) unnormalised cluster scores
        rows = torch.arange(B, device=dev)
        M = head.refine
        if M:  # the top clusters' exact masses (TwoLevelHead.refined); their members are scored once, here
            top = torch.topk(lpc, M, dim=1).indices  # (B, M)
            mem, logit, valid = self._members(h, rows, top, torch.ones_like(top, dtype=torch.bool), bias)
            lpc = head.refined(h, lpc, torch.logsumexp(logit, dim=2), top)
        if self.normalized:
            log_z1 = torch.logsumexp(lpc, dim=1)
            if head._text_weight is not None:
                log_z1 = torch.logaddexp(log_z1, torch.logsumexp((h @ head._text_weight().T).float(), dim=1))
            lpc = lpc - log_z1[:, None]  # log P(c | h)
        best = torch.full((B, k), float("-inf"), device=dev)  # (B, k) sorted descending
        best_ids = torch.full((B, k), -1, dtype=torch.long, device=dev)
        excl = None if exclude is None else _PairLookup.of(exclude, head.n_items, dev)
        order = torch.argsort(lpc, dim=1, descending=True)  # (B, C) clusters, most likely first
        if M:  # the refined clusters enter the top-k now and go last in the opening order, never reopened
            self._keep(best, best_ids, rows, *self._scored(lpc.gather(1, top), rows, mem, logit, valid, excl), k)
            is_top = torch.zeros(B, C, dtype=torch.bool, device=dev).scatter_(1, top, True)
            order = order.gather(1, torch.argsort(is_top.gather(1, order).to(torch.int8), dim=1, stable=True))
        n_open = C - M  # clusters left to open, per query
        bound = lpc.gather(1, order)  # (B, C) log P(c | h) in opening order
        ptr = torch.zeros(B, dtype=torch.long, device=dev)  # next cluster to open, per query
        opened = torch.full((B,), M, dtype=torch.long, device=dev)
        active = rows if n_open else rows[:0]
        width = 1  # clusters each running query opens this round: 1, 2, 4, ... (fewer rounds, each batched)
        max_size = int(head.sizes.max())
        while active.numel():
            active = active[bound[active, ptr[active]] + self.margin >= best[active, k - 1]]
            if not active.numel():
                break
            w = min(width, n_open)
            self.rounds += 1
            col = ptr[active][:, None] + torch.arange(w, device=dev)[None]  # (A, w) opening positions
            live = col < n_open  # (A, w) a query near its last cluster opens fewer
            cs = order[active[:, None], col.clamp(max=n_open - 1)]  # (A, w) clusters opened now
            mem, logit, valid = self._members(h, active, cs, live, bias)  # (A, w, S) each
            self._keep(best, best_ids, active, *self._scored(lpc[active[:, None], cs], active, mem, logit, valid, excl), k)
            opened_now = live.sum(1)  # (A,)
            opened[active] += opened_now
            ptr[active] += opened_now
            active = active[ptr[active] < n_open]
            # double while the round's gather stays small: w S member vectors for each running query
            width = width * 2 if 2 * width * max_size * len(active) <= self.max_slots else width
        self.opened += int(opened.sum())
        self.queries += B
        self.last_opened = opened
        return best, best_ids

    @staticmethod
    def _scored(level1: torch.Tensor, rows: torch.Tensor, mem: torch.Tensor, logit: torch.Tensor,
                valid: torch.Tensor, excl: "_PairLookup | None") -> tuple[torch.Tensor, torch.Tensor]:
        """Clusters with level-1 scores level1 (A, w) and members mem, logit, valid (A, w, S) of
        _members -> each member's score, level 1 plus its log-softmax within its cluster, and its
        id, (A, w S) each: -inf and -1 at padding, -inf at an excluded (row, item)."""
        lp = level1[:, :, None] + logit - torch.logsumexp(logit, dim=2, keepdim=True).nan_to_num(neginf=0.0)
        lp = lp.masked_fill(~valid, float("-inf"))
        mem = mem.masked_fill(~valid, -1)  # padding slots never name an item
        if excl is not None:
            lp = lp.masked_fill(excl.hits(rows, mem, valid), float("-inf"))
        return lp.flatten(1), mem.flatten(1)

    @staticmethod
    def _keep(best: torch.Tensor, best_ids: torch.Tensor, rows: torch.Tensor, lp: torch.Tensor,
              ids: torch.Tensor, k: int) -> None:
        """best, best_ids (B, k) at ``rows`` (A,) <- the k best of themselves and lp, ids (A, n). In place."""
        top = torch.topk(torch.cat([best[rows], lp], dim=1), k, dim=1)
        best[rows], best_ids[rows] = top.values, torch.cat([best_ids[rows], ids], dim=1).gather(1, top.indices)

    def _members(self, h: torch.Tensor, rows: torch.Tensor, cs: torch.Tensor, live: torch.Tensor,
                 bias: "_PairLookup | None") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clusters cs (A, w) of query rows (A,), where ``live`` -> their members (A, w, S) padded
        to the largest, level-2 logits h . e_t (+ the bias) there (-inf at padding), and which slots
        are members."""
        head = self.head
        size = torch.where(live, head.sizes[cs], 0)  # (A, w)
        S = int(size.max())
        slot = torch.arange(S, device=h.device)  # (S,)
        valid = slot[None, None] < size[:, :, None]  # (A, w, S)
        mem = head.order[(head.offsets[cs][:, :, None] + slot[None, None]).clamp(max=head.n_items - 1)]  # (A, w, S)
        A, w = cs.shape
        logit = _GatherDot.apply(h[rows], head.item_out, mem.view(A, w * S), False).float().view(A, w, S)
        if bias is not None:
            logit = logit + bias.values_at(rows, mem, valid)
        return mem, logit.masked_fill(~valid, float("-inf")), valid

    def history_bias(self, histories, device) -> "_PairLookup | None":
        repeat = getattr(self.model, "repeat", None)
        if repeat is None or histories is None:
            return None
        pairs = repeat.pairs(histories).to(device)  # (P, 3) row, item, recency
        if not len(pairs):
            return None
        return _PairLookup(pairs[:, 0], pairs[:, 1], self.head.n_items, repeat.bias(pairs[:, 2]).float())


class _PairLookup:
    """(row, item) pairs, with a value each, looked up for a padded block of items without a
    (B, I) table: keys row * I + item sorted, found by binary search."""

    def __init__(self, rows: torch.Tensor, items: torch.Tensor, n_items: int, values: torch.Tensor | None = None):
        keys = rows * n_items + items  # (P,)
        order = torch.argsort(keys)
        self.keys, self.n_items = keys[order], n_items
        self.values = None if values is None else values[order]

    @classmethod
    def of(cls, lists, n_items: int, device) -> "_PairLookup":
        """Per-row item lists (exclusions) -> their pairs."""
        items = [torch.as_tensor(np.asarray(e, dtype=np.int64), device=device) for e in lists]
        rows = torch.repeat_interleave(torch.arange(len(items), device=device),
                                       torch.tensor([len(e) for e in items], device=device))
        return cls(rows, torch.cat(items) if items else torch.zeros(0, dtype=torch.long, device=device), n_items)

    def _find(self, rows: torch.Tensor, items: torch.Tensor, valid: torch.Tensor):
        """rows (A,), items (A, ...), valid like items -> (position in keys, hit) like items."""
        if not len(self.keys):
            return torch.zeros_like(items), torch.zeros_like(valid)
        q = rows.view(-1, *([1] * (items.dim() - 1))) * self.n_items + items.clamp(min=0)
        at = torch.searchsorted(self.keys, q.reshape(-1)).view(q.shape).clamp(max=len(self.keys) - 1)
        return at, (self.keys[at] == q) & valid

    def hits(self, rows: torch.Tensor, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Whether each (row, item) is a listed pair."""
        return self._find(rows, items, valid)[1]

    def values_at(self, rows: torch.Tensor, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The value at each (row, item), 0 where none is listed."""
        at, hit = self._find(rows, items, valid)
        return torch.where(hit, self.values[at], torch.zeros((), dtype=self.values.dtype, device=items.device))
