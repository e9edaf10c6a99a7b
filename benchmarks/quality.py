"""Quality benchmark: ItemLM against SASRec on the shared Amazon datasets, same split, full
catalog, test users. Writes benchmarks/results/quality.json (rows merged by dataset+variant, so
runs can be split over several invocations) and the table in docs/quality.md.

    python benchmarks/quality.py                          # every dataset, every default variant
    python benchmarks/quality.py --datasets scientific --variants itemlm,sasrec
    python benchmarks/quality.py --variants itemlm --set itemlm.head=two_level ...   # extra overrides

Profiles: ``cpu`` (default; what these 2-core machines can train in minutes: SmolLM2-135M cut
to its first 2 layers, compact prompt, a fixed step budget) and ``gpu`` (all 30 layers, the
paper's prompt, more steps). Every row records its profile and the full config it ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from itemgen.api import evaluate_checkpoint, run_info  # noqa: E402
from itemgen.core.config import from_dict  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.data.dataset import SequenceDataset  # noqa: E402
from itemgen.training.loop import train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
DATASETS = {  # name -> folder under ../shared/datasets
    "scientific": "amazon2018-scientific",
    "office": "amazon2014-office",
    "instruments": "amazon2018-instruments",
}

PROFILES = {
    "cpu": {
        # ID-only training: text prompts cost ~3.5x more tokens per step than 2 cores can afford
        # here; the text-in-training paradigm is the variant itemlm-text
        "itemlm": {"itemlm": {"backbone": "smollm2-135m", "n_layers": 2, "prompt": "compact",
                              "id_only_share": 1.0, "fields": ["title", "brand", "category"],
                              "max_field_tokens": 8},
                   "train": {"batch_size": 32, "max_steps": 300, "lr": 2e-3, "backbone_lr": 5e-4,
                             "eval_every": 100, "warmup_steps": 50}},
        "sasrec": {"train": {"batch_size": 128, "max_steps": 600, "lr": 2e-3, "eval_every": 150,
                             "warmup_steps": 50}},
    },
    "gpu": {
        "itemlm": {"itemlm": {"backbone": "smollm2-135m", "prompt": "default"},
                   "train": {"batch_size": 64, "max_steps": 20000, "lr": 1e-3, "backbone_lr": 1e-4,
                             "eval_every": 1000, "warmup_steps": 500, "weight_decay": 1e-5}},
        "sasrec": {"train": {"batch_size": 256, "max_steps": 20000, "lr": 1e-3, "eval_every": 1000}},
    },
}

for _p in PROFILES.values():  # BERT4Rec and GRU4Rec get SASRec's budget in every profile
    _p["bert4rec"] = _p["gru4rec"] = _p["sasrec"]

# variant -> (model, overrides on top of the profile)
VARIANTS = {
    "sasrec": ("sasrec", {}),
    "bert4rec": ("bert4rec", {}),
    "gru4rec": ("gru4rec", {}),
    "itemlm": ("itemlm", {}),  # the profile's ItemLM (cpu: ID-only; gpu: text in training), every slot supervised
    "itemlm-text": ("itemlm", {"itemlm": {"id_only_share": 0.25}}),  # text in 75% of training examples
    "itemlm-last": ("itemlm", {"itemlm": {"supervise": "last"}}),
}
DEFAULT_VARIANTS = ["sasrec", "itemlm"]


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def prepare(name: str, data_root: Path, cache: Path) -> Path:
    out = cache / name
    if not (out / "manifest.json").is_file():
        from itemgen.data.loaders import load_lcrec

        load_lcrec(data_root / DATASETS[name], name=name).save(out)
    return out


def set_path(tree: dict, dotted: str, raw: str) -> None:
    from itemgen.core.config import load_yaml

    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = load_yaml(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--profile", default="cpu", choices=list(PROFILES))
    ap.add_argument("--name", default=None, help="row name (default: the variant; use with --set)")
    ap.add_argument("--decoders", default="exact",
                    help="comma-separated decoders to evaluate the best checkpoint with (exact, structure, ann)")
    ap.add_argument("--finish-interrupted", action="store_true",
                    help="no training: report a run that was stopped early from its best/last checkpoints")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not args.data_root.is_dir():
        sys.exit(f"datasets not found at {args.data_root} (see ../shared/datasets/README.md)")
    info = run_info()
    for dname in args.datasets.split(","):
        if dname not in DATASETS:
            sys.exit(f"unknown dataset {dname!r} (known: {', '.join(DATASETS)})")
        path = prepare(dname, args.data_root, args.work / "data")
        ds = SequenceDataset.load(path)
        for vname in args.variants.split(","):
            if vname not in VARIANTS:
                sys.exit(f"unknown variant {vname!r} (known: {', '.join(VARIANTS)})")
            model, extra = VARIANTS[vname]
            row_name = args.name or vname
            values = merge({"model": model, "data": {"path": str(path), "max_history": 20}},
                           merge(PROFILES[args.profile][model], extra))
            for kv in args.set:
                key, _, raw = kv.partition("=")
                set_path(values, key, raw)
            values = merge(values, {"train": {"out": str(args.work / dname / row_name), "eval_users": 1000,
                                              "patience": 3, "progress": False}})
            cfg = from_dict(values)
            print(f"== {dname} / {row_name} ({args.profile})", flush=True)
            t0 = time.time()
            res = interrupted_result(cfg) if args.finish_interrupted else train(cfg, dataset=ds)
            report = evaluate_checkpoint(res.best, split="test")
            by_decoder = {}
            for dec in [d for d in args.decoders.split(",") if d != "exact"]:
                if dec == "ann":  # a flat MIPS index with per-cluster log-normalizer constants
                    from itemgen.cli.scale import build_checkpoint_index

                    build_checkpoint_index(res.best, "flat")
                by_decoder[dec] = evaluate_checkpoint(res.best, split="test", decode=dec)["metrics"]
            row = {"dataset": dname, "variant": row_name, "model": model, "profile": args.profile,
                   "test": report["metrics"], "test_by_decoder": by_decoder, "best_valid": res.best_valid, "steps": res.step,
                   "stopped": res.stopped, "train_seconds": round(res.train_seconds, 1),
                   "wall_seconds": round(time.time() - t0, 1), "eval_seconds": report["metrics"]["seconds"],
                   "config": cfg.to_dict(), **info}
            print(json.dumps({k: row[k] for k in ("dataset", "variant", "steps", "train_seconds")}),
                  {k: round(row["test"][k], 4) for k in ("recall@1", "recall@10", "ndcg@10", "mrr")}, flush=True)
            save_row(args.results, row)


def interrupted_result(cfg):
    """A run killed before its step budget: its last checkpoint says how far it got."""
    from itemgen.training.loop import TrainResult

    out = Path(cfg.train.out)
    state = json.loads((out / "last" / "trainer" / "state.json").read_text())
    return TrainResult(out, out / "best", state["step"], state["best_valid"], state["train_seconds"],
                       f"interrupted at step {state['step']} of {cfg.train.max_steps} (session time)")


def save_row(path: Path, row: dict) -> None:
    """Merge one row into the results file; several invocations may run side by side."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {"rows": []}
        key = (row["dataset"], row["variant"])
        results["rows"] = [r for r in results["rows"] if (r["dataset"], r["variant"]) != key] + [row]
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
        # the project's table only from the project's results file; elsewhere a table beside it
        doc = ROOT / "docs" / "quality.md" if path.resolve() == RESULTS.resolve() else path.with_suffix(".md")
        write_table(results, doc)


def write_table(results: dict, path: Path) -> None:
    lines = ["# Quality: ItemLM and the ID-based baselines (full catalog, leave-one-out, test users)", "",
             "Generated by `python benchmarks/quality.py` from `benchmarks/results/quality.json`; every row's",
             "config, command, commit and hardware are in that file.", "",
             "| dataset | variant | profile | Recall@1 | Recall@10 | NDCG@10 | MRR | steps | train s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results["rows"], key=lambda r: (r["dataset"], r["variant"])):
        for dec, t in [("exact", r["test"]), *r.get("test_by_decoder", {}).items()]:
            name = r["variant"] if dec == "exact" else f"{r['variant']} ({dec})"
            lines.append(f"| {r['dataset']} | {name} | {r['profile']} | {t['recall@1']:.4f} | "
                         f"{t['recall@10']:.4f} | {t['ndcg@10']:.4f} | {t['mrr']:.4f} | {r['steps']} | "
                         f"{r['train_seconds']:.0f} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
