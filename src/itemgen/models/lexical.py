"""The lexical view (``items.lexical``): each item's words, as TF-IDF cut to a dense basis (LSA),
scored against the words of the user's last items, with a weight per item bucket that validation
chooses (evaluation/score_search.py).

Why a second text view beside the frozen sentence encoder's (text_view.py): the learned text-match
part (text_match.py) lifts tail targets only part of the way. On office, history masked, the text
recipe scores tail targets 0.0202 and a bag of words (TF-IDF cosine with the last 3 items,
text_knn.py) 0.0455: word identity ("toner", a model number, a brand) carries what an ID vector
trained on 1-4 examples cannot, and a sentence encoder smooths it away. Measured before this view
was built, from the trained text recipe's scores: adding w(b_i) * cos_tfidf with the weights chosen
on validation lifted office all users 0.0666 -> 0.0714 and tail 0.0202 -> 0.0459.

    score(i | history) += w(b_i) * u_i . q  +  beta(b_i)

u_i (k,) unit rows: the item's TF-IDF vector (words of text_view.item_text, terms in at least
``min_df`` items, smoothed idf) projected on the top-k right singular vectors of the catalog's
TF-IDF matrix, then re-normalised; q (k,) the mean u over the user's last n items (the text-match
path's n); b_i the item's bucket: 0 "ID closed" (new, unknown, added, or the search's probe),
1 tail (1-4 training interactions, segments.TAIL_MAX), 2 head. w and beta are NOT trained: the
training loss never sees this view (training is unchanged); every validation chooses them
(beta(head) stays 0, the reference; beta(closed) is the closed-item prior, items.closed_prior).

Dense, not the sparse TF-IDF itself: the term joins the item vector [v ; t ; c ; w(b_i) u_i] and
the query [h ; M q ; 1 ; q], so exact top-k, ANN and serving stay one dot product (a sparse
vocabulary-wide column block would not fit an ANN index). k = 256 LSA ranks office and
scientific as well as the sparse vectors (validation NDCG@10 of the fused scores within 0.001,
measured). The vocabulary, idf and basis are kept in the checkpoint, so ``items add`` and
``POST /v1/items`` vectorise a new item's words exactly as the catalog's were.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from itemgen.models.text_knn import words

BUCKETS = ("closed", "tail", "head")  # b_i: 0 ID closed, 1 tail, 2 head
TAIL_MAX = 4  # tail: 1..TAIL_MAX training interactions (evaluation/segments.py's rule)


class LexicalView(nn.Module):
    """u (I, k) for a catalog of ``n_items`` items, and what encodes a new item's words the same way.

    Every buffer takes the shapes of a loaded checkpoint (``_load_from_state_dict``): the
    vocabulary's size is data, not architecture, and is only known once the catalog is read."""

    def __init__(self, n_items: int, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("vectors", torch.zeros(n_items, dim))  # (I, k) u_i, unit rows (zero: no words)
        self.register_buffer("idf", torch.zeros(0))  # (T,) the vocabulary's smoothed idf
        self.register_buffer("basis", torch.zeros(0, dim))  # (T, k) TF-IDF -> LSA coordinates
        # the vocabulary: its terms in order, UTF-8, newline-separated (safetensors holds tensors only)
        self.register_buffer("vocab_utf8", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("weight", torch.zeros(len(BUCKETS)))  # (3,) w(b), chosen on validation
        self.register_buffer("bias", torch.zeros(len(BUCKETS)))  # (3,) beta(b); closed and head stay 0
        self.register_buffer("item_bucket", torch.full((n_items,), 2, dtype=torch.long))  # (I,) 1 tail / 2 head
        self._index: dict[str, int] | None = None

    # ---- built once, from the catalog's texts -------------------------------------------------
    @torch.no_grad()
    def fit(self, texts: list[str], min_df: int = 2, seed: int = 0) -> None:
        """Vocabulary (terms in >= min_df items), idf, the top-k LSA basis and every item's u."""
        docs = [words(t) for t in texts]
        df: dict[str, int] = {}
        for d in docs:
            for w in set(d):
                df[w] = df.get(w, 0) + 1
        vocab = sorted(w for w, n in df.items() if n >= min_df)
        if not vocab:
            raise ValueError(f"items.lexical: no word is in {min_df} or more items' text (items.text_fields)")
        self._set_vocab(vocab)
        n = len(texts)
        self.idf = torch.tensor([np.log((1.0 + n) / (1.0 + df[w])) + 1.0 for w in vocab], dtype=torch.float32)
        x = self._tfidf(docs)  # (I, T) sparse, unit rows
        k = min(self.dim, min(x.shape) - 1) if min(x.shape) > 1 else 1
        with torch.random.fork_rng(devices=[]):  # svd_lowrank draws a random start: fixed, for one basis per catalog
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(x, q=min(k + 10, min(x.shape)), niter=6)  # v (T, q)
        self.basis = torch.zeros(len(vocab), self.dim)
        self.basis[:, :k] = v[:, :k]
        self.vectors = self._project(x)

    def _set_vocab(self, vocab: list[str]) -> None:
        self.vocab_utf8 = torch.frombuffer(bytearray("\n".join(vocab).encode()), dtype=torch.uint8).clone()
        self._index = {w: i for i, w in enumerate(vocab)}

    def index(self) -> dict[str, int]:
        if self._index is None:
            blob = bytes(self.vocab_utf8.cpu().numpy()).decode()
            self._index = {w: i for i, w in enumerate(blob.split("\n"))} if blob else {}
        return self._index

    def _tfidf(self, docs: list[list[str]]) -> torch.Tensor:
        """word lists (N,) -> (N, T) sparse COO, L2-normalised rows (raw counts times idf)."""
        index, rows, cols = self.index(), [], []
        for r, d in enumerate(docs):
            for w in d:
                j = index.get(w)
                if j is not None:
                    rows.append(r)
                    cols.append(j)
        T = len(index)
        x = torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                    torch.ones(len(rows)), (len(docs), T), check_invariants=True).coalesce()  # counts
        r, c = x.indices()
        val = x.values() * self.idf.cpu()[c]
        norm = torch.zeros(len(docs)).index_add_(0, r, val * val).sqrt()
        return torch.sparse_coo_tensor(x.indices(), val / norm[r].clamp_min(1e-12), x.shape, check_invariants=True).coalesce()

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T) sparse TF-IDF rows -> (N, k) unit rows of their LSA coordinates (zero: no known word)."""
        u = torch.sparse.mm(x, self.basis.cpu())
        return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N,) texts -> (N, k) u as the catalog's items got it (words outside the vocabulary ignored)."""
        return self._project(self._tfidf([words(t) for t in texts])).to(self.vectors.device)

    @torch.no_grad()
    def set_counts(self, counts: torch.Tensor) -> None:
        """counts (I,) training interactions -> each item's open bucket (tail 1..4, head 5+; an item
        with none is ID-closed, which the model's ID gate says at scoring time)."""
        counts = torch.as_tensor(counts, dtype=torch.long, device=self.item_bucket.device)
        self.item_bucket.copy_(torch.where(counts <= TAIL_MAX, 1, 2))

    @torch.no_grad()
    def set_weights(self, weight, bias) -> None:
        self.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        self.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def buckets(self, open_: torch.Tensor) -> torch.Tensor:
        """open_ (I,) bool, the ID gate -> (I,) long b_i."""
        return torch.where(open_, self.item_bucket, torch.zeros_like(self.item_bucket))

    @torch.no_grad()
    def append(self, vectors: torch.Tensor) -> None:
        """New items (N, k) at the end of the catalog: ID-closed, so their bucket is 0 whatever
        item_bucket says (kept at tail: no training interaction)."""
        dev = self.vectors.device
        self.vectors = torch.cat([self.vectors, vectors.to(dev, self.vectors.dtype)])
        self.item_bucket = torch.cat([self.item_bucket, torch.ones(len(vectors), dtype=torch.long, device=dev)])

    def weights(self) -> dict[str, tuple[float, float]]:
        """bucket -> (w, beta), for logs and checkpoints' metrics."""
        return {b: (float(self.weight[i]), float(self.bias[i])) for i, b in enumerate(BUCKETS)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint's vocabulary and catalog set the buffers' shapes (built before it is read)
        for name, buf in list(self._buffers.items()):
            got = state_dict.get(prefix + name)
            if buf is not None and got is not None and got.shape != buf.shape:
                self._buffers[name] = torch.empty(got.shape, dtype=buf.dtype, device=buf.device)
        self._index = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
