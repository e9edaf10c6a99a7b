"""Evaluation segments: which users an evaluation row is about.

A model's average over all users hides where it wins. Text helps most where an ID model cannot
learn (issue 20): targets with few training interactions, users with short histories, and items
never seen in training. Every evaluation therefore also reports these groups of examples:

``pop:0``, ``pop:1-4``, ``pop:5-19``, ``pop:20+``
    the test target's number of TRAINING interactions: its occurrences in the training split
    (``Split.train``: every user's sequence less its validation and test items, the inputs and
    labels of training examples; the same counts as the popularity sampler of training/losses.py)
``tail`` / ``head``
    targets with at most TAIL_MAX (4) training interactions / the others
``hist:short`` / ``hist:long``
    examples whose history (the items before the target, before any max_history cut) has at most
    SHORT_HISTORY (5) items / more
``cold`` / ``warm``
    only for a dataset prepared with ``--cold-items``: targets that are new items (never in
    training or validation) / the others

Segments overlap (a user is in one pop bucket, one of tail/head, one of hist, ...); each is a
boolean mask over the evaluated examples, in their order, so per-user scores of two models on the
same examples pair up segment by segment (:func:`paired_by_segment`).
"""

from __future__ import annotations

import numpy as np

from itemgen.data.dataset import Example, SequenceDataset
from itemgen.evaluation.metrics import paired_difference, ranking_metrics

# (name, lowest count, highest count or None): the popularity buckets, by training interactions
POP_BUCKETS = (("pop:0", 0, 0), ("pop:1-4", 1, 4), ("pop:5-19", 5, 19), ("pop:20+", 20, None))
TAIL_MAX = 4  # tail: target with at most this many training interactions; head: more
SHORT_HISTORY = 5  # hist:short: at most this many history items; hist:long: more


def training_counts(ds: SequenceDataset) -> np.ndarray:
    """(I,) int64: each item's occurrences in the training split (inputs and labels)."""
    seqs = [np.asarray(s, dtype=np.int64) for s in ds.split.train if len(s)]
    if not seqs:
        return np.zeros(ds.n_items, dtype=np.int64)
    return np.bincount(np.concatenate(seqs), minlength=ds.n_items)[:ds.n_items]


def segment_rules(has_cold: bool) -> dict[str, str]:
    """Each segment's definition in words, for reports."""
    rules = {name: f"target with {lo}{'+' if hi is None else '' if hi == lo else f'-{hi}'} training interactions"
             for name, lo, hi in POP_BUCKETS}
    rules["tail"] = f"target with <= {TAIL_MAX} training interactions"
    rules["head"] = f"target with >= {TAIL_MAX + 1} training interactions"
    rules["hist:short"] = f"history of <= {SHORT_HISTORY} items"
    rules["hist:long"] = f"history of >= {SHORT_HISTORY + 1} items"
    if has_cold:
        rules["cold"] = "target is a new item (--cold-items: never in training or validation)"
        rules["warm"] = "target is not a new item"
    return rules


def segment_masks(examples: list[Example], counts: np.ndarray,
                  cold_items: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """-> segment name -> (n,) bool mask over ``examples``. ``counts``: training_counts;
    ``cold_items``: the new items' indices (None: no cold/warm segments)."""
    targets = np.asarray([e.target for e in examples], dtype=np.int64)
    n_hist = np.asarray([len(e.history) for e in examples], dtype=np.int64)
    c = np.asarray(counts)[targets] if len(targets) else np.zeros(0, dtype=np.int64)
    masks = {name: (c >= lo) & (c <= hi if hi is not None else True) for name, lo, hi in POP_BUCKETS}
    masks["tail"] = c <= TAIL_MAX
    masks["head"] = c > TAIL_MAX
    masks["hist:short"] = n_hist <= SHORT_HISTORY
    masks["hist:long"] = n_hist > SHORT_HISTORY
    if cold_items is not None:
        cold = np.isin(targets, np.asarray(cold_items, dtype=np.int64))
        masks["cold"], masks["warm"] = cold, ~cold
    return {k: np.asarray(v, dtype=bool) for k, v in masks.items()}


def dataset_segments(ds: SequenceDataset, split: str) -> dict[str, np.ndarray]:
    """The segment masks of ``ds.examples(split)`` (cold/warm when ``ds`` has new items)."""
    return segment_masks(ds.examples(split), training_counts(ds), ds.cold_items)


def segment_metrics(ranks, masks: dict[str, np.ndarray], mrr_cutoff: int | None = None) -> dict[str, dict]:
    """Every ranking metric (metrics.ranking_metrics) of each non-empty segment; an empty one
    (no cold items, no user with a short history) is left out rather than reported as zero."""
    r = np.asarray(ranks)
    return {name: ranking_metrics(r[m], mrr_cutoff=mrr_cutoff) for name, m in masks.items() if m.any()}


def paired_by_segment(a, b, masks: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per-example scores of two models on the same examples (e.g. api.user_ndcg of each) ->
    per segment: metrics.paired_difference of a - b (mean, its standard error, ratio) and the
    number of users; plus ``all``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    out = {"all": {**paired_difference(a, b), "users": int(a.size)}}
    for name, m in masks.items():
        if len(m) != a.size:
            raise ValueError(f"segment {name!r} has {len(m)} entries for {a.size} paired scores")
        if m.any():
            out[name] = {**paired_difference(a[m], b[m]), "users": int(m.sum())}
    return out
