"""A prefix tree over the catalog's token sequences, and the beam search it constrains.

Multi-token baselines (titles, semantic IDs) write every item as a sequence of output tokens.
Constrained decoding only ever extends a beam with a token that keeps it a prefix of some
item's sequence, so every finished beam is a real catalog item (method.md section 1).

The beam search is written against two small callables, so the same code decodes titles and
semantic-ID tuples and is tested without a language model:

    first: (B, T) log-probs of the first output token for each of B queries
    step(parents, tokens) -> (N, T): extend row parents[n] of the previous call by tokens[n]
                                     and return the next-token log-probs of the N new rows
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


class Trie:
    """Token sequences -> items. Node 0 is the root; a terminal node ends one or more items'
    sequences (items with identical sequences share it, listed in index order). A sequence may
    not be a strict prefix of another: give variable-length sequences an end token."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if len(sequences) == 0:
            raise ValueError("a trie needs at least one sequence")
        self.children: list[dict[int, int]] = [{}]
        self.items: dict[int, list[int]] = {}  # terminal node -> items (ascending)
        self.depth = 0
        for item, seq in enumerate(sequences):
            if len(seq) == 0:
                raise ValueError(f"item {item} has an empty token sequence")
            node = 0
            for tok in seq:
                if node in self.items:
                    raise ValueError(f"item {item}: the sequence of item {self.items[node][0]} is a prefix "
                                     "of it (end every sequence with an end token)")
                nxt = self.children[node].get(int(tok))
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][int(tok)] = nxt
                    self.children.append({})
                node = nxt
            if self.children[node]:
                raise ValueError(f"item {item}: its sequence is a prefix of another item's")
            self.items.setdefault(node, []).append(item)
            self.depth = max(self.depth, len(seq))
        self._tensors: dict[int, tuple[torch.Tensor, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.children)

    def next_tokens(self, node: int) -> tuple[torch.Tensor, list[int]]:
        """-> (tokens (n,) int64, child nodes) of ``node``, cached as tensors."""
        hit = self._tensors.get(node)
        if hit is None:
            ch = self.children[node]
            hit = (torch.tensor(list(ch.keys()), dtype=torch.long), list(ch.values()))
            self._tensors[node] = hit
        return hit

    def walk(self, prefix: Sequence[int]) -> int | None:
        """The node reached by ``prefix`` from the root, or None if it is not a valid prefix."""
        node = 0
        for tok in prefix:
            node = self.children[node].get(int(tok))
            if node is None:
                return None
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that keep ``prefix`` valid ([] at a terminal or invalid prefix)."""
        node = self.walk(prefix)
        return [] if node is None else list(self.children[node])

    def lookup(self, seq: Sequence[int]) -> list[int]:
        """Items whose sequence is exactly ``seq`` ([] if none)."""
        node = self.walk(seq)
        return list(self.items.get(node, [])) if node is not None else []


def beam_search(first: torch.Tensor, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], trie: Trie,
                k: int, num_beams: int | None = None,
                exclude: list[np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items per query by beam search over ``trie``; scores are summed log-probs.

    Keeps ``num_beams`` (default k, at least k) open beams per query; every candidate that completes an item
    among the best num_beams + k of a step is kept as a finished hypothesis. A query stops when it
    has k finished items and no open beam can beat the k-th (log-probs only decrease), or when
    its beams run out. Items sharing a sequence come out together, lowest index first. Excluded
    items are skipped (the beam widens by the longest exclusion list). Returns scores (B, k) float32 and ids (B, k) int64, best first; a query
    with fewer than k reachable items is padded with -inf / -1. Rows of finished queries are
    dropped from the next step, so ``step`` sees fewer rows as queries finish.
    """
    B = first.shape[0]
    nb = num_beams or k
    if k < 1 or nb < k:
        raise ValueError(f"need k >= 1 and num_beams >= k (k finished beams give the k items), "
                         f"got k={k}, num_beams={nb}")
    if exclude is not None:  # a beam that ends in an excluded item is lost: widen by as many
        nb += max((len(e) for e in exclude), default=0)
    excl = [set(map(int, e)) for e in exclude] if exclude is not None else [set()] * B
    finished: list[list[tuple[float, int]]] = [[] for _ in range(B)]
    # open beams per query: (score, node, row in the current log-prob tensor, last token)
    beams: list[list[tuple[float, int, int, int]]] = [[(0.0, 0, b, -1)] for b in range(B)]
    logp = first
    active = list(range(B))

    def kth(b: int) -> float:
        f = finished[b]
        return sorted(s for s, _ in f)[-k] if len(f) >= k else float("-inf")

    for _ in range(trie.depth):
        new_beams: dict[int, list[tuple[float, int, int, int]]] = {}
        for b in active:
            rows, toks, nodes, base = [], [], [], []
            for score, node, row, _ in beams[b]:
                t, ch = trie.next_tokens(node)
                rows.append(torch.full_like(t, row))
                toks.append(t)
                nodes += ch
                base.append(torch.full((len(t),), score, dtype=torch.float64))
            rows_t, toks_t = torch.cat(rows), torch.cat(toks)
            cand = torch.cat(base) + logp[rows_t, toks_t].double()  # (n,) scores of every extension
            m = min(nb + k, cand.numel())
            top_s, top_i = torch.topk(cand, m)
            keep: list[tuple[float, int, int, int]] = []
            for s, i in zip(top_s.tolist(), top_i.tolist()):
                if s == float("-inf"):
                    break
                child = nodes[i]
                if child in trie.items and not trie.children[child]:  # completes an item
                    finished[b] += [(s, it) for it in trie.items[child] if it not in excl[b]]
                elif len(keep) < nb:
                    keep.append((s, child, int(rows_t[i]), int(toks_t[i])))
            if keep and not (len(finished[b]) >= k and keep[0][0] <= kth(b)):
                new_beams[b] = keep
        active = [b for b in active if b in new_beams]
        if not active:
            break
        parents = torch.tensor([row for b in active for _, _, row, _ in new_beams[b]], dtype=torch.long)
        tokens = torch.tensor([tok for b in active for _, _, _, tok in new_beams[b]], dtype=torch.long)
        logp = step(parents, tokens)  # (N, T)
        r = 0
        for b in active:
            beams[b] = [(s, node, r + j, tok) for j, (s, node, _, tok) in enumerate(new_beams[b])]
            r += len(new_beams[b])

    scores = torch.full((B, k), float("-inf"))
    ids = torch.full((B, k), -1, dtype=torch.long)
    for b in range(B):
        best = sorted(finished[b], key=lambda x: (-x[0], x[1]))[:k]
        if best:
            scores[b, :len(best)] = torch.tensor([s for s, _ in best])
            ids[b, :len(best)] = torch.tensor([i for _, i in best])
    return scores, ids
