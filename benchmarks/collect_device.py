"""Fold the output folders of benchmarks/device_quality.sh (run on a lent GPU machine) into the
project's results: every trained model's test metrics become rows of quality.json (profile
"gpu"), the 200-user NDCG@10 of each model becomes the quality column of latency.json, and the
whole record (validation curves, commands, commit, hardware) goes to gpu_quality.json.

    python benchmarks/collect_device.py --label h100-2layer OUT_DIR [OUT_DIR ...]

OUT_DIR holds eval_<model>.json, latency_quality_<model>.json and <model>.log files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from itemgen.core.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEP = re.compile(r"step (\d+): loss (\S+)\s+valid ndcg@10 (\S+)\s+recall@10 (\S+)")


def fixed_mrr(metrics: dict) -> dict:
    """eval files written before MRR@cutoff counted misses as 0 (commit f573943) gave a missed
    target 1 / (cutoff + 1); undo that exactly from recall@cutoff."""
    m = dict(metrics)
    k = m.get("mrr_cutoff")
    if k is not None:
        m["mrr"] = m["mrr"] - (1 - m["recall@20"]) / (k + 1)
        m["mrr_fixed"] = f"misses re-counted as 0 (the evaluation gave them 1/{k + 1})"
    return m


def collect(out_dir: Path, label: str, fix_mrr: bool, commit: str | None) -> list[dict]:
    runs = []
    names = sorted({p.stem.split("_", 1)[1] for p in out_dir.glob("eval_*.json")} |
                   {p.stem[len("latency_quality_"):] for p in out_dir.glob("latency_quality_*.json")})
    for name in names:
        ev = out_dir / f"eval_{name}.json"
        lq = out_dir / f"latency_quality_{name}.json"
        # the 200-user file when the full evaluation did not run (cut by the time limit)
        report = json.loads((ev if ev.is_file() else lq).read_text())
        if not ev.is_file():
            entry = next(iter(report.values()))
            report = {"model": name, "dataset": entry["dataset"], "metrics": None, "command": None,
                      "git_commit": commit, "hardware": None, "date": None}
        metrics = report["metrics"] and (fixed_mrr(report["metrics"]) if fix_mrr else report["metrics"])
        sample = next(iter(json.loads(lq.read_text()).values())) if lq.is_file() else None
        log = out_dir / f"{name}.log"
        curve = [{"step": int(a), "loss": float(b), "valid_ndcg@10": float(c), "valid_recall@10": float(d)}
                 for a, b, c, d in STEP.findall(log.read_text())] if log.is_file() else []
        q = sample["methods"][name]["quality"] if sample else {}
        runs.append({"name": name, "model": report["model"], "dataset": report["dataset"].lower(),
                     "label": label, "test": metrics, "sample_ndcg@10": q.get("ndcg@10"),
                     "sample_profile": sample.get("quality_profile") if sample else None,
                     "steps": q.get("train_steps") or (curve[-1]["step"] if curve else None),
                     "train_seconds": q.get("train_seconds"), "valid_curve": curve,
                     "command": report["command"], "git_commit": commit or report["git_commit"],
                     "hardware": report["hardware"], "date": report["date"]})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--label", required=True, help="row suffix, e.g. h100-2layer")
    ap.add_argument("--note", default="", help="how the run was made (stored with every row)")
    ap.add_argument("--fix-mrr", action="store_true", help="eval files from before commit f573943 (top-k MRR)")
    ap.add_argument("--commit", default=None, help="commit the device ran (its .git copy can be stale)")
    args = ap.parse_args()
    runs = [r for d in args.dirs for r in collect(d, args.label, args.fix_mrr, args.commit)]
    for r in runs:
        r["note"] = args.note

    path = RESULTS / "gpu_quality.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    allruns = record.get("runs", [])
    key = lambda r: (r["dataset"], r["name"], r["label"])  # noqa: E731
    new = {key(r) for r in runs}
    allruns = [r for r in allruns if key(r) not in new] + runs
    # report_rows empty: the same figures reach docs/results.md once, through quality.json
    record.update(benchmark="gpu_quality", report_rows=[], runs=allruns)  # other keys (checks) stay
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")

    from quality import save_row  # the quality table: one row per dataset + variant

    for r in [r for r in runs if r["test"] is not None]:
        save_row(RESULTS / "quality.json", {
            "dataset": r["dataset"], "variant": f"{r['name']} ({r['label']})", "model": r["model"], "profile": "gpu",
            "test": r["test"], "test_by_decoder": {}, "best_valid": None, "steps": r["steps"], "stopped": "time_limit",
            "train_seconds": r["train_seconds"] or 0.0, "config": None, "note": r["note"],
            "command": r["command"], "git_commit": r["git_commit"], "hardware": r["hardware"], "date": r["date"]})

    lat_path = RESULTS / "latency.json"
    lat = json.loads(lat_path.read_text())
    for entry in lat.values():  # the columns measured before keep their own description
        for m in entry.get("methods", {}).values():
            if "quality" in m and "profile" not in m["quality"]:
                m["quality"]["profile"] = entry.get("quality_profile")
    for r in runs:
        entry = lat.get(r["dataset"].capitalize())
        if entry is None or "profile" not in entry or r["sample_ndcg@10"] is None:  # no latency measured there
            continue
        entry["methods"].setdefault(r["name"], {})["quality"] = {
            "ndcg@10": r["sample_ndcg@10"], "train_steps": r["steps"], "train_seconds": r["train_seconds"],
            "profile": r["sample_profile"], "note": r["note"], "git_commit": r["git_commit"]}
        entry["quality_profile"] = "per method (see each method's quality.profile)"
    atomic_write_text(lat_path, json.dumps(lat, indent=2) + "\n")
    from latency_report import write_report

    write_report(lat)
    print(json.dumps([{k: r[k] for k in ("dataset", "name", "steps", "sample_ndcg@10")}
                      | {"ndcg@10": r["test"] and r["test"]["ndcg@10"]} for r in runs], indent=1))


if __name__ == "__main__":
    main()
