"""New catalog items without retraining (``itemgen items add CKPT NEW_ITEMS``): each new item is
encoded by the checkpoint's own text encoder (items.text_encoder over items.text_fields, as the
training catalog was) and appended to the catalog and to every item-indexed tensor of the item
representation (item_repr.py) with NO ID part, exactly as an item without training interactions:
its input and output vectors come from its text alone. Trained weights are unchanged. With the
text-match path (items.text_match, models/text_match.py) any input and output view will do: a new
item's ID part is zero and its score is the text-match part (M q) . t_i alone.

Every check runs before anything is written, and the new checkpoint is written to a temporary
folder and renamed: bad input leaves every catalog as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from itemgen.core.config import Config
from itemgen.data.dataset import DataError, ItemTable
from itemgen.data.item_file import read_item_file
from itemgen.models.checkpoint import CheckpointError, load_checkpoint, read_config, read_items, save_checkpoint
from itemgen.models.item_repr import output_view, uses_text
from itemgen.models.text_view import TextEncoder, encode_items, item_text, item_texts, load_text_encoder

MAX_ITEMS = 10_000  # per file: encoding is ~1 ms an item on a CPU, and the whole file is checked first


@dataclass
class AddedItems:
    out: Path
    added: list[str]  # external ids, in file order
    n_items: int  # catalog size after


def addable_problem(cfg: Config) -> str | None:
    """Why a model with config ``cfg`` cannot vectorise new items from text (None: it can)."""
    it = cfg.items
    if cfg.model not in ("itemlm", "sasrec") or not uses_text(it):
        return (f"the model has no item text view ({cfg.model}, items.input={it.input}, items.output={it.output}): "
                "new items can only be vectorised from text by a model trained with one "
                "(items.input=text|text+id|dual|nullspace, items.output=text+id or items.text_match)")
    # with the text-match path any views will do: a new item is scored by its text (its output
    # ID part is zero) and, in a history, reads a zero ID row (input=id) as an untrained item would
    if it.text_match == 0 and output_view(it, cfg.model) == "untied":
        return ("the model scores items with per-item output vectors (items.output=untied): a new item's "
                "cannot come from its text; train with items.output=tied or text+id, or with items.text_match")
    if it.text_match == 0 and it.input == "id":
        return ("the model reads items by ID alone (items.input=id): a new item would have no input vector; "
                "train with items.input=text|text+id|dual|nullspace or items.text_match")
    if not it.text_encoder:
        return ("the model encoded item text with its own backbone as built (items.text_encoder=''), which "
                "training has changed since: new items cannot be encoded the same way; train with a named "
                "items.text_encoder (e.g. minilm)")
    return None


def check_addable(directory: Path) -> None:
    """Raise CheckpointError unless the checkpoint's item vectors can come from text alone."""
    problem = addable_problem(read_config(directory))
    if problem:
        raise CheckpointError(f"{directory}: {problem}")


def check_new_items(catalog: ItemTable, new: ItemTable, fields: tuple[str, ...], source: str) -> None:
    """DataError naming them for new items whose id is already in ``catalog`` or that have no
    text in ``fields`` (the checkpoint's items.text_fields)."""
    taken = [i for i in new.ids if i in catalog.index]
    if taken:
        raise DataError(f"{source}: {len(taken)} id{'s are' if len(taken) > 1 else ' is'} already in the catalog: "
                        f"{', '.join(taken[:10])}" + (" ..." if len(taken) > 10 else ""))
    empty = [new.ids[i] for i in range(len(new)) if not item_text(new, i, fields)]
    if empty:
        raise DataError(f"{source}: {len(empty)} item{'s have' if len(empty) > 1 else ' has'} no text in "
                        f"{', '.join(fields)} (the checkpoint's items.text_fields): {', '.join(empty[:10])}"
                        + (" ..." if len(empty) > 10 else ""))


def encode_new_items(new: ItemTable, encoder: TextEncoder, fields: tuple[str, ...]) -> torch.Tensor:
    """(N, F) the new items' text view, encoded as the training catalog's was (model.append_items)."""
    view, _ = encode_items(new, encoder, fields)
    return view


def merge_catalog(catalog: ItemTable, new: ItemTable) -> ItemTable:
    """The catalog with the new items appended (ids and titles: what a checkpoint's items.json keeps)."""
    titles = catalog.fields.get("title")
    new_titles = new.fields.get("title", [None] * len(new))
    return ItemTable(catalog.ids + new.ids,
                     {"title": (titles or [None] * len(catalog)) + list(new_titles)}
                     if titles is not None or "title" in new.fields else {})


def add_items(checkpoint: str | Path, new_items: str | Path, out: str | Path, *, overwrite: bool = False,
              max_items: int = MAX_ITEMS) -> AddedItems:
    """Write to ``out`` a copy of ``checkpoint`` whose catalog also holds the items of the file
    ``new_items`` (data/item_file.py), vectorised from their text."""
    checkpoint, out = Path(checkpoint), Path(out)
    if max_items < 1:
        raise ValueError(f"--max-items must be >= 1, not {max_items}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it (or choose another output)")
    check_addable(checkpoint)
    cfg = read_config(checkpoint)
    catalog, dataset = read_items(checkpoint)
    new = read_item_file(new_items, max_items)
    fields = tuple(cfg.items.text_fields)
    check_new_items(catalog, new, fields, f"{new_items} (catalog of {checkpoint})")
    model, _, _ = load_checkpoint(checkpoint)
    model.append_items(encode_new_items(new, load_text_encoder(cfg.items.text_encoder), fields),
                       item_texts(new, fields))
    merged = merge_catalog(catalog, new)
    metrics = _read_json(checkpoint / "metrics.json")
    metrics["added_items"] = metrics.get("added_items", 0) + len(new)
    dataset = {**dataset, "added_items": dataset.get("added_items", 0) + len(new)}
    save_checkpoint(out, model, cfg, merged, metrics=metrics, dataset=dataset)
    return AddedItems(out, list(new.ids), len(merged))


def _read_json(path: Path) -> dict:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return blob if isinstance(blob, dict) else {}
