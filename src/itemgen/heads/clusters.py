"""Item clusters for the two-level softmax (method.md 4.2), fixed before training.

    kmeans     k-means (FAISS) on collaborative item embeddings from implicit ALS of the
               training split (users' training sequences only: no valid/test target leaks)
    frequency  items sorted by training count, cut into equal-sized groups
    random     a seeded random balanced assignment

Stored with the dataset as ``DATASET/clusters/<method>.json`` and copied into every checkpoint
that uses it (``CKPT/clusters.json``)::

    {"method": ..., "n_items": I, "n_clusters": C, "seed": ..., "dataset": <content hash>,
     "assign": [cluster of item 0, cluster of item 1, ...]}

Cluster ids are dense 0..C-1 and no cluster is empty.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itemgen.core.io import atomic_write_text
from itemgen.core.progress import phase
from itemgen.data.dataset import DataError, SequenceDataset
from itemgen.data.load import load_dataset

METHODS = ("kmeans", "frequency", "random")
MAX_SIZE_FACTOR = 2.0  # kmeans clusters larger than this x the mean size are split (padding cost)


class ClusterError(ValueError):
    pass


@dataclass
class Clusters:
    assign: np.ndarray  # (I,) int64 cluster of each item
    method: str
    seed: int = 0
    dataset: str | None = None  # content hash of the dataset they were built from
    info: dict = field(default_factory=dict)  # method details (ALS factors, splits, ...)

    def __post_init__(self) -> None:
        self.assign = np.asarray(self.assign, dtype=np.int64)
        if self.assign.ndim != 1 or len(self.assign) == 0:
            raise ClusterError("cluster assignment must be a non-empty 1-d list")
        if self.assign.min() < 0:
            raise ClusterError("cluster ids must be >= 0")
        sizes = np.bincount(self.assign)
        if (sizes == 0).any():
            raise ClusterError(f"cluster ids must be dense 0..C-1: cluster {int(np.argmin(sizes))} is empty")

    @property
    def n_items(self) -> int:
        return len(self.assign)

    @property
    def n_clusters(self) -> int:
        return int(self.assign.max()) + 1

    def sizes(self) -> np.ndarray:
        return np.bincount(self.assign, minlength=self.n_clusters)

    def stats(self) -> dict:
        s = self.sizes()
        return {"method": self.method, "items": self.n_items, "clusters": self.n_clusters,
                "min": int(s.min()), "median": float(np.median(s)), "mean": round(float(s.mean()), 2),
                "max": int(s.max()), "singletons": int((s == 1).sum())}

    def check(self, n_items: int, where: str = "clusters") -> "Clusters":
        if self.n_items != n_items:
            raise ClusterError(f"{where}: assign {self.n_items} items but the item table has {n_items}; "
                               "rebuild them with `itemgen clusters build`")
        return self

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "n_items": self.n_items, "n_clusters": self.n_clusters,
                           "seed": self.seed, "dataset": self.dataset, "info": self.info,
                           "assign": self.assign.tolist()}) + "\n"

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, n_items: int | None = None) -> "Clusters":
        path = Path(path)
        if not path.is_file():
            raise ClusterError(f"cluster file not found: {path} (build it with `itemgen clusters build`)")
        try:
            blob = json.loads(path.read_text())
            c = cls(np.asarray(blob["assign"], dtype=np.int64), blob["method"], blob.get("seed", 0),
                    blob.get("dataset"), blob.get("info", {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ClusterError(f"{path}: not a valid cluster file ({e})") from None
        if blob.get("n_items", c.n_items) != c.n_items or blob.get("n_clusters", c.n_clusters) != c.n_clusters:
            raise ClusterError(f"{path}: n_items/n_clusters do not match its assignment")
        if n_items is not None:
            c.check(n_items, str(path))
        return c


def default_n_clusters(n_items: int) -> int:
    return max(1, min(n_items, round(math.sqrt(n_items))))


def cluster_path(dataset_dir: str | Path, method: str) -> Path:
    return Path(dataset_dir) / "clusters" / f"{method}.json"


def train_counts(ds: SequenceDataset) -> np.ndarray:
    """(I,) interactions per item in the training split only."""
    train = ds.split.train
    flat = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=ds.n_items)


def _balanced(order: np.ndarray, n_clusters: int) -> np.ndarray:
    """Items in ``order`` cut into n_clusters contiguous groups whose sizes differ by <= 1."""
    assign = np.empty(len(order), dtype=np.int64)
    assign[order] = (np.arange(len(order)) * n_clusters) // len(order)
    return assign


def random_clusters(n_items: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    return _balanced(np.random.default_rng(seed).permutation(n_items), n_clusters)


def frequency_clusters(counts: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Equal-sized groups of items with similar training counts (ties broken at random, seeded)."""
    tiebreak = np.random.default_rng(seed).random(len(counts))
    order = np.lexsort((tiebreak, -np.asarray(counts)))  # most frequent first
    return _balanced(order, n_clusters)


def als_item_factors(ds: SequenceDataset, factors: int = 64, iterations: int = 15, seed: int = 0,
                     regularization: float = 0.05) -> np.ndarray:
    """(I, factors) item embeddings from implicit ALS on the user x item matrix of the TRAINING
    split (repeat interactions add up as confidence)."""
    import scipy.sparse as sp  # the ann extra (scipy comes with implicit)
    from implicit.als import AlternatingLeastSquares  # the ann extra

    train = ds.split.train
    rows = np.concatenate([np.full(len(s), u, dtype=np.int64) for u, s in enumerate(train)])
    cols = np.concatenate(train).astype(np.int64)
    user_items = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)),
                               shape=(len(train), ds.n_items))
    user_items.sum_duplicates()
    from threadpoolctl import threadpool_limits  # the ann extra (comes with implicit)

    import warnings

    with threadpool_limits(1, "blas"), warnings.catch_warnings():  # implicit runs its own threads
        warnings.filterwarnings("ignore", message="OpenBLAS is configured", category=RuntimeWarning)
        model = AlternatingLeastSquares(factors=factors, iterations=iterations, regularization=regularization,
                                        random_state=seed, num_threads=1)
        model.fit(user_items, show_progress=False)
    f = np.asarray(model.item_factors, dtype=np.float32)
    return f


def kmeans_clusters(vectors: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 25,
                    max_size_factor: float = MAX_SIZE_FACTOR) -> tuple[np.ndarray, dict]:
    """k-means (cosine: rows L2-normalised) on item vectors; empty clusters dropped; clusters over
    max_size_factor x the mean size split into balanced pieces (seeded), so that the padded
    per-label cost of the two-level head stays O(sqrt(I))."""
    import faiss  # the ann extra (faiss-cpu)

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    cold = norms[:, 0] == 0  # items never seen in training
    x = x / np.maximum(norms, 1e-12)
    k = min(n_clusters, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, spherical=True,
                      min_points_per_centroid=1, max_points_per_centroid=100_000)
    km.train(x)
    _, raw = km.index.search(x, 1)
    raw = raw[:, 0].astype(np.int64)
    _, assign = np.unique(raw, return_inverse=True)  # drop empty clusters
    cap = max(1, math.ceil(max_size_factor * len(x) / n_clusters))
    rng = np.random.default_rng(seed)
    out = np.empty_like(assign)
    next_id, n_split = 0, 0
    for c in range(int(assign.max()) + 1):
        members = np.flatnonzero(assign == c)
        pieces = math.ceil(len(members) / cap)
        if pieces > 1:
            n_split += 1
            members = rng.permutation(members)
        out[members] = next_id + (np.arange(len(members)) * pieces) // len(members)
        next_id += pieces
    return out, {"kmeans_clusters": int(assign.max()) + 1, "split_clusters": n_split, "size_cap": cap,
                 "cold_items": int(cold.sum())}


def build_clusters(ds: SequenceDataset, method: str, n_clusters: int | None = None, seed: int = 0,
                   factors: int | None = None) -> Clusters:
    """``factors``: ALS width for kmeans, default min(64, I / 8): tiny catalogs overfit wide ones."""
    if method not in METHODS:
        raise ClusterError(f"cluster method {method!r} is not one of {', '.join(METHODS)}")
    n = default_n_clusters(ds.n_items) if n_clusters is None else n_clusters
    if not 1 <= n <= ds.n_items:
        raise ClusterError(f"n_clusters must be between 1 and the catalog size {ds.n_items}, got {n}")
    info: dict = {"requested_clusters": n}
    if method == "random":
        assign = random_clusters(ds.n_items, n, seed)
    elif method == "frequency":
        assign = frequency_clusters(train_counts(ds), n, seed)
    else:
        factors = factors or max(4, min(64, ds.n_items // 8))
        with phase("clusters", f"implicit ALS item factors ({factors}) of {ds.n_items:,} items"):
            f = als_item_factors(ds, factors=factors, seed=seed)
        with phase("clusters", f"k-means into {n} clusters"):
            assign, extra = kmeans_clusters(f, n, seed)
        info.update({"als_factors": factors, **extra})
    return Clusters(assign, method, seed, ds.content_hash(), info)


def resolve_clusters(cfg, n_items: int) -> Clusters:
    """The clusters a two-level ItemLM trains with: ``itemlm.clusters`` (a file) if set, else
    DATA/clusters/<itemlm.cluster_method>.json of a prepared dataset (built and saved there when
    missing), else built in memory for a synthetic dataset."""
    m = cfg.itemlm
    if m.clusters:
        return Clusters.load(m.clusters, n_items)
    data = cfg.data.path
    if data and data != "synthetic" and Path(data).is_dir():
        path = cluster_path(data, m.cluster_method)
        if path.is_file():
            c = Clusters.load(path, n_items)
            if m.n_clusters is None or c.info.get("requested_clusters") == m.n_clusters:
                return c
        ds = SequenceDataset.load(data)
        c = build_clusters(ds, m.cluster_method, m.n_clusters, cfg.train.seed).check(n_items, str(path))
        try:
            c.save(path)
        except OSError:  # a read-only dataset: the checkpoint keeps its own copy anyway
            pass
        return c
    if data == "synthetic":
        ds = load_dataset(cfg)
        return build_clusters(ds, m.cluster_method, m.n_clusters, cfg.train.seed).check(n_items)
    raise DataError("itemlm.head=two_level needs clusters: set itemlm.clusters to a cluster file "
                    "(`itemgen clusters build DATASET`) or data.path to a prepared dataset")
