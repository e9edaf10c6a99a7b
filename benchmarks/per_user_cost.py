"""What ItemLM costs against SASRec, per user (issue 21, deliverable 5): `Predictor.topk_indices`
of two trained checkpoints on the same test users, 1 thread, side by side.

    flock /tmp/itemgen-bench.lock python benchmarks/per_user_cost.py --data /work/runs/data/office \
        --itemlm /work/runs/office/itemlm/best --sasrec /work/runs/office/sasrec/best

Three methods answer every user, top-10 with the history masked (as `itemgen serve` answers):

    itemlm            Predictor.topk_indices: ItemLM's packed path (models/packed_decoder.py)
    itemlm_reference  the path before it: encode(query_batch(...)), the HF forward on a left-padded
                      batch, then the same exact top-k (what Predictor.topk_indices did until then)
    sasrec            Predictor.topk_indices of the SASRec checkpoint

Batch 1: every user in turn, the three methods back to back in a rotating order, so that load on
the shared machine hits them alike; per repeat the p50 over users; the reported figure is the
median over repeats, and each ratio the median of the per-repeat ratios. Batch 64: the users in
consecutive batches of 64 (in sample order: lengths mixed, as requests come), the same rotation,
ms per user = batch time / 64. Before timing, the packed path's top-10 is checked against the
reference's for every user (indices equal, scores allclose). FLOPs per user come from
torch.utils.flop_counter over the batch-64 pass (matmuls and attention: what the backbone's width
costs); weight bytes per query are what a batch-1 query must read whatever its history (layers
and output item vectors): at batch 1 ItemLM's matmuls are bound by reading them. Results go
under the key ``per_user_cost`` of benchmarks/results/latency.json (the other
keys are left as they are) and docs/latency.md is rebuilt (latency_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from itemgen.api import Predictor, run_info
from itemgen.core.io import atomic_write_text
from itemgen.data.dataset import SequenceDataset

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "latency.json"
KEY = "per_user_cost"
METHODS = ("itemlm", "itemlm_reference", "sasrec")
TARGETS = {"batch1": 3.0, "batch64": 4.0}  # ItemLM per-user cost at most this x SASRec's (issue 21)


def reference_topk(pred: Predictor, hist: list[np.ndarray], k: int):
    """What Predictor.topk_indices computed before the packed path: the HF forward on a padded batch."""
    m = pred.model
    with torch.inference_mode():
        cut = [h[-pred.cfg.data.max_history:] for h in hist]
        query = m.encode(m.to_device(m.query_batch(cut)))  # (B, D)
        scores, ids = pred.decoder().topk(query, k, exclude=hist)
    return scores.float().cpu().numpy(), ids.cpu().numpy()


def parity(itemlm: Predictor, hists: list[np.ndarray], k: int, batch: int) -> dict:
    """The packed path's top-k against the reference's, over every measured user."""
    same, max_diff = 0, 0.0
    for a in range(0, len(hists), batch):
        h = hists[a:a + batch]
        fs, fi = itemlm.topk_indices(h, k)
        rs, ri = reference_topk(itemlm, h, k)
        same += int((fi == ri).all(axis=1).sum())
        max_diff = max(max_diff, float(np.abs(fs - rs).max()))
    return {"users": len(hists), "users_with_identical_top_k": same, "max_abs_score_difference": max_diff}


def run_summary(r: dict) -> dict:
    """A run's date, commit, load, checkpoints and ItemLM / SASRec ratios (what earlier_runs keeps)."""
    p = r["profile"]
    return {"date": r["date"], "git_commit": r["git_commit"], "checkpoints": r["checkpoints"],
            "load_average_1min": p["load_average_1min"],
            "batch1_ratio": r["batch1_p50_ms_per_user"]["itemlm"]["ratio_to_sasrec"],
            f"batch{p['batch']}_ratio": r[f"batch{p['batch']}_ms_per_user"]["itemlm"]["ratio_to_sasrec"]}


def flops_per_user(fn, hists: list[np.ndarray], batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        for a in range(0, len(hists), batch):
            fn(hists[a:a + batch])
    return fc.get_total_flops() / len(hists)


def weight_bytes(pred: Predictor) -> int:
    """Bytes of the weights one batch-1 query reads whatever its history: every layer's weights
    and the catalog's output vectors (ItemLM: the decoder's layers, not the text embedding table,
    which the ids prompt does not read; SASRec: all of it)."""
    m = pred.model
    with torch.inference_mode():
        items = m.item_vectors()  # (I, D)
    if pred.cfg.model == "itemlm":
        layers = list(m.decoder.layers.parameters()) + list(m.decoder.norm.parameters())
        state = m._packed_state()
        if state.item_first is not None:  # the first layer's q|k|v come from a table: rows, not weights
            attn = m.decoder.layers[0].self_attn
            first = {id(p) for mod in (attn.q_proj, attn.k_proj, attn.v_proj) for p in mod.parameters()}
            layers = [p for p in layers if id(p) not in first]
    else:
        layers = [p for n, p in m.named_parameters() if not n.startswith("items.")]
    return sum(p.numel() * p.element_size() for p in layers) + items.numel() * items.element_size()


def measure(fns: dict, hists: list[np.ndarray], batch: int, repeats: int) -> dict:
    """-> per method: per-repeat figures (batch 1: p50 ms per user; else ms per user) in wall-clock
    time and in the thread's CPU time (which leaves out the time other processes hold the core:
    on the shared 2 cores the wall clock also measures who else is running), and the per-repeat
    ratios of every method to sasrec, in both."""
    names = list(fns)
    per_repeat = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        times = {n: {"wall": [], "cpu": []} for n in names}
        for j, a in enumerate(range(0, len(hists), batch)):
            h = hists[a:a + batch]
            for i in range(len(names)):  # rotate who goes first
                n = names[(i + j + r) % len(names)]
                t, c = time.perf_counter(), time.thread_time()
                fns[n](h)
                times[n]["cpu"].append((time.thread_time() - c) * 1e3 / len(h))
                times[n]["wall"].append((time.perf_counter() - t) * 1e3 / len(h))
        for n in names:
            for clock, v in times[n].items():
                per_repeat[n][clock].append(statistics.median(v) if batch == 1 else
                                            sum(t * batch for t in v) / len(hists))
    out = {}
    for n in names:
        w, c = per_repeat[n]["wall"], per_repeat[n]["cpu"]
        out[n] = {"per_repeat_ms": [round(x, 4) for x in w], "median_ms": round(statistics.median(w), 4),
                  "cpu_per_repeat_ms": [round(x, 4) for x in c], "cpu_median_ms": round(statistics.median(c), 4)}
        if n != "sasrec":
            for clock, key in (("wall", "ratio_to_sasrec"), ("cpu", "cpu_ratio_to_sasrec")):
                ratios = [a / b for a, b in zip(per_repeat[n][clock], per_repeat["sasrec"][clock])]
                out[n][key + "_per_repeat"] = [round(x, 3) for x in ratios]
                out[n][key] = round(statistics.median(ratios), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared dataset directory (both checkpoints' dataset)")
    ap.add_argument("--itemlm", required=True, type=Path, help="ItemLM checkpoint directory")
    ap.add_argument("--sasrec", required=True, type=Path, help="SASRec checkpoint directory")
    ap.add_argument("--users", type=int, default=512, help="test users sampled (seed 0)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for name in ("users", "batch", "repeats", "k"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1", file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    ds = SequenceDataset.load(args.data)
    itemlm, sasrec = Predictor.load(args.itemlm), Predictor.load(args.sasrec)
    for p, want in ((itemlm, "itemlm"), (sasrec, "sasrec")):
        if p.cfg.model != want or p.model.n_items != ds.n_items:
            print(f"error: {p.directory} is a {p.cfg.model} checkpoint of {p.model.n_items} items; expected "
                  f"{want} on {ds.n_items} items ({args.data})", file=sys.stderr)
            return 2
        p.model.eval()
    examples = ds.examples("test")
    pick = np.random.default_rng(0).choice(len(examples), min(args.users, len(examples)), replace=False)
    hists = [np.asarray(examples[i].history) for i in pick]
    max_h = {"itemlm": itemlm.cfg.data.max_history, "sasrec": sasrec.cfg.data.max_history}
    k = args.k
    fns = {"itemlm": lambda h: itemlm.topk_indices(h, k),
           "itemlm_reference": lambda h: reference_topk(itemlm, h, k),
           "sasrec": lambda h: sasrec.topk_indices(h, k)}
    check = parity(itemlm, hists, k, args.batch)  # also warms every cache
    for fn in fns.values():
        fn(hists[:args.batch])
    flops = {n: round(flops_per_user(fn, hists, args.batch)) for n, fn in fns.items()}
    load_before = os.getloadavg()
    b1 = measure(fns, hists, 1, args.repeats)
    bn = measure(fns, hists, args.batch, args.repeats)
    load_after = os.getloadavg()
    lens = [min(len(h), max_h["itemlm"]) for h in hists]
    result = {**run_info(), "dataset": ds.name, "data": str(args.data),
              "checkpoints": {"itemlm": str(args.itemlm), "sasrec": str(args.sasrec)},
              "profile": {"threads": 1, "users": len(hists), "split": "test", "sample_seed": 0,
                          "mean_history_items": round(float(np.mean(lens)), 2),
                          "median_history_items": float(np.median(lens)), "max_history": max_h,
                          "batch": args.batch, "repeats": args.repeats, "k": k, "exclude_history": True,
                          "itemlm_prompt": itemlm.cfg.itemlm.prompt, "itemlm_layers": itemlm.cfg.itemlm.n_layers,
                          "itemlm_hidden": itemlm.model.backbone.config.hidden_size,
                          "sasrec_hidden": sasrec.cfg.sasrec.hidden, "n_items": ds.n_items,
                          "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)]},
              "parity": check, "flops_per_user": flops,
              "flops_ratio_itemlm_to_sasrec": round(flops["itemlm"] / flops["sasrec"], 2),
              "weight_bytes_per_query": {"itemlm": weight_bytes(itemlm), "sasrec": weight_bytes(sasrec)},
              "batch1_p50_ms_per_user": b1, f"batch{args.batch}_ms_per_user": bn,
              "targets": {"batch1_max_ratio": TARGETS["batch1"], "batch64_max_ratio": TARGETS["batch64"],
                          "batch1_met": b1["itemlm"]["ratio_to_sasrec"] <= TARGETS["batch1"],
                          "batch64_met": args.batch == 64 and bn["itemlm"]["ratio_to_sasrec"] <= TARGETS["batch64"]}}
    allres = json.loads(args.out.read_text()) if args.out.is_file() else {}  # read late: others write it too
    # the runs before this one, in brief: timing on shared cores is noisy, so the report shows them all
    before = allres.get(KEY) or {}
    result["earlier_runs"] = [*before.get("earlier_runs", []), *([run_summary(before)] if before else [])]
    allres[KEY] = result
    atomic_write_text(args.out, json.dumps(allres, indent=2) + "\n")
    if args.out.resolve() == RESULTS.resolve():  # docs follow the project's results file only
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from latency_report import write_report  # sibling script

        write_report(allres)
    print(json.dumps({k: result[k] for k in ("profile", "parity", "flops_per_user", "batch1_p50_ms_per_user",
                                             f"batch{args.batch}_ms_per_user", "targets")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
