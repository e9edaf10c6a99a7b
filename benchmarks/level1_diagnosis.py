"""Why the exact two-level model ranks below its own joint scores, and what the level-1 fit
recovers (docs/quality_notes.md section 5, "Level 1 fitted to level 2"). For trained two-level
checkpoints (benchmarks/quality.py's `two-level-M` rows), NDCG@10 of the same item scores with five
level-1 logits: the trained linear one (h . e_c), h . e_c + g(h) with g fitted as training does
(targets with the repeat bias), g fitted to targets without the bias, and the exact log Z_c
(an oracle, |I| dot products a query); plus the joint scores h . (e_c + e_t) themselves. History
masked, validation users (and test users where --splits says so: a diagnosis, no choice).

    python benchmarks/level1_diagnosis.py --work /work/runs/recipe --splits valid,test

Writes benchmarks/results/level1_diagnosis.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from itemgen.api import run_info  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.data.dataset import SequenceDataset  # noqa: E402
from itemgen.evaluation.metrics import ndcg_gains  # noqa: E402
from itemgen.heads.softmax import ClusterCorrection  # noqa: E402
from itemgen.models.checkpoint import load_checkpoint  # noqa: E402
from itemgen.training.level1_fit import fit_cluster_correction, log_normalizers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "level1_diagnosis.json"


@torch.no_grad()
def figures(model, examples) -> dict:
    """NDCG@10 (history masked) of each level 1 over ``examples``; g as the head holds it."""
    head = model.head
    hist = [e.history[-50:] for e in examples]
    q = torch.cat([model.encode_histories(hist[s:s + 256]) for s in range(0, len(hist), 256)]).float()
    lz = log_normalizers(model, q, hist)  # (n, C) with the repeat bias, as the model ranks
    il = model.repeat.add_histories(q @ head.item_out.T, hist) if model.repeat is not None else q @ head.item_out.T
    cl = q @ head.centroids.T
    targets = torch.tensor([e.target for e in examples])

    def ndcg(scores) -> float:
        s = scores.clone()
        for j, e in enumerate(examples):
            s[j, torch.as_tensor(e.history)] = float("-inf")
        return round(float(ndcg_gains((s > s.gather(1, targets[:, None])).sum(1).numpy() + 1).mean()), 4)

    def exact(level1):
        return torch.log_softmax(level1, 1)[:, head.assign] + il - lz[:, head.assign]

    g = head.correction(q)
    return {"linear": ndcg(exact(cl)), "fitted": ndcg(exact(cl + g)), "oracle": ndcg(exact(cl + lz)),
            "joint": ndcg(il + cl[:, head.assign]), "g_mse": round(float((g - lz).square().mean()), 4),
            "log_z_std_about_cluster_mean": round(float((lz - lz.mean(0)).std()), 3), "users": len(examples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="benchmarks/quality.py's --work")
    ap.add_argument("--cells", default="office/frequency,office/random,instruments/random", help="DATASET/CLUSTERS,...")
    ap.add_argument("--splits", default="valid", help="valid[,test]")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for cell in args.cells.split(","):
        dname, method = cell.split("/")
        t0 = time.time()
        model, cfg, _ = load_checkpoint(args.work / dname / f"two-level-{method}" / "best")
        model.eval()
        ds = SequenceDataset.load(cfg.data.path)
        head = model.head
        head.correction = ClusterCorrection.frozen(head.item_out.shape[1], head.n_clusters, args.width)
        row = {"dataset": dname, "clusters": method, "checkpoint": f"two-level-{method}", "width": args.width}
        fit = fit_cluster_correction(model, ds, cfg.data.max_history, seed=cfg.train.seed)
        row["fit"] = fit
        for split in args.splits.split(","):
            row[split] = figures(model, ds.examples(split))
        # the same fit with targets that leave the repeat bias out
        plain = types.SimpleNamespace(head=head, repeat=None, encode=model.encode, query_batch=model.query_batch,
                                      to_device=model.to_device, eval=model.eval)
        fit_cluster_correction(plain, ds, cfg.data.max_history, seed=cfg.train.seed)
        row["valid"]["fitted_without_bias_in_targets"] = figures(model, ds.examples("valid"))["fitted"]
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {**run_info(), "command": " ".join(["python", *sys.argv]), "profile": "cpu (2 layers), history masked",
           "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
