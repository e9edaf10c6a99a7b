"""Text similarity, the training-free baseline (model ``text_knn``): each candidate's score is the
mean cosine between its text vector and the text vectors of the user's last ``last_n`` items.

It needs no interaction to rank an item, so it ranks tail and new items as well as popular ones:
the reference a model that learns from text must beat where an ID model cannot follow (issue 20).

Item vectors (``text_knn.encoder``), L2-normalised, so a dot product is a cosine:

``tfidf``
    TF-IDF over the words of each item's text (text_view.item_text of ``text_knn.fields``): raw
    term counts times smoothed idf ``ln((1 + I) / (1 + df)) + 1``. Kept sparse (CSR) in the
    checkpoint: a vocabulary of tens of thousands of words times the catalog would not fit dense.
``minilm``, a backbone name, a local folder
    a frozen encoder's vectors (text_view.encode_items).

Mean of cosines or cosine with the mean: with unit item vectors the mean of the cosines is the
dot product with the mean of the history vectors, and the cosine with the mean divides that by
the mean's norm, the same number for every candidate: both rank identically. The mean of cosines
is kept because its score is a plain average similarity in [-1, 1], comparable across users.

Nothing trains (``trainable = False``): ``itemgen train`` computes the vectors, validates, and
writes the checkpoint (training/loop.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from itemgen.core.config import Config, TextKNNConfig
from itemgen.data.dataset import METADATA_FIELDS, ItemTable
from itemgen.models.recommender import Recommender
from itemgen.models.text_view import encode_items, item_texts

TFIDF = "tfidf"
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """An item text's words: lower-cased runs of letters and digits (TF-IDF's terms here and in
    the lexical view, models/lexical.py)."""
    return _WORD.findall((text or "").lower())


def tfidf_csr(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """texts (I,) -> CSR rows of their L2-normalised TF-IDF vectors: (indptr (I+1,), term
    indices (nnz,), values (nnz,) float32, vocabulary size). Empty texts give empty rows."""
    vocab: dict[str, int] = {}
    rows = []
    for text in texts:
        ids = np.asarray([vocab.setdefault(w, len(vocab)) for w in words(text)], dtype=np.int64)
        terms, counts = np.unique(ids, return_counts=True)
        rows.append((terms, counts.astype(np.float64)))
    n_docs, n_terms = len(texts), len(vocab)
    df = np.zeros(n_terms, dtype=np.int64)
    for terms, _ in rows:
        df[terms] += 1
    idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0  # smoothed: every term as if seen in one more document
    indptr = np.zeros(n_docs + 1, dtype=np.int64)
    indices, values = [], []
    for r, (terms, counts) in enumerate(rows):
        w = counts * idf[terms]
        norm = np.sqrt((w * w).sum())
        indices.append(terms)
        values.append(w / norm if norm > 0 else w)
        indptr[r + 1] = indptr[r] + len(terms)
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dtype=dt))
    return indptr, cat(indices, np.int64), cat(values, np.float32), n_terms


class TextKNN(Recommender):
    name = "text_knn"
    trainable = False  # training/loop.py saves it as built

    def __init__(self, n_items: int, cfg: TextKNNConfig, *, dense: torch.Tensor | None = None,
                 csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None):
        """Exactly one of ``dense`` (I, F) unit rows or ``csr`` (indptr, indices, values, F)."""
        super().__init__()
        self.n_items, self.cfg = n_items, cfg
        if (dense is None) == (csr is None):
            raise ValueError("text_knn needs item vectors: dense or CSR, not both")
        if dense is not None:
            self.register_buffer("vectors", dense.float().contiguous())  # (I, F)
        else:
            indptr, indices, values, n_terms = csr
            self.register_buffer("csr_indptr", indptr.long())  # (I + 1,)
            self.register_buffer("csr_indices", indices.long())  # (nnz,)
            self.register_buffer("csr_values", values.float())  # (nnz,)
            self.register_buffer("n_terms", torch.tensor(int(n_terms)))  # F, kept in the checkpoint
        self._sparse: torch.Tensor | None = None  # (I, F) sparse, built from the CSR buffers
        self._sparse_t: torch.Tensor | None = None

    @classmethod
    def build(cls, cfg: Config, items: ItemTable, checkpoint_dir=None) -> "TextKNN":
        c = cfg.text_knn
        unknown = [f for f in c.fields if f not in METADATA_FIELDS]
        if unknown:
            raise ValueError(f"text_knn.fields: unknown field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(METADATA_FIELDS)})")
        if checkpoint_dir is not None:  # the vectors are the weights: buffers of the saved shapes
            return cls._empty(len(items), c, Path(checkpoint_dir) / "model.safetensors")
        texts = item_texts(items, c.fields)
        if not any(texts):
            raise ValueError(f"text_knn: no item has any text in fields {', '.join(c.fields)}")
        if c.encoder == TFIDF:
            indptr, indices, values, n_terms = tfidf_csr(texts)
            return cls(len(items), c, csr=(torch.from_numpy(indptr), torch.from_numpy(indices),
                                           torch.from_numpy(values), n_terms))
        vectors, _ = encode_items(items, c.encoder, c.fields)  # (I, F), zero rows for items without text
        return cls(len(items), c, dense=vectors)

    @classmethod
    def _empty(cls, n_items: int, cfg: TextKNNConfig, weights: Path) -> "TextKNN":
        """Zeros shaped as the checkpoint's tensors (checkpoint.py then loads them; a file that does
        not parse gets zero-sized buffers, and that load reports it)."""
        try:
            with safe_open(str(weights), framework="pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except (SafetensorError, OSError):
            shapes = {}
        if "vectors" in shapes or cfg.encoder != TFIDF:
            return cls(n_items, cfg, dense=torch.zeros(shapes.get("vectors", (0, 0))))
        z = lambda k: torch.zeros(shapes.get(k, (0,)))  # noqa: E731
        return cls(n_items, cfg, csr=(z("csr_indptr"), z("csr_indices"), z("csr_values"), 0))

    @property
    def device(self) -> torch.device:  # no parameters: the buffers say where the model is
        return next(self.buffers()).device

    def _matrix(self) -> torch.Tensor:
        """(I, F) item vectors: the dense buffer, or the CSR buffers as a (coalesced COO) sparse
        tensor, cached (COO: torch's stable sparse layout for products with dense and sparse)."""
        if hasattr(self, "vectors"):
            return self.vectors
        if self._sparse is None or self._sparse.device != self.csr_values.device:
            self._check_csr()
            counts = self.csr_indptr[1:] - self.csr_indptr[:-1]  # (I,) terms per item
            rows = torch.arange(self.n_items, device=counts.device).repeat_interleave(counts)
            self._sparse = torch.sparse_coo_tensor(torch.stack([rows, self.csr_indices]), self.csr_values,
                                                   (self.n_items, int(self.n_terms)),
                                                   check_invariants=False).coalesce()  # built from valid CSR
            self._sparse_t = self._sparse.t().coalesce()  # (F, I)
        return self._sparse

    def _check_csr(self) -> None:
        """Refuse CSR buffers that do not describe an (I, F) matrix (a corrupt checkpoint) before
        torch builds a sparse tensor from them unchecked."""
        ptr, idx, n_terms = self.csr_indptr, self.csr_indices, int(self.n_terms)
        ok = (ptr.numel() == self.n_items + 1 and idx.numel() == self.csr_values.numel()
              and int(ptr[0]) == 0 and int(ptr[-1]) == idx.numel() and bool((ptr[1:] >= ptr[:-1]).all())
              and (idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n_terms)))
        if not ok:
            raise ValueError(f"text_knn: the TF-IDF item vectors do not describe {self.n_items} items "
                             f"over {n_terms} terms (corrupt checkpoint?)")

    def _matrix_t(self) -> torch.Tensor:
        """(F, I) the sparse item vectors transposed (cached with _matrix)."""
        self._matrix()
        return self._sparse_t

    def query_batch(self, histories):
        """-> rows (B + 1,), items (N,): each history's last ``last_n`` items, concatenated
        (history b's are items[rows[b]:rows[b + 1]])."""
        last = [np.asarray(h, dtype=np.int64)[-self.cfg.last_n:] for h in histories]
        rows = np.concatenate([[0], np.cumsum([len(h) for h in last])])
        items = np.concatenate(last) if last else np.zeros(0, dtype=np.int64)
        return {"rows": torch.from_numpy(rows), "items": torch.from_numpy(items.astype(np.int64))}

    def encode(self, batch):
        """-> (B, F) the mean of each history's last items' vectors (zero for an empty history)."""
        rows, items = batch["rows"], batch["items"]
        n = rows[1:] - rows[:-1]  # (B,) items per history
        weights = (1.0 / n.clamp(min=1).float()).repeat_interleave(n)  # (N,)
        # (I, B) averaging weights: B x I floats, small beside the (B, I) scores that follow anyway
        user = torch.arange(len(n), device=n.device).repeat_interleave(n)  # (N,)
        avg_t = torch.zeros(self.n_items, len(n), device=weights.device)
        avg_t.index_put_((items, user), weights, accumulate=True)  # a repeated item counts twice
        m = self._matrix()
        if m.is_sparse:
            return torch.sparse.mm(self._matrix_t(), avg_t).T  # (B, F)
        return avg_t.T @ m  # (B, F)

    def score_items(self, query):
        """(B, F) -> (B, I) mean cosine with the history's last items."""
        m = self._matrix()
        return torch.sparse.mm(m, query.T.contiguous()).T if m.is_sparse else query @ m.T

    def item_vectors(self) -> torch.Tensor:
        """(I, F) dense, for ANN indexes (a TF-IDF catalog densified: mind its vocabulary size)."""
        m = self._matrix()
        return m.to_dense() if m.is_sparse else m

    # nothing to train: the training interface says so plainly if it is ever called
    def train_batch(self, seqs, rng):
        raise TypeError("text_knn has nothing to train (trainable = False)")

    def n_labels(self, seqs):
        raise TypeError("text_knn has nothing to train (trainable = False)")
