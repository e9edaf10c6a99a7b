"""Choosing the lexical view's weights (and the closed-item prior with them) on validation.

A model with the lexical view (``items.lexical``, models/lexical.py) scores

    score(i | history) = s_i + prior * closed_i + w(b_i) * u_i . q + beta(b_i)

s_i its trained scores, b_i the item's bucket (0 ID closed, 1 tail, 2 head), u_i . q the words'
cosine with the user's last items. None of w, beta or the prior is trained (closed_prior.py says
why the loss cannot set the prior; the same holds for a view the loss never sees), so every
validation chooses them, by NDCG@10 over all validation users, as the run evaluates
(train.eval_exclude_history). With ``items.closed_prior_search`` the probe of closed_prior.py
stands in for new items (its items are ID-closed there, so bucket 0) to choose the closed
bucket's weight and the prior; beta(head) = 0 and beta(closed) = 0 are the references the others
move against.

The search is coordinate ascent on fixed grids: each parameter in turn takes the grid value that
scores best with the others held, until a sweep changes nothing (SWEEPS caps it). The open buckets
are chosen on validation as it is, the closed bucket on the probe (``search`` says why). One forward
pass per batch serves it all: the trained scores s and the cosines u . q are computed once and
kept (8 bytes per validation user and item: train.eval_users bounds it), and every candidate is
an add and a compare over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from itemgen.data.dataset import Example
from itemgen.evaluation.metrics import ndcg_gains, ranking_metrics, target_ranks
from itemgen.models.lexical import BUCKETS
from itemgen.models.recommender import Recommender
from itemgen.topk.exact import mask_items

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # w(b): the words' cosine is in [-1, 1]
BIASES = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0)  # beta(tail), logits
SWEEPS = 3  # a cap: every sweep gains or stops


@dataclass
class ScoreParts:
    """What every candidate setting is computed from, for ``n`` examples in batches."""

    batches: list[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]  # (idx, s (B, I), u.q (B, I), targets (B,))
    closed: torch.Tensor  # (I,) float 1 on ID-closed items (the probe included)
    bucket: torch.Tensor  # (I,) long b_i
    n: int


@torch.inference_mode()
def score_parts(model: Recommender, examples: list[Example], *, max_history: int, batch_size: int = 128,
                exclude_history: bool = False, probe: torch.Tensor | None = None,
                absent: torch.Tensor | None = None) -> ScoreParts:
    """The trained scores with prior, w and beta at zero, and the lexical cosines, of every
    example (``probe``, ``absent`` as closed_prior.ranks_by_prior). The model is left as it was."""
    items = model.items
    lex = items.lexical
    if lex is None:
        raise ValueError("the lexical search needs the lexical view (items.lexical)")
    was_training, known = model.training, items.id_known.clone()
    before = float(items.closed_prior), lex.weight.clone(), lex.bias.clone()
    model.eval()
    try:
        if probe is not None:
            items.set_known(known & ~probe.to(known.device))
        items.set_closed_prior(0.0)
        lex.set_weights(torch.zeros(len(BUCKETS)), torch.zeros(len(BUCKETS)))
        closed = items.closed()  # (I,) bool, after the probe closed
        bucket = lex.buckets(~closed)
        u = lex.vectors  # (I, k)
        order = sorted(range(len(examples)), key=lambda i: min(len(examples[i].history), max_history))
        batches = []
        for start in range(0, len(order), batch_size):
            idx = np.asarray(order[start:start + batch_size])
            hist = [examples[i].history[-max_history:] for i in idx]
            s = model.scores(hist)  # (B, I) prior, w and beta at zero
            if exclude_history:
                s = mask_items(s, [examples[i].history for i in idx])
            if absent is not None:
                s = s.masked_fill(absent.to(s.device), float("-inf"))
            cos = items.match.history_means(u, hist).to(u.dtype) @ u.T  # (B, I) u_i . q
            batches.append((idx, s.float(), cos.float(), torch.as_tensor([examples[i].target for i in idx],
                                                                           device=s.device)))
    finally:
        items.set_known(known)
        items.set_closed_prior(before[0])
        lex.set_weights(before[1], before[2])
        model.train(was_training)
    if len(batches) > 1:  # one table: every candidate is then a few whole-table ops, not a loop of
        # small ones (the warm-floor rule scores ~500 candidates: Python overhead dominated)
        batches = [(np.concatenate([b[0] for b in batches]), *(torch.cat([b[j] for b in batches]) for j in (1, 2, 3)))]
    return ScoreParts(batches, closed.float(), bucket, len(examples))


def ranks_at(parts: ScoreParts, weight, bias, prior: float) -> np.ndarray:
    """-> (n,) each example's target rank (1 = best, ties against) under w (3,), beta (3,), prior."""
    w = torch.as_tensor(weight, dtype=torch.float32)[parts.bucket]  # (I,)
    c = torch.as_tensor(bias, dtype=torch.float32)[parts.bucket] + prior * parts.closed  # (I,)
    ranks = np.zeros(parts.n, dtype=np.int64)
    for idx, s, cos, targets in parts.batches:
        ranks[idx] = target_ranks(torch.addcmul(s + c, cos, w), targets).cpu().numpy()
    return ranks


def _ndcg_sum(ranks: np.ndarray) -> float:
    return float(ndcg_gains(ranks).sum())


def _ascend(parts: ScoreParts, state: dict, coords: list, reduce) -> None:
    """Coordinate ascent in place on ``state`` ({"weight", "bias", "prior": [value]}) over
    ``coords`` [(name, index, grid)] until a sweep changes nothing (SWEEPS at most)."""
    for _ in range(SWEEPS):
        changed = False
        for name, b, grid in coords:
            now = state[name][b]
            sums = []
            for value in grid:
                state[name][b] = value
                sums.append(_ndcg_sum(ranks_at(parts, state["weight"], state["bias"], state["prior"][0])))
            sums = reduce(np.asarray(sums))
            best = grid[int(np.argmax(sums))]  # the first of equals
            current = sums[grid.index(now)] if now in grid else -np.inf
            state[name][b] = best if sums.max() > current else now  # move only for a strict gain
            changed |= state[name][b] != now
        if not changed:
            return


def search(parts: ScoreParts, probe_parts: ScoreParts | None = None, prior_grid: np.ndarray | None = None,
           prior: float = 0.0, reduce: Callable[[np.ndarray], np.ndarray] = lambda x: x,
           warm_floor: float | None = None, reference: np.ndarray | None = None,
           tail_floor: bool = False, tail_reference: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """-> (the chosen {"weight", "bias", "prior"}, the ranks there: on ``probe_parts`` when given).

    The open buckets first, w(tail), w(head), beta(tail), on ``parts``: the catalog as it is
    (its ID-closed items are the items training never saw). Then, with ``probe_parts`` (the same
    examples with the probe's ID part closed), the closed bucket, w(closed) and (with
    ``prior_grid``) the prior, the open buckets held: the probe stands in for new items only
    where new items are scored. Closing a tenth of the catalog to score it by text also moves the
    open buckets' best weights (office: w(tail) 2 with the probe, 6 without it, where tail
    validation targets score 0.0236 and 0.0454), so those are not chosen on it. Without
    ``probe_parts`` every coordinate is searched on ``parts``. ``reduce`` sums per-candidate NDCG
    sums over processes (distributed validation). ``warm_floor`` (with ``probe_parts``): the
    closed bucket by :func:`_warm_floor` instead of all users' NDCG@10, against ``reference``
    ranks when given. ``tail_floor``: the tail bucket by :func:`_tail_floor` after the ascent
    (``tail_reference``: its reference ranks of ``parts``' examples)."""
    state = {"weight": [0.0] * len(BUCKETS), "bias": [0.0] * len(BUCKETS), "prior": [float(prior)]}
    open_ = [("weight", 1, WEIGHTS), ("weight", 2, WEIGHTS), ("bias", 1, BIASES)]
    closed = [("weight", 0, WEIGHTS)] + ([("prior", 0, tuple(float(v) for v in prior_grid))]
                                         if prior_grid is not None else [])
    if probe_parts is None:
        _ascend(parts, state, open_ + closed, reduce)
    else:
        _ascend(parts, state, open_, reduce)
    if tail_floor:
        _tail_floor(parts, state, reduce, tail_reference)
    if probe_parts is not None:
        if warm_floor is None:
            _ascend(probe_parts, state, closed, reduce)
        else:
            _warm_floor(probe_parts, state, prior_grid, warm_floor, reduce, reference)
    chosen = {"weight": state["weight"], "bias": state["bias"], "prior": state["prior"][0]}
    return chosen, ranks_at(probe_parts or parts, chosen["weight"], chosen["bias"], chosen["prior"])


def _tail_floor(parts: ScoreParts, state: dict, reduce, reference: np.ndarray | None = None) -> None:
    """items.lexical_rule=tail_floor: the fused scores must rank tail targets (0-4 training
    interactions) at least as well as the lexical view alone does (u . q, the model's own text
    part) and as ``reference`` (n,) ranks them (TF-IDF text-kNN over the same words: the text
    baseline, sharper on words than 256 LSA dimensions). If the ascent's point does not,
    (w(tail), beta(tail)) move to the best all-user setting on their grid that does (w(head)
    held); none does: the best tail figure. On office validation the all-user optimum is flat
    there (0.0817 at w(tail) 6, 0.0815 where the tail passes)."""
    tail = np.zeros(parts.n, dtype=bool)
    lex_only = np.zeros(parts.n, dtype=np.int64)
    for idx, s, cos, targets in parts.batches:
        tail[idx] = (parts.bucket[targets.cpu()] <= 1).cpu().numpy()
        lex_only[idx] = target_ranks(torch.where(torch.isinf(s), s, cos), targets).cpu().numpy()  # masked stay out

    def sums(r: np.ndarray) -> np.ndarray:  # (2,) NDCG sums: all, tail
        g = ndcg_gains(r)
        return np.asarray([g.sum(), g[tail].sum()])

    floor = reduce(sums(lex_only))[1]
    if reference is not None:
        floor = max(floor, reduce(sums(reference))[1])
    weight, bias, prior = state["weight"], state["bias"], state["prior"][0]
    if reduce(sums(ranks_at(parts, weight, bias, prior)))[1] >= floor:
        return
    cands = [(w, b) for w in WEIGHTS for b in BIASES]
    got = reduce(np.stack([sums(ranks_at(parts, [weight[0], w, weight[2]], [bias[0], b, bias[2]], prior))
                           for w, b in cands]))  # (C, 2)
    ok = got[:, 1] >= floor
    pick = int(np.argmax(np.where(ok, got[:, 0], -np.inf))) if ok.any() else int(np.argmax(got[:, 1]))
    state["weight"][1], state["bias"][1] = cands[pick]


WITHOUT = -1e4  # a prior that puts every closed item below every other: "no new items in the catalog"


def _warm_floor(parts: ScoreParts, state: dict, prior_grid: np.ndarray | None, floor: float, reduce,
                reference: np.ndarray | None = None) -> None:
    """The closed bucket by the warm-floor rule (items.closed_prior_rule=warm_floor): of every
    (w(closed), prior) on the grid, the one that ranks the closed-target examples best (the probe's
    stand-ins for new-item buyers) while the other examples keep NDCG@10 >= ``floor`` times their
    reference figure: ``reference`` (n,) ranks of the same examples by another model (the ID
    model this one started from: items.closed_prior_floor_from), or this model's with no closed
    item in the ranking at all. Exhaustive: two coordinates, and the constraint would stall an
    ascent one coordinate at a time. None feasible: the best figure of the others."""
    priors = [float(v) for v in prior_grid] if prior_grid is not None else [state["prior"][0]]
    weight, bias = state["weight"], state["bias"]
    closed_target = np.zeros(parts.n, dtype=bool)
    for idx, _, _, targets in parts.batches:
        closed_target[idx] = parts.closed[targets.cpu()].cpu().numpy() > 0

    def sums(w: float, p: float) -> np.ndarray:  # (2,) NDCG sums: others, closed targets
        g = ndcg_gains(ranks_at(parts, [w, *weight[1:]], bias, p))
        return np.asarray([g[~closed_target].sum(), g[closed_target].sum()])

    ref = reduce(np.asarray([ndcg_gains(reference)[~closed_target].sum(), 0.0]) if reference is not None
                 else sums(0.0, WITHOUT))[0]
    cands = [(w, p) for w in WEIGHTS for p in priors]
    got = reduce(np.stack([sums(w, p) for w, p in cands]))  # (C, 2)
    ok = got[:, 0] >= floor * ref - 1e-9
    pick = int(np.argmax(np.where(ok, got[:, 1], -np.inf))) if ok.any() else int(np.argmax(got[:, 0]))
    state["weight"][0], state["prior"][0] = cands[pick]


def search_metrics(chosen: dict, all_ranks) -> dict:
    """Validation metrics at the chosen setting, with the setting itself (for logs and checkpoints)."""
    return {**ranking_metrics(all_ranks), "closed_prior": chosen["prior"],
            "lexical": {b: [chosen["weight"][i], chosen["bias"][i]] for i, b in enumerate(BUCKETS)}}
