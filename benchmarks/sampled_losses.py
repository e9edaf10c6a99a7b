"""Sampled ranking losses against the full softmax (issue 6, item 3; arXiv 2410.06371), one CPU
profile: SASRec on one prepared dataset, a fixed number of steps, several seeds.

    python benchmarks/sampled_losses.py --data DATASET_DIR

Runs: ``full`` (cross-entropy over the whole catalog), then for each sampler (--samplers), each
sample size (--negatives) and each loss (sampled_softmax, warp, lambdarank) the loss with and
without correction (losses.py says what the correction is for each). For each seed (--seeds) every
run trains from the same initialisation and batches for --steps steps, validates once at the end
and is scored on the whole test split with exact full-catalog ranking. ``--only`` runs a subset
(names as in the results file, e.g. ``full`` or ``warp/popularity/32/corrected``); (run, seed)
results already in the results file with the same profile are kept, so the grid can be filled
over several invocations of <= 10 minutes.

For each (loss, sampler, sample size) the summary gives the NDCG@10 gap to full softmax without
and with correction (means over seeds) and the share of the uncorrected gap the correction closes.
Writes benchmarks/results/sampled_losses.json and docs/sampled_losses.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("sampled_softmax", "warp", "lambdarank")


EXACT = ("warp", "lambdarank")  # also run on every item (loss.sampler=all): the objective a sample estimates


def run_names(samplers, negatives) -> list[str]:
    names = ["full"] + [f"{kind}/exact" for kind in EXACT]
    for sampler in samplers:
        for n in negatives:
            for kind in LOSSES:
                names += [f"{kind}/{sampler}/{n}/uncorrected", f"{kind}/{sampler}/{n}/corrected"]
    return names


def loss_section(name: str) -> dict:
    if name == "full":
        return {"kind": "full"}
    if name.endswith("/exact"):
        return {"kind": name.split("/")[0], "sampler": "all"}
    kind, sampler, n, corr = name.split("/")
    return {"kind": kind, "sampler": sampler, "negatives": int(n), "correction": corr == "corrected"}


def make_config(args, name: str, seed: int):
    from itemgen.core.config import from_dict

    return from_dict({
        "model": "sasrec",
        "sasrec": {"hidden": args.hidden, "n_layers": 2, "n_heads": 2, "dropout": 0.2},
        "data": {"path": str(args.data), "max_history": args.max_history},
        "loss": loss_section(name),
        "train": {"out": str(Path(args.workdir) / f"{name.replace('/', '_')}_seed{seed}"), "seed": seed,
                  "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 50, "max_steps": args.steps,
                  "eval_every": args.steps, "eval_users": args.valid_users, "patience": 100, "progress": False},
    })


def aggregate(run: dict) -> dict:
    """Means (and the NDCG@10 standard deviation) over the seeds a run has."""
    per_seed = list(run["seeds"].values())
    keys = [k for k in per_seed[0]["test"] if k not in ("users", "seconds")]
    mean = {k: statistics.fmean(r["test"][k] for r in per_seed) for k in keys}
    nd = [r["test"]["ndcg@10"] for r in per_seed]
    return {**run, "n_seeds": len(per_seed), "test": mean,
            "ndcg@10_sd": statistics.stdev(nd) if len(nd) > 1 else None,
            "train_seconds": statistics.median(r["train_seconds"] for r in per_seed),
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in per_seed)}


SUMMARY_METRICS = ("ndcg@10", "recall@10")


def summarize(runs: dict) -> list[dict]:
    """Per (loss, sampler, N) and metric: full softmax, uncorrected and corrected as means over the
    seeds all three have, the gaps to full softmax, and the per-seed paired difference
    corrected - uncorrected (mean and sd)."""
    rows = []
    full = runs.get("full")
    for name, r in runs.items():
        if not name.endswith("/uncorrected"):
            continue
        base = name[: -len("/uncorrected")]
        c = runs.get(base + "/corrected")
        kind, sampler, n = base.split("/")
        row = {"loss": kind, "sampler": sampler, "negatives": int(n), "seeds": 0}
        seeds = sorted(set(r["seeds"]) & set(c["seeds"]) & set(full["seeds"])) if c and full else []
        row["seeds"] = len(seeds)
        for m in SUMMARY_METRICS:
            if not seeds:
                row.update({f"full_{m}": None, f"uncorrected_{m}": None, f"corrected_{m}": None})
                continue
            vals = lambda run: [run["seeds"][s]["test"][m] for s in seeds]  # noqa: E731
            f, u, k = statistics.fmean(vals(full)), statistics.fmean(vals(r)), statistics.fmean(vals(c))
            diff = [b - a for a, b in zip(vals(r), vals(c))]
            gap_u, gap_c = f - u, f - k
            exact = runs.get(f"{kind}/exact")
            if exact and set(seeds) <= set(exact["seeds"]):
                row[f"exact_{m}"] = statistics.fmean(vals(exact))
            row.update({f"full_{m}": f, f"uncorrected_{m}": u, f"corrected_{m}": k,
                        f"gap_uncorrected_{m}": gap_u, f"gap_corrected_{m}": gap_c,
                        f"corrected_minus_uncorrected_{m}": statistics.fmean(diff),
                        f"corrected_minus_uncorrected_sd_{m}": statistics.stdev(diff) if len(diff) > 1 else None,
                        # share of the uncorrected gap that the correction closes (1 = all of it);
                        # undefined when the uncorrected loss is not worse than full softmax
                        f"share_closed_{m}": (gap_u - gap_c) / gap_u if gap_u > 0 else None})
        rows.append(row)
    return rows


def fmt(x, digits=4):
    return "not measured" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    p = report["profile"]
    lines = [
        "# Sampled ranking losses with bias correction",
        "",
        f"SASRec (hidden {p['hidden']}, 2 layers, {p['params']:,} parameters) on `{report['dataset']['name']}` "
        f"({report['dataset']['items']:,} items, {report['dataset']['test_users']:,} test users), "
        f"{p['steps']} steps of batch {p['batch_size']} (lr {p['lr']}), max history "
        f"{p['max_history']}, CPU with {p['threads']} torch thread(s). Per seed every run has the same "
        "initialisation and batches; test split scored by exact full-catalog ranking after the last step. "
        "Metrics are means over the seeds (NDCG@10 standard deviation over seeds beside it).",
        "",
        "Command: `" + report["command"] + "` (the grid is filled over several invocations with `--only`; each "
        "run records its own commit and date in the JSON).",
        "",
        "Correction: logQ for sampled softmax; for WARP and LambdaRank the positive's rank (and LambdaRank's "
        "negative ranks) are estimated with importance weights 1/(N q) — scaled to the catalog and unbiased "
        "for the sampler — instead of the plain count within the sample (src/itemgen/training/losses.py). "
        "`warp/exact` and `lambdarank/exact` train the same losses on every item (loss.sampler=all): the "
        "full-catalog objective that the corrected estimate is unbiased for (column 'same loss on all items').",
        "",
        "This is a quality comparison; training times are wall-clock on a shared 2-core machine as it was "
        "(load average at the start of each run in the last column), so compare them only loosely.",
        "",
        "| run | seeds | Recall@1 | Recall@10 | NDCG@10 | NDCG@10 sd | MRR | train s (median) | s/step | "
        "load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        t = r["test"]
        loads = [x.get("load_average_at_start") for x in r["seeds"].values()]
        loads = [x for x in loads if x is not None]
        lines.append(f"| {name} | {r['n_seeds']} | {fmt(t['recall@1'])} | {fmt(t['recall@10'])} | "
                     f"{fmt(t['ndcg@10'])} | {fmt(r['ndcg@10_sd'])} | {fmt(t['mrr'])} | "
                     f"{r['train_seconds']:.0f} | {r['seconds_per_step']:.3f} | "
                     f"{fmt(statistics.median(loads) if loads else None, 1)} |")
    for m in SUMMARY_METRICS:
        M = m.replace("ndcg", "NDCG").replace("recall", "Recall")
        lines += ["", f"Gap to full softmax in {M} (positive = worse than full softmax), the share of the "
                  "uncorrected gap that the correction closes, and the paired per-seed difference:", "",
                  "| loss | sampler | N | seeds | full softmax | same loss on all items | uncorrected | corrected | "
                  "gap uncorr. | gap corr. | share closed | corr. - uncorr. per seed (mean ± sd) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in report["summary"]:
            share = s.get(f"share_closed_{m}")
            lines.append(f"| {s['loss']} | {s['sampler']} | {s['negatives']} | {s['seeds']} | {fmt(s[f'full_{m}'])} | "
                         f"{fmt(s.get(f'exact_{m}')) if s['loss'] in EXACT else 'n/a'} | "
                         f"{fmt(s[f'uncorrected_{m}'])} | {fmt(s[f'corrected_{m}'])} | "
                         f"{fmt(s.get(f'gap_uncorrected_{m}'))} | {fmt(s.get(f'gap_corrected_{m}'))} | "
                         f"{'n/a (uncorrected not worse)' if share is None and f'gap_uncorrected_{m}' in s else fmt(share, 2)} | "
                         f"{fmt(s.get(f'corrected_minus_uncorrected_{m}'))} ± "
                         f"{fmt(s.get(f'corrected_minus_uncorrected_sd_{m}'))} |")
        opened = [s for s in report["summary"] if (s.get(f"gap_uncorrected_{m}") or 0) > 0]
        closed = [s for s in opened if (s[f"share_closed_{m}"] or 0) >= 0.5]
        lines += ["", f"Verdict on {M} (computed): the uncorrected loss is worse than full softmax in "
                  f"{len(opened)} of {len(report['summary'])} settings; the correction closes at least half of "
                  f"that gap in {len(closed)} of those {len(opened)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory (itemgen data prepare)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--max-history", type=int, default=50)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--negatives", default="32,512", help="two (or more) sample sizes")
    p.add_argument("--samplers", default="popularity", help="uniform,popularity")
    p.add_argument("--valid-users", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared CPU)")
    p.add_argument("--only", default=None, help="comma-separated subset of run names")
    p.add_argument("--workdir", default="/tmp/itemgen-sampled-losses")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/sampled_losses.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/sampled_losses.md"))
    args = p.parse_args(argv)

    import torch

    from itemgen.api import run_info
    from itemgen.core.io import atomic_write_text
    from itemgen.data.dataset import SequenceDataset
    from itemgen.evaluation.evaluate import evaluate
    from itemgen.models.checkpoint import load_checkpoint
    from itemgen.models.registry import build_model
    from itemgen.training.loop import train

    torch.set_num_threads(args.threads)
    negatives = [int(x) for x in args.negatives.split(",") if x]
    samplers = [x for x in args.samplers.split(",") if x]
    names = run_names(samplers, negatives)
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"--only: unknown run names {unknown} (known: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    ds = SequenceDataset.load(args.data)
    info = run_info()
    profile = {"model": "sasrec", "hidden": args.hidden, "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "max_history": args.max_history, "threads": args.threads,
               "valid_users": args.valid_users}
    out = Path(args.out)
    runs: dict = {}
    if out.is_file():
        old = json.loads(out.read_text())
        same = {k: v for k, v in old.get("profile", {}).items() if k != "params"} == profile
        if same and old.get("dataset", {}).get("content_hash") == ds.content_hash():
            runs = {n: {"loss": r["loss"], "seeds": r["seeds"]} for n, r in old.get("runs", {}).items()
                    if "seeds" in r}
        else:
            print(f"{out}: different profile or dataset, starting a new results file")

    seeds = [int(x) for x in args.seeds.split(",") if x]
    params = sum(x.numel() for x in build_model(make_config(args, "full", seeds[0]), ds.items).parameters())

    def write() -> dict:
        order = run_names(sorted({n.split('/')[1] for n in runs if n.count("/") == 3}),
                          sorted({int(n.split('/')[2]) for n in runs if n.count("/") == 3}))
        agg = {n: aggregate(runs[n]) for n in order if n in runs}
        report = {"benchmark": "sampled_losses", **info, "profile": {**profile, "params": params},
                  "dataset": {"name": ds.name, "path": str(args.data), "items": ds.n_items,
                              "test_users": len(ds.split.test), "content_hash": ds.content_hash()},
                  "runs": agg, "summary": summarize(agg)}
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
        atomic_write_text(Path(args.doc), markdown(report))
        return report

    report = None
    for seed, name in [(s, n) for s in seeds for n in names]:
        cfg = make_config(args, name, seed)
        load = os.getloadavg()[0]  # shared machine: how busy it was when this run started
        t0 = time.perf_counter()
        result = train(cfg, dataset=ds)
        wall = time.perf_counter() - t0
        model, _, _ = load_checkpoint(result.best)
        test = evaluate(model, ds.split.test, max_history=args.max_history)
        runs.setdefault(name, {"loss": loss_section(name), "seeds": {}})["seeds"][str(seed)] = {
                      "test": test, "valid": result.best_valid,
                      "train_seconds": result.train_seconds, "seconds_per_step": result.train_seconds / result.step,
                      "wall_seconds": wall, "steps": result.step, "load_average_at_start": load, "git_commit": info["git_commit"],
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": info["command"]}
        report = write()  # after every run: a timeout loses at most the run in progress
        print(f"{name} seed {seed}: test ndcg@10 {test['ndcg@10']:.4f} recall@10 {test['recall@10']:.4f} "
              f"({result.train_seconds:.0f} s)", flush=True)
    return report if report is not None else write()


if __name__ == "__main__":
    main()
