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

from itemgen import __version__
from itemgen.api import Predictor, evaluate_checkpoint
from itemgen.cli.common import (SEGMENT_COLUMNS, JsonConsole, LogFormat, Quiet, _guard, console, err, example, fail,
                                json_mode, metrics_table, reporting, show_result)
from itemgen.cli.data import app as data_app
from itemgen.cli.items import app as items_app
from itemgen.cli.quickstart import run as run_quickstart
from itemgen.cli.report import report_command
from itemgen.cli.scale import clusters_app, index_app
from itemgen.cli.serve import serve as _serve
from itemgen.core import progress
from itemgen.core.config import load_config, parse_overrides
from itemgen.evaluation.plot import plot_history
from itemgen.training.loop import train as run_train
from itemgen.training.tune import grid_search

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  epilog=example("itemgen quickstart"))
app.add_typer(data_app, name="data", help="Prepare, download and inspect datasets.")  # cli/data.py
app.add_typer(items_app, name="items", help="Add items to a trained checkpoint's catalog.")  # cli/items.py
app.command(name="report", epilog=example("itemgen report --results benchmarks/results --out docs/results.md"))(
    report_command)  # cli/report.py
app.add_typer(clusters_app, name="clusters")  # two-level softmax, ANN: cli/scale.py
app.add_typer(index_app, name="index")
app.command(name="serve", epilog=example("itemgen serve runs/sasrec/best --port 8000"))(
    _serve)  # the HTTP server command: cli/serve.py


def _version(value: bool) -> None:
    if value:
        print(f"itemgen {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    """itemgen: LLM-based sequential recommendation with items as single tokens."""
    progress.reset()  # each command starts from the default progress settings (its flags change them)


@app.command(epilog=example("itemgen train configs/sasrec.yaml data.path=data/mine train.out=runs/sasrec"))
def train(config: Optional[Path] = typer.Argument(None, help="YAML config (overrides of the defaults)"),
          overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides"),
          resume: bool = typer.Option(False, "--resume", help="continue from OUT/last"),
          quiet: Quiet = False, log_format: LogFormat = "text"):
    """Train a recommender (itemlm or sasrec) with a YAML config and key=value overrides.

    A bar on a terminal; elsewhere a line every train.log_every steps and at every validation.
    OUT/history.jsonl keeps the curves (itemgen plot OUT draws them)."""
    reporting(quiet, log_format)
    if config is not None and "=" in str(config) and not config.exists():
        overrides = [str(config), *(overrides or [])]
        config = None
    cfg = _guard(load_config, config, overrides or [])
    result = _guard(run_train, cfg, resume=resume)
    best = result.best_valid.get('ndcg@10', float('nan'))
    show_result({"model": cfg.model, "steps": result.step, "epochs": result.epochs,
                 "train_seconds": round(result.train_seconds, 1), "stopped": result.stopped,
                 "best_step": result.best_step, "best_valid": result.best_valid, "best": str(result.best)},
                lambda: console.print(f"trained {cfg.model}: {result.step} steps in {result.train_seconds:.0f}s "
                                      f"({result.stopped}); best valid ndcg@10 {best:.4f}; "
                                      f"best checkpoint: {result.best}"))


@app.command(epilog=example("itemgen tune configs/sasrec.yaml sasrec.dropout=0.1,0.5 data.path=data/mine"))
def tune(config: Path = typer.Argument(..., help="YAML config (overrides of the defaults)"),
         grid: str = typer.Argument(..., help="section.key=v1,v2,...: the values to try"),
         overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides"),
         quiet: Quiet = False, log_format: LogFormat = "text"):
    """Train once per value of one config key and keep the value with the best validation NDCG@10.

    Runs go to OUT/KEY=VALUE/; the choice, with every run's validation metrics, to OUT/selected.json."""
    reporting(quiet, log_format)
    key, _, raw = grid.partition("=")
    if not key or not raw:
        fail(f"the grid must look like section.key=v1,v2,... (got {grid!r})")
    values = _guard(parse_overrides, [f"{key}=[{raw}]"])
    for part in key.split("."):
        values = values[part]
    cfg = _guard(load_config, config, overrides or [])
    result = _guard(grid_search, cfg, key.strip(), list(values))

    def render():
        for r in result.runs:
            mark = "  <- best" if r["value"] == result.value else ""
            console.print(f"{key}={r['value']}: valid ndcg@10 {r['best_valid'].get('ndcg@10', float('nan')):.4f} "
                          f"({r['epochs']} epochs, {r['train_seconds']:.0f}s){mark}")
        console.print(f"chosen: {key}={result.value}; checkpoint {result.best.best}; "
                      f"{Path(cfg.train.out) / 'selected.json'}")

    show_result(result.to_dict(), render)


@app.command(epilog=example("itemgen plot runs/sasrec --out runs/sasrec/history.png"))
def plot(run: Path = typer.Argument(..., help="training run folder (train.out: holds history.jsonl)"),
         out: Optional[Path] = typer.Option(None, help="PNG to write (default RUN/history.png)")):
    """Draw a run's training loss and validation NDCG@10 / Recall@10 against the step (PNG)."""
    try:
        path = _guard(plot_history, run, out)
    except ImportError as e:  # the plot extra (matplotlib) is missing
        fail(str(e))
    show_result({"path": str(path)}, lambda: console.print(f"wrote {path}"))


@app.command(epilog=example("itemgen evaluate runs/sasrec/best --split test"))
def evaluate(checkpoint: Path = typer.Argument(..., help="checkpoint directory"),
             split: str = typer.Option("test", help="test | valid"),
             decode: str = typer.Option("exact", help="top-k decoder"),
             data: Optional[Path] = typer.Option(None, help="prepared dataset (default: the one in the config)"),
             exclude_history: bool = typer.Option(False, help="mask each user's history items"),
             batch_size: int = typer.Option(128, min=1),
             out: Optional[Path] = typer.Option(None, help="JSON report (default CHECKPOINT/eval_SPLIT.json, "
                                                           "eval_SPLIT_history_masked.json with --exclude-history)"),
             device: str = typer.Option("auto", help="auto (cuda when visible) | cpu | cuda[:N]"),
             quiet: Quiet = False, log_format: LogFormat = "text"):
    """Score the full catalog for every user of a split; write Recall/NDCG/MRR as JSON, over all
    users and by segment: the target's training interactions (pop:0, pop:1-4, pop:5-19, pop:20+,
    tail <= 4, head), the history length (hist:short <= 5 items, hist:long), and cold/warm on a
    dataset prepared with --cold-items."""
    reporting(quiet, log_format)
    if split not in ("test", "valid"):
        fail(f"--split must be test or valid, not {split!r}")
    report = _guard(evaluate_checkpoint, checkpoint, split=split, decode=decode, data=data,
                    exclude_history=exclude_history, batch_size=batch_size, out=out, device=device)
    m = report["metrics"]

    def render():
        console.print(metrics_table({report["model"]: m}, f"{split} ({report['dataset']})"))
        if m.get("segments"):
            rules = report["segment_rules"]
            console.print(metrics_table(m["segments"], f"by segment (tail: target with <= {rules['tail_max']} "
                                        f"training interactions; hist:short: <= {rules['short_history']} items)",
                                        cols=SEGMENT_COLUMNS, first="segment"))
        if m.get("collapsed"):
            distinct = next((f"{v} distinct items fill all top-{k[len('distinct_top'):]} lists" for k, v in m.items()
                             if k.startswith("distinct_top")), "")  # top-k: k < 10 in a small catalog
            console.print(f"[bold red]collapsed:[/] {m['top1_share']:.0%} of users get the same top-1 item "
                          f"and {distinct}: the model ignores histories and recommends by popularity")
        console.print(f"report: {report['path']}")

    show_result(report, render)


@app.command(epilog=example("itemgen recommend runs/sasrec/best --history B000050SR5,B0002IMR8A -k 10"))
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
    if not recs:  # never an empty table with exit 0 from a non-empty catalog
        if exclude_history and len(set(ids)) >= len(predictor.items):
            fail(f"every one of the catalog's {len(predictor.items)} items is in the history, so none is left "
                 "to recommend (--no-exclude-history allows them)")
        fail(f"the model scored no item with a finite score: {checkpoint} gives NaN scores (damaged or "
             "diverged weights); use another checkpoint")
    if as_json:
        print(json.dumps(recs))
        return
    table = Table(title=f"top-{k} after {len(ids)} items")
    for c in ("rank", "id", "score", "title"):
        table.add_column(c)
    for r, rec in enumerate(recs, 1):
        table.add_row(str(r), rec["id"], f"{rec['score']:.4f}", rec["title"] or "")
    console.print(table)


@app.command(name="quickstart", epilog=example("itemgen quickstart --out runs/quickstart --minutes 2"))
def quickstart_command(data: Optional[Path] = typer.Option(None, help="prepared dataset dir (default: synthetic)"),
                       out: Path = typer.Option(Path("runs/quickstart"), help="where runs go"),
                       backbone: str = typer.Option("smollm2-135m", help="ItemLM backbone (tiny for a smoke run)"),
                       n_layers: Optional[int] = typer.Option(2, help="keep the first N backbone layers (CPU profile)"),
                       minutes: float = typer.Option(2.0, help="training time budget per model (minutes)"),
                       quiet: Quiet = False, log_format: LogFormat = "text"):
    """Prepare data, train ItemLM and SASRec, evaluate both on the test split, recommend."""
    reporting(quiet, log_format)
    _guard(run_quickstart, data=data, out=out, backbone=backbone, n_layers=n_layers, minutes=minutes,
           console=JsonConsole() if json_mode() else console, quiet=quiet)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        err.print("interrupted")
        sys.exit(130)

