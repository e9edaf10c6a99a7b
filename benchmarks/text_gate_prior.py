"""How far the closed bucket of the item-side gate (items.text_gate, models/text_match.py) is from
where new items would rank well: a gated checkpoint scored with its closed bucket's bias c(closed)
shifted by delta logits (and its weight g(closed) multiplied by a factor), nothing retrained;
NDCG@10 with the history masked for all users and each segment (tail / head / cold / warm).

    python benchmarks/text_gate_prior.py --checkpoint runs/text/office/cold10/VARIANT/best \
        --data runs/text/data/office-cold10 --split test --deltas 0,1,2,3

An ANALYSIS, not a choice: the trained value (delta 0, factor 1) is what every benchmark row uses.
On a cold split the validation users have no new-item targets (they are out of validation by
construction), so a shift that helps new items can only be seen on test; a run with --split test
is marked so in the results file (a shift chosen on validation first, then applied on test, is
not: pass --chosen-on-valid). Writes benchmarks/results/text_gate_prior.json (command, commit,
hardware, date, every figure), one entry per (checkpoint, split).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from itemgen.api import run_info  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.data.dataset import SequenceDataset  # noqa: E402
from itemgen.evaluation.evaluate import evaluate  # noqa: E402
from itemgen.evaluation.segments import dataset_segments  # noqa: E402
from itemgen.models.checkpoint import load_checkpoint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "text_gate_prior.json"
SEGMENTS = ("tail", "head", "cold", "warm")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint trained with items.text_gate")
    ap.add_argument("--data", required=True, help="its prepared dataset")
    ap.add_argument("--split", default="valid", choices=["valid", "test"])
    ap.add_argument("--deltas", default="0,1,2,3", help="shifts of c(closed), in logits")
    ap.add_argument("--factors", default="1", help="multipliers of g(closed)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--chosen-on-valid", action="store_true",
                    help="the deltas and factors were chosen on validation before this test run")
    args = ap.parse_args(argv)
    model, cfg, _ = load_checkpoint(args.checkpoint)
    gate = model.items.gate
    if gate is None:
        sys.exit(f"error: {args.checkpoint} has no items.text_gate")
    ds = SequenceDataset.load(args.data)
    examples, masks = ds.examples(args.split), dataset_segments(ds, args.split)
    a0, b0 = gate.log_weight.detach().clone(), gate.bias.detach().clone()
    rows = []
    for factor in [float(x) for x in args.factors.split(",")]:
        for delta in [float(x) for x in args.deltas.split(",")]:
            with torch.no_grad():  # c = GAIN b, g = exp(GAIN a): shift the closed bucket (index 0)
                gate.bias.copy_(b0), gate.log_weight.copy_(a0)
                gate.bias[0] += delta / gate.GAIN
                gate.log_weight[0] += torch.log(torch.tensor(factor)) / gate.GAIN
            m = evaluate(model, examples, max_history=cfg.data.max_history, exclude_history=True, progress=False,
                         segments=masks)
            row = {"delta": delta, "factor": factor, "closed": gate.weights()["closed"],
                   "all": round(m["ndcg@10"], 5), "users": m["users"]}
            row.update({s: round(m["segments"][s]["ndcg@10"], 5) for s in SEGMENTS if s in m["segments"]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    entry = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
             "deltas": args.deltas, "factors": args.factors, "test_in_view": args.split == "test" and not args.chosen_on_valid,
             "metric": "ndcg@10, history masked", "rows": rows, **run_info()}
    with open(args.results.with_suffix(".lock"), "w") as lock:  # runs side by side merge whole
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": []}
        key = (entry["checkpoint"], entry["split"], args.deltas, args.factors)
        results["runs"] = [r for r in results["runs"] if (r["checkpoint"], r["split"], r.get("deltas"),
                                                          r.get("factors")) != key] + [entry]
        atomic_write_text(args.results, json.dumps(results, indent=2) + "\n")
    return entry


if __name__ == "__main__":
    main()
