"""The ensemble of a recipe's seeds as a ranker: the mean of the members' log-probabilities, one
forward pass per member and query. It is what `distill.teacher=A,B,C` hands its student
(training/distill.Ensemble), so its figures bound what the `*-ensemble*` rows of quality.json can
reach at one model's cost. NDCG@10 and Recall@10 of each member and of the ensemble, on validation
and test users, history kept and masked, from the checkpoints benchmarks/quality.py trained:

    python benchmarks/ensemble.py --work /work/runs/recipe --datasets office,instruments \
        --rows itemlm,itemlm-seed1,itemlm-seed2

Writes benchmarks/results/ensemble.json (one row per dataset and member set).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from itemgen.api import run_info  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.data.dataset import SequenceDataset  # noqa: E402
from itemgen.evaluation.evaluate import rank_examples  # noqa: E402
from itemgen.evaluation.metrics import ranking_metrics  # noqa: E402
from itemgen.models.checkpoint import load_checkpoint  # noqa: E402
from quality import row_checkpoint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ensemble.json"


class Memo(torch.nn.Module):
    """A member whose scores are computed once per batch of histories: the ensemble and both
    protocols rank the same batches (rank_examples), so each member runs once per split."""

    name, default_decoder = "member", "exact"

    def __init__(self, model):
        super().__init__()
        self.model, self.cache = model, {}

    @property
    def n_items(self) -> int:
        return self.model.n_items

    def scores(self, histories) -> torch.Tensor:
        key = tuple(h.tobytes() for h in histories)
        if key not in self.cache:
            self.cache[key] = self.model.scores(histories).float()  # (B, I)
        return self.cache[key]


class Ensemble(torch.nn.Module):
    """Members ranked as one: scores = the mean over members of log softmax of their scores (B, I)."""

    name, default_decoder = "ensemble", "exact"

    def __init__(self, members: list):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    @property
    def n_items(self) -> int:
        return self.members[0].n_items

    def scores(self, histories) -> torch.Tensor:
        return torch.stack([torch.log_softmax(m.scores(histories), 1) for m in self.members]).mean(0)


def figures(model, examples, max_history: int) -> dict:
    out = {}
    for proto, masked in (("kept", False), ("masked", True)):
        m = ranking_metrics(rank_examples(model, examples, max_history=max_history, batch_size=128,
                                          exclude_history=masked))
        out[proto] = {k: round(float(m[k]), 4) for k in ("ndcg@10", "recall@10", "ndcg@10_se")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="benchmarks/quality.py's --work")
    ap.add_argument("--datasets", default="office,instruments")
    ap.add_argument("--rows", default="itemlm,itemlm-seed1,itemlm-seed2", help="the members: quality.py rows")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for dname in args.datasets.split(","):
        t0 = time.time()
        members, names = [], args.rows.split(",")
        for name in names:
            model, cfg, _ = load_checkpoint(row_checkpoint(args.work / dname, name, dname, "ensemble"))
            members.append(Memo(model.eval()))
        ds = SequenceDataset.load(cfg.data.path)
        row = {"dataset": dname, "members": names, "max_history": cfg.data.max_history}
        for split in ("valid", "test"):
            ex = ds.examples(split)
            row[split] = {name: figures(m, ex, cfg.data.max_history) for name, m in zip(names, members)}
            row[split]["ensemble"] = figures(Ensemble(members), ex, cfg.data.max_history)
            for m in members:
                m.cache.clear()
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {**run_info(), "command": " ".join(["python", *sys.argv]), "profile": "cpu (2 layers)", "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
