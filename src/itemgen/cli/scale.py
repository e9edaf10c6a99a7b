"""``itemgen clusters`` and ``itemgen index``: what large catalogs need (two-level softmax, ANN).

    itemgen clusters build data/scientific --method kmeans [--n-clusters 80] [--seed 0]
    itemgen clusters info data/scientific/clusters/kmeans.json
    itemgen clusters fit-level1 runs/x/best --out runs/x-level1 [--width 256]
    itemgen clusters refine-level1 runs/x-level1 --out runs/x-level1r [--grid 0,2,4]
    itemgen index build runs/x/best --type ivf [--states 2048] [--nlist N] [--nprobe N]

Bad input prints ``error: <message>`` on stderr and exits with status 2.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from itemgen.api import load_eval_dataset
from itemgen.cli.common import LogFormat, Quiet, example, reporting, show_result
from itemgen.core.progress import phase
from itemgen.data.dataset import DataError, SequenceDataset
from itemgen.heads.clusters import Clusters, build_clusters, cluster_path
from itemgen.models.checkpoint import load_checkpoint, read_items
from itemgen.topk.ann import INDEX_TYPES, AnnIndex, _head, training_states
from itemgen.training.level1_fit import STAGE_LR, fit_checkpoint, refine_checkpoint

CLUSTERS_EXAMPLE = "itemgen clusters build data/mine --method kmeans"
INDEX_EXAMPLE = "itemgen index build runs/itemlm-cpu/best --type ivf"
clusters_app = typer.Typer(help="Build and inspect item clusters for the two-level softmax.",
                           no_args_is_help=True, add_completion=False, epilog=example(CLUSTERS_EXAMPLE))
index_app = typer.Typer(help="Build ANN indexes beside checkpoints (for --decode ann).",
                        no_args_is_help=True, add_completion=False, epilog=example(INDEX_EXAMPLE))


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (ValueError, KeyError, OSError) as e:  # DataError, ClusterError, CheckpointError are ValueErrors
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2) from None


def _print_stats(stats: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        table.add_row(key.replace("_", " "), str(value))
    Console().print(table)


# ---- what the commands run: build clusters for a dataset, an ANN index for a checkpoint ----
def build_and_save(dataset_dir: str | Path, method: str, n_clusters: int | None = None, seed: int = 0,
                   out: str | Path | None = None) -> tuple[Clusters, Path]:
    ds = SequenceDataset.load(dataset_dir)
    c = build_clusters(ds, method, n_clusters, seed)
    path = Path(out) if out is not None else cluster_path(dataset_dir, method)
    return c, c.save(path)


def build_checkpoint_index(checkpoint: str | Path, kind: str = "flat", *, states: int = 2048,
                           data: str | Path | None = None, nlist: int | None = None, nprobe: int | None = None,
                           hnsw_m: int = 32, ef_search: int = 128, seed: int = 0) -> dict:
    """Build the index for a checkpoint and save it beside it; -> its description."""
    if kind not in INDEX_TYPES:
        raise ValueError(f"index type {kind!r} is not one of {', '.join(INDEX_TYPES)}")
    checkpoint = Path(checkpoint)
    model, cfg, items = load_checkpoint(checkpoint)
    h = None
    if _head(model) is not None:
        ds = load_eval_dataset(cfg, data)
        _, trained_on = read_items(checkpoint)
        want = trained_on.get("content_hash")
        if want is not None and want != ds.content_hash():
            raise DataError(f"{checkpoint} was trained on dataset hash {want}; the dataset given has "
                            f"{ds.content_hash()}")
        h = training_states(model, ds, cfg.data.max_history, n=states, seed=seed)
    with phase("index", f"FAISS {kind} index over {len(items):,} items"):
        index = AnnIndex.build(model, kind, h, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search,
                               seed=seed)
    path = index.save(checkpoint)
    return {"path": str(path), "type": kind, "fingerprint": index.fingerprint, **index.params}


@clusters_app.command("build", epilog=example(CLUSTERS_EXAMPLE))
def clusters_build(
    dataset: Annotated[Path, typer.Argument(help="prepared dataset directory")],
    method: Annotated[str, typer.Option(help="kmeans | frequency | random")] = "kmeans",
    n_clusters: Annotated[Optional[int], typer.Option(help="default: about sqrt(items)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Optional[Path], typer.Option(help="default: DATASET/clusters/METHOD.json")] = None,
    quiet: Quiet = False,
    log_format: LogFormat = "text",
):
    """Assign items to clusters (training split only) and print cluster-size statistics."""
    reporting(quiet, log_format)
    with _user_errors():
        clusters, path = build_and_save(dataset, method, n_clusters, seed, out)
    stats = {**clusters.stats(), **clusters.info}

    def render():
        _print_stats(stats, f"{method} clusters")
        typer.echo(f"wrote {path}")

    show_result({"path": str(path), "method": method, **stats}, render)


@clusters_app.command("info", epilog=example("itemgen clusters info data/mine/clusters/kmeans.json"))
def clusters_info(path: Annotated[Path, typer.Argument(help="cluster file (.json)")]):
    """Cluster-size statistics of a cluster file."""
    with _user_errors():
        clusters = Clusters.load(path)
    _print_stats({**clusters.stats(), **clusters.info}, str(path))


@clusters_app.command("fit-level1", epilog=example("itemgen clusters fit-level1 runs/two-level/best --out runs/two-level-l1"))
def clusters_fit_level1(
    checkpoint: Annotated[Path, typer.Argument(help="a two-level checkpoint directory")],
    out: Annotated[Path, typer.Option(help="where the new checkpoint goes (not CHECKPOINT)")],
    width: Annotated[int, typer.Option(min=1, help="hidden width of level 1's correction g(h)")] = 256,
    data: Annotated[Optional[Path], typer.Option(help="prepared dataset (default: the config's)")] = None,
    stage_epochs: Annotated[float, typer.Option(min=0, help="epochs of a second training stage after the fit "
                                                "(g frozen; 0: none)")] = 0.0,
    stage_lr: Annotated[float, typer.Option(help="the second stage's learning rate (> 0)")] = STAGE_LR,
    objective: Annotated[str, typer.Option(help="the fit's loss: mse (g against log Z_c) or kl (level 1's "
                                           "cluster distribution against the joint scores')")] = "mse",
    quiet: Quiet = False,
    log_format: LogFormat = "text",
):
    """Fit level 1 of a trained two-level CHECKPOINT to its own level 2 (what training with
    itemlm.cluster_correction=WIDTH does at its end) and write the result to OUT; the correction is
    kept only if validation NDCG@10 gains. --stage-epochs N then trains the model on for N epochs
    with the fitted level 1 frozen (level 2 and the backbone adapt to it), kept with the fit only
    if validation gains over CHECKPOINT."""
    reporting(quiet, log_format)
    with _user_errors():
        fit = fit_checkpoint(checkpoint, out, width, data=data, stage_epochs=stage_epochs, stage_lr=stage_lr,
                             objective=objective)

    def render():
        _print_stats({k: v for k, v in fit.items() if k != "from"}, "level 1 fit")
        typer.echo(f"wrote {out}")

    show_result({**fit, "path": str(out)}, render)


@clusters_app.command("refine-level1", epilog=example("itemgen clusters refine-level1 runs/two-level-l1 --out runs/two-level-l1r"))
def clusters_refine_level1(
    checkpoint: Annotated[Path, typer.Argument(help="a two-level checkpoint with a fitted level 1 (fit-level1)")],
    out: Annotated[Path, typer.Option(help="where the new checkpoint goes (not CHECKPOINT)")],
    grid: Annotated[Optional[str], typer.Option(help="values to try, e.g. 0,2,4 (default: 0 to ceil(sqrt(clusters)))")] = None,
    data: Annotated[Optional[Path], typer.Option(help="prepared dataset (default: the config's)")] = None,
    quiet: Quiet = False,
    log_format: LogFormat = "text",
):
    """Choose by validation NDCG@10 how many of level 1's highest clusters take their exact
    log-normaliser at inference (itemlm.cluster_refine; 0: none), and write CHECKPOINT with that
    choice to OUT. Nothing is trained; a query then scores those clusters' members too."""
    reporting(quiet, log_format)
    with _user_errors():
        try:
            values = None if grid is None else [int(v) for v in grid.split(",")]
        except ValueError:
            raise ValueError(f"--grid must be integers separated by commas, got {grid!r}") from None
        choice = refine_checkpoint(checkpoint, out, grid=values, data=data)

    def render():
        _print_stats({f"valid NDCG@10, refine={m}": round(v, 4) for m, v in choice["valid_ndcg@10"].items()}
                     | {"chosen": choice["chosen"]}, "level 1 refinement")
        typer.echo(f"wrote {out}")

    show_result({**choice, "path": str(out)}, render)


@index_app.command("build", epilog=example(INDEX_EXAMPLE))
def index_build(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint directory")],
    type: Annotated[str, typer.Option("--type", help="flat | ivf | hnsw")] = "flat",
    states: Annotated[int, typer.Option(min=1, help="training hidden states for log Z_c (two-level)")] = 2048,
    data: Annotated[Optional[Path], typer.Option(help="prepared dataset (default: the config's)")] = None,
    nlist: Annotated[Optional[int], typer.Option(min=1, help="ivf lists (default sqrt(items))")] = None,
    nprobe: Annotated[Optional[int], typer.Option(min=1, help="ivf lists searched (default nlist/16)")] = None,
    hnsw_m: Annotated[int, typer.Option(min=2, help="hnsw links per node")] = 32,
    ef_search: Annotated[int, typer.Option(min=1, help="hnsw search depth")] = 128,
    seed: Annotated[int, typer.Option()] = 0,
    quiet: Quiet = False,
    log_format: LogFormat = "text",
):
    """Build a FAISS maximum-inner-product index for CHECKPOINT and save it beside it."""
    reporting(quiet, log_format)
    with _user_errors():
        info = build_checkpoint_index(checkpoint, type, states=states, data=data, nlist=nlist, nprobe=nprobe,
                                      hnsw_m=hnsw_m, ef_search=ef_search, seed=seed)

    def render():
        _print_stats({k: v for k, v in info.items() if k != "path"}, f"{type} index")
        typer.echo(f"wrote {info['path']}")

    show_result(info, render)
