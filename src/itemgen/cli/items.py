"""``itemgen items``: change a trained checkpoint's catalog without retraining.

    itemgen items add runs/itemlm-text/best new_items.jsonl --out runs/itemlm-text/with-new

Bad input prints ``error: <message>`` on stderr, exits with status 2 and writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itemgen.cli.common import LogFormat, Quiet, _guard, console, example, fail, reporting, show_result
from itemgen.models.new_items import MAX_ITEMS, add_items

ADD_EXAMPLE = "itemgen items add runs/text/best new.jsonl --out runs/text/new"
app = typer.Typer(help="Add items to a trained checkpoint's catalog.", no_args_is_help=True,
                  add_completion=False, epilog=example(ADD_EXAMPLE))


@app.command(name="add", epilog=example(ADD_EXAMPLE))
def add(checkpoint: Path = typer.Argument(..., help="checkpoint directory trained with an item text view"),
        new_items: Path = typer.Argument(..., help="CSV, TSV, Parquet or JSON lines: an id and text fields "
                                                   "(title, brand, category, description) per item"),
        out: Optional[Path] = typer.Option(None, help="new checkpoint directory (default: CHECKPOINT itself, "
                                                      "which needs --overwrite)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
        max_items: int = typer.Option(MAX_ITEMS, help="refuse files with more items than this"),
        quiet: Quiet = False, log_format: LogFormat = "text"):
    """Vectorise new items from their text with the checkpoint's own text encoder and write a
    checkpoint whose catalog includes them (no retraining; they are recommendable at once)."""
    reporting(quiet, log_format)
    try:
        result = _guard(add_items, checkpoint, new_items, out or checkpoint, overwrite=overwrite, max_items=max_items)
    except FileExistsError as e:
        fail(str(e))
    show_result({"out": str(result.out), "added": len(result.added), "n_items": result.n_items},
                lambda: console.print(f"added {len(result.added)} items to the catalog ({result.n_items} items): "
                                      f"{result.out}"))
