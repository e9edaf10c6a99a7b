"""The command line. Each subcommand parses its arguments and makes one library call."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="itemgen: LLM-based sequential recommendation with items as single tokens.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # never wrap paths in error messages

try:  # the data command group lives in its own module
    from itemgen.cli_data import app as data_app

    app.add_typer(data_app, name="data", help="Prepare, download and inspect datasets.")
except ImportError:  # pragma: no cover
    pass
from itemgen.report import report_command  # noqa: E402  (itemgen report: report.py)

app.command(name="report")(report_command)

from itemgen.cli_scale import clusters_app, index_app  # noqa: E402  (two-level softmax, ANN)

app.add_typer(clusters_app, name="clusters")
app.add_typer(index_app, name="index")

from itemgen.cli_serve import serve as _serve  # noqa: E402  (the HTTP server command, cli_serve.py)

app.command(name="serve")(_serve)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Run a library call; known user errors become one clear line and exit code 2."""
    from itemgen.checkpoint import CheckpointError
    from itemgen.config import ConfigError
    from itemgen.data import DataError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        fail(str(e))
    except KeyError as e:
        fail(e.args[0] if e.args else str(e))


def metrics_table(rows: dict[str, dict], title: str) -> Table:
    table = Table(title=title)
    table.add_column("model")
    cols = ["recall@1", "recall@10", "ndcg@10", "mrr", "users"]
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *[f"{m[c]:.4f}" if isinstance(m[c], float) else str(m[c]) for c in cols])
    return table


@app.command()
def train(config: Optional[Path] = typer.Argument(None, help="YAML config (overrides of the defaults)"),
          overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides"),
          resume: bool = typer.Option(False, "--resume", help="continue from OUT/last")):
    """Train a recommender (itemlm or sasrec) with a YAML config and key=value overrides."""
    from itemgen.config import load_config
    from itemgen.train import train as run_train

    if config is not None and "=" in str(config) and not config.exists():
        overrides = [str(config), *(overrides or [])]
        config = None
    cfg = _guard(load_config, config, overrides or [])
    result = _guard(run_train, cfg, resume=resume)
    console.print(f"trained {cfg.model}: {result.step} steps in {result.train_seconds:.0f}s ({result.stopped}); "
                  f"best valid ndcg@10 {result.best_valid.get('ndcg@10', float('nan')):.4f}; "
                  f"best checkpoint: {result.best}")


@app.command()
def evaluate(checkpoint: Path = typer.Argument(..., help="checkpoint directory"),
             split: str = typer.Option("test", help="test | valid"),
             decode: str = typer.Option("exact", help="top-k decoder"),
             data: Optional[Path] = typer.Option(None, help="prepared dataset (default: the one in the config)"),
             exclude_history: bool = typer.Option(False, help="mask each user's history items"),
             batch_size: int = typer.Option(128, min=1),
             out: Optional[Path] = typer.Option(None, help="JSON report (default CHECKPOINT/eval_SPLIT.json)"),
             device: str = typer.Option("auto", help="auto (cuda when visible) | cpu | cuda[:N]")):
    """Score the full catalog for every user of a split; write Recall/NDCG/MRR as JSON."""
    from itemgen.api import evaluate_checkpoint

    if split not in ("test", "valid"):
        fail(f"--split must be test or valid, not {split!r}")
    report = _guard(evaluate_checkpoint, checkpoint, split=split, decode=decode, data=data,
                    exclude_history=exclude_history, batch_size=batch_size, out=out, device=device)
    console.print(metrics_table({report["model"]: report["metrics"]}, f"{split} ({report['dataset']})"))
    console.print(f"report: {report['path']}")


@app.command()
def recommend(checkpoint: Path = typer.Argument(..., help="checkpoint directory"),
              history: str = typer.Option(..., help="comma-separated item ids, oldest first"),
              k: int = typer.Option(10, "-k", "--k", help="how many items"),
              exclude_history: bool = typer.Option(True, help="never recommend items in the history"),
              as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Top-k next items for one history, with titles and scores."""
    from itemgen.api import Predictor

    ids = [x.strip() for x in history.split(",") if x.strip()]
    if not ids:
        fail("--history is empty: give item ids separated by commas")
    predictor = _guard(Predictor.load, checkpoint)
    recs = _guard(predictor.recommend, [ids], k=k, exclude_history=exclude_history)[0]
    if as_json:
        print(json.dumps(recs))
        return
    table = Table(title=f"top-{k} after {len(ids)} items")
    for c in ("rank", "id", "score", "title"):
        table.add_column(c)
    for r, rec in enumerate(recs, 1):
        table.add_row(str(r), rec["id"], f"{rec['score']:.4f}", rec["title"] or "")
    console.print(table)


@app.command()
def quickstart(data: Optional[Path] = typer.Option(None, help="prepared dataset dir (default: synthetic)"),
               out: Path = typer.Option(Path("runs/quickstart"), help="where runs go"),
               backbone: str = typer.Option("smollm2-135m", help="ItemLM backbone (tiny for a smoke run)"),
               n_layers: Optional[int] = typer.Option(2, help="keep the first N backbone layers (CPU profile)"),
               minutes: float = typer.Option(3.0, help="training time budget per model")):
    """Prepare data, train ItemLM and SASRec, evaluate both on the test split, recommend."""
    from itemgen.quickstart import run

    _guard(run, data=data, out=out, backbone=backbone, n_layers=n_layers, minutes=minutes, console=console)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
