"""Sampled ranking losses against the full softmax (issue 6, item 3; arXiv 2410.06371), one CPU
profile: SASRec on one prepared dataset, a fixed number of steps, the same seed and batches.

    flock /tmp/itemgen-bench.lock python benchmarks/sampled_losses.py --data DATASET_DIR

Runs: ``full`` (cross-entropy over the whole catalog), then for each sampler (--samplers), each
sample size (--negatives) and each loss (sampled_softmax, warp, lambdarank) the loss with and
without correction (losses.py says what the correction is for each). Every run trains from the
same initialisation for --steps steps, validates once at the end and is scored on the whole test
split with exact full-catalog ranking. ``--only`` runs a subset (names as in the results file,
e.g. ``full`` or ``warp/popularity/32/corrected``); runs already in the results file with the
same profile are kept, so the grid can be filled over several invocations of <= 10 minutes.

For each (loss, sampler, sample size) the summary gives the NDCG@10 gap to full softmax without
and with correction and the share of the uncorrected gap the correction closes.
Writes benchmarks/results/sampled_losses.json and docs/sampled_losses.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("sampled_softmax", "warp", "lambdarank")


def run_names(samplers, negatives) -> list[str]:
    names = ["full"]
    for sampler in samplers:
        for n in negatives:
            for kind in LOSSES:
                names += [f"{kind}/{sampler}/{n}/uncorrected", f"{kind}/{sampler}/{n}/corrected"]
    return names


def loss_section(name: str) -> dict:
    if name == "full":
        return {"kind": "full"}
    kind, sampler, n, corr = name.split("/")
    return {"kind": kind, "sampler": sampler, "negatives": int(n), "correction": corr == "corrected"}


def make_config(args, name: str):
    from itemgen.config import from_dict

    return from_dict({
        "model": "sasrec",
        "sasrec": {"hidden": args.hidden, "n_layers": 2, "n_heads": 2, "dropout": 0.2},
        "data": {"path": str(args.data), "max_history": args.max_history},
        "loss": loss_section(name),
        "train": {"out": str(Path(args.workdir) / name.replace("/", "_")), "seed": args.seed,
                  "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 50, "max_steps": args.steps,
                  "eval_every": args.steps, "eval_users": args.valid_users, "patience": 100, "progress": False},
    })


def summarize(runs: dict) -> list[dict]:
    rows = []
    full = runs.get("full")
    for name, r in runs.items():
        if not name.endswith("/uncorrected"):
            continue
        base = name[: -len("/uncorrected")]
        c = runs.get(base + "/corrected")
        kind, sampler, n = base.split("/")
        row = {"loss": kind, "sampler": sampler, "negatives": int(n),
               "uncorrected_ndcg@10": r["test"]["ndcg@10"],
               "corrected_ndcg@10": c["test"]["ndcg@10"] if c else None,
               "full_ndcg@10": full["test"]["ndcg@10"] if full else None}
        if c and full:
            gap_u = full["test"]["ndcg@10"] - r["test"]["ndcg@10"]
            gap_c = full["test"]["ndcg@10"] - c["test"]["ndcg@10"]
            row.update({"gap_uncorrected": gap_u, "gap_corrected": gap_c,
                        # share of the uncorrected gap that the correction closes (1 = all of it);
                        # undefined when the uncorrected loss is not worse than full softmax
                        "share_closed": (gap_u - gap_c) / gap_u if gap_u > 0 else None})
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
        f"{p['steps']} steps of batch {p['batch_size']} (lr {p['lr']}, seed {p['seed']}), max history "
        f"{p['max_history']}, CPU with {p['threads']} torch thread(s). Every run: same initialisation, same "
        "batches; test split scored by exact full-catalog ranking after the last step.",
        "",
        "Command: `" + report["command"] + "` (the grid is filled over several invocations with `--only`; each "
        "run records its own commit and date in the JSON).",
        "",
        "Correction: logQ for sampled softmax; for WARP and LambdaRank the positive's rank (and LambdaRank's "
        "negative ranks) are estimated with importance weights 1/(N q) — scaled to the catalog and unbiased "
        "for the sampler — instead of the plain count within the sample (src/itemgen/losses.py).",
        "",
        "| run | Recall@1 | Recall@10 | NDCG@10 | MRR | train s | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        t = r["test"]
        lines.append(f"| {name} | {fmt(t['recall@1'])} | {fmt(t['recall@10'])} | {fmt(t['ndcg@10'])} | "
                     f"{fmt(t['mrr'])} | {r['train_seconds']:.0f} | {r['seconds_per_step']:.3f} |")
    lines += ["", "Gap to full softmax in NDCG@10 (positive = worse than full softmax) and the share of the "
              "uncorrected gap that the correction closes:", "",
              "| loss | sampler | N | full | uncorrected | corrected | gap uncorr. | gap corr. | share closed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        share = s.get("share_closed")
        lines.append(f"| {s['loss']} | {s['sampler']} | {s['negatives']} | {fmt(s['full_ndcg@10'])} | "
                     f"{fmt(s['uncorrected_ndcg@10'])} | {fmt(s['corrected_ndcg@10'])} | "
                     f"{fmt(s.get('gap_uncorrected'))} | {fmt(s.get('gap_corrected'))} | "
                     f"{'n/a (uncorrected not worse)' if share is None and 'gap_uncorrected' in s else fmt(share, 2)} |")
    opened = [s for s in report["summary"] if (s.get("gap_uncorrected") or 0) > 0]
    closed = [s for s in opened if s["share_closed"] is not None and s["share_closed"] >= 0.5]
    lines += ["", f"Verdict (computed): the uncorrected loss is worse than full softmax in {len(opened)} of "
              f"{len(report['summary'])} settings; the correction closes at least half of that gap in "
              f"{len(closed)} of those {len(opened)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory (itemgen data prepare)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--max-history", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
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
    from itemgen.checkpoint import load_checkpoint
    from itemgen.data import SequenceDataset, atomic_write_text
    from itemgen.evaluate import evaluate
    from itemgen.train import train

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
               "lr": args.lr, "max_history": args.max_history, "seed": args.seed, "threads": args.threads,
               "valid_users": args.valid_users}
    out = Path(args.out)
    runs: dict = {}
    if out.is_file():
        old = json.loads(out.read_text())
        same = {k: v for k, v in old.get("profile", {}).items() if k != "params"} == profile
        if same and old.get("dataset", {}).get("content_hash") == ds.content_hash():
            runs = old.get("runs", {})
        else:
            print(f"{out}: different profile or dataset, starting a new results file")

    params = None
    for name in names:
        cfg = make_config(args, name)
        t0 = time.perf_counter()
        result = train(cfg, dataset=ds)
        wall = time.perf_counter() - t0
        model, _, _ = load_checkpoint(result.best)
        params = sum(x.numel() for x in model.parameters())
        test = evaluate(model, ds.split.test, max_history=args.max_history)
        runs[name] = {"loss": loss_section(name), "test": test, "valid": result.best_valid,
                      "train_seconds": result.train_seconds, "seconds_per_step": result.train_seconds / result.step,
                      "wall_seconds": wall, "steps": result.step, "git_commit": info["git_commit"],
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": info["command"]}
        print(f"{name}: test ndcg@10 {test['ndcg@10']:.4f} recall@10 {test['recall@10']:.4f} "
              f"({result.train_seconds:.0f} s)", flush=True)
    order = run_names(sorted({n.split('/')[1] for n in runs if n != "full"}),
                      sorted({int(n.split('/')[2]) for n in runs if n != "full"}))
    runs = {n: runs[n] for n in order if n in runs}
    if params is None:
        from itemgen.recommender import build_model

        params = sum(x.numel() for x in build_model(make_config(args, "full"), ds.items).parameters())
    report = {"benchmark": "sampled_losses", **info, "profile": {**profile, "params": params},
              "dataset": {"name": ds.name, "path": str(args.data), "items": ds.n_items,
                          "test_users": len(ds.split.test), "content_hash": ds.content_hash()},
              "runs": runs, "summary": summarize(runs)}
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(args.doc), markdown(report))
    return report


if __name__ == "__main__":
    main()
