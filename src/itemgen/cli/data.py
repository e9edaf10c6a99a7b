"""``itemgen data``: prepare, download and inspect datasets.

    itemgen data prepare lcrec ../shared/datasets/amazon2018-scientific --out data/scientific
    itemgen data prepare table interactions.tsv items.tsv --out data/office --kcore 5
    itemgen data prepare amazon2018 Pet_Supplies_5.json.gz meta_Pet_Supplies.json.gz --out data/pets
    itemgen data download amazon2018 Pet_Supplies --dest raw/
    itemgen data info data/pets

Bad input prints ``error: <message>`` on stderr and exits with status 2.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from itemgen.cli.common import LogFormat, Quiet, example, fail, reporting, show_result
from itemgen.data.dataset import DataError, SequenceDataset
from itemgen.data.loaders import download_amazon2018
from itemgen.data.loaders import prepare as do_prepare

PREPARE_EXAMPLE = "itemgen data prepare table interactions.csv items.csv --out data/mine"
app = typer.Typer(help="Prepare, download and inspect datasets.", no_args_is_help=True,
                  add_completion=False, epilog=example(PREPARE_EXAMPLE))


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (DataError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        fail(str(msg))


def _counts_table(manifest: dict, title: str):
    table = Table(title=title, show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("users", "items", "interactions", "eval_users", "train_only_users"):
        if key in manifest:
            table.add_row(key.replace("_", " "), f"{manifest[key]:,}")
    table.add_row("fields", ", ".join(manifest.get("fields", [])) or "(none)")
    table.add_row("content hash", str(manifest.get("content_hash", "")))
    return table


def _console():
    return Console()  # created per call so it writes to the current sys.stdout


@app.command(epilog=example(PREPARE_EXAMPLE))
def prepare(
    kind: Annotated[str, typer.Argument(help="lcrec | table | amazon2018")],
    inputs: Annotated[list[Path], typer.Argument(
        help="lcrec: DIR; table: INTERACTIONS [ITEMS]; amazon2018: REVIEWS [META]")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Prepared dataset directory: new, empty, or a prepared "
                                                          "dataset (replaced atomically).")],
    kcore: Annotated[Optional[int], typer.Option(help="Drop users/items with fewer than K interactions, repeatedly "
                                                      "(amazon2018 default 5, others 0).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Dataset name (default: from the input file names).")] = None,
    user_col: Annotated[Optional[str], typer.Option(help="table: user column (default user_id).")] = None,
    item_col: Annotated[Optional[str], typer.Option(help="table: item column (default item_id).")] = None,
    time_col: Annotated[Optional[str], typer.Option(help="table: time column (default timestamp).")] = None,
    items: Annotated[Optional[Path], typer.Option(help="table: item table (same as a second INPUT).")] = None,
    sep: Annotated[Optional[str], typer.Option(help="table: field separator, overriding the extension "
                                                    "(use 'tab' for a tab).")] = None,
    cold_items: Annotated[Optional[float], typer.Option(
        help="Cold-start protocol: make this fraction of the items new (in no training or validation "
             "example; test targets only). See README.")] = None,
    seed: Annotated[int, typer.Option(help="Seed drawing the --cold-items.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an --out that holds other files "
                                                                "(never an input, nor a folder holding one).")] = False,
    quiet: Quiet = False,
    log_format: LogFormat = "text",
) -> None:
    """Read raw data and write a prepared dataset (items.parquet, sequences.parquet, manifest.json).

    --out must be new, empty, or a prepared dataset (which is replaced); anything else there is
    kept unless --overwrite. An --out that is an input, or holds one, is always refused."""
    reporting(quiet, log_format)
    if sep is not None and sep.lower() in ("tab", "\\t"):
        sep = "\t"
    options = dict(kcore=kcore, name=name, user_col=user_col, item_col=item_col, time_col=time_col,
                   items=items, sep=sep)
    with _user_errors():
        ds = do_prepare(kind, inputs, out, cold_items=cold_items, seed=seed, overwrite=overwrite, **options)
    show_result({"path": str(out), **ds.manifest()},
                lambda: _console().print(_counts_table(ds.manifest(), f"{ds.name} -> {out}")))


@app.command(epilog=example("itemgen data download amazon2018 Pet_Supplies --dest raw/"))
def download(
    source: Annotated[str, typer.Argument(help="Only amazon2018.")],
    category: Annotated[str, typer.Argument(help="e.g. Industrial_and_Scientific, Pet_Supplies, or a short "
                                                 "name: scientific, pets, office, instruments, arts ...")],
    dest: Annotated[Path, typer.Option("--dest", "-d", help="Folder for the downloaded files.")] = Path("raw"),
    full: Annotated[bool, typer.Option("--full", help="All reviews instead of the 5-core file.")] = False,
    meta: Annotated[bool, typer.Option("--meta/--no-meta", help="Also fetch the meta file.")] = True,
    timeout: Annotated[float, typer.Option(help="Network timeout, seconds.")] = 60.0,
    quiet: Quiet = False,
    log_format: LogFormat = "text",
) -> None:
    """Download raw Amazon Reviews 2018 files (then run `itemgen data prepare amazon2018`)."""
    reporting(quiet, log_format)
    with _user_errors():
        if source != "amazon2018":
            raise DataError(f"unknown download source {source!r}; only amazon2018")
        reviews, meta_path = download_amazon2018(category, dest, five_core=not full, meta=meta, timeout=timeout)

    def render():
        typer.echo(f"reviews: {reviews}")
        if meta_path is not None:
            typer.echo(f"meta:    {meta_path}")
        typer.echo(f"next: itemgen data prepare amazon2018 {reviews} {meta_path or ''} --out DIR".replace("  ", " "))

    show_result({"reviews": str(reviews), "meta": None if meta_path is None else str(meta_path)}, render)


@app.command(epilog=example("itemgen data info data/mine --verify"))
def info(
    path: Annotated[Path, typer.Argument(help="A prepared dataset directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print manifest.json as it is.")] = False,
    verify: Annotated[bool, typer.Option(help="Load the data and check it against the manifest's hash.")] = False,
) -> None:
    """Print a prepared dataset's manifest."""
    with _user_errors():
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{path} is not a prepared dataset (no manifest.json); run `itemgen data prepare` first")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest_path}: not valid JSON ({e})") from None
        if verify:
            SequenceDataset.load(path)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    console = _console()
    console.print(_counts_table(manifest, f"{manifest.get('name', path.name)} ({path})"))
    if manifest.get("source"):
        console.print_json(json.dumps(manifest["source"]))
    if verify:
        console.print("content hash verified")
