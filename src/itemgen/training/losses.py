"""Sampled ranking losses for large catalogs, with bias correction (arXiv 2410.06371; method.md 7).

Instead of scoring all I items at every label, a batch draws N negatives once (with replacement,
from a uniform or popularity proposal q) and every label in the batch is scored against the
same N items: the scores are (M, N), never (M, I).

What "correction" means for each loss (``loss.correction``):

- ``sampled_softmax``: logQ correction. A negative's logit becomes s_j - log(N q_j), so the
  partition estimate exp(s_p) + sum_j exp(s_j) / (N q_j) is unbiased for the full softmax's
  (accidental hits of the positive are removed). Uncorrected: the raw sampled logits.
- ``warp`` and ``lambdarank``: the positive's rank is estimated from the sampled negatives that
  outscore it. Corrected: each violation counts w_j = 1 / (N q_j) items, which scales the count
  to the catalog and, for popularity sampling, importance-weights it, so E[rank] equals the
  true number of items that outscore the positive (``estimated_rank``). Uncorrected: the plain
  count among the N samples, i.e. the rank within the sample (biased low by about N / I, and
  towards popular items under popularity sampling). Pair weights w_j also make the summed loss
  an unbiased estimate of the full-catalog loss at the given rank estimate.

WARP (Weston et al. 2011): L(rank) * mean hinge over violators, L(r) = sum_{j<=r} 1/j, extended
to real r as digamma(r + 1) + Euler's gamma. LambdaRank: pairwise logistic loss between the
positive and each negative, weighted by |delta NDCG| of swapping their (estimated) ranks.

Every function returns the SUM over labels (the train loop divides by the global label count).
For ItemLM the sampled path ranks items only: text tokens, which the full head also normalises
over, are left out. Negatives come from torch's global RNG, which checkpoints save for --resume.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from itemgen.core.config import LossConfig

EULER_GAMMA = 0.5772156649015329
KINDS = ("sampled_softmax", "warp", "lambdarank")


# ---- samplers ----------------------------------------------------------------------------
class UniformSampler:
    name = "uniform"

    def __init__(self, n_items: int):
        if n_items < 1:
            raise ValueError("sampler needs at least one item")
        self.n_items = n_items

    def probs(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-draw probability q of each id, same shape as ids."""
        return torch.full(ids.shape, 1.0 / self.n_items, device=ids.device)

    def sample(self, n: int, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (n,) drawn with replacement, q (n,)."""
        ids = torch.randint(self.n_items, (n,), device=device, generator=generator)
        return ids, self.probs(ids)


class PopularitySampler:
    """q_i proportional to (count_i + 1): every item keeps a non-zero probability, which the
    importance weights 1 / q need to stay unbiased."""

    name = "popularity"

    def __init__(self, counts):
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or len(counts) < 1 or (counts < 0).any():
            raise ValueError("popularity sampler needs a 1-d array of non-negative item counts")
        self.n_items = len(counts)
        self._q = torch.as_tensor((counts + 1.0) / (counts + 1.0).sum(), dtype=torch.float32)  # (I,)

    def _on(self, device) -> torch.Tensor:
        if self._q.device != torch.device(device):
            self._q = self._q.to(device)
        return self._q

    def probs(self, ids: torch.Tensor) -> torch.Tensor:
        return self._on(ids.device)[ids]

    def sample(self, n: int, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._on(device)
        ids = torch.multinomial(q, n, replacement=True, generator=generator)
        return ids, q[ids]


def item_counts(seqs, n_items: int) -> np.ndarray:
    """(I,) occurrences of each item in the training sequences (the popularity proposal)."""
    seqs = [np.asarray(s, dtype=np.int64) for s in seqs if len(s)]
    if not seqs:
        return np.zeros(n_items, dtype=np.int64)
    return np.bincount(np.concatenate(seqs), minlength=n_items)[:n_items]


class AllItems:
    """Every item once, q = 1/I (``loss.negatives`` is ignored): the sampled losses then take their
    exact full-catalog form, the reference a sampled run is compared with (I-sized, so not for
    large catalogs)."""

    name = "all"

    def __init__(self, n_items: int):
        self.n_items = n_items

    def sample(self, n: int, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return full_catalog_negatives(self.n_items, device)


def make_sampler(kind: str, n_items: int, counts=None):
    if kind == "uniform":
        return UniformSampler(n_items)
    if kind == "all":
        return AllItems(n_items)
    if kind == "popularity":
        if counts is None:
            raise ValueError("loss.sampler=popularity needs item counts from the training split")
        if len(counts) != n_items:
            raise ValueError(f"item counts cover {len(counts)} items, the catalog has {n_items}")
        return PopularitySampler(counts)
    raise ValueError(f"unknown sampler {kind!r} (known: uniform, popularity, all)")


# ---- the losses, on given negatives --------------------------------------------------------
def _weights(q: torch.Tensor, correction: bool) -> torch.Tensor:
    """(N,) items each sampled negative stands for: 1 / (N q) corrected, 1 uncorrected."""
    return 1.0 / (q.numel() * q) if correction else torch.ones_like(q)


def estimated_rank(s_pos: torch.Tensor, s_neg: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                   margin: float = 0.0) -> torch.Tensor:
    """How many items outscore the positive (by ``margin``), estimated from samples.
    s_pos (M,), s_neg (M, N), weights (N,) or (M, N), valid (M, N) false at accidental hits -> (M,)."""
    viol = (s_neg + margin > s_pos[:, None]) & valid  # (M, N)
    return (viol.to(weights.dtype) * weights).sum(1)


def harmonic(r: torch.Tensor) -> torch.Tensor:
    """L(r) = sum_{j<=r} 1/j for integer r >= 0, smoothly extended to real r."""
    return torch.digamma(r + 1.0) + EULER_GAMMA


def sampled_softmax(s_pos, s_neg, q, valid, correction: bool = True) -> torch.Tensor:
    """s_pos (M,), s_neg (M, N), q (N,), valid (M, N) -> summed cross-entropy."""
    adj = torch.log(q.numel() * q) if correction else torch.zeros_like(q)  # (N,)
    neg = (s_neg - adj[None]).masked_fill(~valid, float("-inf"))  # (M, N)
    logits = torch.cat([s_pos[:, None], neg], dim=1)  # (M, 1 + N)
    return (torch.logsumexp(logits, dim=1) - s_pos).sum()


def warp(s_pos, s_neg, q, valid, correction: bool = True, margin: float = 1.0) -> torch.Tensor:
    """Sampled-batch WARP: L(rank) / rank * sum_j w_j hinge_j = L(rank) * mean violator hinge."""
    w = _weights(q, correction)  # (N,)
    hinge = F.relu(margin + s_neg - s_pos[:, None]) * valid  # (M, N)
    with torch.no_grad():
        rank = estimated_rank(s_pos, s_neg, w, valid, margin)  # (M,)
        scale = torch.where(rank > 0, harmonic(rank) / rank.clamp(min=1e-12), torch.zeros_like(rank))
    return (scale * (hinge * w[None]).sum(1)).sum()


def lambdarank(s_pos, s_neg, q, valid, correction: bool = True) -> torch.Tensor:
    """Sampled-batch LambdaRank for one relevant item: sum_j w_j |dNDCG_j| log(1 + e^(s_j - s_p)),
    with the positive's and each negative's catalog rank estimated from the weighted samples."""
    w = _weights(q, correction)  # (N,)
    with torch.no_grad():
        rank_pos = 1.0 + estimated_rank(s_pos, s_neg, w, valid)  # (M,)
        # a negative's rank: weighted count of sampled negatives above it (+1 if the positive is)
        order = torch.argsort(s_neg.masked_fill(~valid, float("-inf")), dim=1, descending=True)  # (M, N)
        wv = (w[None] * valid)  # (M, N)
        w_sorted = torch.gather(wv, 1, order)
        above_sorted = torch.cumsum(w_sorted, dim=1) - w_sorted  # exclusive prefix sum
        above = torch.empty_like(above_sorted).scatter_(1, order, above_sorted)  # (M, N)
        rank_neg = 1.0 + above + (s_pos[:, None] > s_neg).to(above.dtype)
        gain = lambda r: 1.0 / torch.log2(1.0 + r)  # noqa: E731 - NDCG of a single relevant item at rank r
        delta = (gain(rank_pos)[:, None] - gain(rank_neg)).abs()  # (M, N)
    pair = F.softplus(s_neg - s_pos[:, None])  # (M, N) logistic loss of ordering positive first
    return (delta * w[None] * pair * valid).sum()


LOSSES = {"sampled_softmax": sampled_softmax, "warp": warp, "lambdarank": lambdarank}


def ranking_loss(kind: str, s_pos, s_neg, q, valid, correction: bool = True, margin: float = 1.0):
    if kind == "warp":
        return warp(s_pos, s_neg, q, valid, correction, margin)
    if kind in LOSSES:
        return LOSSES[kind](s_pos, s_neg, q, valid, correction)
    raise ValueError(f"unknown sampled loss {kind!r} (known: {', '.join(KINDS)})")


# ---- the model-facing entry point ----------------------------------------------------------
class SampledLoss:
    """Called by a model with the final states at label positions instead of its full CE.
    Not an nn.Module: it holds no weights, so checkpoints are the same with any loss."""

    def __init__(self, cfg: "LossConfig", n_items: int, counts=None):
        if cfg.kind not in KINDS:
            raise ValueError(f"loss.kind={cfg.kind!r} is not a sampled loss (known: {', '.join(KINDS)})")
        self.cfg = cfg
        self.sampler = make_sampler(cfg.sampler, n_items, counts)

    def __call__(self, h: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor,
                 negatives: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """h (M, D) states at label positions, targets (M,) item indices, item_weight (I, D)
        output vectors -> summed loss. Only the M targets' and N negatives' rows are read."""
        c = self.cfg
        neg, q = negatives if negatives is not None else self.sampler.sample(c.negatives, h.device)  # (N,)
        h = h.float()
        s_pos = (h * item_weight[targets].float()).sum(-1)  # (M,)
        s_neg = h @ item_weight[neg].float().T  # (M, N)
        valid = neg[None] != targets[:, None]  # (M, N) drop accidental hits of the positive
        return ranking_loss(c.kind, s_pos, s_neg, q.float(), valid, c.correction, c.margin)


def attach_loss(model, cfg: "LossConfig", counts=None) -> None:
    """Give ``model`` the sampled loss of ``cfg`` (or none for loss.kind=full)."""
    model.sampled_loss = None if cfg.kind == "full" else SampledLoss(cfg, model.n_items, counts)
    model.exclude_history = cfg.exclude_history


def full_catalog_negatives(n_items: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item once with q = 1/I: with correction the sampled losses become their exact
    full-catalog forms (the reference the sampled path is tested against)."""
    ids = torch.arange(n_items, device=device)
    return ids, torch.full((n_items,), 1.0 / n_items, device=device)

