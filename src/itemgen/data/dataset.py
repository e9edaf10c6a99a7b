"""The prepared dataset: an item table, one chronological item sequence per user, and the
leave-one-out split every model is trained and evaluated on.

On disk (``itemgen data prepare`` writes it, :func:`SequenceDataset.load` reads it)::

    DIR/items.parquet      index (int32), id (string), then the metadata fields present
                           (title, brand, price, category, description), null when missing
    DIR/sequences.parquet  user (string), items (list<int32>, oldest first)
    DIR/manifest.json      counts, fields, source, content hash; ``cold_items`` (the new items of
                           a cold-start dataset: fraction, seed, count, indices, ids)

Item indices are dense 0..I-1; external ids (ASINs, strings) are kept for I/O only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itemgen.core.io import printable, replace_dir, temp_dir

METADATA_FIELDS = ("title", "brand", "price", "category", "description")
MIN_EVAL_LENGTH = 3  # users with fewer interactions are used for training only


class DataError(ValueError):
    """Bad input data; the message names the file (and row) at fault."""


def check_item_ids(ids) -> None:
    """Item ids are distinct, non-empty strings without NUL bytes (the content hash separates ids
    with NUL, and C tools and some terminals cut a string at one). Raises DataError naming the
    first bad id and its index."""
    if not isinstance(ids, list):
        raise DataError(f"item ids must be a list of strings, not {type(ids).__name__}")
    seen: dict[str, int] = {}
    for i, x in enumerate(ids):
        if not isinstance(x, str):
            raise DataError(f"item {i}: id {printable(repr(x), 80)} is a {type(x).__name__}, not a string")
        if not x:
            raise DataError(f"item {i}: empty id")
        if "\0" in x:
            raise DataError(f"item {i}: id {printable(repr(x), 80)} contains a NUL byte")
        j = seen.setdefault(x, i)
        if j != i:
            raise DataError(f"item {i}: id {printable(repr(x), 80)} repeats item {j}'s (ids must be distinct)")


@dataclass
class ItemTable:
    ids: list[str]  # external id of item index i
    fields: dict[str, list[str | None]] = field(default_factory=dict)  # name -> value per item

    def __post_init__(self) -> None:
        for name, values in self.fields.items():
            if len(values) != len(self.ids):
                raise DataError(f"item field {name!r} has {len(values)} values for {len(self.ids)} items")
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {item_id: i for i, item_id in enumerate(self.ids)}
        return self._index

    def lookup(self, external_ids: list[str]) -> list[int]:
        """External ids -> indices; raises KeyError listing every unknown id."""
        idx = self.index
        unknown = [x for x in external_ids if x not in idx]
        if unknown:
            raise KeyError(f"unknown item ids: {', '.join(map(str, unknown[:20]))}"
                           + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""))
        return [idx[x] for x in external_ids]

    def title(self, i: int) -> str | None:
        titles = self.fields.get("title")
        return titles[i] if titles is not None else None


@dataclass
class Example:
    """One prediction target: the user's history (oldest first) and the next item."""

    user: int
    history: np.ndarray  # (n,) int64 item indices
    target: int


@dataclass
class Split:
    """Leave-one-out: last item = test, second-to-last = validation, the rest = training."""

    train: list[np.ndarray]  # one training sequence per user (every user, shorter ones whole)
    valid: list[Example]
    test: list[Example]
    n_train_only_users: int  # users with fewer than MIN_EVAL_LENGTH interactions


def leave_one_out(sequences: list[np.ndarray]) -> Split:
    train, valid, test = [], [], []
    short = 0
    for u, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < MIN_EVAL_LENGTH:
            short += 1
            train.append(seq)
            continue
        train.append(seq[:-2])
        valid.append(Example(u, seq[:-2], int(seq[-2])))
        test.append(Example(u, seq[:-1], int(seq[-1])))
    return Split(train, valid, test, short)


@dataclass
class ColdItems:
    """The new items of a cold-start dataset (:func:`make_cold`): chosen at random (``fraction``
    of the catalog, ``seed``); they appear only as some users' test targets."""

    indices: np.ndarray  # (C,) int64, sorted
    fraction: float
    seed: int
    removed_interactions: int = 0  # interactions with them dropped from the sequences
    removed_users: int = 0  # users left with no interaction at all


@dataclass
class SequenceDataset:
    name: str
    items: ItemTable
    users: list[str]
    sequences: list[np.ndarray]  # per user, int64 item indices, chronological
    source: dict = field(default_factory=dict)  # where it came from (loader, paths, filters)
    cold: ColdItems | None = None  # new items (prepared with --cold-items), else None

    def __post_init__(self) -> None:
        if len(self.users) != len(self.sequences):
            raise DataError(f"{len(self.users)} users but {len(self.sequences)} sequences")
        self._split: Split | None = None

    @property
    def cold_items(self) -> np.ndarray | None:
        """(C,) indices of the new items, or None for a dataset without a cold-start split."""
        return None if self.cold is None else self.cold.indices

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @property
    def split(self) -> Split:
        if self._split is None:
            self._split = leave_one_out(self.sequences)
        return self._split

    def examples(self, split: str) -> list[Example]:
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', not {split!r}")
        return getattr(self.split, split)

    def validate(self) -> None:
        check_item_ids(self.items.ids)
        n = self.n_items
        for u, seq in enumerate(self.sequences):
            if len(seq) == 0:
                raise DataError(f"user {self.users[u]!r} has no interactions")
            if seq.min() < 0 or seq.max() >= n:
                raise DataError(f"user {self.users[u]!r} names an item index outside 0..{n - 1}")
        if self.cold is not None:
            c = np.asarray(self.cold.indices)
            if c.size and (c.min() < 0 or c.max() >= n):
                raise DataError(f"cold_items names an item index outside 0..{n - 1}")
            new = np.zeros(n, dtype=bool)
            new[c] = True
            for u, seq in enumerate(self.sequences):  # a new item only as an evaluated user's last item
                early = seq[:-1] if len(seq) >= MIN_EVAL_LENGTH else seq
                if new[early].any():
                    raise DataError(f"user {self.users[u]!r} has a new (cold) item before its test target")

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for item_id in self.items.ids:
            h.update(item_id.encode() + b"\0")
        for name in sorted(self.items.fields):
            h.update(name.encode() + b"\1")
            for v in self.items.fields[name]:
                h.update((v or "").encode() + b"\0")
        for user, seq in zip(self.users, self.sequences):
            h.update(user.encode() + b"\2")
            h.update(np.asarray(seq, dtype=np.int64).tobytes())
        if self.cold is not None:  # only then: the hashes of datasets without new items stay as they were
            h.update(b"\3" + np.asarray(self.cold.indices, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def manifest(self) -> dict:
        split = self.split
        return {
            "name": self.name,
            "users": len(self.users),
            "items": self.n_items,
            "interactions": self.n_interactions,
            "fields": sorted(self.items.fields),
            "eval_users": len(split.test),
            "train_only_users": split.n_train_only_users,
            "content_hash": self.content_hash(),
            "source": self.source,
            **({"cold_items": self.cold_manifest()} if self.cold is not None else {}),
        }

    def cold_manifest(self) -> dict:
        c = self.cold
        idx = [int(i) for i in c.indices]
        new = set(idx)
        test_targets = sum(1 for e in self.split.test if e.target in new)
        return {"fraction": c.fraction, "seed": c.seed, "count": len(idx), "cold_test_users": test_targets,
                "removed_interactions": c.removed_interactions, "removed_users": c.removed_users,
                "indices": idx, "ids": [self.items.ids[i] for i in idx]}

    # ---- persistence -------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: build in a temporary sibling folder, then rename over ``path``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.validate()
        path = Path(path)
        tmp = temp_dir(path)
        try:
            cols = {"index": pa.array(np.arange(self.n_items, dtype=np.int32)),
                    "id": pa.array(self.items.ids, pa.string())}
            for name, values in self.items.fields.items():
                cols[name] = pa.array(values, pa.string())
            pq.write_table(pa.table(cols), tmp / "items.parquet")
            seqs = pa.array([np.asarray(s, dtype=np.int32) for s in self.sequences], pa.list_(pa.int32()))
            pq.write_table(pa.table({"user": pa.array(self.users, pa.string()), "items": seqs}),
                           tmp / "sequences.parquet")
            (tmp / "manifest.json").write_text(json.dumps(self.manifest(), indent=2) + "\n")
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SequenceDataset":
        import pyarrow.parquet as pq

        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{path} is not a prepared dataset (no manifest.json); "
                            "run `itemgen data prepare` first")
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{manifest_path} is corrupt ({printable(str(e), 200)}); prepare the dataset again") from None
        cold = manifest.get("cold_items")
        if cold is not None:
            try:
                cold = ColdItems(np.asarray(cold["indices"], dtype=np.int64), float(cold["fraction"]),
                                 int(cold["seed"]), int(cold.get("removed_interactions", 0)),
                                 int(cold.get("removed_users", 0)))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{manifest_path}: cold_items is malformed ({type(e).__name__}: {e})") from None
        try:
            items = pq.read_table(path / "items.parquet").to_pydict()
            ids = [str(x) for x in items.pop("id")]
            items.pop("index", None)
            table = ItemTable(ids, {k: v for k, v in items.items()})
            seqs = pq.read_table(path / "sequences.parquet")
            users = [str(u) for u in seqs.column("user").to_pylist()]
            sequences = [np.asarray(s, dtype=np.int64) for s in seqs.column("items").to_pylist()]
            ds = cls(manifest.get("name", path.name), table, users, sequences, manifest.get("source", {}), cold)
            ds.validate()
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        except (OSError, KeyError, ValueError, TypeError) as e:  # pyarrow's errors are OSError/ValueError
            raise DataError(f"{path}: cannot read the prepared dataset ({type(e).__name__}: "
                            f"{printable(str(e), 200)}); prepare it again") from None
        if manifest.get("content_hash") not in (None, ds.content_hash()):
            raise DataError(f"{path}: content does not match manifest.json's content_hash "
                            "(files changed or half-written); prepare it again")
        return ds


def make_cold(ds: SequenceDataset, fraction: float, seed: int = 0) -> SequenceDataset:
    """The cold-start protocol: ``fraction`` of the items, drawn at random with ``seed``, become
    NEW items. Every interaction with a new item is removed from the sequences, except a user's
    last one (the test target) when the user stays evaluated (>= MIN_EVAL_LENGTH items); so no
    training or validation input or label holds a new item, the test examples whose target is new
    form the cold segment, and the catalog keeps every item (ranking is over old and new items).
    Users left with no interaction are dropped."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"cold items: the fraction must be in (0, 1), not {fraction}")
    n_cold = int(round(fraction * ds.n_items))
    if n_cold < 1:
        raise DataError(f"cold items: {fraction} of {ds.n_items} items is no item")
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(ds.n_items, n_cold, replace=False)).astype(np.int64)
    new = np.zeros(ds.n_items, dtype=bool)
    new[cold] = True
    users, sequences, removed = [], [], 0
    for user, seq in zip(ds.users, ds.sequences):
        seq = np.asarray(seq, dtype=np.int64)
        kept = seq[:-1][~new[seq[:-1]]] if len(seq) else seq
        if len(seq) and (not new[seq[-1]] or len(kept) + 1 >= MIN_EVAL_LENGTH):
            kept = np.append(kept, seq[-1])  # an old last item, or a new one that stays a test target
        removed += len(seq) - len(kept)
        if len(kept):
            users.append(user)
            sequences.append(kept)
    spec = ColdItems(cold, float(fraction), int(seed), removed, len(ds.users) - len(users))
    out = SequenceDataset(ds.name, ds.items, users, sequences, ds.source, spec)
    out.validate()
    return out


def training_sequences(ds: SequenceDataset, max_history: int) -> list[np.ndarray]:
    """Each user's training part, last max_history + 1 items (history + label); >= 2 items."""
    return [s[-(max_history + 1):] for s in ds.split.train if len(s) >= 2]


def earlier_items(seqs: list[np.ndarray], last_only: bool = False) -> np.ndarray:
    """(P, 2) int64 pairs (label index, item) for ``loss.exclude_history``: every item that came
    before a label in its sequence, with labels numbered as next-item models order them (sequence
    by sequence, position by position: label j of a sequence predicts s[j + 1] from s[:j + 1];
    ``last_only``: one label per sequence, its last item). A label's own item is never paired
    with it, so the label always stays in its softmax even when a user repeats an item."""
    out, n = [], 0
    for s in seqs:
        s = np.asarray(s, dtype=np.int64)
        for j in (range(len(s) - 1) if not last_only else [len(s) - 2]):
            prev = s[: j + 1]
            prev = prev[prev != s[j + 1]]
            out.append(np.stack([np.full(len(prev), n, dtype=np.int64), prev], 1))
            n += 1
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def history_pairs(seqs: list[np.ndarray], last_only: bool = False) -> np.ndarray:
    """(P, 3) int64 (label index, item, recency) for the repeat bias (models/repeat_bias.py): every
    distinct item before a label in its sequence, at its most recent occurrence, with how far back
    that is (0: the item the label is read from, the last one before it). Labels are numbered as
    in :func:`earlier_items`. Unlike there, the label's own item is listed when the user had it
    before: that pair is what teaches the bias that users repeat."""
    out, n = [], 0
    for s in seqs:
        s = np.asarray(s, dtype=np.int64)
        m = len(s) - 1  # labels j = 0..m-1 predict s[j + 1] from s[:j + 1]
        if m < 1:
            continue
        # nxt[p]: the next position (< m) holding s[p]'s item, m if none: s[p] is the most recent
        # occurrence for the labels j < nxt[p]
        nxt = np.full(m, m, dtype=np.int64)
        last: dict[int, int] = {}
        for p in range(m - 1, -1, -1):
            nxt[p] = last.get(int(s[p]), m)
            last[int(s[p])] = p
        j, p = np.tril_indices(m) if not last_only else (np.full(m, m - 1), np.arange(m))
        keep = nxt[p] > j
        j, p = j[keep], p[keep]
        label = n + (j if not last_only else np.zeros_like(j))
        out.append(np.stack([label, s[p], j - p], 1))
        n += m if not last_only else 1
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)
