"""Top-k over the catalog from query states: ``topk(query, k, exclude) -> (scores, ids)``.

``ExactTopK`` scores every item (the reference every faster decoder is tested against)."""

from __future__ import annotations

import numpy as np
import torch

from itemgen.recommender import Recommender


def check_k(k: int, n_items: int) -> None:
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be between 1 and the catalog size {n_items}, got {k}")


def mask_items(scores: torch.Tensor, exclude: list[np.ndarray] | None) -> torch.Tensor:
    """Set excluded items (e.g. each user's history) to -inf; scores (B, I)."""
    if exclude is None:
        return scores
    scores = scores.clone()
    for b, ex in enumerate(exclude):
        if len(ex):
            scores[b, torch.as_tensor(np.asarray(ex, dtype=np.int64), device=scores.device)] = float("-inf")
    return scores


class ExactTopK:
    name = "exact"

    def __init__(self, model: Recommender, **_):  # ignores checkpoint_dir etc., like the others
        self.model = model

    @torch.inference_mode()
    def topk(self, query: torch.Tensor, k: int, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k, self.model.n_items)
        scores = mask_items(self.model.score_items(query), exclude)  # (B, I)
        return torch.topk(scores, k, dim=1)


class BeamTopK:
    """Trie-constrained beam search for models that write items as token sequences (titles,
    semantic IDs; generative.py): ``query`` is the prompt batch their ``encode`` returns."""

    name = "beam"
    cutoff = 20  # evaluate_decoder asks for at most this many items: Recall/NDCG@<=20 stay exact

    def __init__(self, model: Recommender, num_beams: int | None = None, **_):
        if not hasattr(model, "beam_topk"):
            raise ValueError(f"decoder 'beam' needs a model that generates items token by token "
                             f"(title, semantic_id), not {model.name!r}")
        self.model, self.num_beams = model, num_beams

    @torch.inference_mode()
    def topk(self, query, k: int, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k, self.model.n_items)
        return self.model.beam_topk(query, k, exclude, self.num_beams)


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
        from itemgen.heads import TwoLevelHead

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
    def topk(self, query: torch.Tensor, k: int, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
        from itemgen.heads import _GatherDot

        check_k(k, self.model.n_items)
        head = self.head
        h = query.to(head.item_out.dtype)  # (B, H)
        B, C, dev = h.shape[0], head.n_clusters, h.device
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


def _ann(model: Recommender, **kwargs):
    from itemgen.ann import AnnTopK

    return AnnTopK(model, **kwargs)


DECODERS = {"exact": ExactTopK, "beam": BeamTopK, "structure": StructureTopK, "ann": _ann}


def _l2d(kind: str):
    def make(model: Recommender, **kwargs):
        from itemgen.l2d import L2DTopK  # l2d.py imports this module

        return L2DTopK(model, kind=kind, **kwargs)
    return make


DECODERS.update(l2d_global=_l2d("global"), l2d_local=_l2d("local"))  # latent-space decoding (l2d.py)


def make_decoder(name: str, model: Recommender, **kwargs):
    if name not in DECODERS:
        raise ValueError(f"decoder {name!r} is not available for this model (available: {', '.join(DECODERS)})")
    return DECODERS[name](model, **kwargs)
