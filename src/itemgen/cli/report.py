"""``itemgen report``: every benchmark result in one comparison (evaluation/report.py writes it)."""

from __future__ import annotations

from pathlib import Path

import typer

from itemgen.cli.common import LogFormat, Quiet, _guard, console, reporting, show_result
from itemgen.evaluation.report import write_report


def report_command(results: Path = typer.Option(Path("benchmarks/results"), help="folder of result JSON files"),
                   out: Path = typer.Option(Path("docs/results.md"), help="Markdown report (plots beside it)"),
                  quiet: Quiet = False, log_format: LogFormat = "text"):
    """Gather every benchmark result into one comparison report with latency/NDCG plots."""
    reporting(quiet, log_format)
    info = _guard(write_report, results, out)

    def render():
        console.print(f"{info['rows']} rows over {len(info['datasets'])} datasets -> {info['path']}"
                      + (f"; plots: {', '.join(info['plots'])}" if info["plots"] else ""))
        for n in info["notes"]:
            console.print(f"[yellow]note:[/yellow] {n}")

    show_result(info, render)
