"""L2D latent-space decoding against the model's own decoding (issue 6, item 2).

    flock /tmp/itemgen-bench.lock python benchmarks/l2d.py --checkpoint CKPT [--checkpoint CKPT2 ...]

For each trained checkpoint (any model; the intended one is the title baseline, whose own
decoding is trie-constrained beam search in language space): build the L2D memory over the
training prefixes of the checkpoint's dataset (timed; saved beside the checkpoint, so
``itemgen evaluate CKPT --decode l2d_global`` reuses it), then on the same fixed subset of test
users compare the native decoder ("beam" for generative models, else "exact") with
``l2d_global`` and ``l2d_local``: Recall/NDCG/MRR (top-``cutoff`` lists), per-request latency
(one history per call, median over repeated requests, all decoders side by side in one run),
and the cold-start failure: how many test targets were never a training target (L2D cannot
return them) and each decoder's Recall@10 on those and on the rest.
Writes benchmarks/results/l2d.json and docs/l2d.md (merged by checkpoint name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def latency_ms(model, decoder, examples, max_history: int, n: int) -> float:
    times = []
    for ex in examples[:n + 2]:
        t0 = time.perf_counter()
        q = model.encode(model.to_device(model.query_batch([ex.history[-max_history:]])))
        decoder.topk(q, 10)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])  # the first calls warm caches and are dropped


@torch.inference_mode()
def ranked(model, decoder, examples, max_history: int, cutoff: int, batch_size: int) -> np.ndarray:
    """-> (n,) rank of each target in the decoder's top-cutoff list (cutoff + 1 when absent)."""
    ranks = np.full(len(examples), cutoff + 1, dtype=np.int64)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        q = model.encode(model.to_device(model.query_batch([e.history[-max_history:] for e in chunk])))
        _, top = decoder.topk(q, cutoff)
        top = top.cpu().numpy()
        for r, e in enumerate(chunk):
            hit = np.flatnonzero(top[r] == e.target)
            if hit.size:
                ranks[start + r] = hit[0] + 1
    return ranks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="trained checkpoint (repeatable)")
    p.add_argument("--name", action="append", default=None, help="row name per checkpoint (default: its folder)")
    p.add_argument("--test-users", type=int, default=300)
    p.add_argument("--cutoff", type=int, default=20, help="top-k list length scored (Recall/NDCG@<=cutoff exact)")
    p.add_argument("--m", type=int, default=100, help="L2D local: nearest memory states")
    p.add_argument("--per-sequence", type=int, default=None, help="memory: latest prefixes per training sequence")
    p.add_argument("--latency-requests", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids barrier stalls on a busy CPU)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/l2d.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/l2d.md"))
    args = p.parse_args(argv)

    from itemgen.api import run_info
    from itemgen.core.io import atomic_write_text
    from itemgen.data.dataset import training_sequences
    from itemgen.data.load import load_dataset
    from itemgen.evaluation.evaluate import subsample
    from itemgen.evaluation.metrics import ranking_metrics
    from itemgen.models.checkpoint import load_checkpoint
    from itemgen.topk.factory import make_decoder
    from itemgen.topk.l2d import L2DTopK, build_memory, weights_digest, MEMORY_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.is_file() else {"benchmark": "l2d", "runs": {}}
    names = args.name or [Path(c).resolve().parent.name + "/" + Path(c).name for c in args.checkpoint]
    for ckpt, name in zip(args.checkpoint, names):
        ckpt = Path(ckpt)
        print(f"== {name} ({ckpt})", file=sys.stderr, flush=True)
        model, cfg, _ = load_checkpoint(ckpt)
        torch.manual_seed(0)
        ds = load_dataset(cfg)
        mh = cfg.data.max_history
        t0 = time.perf_counter()
        mem = build_memory(model, training_sequences(ds, mh), max_history=mh, per_sequence=args.per_sequence,
                           meta={"weights": weights_digest(ckpt), "dataset": ds.name})
        build_s = time.perf_counter() - t0
        mem.save(ckpt / MEMORY_DIR)
        native = "beam" if model.name in ("title", "semantic_id") else "exact"
        decoders = {native: make_decoder(native, model),
                    "l2d_global": L2DTopK(model, "global", memory=mem),
                    "l2d_local": L2DTopK(model, "local", memory=mem, m=args.m)}
        test = subsample(ds.split.test, args.test_users, seed=0)
        counts = mem.counts.numpy()
        cold = np.asarray([counts[e.target] == 0 for e in test])
        rows = {}
        for dname, dec in decoders.items():
            t1 = time.perf_counter()
            r = ranked(model, dec, test, mh, args.cutoff, args.batch_size)
            eval_s = time.perf_counter() - t1
            m = ranking_metrics(r)
            m["mrr"] = float(np.mean(np.where(r <= args.cutoff, 1.0 / r, 0.0)))  # a miss adds 0, not 1/(cutoff+1)
            m["mrr_cutoff"] = args.cutoff
            rows[dname] = {
                "method": f"{model.name} ({dname})", "decode": dname, "test": m,
                "recall@10_cold_targets": float(np.mean(r[cold] <= 10)) if cold.any() else None,
                "recall@10_warm_targets": float(np.mean(r[~cold] <= 10)) if (~cold).any() else None,
                "eval_seconds": round(eval_s, 2),
                "latency_ms": round(latency_ms(model, dec, test, mh, args.latency_requests), 3),
            }
            print(json.dumps({dname: {k: rows[dname][k] for k in ("latency_ms", "eval_seconds")},
                              **{k: round(m[k], 4) for k in ("recall@10", "ndcg@10")}}), file=sys.stderr, flush=True)
        for dname in rows:
            rows[dname]["speedup_vs_native"] = round(rows[native]["latency_ms"] / rows[dname]["latency_ms"], 2)
        info = run_info()  # honours GIT_COMMIT (a copy of the tree on a lent machine)
        report["runs"][name] = {
            "checkpoint": str(ckpt), "model": model.name, "dataset": ds.name, **info,
            "profile": {"device": "cuda" if torch.cuda.is_available() else "cpu",
                        "backbone": getattr(getattr(cfg, model.name, None), "backbone", None),
                        "n_layers": getattr(getattr(cfg, model.name, None), "n_layers", None),
                        "steps": json.loads((ckpt / "metrics.json").read_text()).get("step"),
                        "max_history": mh, "torch_threads": torch.get_num_threads()},
            "memory": {"states": int(len(mem.targets)), "dim": int(mem.states.shape[1]), "dtype": "float16",
                       "per_sequence": args.per_sequence, "build_seconds": round(build_s, 1),
                       "items_with_states": int((counts > 0).sum()), "items": int(model.n_items)},
            "test_users": len(test), "cold_test_targets": int(cold.sum()),
            "cold_test_share": round(float(cold.mean()), 4), "m": args.m, "cutoff": args.cutoff,
            "results": rows,
        }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(args.doc), markdown(report))
    return report


def markdown(rep: dict) -> str:
    lines = ["# L2D latent-space decoding vs the model's own decoding", "",
             "Memory = (last hidden state, target) over training prefixes, float16, FAISS exact L2 for the "
             "local search; global = mean state per target item; local = per-item mean among the M states "
             "nearest to the test state, other items below by global distance. Latency: one history per call, "
             "encode + top-10, median; every decoder of a run measured side by side. Items never seen as "
             "targets (cold) cannot be returned by L2D.", ""]
    for name, run in rep["runs"].items():
        mem, pr = run["memory"], run["profile"]
        lines += [f"## {name}: {run['model']} on {run['dataset']}", "",
                  f"Profile: {pr['device']}, backbone {pr['backbone']} ({pr['n_layers'] or 'all'} layers), "
                  f"{pr['steps']} training steps, max_history {pr['max_history']}. "
                  f"Memory: {mem['states']:,} states x {mem['dim']} ({mem['dtype']}), built in "
                  f"{mem['build_seconds']} s; {mem['items_with_states']:,} of {mem['items']:,} items have states. "
                  f"Test: {run['test_users']} users, of whose targets {run['cold_test_targets']} "
                  f"({100 * run['cold_test_share']:.1f}%) were never a training target (cold). M = {run['m']}; "
                  f"metrics from top-{run['cutoff']} lists (MRR truncated there).", "",
                  f"Command: `{run['command']}` at commit `{run['git_commit']}`, {run['date']}.", "",
                  "| decoder | R@1 | R@10 | NDCG@10 | MRR@cutoff | R@10 cold targets | R@10 warm targets | latency ms | speedup |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        for dname, r in run["results"].items():
            m = r["test"]
            lines.append(f"| {dname} | {m['recall@1']:.4f} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | "
                         f"{m['mrr']:.4f} | {f(r['recall@10_cold_targets'])} | {f(r['recall@10_warm_targets'])} | "
                         f"{r['latency_ms']:.2f} | {r['speedup_vs_native']:.2f}x |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
