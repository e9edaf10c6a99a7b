"""The command line. Each subcommand parses its arguments and makes one library call.

``itemgen`` (pyproject's ``[project.scripts]``), ``python -m itemgen`` and ``python -m itemgen.cli``
all run :func:`main`. Every command lives in this package; library code never imports it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from itemgen.api import Predictor, evaluate_checkpoint
from itemgen.cli.common import _guard, console, err, fail, metrics_table
from itemgen.cli.data import app as data_app
from itemgen.cli.quickstart import run as run_quickstart
from itemgen.cli.report import report_command
from itemgen.cli.scale import clusters_app, index_app
from itemgen.cli.serve import serve as _serve
from itemgen.core.config import load_config
from itemgen.training.loop import train as run_train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="itemgen: LLM-based sequential recommendation with items as single tokens.")
app.add_typer(data_app, name="data", help="Prepare, download and inspect datasets.")  # cli/data.py
app.command(name="report")(report_command)  # cli/report.py
app.add_typer(clusters_app, name="clusters")  # two-level softmax, ANN: cli/scale.py
app.add_typer(index_app, name="index")
app.command(name="serve")(_serve)  # the HTTP server command: cli/serve.py


@app.command()
def train(config: Optional[Path] = typer.Argument(None, help="YAML config (overrides of the defaults)"),
          overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides"),
          resume: bool = typer.Option(False, "--resume", help="continue from OUT/last")):
    """Train a recommender (itemlm or sasrec) with a YAML config and key=value overrides."""
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
    if split not in ("test", "valid"):
        fail(f"--split must be test or valid, not {split!r}")
    report = _guard(evaluate_checkpoint, checkpoint, split=split, decode=decode, data=data,
                    exclude_history=exclude_history, batch_size=batch_size, out=out, device=device)
    m = report["metrics"]
    console.print(metrics_table({report["model"]: m}, f"{split} ({report['dataset']})"))
    if m.get("collapsed"):
        console.print(f"[bold red]collapsed:[/] {m['top1_share']:.0%} of users get the same top-1 item "
                      f"and {m['distinct_top10']} distinct items fill all top-10 lists: the model ignores histories and recommends by popularity")
    console.print(f"report: {report['path']}")


@app.command()
def recommend(checkpoint: Path = typer.Argument(..., help="checkpoint directory"),
              history: str = typer.Option(..., help="comma-separated item ids, oldest first"),
              k: int = typer.Option(10, "-k", "--k", help="how many items"),
              exclude_history: bool = typer.Option(True, help="never recommend items in the history"),
              as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Top-k next items for one history, with titles and scores."""
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


@app.command(name="quickstart")  # not `def quickstart`: that name is the module cli/quickstart.py
def quickstart_command(data: Optional[Path] = typer.Option(None, help="prepared dataset dir (default: synthetic)"),
                       out: Path = typer.Option(Path("runs/quickstart"), help="where runs go"),
                       backbone: str = typer.Option("smollm2-135m", help="ItemLM backbone (tiny for a smoke run)"),
                       n_layers: Optional[int] = typer.Option(2, help="keep the first N backbone layers (CPU profile)"),
                       minutes: float = typer.Option(2.0, help="training time budget per model (minutes)")):
    """Prepare data, train ItemLM and SASRec, evaluate both on the test split, recommend."""
    _guard(run_quickstart, data=data, out=out, backbone=backbone, n_layers=n_layers, minutes=minutes,
           console=console)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err.print("interrupted")
        sys.exit(130)

