"""Dataset loaders: turn public recommendation data into a :class:`~itemgen.data.dataset.SequenceDataset`.

Three input formats are read, and :func:`prepare` writes any of them as a prepared dataset:

``lcrec`` (:func:`load_lcrec`)
    The LC-Rec JSON layout: ``X.inter.json`` (user -> chronological item indices), plus
    ``X.item.json`` (item index -> metadata) and/or ``X.item2id`` (``ASIN<TAB>index``).
``table`` (:func:`load_table`)
    A CSV / TSV / Parquet interaction table (user, item, timestamp), plus an optional item table.
``amazon2018`` (:func:`load_amazon2018`)
    The official Amazon Reviews 2018 raw files ``<Category>[_5].json.gz`` and
    ``meta_<Category>.json.gz``; :func:`download_amazon2018` fetches them.

Conventions shared by every loader
-----------------------------------
* Item metadata is normalised into the fields of :data:`itemgen.data.dataset.METADATA_FIELDS`
  (title, brand, price, category, description); a field is kept only when at least one item
  has a value for it, and empty strings become ``None``.
* ``category`` holds the most specific ``category_levels`` levels of the category path
  (default 2) joined by ``" > "``; ``category_levels=0`` keeps the whole path. LC-Rec stores the
  path as one comma-joined string whose separator is ambiguous: when the string contains a
  comma not followed by a space (Amazon 2018 exports such as Scientific) levels are split on
  those commas, which is exact; otherwise (Amazon 2014 exports such as Office) levels are split
  on ``", "``, which splits level names that themselves contain ``", "`` (rare in the last two
  levels). The Amazon 2018 meta files give a list, which is exact.
* LC-Rec and Amazon 2018 text is cleaned: HTML entities unescaped (``AT&amp;T`` -> ``AT&T``),
  HTML tags removed, runs of whitespace collapsed. Table text is kept verbatim (only stripped).
* Every user's sequence is chronological. Ties in time keep input order (stable sort), never
  broken by item id.
* Only items that have at least one interaction (after filtering) are kept; item indices are
  dense 0..I-1. Users with no interactions are dropped. Both are counted in ``source``.
* Optional k-core filtering drops users and items with fewer than ``k`` interactions,
  repeatedly, until none is left.
* ``source`` records the loader, its input paths, the options and every filter with counts.
* Loaders only read: they never write anything, so a failure leaves no output behind, and
  :func:`prepare` writes through the atomic :meth:`SequenceDataset.save`.
"""

from __future__ import annotations

import ast
import gzip
import html
import inspect
import json
import os
import re
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from itemgen.core.io import printable
from itemgen.core.progress import Progress, phase
from itemgen.data.dataset import METADATA_FIELDS, DataError, ItemTable, SequenceDataset, make_cold

__all__ = [
    "AMAZON2018_BASE_URL",
    "AMAZON2018_CATEGORIES",
    "KINDS",
    "check_output",
    "download_amazon2018",
    "load_amazon2018",
    "load_lcrec",
    "load_table",
    "prepare",
]

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------

_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
_WS_RE = re.compile(r"\s+")
_PRICE_RE = re.compile(r"^\$\s?\d[\d,]*(\.\d+)?(\s*-\s*\$\s?\d[\d,]*(\.\d+)?)?$")


def _clean_text(value: Any) -> str | None:
    """Entities unescaped, tags removed, whitespace collapsed; empty -> None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v is not None)
    text = html.unescape(_TAG_RE.sub(" ", str(value)))
    text = _WS_RE.sub(" ", text).strip()
    return text or None


def _plain(value: Any) -> str | None:
    """Table values: stripped string, empty/None -> None."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _clean_price(value: Any) -> str | None:
    text = _clean_text(value)
    if text is None or not _PRICE_RE.match(text):
        return None
    return text


def _category_from_levels(levels: Sequence[Any], keep: int) -> str | None:
    parts = [c for c in (_clean_text(x) for x in levels) if c]
    if not parts:
        return None
    if keep > 0:
        parts = parts[-keep:]
    return " > ".join(parts)


def _split_lcrec_categories(text: str) -> list[str]:
    if re.search(r",(?! )", text):
        return re.split(r",(?! )", text)
    return text.split(", ")


def _kcore_mask(u: np.ndarray, i: np.ndarray, n_users: int, n_items: int, k: int) -> tuple[np.ndarray, int]:
    keep = np.ones(len(u), dtype=bool)
    rounds = 0
    if k <= 1:
        return keep, rounds
    while True:
        uc = np.bincount(u[keep], minlength=n_users)
        ic = np.bincount(i[keep], minlength=n_items)
        bad = keep & ((uc[u] < k) | (ic[i] < k))
        if not bad.any():
            return keep, rounds
        keep &= ~bad
        rounds += 1


def _assemble(
    name: str,
    *,
    user_ids: Sequence[str],
    u: np.ndarray,
    item_ids: Sequence[str],
    fields: Mapping[str, Sequence[str | None]],
    i: np.ndarray,
    kcore: int,
    item_order: str,
    source: dict,
) -> SequenceDataset:
    """Build the dataset from interaction codes.

    ``u``/``i`` index ``user_ids``/``item_ids``; interactions of one user must already be in
    chronological order relative to each other (users may interleave). Users keep the order of
    ``user_ids``; items keep the order of ``item_ids`` (``item_order="given"``) or are numbered
    by first appearance walking the users in order (``"appearance"``).
    """
    if kcore < 0:
        raise DataError(f"kcore must be >= 0, not {kcore}")
    u = np.asarray(u, dtype=np.int64)
    i = np.asarray(i, dtype=np.int64)
    n_users, n_items = len(user_ids), len(item_ids)
    filters = source.setdefault("filters", {})
    users_before = int(len(np.unique(u)))
    items_before = int(len(np.unique(i)))
    filters["users_without_interactions_dropped"] = n_users - users_before
    filters["items_without_interactions_dropped"] = n_items - items_before

    keep, rounds = _kcore_mask(u, i, n_users, n_items, kcore)
    u, i = u[keep], i[keep]
    if kcore > 1:
        filters["kcore"] = {
            "k": int(kcore),
            "rounds": rounds,
            "removed_users": users_before - int(len(np.unique(u))),
            "removed_items": items_before - int(len(np.unique(i))),
            "removed_interactions": int((~keep).sum()),
        }
    if len(u) == 0:
        raise DataError(f"{name}: no interactions left"
                        + (f" after {kcore}-core filtering" if kcore > 1 else ""))

    # group by user (stable: keeps the chronological order inside each user)
    order = np.argsort(u, kind="stable")
    u, i = u[order], i[order]
    used_users, user_counts = np.unique(u, return_counts=True)

    if item_order == "given":
        used_items = np.unique(i)
    elif item_order == "appearance":
        uniq, first = np.unique(i, return_index=True)
        used_items = uniq[np.argsort(first, kind="stable")]
    else:  # pragma: no cover - internal misuse
        raise ValueError(item_order)
    remap = np.full(n_items, -1, dtype=np.int64)
    remap[used_items] = np.arange(len(used_items))
    i = remap[i]

    sequences = np.split(i, np.cumsum(user_counts)[:-1])
    table = ItemTable(
        [item_ids[j] for j in used_items],
        {f: [vals[j] for j in used_items] for f, vals in fields.items()},
    )
    ds = SequenceDataset(name, table, [user_ids[j] for j in used_users], list(sequences), source)
    ds.validate()
    return ds


def _present_fields(fields: Mapping[str, list[str | None]]) -> dict[str, list[str | None]]:
    """Keep only fields with at least one value, in METADATA_FIELDS order."""
    return {f: fields[f] for f in METADATA_FIELDS if f in fields and any(v is not None for v in fields[f])}


def _resolved(path: PathLike) -> str:
    return str(Path(path).resolve())


# ---------------------------------------------------------------------------------------------
# LC-Rec JSON
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _dense_index(keys: Sequence[Any], path: Path, what: str) -> int:
    """Check that ``keys`` are exactly the integers 0..n-1; return n."""
    seen: set[int] = set()
    for key in keys:
        try:
            idx = int(key)
            if str(idx) != str(key).strip() or isinstance(key, bool):
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(f"{path}: {what} {key!r} is not an integer item index") from None
        if idx < 0:
            raise DataError(f"{path}: {what} {key!r} is negative")
        if idx in seen:
            raise DataError(f"{path}: {what} {key!r} appears twice")
        seen.add(idx)
    n = len(seen)
    if seen and max(seen) != n - 1:
        missing = sorted(set(range(max(seen) + 1)) - seen)
        raise DataError(f"{path}: item indices are not dense 0..{n - 1}: missing "
                        + ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else ""))
    return n


def _find_lcrec_prefix(path: Path) -> tuple[Path, str]:
    if path.is_file() and path.name.endswith(".inter.json"):
        return path.parent, path.name[: -len(".inter.json")]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    if not path.is_dir():
        raise DataError(f"{path}: expected an LC-Rec directory holding X.inter.json")
    found = sorted(p.name[: -len(".inter.json")] for p in path.glob("*.inter.json"))
    if not found:
        raise DataError(f"{path}: no *.inter.json file (LC-Rec layout: X.inter.json plus "
                        "X.item.json and/or X.item2id)")
    if len(found) > 1:
        raise DataError(f"{path}: several LC-Rec datasets ({', '.join(f + '.inter.json' for f in found)}); "
                        "pass the .inter.json file you mean")
    return path, found[0]


def load_lcrec(path: PathLike, name: str | None = None, *, kcore: int = 0,
               category_levels: int = 2) -> SequenceDataset:
    """Read an LC-Rec dataset directory (or its ``X.inter.json`` file).

    Items are the indices of ``X.item.json`` and/or ``X.item2id`` (both must be dense 0..I-1 and
    agree when both exist). An item's external id is its ASIN from ``X.item2id`` when that file
    exists, else the LC-Rec index as a string. Metadata comes from ``X.item.json``: title, brand,
    description, price when present, and ``categories`` -> ``category`` (see the module notes).
    User ids are the JSON keys of ``X.inter.json``, in file order; each list keeps its order.
    """
    directory, prefix = _find_lcrec_prefix(Path(path))
    name = name or prefix
    inter_path = directory / f"{prefix}.inter.json"
    item_path = directory / f"{prefix}.item.json"
    map_path = directory / f"{prefix}.item2id"
    if not item_path.is_file() and not map_path.is_file():
        raise DataError(f"{directory}: {inter_path.name} has neither {item_path.name} nor {map_path.name} "
                        "beside it, so the item catalog is unknown")

    n_items: int | None = None
    fields: dict[str, list[str | None]] = {}
    if item_path.is_file():
        meta = _read_json(item_path)
        if not isinstance(meta, dict):
            raise DataError(f"{item_path}: expected a JSON object of item index -> metadata")
        n_items = _dense_index(list(meta), item_path, "item key")
        by_index: list[Any] = [None] * n_items
        for key, value in meta.items():
            if not isinstance(value, dict):
                raise DataError(f"{item_path}: item {key!r} is not a JSON object")
            by_index[int(key)] = value
        raw = {f: [None] * n_items for f in METADATA_FIELDS}
        for j, value in enumerate(by_index):
            raw["title"][j] = _clean_text(value.get("title"))
            raw["brand"][j] = _clean_text(value.get("brand"))
            raw["description"][j] = _clean_text(value.get("description"))
            raw["price"][j] = _clean_price(value.get("price"))
            cats = value.get("categories", value.get("category"))
            if isinstance(cats, str):
                cats = _split_lcrec_categories(cats)
            raw["category"][j] = _category_from_levels(cats or [], category_levels)
        fields = _present_fields(raw)

    ids: list[str] | None = None
    if map_path.is_file():
        pairs: list[tuple[str, str]] = []
        with open(map_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != 2 or not parts[0].strip():
                    raise DataError(f"{map_path}: line {lineno}: expected ASIN<TAB>item index, "
                                    f"got {printable(repr(line.strip()), 100)}")
                if "\0" in parts[0]:
                    raise DataError(f"{map_path}: line {lineno}: ASIN {parts[0].strip()!r} contains a NUL byte")
                pairs.append((parts[0].strip(), parts[1].strip()))
        n_map = _dense_index([p[1] for p in pairs], map_path, "item index")
        if n_items is not None and n_map != n_items:
            raise DataError(f"{map_path} lists {n_map} items but {item_path} lists {n_items}")
        n_items = n_map
        ids = [""] * n_items
        seen_asin: dict[str, int] = {}
        for asin, idx in pairs:
            if asin in seen_asin:
                raise DataError(f"{map_path}: ASIN {asin} maps to both {seen_asin[asin]} and {idx}")
            seen_asin[asin] = int(idx)
            ids[int(idx)] = asin
    assert n_items is not None
    if ids is None:
        ids = [str(j) for j in range(n_items)]

    inter = _read_json(inter_path)
    if not isinstance(inter, dict):
        raise DataError(f"{inter_path}: expected a JSON object of user -> list of item indices")
    users = [str(k) for k in inter]
    lengths = np.zeros(len(users), dtype=np.int64)
    flat: list[int] = []
    for uidx, (user, seq) in enumerate(inter.items()):
        if not isinstance(seq, list) or not all(type(x) is int for x in seq):
            raise DataError(f"{inter_path}: user {user!r}: expected a list of integer item indices")
        bad = [x for x in seq if x < 0 or x >= n_items]
        if bad:
            raise DataError(f"{inter_path}: user {user!r} names item {bad[0]}, which is not in the catalog "
                            f"(items 0..{n_items - 1} from {item_path.name if item_path.is_file() else map_path.name})")
        lengths[uidx] = len(seq)
        flat.extend(seq)
    u = np.repeat(np.arange(len(users)), lengths)
    source = {
        "loader": "lcrec",
        "inputs": {"interactions": _resolved(inter_path),
                   **({"items": _resolved(item_path)} if item_path.is_file() else {}),
                   **({"item2id": _resolved(map_path)} if map_path.is_file() else {})},
        "options": {"kcore": kcore, "category_levels": category_levels},
        "filters": {},
    }
    return _assemble(name, user_ids=users, u=u, item_ids=ids, fields=fields,
                     i=np.asarray(flat, dtype=np.int64), kcore=kcore, item_order="given", source=source)


# ---------------------------------------------------------------------------------------------
# CSV / TSV / Parquet tables
# ---------------------------------------------------------------------------------------------

def _table_format(path: Path, sep: str | None) -> tuple[str, str | None]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zst", ".lz4"):
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".parquet", ".pq"):
        return "parquet", None
    if sep is not None:
        return "csv", sep
    if ext in (".tsv", ".tab"):
        return "csv", "\t"
    if ext == ".csv":
        return "csv", ","
    raise DataError(f"{path}: cannot tell the format from the extension "
                    "(use .csv, .tsv or .parquet, or pass sep=)")


def _find_bad_line(path: Path, sep: str) -> str:
    """After a parse error: the first data row whose field count differs from the header's."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            header = f.readline()
            n = len(header.rstrip("\r\n").split(sep))
            row = 0
            for line in f:
                if not line.strip():
                    continue
                row += 1
                got = len(line.rstrip("\r\n").split(sep))
                if got != n:
                    return f"row {row}: expected {n} fields, got {got}"
    except OSError:
        pass
    return ""


def _read_any_table(path: Path, sep: str | None, string_cols: Sequence[str]):
    """Read a CSV/TSV/Parquet file into a pyarrow Table. CSV columns named in ``string_cols``
    are read as strings (so ids like 007 and bad timestamps survive for checking)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    fmt, delim = _table_format(path, sep)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delim),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in string_cols},
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        where = _find_bad_line(path, delim) if fmt == "csv" else ""
        # Arrow quotes the offending row, which in a binary file is raw control bytes
        msg = printable(str(e).splitlines()[0], 120) if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read as {'Parquet' if fmt == 'parquet' else 'CSV'}"
                        f"{': ' + where if where else ''} ({msg})") from None


def _require_columns(table, path: Path, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(repr, missing))}; the file has columns "
                        f"{', '.join(map(repr, table.column_names))}")


def _id_column(table, col: str, path: Path) -> list[str]:
    values = table.column(col).to_pylist()
    out = []
    for row, v in enumerate(values, 1):
        s = None if v is None else str(v).strip()
        if not s:
            raise DataError(f"{path}: row {row}: empty {col!r}")
        if "\0" in s:
            raise DataError(f"{path}: row {row}: {col!r} {printable(repr(s), 80)} contains a NUL byte")
        out.append(s)
    return out


def _timestamp_column(table, col: str, path: Path) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = table.column(col)
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        arr = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
        t = arr.type
    if arr.null_count:
        row = int(np.flatnonzero(np.asarray(arr.is_null().to_numpy(zero_copy_only=False)))[0]) + 1
        raise DataError(f"{path}: row {row}: missing {col!r}")
    ts = None
    if pa.types.is_integer(t):
        if pa.types.is_unsigned_integer(t) and len(arr) and pc.max(arr).as_py() > _INT64_MAX:
            row = int(np.argmax(arr.to_numpy() > _INT64_MAX)) + 1
            raise DataError(f"{path}: row {row}: {col!r} is too large for a Unix time "
                            f"({arr[row - 1].as_py()} > {_INT64_MAX})")
        ts = arr.to_numpy().astype(np.int64)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        try:  # fast path; the loop below finds the row at fault
            ts = pc.cast(arr, pa.int64()).to_numpy().astype(np.int64)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ts = None
    if ts is None:
        values = arr.to_pylist()
        ts = np.empty(len(values), dtype=np.int64)
        for row, v in enumerate(values, 1):
            try:
                if isinstance(v, float):
                    if not v.is_integer():
                        raise ValueError
                    iv = int(v)
                elif isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
                    iv = int(v)
                else:
                    raise ValueError
            except (ValueError, OverflowError):
                raise DataError(f"{path}: row {row}: {col!r} must be an integer Unix time, "
                                f"got {printable(repr(v), 80)}") from None
            if not -_INT64_MAX - 1 <= iv <= _INT64_MAX:
                raise DataError(f"{path}: row {row}: {col!r} is too large for a Unix time "
                                f"({printable(repr(v), 80)}; the largest is {_INT64_MAX})")
            ts[row - 1] = iv
    neg = np.flatnonzero(ts < 0)
    if len(neg):
        raise DataError(f"{path}: row {neg[0] + 1}: {col!r} is negative ({ts[neg[0]]})")
    return ts


_INT64_MAX = 2**63 - 1  # timestamps are int64


def _codes(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """First-appearance codes."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return codes, list(index)


def _first_duplicate(u: np.ndarray, i: np.ndarray, ts: np.ndarray) -> tuple[int, int] | None:
    """(earlier row, later row), 0-based, of the first repeated (user, item, time); None if none."""
    if len(u) < 2:
        return None
    order = np.lexsort((ts, i, u))
    a, b = order[:-1], order[1:]
    eq = (u[a] == u[b]) & (i[a] == i[b]) & (ts[a] == ts[b])
    if not eq.any():
        return None
    later = b[eq]
    k = int(np.argmin(later))
    return int(a[eq][k]), int(later[k])


_TABLE_ALIASES = {"categories": "category", "text": "title"}


def load_table(
    interactions: PathLike,
    items: PathLike | None = None,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    sep: str | None = None,
    kcore: int = 0,
    item_id_col: str | None = None,
    external_id_col: str | None = "asin",
    text_cols: Mapping[str, str] | None = None,
    name: str | None = None,
) -> SequenceDataset:
    """Read an interaction table (CSV, TSV or Parquet by extension) and an optional item table.

    Interactions: one row per (user, item, timestamp); timestamps are non-negative integers
    (Unix time). Each user's rows are stably sorted on time: ties keep file order. Users are
    numbered in order of first appearance in the file.

    Items (optional): ``item_id_col`` (default: ``item_col``) is the key the interactions use;
    when the table also has ``external_id_col`` (``"asin"`` by default) that column is the item's
    external id, else the key is. Metadata columns named like a field (title, brand, price,
    category, description) are taken as they are; ``categories`` maps to ``category`` and
    ``text`` to ``title`` when no such column exists (the office-raw ``items.tsv`` layout:
    ``item_id, asin, text``). ``text_cols`` maps further column names to fields. Item indices
    follow the item table's row order; without an item table, first appearance walking users in
    order.

    Errors (:class:`DataError`, naming the file and the 1-based data row): missing columns, empty
    file, bad, non-integer or negative timestamps, items absent from the item table, repeated
    (user, item, timestamp) rows, repeated item ids in the item table.
    """
    inter_path = Path(interactions)
    table = _read_any_table(inter_path, sep, [user_col, item_col, time_col])
    _require_columns(table, inter_path, [user_col, item_col, time_col])
    if table.num_rows == 0:
        raise DataError(f"{inter_path}: no data rows")
    user_vals = _id_column(table, user_col, inter_path)
    item_vals = _id_column(table, item_col, inter_path)
    ts = _timestamp_column(table, time_col, inter_path)
    del table

    u, user_ids = _codes(user_vals)
    fields: dict[str, list[str | None]] = {}
    mapping: dict[str, str] = {}
    if items is not None:
        items_path = Path(items)
        key_col = item_id_col or item_col
        string_cols = [key_col, *([external_id_col] if external_id_col else []), *METADATA_FIELDS,
                       *_TABLE_ALIASES, *(text_cols or {})]
        itable = _read_any_table(items_path, sep, string_cols)
        _require_columns(itable, items_path, [key_col])
        if itable.num_rows == 0:
            raise DataError(f"{items_path}: no data rows")
        keys = _id_column(itable, key_col, items_path)
        key_index: dict[str, int] = {}
        for row, key in enumerate(keys, 1):
            if key in key_index:
                raise DataError(f"{items_path}: row {row}: item {key!r} already listed in row {key_index[key] + 1}")
            key_index[key] = row - 1
        if external_id_col and external_id_col in itable.column_names and external_id_col != key_col:
            ext = _id_column(itable, external_id_col, items_path)
            seen: dict[str, int] = {}
            for row, x in enumerate(ext, 1):
                if x in seen:
                    raise DataError(f"{items_path}: row {row}: {external_id_col} {x!r} already used in row {seen[x]}")
                seen[x] = row
            item_ids = ext
        else:
            item_ids = keys
        cols = set(itable.column_names)
        for f in METADATA_FIELDS:
            if f in cols:
                mapping[f] = f
        for col, f in _TABLE_ALIASES.items():
            if col in cols and f not in mapping.values():
                mapping[col] = f
        for col, f in (text_cols or {}).items():
            if f not in METADATA_FIELDS:
                raise DataError(f"text_cols: {f!r} is not a metadata field ({', '.join(METADATA_FIELDS)})")
            if col not in cols:
                _require_columns(itable, items_path, [col])
            mapping = {c: g for c, g in mapping.items() if g != f}
            mapping[col] = f
        for col, f in mapping.items():
            fields[f] = [_plain(v) for v in itable.column(col).to_pylist()]
        fields = _present_fields(fields)
        del itable
        i = np.empty(len(item_vals), dtype=np.int64)
        for row, key in enumerate(item_vals):
            j = key_index.get(key)
            if j is None:
                raise DataError(f"{inter_path}: row {row + 1}: item {key!r} is not in the item table {items_path}")
            i[row] = j
        item_order = "given"
    else:
        items_path = None
        i, item_ids = _codes(item_vals)
        item_order = "appearance"

    dup = _first_duplicate(u, i, ts)
    if dup is not None:
        a, b = dup
        raise DataError(f"{inter_path}: row {b + 1} repeats row {a + 1} "
                        f"(user {user_vals[b]!r}, item {item_vals[b]!r}, {time_col} {ts[b]})")

    order = np.argsort(ts, kind="stable")  # chronological, ties in file order
    if name is None:
        generic = {"interactions", "inter", "ratings", "reviews", "data", "events"}
        stem = inter_path.name.split(".")[0]
        name = inter_path.resolve().parent.name if stem.lower() in generic else stem
    source = {
        "loader": "table",
        "inputs": {"interactions": _resolved(inter_path),
                   **({"items": _resolved(items_path)} if items_path is not None else {})},
        "options": {"user_col": user_col, "item_col": item_col, "time_col": time_col, "kcore": kcore,
                    **({"item_fields": mapping} if mapping else {})},
        "filters": {},
    }
    return _assemble(name, user_ids=user_ids, u=u[order], item_ids=item_ids, fields=fields, i=i[order],
                     kcore=kcore, item_order=item_order, source=source)


# ---------------------------------------------------------------------------------------------
# Amazon Reviews 2018 raw files
# ---------------------------------------------------------------------------------------------

def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line: strict JSON first, then a Python literal
    (some 2018 meta files were written with Python's repr)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f, Progress(f"read {path.name}", unit="line") as tracker:
            for lineno, raw in enumerate(f, 1):
                if lineno % 10_000 == 0:
                    tracker.update(10_000)
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError:
                    try:
                        obj = ast.literal_eval(raw.decode("utf-8").strip())
                    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError,
                            TypeError):
                        text = raw[:80].decode("utf-8", "replace").strip()
                        raise DataError(f"{path}: line {lineno}: neither JSON nor a Python literal: {text!r}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {lineno}: expected an object, got {type(obj).__name__}")
                yield lineno, obj
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: cannot read ({e})") from None


def _category_stem(path: Path) -> str:
    stem = path.name
    for ext in (".gz", ".json", ".jsonl"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return stem


def load_amazon2018(
    reviews_path: PathLike,
    meta_path: PathLike | None = None,
    *,
    kcore: int = 5,
    name: str | None = None,
    require_title: bool = False,
    category_levels: int = 2,
) -> SequenceDataset:
    """Read the official Amazon Reviews 2018 files.

    ``reviews_path``: ``<Category>.json.gz`` or ``<Category>_5.json.gz``, one JSON object per
    line with ``reviewerID``, ``asin`` and ``unixReviewTime``. Exact repeats of (reviewer, asin,
    time) occur in the official files: they are dropped (first kept) and counted in
    ``source["filters"]["duplicates_dropped"]``. Users are ordered by first appearance, each
    user's reviews stably by time (ties keep file order), items by first appearance.

    ``meta_path``: ``meta_<Category>.json.gz`` with asin, title, brand, price (``"$12.99"``; kept
    as that string, ``None`` when missing or not a price), category (a list: the most specific
    ``category_levels`` levels joined by ``" > "``) and description (a list, joined). Lines that
    are not JSON are read as Python literals. The first line for an asin wins; items with no
    meta line get no metadata (counted). ``require_title=True`` drops reviews of items without
    a title before k-core filtering (``kcore``, 5 by default).
    """
    reviews_path = Path(reviews_path)
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for lineno, obj in _json_lines(reviews_path):
        try:
            user, asin, t = obj["reviewerID"], obj["asin"], obj["unixReviewTime"]
        except KeyError as e:
            raise DataError(f"{reviews_path}: line {lineno}: no {e.args[0]!r} field") from None
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            if isinstance(t, str) and t.strip().isdigit():
                t = int(t)
            else:
                raise DataError(f"{reviews_path}: line {lineno}: unixReviewTime must be a non-negative integer, "
                                f"got {printable(repr(t), 80)}")
        if t > _INT64_MAX:
            raise DataError(f"{reviews_path}: line {lineno}: unixReviewTime {t} is too large for a Unix time")
        if not user or not asin:
            raise DataError(f"{reviews_path}: line {lineno}: empty reviewerID or asin")
        if "\0" in str(asin):
            raise DataError(f"{reviews_path}: line {lineno}: asin {str(asin)!r} contains a NUL byte")
        users.append(str(user))
        items.append(str(asin))
        times.append(t)
    if not users:
        raise DataError(f"{reviews_path}: no reviews")

    n_raw = len(users)
    u, user_ids = _codes(users)
    i, item_ids = _codes(items)
    ts = np.asarray(times, dtype=np.int64)
    del users, items, times
    order = np.lexsort((np.arange(n_raw), ts, i, u))
    a, b = order[:-1], order[1:]
    dup = np.zeros(n_raw, dtype=bool)
    dup[b[(u[a] == u[b]) & (i[a] == i[b]) & (ts[a] == ts[b])]] = True  # later copies
    n_dup = int(dup.sum())
    keep = ~dup

    fields: dict[str, list[str | None]] = {}
    meta_stats: dict[str, int] = {}
    if meta_path is not None:
        meta_path = Path(meta_path)
        wanted = {asin: j for j, asin in enumerate(item_ids)}
        raw = {f: [None] * len(item_ids) for f in METADATA_FIELDS}
        found = np.zeros(len(item_ids), dtype=bool)
        repeats = 0
        for lineno, obj in _json_lines(meta_path):
            asin = obj.get("asin")
            if asin is None:
                raise DataError(f"{meta_path}: line {lineno}: no 'asin' field")
            j = wanted.get(str(asin))
            if j is None:
                continue
            if found[j]:
                repeats += 1
                continue
            found[j] = True
            raw["title"][j] = _clean_text(obj.get("title"))
            raw["brand"][j] = _clean_text(obj.get("brand"))
            raw["price"][j] = _clean_price(obj.get("price"))
            cats = obj.get("category", obj.get("categories"))
            if isinstance(cats, str):
                cats = [cats]
            elif isinstance(cats, list) and cats and isinstance(cats[0], list):  # 2014 style [[...]]
                cats = cats[0]
            raw["category"][j] = _category_from_levels(cats or [], category_levels)
            raw["description"][j] = _clean_text(obj.get("description"))
        fields = _present_fields(raw)
        meta_stats = {"meta_repeated_asins_ignored": repeats,
                      "items_without_metadata": int((~found).sum())}
        if require_title:
            titles = raw["title"]
            has_title = np.asarray([t is not None for t in titles], dtype=bool)
            no_title = keep & ~has_title[i]
            meta_stats["reviews_of_untitled_items_dropped"] = int(no_title.sum())
            keep &= ~no_title
    elif require_title:
        raise DataError("require_title needs the meta file")

    u, i, ts = u[keep], i[keep], ts[keep]
    order = np.argsort(ts, kind="stable")
    source = {
        "loader": "amazon2018",
        "inputs": {"reviews": _resolved(reviews_path),
                   **({"meta": _resolved(meta_path)} if meta_path is not None else {})},
        "options": {"kcore": kcore, "require_title": require_title, "category_levels": category_levels},
        "filters": {"reviews_read": n_raw, "duplicates_dropped": n_dup, **meta_stats},
    }
    ds = _assemble(name or _category_stem(reviews_path), user_ids=user_ids, u=u[order], item_ids=item_ids,
                   fields=fields, i=i[order], kcore=kcore, item_order="appearance", source=source)
    if meta_path is not None:  # recount over the items that survived
        titled = ds.items.fields.get("title")
        have = sum(1 for j in range(ds.n_items) if any(v[j] is not None for v in ds.items.fields.values()))
        ds.source["filters"]["kept_items_without_metadata"] = ds.n_items - have
        if titled is not None:
            ds.source["filters"]["kept_items_without_title"] = sum(t is None for t in titled)
    return ds


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------

AMAZON2018_BASE_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2"
AMAZON2018_PAGE = "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon_v2/"
AMAZON2018_CATEGORIES = (
    "AMAZON_FASHION", "All_Beauty", "Appliances", "Arts_Crafts_and_Sewing", "Automotive", "Books",
    "CDs_and_Vinyl", "Cell_Phones_and_Accessories", "Clothing_Shoes_and_Jewelry", "Digital_Music",
    "Electronics", "Gift_Cards", "Grocery_and_Gourmet_Food", "Home_and_Kitchen",
    "Industrial_and_Scientific", "Kindle_Store", "Luxury_Beauty", "Magazine_Subscriptions",
    "Movies_and_TV", "Musical_Instruments", "Office_Products", "Patio_Lawn_and_Garden",
    "Pet_Supplies", "Prime_Pantry", "Software", "Sports_and_Outdoors",
    "Tools_and_Home_Improvement", "Toys_and_Games", "Video_Games",
)
_CATEGORY_ALIASES = {
    "fashion": "AMAZON_FASHION", "beauty": "All_Beauty", "arts": "Arts_Crafts_and_Sewing",
    "cds": "CDs_and_Vinyl", "phones": "Cell_Phones_and_Accessories", "clothing": "Clothing_Shoes_and_Jewelry",
    "music": "Digital_Music", "grocery": "Grocery_and_Gourmet_Food", "home": "Home_and_Kitchen",
    "scientific": "Industrial_and_Scientific", "kindle": "Kindle_Store", "movies": "Movies_and_TV",
    "instruments": "Musical_Instruments", "office": "Office_Products", "garden": "Patio_Lawn_and_Garden",
    "pets": "Pet_Supplies", "pantry": "Prime_Pantry", "sports": "Sports_and_Outdoors",
    "tools": "Tools_and_Home_Improvement", "toys": "Toys_and_Games", "games": "Video_Games",
}


def _amazon2018_category(category: str) -> str:
    by_lower = {c.lower(): c for c in AMAZON2018_CATEGORIES}
    key = category.strip().lower()
    if key in by_lower:
        return by_lower[key]
    if key in _CATEGORY_ALIASES:
        return _CATEGORY_ALIASES[key]
    raise DataError(f"unknown Amazon 2018 category {category!r}; one of: {', '.join(AMAZON2018_CATEGORIES)} "
                    f"(or a short name: {', '.join(sorted(_CATEGORY_ALIASES))})")


def amazon2018_urls(category: str, *, five_core: bool = True,
                    base_url: str = AMAZON2018_BASE_URL) -> tuple[str, str]:
    """(reviews URL, meta URL) of one category."""
    cat = _amazon2018_category(category)
    base = base_url.rstrip("/")
    reviews = (f"{base}/categoryFilesSmall/{cat}_5.json.gz" if five_core
               else f"{base}/categoryFiles/{cat}.json.gz")
    return reviews, f"{base}/metaFiles2/meta_{cat}.json.gz"


def _fetch(url: str, dest: Path, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (https only)
                    size = getattr(resp, "headers", {}).get("Content-Length")
                    total = -(-int(size) // (1 << 20)) if size and size.isdigit() else None
                    with Progress(f"download {dest.name}", total, unit="MiB") as tracker:
                        while chunk := resp.read(1 << 20):
                            out.write(chunk)
                            tracker.update(1)
            except urllib.error.HTTPError as e:
                raise DataError(f"cannot download {url}: the server answered HTTP {e.code} {e.reason}; "
                                f"check the category name and {AMAZON2018_PAGE}") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", None) or e
                raise DataError(
                    f"cannot download {url}: no network access ({reason}); download the files by hand "
                    f"from {AMAZON2018_PAGE} and run "
                    "`itemgen data prepare amazon2018 REVIEWS META --out DIR`") from None
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def download_amazon2018(category: str, dest: PathLike, *, five_core: bool = True, meta: bool = True,
                        timeout: float = 60.0, base_url: str = AMAZON2018_BASE_URL,
                        overwrite: bool = False) -> tuple[Path, Path | None]:
    """Download one category's reviews (5-core by default, ``five_core=False`` for all reviews)
    and its meta file into ``dest``; returns (reviews path, meta path or None).

    ``category`` is an official file name such as ``Industrial_and_Scientific`` (any case) or a
    short name (``scientific``, ``office``, ``pets``, ...). Files already present are kept unless
    ``overwrite``. Each file is written to a temporary name and renamed when complete.
    """
    reviews_url, meta_url = amazon2018_urls(category, five_core=five_core, base_url=base_url)
    dest = Path(dest)
    paths: list[Path | None] = []
    for url in (reviews_url, meta_url if meta else None):
        if url is None:
            paths.append(None)
            continue
        target = dest / url.rsplit("/", 1)[1]
        if overwrite or not target.is_file() or target.stat().st_size == 0:
            _fetch(url, target, timeout)
        paths.append(target)
    return paths[0], paths[1]  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------

KINDS = ("lcrec", "table", "amazon2018")


def _call(loader, args: list, options: dict):
    params = inspect.signature(loader).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        kind = loader.__name__.removeprefix("load_")
        raise DataError(f"option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"do{'' if len(unknown) > 1 else 'es'} not apply to {kind} data")
    return loader(*args, **options)


# what SequenceDataset.save writes, and what is built from a dataset inside its folder
# (heads/clusters.py: DIR/clusters/): replacing a folder that holds nothing else loses nothing
DATASET_ENTRIES = frozenset({"manifest.json", "items.parquet", "sequences.parquet", "clusters"})


def _is_prepared_dataset(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "content_hash" in manifest


def check_output(out: PathLike, inputs: Sequence[PathLike], overwrite: bool = False) -> None:
    """Refuse to write a prepared dataset where doing so would destroy the user's files.

    ``out`` may be missing, an empty folder, or a prepared dataset (a folder holding only what
    :meth:`SequenceDataset.save` writes, and its ``clusters/``): it is replaced. Anything else
    that exists (a file, a folder with other files) is replaced only with ``overwrite``. An
    ``out`` that is an input, or a folder that holds one, is refused even with ``overwrite``:
    replacing it would delete the input."""
    out_path = Path(out)
    target = out_path.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if src == target or target in src.parents:
            what = "is" if src == target else "holds"
            raise DataError(f"--out {out_path} {what} the input {given}: writing the dataset there would delete "
                            "the input (even with --overwrite); choose another output folder")
    if not out_path.exists() and not out_path.is_symlink():
        return
    if out_path.is_dir() and not out_path.is_symlink():
        entries = {p.name for p in out_path.iterdir()}
        if not entries:
            return
        if _is_prepared_dataset(out_path):
            others = sorted(entries - DATASET_ENTRIES)
            if not others:
                return
            found = (f"a prepared dataset that also holds {', '.join(others[:5])}"
                     + (f" (+{len(others) - 5} more)" if len(others) > 5 else ""))
        else:
            found = f"a folder of {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} that is not a prepared dataset"
    else:
        found = "a file" if out_path.is_file() else "something that is not a folder"
    if not overwrite:
        raise DataError(f"--out {out_path} is {found}; preparing would delete it: choose another output, "
                        "or pass --overwrite to replace it")


def prepare(kind: str, inputs: PathLike | Sequence[PathLike], out: PathLike, *, cold_items: float | None = None,
            seed: int = 0, overwrite: bool = False, **options) -> SequenceDataset:
    """Load ``inputs`` with the loader for ``kind`` and save the dataset to ``out`` (atomically).

    * ``lcrec``: one input, the LC-Rec directory (or its ``X.inter.json``).
    * ``table``: the interaction table, optionally the item table (or ``items=``).
    * ``amazon2018``: the reviews file, optionally the meta file.

    ``options`` go to the loader (``kcore``, ``name``, ``user_col``, ...). ``cold_items``: the
    fraction of items made new with ``seed`` (dataset.make_cold, the cold-start protocol). Nothing
    is written unless loading succeeds; an existing ``out`` is replaced only by a complete dataset,
    and only when :func:`check_output` allows it (a prepared dataset or an empty folder; anything
    else needs ``overwrite``; an input never).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    options = {k: v for k, v in options.items() if v is not None}
    # before reading (fail fast), and again below with the files the loader actually read
    check_output(out, [*inputs, *([options["items"]] if "items" in options else [])], overwrite)
    if kind == "lcrec":
        if len(inputs) != 1:
            raise DataError(f"lcrec takes one input (the LC-Rec directory), got {len(inputs)}")
        with phase("prepare", f"read lcrec {inputs[0]}"):
            ds = _call(load_lcrec, inputs, options)
    elif kind == "table":
        if not 1 <= len(inputs) <= 2:
            raise DataError(f"table takes INTERACTIONS [ITEMS], got {len(inputs)} inputs")
        if len(inputs) == 2:
            if "items" in options:
                raise DataError("table: the item table was given both as an input and as items=")
            options["items"] = inputs.pop()
        with phase("prepare", f"read table {', '.join(map(str, inputs))}"):
            ds = _call(load_table, inputs, options)
    elif kind == "amazon2018":
        if not 1 <= len(inputs) <= 2:
            raise DataError(f"amazon2018 takes REVIEWS [META], got {len(inputs)} inputs")
        with phase("prepare", f"read amazon2018 {', '.join(map(str, inputs))}"):
            ds = _call(load_amazon2018, inputs, options)
    else:
        raise DataError(f"unknown dataset kind {kind!r}; one of: {', '.join(KINDS)}")
    check_output(out, [p for p in ds.source.get("inputs", {}).values() if isinstance(p, str)], overwrite)
    if cold_items is not None:
        ds = make_cold(ds, cold_items, seed)
    with phase("prepare", f"write {out}", users=len(ds.users), items=ds.n_items):
        ds.save(out)
    return ds
