"""Output layers over text tokens V and items I (method.md section 4).

Every head is called only on hidden states at label positions, (N, H): no vocabulary-sized
logits are ever computed at positions without a label.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (rows (P,), items (P,), values (P,)): values added to the scores of those items in those rows
ItemBias = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def exclude_pairs(logits: torch.Tensor, pairs: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
    """logits (N, V + I) with -inf at (label, offset + item) for each row of pairs (P, 2): items a
    label's softmax leaves out (loss.exclude_history; data.dataset.earlier_items). Not in place."""
    if pairs is None or not len(pairs):
        return logits
    return logits.index_put((pairs[:, 0], pairs[:, 1] + offset),
                            torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def exclude_items(logits: torch.Tensor, items: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
    """logits (N, V + I) with -inf in the columns of ``items`` (I,) bool. Not in place."""
    if items is None:
        return logits
    mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    mask[offset:] = items.to(logits.device)
    return logits.masked_fill(mask, float("-inf"))


class FullSoftmaxHead(nn.Module):
    """P(t | h) = softmax over V u I of h . w_t. Items have their own output vectors (I, H);
    text tokens use the backbone's output embedding (V, H).

    ``extend`` maps those (I, H) item vectors to the ones scored, (I, D): ItemLM's text-match path
    (models/text_match.py) appends each item's text view, and its hidden states come with the
    matching query columns, (N, D)."""

    def __init__(self, n_items: int, hidden: int, text_weight: Callable[[], torch.Tensor] | None,
                 item_weight: Callable[[], torch.Tensor] | None = None,
                 extend: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self._n_items = n_items
        # item_weight: output vectors computed elsewhere (tied to the input side), else our own (I, H)
        self._item_weight = item_weight
        self._extend = extend
        self.item_out = nn.Parameter(torch.randn(n_items, hidden) * 0.02) if item_weight is None else None
        self._text_weight = text_weight  # None: normalise over items only

    @property
    def n_items(self) -> int:
        return self._n_items

    def item_vectors(self) -> torch.Tensor:
        v = self.item_out if self._item_weight is None else self._item_weight()  # (I, H)
        return v if self._extend is None else self._extend(v)  # (I, D)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, H) -> (N, V + I) logits, text tokens first."""
        item = h @ self.item_vectors().T  # (N, I)
        if self._text_weight is None:
            return item
        text = h @ self._text_weight().T  # (N, V)
        return torch.cat([text, item], dim=1)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None,
             unseen: torch.Tensor | None = None,
             adjust: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
        """h (N, H), targets (N,) item indices -> summed cross-entropy; ``exclude`` (P, 2)
        (label, item) pairs left out of the softmax (exclude_pairs); ``unseen`` (I,) bool items
        left out of every label's softmax (never targets: items the training split does not show);
        ``adjust(logits (N, V + I), offset of the items)`` -> logits with terms added before the
        softmax (the repeat bias, models/repeat_bias.py)."""
        logits = self.logits(h).float()
        offset = logits.shape[1] - self.n_items  # = |V| or 0
        if adjust is not None:
            logits = adjust(logits, offset)
        logits = exclude_items(logits, unseen, offset)
        return F.cross_entropy(exclude_pairs(logits, exclude, offset), targets + offset, reduction="sum")

    def item_log_probs(self, h: torch.Tensor, bias: ItemBias | None = None) -> torch.Tensor:
        """h (B, H) -> (B, I) log P(item | h), normalised over V u I; with ``bias`` (row, item,
        value) triples, those values added after (with_item_bias)."""
        logits = self.logits(h).float()  # (B, V + I)
        # one fused op (logits - logsumexp, as a batch-1 query's ~10 small ops, equal to float rounding)
        lp = torch.log_softmax(logits, dim=1)[:, logits.shape[1] - self.n_items:]
        return lp if bias is None else self.with_item_bias(lp, bias)

    # an item bias moves only the biased items' scores (the normaliser is shared by the whole row)
    bias_renormalises = False

    def with_item_bias(self, scores: torch.Tensor, bias: ItemBias) -> torch.Tensor:
        """scores (B, I) item logits or log-probabilities -> the same with ``bias`` (row, item,
        value) triples added (one softmax over the row: nothing else moves). Not in place."""
        row, item, value = bias
        return scores.index_put((row, item), value.to(scores.dtype), accumulate=True)


class _GatherDot(torch.autograd.Function):
    """out[n, s] = h[n] . W[idx[n, s]] for h (N, H), W (I, H), idx (N, S), in chunks of labels, so
    the (N, S, H) gathered rows never exist at once and are not kept for backward (recomputed).
    W's gradient is dense (index_add into zeros) or sparse (one row per (n, s))."""

    CHUNK = 8  # labels per chunk

    @staticmethod
    def forward(ctx, h, W, idx, sparse: bool):
        ctx.save_for_backward(h, W, idx)
        ctx.sparse = sparse
        out = torch.empty(idx.shape, dtype=torch.promote_types(h.dtype, W.dtype), device=h.device)
        for a in range(0, len(idx), _GatherDot.CHUNK):
            rows = W.index_select(0, idx[a:a + _GatherDot.CHUNK].reshape(-1)).view(*idx[a:a + _GatherDot.CHUNK].shape, -1)
            out[a:a + _GatherDot.CHUNK] = torch.bmm(rows, h[a:a + _GatherDot.CHUNK, :, None].to(rows.dtype))[:, :, 0]
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (N, S)
        h, W, idx = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.empty_like(h)
            for a in range(0, len(idx), _GatherDot.CHUNK):
                rows = W.index_select(0, idx[a:a + _GatherDot.CHUNK].reshape(-1)).view(*idx[a:a + _GatherDot.CHUNK].shape, -1)
                grad_h[a:a + _GatherDot.CHUNK] = torch.bmm(grad[a:a + _GatherDot.CHUNK, None, :].to(rows.dtype), rows)[:, 0]
        if ctx.needs_input_grad[1]:
            g = grad.to(W.dtype)
            if ctx.sparse:  # values (N * S, H): one row per gathered slot
                values = (g[:, :, None] * h.to(W.dtype)[:, None, :]).reshape(-1, W.shape[1])
                grad_w = torch.sparse_coo_tensor(idx.reshape(1, -1), values, W.shape)
            else:
                grad_w = torch.zeros_like(W)
                for a in range(0, len(idx), _GatherDot.CHUNK):
                    ga, ha = g[a:a + _GatherDot.CHUNK], h[a:a + _GatherDot.CHUNK].to(W.dtype)
                    grad_w.index_add_(0, idx[a:a + _GatherDot.CHUNK].reshape(-1),
                                      (ga[:, :, None] * ha[:, None, :]).reshape(-1, W.shape[1]))
        return grad_h, grad_w, None, None


class ClusterCorrection(nn.Module):
    """g(h) (N, C): a learned estimate of each item cluster's log Z_c(h) = logsumexp over its members
    t of h . e_t, added to level 1's logits h . e_c. With g = log Z_c, P(c | h) is the cluster's
    mass under the joint scores h . (e_c + e_t), and the two-level log P(t | h) equals the full
    softmax over those scores; a linear h . e_c cannot follow log Z_c, a convex function of h, and
    that is what the exact two-level ranking loses against its own joint scores (docs/quality_notes.md).
    A two-layer MLP, H -> width -> C: O(H width + width C) a query, nothing of size |I|. Its last layer
    starts at zero: the paper's linear level 1, which is what the likelihood trains; g is fitted
    afterwards by regression on log Z_c at training states (training/level1_fit.py)."""

    def __init__(self, hidden: int, n_clusters: int, width: int):
        super().__init__()
        self.inner = nn.Linear(hidden, width)
        self.outer = nn.Linear(width, n_clusters)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    @classmethod
    def frozen(cls, hidden: int, n_clusters: int, width: int) -> "ClusterCorrection":
        """One drawn from its own seed, with no gradient: a model built with it draws every other
        weight as one built without it, and the likelihood does not train it."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls(hidden, n_clusters, width).requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, H) -> (N, C)."""
        return self.outer(F.gelu(self.inner(h)))


class TwoLevelHead(nn.Module):
    """Two-level softmax (method.md 4.2): P(t | h) = P(c(t) | h) * P(t | c(t), h).

    Level 1 is a softmax over |V| + |C| clusters: every text token is its own cluster (centroid =
    its output embedding), item clusters have learned centroids (C, H). Level 2 is a softmax over
    the members of one cluster with the item output vectors (I, H). A label costs
    O((|V| + |C| + max cluster size) * H): no |I|-sized tensor is built in training.

    ``assign`` (I,) gives each item's cluster (dense ids, none empty; clusters.py). With
    ``sparse_grad`` the item vectors get a sparse gradient (rows of the labels' clusters only),
    which needs a sparse-capable optimizer (torch.optim.SparseAdam / SGD).

    ``correction`` > 0 adds a ClusterCorrection of that width to level 1 (P(c | h) = softmax of
    h . e_c + g_c(h)). It is not trained with the likelihood: it starts at zero (the paper's level 1)
    and is fitted to the trained level 2 afterwards (training/level1_fit.py).

    ``refine`` = M > 0 (needs a correction) replaces g_c(h) by the exact log Z_c(h), the repeat bias
    included, at the M item clusters level 1 ranks highest: those clusters' level-1 logits become
    their mass under the joint scores, h . e_c + log Z_c(h), where g's error costs most (it
    underestimates the user's top cluster: docs/quality_notes.md section 5). Level 1 stays a
    distribution over clusters computed from h (and the history, as level 2 is), level 2 a softmax
    within each cluster, so Structure stays exact; a query pays M clusters' members' dot products,
    which Structure scores first anyway. The likelihood and the fit never use it (inference only:
    item_log_probs, the decoders); training/level1_fit.refine_checkpoint chooses M by validation.
    """

    def __init__(self, n_items: int, hidden: int, text_weight: Callable[[], torch.Tensor] | None,
                 assign, sparse_grad: bool = False, correction: int = 0, refine: int = 0):
        super().__init__()
        if refine < 0 or (refine and not correction):
            raise ValueError(f"refine must be >= 0 and needs a correction (level 1 h . e_c + g_c(h)), got {refine}")
        assign = torch.as_tensor(assign, dtype=torch.long)
        if assign.shape != (n_items,):
            raise ValueError(f"cluster assignment covers {tuple(assign.shape)} items, the head {n_items}")
        sizes = torch.bincount(assign)
        if assign.min() < 0 or (sizes == 0).any():
            raise ValueError("cluster ids must be dense 0..C-1 with no empty cluster")
        self.item_out = nn.Parameter(torch.randn(n_items, hidden) * 0.02)  # (I, H)
        self.centroids = nn.Parameter(torch.randn(len(sizes), hidden) * 0.02)  # (C, H)
        self._text_weight = text_weight
        self.sparse_grad = sparse_grad
        self.correction = ClusterCorrection.frozen(hidden, len(sizes), correction) if correction else None
        self.refine = min(refine, len(sizes))
        order = torch.argsort(assign, stable=True)  # items grouped by cluster
        pos = torch.empty_like(assign)
        offsets = torch.cumsum(sizes, 0) - sizes  # (C,) first slot of each cluster in `order`
        pos[order] = torch.arange(n_items) - offsets[assign[order]]
        # derived from the cluster file, which the checkpoint stores: not weights
        self.register_buffer("assign", assign, persistent=False)  # (I,)
        self.register_buffer("order", order, persistent=False)  # (I,) members of c: order[offsets[c]:+sizes[c]]
        self.register_buffer("offsets", offsets, persistent=False)  # (C,)
        self.register_buffer("sizes", sizes, persistent=False)  # (C,)
        self.register_buffer("pos", pos, persistent=False)  # (I,) rank of each item inside its cluster

    @property
    def n_items(self) -> int:
        return self.item_out.shape[0]

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def n_text(self) -> int:
        return 0 if self._text_weight is None else self._text_weight().shape[0]

    def members(self, c: int) -> torch.Tensor:
        """Item indices of cluster c."""
        start = int(self.offsets[c])
        return self.order[start:start + int(self.sizes[c])]

    def item_vectors(self) -> torch.Tensor:
        """(I, H) e_c(t) + e_t: log P(t | h) = h . this - log Z_1(h) - log Z_c(t)(h) (used by ANN)."""
        return self.item_out + self.centroids[self.assign]

    @torch.no_grad()
    def set_item_vectors(self, vectors: torch.Tensor) -> None:
        """Start both levels from given item vectors v (I, H) (a trained SASRec's, item_init.py):
        each centroid e_c = the mean of its members' v, each item's e_t = v_t - e_c(t). Then
        e_c(t) + e_t = v_t, so the joint score h . (e_c + e_t) (ANN's) is the given geometry, the
        within-cluster softmax is that of v (it ignores a shift shared by a cluster), and level 1
        starts from each cluster's mean score instead of random centroids."""
        v = vectors.to(self.item_out)  # (I, H)
        sums = torch.zeros_like(self.centroids).index_add_(0, self.assign, v)  # (C, H)
        self.centroids.copy_(sums / self.sizes[:, None].to(v))
        self.item_out.copy_(v - self.centroids[self.assign])

    def item_cluster_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, H) -> (N, C) level-1 logits of the item clusters: h . e_c (+ g_c(h))."""
        item = h @ self.centroids.T  # (N, C)
        return item if self.correction is None else item + self.correction(h).to(item.dtype)

    def cluster_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, H) -> (N, V + C) level-1 logits, text tokens first (two matmuls: no weight concat)."""
        item = self.item_cluster_logits(h)  # (N, C)
        if self._text_weight is None:
            return item
        return torch.cat([h @ self._text_weight().T, item], dim=1)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, bias: ItemBias | None = None) -> torch.Tensor:
        """h (N, H), targets (N,) item indices -> summed cross-entropy of both levels. ``bias``
        (label, item, value) triples: values added to those items' level-2 logits at those labels
        (the repeat bias, models/repeat_bias.py); only the triples whose item shares the label's
        cluster enter this loss, the only level-2 softmax a label computes."""
        cl = self.cluster_logits(h).float()  # (N, V + C)
        c = self.assign[targets]  # (N,)
        loss = F.cross_entropy(cl, c + (cl.shape[1] - self.n_clusters), reduction="sum")
        size = self.sizes[c]  # (N,)
        slot = torch.arange(int(size.max()), device=h.device)  # (S,) S = largest cluster among labels
        valid = slot[None] < size[:, None]  # (N, S)
        idx = (self.offsets[c][:, None] + slot[None]).clamp(max=self.n_items - 1)
        within = _GatherDot.apply(h, self.item_out, self.order[idx], self.sparse_grad).float()  # (N, S)
        if bias is not None:
            label, item, value = bias
            same = self.assign[item] == c[label]  # (P,) the item is in its label's cluster
            within = within.index_put((label[same], self.pos[item[same]]), value[same].to(within.dtype),
                                      accumulate=True)
        within = within.masked_fill(~valid, float("-inf"))
        return loss + F.cross_entropy(within, self.pos[targets], reduction="sum")

    # an item bias enters its cluster's level-2 softmax: the other members of that cluster move too
    bias_renormalises = True

    def with_item_bias(self, log_probs: torch.Tensor, bias: ItemBias) -> torch.Tensor:
        """log_probs (B, I) = log P(t | h) -> log P(c(t) | h) + log softmax over the members u of
        c(t) of (h . e_u + b_u): ``bias`` (row, item, value) triples b added to level-2 logits, each
        cluster holding a biased item renormalised (a level-2 softmax is over its cluster only).
        Needs nothing but the log-probabilities: within c, h . e_u - log Z_c = log P(u) - log P(c),
        so the new log-probability is log P(t) + b_t - logsumexp_{u in c}(log P(u) + b_u) +
        logsumexp_{u in c} log P(u). Not in place. A refining head's level 1 depends on the bias
        too, which the log-probabilities do not hold: item_log_probs(h, bias) instead."""
        row, item, value = bias
        if not len(row):
            return log_probs
        if self.refine:
            raise ValueError("a refining two-level head takes its item bias in item_log_probs(h, bias)")
        biased = log_probs.index_put((row, item), value.to(log_probs.dtype), accumulate=True)  # (B, I)
        # (B, C) the change of each cluster's log-mass; exactly 0 where no member is biased
        shift = self._cluster_logsumexp(biased) - self._cluster_logsumexp(log_probs)
        return biased - shift[:, self.assign]

    def _cluster_logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, I) -> (B, C) logsumexp over each cluster's members."""
        a = self.assign.expand_as(x)
        m = torch.full((x.shape[0], self.n_clusters), float("-inf"), device=x.device, dtype=x.dtype)
        m = m.scatter_reduce(1, a, x, reduce="amax")  # (B, C) per-cluster max
        z = torch.zeros_like(m).scatter_add_(1, a, torch.exp(x - m.gather(1, a)))
        return m + torch.log(z)

    def cluster_log_normalizers(self, h: torch.Tensor, il: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, H) -> (B, C) log Z_c(h) = logsumexp over members t of c of h . e_t (brute force);
        ``il`` (B, I) = h . e_t when the caller has it already."""
        if il is None:
            il = (h @ self.item_out.T).float()  # (B, I)
        return self._cluster_logsumexp(il)

    def item_log_probs(self, h: torch.Tensor, bias: ItemBias | None = None) -> torch.Tensor:
        """h (B, H) -> (B, I) log P(item | h), normalised over V u I (brute force: the reference);
        with ``bias`` (row, item, value) triples, those values in the level-2 logits. A refining
        head's level 1 depends on them, so they enter before it; otherwise with_item_bias
        renormalises the biased clusters afterwards (equal up to float rounding, and the path every
        unrefined row was measured with)."""
        if bias is not None and len(bias[0]) and not self.refine:
            return self.with_item_bias(self._log_probs(h)[1], bias)
        return self._log_probs(h, bias)[1]

    def _log_probs(self, h: torch.Tensor, bias: ItemBias | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, H) -> log P of level 1 (B, V + C), text tokens first, and of every item (B, I)."""
        il = (h @ self.item_out.T).float()  # (B, I)
        if bias is not None and len(bias[0]):
            il = il.index_put(bias[:2], bias[2].to(il.dtype), accumulate=True)
        log_zc = self.cluster_log_normalizers(h, il)  # (B, C)
        cl = self.cluster_logits(h).float()  # (B, V + C)
        if self.refine:
            cl = torch.cat([cl[:, :-self.n_clusters], self.refined(h, cl[:, -self.n_clusters:], log_zc)], dim=1)
        lc = torch.log_softmax(cl, dim=1)  # (B, V + C)
        return lc, (lc[:, -self.n_clusters:] - log_zc)[:, self.assign] + il

    def refined(self, h: torch.Tensor, level1: torch.Tensor, log_zc: torch.Tensor,
                top: torch.Tensor | None = None) -> torch.Tensor:
        """level1 (B, C) item-cluster logits h . e_c + g_c(h) -> the same with h . e_c + log Z_c(h)
        at each row's ``refine`` highest clusters; ``log_zc`` (B, C), or (B, M) at ``top`` (B, M)
        when the caller computed only those. Not in place."""
        if top is None:
            top = torch.topk(level1, self.refine, dim=1).indices  # (B, M)
            log_zc = log_zc.gather(1, top)
        exact = (h @ self.centroids.T).float().gather(1, top) + log_zc  # (B, M)
        return level1.scatter(1, top, exact)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, H) -> (B, V + I) log P over text tokens and items, text first (sums to 1)."""
        cl, items = self._log_probs(h)
        return torch.cat([cl[:, :cl.shape[1] - self.n_clusters], items], dim=1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, V + I): log-probabilities, whose softmax is P(t | h) as FullSoftmaxHead's logits' is."""
        return self.log_probs(h)
