"""ANN top-k: a FAISS maximum-inner-product index over item vectors (method.md 4.3).

Two-level heads: log P(t | h) = h . (e_c(t) + e_t) - log Z_1(h) - log Z_c(t)(h). Z_1 is the same for
every item (dropped); log Z_c(h) is approximated by a per-cluster constant b_c estimated on
training hidden states, folded in as an extra dimension:

    score(t) = [e_c(t) + e_t, -b_c(t)] . [h, 1]

Full-softmax heads (and any model with ``item_vectors()``): plain MIPS, score(t) = h . w_t.

Saved beside the checkpoint as ``CKPT/ann.faiss`` + ``CKPT/ann.json``; the JSON holds a
fingerprint of the weights the index was built from, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from itemgen.core.io import atomic_write_text
from itemgen.core.progress import Progress
from itemgen.heads.softmax import TwoLevelHead
from itemgen.topk.exact import check_k

INDEX_TYPES = ("flat", "ivf", "hnsw")
INDEX_FILE, META_FILE = "ann.faiss", "ann.json"


class AnnIndexError(ValueError):
    """Missing, corrupt, or foreign ANN index."""


def _head(model):
    head = getattr(model, "head", None)
    return head if isinstance(head, TwoLevelHead) else None


def fingerprint(model) -> str:
    """A hash of the output weights an index is built from (two-level: item vectors, centroids,
    cluster assignment and level 1's correction, if any; otherwise item_vectors())."""
    head = _head(model)
    if head is None:
        return _digest([model.item_vectors()])
    extra = [] if head.correction is None else list(head.correction.parameters())
    return _digest([head.item_out, head.centroids, head.assign, *extra])


def _digest(tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy()
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@torch.inference_mode()
def estimate_log_normalizers(head: TwoLevelHead, states: torch.Tensor, top_m: int = 8,
                             batch_size: int = 256) -> np.ndarray:
    """(C,) b_c: the mean of log Z_c(h) (minus level 1's correction g_c(h), when the head has one:
    log P(t | h) = h . (e_c + e_t) + g_c(h) - log Z_c(h) - log Z_1(h)) over the training states h
    (n, H) for which c is among the ``top_m`` most probable clusters, i.e. where c competes for the
    top-k; a cluster no state ranks that high gets the mean over all those (state, cluster) pairs.
    Costs n * top_m * (cluster size) * H, never n * |I| * H."""
    C = head.n_clusters
    m = min(top_m, C)
    total = torch.zeros(C, dtype=torch.float64)
    count = torch.zeros(C, dtype=torch.float64)
    states = states.to(head.item_out.device, head.item_out.dtype)
    for start in range(0, len(states), batch_size):
        h = states[start:start + batch_size]  # (b, H)
        g = None if head.correction is None else head.correction(h)  # (b, C)
        level1 = h @ head.centroids.T if g is None else h @ head.centroids.T + g  # (b, C) item_cluster_logits
        top = torch.topk(level1, m, dim=1).indices  # (b, m)
        for c in torch.unique(top).tolist():
            rows = torch.nonzero((top == c).any(1))[:, 0]
            logit = h[rows] @ head.item_out.index_select(0, head.members(c)).T  # (r, S)
            gap = torch.logsumexp(logit.double(), dim=1) - (0 if g is None else g[rows, c].double())  # (r,)
            total[c] += gap.sum().cpu()
            count[c] += len(rows)
    if count.sum() == 0:
        raise ValueError("no hidden states to estimate log Z_c on")
    fallback = total.sum() / count.sum()
    return torch.where(count > 0, total / count.clamp(min=1), fallback).numpy()


def index_vectors(model, log_norm: np.ndarray | None, chunk: int = 65536) -> np.ndarray:
    """(I, D) float32 database vectors: [e_c + e_t, -b_c] (two-level) or item_vectors(); built in
    row chunks so that a large catalog holds one copy, not three."""
    head = _head(model)
    if head is None:
        with torch.inference_mode():
            return np.ascontiguousarray(model.item_vectors().detach().float().cpu().numpy())
    if log_norm is None:
        raise ValueError("a two-level index needs per-cluster log-normalizers (estimate_log_normalizers)")
    n, d = head.item_out.shape
    out = np.empty((n, d + 1), dtype=np.float32)
    b = torch.as_tensor(np.asarray(log_norm), dtype=torch.float32)
    with torch.inference_mode():
        for r in range(0, n, chunk):
            a = head.assign[r:r + chunk]
            out[r:r + chunk, :d] = (head.item_out[r:r + chunk] + head.centroids[a]).float().cpu().numpy()
            out[r:r + chunk, d] = -b[a.cpu()].numpy()
    return out


def query_vectors(model, query: torch.Tensor) -> np.ndarray:
    q = query.detach().float().cpu().numpy()
    if _head(model) is not None:
        q = np.concatenate([q, np.ones((len(q), 1), dtype=np.float32)], axis=1)  # [h, 1]
    return np.ascontiguousarray(q)


class AnnIndex:
    def __init__(self, index, kind: str, fp: str, params: dict, log_norm: np.ndarray | None = None):
        self.index, self.kind, self.fingerprint, self.params = index, kind, fp, params
        self.log_norm = log_norm
        self.set_search(**{k: params[k] for k in ("nprobe", "ef_search") if k in params})

    @property
    def n_items(self) -> int:
        return int(self.index.ntotal)

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        import faiss  # the ann extra (faiss-cpu)

        if nprobe is not None and self.kind == "ivf":
            self.params["nprobe"] = int(nprobe)
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
        if ef_search is not None and self.kind == "hnsw":
            self.params["ef_search"] = int(ef_search)
            self.index.hnsw.efSearch = int(ef_search)

    @classmethod
    def build(cls, model, kind: str = "flat", states: torch.Tensor | None = None, *, nlist: int | None = None,
              nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 80,
              seed: int = 0, log_norm: np.ndarray | None = None) -> "AnnIndex":
        import faiss  # the ann extra (faiss-cpu)

        if kind not in INDEX_TYPES:
            raise ValueError(f"index type {kind!r} is not one of {', '.join(INDEX_TYPES)}")
        t0 = time.perf_counter()
        head = _head(model)
        if head is not None and log_norm is None:
            if states is None or len(states) == 0:
                raise ValueError("a two-level index needs training hidden states to estimate log Z_c")
            log_norm = estimate_log_normalizers(head, states)
        x = index_vectors(model, log_norm if head is not None else None)  # (I, D)
        n, d = x.shape
        params: dict = {"n_items": n, "dim": d, "states": 0 if states is None else len(states)}
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf" and head is not None:
            # the model's own clusters are the inverted lists, probed in decreasing h . e_c (the
            # structure decoder's order, but for level 1's correction g_c(h) where the head has one:
            # a FAISS quantizer scores by one inner product): no k-means, and the lists are what the
            # model ranks by
            nlist = head.n_clusters
            nprobe = nprobe or max(1, min(nlist, 4))
            quantizer = faiss.IndexFlatIP(d)
            cent = np.zeros((nlist, d), dtype=np.float32)
            cent[:, :d - 1] = head.centroids.detach().float().cpu().numpy()
            quantizer.add(cent)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.is_trained = True
            lists = np.ascontiguousarray(head.assign.cpu().numpy(), dtype=np.int64)
            index.add_core(n, faiss.swig_ptr(x), None, faiss.swig_ptr(lists))
            params.update(nlist=nlist, nprobe=nprobe, lists="model clusters")
        elif kind == "ivf":
            nlist = nlist or max(1, round(np.sqrt(n)))
            nprobe = nprobe or max(1, nlist // 16)
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = x[np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)]
            index.cp.seed = seed
            index.train(sample)
            params.update(nlist=nlist, nprobe=nprobe)
        else:  # HNSW graphs are poor at raw inner product: reduce MIPS to L2 (one extra dimension)
            norms = np.linalg.norm(x, axis=1)
            radius = float(norms.max())
            x = np.ascontiguousarray(np.concatenate(
                [x, np.sqrt(np.maximum(radius ** 2 - norms ** 2, 0))[:, None]], axis=1), dtype=np.float32)
            index = faiss.IndexHNSWFlat(d + 1, hnsw_m)
            index.hnsw.efConstruction = ef_construction
            params.update(hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction, l2_radius=radius)
        if index.ntotal == 0:
            index.add(x)
        params["build_seconds"] = round(time.perf_counter() - t0, 3)
        return cls(index, kind, fingerprint(model), params, log_norm)

    def extend(self, model) -> str:
        """Follow a catalog that grew at its end (``model.append_items``: the server's
        ``POST /v1/items``): the items past ``self.n_items`` are added to the index. Exact when the
        old items' vectors are unchanged, which is checked (their fingerprint is the index's); else,
        and for an HNSW index whose MIPS-to-L2 radius a new vector exceeds, the index is rebuilt
        with its parameters. -> "extended" or "rebuilt" (two-level heads never grow: untied)."""
        n_old = self.n_items
        if _head(model) is not None:
            raise AnnIndexError("a two-level index cannot follow a grown catalog (per-item output vectors)")
        with torch.inference_mode():
            vectors = model.item_vectors()  # (I', H)
        x = np.ascontiguousarray(vectors[n_old:].detach().float().cpu().numpy())  # (N, H) the new items
        same = len(vectors) >= n_old and _digest([vectors[:n_old]]) == self.fingerprint
        radius = self.params.get("l2_radius")
        fits = radius is None or float(np.linalg.norm(x, axis=1).max(initial=0.0)) <= radius
        if not (same and fits):
            keep = {k: self.params[k] for k in ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction")
                    if k in self.params}
            if self.kind == "ivf":
                keep.pop("nlist", None)  # sqrt(I) of the grown catalog, as a fresh build
            fresh = AnnIndex.build(model, self.kind, **keep)
            self.index, self.fingerprint, self.params = fresh.index, fresh.fingerprint, fresh.params
            self.set_search(**{k: self.params[k] for k in ("nprobe", "ef_search") if k in self.params})
            return "rebuilt"
        if radius is not None:  # [x, sqrt(R^2 - |x|^2)] as at build
            x = np.ascontiguousarray(np.concatenate(
                [x, np.sqrt(np.maximum(radius ** 2 - (x ** 2).sum(1), 0))[:, None]], axis=1), dtype=np.float32)
        self.index.add(x)
        self.fingerprint = _digest([vectors])
        self.params["n_items"] = self.n_items
        return "extended"

    def search(self, model, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, H) -> scores (B, k) float32, ids (B, k) int64 (-1 where the index ran dry)."""
        if not 1 <= k <= self.n_items:
            raise ValueError(f"k must be between 1 and the catalog size {self.n_items}, got {k}")
        q = query_vectors(model, query)
        if "l2_radius" in self.params:  # |[q, 0] - [x, r']|^2 = |q|^2 + R^2 - 2 q.x
            q2 = (q ** 2).sum(1, keepdims=True)
            dist, ids = self.index.search(np.ascontiguousarray(np.pad(q, ((0, 0), (0, 1)))), k)
            scores = (q2 + self.params["l2_radius"] ** 2 - dist) / 2
        else:
            scores, ids = self.index.search(q, k)
        return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))

    def item_scores(self, model, query: torch.Tensor, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The index's score of given items, computed exactly: query (B, H), rows and items (P,) ->
        (P,) query[row] . x_item, x the item's database vector ([e_c + e_t, -b_c] . [h, 1] for a
        two-level head)."""
        q = query.detach().float().cpu()[rows]  # (P, H)
        head = _head(model)
        with torch.inference_mode():
            if head is None:
                v = model.item_vectors().detach().float().cpu()[items]  # (P, H), the vectors the index holds
                return (q * v).sum(1)
            c = head.assign.cpu()[items]
            v = (head.item_out.detach()[items.to(head.item_out.device)].float().cpu()
                 + head.centroids.detach().float().cpu()[c])  # (P, H)
            return (q * v).sum(1) - torch.as_tensor(np.asarray(self.log_norm), dtype=torch.float32)[c]

    # ---- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        import faiss  # the ann extra (faiss-cpu)

        directory = Path(directory)
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_FILE}.", dir=directory)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, directory / INDEX_FILE)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        meta = {"type": self.kind, "fingerprint": self.fingerprint, "params": self.params,
                "log_norm": None if self.log_norm is None else [float(b) for b in self.log_norm]}
        atomic_write_text(directory / META_FILE, json.dumps(meta) + "\n")
        return directory / INDEX_FILE

    @classmethod
    def load(cls, directory: str | Path, model) -> "AnnIndex":
        import faiss  # the ann extra (faiss-cpu)

        directory = Path(directory)
        ipath, mpath = directory / INDEX_FILE, directory / META_FILE
        if not ipath.is_file() or not mpath.is_file():
            raise AnnIndexError(f"{directory} has no ANN index: build one with `itemgen index build {directory}`")
        try:
            meta = json.loads(mpath.read_text())
            index = faiss.read_index(str(ipath))
        except (json.JSONDecodeError, RuntimeError) as e:
            raise AnnIndexError(f"{ipath}: cannot read the ANN index ({e}); build it again") from None
        fp = fingerprint(model)
        if meta.get("fingerprint") != fp:
            raise AnnIndexError(f"{ipath} was built for other weights (fingerprint {meta.get('fingerprint')}, "
                              f"this checkpoint {fp}): rebuild it with `itemgen index build {directory}`")
        if index.ntotal != model.n_items:
            raise AnnIndexError(f"{ipath} holds {index.ntotal} items, the model {model.n_items}")
        log_norm = np.asarray(meta["log_norm"], dtype=np.float64) if meta.get("log_norm") is not None else None
        return cls(index, meta["type"], fp, meta.get("params", {}), log_norm)


class AnnTopK:
    """Approximate top-k through an AnnIndex. Scores are index scores: h . w_t (full softmax) or
    log P(t | h) + log Z_1(h) with log Z_c approximated (two-level), i.e. the ranking's keys."""

    name = "ann"

    def __init__(self, model, checkpoint_dir: str | Path | None = None, index: AnnIndex | None = None,
                 nprobe: int | None = None, ef_search: int | None = None):
        if index is None:
            if checkpoint_dir is None:
                raise ValueError("ann decoding needs an index: pass index= or checkpoint_dir=")
            index = AnnIndex.load(checkpoint_dir, model)
        if not hasattr(model, "item_vectors"):
            raise ValueError(f"ann decoding needs a model with item vectors; {model.name} has none")
        self.model, self.index = model, index
        index.set_search(nprobe, ef_search)

    def stats(self) -> dict:
        return {"index": self.index.kind, **{k: v for k, v in self.index.params.items()
                                             if k in ("nlist", "nprobe", "hnsw_m", "ef_search")}}

    @torch.inference_mode()
    def topk(self, query: torch.Tensor, k: int, exclude=None, histories=None) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k, self.model.n_items)
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        repeat = self.model.repeat if histories is not None else None
        pairs = repeat.pairs(histories) if repeat is not None else None  # (P, 3) row, item, recency
        if pairs is not None:  # as many more as a history can push out of the top k
            extra += int(torch.bincount(pairs[:, 0], minlength=1).max())
        kk = min(k + extra, self.index.n_items)
        scores, ids = self.index.search(self.model, query, kk)  # (B, kk)
        scores = torch.where(ids >= 0, scores, torch.full_like(scores, float("-inf")))
        if pairs is not None and len(pairs):
            scores, ids = self._with_repeat(query, scores, ids, pairs, repeat)
        if exclude is not None or pairs is not None:
            for b, ex in enumerate(exclude or []):
                if len(ex):
                    drop = torch.from_numpy(np.isin(ids[b].numpy(), np.asarray(ex)))
                    scores[b][drop] = float("-inf")
            order = torch.argsort(scores, dim=1, descending=True, stable=True)
            scores, ids = scores.gather(1, order), ids.gather(1, order)
        scores, ids = scores[:, :k].contiguous(), ids[:, :k].contiguous()
        ids = torch.where(torch.isfinite(scores), ids, torch.full_like(ids, -1))
        return scores.to(query.device), ids.to(query.device)

    def _with_repeat(self, query, scores, ids, pairs, repeat):
        """The candidates (B, kk) without the history items, plus every history item scored exactly
        (the index's score) with its repeat bias: exact whatever the bias's sign, for a flat index
        over a full-softmax head, since at most len(history) history items outrank a non-history
        item of the top k -> (B, kk + max history) candidates, unsorted. A two-level head's bias
        also renormalises the level-2 softmax of the clusters it touches, which the index's
        per-cluster constant b_c does not follow (as it does not follow log Z_c(h) itself)."""
        rows, items = pairs[:, 0], pairs[:, 1]
        B = len(scores)
        n = torch.bincount(rows, minlength=B)  # (B,) history items per row
        col = torch.arange(len(pairs)) - torch.repeat_interleave(n.cumsum(0) - n, n)  # (P,) column in its row
        hist_ids = torch.full((B, int(n.max())), -1, dtype=torch.long)
        hist_ids[rows, col] = items
        hist_scores = torch.full(hist_ids.shape, float("-inf"))
        hist_scores[rows, col] = (self.index.item_scores(self.model, query, rows, items)
                                  + repeat.bias(pairs[:, 2]).detach().float().cpu())
        in_hist = torch.zeros_like(ids, dtype=torch.bool)
        for b in range(B):
            in_hist[b] = torch.from_numpy(np.isin(ids[b].numpy(), hist_ids[b].numpy()))
        scores = scores.masked_fill(in_hist, float("-inf"))
        return torch.cat([scores, hist_scores], 1), torch.cat([ids, hist_ids], 1)


def training_prefixes(ds, max_history: int, n: int = 2048, seed: int = 0) -> list[np.ndarray]:
    """``n`` random prefixes of training sequences (each predicts the item after it, never a
    valid/test target), cut to their last ``max_history`` items."""
    rng = np.random.default_rng(seed)
    seqs = [s for s in ds.split.train if len(s) >= 2]
    if not seqs:
        raise ValueError("no training sequences with at least 2 items to estimate log Z_c on")
    pick = rng.choice(len(seqs), size=n, replace=len(seqs) < n)
    hist = []
    for i in pick:
        s = seqs[i]
        cut = int(rng.integers(1, len(s)))  # predict s[cut] from s[:cut]
        hist.append(s[:cut][-max_history:])
    return hist


@torch.no_grad()  # not inference_mode: level 1's fit trains on these states (training/level1_fit.py)
def training_states(model, ds, max_history: int, n: int = 2048, seed: int = 0,
                    batch_size: int = 64, prefixes: list[np.ndarray] | None = None) -> torch.Tensor:
    """(n, H) query states of the model at random prefixes of training sequences
    (training_prefixes, or the given ``prefixes``): what log Z_c is averaged over."""
    hist = training_prefixes(ds, max_history, n, seed) if prefixes is None else prefixes
    model.eval()
    # batches of similar lengths (little padding), states returned in the prefixes' order
    order = sorted(range(len(hist)), key=lambda i: len(hist[i]))
    out = torch.empty(0)
    with Progress("index: training hidden states", len(hist), unit="state") as tracker:
        for start in range(0, len(hist), batch_size):
            idx = order[start:start + batch_size]
            h = model.encode(model.to_device(model.query_batch([hist[i] for i in idx]))).float().cpu()  # (b, H)
            if not out.numel():
                out = torch.empty(len(hist), h.shape[1])
            out[torch.as_tensor(idx)] = h
            tracker.update(len(idx))
    return out
