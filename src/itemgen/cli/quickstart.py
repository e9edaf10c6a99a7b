"""The README's first command: data -> ItemLM and SASRec -> test metrics side by side -> one
recommendation. Runs on a synthetic catalog by default, or on a prepared dataset."""

from __future__ import annotations

import json
from pathlib import Path

from itemgen.api import Predictor, evaluate_checkpoint
from itemgen.cli.common import metrics_table
from itemgen.core.config import from_dict
from itemgen.data.dataset import SequenceDataset
from itemgen.data.synthetic import make_dataset
from itemgen.training.loop import train


def run(*, data: Path | None, out: Path, backbone: str, n_layers: int | None, minutes: float, console) -> dict:
    out = Path(out)
    if data is None:
        data = out / "data"
        ds = make_dataset(n_users=3000, n_items=300, noise=0.1, seed=0, name="synthetic")
        ds.save(data)
        console.print(f"synthetic catalog: {ds.n_items} items, {len(ds.users)} users, "
                      f"{ds.n_interactions} interactions -> {data}")
    else:
        ds = SequenceDataset.load(data)
        console.print(f"dataset {ds.name}: {ds.n_items} items, {len(ds.users)} users")
    steps = 100000  # the time budget decides
    common = {"data": {"path": str(data), "max_history": 20},
              "train": {"max_minutes": minutes, "max_steps": steps, "eval_every": 100, "eval_users": 500,
                        "patience": 3, "warmup_steps": 30}}
    runs = {
        "sasrec": {"model": "sasrec", **common,
                   "train": {**common["train"], "out": str(out / "sasrec"), "lr": 1e-3, "batch_size": 128}},
        "itemlm": {"model": "itemlm", **common,
                   "itemlm": {"backbone": backbone, "n_layers": n_layers, "prompt": "compact",
                              "fields": ["title", "brand", "category"], "max_field_tokens": 8},
                   "train": {**common["train"], "out": str(out / "itemlm"), "lr": 1e-3,
                             "backbone_lr": 2e-4, "batch_size": 32}},
    }
    results = {}
    for name, values in runs.items():
        cfg = from_dict(values)
        console.print(f"[bold]training {name}[/bold] ({minutes:g} min budget)")
        res = train(cfg)
        report = evaluate_checkpoint(res.best, split="test")
        results[name] = {**report["metrics"], "steps": res.step, "train_seconds": round(res.train_seconds, 1)}
    console.print(metrics_table(results, f"test split, full catalog ({ds.name})"))
    pred = Predictor.load(out / "itemlm" / "best")
    user = ds.examples("test")[0]
    history = [ds.items.ids[i] for i in user.history[-5:]]
    recs = pred.recommend([history], k=5)[0]
    console.print(f"history (last 5): {', '.join(history)}")
    for r, rec in enumerate(recs, 1):
        console.print(f"  {r}. {rec['id']}  {rec['score']:.3f}  {rec['title'] or ''}")
    (out / "quickstart.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
