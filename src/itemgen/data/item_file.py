"""A file of NEW catalog items (``itemgen items add``): a table (CSV, TSV, Parquet) or JSON lines,
one item per row with an ``id`` and text fields (title, brand, category, description, price as
present; ``categories`` is read as category). Only reading and checking the file lives here: the
checks against a catalog and the encoding are models/new_items.py's."""

from __future__ import annotations

from pathlib import Path

from itemgen.data.dataset import DataError, ItemTable
from itemgen.data.loaders import _clean_text, _json_lines, _read_any_table

TEXT_FIELDS = ("title", "brand", "category", "description", "price")
ALIASES = {"categories": "category"}
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def read_item_file(path: str | Path, max_items: int) -> ItemTable:
    """The items of ``path`` as an ItemTable (ids in file order, fields present in the file).
    Errors (DataError, naming the file and row): a missing file, an empty one, no ``id``, an
    empty or repeated id, more than ``max_items`` rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (no items to add)")
    rows = _json_rows(path, max_items) if path.name.lower().endswith(JSON_SUFFIXES) else _table_rows(path, max_items)
    return _item_table(rows, path)


def items_from_records(records: list[dict], source: str) -> ItemTable:
    """The same for records already parsed (the server's ``POST /v1/items``, which bounds their
    number): one dict per item with the keys of a JSON-lines row, read and checked exactly as
    :func:`read_item_file` reads a file, so that an item added over HTTP and one added from a
    file get the same text. ``source`` names them in messages (e.g. "request")."""
    return _item_table([_record(r, source, row) for row, r in enumerate(records, 1)], source)


def _item_table(rows: list[tuple[str, dict]], path) -> ItemTable:
    if not rows:
        raise DataError(f"{path}: no items to add")
    ids: list[str] = []
    seen: dict[str, int] = {}
    fields: dict[str, list[str | None]] = {}
    for row, (item_id, values) in enumerate(rows, 1):
        if item_id in seen:
            raise DataError(f"{path}: row {row}: id {item_id!r} repeats row {seen[item_id]}")
        seen[item_id] = row
        ids.append(item_id)
        for name in TEXT_FIELDS:
            if name in values:
                fields.setdefault(name, [None] * (row - 1))
        for name, column in fields.items():
            column.append(values.get(name))
    return ItemTable(ids, fields)


def _too_many(path: Path, count: str, max_items: int) -> DataError:
    return DataError(f"{path}: {count} items, over the limit of {max_items} per file (--max-items)")


def _record(obj: dict, path, row: int) -> tuple[str, dict[str, str | None]]:
    """(id, {field: cleaned text}) of one row; an empty id is an error naming the row."""
    raw = obj.get("id")
    item_id = None if raw is None else str(raw).strip()
    if not item_id:
        raise DataError(f"{path}: row {row}: empty or missing 'id'")
    values = {}
    for key, value in obj.items():
        name = ALIASES.get(key, key)
        if name in TEXT_FIELDS and (name not in values or values[name] is None):
            values[name] = _clean_text(value)
    return item_id, values


def _json_rows(path: Path, max_items: int) -> list[tuple[str, dict]]:
    rows = []
    for _, obj in _json_lines(path):
        rows.append(_record(obj, path, len(rows) + 1))
        if len(rows) > max_items:  # stop reading: the file is over the limit whatever follows
            raise _too_many(path, f"more than {max_items}", max_items)
    return rows


def _table_rows(path: Path, max_items: int) -> list[tuple[str, dict]]:
    table = _read_any_table(path, None, ["id"])
    if "id" not in table.column_names:
        raise DataError(f"{path}: missing column 'id'; the file has columns "
                        f"{', '.join(map(repr, table.column_names))}")
    if table.num_rows > max_items:
        raise _too_many(path, str(table.num_rows), max_items)
    return [_record(obj, path, row) for row, obj in enumerate(table.to_pylist(), 1)]
