"""Where the text-match path starts (items.text_match_scale, models/text_match.py), measured on
VALIDATION: a trained ID model's item scores plus s times text-kNN's (the mean cosine between a
candidate's text view and the user's last 3 items'), i.e. the text-match path before any training
(M = s * I), for a sweep of s; NDCG@10 with the history masked, for all users and by target
popularity (tail: at most 4 training interactions; head: the rest); the spread of both terms.

    python benchmarks/text_match_scale.py --checkpoint runs/office/itemlm/best --data runs/data/office

Writes benchmarks/results/text_match_scale.json (command, commit, hardware, date, every figure).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from itemgen.api import run_info
from itemgen.core.config import ItemsConfig
from itemgen.core.io import atomic_write_text
from itemgen.data.dataset import SequenceDataset
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.text_view import encode_items

TAIL = 4  # a tail target has at most this many training interactions (issue 20)


def ndcg_by_segment(scores: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, tail: torch.Tensor) -> dict:
    """scores (B, I), targets (B,), masked (B, I) history items, tail (B,) -> NDCG@10 per segment."""
    x = scores.masked_fill(masked, float("-inf"))
    rank = (x > x[torch.arange(len(x)), targets][:, None]).sum(1)  # (B,) 0 = first
    gain = torch.where(rank < 10, 1 / torch.log2(rank.double() + 2), torch.zeros((), dtype=torch.float64))
    out = {}
    for name, sel in (("all", torch.ones_like(tail)), ("tail", tail), ("head", ~tail)):
        g = gain[sel]
        out[name] = {"ndcg@10": round(g.mean().item(), 5), "se": round((g.std() / len(g) ** 0.5).item(), 5),
                     "users": int(sel.sum())}
    return out


def spread(x: torch.Tensor, masked: torch.Tensor) -> dict:
    """Per-user spread of a score matrix over the candidates (history masked), medians over users."""
    rows = [r[~m] for r, m in zip(x, masked)]
    return {"std": round(float(np.median([r.std().item() for r in rows])), 4),
            "top10_minus_median": round(float(np.median([(torch.topk(r, 10).values[-1] - r.median()).item()
                                                          for r in rows])), 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a trained itemlm or sasrec checkpoint (the ID model)")
    ap.add_argument("--data", required=True, help="its prepared dataset")
    ap.add_argument("--users", type=int, default=2000, help="validation users, drawn with --seed (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last-n", type=int, default=3)
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--fields", default=",".join(ItemsConfig().text_fields),
                    help="item text fields (default: items.text_fields' default, what a text_match model encodes)")
    ap.add_argument("--scales", default="3,5,8,10,15,20,30,50")
    ap.add_argument("--out", default="benchmarks/results/text_match_scale.json")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, cfg, _ = load_checkpoint(args.checkpoint)
    model.eval()
    ds = SequenceDataset.load(args.data)
    counts = np.zeros(ds.n_items, np.int64)
    for s in ds.split.train:
        np.add.at(counts, s, 1)
    valid = ds.split.valid
    if args.users:
        pick = np.random.default_rng(args.seed).choice(len(valid), min(args.users, len(valid)), replace=False)
        valid = [valid[i] for i in pick]
    hist = [e.history[-cfg.data.max_history:] for e in valid]
    targets = torch.tensor([e.target for e in valid])
    tail = torch.from_numpy(counts[targets.numpy()] <= TAIL)
    ids = torch.cat([model.scores(hist[a:a + 50]) for a in range(0, len(hist), 50)])  # (B, I)
    ids = ids - ids.mean(1, keepdim=True)  # log-probabilities: a constant per user is moot
    fields = tuple(args.fields.split(","))
    view, _ = encode_items(ds.items, args.encoder, fields)  # (I, F) unit rows
    q = torch.stack([view[torch.as_tensor(h[-args.last_n:])].mean(0) for h in hist])  # (B, F)
    text = q @ view.T  # (B, I) text-kNN's mean cosine
    masked = torch.zeros_like(text, dtype=torch.bool)
    for b, h in enumerate(hist):
        masked[b, torch.as_tensor(h)] = True
    scales = [float(s) for s in args.scales.split(",")]
    report = {
        "benchmark": "text_match_scale", **run_info(),
        "profile": {"checkpoint": args.checkpoint, "model": cfg.model, "data": args.data, "split": "valid",
                    "protocol": "masked", "users": len(valid), "seed": args.seed, "last_n": args.last_n,
                    "encoder": args.encoder, "text_fields": list(fields), "tail": f"<= {TAIL}"},
        "spread": {"id_scores": spread(ids, masked), "text_cosine": spread(text, masked)},
        "id_alone": ndcg_by_segment(ids, targets, masked, tail),
        "text_alone": ndcg_by_segment(text, targets, masked, tail),
        "fused": {str(s): ndcg_by_segment(ids + s * text, targets, masked, tail) for s in scales},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("spread", "id_alone", "text_alone", "fused")}, indent=1))
    return report


if __name__ == "__main__":
    main()
