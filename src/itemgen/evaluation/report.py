"""One comparison report over every benchmark result (the ``itemgen report`` command: cli/report.py).

Reads every ``benchmarks/results/*.json`` (each benchmark writes its own shape) and writes
``docs/results.md``: per dataset, every method with Recall@1, Recall@10, NDCG@10, MRR, training
time and per-request latency, the command, commit and profile behind each row, and a
latency-vs-NDCG@10 plot per dataset (``docs/results_<dataset>.png``). A number a file does not
hold is written "not measured"; nothing is filled in.

Readers are tolerant by design: a file may hold ``report_rows`` (a list of flat rows, the
explicit form), or any nesting of dicts and lists in which a "row" is a dict that holds metric
keys (``recall@10`` ...) directly or in a ``test`` / ``metrics`` child, or that holds a latency
figure. Dataset, profile, command and commit are inherited from enclosing dicts; the method name
is the row's ``method`` / ``variant`` / ``name`` / ``model`` (+ ``decode``) or its path of keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from itemgen.core.io import atomic_write_text

METRICS = ("recall@1", "recall@10", "ndcg@10", "mrr")
NOT_MEASURED = "not measured"
# quality.json: the as-served protocol (history masked, as `itemgen serve` ranks) before its history-kept
# "test" (the published protocol; docs/quality.md gives both)
METRIC_CHILDREN = ("test_history_masked", "test", "metrics", "quality", "test_metrics")
TRAIN_KEYS = ("train_seconds", "training_seconds", "train_time_s", "train_s")
LATENCY_KEYS = ("latency_ms", "per_request_ms", "ms_per_request", "request_ms", "p50_ms", "latency_p50_ms",
                "median_ms", "latency_ms_median", "p50_ms_batch1")  # p50_ms_batch1: benchmarks/latency.py
NAME_KEYS = ("method", "variant", "name", "model")
DISCRIMINATORS = ("clients", "concurrency", "batch_size", "batch", "size", "items", "threads", "k")
CONTAINERS = ("results", "rows", "variants", "runs", "methods", "datasets")  # path keys that name no method
INHERITED = ("dataset", "profile", "command", "git_commit", "date", "hardware")
# Keys whose contents are not methods: settings, and repeats of one measurement (serve_load's rounds),
# whose summary the file holds beside them.
SKIPPED_KEYS = ("config", "hardware", "profile", "args", "settings", "targets", "batching_rounds", "rounds_rps",
                "head", "tail", "cold", "warm")  # the last four: user segments (is_breakdown)
DATASET_ALIASES = {"amazon2018-scientific": "scientific", "amazon2014-office": "office",
                   "amazon2018-instruments": "instruments"}


@dataclass
class Row:
    source: str  # result file stem
    dataset: str
    method: str
    metrics: dict = field(default_factory=dict)  # only the METRICS found
    train_seconds: float | None = None
    latency_ms: float | None = None
    profile: str = NOT_MEASURED
    command: str | None = None
    commit: str | None = None
    date: str | None = None


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _first(d: dict, keys) -> float | None:
    for k in keys:
        if _num(d.get(k)) is not None:
            return _num(d[k])
    return None


LATENCY_PATTERN = re.compile(r"(latency|request|query|batch1|p50).*_ms$")  # fallback: e.g. batch1_query_ms


def _latency(d: dict) -> float | None:
    v = _first(d, LATENCY_KEYS)
    if v is not None:
        return v
    for k in sorted(d):  # deterministic when several match
        if LATENCY_PATTERN.search(k) and "step" not in k and _num(d[k]) is not None:
            return _num(d[k])
    lat = d.get("latency")  # {"p50_ms": ..} or {"median_ms": ..}
    if isinstance(lat, dict):
        return _first(lat, LATENCY_KEYS)
    if _num(d.get("latency_s")) is not None:
        return 1000 * _num(d["latency_s"])
    return None


def _metrics(d: dict) -> dict:
    found = {k: float(d[k]) for k in METRICS if _num(d.get(k)) is not None}
    if found:
        return found
    for child in METRIC_CHILDREN:
        c = d.get(child)
        if isinstance(c, dict):
            found = {k: float(c[k]) for k in METRICS if _num(c.get(k)) is not None}
            if found:
                return found
    return {}


def dataset_key(name) -> str:
    if isinstance(name, dict):  # {"name": ..., "path": ...} descriptions of a dataset
        name = name.get("name") or name.get("path")
    name = str(name).strip().lower() if name else "unspecified"
    return DATASET_ALIASES.get(name, name)


def profile_text(ctx: dict, row: dict) -> str:
    """Which profile produced a number: device, backbone, layers, steps, as far as recorded."""
    parts = []
    prof = row.get("profile", ctx.get("profile"))
    if isinstance(prof, str):
        parts.append(prof)
    elif isinstance(prof, dict):
        parts += [f"{k}={v}" for k, v in prof.items() if k in ("device", "model", "backbone", "n_layers", "steps",
                                                                  "batch_size", "max_history") and v is not None]
    cfg = row.get("config")
    if isinstance(cfg, dict):
        model = cfg.get("model")
        sub = cfg.get(model, {}) if isinstance(cfg.get(model), dict) else {}
        if "backbone" in sub:
            parts.append(f"backbone={sub['backbone']}" + (f"/{sub['n_layers']}L" if sub.get("n_layers") else ""))
        t = cfg.get("train", {})
        if isinstance(t, dict) and "max_steps" in t:
            parts.append(f"max_steps={t['max_steps']}")
    steps = row.get("steps", row.get("train_steps"))
    if _num(steps) is not None:
        parts.append(f"steps={int(steps)}")
    hw = row.get("hardware", ctx.get("hardware"))
    if isinstance(hw, dict):
        parts.append(f"gpu={hw['gpu']}" if hw.get("gpu") else f"cpu x{hw.get('cores', '?')}")
    seen, out = set(), []
    for p in parts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return ", ".join(out) or NOT_MEASURED


def _name(d: dict, path: list[str]) -> str:
    for k in NAME_KEYS:
        if isinstance(d.get(k), str) and d[k]:
            base = d[k]
            break
    else:
        base = "/".join(k for k in path if k not in CONTAINERS) or "/".join(path) or "result"
    if isinstance(d.get("decode"), str) and d["decode"] not in base:
        base += f" ({d['decode']})"
    if isinstance(d.get("split"), str) and d["split"] != "standard":  # e.g. cold10: another split, not comparable
        base += f" [{d['split']} split]"
    return base


def is_breakdown(d: dict) -> bool:
    """A row that breaks a figure down (a user segment such as tail or cold, or the history-kept
    protocol beside the masked one, as text.json writes them): its own doc shows it; this report
    keeps one figure per method, all users, as served."""
    segment, protocol = d.get("segment"), d.get("protocol")
    return (isinstance(segment, str) and segment != "all") or (isinstance(protocol, str) and protocol != "masked")


def _make_row(source: str, d: dict, ctx: dict, path: list[str]) -> Row:
    ds = dataset_key(d.get("dataset", ctx.get("dataset")))
    path = [k for k in path if dataset_key(k) != ds]  # a per-dataset key names no method
    return Row(source=source, dataset=ds, method=_name(d, path), metrics=_metrics(d),
               train_seconds=_first(d, TRAIN_KEYS) if _first(d, TRAIN_KEYS) is not None else ctx.get("train_seconds"),
               latency_ms=_latency(d), profile=profile_text(ctx, d),
               command=d.get("command", ctx.get("command")), commit=d.get("git_commit", ctx.get("git_commit")),
               date=d.get("date", ctx.get("date")))


def _walk(node, source: str, ctx: dict, path: list[str], rows: list[Row]) -> None:
    if isinstance(node, list):
        for i, x in enumerate(node):
            tag = str(i)
            if isinstance(x, dict):  # unnamed list rows: tell them apart by a setting they hold
                tag = next((f"{k}={x[k]}" for k in DISCRIMINATORS if k in x and not isinstance(x[k], (dict, list))),
                           f"#{i}")
                if any(isinstance(x.get(k), str) for k in NAME_KEYS):
                    tag = None
            _walk(x, source, ctx, path + [tag] if tag else path, rows)
        return
    if not isinstance(node, dict):
        return
    ctx = {**ctx, **{k: node[k] for k in INHERITED if k in node}}
    if "dataset" not in node and isinstance(node.get("profile"), dict) and "dataset" in node["profile"]:
        ctx["dataset"] = node["profile"]["dataset"]  # some files say it inside their profile
    if _num(node.get("train_seconds")) is not None:
        ctx["train_seconds"] = float(node["train_seconds"])
    if _metrics(node) or _latency(node) is not None:
        if not is_breakdown(node):
            rows.append(_make_row(source, node, ctx, path))
        return
    for k, v in node.items():
        if isinstance(v, (dict, list)) and k not in SKIPPED_KEYS:
            # a key that names a dataset (per-dataset nesting) becomes the rows' dataset
            sub = {**ctx, "dataset": k} if k.lower() in DATASET_ALIASES.values() or k.lower() in DATASET_ALIASES \
                else ctx
            _walk(v, source, sub, path + [k], rows)


def read_result(path: Path) -> list[Row]:
    blob = json.loads(path.read_text())
    if isinstance(blob, dict) and isinstance(blob.get("report_rows"), list):  # explicit form
        top = {k: blob[k] for k in INHERITED if k in blob}
        return [_make_row(path.stem, r, top, []) for r in blob["report_rows"] if isinstance(r, dict)]
    rows: list[Row] = []
    _walk(blob, path.stem, {}, [], rows)
    return rows


def gather(results_dir: str | Path) -> tuple[list[Row], list[str]]:
    """-> rows from every *.json in results_dir, and a note per file that could not be read."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder not found: {results_dir}")
    rows, notes = [], []
    for path in sorted(results_dir.glob("*.json")):
        try:
            found = read_result(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            notes.append(f"{path.name}: not valid JSON ({e}); skipped")
            continue
        if not found:
            notes.append(f"{path.name}: no metrics or latency figures found")
        rows += found
    return rows, notes


def _fmt(v, digits=4) -> str:
    return NOT_MEASURED if v is None else f"{v:.{digits}f}"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "unspecified"


def plot(rows: list[Row], dataset: str, path: Path) -> bool:
    """Latency (log x) against NDCG@10, one labelled point per method measured on both."""
    pts = [r for r in rows if r.latency_ms is not None and "ndcg@10" in r.metrics]
    if not pts:
        return False
    import matplotlib  # the plot extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # the plot extra

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:  # the marker says which hardware produced the point: never compare across them
        ax.scatter(r.latency_ms, r.metrics["ndcg@10"], marker="^" if "gpu=" in r.profile else "o")
        ax.annotate(f"{r.method} [{r.source}]", (r.latency_ms, r.metrics["ndcg@10"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    from matplotlib.lines import Line2D  # the plot extra

    ax.legend(handles=[Line2D([], [], marker="o", ls="", color="gray", label="CPU profile"),
                       Line2D([], [], marker="^", ls="", color="gray", label="GPU profile")], fontsize=8)
    ax.set_xlabel("per-request latency (ms, log scale)")
    ax.set_ylabel("NDCG@10 (test)")
    ax.set_title(f"{dataset}: latency vs NDCG@10 (profiles differ: see docs/results.md)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def render(rows: list[Row], notes: list[str], plots: dict[str, str]) -> str:
    sources: dict[tuple, int] = {}
    for r in rows:
        sources.setdefault((r.source, r.command, r.commit, r.date), len(sources) + 1)
    lines = ["# Results: every method, every dataset", "",
             "Generated by `itemgen report` from `benchmarks/results/*.json`; do not edit by hand. "
             f"\"{NOT_MEASURED}\" means the result file holds no such figure. Rows come from different "
             "benchmarks and profiles (CPU profiles use truncated backbones and few steps): compare rows "
             "only within one profile. Quality rows that recorded it rank as served, with the user's history "
             "masked; docs/quality.md also gives the published protocol (history kept), which published "
             "figures compare with. Rows by user segment (tail, cold, ...) and history-kept rows of text.json "
             "are in docs/text.md; rows of another split (cold10) say so in their name. [n] points to the "
             "command and commit below.", ""]
    for ds in sorted({r.dataset for r in rows}):
        lines += [f"## {ds}", ""]
        if ds in plots:
            lines += [f"![latency vs NDCG@10]({plots[ds]})", ""]
        else:
            lines += ["No method on this dataset has both latency and NDCG@10 measured: no plot.", ""]
        lines += ["| method | file | Recall@1 | Recall@10 | NDCG@10 | MRR | train s | latency ms | profile | src |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in sorted((r for r in rows if r.dataset == ds), key=lambda r: (r.source, r.method)):
            m = r.metrics
            lines.append(f"| {r.method} | {r.source} | " + " | ".join(_fmt(m.get(k)) for k in METRICS)
                         + f" | {_fmt(r.train_seconds, 1)} | {_fmt(r.latency_ms, 2)} | {r.profile} | "
                         f"[{sources[(r.source, r.command, r.commit, r.date)]}] |")
        lines.append("")
    lines += ["## Commands and commits", ""]
    for (src, cmd, commit, date), i in sources.items():
        lines.append(f"[{i}] `{src}.json`: `{cmd or NOT_MEASURED}` at commit `{commit or 'unknown'}`"
                     + (f", {date}" if date else ""))
    if notes:
        lines += ["", "## Files not reported", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(results_dir: str | Path = "benchmarks/results", out: str | Path = "docs/results.md") -> dict:
    rows, notes = gather(results_dir)
    out = Path(out)
    plots = {}
    for ds in sorted({r.dataset for r in rows}):
        png = out.with_name(f"{out.stem}_{_slug(ds)}.png")
        if plot([r for r in rows if r.dataset == ds], ds, png):
            plots[ds] = png.name
    atomic_write_text(out, render(rows, notes, plots))
    return {"path": str(out), "rows": len(rows), "datasets": sorted({r.dataset for r in rows}),
            "plots": [str(out.with_name(p)) for p in plots.values()], "notes": notes}
