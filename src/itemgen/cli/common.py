"""What every command shares: the consoles, one-line errors with exit code 2, the metrics table."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from itemgen.core.config import ConfigError
from itemgen.data.dataset import DataError
from itemgen.models.checkpoint import CheckpointError

console = Console()
err = Console(stderr=True, soft_wrap=True)  # never wrap paths in error messages


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Run a library call; known user errors become one clear line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        fail(str(e))
    except KeyError as e:
        fail(e.args[0] if e.args else str(e))


def metrics_table(rows: dict[str, dict], title: str) -> Table:
    table = Table(title=title)
    table.add_column("model")
    cols = ["recall@1", "recall@10", "ndcg@10", "mrr", "users", "top1_share", "distinct_top10"]
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name + (" (COLLAPSED)" if m.get("collapsed") else ""),
                      *[f"{m[c]:.4f}" if isinstance(m.get(c), float) else str(m.get(c, "-")) for c in cols])
    return table
