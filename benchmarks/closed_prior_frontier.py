"""What the closed-item prior trades: a checkpoint with the text-match path scored at every prior
of a grid (evaluation/closed_prior.py: one forward pass for the whole grid), NDCG@10 with the
history masked for all users, for the users whose target is a new item, and for the others.

    python benchmarks/closed_prior_frontier.py --checkpoint runs/text/office/cold10/itemlm-match-drop-prior/best \
        --data runs/text/data/office-cold10 --split valid --search 6
    python benchmarks/closed_prior_frontier.py ... --split valid --warm-floor-from runs/text/office/cold10/itemlm/best \
        --compare runs/text/office/cold10/text-knn-tfidf/best      # the warm-floor rule, paired on test

On ``--split valid`` the new items are simulated as the training run's search simulates them (the
probe: a random ``items.closed_prior_probe`` share of the trained items, their ID part closed,
drawn with the run's seed; a cold split's own new items left out): "new" = the validation users
whose target is a probe item. On ``--split test`` "new" = the cold segment (the split's new
items) and nothing is simulated; such a run is an ANALYSIS with the test in view (marked so in
the results file): the checkpoint's own prior was chosen on validation. Writes
benchmarks/results/closed_prior_frontier.json (command, commit, hardware, date, every figure),
one entry per (checkpoint, split).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from itemgen.api import run_info  # noqa: E402
from itemgen.core.config import from_dict  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.data.dataset import SequenceDataset  # noqa: E402
from itemgen.evaluation.closed_prior import prior_grid, probe_items, ranks_by_prior  # noqa: E402
from itemgen.evaluation.evaluate import rank_examples  # noqa: E402
from itemgen.evaluation.metrics import ndcg_gains, ranking_metrics  # noqa: E402
from itemgen.evaluation.segments import dataset_segments, paired_by_segment  # noqa: E402
from itemgen.models.checkpoint import load_checkpoint, read_items, save_checkpoint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "closed_prior_frontier.json"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint with items.text_match")
    ap.add_argument("--data", required=True, help="its prepared dataset")
    ap.add_argument("--split", default="valid", choices=["valid", "test"])
    ap.add_argument("--search", type=float, default=6.0, help="priors 0, 0.25, ..., this")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--warm-floor-from", type=Path, default=None,
                    help="with --split valid: a reference checkpoint (the ID-only recipe); the rule then "
                         "chooses the LARGEST prior whose validation NDCG@10 on the warm users stays at least "
                         "--warm-share times the reference's on the same users, and scores test at that prior once")
    ap.add_argument("--warm-share", type=float, default=0.98)
    ap.add_argument("--compare", type=Path, action="append", default=[],
                    help="with --warm-floor-from: a checkpoint (e.g. text-kNN) the test figures at the chosen "
                         "prior are paired with, user by user, per segment (the reference always is); repeatable")
    ap.add_argument("--out", type=Path, default=None,
                    help="with --warm-floor-from: write a copy of the checkpoint whose prior is the rule's "
                         "choice (atomically; a new folder)")
    args = ap.parse_args(argv)
    if args.out is not None and (args.warm_floor_from is None or args.out.exists()):
        sys.exit("error: --out needs --warm-floor-from and a folder that does not exist yet")
    model, cfg, _ = load_checkpoint(args.checkpoint)
    if model.items.closed() is None:
        sys.exit(f"error: {args.checkpoint} has no text-match path (items.text_match)")
    ds = SequenceDataset.load(args.data)
    examples = ds.examples(args.split)
    targets = np.asarray([e.target for e in examples])
    probe = absent = None
    if args.split == "valid":
        probe = probe_items(model.items.id_known, cfg.items.closed_prior_probe, cfg.train.seed)
        new = probe.numpy()[targets]
        if ds.cold_items is not None:
            absent = torch.zeros(ds.n_items, dtype=torch.bool)
            absent[torch.from_numpy(ds.cold_items)] = True
    else:
        if ds.cold_items is None:
            sys.exit(f"error: {args.data} has no new items (prepare it with --cold-items) to measure on test")
        new = np.isin(targets, ds.cold_items)
    grid = prior_grid(args.search)
    by = ranks_by_prior(model, examples, grid, max_history=cfg.data.max_history, exclude_history=True,
                        probe=probe, absent=absent)
    rows = []
    for g, value in enumerate(grid):
        r = by[g]
        row = {"prior": float(value), "all": round(ranking_metrics(r)["ndcg@10"], 5),
               "new": round(ranking_metrics(r[new])["ndcg@10"], 5),
               "warm": round(ranking_metrics(r[~new])["ndcg@10"], 5)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rule = None
    if args.warm_floor_from is not None:
        if args.split != "valid":
            sys.exit("error: --warm-floor-from chooses on validation: use --split valid")
        rule = warm_floor_rule(args, model, cfg, ds, examples, new, rows, absent)
        if args.out is not None:  # the model now holds the rule's prior (items.closed_prior)
            catalog, dataset = read_items(args.checkpoint)
            values = cfg.to_dict()
            values["items"]["closed_prior"] = rule["chosen_prior"]
            save_checkpoint(args.out, model, from_dict(values), catalog, dataset=dataset,
                            metrics={"closed_prior_rule": rule})
    entry = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split, "rule": rule,
             "chosen_prior": float(model.items.closed_prior), "users": len(examples), "new_users": int(new.sum()),
             "new_means": "probe-item targets (simulated)" if args.split == "valid" else "cold segment",
             "test_in_view": args.split == "test", "metric": "ndcg@10, history masked", "rows": rows, **run_info()}
    with open(args.results.with_suffix(".lock"), "w") as lock:  # runs side by side merge whole
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": []}
        results["runs"] = [r for r in results["runs"] if (r["checkpoint"], r["split"]) != (entry["checkpoint"],
                                                                                            entry["split"])] + [entry]
        atomic_write_text(args.results, json.dumps(results, indent=2) + "\n")
    return entry


def warm_floor_rule(args, model, cfg, ds, examples, new, rows, absent) -> dict:
    """The largest prior whose validation warm NDCG@10 stays >= warm_share x the reference's (on
    the same users, the probe's and the cold split's items treated as in the search), then test
    scored once at it (cold / warm segments of the split)."""
    ref, ref_cfg, _ = load_checkpoint(args.warm_floor_from)
    ref_ranks = rank_examples(ref, examples, max_history=ref_cfg.data.max_history, exclude_history=True,
                              absent=absent)
    floor = args.warm_share * ranking_metrics(ref_ranks[~new])["ndcg@10"]
    ok = [r for r in rows if r["warm"] >= floor]
    chosen = max(r["prior"] for r in ok) if ok else 0.0
    model.items.set_closed_prior(chosen)
    test = ds.examples("test")
    t = np.asarray([e.target for e in test])
    cold = np.isin(t, ds.cold_items) if ds.cold_items is not None else np.zeros(len(t), dtype=bool)
    ranks = rank_examples(model, test, max_history=cfg.data.max_history, exclude_history=True)
    out = {"reference": str(args.warm_floor_from), "warm_share": args.warm_share,
           "reference_valid_warm": round(floor / args.warm_share, 5), "floor": round(floor, 5), "chosen_prior": chosen,
           "test": {"all": round(ranking_metrics(ranks)["ndcg@10"], 5), "users": len(test)}}
    if cold.any():
        out["test"].update(cold=round(ranking_metrics(ranks[cold])["ndcg@10"], 5),
                           warm=round(ranking_metrics(ranks[~cold])["ndcg@10"], 5))
    # paired differences on test, user by user: this checkpoint at the chosen prior minus each other
    masks = {**({"cold": cold, "warm": ~cold} if cold.any() else {}), **dataset_segments(ds, "test")}
    masks = {k: masks[k] for k in ("cold", "warm", "tail", "head") if k in masks}
    gains = ndcg_gains(ranks)
    out["paired"] = {}
    for other in [args.warm_floor_from, *args.compare]:
        m, c, _ = load_checkpoint(other)
        theirs = ndcg_gains(rank_examples(m, test, max_history=c.data.max_history, exclude_history=True))
        out["paired"][str(other)] = {seg: {k: round(v, 5) if isinstance(v, float) else v for k, v in p.items()}
                                     for seg, p in paired_by_segment(gains, theirs, masks).items()}
    print(json.dumps({"rule": out}), flush=True)
    return out


if __name__ == "__main__":
    main()
