"""What every command shares: the consoles, one-line errors with exit code 2, the metrics table,
``--quiet`` / ``--log-format`` and the final result (a table, or one JSON object in json mode)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from transformers.utils import logging as hf_logging

from itemgen.core import progress
from itemgen.core.config import ConfigError
from itemgen.core.io import printable
from itemgen.data.dataset import DataError
from itemgen.models.checkpoint import CheckpointError

console = Console()
err = Console(stderr=True, soft_wrap=True)  # never wrap paths in error messages

# every long command takes these two; they set core/progress.py's defaults for all it runs
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or progress lines: errors and the "
                                                         "final result only.")]
LogFormat = Annotated[str, typer.Option("--log-format", help="text | json: one JSON object per log event "
                                                            "(progress, messages, the result) for schedulers.")]


def example(command: str) -> str:
    """A command's help epilog: one runnable example, on its own line, last."""
    return f"Example:\n\n{command}"


def fail(message: str, code: int = 2) -> None:
    # messages may quote user data (a binary file's bytes): never send control characters to a terminal
    message = "\n".join(printable(line) for line in str(message).split("\n"))
    if progress.settings().format == "json":
        print(json.dumps({"event": "error", "error": message}), file=sys.stderr, flush=True)
    else:
        err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code)


def reporting(quiet: bool, log_format: str) -> None:
    """Apply --quiet and --log-format to everything this command runs."""
    if log_format not in progress.FORMATS:
        fail(f"--log-format must be one of {', '.join(progress.FORMATS)}, not {log_format!r}")
    progress.configure(quiet=quiet, format=log_format)
    # transformers draws its own bars (e.g. "Loading weights" when a text encoder or backbone is
    # read): --quiet means none, and a bar would break json mode's one-event-per-line stderr.
    if quiet or log_format == "json":
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()


def json_mode() -> bool:
    return progress.settings().format == "json"


def show_result(record: dict, render: Callable[[], None]) -> None:
    """The command's result: ``{"event": "result", ...}`` on stdout in json mode, else ``render()``."""
    if json_mode():
        print(json.dumps({"event": "result", **record}, default=str), flush=True)
    else:
        render()


class JsonConsole:
    """A stand-in for the rich console in json mode (code that prints to a console, such as the
    quickstart): text becomes a message event on stderr, a table a result event on stdout."""

    def print(self, *objects, **_) -> None:
        for obj in objects:
            if isinstance(obj, Table):
                cols = [str(c.header) for c in obj.columns]
                cells = [[Text.from_markup(str(x)).plain for x in c._cells] for c in obj.columns]
                rows = [dict(zip(cols, r)) for r in zip(*cells)]
                print(json.dumps({"event": "result", "table": str(obj.title or ""), "rows": rows}), flush=True)
            else:
                progress.event("itemgen", Text.from_markup(str(obj)).plain)


def _guard(fn, *args, **kwargs):
    """Run a library call; known user errors become one clear line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        fail(str(e))
    except KeyError as e:
        fail(e.args[0] if e.args else str(e))


METRIC_COLUMNS = ("recall@1", "recall@10", "ndcg@10", "mrr", "users", "top1_share", "distinct_top10")
SEGMENT_COLUMNS = ("users", "recall@10", "ndcg@10", "ndcg@10_se", "mrr")


def metrics_table(rows: dict[str, dict], title: str, cols=METRIC_COLUMNS, first: str = "model") -> Table:
    """One row per model (or per segment: ``cols=SEGMENT_COLUMNS, first="segment"``)."""
    table = Table(title=title)
    table.add_column(first)
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name + (" (COLLAPSED)" if m.get("collapsed") else ""),
                      *[f"{m[c]:.4f}" if isinstance(m.get(c), float) else str(m.get(c, "-")) for c in cols])
    return table
