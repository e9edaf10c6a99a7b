"""Full-catalog evaluation: every test (or validation) user scores every item; metrics come
from the target's rank alone (metrics.py)."""

from __future__ import annotations

import time

import numpy as np
import torch

from itemgen.core.progress import Progress
from itemgen.data.dataset import Example
from itemgen.evaluation.metrics import diversity, ranking_metrics, target_ranks
from itemgen.evaluation.segments import segment_metrics
from itemgen.models.recommender import Recommender
from itemgen.topk.exact import mask_items
from itemgen.topk.factory import make_decoder

TOP = 10  # top-k lists kept per user for the collapse check (metrics.diversity)


@torch.inference_mode()
def rank_examples(model: Recommender, examples: list[Example], *, max_history: int, batch_size: int = 128,
                  exclude_history: bool = False, absent: torch.Tensor | None = None) -> np.ndarray:
    """-> (n,) rank of each example's target among all items (1 = best, ties against).
    ``absent`` (I,) bool: items left out of every ranking (e.g. a cold split's new items, which do
    not exist yet at validation time; never a target here)."""
    if getattr(model, "default_decoder", "exact") != "exact":  # no full-catalog scores (beam search)
        if absent is not None:
            raise ValueError(f"{model.name} ranks with {model.default_decoder}: it cannot leave items out")
        return decoder_ranks(model, make_decoder(model.default_decoder, model), examples,
                             max_history=max_history, batch_size=batch_size, exclude_history=exclude_history)
    return rank_and_top(model, examples, max_history=max_history, batch_size=batch_size,
                        exclude_history=exclude_history, k=0, absent=absent)[0]


@torch.inference_mode()
def rank_and_top(model: Recommender, examples: list[Example], *, max_history: int, batch_size: int = 128,
                 exclude_history: bool = False, k: int = TOP, progress: bool = False,
                 absent: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> ranks (n,) as rank_examples (``absent`` as there), and each example's top-k items (n, k),
    best first. ``progress``: report users done (core/progress.py; off for validation inside training)."""
    was_training = model.training
    model.eval()
    k = min(k, model.n_items)
    ranks = np.zeros(len(examples), dtype=np.int64)
    top = np.zeros((len(examples), k), dtype=np.int64)
    # similar lengths together: less padding in the LM's forward pass
    order = sorted(range(len(examples)), key=lambda i: min(len(examples[i].history), max_history))
    tracker = Progress("evaluate", len(examples), unit="user", quiet=None if progress else True)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        hist = [examples[i].history[-max_history:] for i in idx]
        scores = model.scores(hist)  # (B, I)
        if exclude_history:
            scores = mask_items(scores, [examples[i].history for i in idx])
        if absent is not None:
            scores = scores.masked_fill(absent.to(scores.device), float("-inf"))
        targets = torch.as_tensor([examples[i].target for i in idx], device=scores.device)
        ranks[idx] = target_ranks(scores, targets).cpu().numpy()
        if k:
            top[idx] = scores.topk(k, dim=1).indices.cpu().numpy()
        tracker.update(len(idx))
    tracker.close()
    model.train(was_training)
    return ranks, top


def evaluate(model: Recommender, examples: list[Example], *, max_history: int, batch_size: int = 128,
             exclude_history: bool = False, progress: bool = True,
             segments: dict[str, np.ndarray] | None = None) -> dict:
    """Metrics over all ``examples``; with ``segments`` (segments.py masks over them) also each
    segment's metrics, under ``"segments"``."""
    if getattr(model, "default_decoder", "exact") != "exact":
        return evaluate_decoder(model, make_decoder(model.default_decoder, model), examples,
                                max_history=max_history, batch_size=batch_size, exclude_history=exclude_history,
                                progress=progress, segments=segments)
    t0 = time.perf_counter()
    ranks, top = rank_and_top(model, examples, max_history=max_history, batch_size=batch_size,
                              exclude_history=exclude_history, progress=progress)
    out = {**ranking_metrics(ranks), **diversity(top)}
    if segments is not None:
        out["segments"] = segment_metrics(ranks, segments)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed subset (same every evaluation) for validation during training."""
    if n is None or n >= len(examples):
        return examples
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
    return [examples[i] for i in idx]


@torch.inference_mode()
def evaluate_decoder(model: Recommender, decoder, examples: list[Example], *, max_history: int,
                     batch_size: int = 128, exclude_history: bool = False, cutoff: int = 100,
                     progress: bool = True, segments: dict[str, np.ndarray] | None = None) -> dict:
    """Metrics for decoders that return a top-k list only (structure, ANN, beam search): a target
    outside the top ``cutoff`` gets rank cutoff + 1, so Recall/NDCG at K <= 20 are exact and MRR
    is MRR@cutoff, to which such a target adds 0 (``mrr_cutoff`` in the result; a decoder's own ``cutoff`` attribute,
    e.g. beam search's, lowers it). ``segments`` as in :func:`evaluate`."""
    t0 = time.perf_counter()
    k = min(cutoff, getattr(decoder, "cutoff", cutoff), model.n_items)
    top = np.zeros((len(examples), min(TOP, k)), dtype=np.int64)
    ranks = decoder_ranks(model, decoder, examples, max_history=max_history, batch_size=batch_size,
                          exclude_history=exclude_history, cutoff=k, top_out=top, progress=progress)
    out = {**ranking_metrics(ranks, mrr_cutoff=k), **diversity(top)}  # rank k + 1: not in the top k
    if segments is not None:
        out["segments"] = segment_metrics(ranks, segments, mrr_cutoff=k)
    out["mrr_cutoff"] = k
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


@torch.inference_mode()
def decoder_ranks(model: Recommender, decoder, examples: list[Example], *, max_history: int,
                  batch_size: int = 128, exclude_history: bool = False, cutoff: int = 100,
                  top_out: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """-> (n,) rank of each target in the decoder's top-k (k = cutoff); cutoff + 1 outside it.
    ``top_out`` (n, k'), if given, receives each example's first k' items; ``progress`` as rank_and_top."""
    was_training = model.training
    model.eval()
    k = min(cutoff, getattr(decoder, "cutoff", cutoff), model.n_items)
    ranks = np.full(len(examples), k + 1, dtype=np.int64)
    order = sorted(range(len(examples)), key=lambda i: min(len(examples[i].history), max_history))
    tracker = Progress(f"evaluate {type(decoder).__name__}", len(examples), unit="user",
                       quiet=None if progress else True)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        hist = [examples[i].history[-max_history:] for i in idx]
        query = model.encode_histories(hist)  # (B, D); ItemLM: the packed path
        _, top = decoder.topk(query, k, exclude=[examples[i].history for i in idx] if exclude_history else None,
                              histories=model.decode_histories(hist, exclude_history))
        top = top.cpu().numpy()
        if top_out is not None:
            top_out[idx] = top[:, :top_out.shape[1]]
        for row, i in enumerate(idx):
            hit = np.flatnonzero(top[row] == examples[i].target)
            if hit.size:
                ranks[i] = hit[0] + 1
        tracker.update(len(idx))
    tracker.close()
    model.train(was_training)
    return ranks
