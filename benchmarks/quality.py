"""Quality benchmark: ItemLM against SASRec on the shared Amazon datasets, same split, full
catalog, test users. Writes benchmarks/results/quality.json (rows merged by dataset+variant, so
runs can be split over several invocations) and the table in docs/quality.md.

    python benchmarks/quality.py                          # every dataset, every default variant
    python benchmarks/quality.py --datasets scientific --variants itemlm,sasrec
    python benchmarks/quality.py --variants itemlm --set itemlm.head=two_level ...   # extra overrides

    python benchmarks/quality.py --datasets office --variants sasrec,abl-init-random,abl-untied  # ablation rows

Every model trains by epochs with early stopping on all validation users. Profiles: ``cpu``
(default; 2 cores: SmolLM2-135M cut to its first 2 layers, compact ID-only prompt) and ``gpu``
(all 30 layers, the paper's prompt with text in 75% of training examples). ItemLM's item vectors
start from the SASRec row of the same dataset (``itemlm.init=sasrec``), so run ``sasrec`` first
(it is first in the default list). Every row records its profile, epochs, wall time, command,
commit, hardware and the full config it ran.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from itemgen.api import evaluate_checkpoint, run_info, user_ndcg  # noqa: E402
from itemgen.core.config import from_dict  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.core.recipes import ITEMLM_CPU, ITEMLM_GPU, SASREC, SASREC_DROPOUTS, itemlm_from_sasrec, merge  # noqa: E402
from itemgen.data.dataset import SequenceDataset  # noqa: E402
from itemgen.evaluation.metrics import paired_difference  # noqa: E402
from itemgen.training.loop import train  # noqa: E402
from itemgen.training.tune import grid_search, read_selected  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
DATASETS = {  # name -> folder under ../shared/datasets
    "scientific": "amazon2018-scientific",
    "office": "amazon2014-office",
    "instruments": "amazon2018-instruments",
}

PROFILES = {
    "cpu": {"sasrec": SASREC, "bert4rec": {"train": SASREC["train"]}, "gru4rec": {"train": SASREC["train"]},
            "itemlm": ITEMLM_CPU},
    # the same recipes with the whole pretrained backbone, the paper's prompt, text in 75% of
    # training examples (not run yet: no GPU was lent)
    "gpu": {"sasrec": SASREC, "bert4rec": {"train": SASREC["train"]}, "gru4rec": {"train": SASREC["train"]},
            "itemlm": ITEMLM_GPU},
}

# variant -> (model, overrides on top of the profile); abl-* change ONE lever of the profile's ItemLM
VARIANTS = {
    "sasrec": ("sasrec", {}),
    # SASRec with its dropout chosen by validation under RecBole's protocol (history kept), the
    # protocol its test figures are compared with published ones under
    "sasrec-kept": ("sasrec", {"train": {"eval_exclude_history": False}}),
    "bert4rec": ("bert4rec", {}),
    "gru4rec": ("gru4rec", {}),
    "itemlm": ("itemlm", {}),
    "abl-init-random": ("itemlm", {"itemlm": {"init": "random"}}),
    # titles encoded by the whole pretrained SmolLM2 (the recipe's own backbone is random)
    "abl-init-text": ("itemlm", {"itemlm": {"init": "text", "text_backbone": "smollm2-135m"}}),
    "abl-init-ials": ("itemlm", {"itemlm": {"init": "ials"}}),
    "abl-tied": ("itemlm", {"itemlm": {"tie_items": True}}),
    "abl-prompt-compact": ("itemlm", {"itemlm": {"prompt": "compact"}}),
    "abl-dropout-0.2": ("itemlm", {"itemlm": {"item_dropout": 0.2, "hidden_dropout": 0.2}}),
    "abl-no-dropout": ("itemlm", {"itemlm": {"item_dropout": 0.0, "hidden_dropout": 0.0}}),
    "abl-dropout-0.5": ("itemlm", {"itemlm": {"item_dropout": 0.5, "hidden_dropout": 0.5}}),
    "abl-frozen-backbone": ("itemlm", {"itemlm": {"freeze_backbone": True}}),
    "abl-freeze-items": ("itemlm", {"itemlm": {"freeze_items": True}}),
    "abl-text-in-training": ("itemlm", {"itemlm": {"id_only_share": 0.25}}),
    "abl-supervise-last": ("itemlm", {"itemlm": {"supervise": "last"}}),
    "abl-layers-4": ("itemlm", {"itemlm": {"n_layers": 4}}),
    "abl-pretrained-backbone": ("itemlm", {"itemlm": {"pretrained": True}}),
    # two levers together: text in training is what the pretrained layers could use
    "abl-pretrained-text": ("itemlm", {"itemlm": {"pretrained": True, "id_only_share": 0.25}}),
    "abl-text-vocab-softmax": ("itemlm", {"itemlm": {"text_vocab_in_softmax": True, "freeze_text_embeddings": False}}),
    "abl-same-lr": ("itemlm", {"train": {"backbone_lr": None}}),
    "abl-weight-decay-0.1": ("itemlm", {"train": {"weight_decay": 0.1}}),  # AdamW; norms, biases, embeddings exempt
    "abl-no-warmup": ("itemlm", {"train": {"warmup_steps": 0}}),
    # the recipe before cosine: a constant lr until validation stops improving (patience 3)
    "abl-constant-lr": ("itemlm", {"train": {"lr_schedule": "constant", "max_epochs": 15}}),
    "abl-text-encoder": ("itemlm", {"itemlm": {"item_encoder": "text+id"}}),  # + a linear map of title states
    "abl-lr-1e-3": ("itemlm", {"train": {"lr": 1e-3, "backbone_lr": 1e-4}}),
    "abl-cosine-6-epochs": ("itemlm", {"train": {"lr_schedule": "cosine", "max_epochs": 6}}),
    # exploratory rows kept from before the lr change: "explore-lr-1e-3-cosine-6-epochs" (office)
}
DEFAULT_VARIANTS = ["sasrec", "bert4rec", "gru4rec", "itemlm"]
# variants whose one config value is chosen by validation (training/tune.py); ItemLM then starts
# from the chosen SASRec and takes its dropout
GRIDS = {"sasrec": ("sasrec.dropout", SASREC_DROPOUTS), "sasrec-kept": ("sasrec.dropout", SASREC_DROPOUTS)}
# what ItemLM must reach: RecBole 1.2.1 SASRec on these splits (../shared/docs/quality-evidence.md)
PUBLISHED_SASREC = {"scientific": 0.0634, "office": 0.0474, "instruments": 0.0743}




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
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed; other than 0, rows are VARIANT-seedN: SASRec trains at the dropout "
                         "seed 0 chose and ItemLM starts from that seed's SASRec")
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
            row_name = args.name or (vname if args.seed == 0 else f"{vname}-seed{args.seed}")
            sasrec_name = "sasrec" if args.seed == 0 else f"sasrec-seed{args.seed}"
            values = merge({"model": model, "data": {"path": str(path), "max_history": 50}},
                           merge(PROFILES[args.profile][model], extra))
            values = merge(values, {"train": {"seed": args.seed}})
            if model == "itemlm" and values["itemlm"].get("init") == "sasrec":
                # the variant's own levers win over what it inherits from SASRec (abl-no-dropout)
                values = merge(merge(values, from_selected_sasrec(args.work / dname / sasrec_name, dname, row_name)),
                               extra)
            for kv in args.set:
                key, _, raw = kv.partition("=")
                set_path(values, key, raw)
            values = merge(values, {"train": {"out": str(args.work / dname / row_name), "progress": False}})
            cfg = from_dict(values)
            print(f"== {dname} / {row_name} ({args.profile})", flush=True)
            t0 = time.time()
            grid = None
            if args.finish_interrupted:
                res = interrupted_result(cfg)
            elif vname in GRIDS:  # SASRec: its dropout chosen by validation (training/tune.py)
                key, grid_values = GRIDS[vname]
                if args.seed != 0:  # the other seeds train once, at the value seed 0 chose
                    grid_values = [selected_sasrec(args.work / dname / vname, dname, row_name)["value"]]
                tuned = grid_search(cfg, key, list(grid_values), dataset=ds)
                res, grid = tuned.best, {"key": key, "chosen": tuned.value, "runs": tuned.runs}
            else:
                res = train(cfg, dataset=ds)
            # the headline protocol ranks without the user's history items (RecBole's, and what
            # `itemgen serve` returns); the same checkpoint with the history kept is the second column
            masked = evaluate_checkpoint(res.best, split="test", exclude_history=True,
                                         out=res.best / "eval_test_masked.json")["metrics"]
            report = evaluate_checkpoint(res.best, split="test")
            gains = user_ndcg(res.best, split="test", data=path, exclude_history=True)
            np.save(args.work / dname / f"{row_name}.test_gains.npy", gains)
            by_decoder = {}
            for dec in [d for d in args.decoders.split(",") if d != "exact"]:
                if dec == "ann":  # a flat MIPS index with per-cluster log-normalizer constants
                    from itemgen.cli.scale import build_checkpoint_index

                    build_checkpoint_index(res.best, "flat")
                by_decoder[dec] = evaluate_checkpoint(res.best, split="test", decode=dec)["metrics"]
            row = {"dataset": dname, "variant": row_name, "model": model, "profile": args.profile,
                   "test": report["metrics"], "test_history_masked": masked, "test_by_decoder": by_decoder,
                   "vs_sasrec_paired": paired_vs(args.work / dname, sasrec_name, row_name, gains),
                   # what one lever did: against the recipe of the same seed
                   "vs_recipe_paired": paired_vs(args.work / dname, "itemlm" + row_name[len(vname):], row_name,
                                                 gains) if vname.startswith("abl-") else None,
                   "best_valid": res.best_valid, "valid_history_masked": cfg.train.eval_exclude_history,
                   "steps": res.step, "epochs": res.epochs, "best_step": res.best_step,
                   "stopped": res.stopped, "train_seconds": round(res.train_seconds, 1),
                   "wall_seconds": round(time.time() - t0, 1), "eval_seconds": report["metrics"]["seconds"],
                   "init_from": cfg.itemlm.init_from if model == "itemlm" and cfg.itemlm.init == "sasrec" else None,
                   "grid": grid, "config": cfg.to_dict(), **info}
            print(json.dumps({k: row[k] for k in ("dataset", "variant", "steps", "epochs", "train_seconds")}),
                  {k: round(row["test_history_masked"][k], 4) for k in ("recall@10", "ndcg@10", "mrr", "top1_share")},
                  "history kept:", round(row["test"]["ndcg@10"], 4), flush=True)
            save_row(args.results, row)


def from_selected_sasrec(sasrec_dir: Path, dname: str, row_name: str) -> dict:
    """ItemLM starts from the SASRec the sasrec variant chose for this dataset: its item vectors
    and its dropout (recipes.itemlm_from_sasrec)."""
    sel = selected_sasrec(sasrec_dir, dname, row_name)
    return itemlm_from_sasrec(sel["checkpoint"], float(sel["value"]))


def selected_sasrec(sasrec_dir: Path, dname: str, row_name: str) -> dict:
    try:
        return read_selected(sasrec_dir)
    except FileNotFoundError:
        seed = SEED_ROW.search(row_name)
        sys.exit(f"{dname}/{row_name} needs the tuned SASRec in {sasrec_dir}, which does not exist: "
                 f"run the sasrec variant first (--variants sasrec,{SEED_ROW.sub('', row_name)}"
                 f"{' --seed ' + seed.group(0)[len('-seed'):] if seed else ''})")


def paired_vs(work: Path, ref_name: str, row_name: str, gains: np.ndarray) -> dict | None:
    """This row's NDCG@10 (history masked) minus the row ref_name's, user by user
    (metrics.paired_difference); None where that row has not run."""
    ref = work / f"{ref_name}.test_gains.npy"
    if row_name == ref_name or not ref.is_file():
        return None
    return paired_difference(gains, np.load(ref))


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


SEED_ROW = re.compile(r"-seed\d+$")


def sasrec_of(variant: str) -> str:
    """The SASRec row a row compares with: its round's (r1-) or its seed's."""
    if variant.startswith("r1-"):
        return "r1-sasrec"
    seed = SEED_ROW.search(variant)
    return f"sasrec{seed.group(0)}" if seed else "sasrec"


def write_table(results: dict, path: Path) -> None:
    rows = sorted(results["rows"], key=lambda r: (r["dataset"], r["variant"]))
    by = {(r["dataset"], r["variant"]): r for r in rows}
    head = ["| dataset | variant | profile | NDCG@10 (± s.e.) | Recall@10 | MRR | top-1 share | vs SASRec | "
            "paired diff (± s.e.) | NDCG@10 history kept | valid NDCG@10 | epochs | train s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def line(r: dict, t: dict, name: str, vs_recipe: bool = False) -> str:
        # the headline protocol masks the history; rows from before it was recorded show their one test
        m = r.get("test_history_masked", t) if t is r["test"] else t
        sas = by.get((r["dataset"], sasrec_of(r["variant"])))
        sas_m = sas and sas.get("test_history_masked", sas["test"])
        ratio = f"{m['ndcg@10'] / sas_m['ndcg@10']:.2f}x" if sas and r is not sas and "epochs" in r else ""
        p = r.get("vs_sasrec_paired")
        paired = f"{p['diff']:+.4f} ± {p['se']:.4f}" if p and t is r["test"] else ""
        se = f" ± {m['ndcg@10_se']:.4f}" if "ndcg@10_se" in m else ""
        top1 = f"{m['top1_share']:.3f}{' COLLAPSED' if m.get('collapsed') else ''}" if "top1_share" in m else "-"
        epochs = f"{r['epochs']:.1f}" if r.get("epochs") else "-"
        valid = f"{r['best_valid']['ndcg@10']:.4f}" if r.get("best_valid") and t is r["test"] else "-"
        kept = f"{t['ndcg@10']:.4f}" if m is not t else "-"
        secs = sum(x["train_seconds"] for x in r["grid"]["runs"]) if r.get("grid") else r["train_seconds"]
        text = (f"| {r['dataset']} | {name} | {r['profile']} | {m['ndcg@10']:.4f}{se} | {m['recall@10']:.4f} | "
                f"{m['mrr']:.4f} | {top1} | {ratio} | {paired} | {kept} | {valid} | {epochs} | {secs:.0f} |")
        if vs_recipe:
            q = r.get("vs_recipe_paired")
            text += f" {q['diff']:+.4f} ± {q['se']:.4f} |" if q else "  |"
        return text

    seeds = [r for r in rows if SEED_ROW.search(r["variant"]) and not r["variant"].startswith("abl-")]
    main = [r for r in rows if r["variant"] in DEFAULT_VARIANTS and "epochs" in r]
    abl = [r for r in rows if r["variant"].startswith("abl-")]
    r1 = [r for r in rows if r["variant"].startswith("r1-")]
    other = [r for r in rows if r not in main and r not in abl and r not in r1 and r not in seeds]
    lines = ["# Quality: ItemLM and the ID-based baselines (full catalog, leave-one-out, test users)", "",
             "Generated by `python benchmarks/quality.py` from `benchmarks/results/quality.json`; every row's",
             "config, command, commit and hardware are in that file. Every model trains by epochs and keeps",
             "its best epoch by validation NDCG@10 over ALL validation users (the baselines stop on patience;",
             "ItemLM's recipe runs 5 epochs with a cosine lr). The headline protocol ranks the whole",
             "catalog without the user's history items, as RecBole's full-sort evaluation and `itemgen serve` do",
             "(no item repeats in a user's sequence in these datasets); \"history kept\" is the same checkpoint",
             "with them left in. \"top-1 share\": the share of test users receiving the most common top-1 item",
             "(over 0.2: collapsed). \"vs SASRec\": NDCG@10 over the SASRec row of the same dataset; \"paired",
             "diff\": the mean over test users of (this model's NDCG@10 - SASRec's) and its standard error (the",
             "same users score both, so it is much tighter than either row's own s.e.). SASRec's dropout is",
             "chosen per dataset by validation from " + ", ".join(map(str, SASREC_DROPOUTS)) + " (its train s: the whole grid);",
             "ItemLM starts from that SASRec and takes its dropout. The diagnosis, what each lever did and",
             "the exploratory trials behind the recipe: [quality_notes.md](quality_notes.md).", "",
             "## Headline", "",
             "Published RecBole 1.2.1 SASRec on these splits (the bar for our SASRec; RecBole masks history",
             "items): " + ", ".join(f"{d} {v:.4f}" for d, v in PUBLISHED_SASREC.items()) + ".", "", *head]
    lines += [line(r, r["test"], r["variant"]) for r in main]
    if seeds:
        lines += ["", "## Seeds", "",
                  "The headline rows are seed 0. Each other seed trains SASRec once at the dropout seed 0 chose",
                  "and ItemLM from that seed's SASRec (`--seed N`); \"vs SASRec\" and the paired difference",
                  "compare with the SASRec of the same seed. Mean ± standard deviation over seeds:", "",
                  "| dataset | seeds | SASRec NDCG@10 | ItemLM NDCG@10 | ratio of means | seeds with ItemLM >= SASRec | "
                  "mean paired diff (± s.e. over seeds) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for d in sorted({r["dataset"] for r in seeds}):
            suffixes = [""] + sorted({SEED_ROW.search(r["variant"]).group(0) for r in seeds if r["dataset"] == d})
            pairs = [(by[(d, "sasrec" + k)], by[(d, "itemlm" + k)]) for k in suffixes
                     if (d, "sasrec" + k) in by and (d, "itemlm" + k) in by]
            if not pairs:
                continue
            sas_v, ilm_v = (np.array([x.get("test_history_masked", x["test"])["ndcg@10"] for x in col])
                            for col in zip(*pairs))
            diffs = np.array([i["vs_sasrec_paired"]["diff"] for _, i in pairs])
            sd = (lambda v: f" ± {v.std(ddof=1):.4f}" if len(v) > 1 else "")
            se = f" ± {diffs.std(ddof=1) / np.sqrt(len(diffs)):.4f}" if len(diffs) > 1 else ""
            lines.append(f"| {d} | {len(pairs)} | {sas_v.mean():.4f}{sd(sas_v)} | {ilm_v.mean():.4f}{sd(ilm_v)} | "
                         f"{ilm_v.mean() / sas_v.mean():.3f}x | {int((ilm_v >= sas_v).sum())} of {len(pairs)} | "
                         f"{diffs.mean():+.4f}{se} |")
        lines += ["", *head, *(line(r, r["test"], r["variant"]) for r in seeds)]
    if abl:
        lines += ["", "## Ablation: one lever of the ItemLM recipe at a time", "",
                  "`itemlm` is the recipe; each `abl-*` row changes one lever (benchmarks/quality.py VARIANTS).",
                  "The last column is the paired difference from the recipe row (`itemlm`), what the lever did.",
                  "Rows marked † were run around the recipe before its lr schedule became cosine (that recipe is",
                  "`abl-constant-lr`); their last column compares with it.",
                  "", head[0] + " paired vs recipe (± s.e.) |", head[1] + "---:|"]
        lines += [line(r, r["test"], r["variant"] + (" †" if r.get("recipe_row") else ""), vs_recipe=True)
                  for r in abl]
    if r1:
        lines += ["", "## Ablation around recipe 1 (pretrained SmolLM2 layers, tied item vectors, validation with",
                  "history kept; SASRec with dropout 0.5)", "",
                  "`r1-itemlm` was the recipe then; each `r1-abl-*` row changed one lever of it; \"vs SASRec\"",
                  "compares with `r1-sasrec`.", "", *head]
        lines += [line(r, r["test"], r["variant"]) for r in r1]
    if other:
        lines += ["", "## Earlier rows (fixed step budgets, older recipes; kept for the record)", "", *head]
        for r in other:
            for dec, t in [("exact", r["test"]), *r.get("test_by_decoder", {}).items()]:
                lines.append(line(r, t, r["variant"] if dec == "exact" else f"{r['variant']} ({dec})"))
    atomic_write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
