"""Choosing the closed-item prior on validation (``items.closed_prior_search``).

A model with the text-match path scores an ID-closed item (a new item, one added by ``items
add``) by its text part alone, plus one logit, the prior (models/item_repr.py). The training loss
sets no useful value for it: new items are not in the training softmax (they do not exist yet
when the model trains), and the items ``items.id_dropout`` hides stand in for them only as a
share of each step's catalog, not at the rate new items are bought. Too low, and new items never
reach a top 10 (office cold10: NDCG@10 0.0016 on new-item targets, against 0.0507 for TF-IDF
text-kNN); too high, and they crowd out the warm items.

So the prior is chosen like any other setting, on validation, by NDCG@10 over all validation
users, at every validation during training (the best checkpoint keeps its own value). But
validation holds no new items: the cold-start protocol keeps them out of it, and they do not
exist yet at validation time (so a cold split's new items are left out of the validation ranking
here, ``absent``). New items are simulated instead: a random share of the trained items, the
probe (``items.closed_prior_probe``, drawn once), has its ID part closed during the search, so
each probe item is scored exactly as a new item with its text is, and the validation users whose
target is a probe item stand in for the users who buy a new item, at the rate a random share of
the catalog is bought. (The probe items' text did train the shared text map M, as every item's
did through items.id_dropout; their own text vectors are frozen, as a new item's are.)

One forward pass per batch serves the whole grid: the scores are computed once with the prior at
zero, and each value adds itself to the closed items' columns.
"""

from __future__ import annotations

import numpy as np
import torch

from itemgen.data.dataset import Example
from itemgen.evaluation.metrics import ranking_metrics, target_ranks
from itemgen.models.recommender import Recommender
from itemgen.topk.exact import mask_items

STEP = 0.25  # logits between two values of the grid


def prior_grid(search: float) -> np.ndarray:
    """(G,) the values tried: 0, STEP, ..., ``search`` (0 first: ties keep the smaller prior)."""
    if not search > 0:
        raise ValueError(f"closed_prior_search must be > 0, not {search}")
    return np.round(np.arange(0.0, search + STEP / 2, STEP), 6)


def probe_items(known: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """known (I,) bool items with an ID part -> (I,) bool: a random ``share`` of them (the probe)."""
    known = torch.as_tensor(known, dtype=torch.bool).cpu()
    idx = np.flatnonzero(known.numpy())
    pick = np.random.default_rng([seed, 0x9B0]).choice(idx, int(round(share * len(idx))), replace=False)
    out = torch.zeros_like(known)
    out[torch.from_numpy(pick)] = True
    return out


@torch.inference_mode()
def ranks_by_prior(model: Recommender, examples: list[Example], grid: np.ndarray, *, max_history: int,
                   batch_size: int = 128, exclude_history: bool = False, probe: torch.Tensor | None = None,
                   absent: torch.Tensor | None = None) -> np.ndarray:
    """-> (G, n) the rank of each example's target (1 = best, ties against, as rank_examples) when
    every ID-closed item's score is lifted by each prior of ``grid``. ``probe`` (I,) bool: items
    whose ID part is closed for this ranking too; ``absent`` (I,) bool: items left out of it
    (never a target here). The model's prior and ID gate are left as they were."""
    items = model.items
    if items.match is None:
        raise ValueError("the closed-item prior needs the text-match path (items.text_match)")
    was_training, before, known = model.training, float(items.closed_prior), items.id_known.clone()
    model.eval()  # first: in training, closed() would name the items id_dropout hides this step
    ranks = np.zeros((len(grid), len(examples)), dtype=np.int64)
    try:
        if probe is not None:
            items.set_known(known & ~probe.to(known.device))
        items.set_closed_prior(0.0)
        lift = items.closed().to(torch.float32)  # (I,) 1 on closed items (probe included)
        order = sorted(range(len(examples)), key=lambda i: min(len(examples[i].history), max_history))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            scores = model.scores([examples[i].history[-max_history:] for i in idx])  # (B, I) prior 0
            if exclude_history:
                scores = mask_items(scores, [examples[i].history for i in idx])
            if absent is not None:
                scores = scores.masked_fill(absent.to(scores.device), float("-inf"))
            targets = torch.as_tensor([examples[i].target for i in idx], device=scores.device)
            lift_ = lift.to(scores.device, scores.dtype)
            for g, value in enumerate(grid):
                ranks[g, idx] = target_ranks(scores + float(value) * lift_, targets).cpu().numpy()
    finally:
        items.set_known(known)
        items.set_closed_prior(before)
        model.train(was_training)
    return ranks


def best_prior(ranks: np.ndarray, grid: np.ndarray) -> tuple[float, dict]:
    """ranks (G, n) from :func:`ranks_by_prior` -> (the prior with the best NDCG@10, the first
    of equals; its metrics, with ``closed_prior`` added)."""
    scores = [ranking_metrics(r)["ndcg@10"] for r in ranks]
    g = int(np.argmax(scores))  # argmax keeps the first maximum: the smallest prior
    return float(grid[g]), {**ranking_metrics(ranks[g]), "closed_prior": float(grid[g])}
