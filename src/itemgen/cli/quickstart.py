"""The README's first command: data -> SASRec, then ItemLM started from it -> test metrics side
by side with the winner -> one recommendation -> where everything is and what to run next. Runs
on a synthetic catalog by default, or on a prepared dataset. Both models use the measured recipes
of core/recipes.py (docs/quality.md)."""

from __future__ import annotations

import json
from pathlib import Path

from itemgen.api import Predictor, evaluate_checkpoint, user_ndcg
from itemgen.cli.common import metrics_table
from itemgen.core.config import from_dict
from itemgen.core.io import atomic_write_text
from itemgen.core.recipes import ITEMLM_CPU, SASREC, itemlm_from_sasrec, merge
from itemgen.data.dataset import SequenceDataset
from itemgen.data.synthetic import make_dataset
from itemgen.evaluation.metrics import paired_difference
from itemgen.training.loop import train


def winner_line(results: dict, paired: dict | None = None) -> str:
    """One sentence: which model won on NDCG@10, and by how much. ``paired``: ItemLM - SASRec
    user by user (metrics.paired_difference); a difference within 2 standard errors is a tie."""
    a, b = results["itemlm"]["ndcg@10"], results["sasrec"]["ndcg@10"]
    noise = paired is not None and abs(paired["diff"]) <= 2 * paired["se"]
    if a == b or noise:
        why = f"; difference {paired['diff']:+.4f} ± {paired['se']:.4f} s.e. over the same users" if noise else ""
        return f"ItemLM and SASRec tie on NDCG@10 ({a:.4f} vs {b:.4f}{why})"
    win, lose = ("ItemLM", "SASRec") if a > b else ("SASRec", "ItemLM")
    hi, lo = max(a, b), min(a, b)
    rel = f" ({hi / lo - 1:+.1%})" if lo > 0 else ""
    return f"{win} wins on NDCG@10: {hi:.4f} vs {lose} {lo:.4f}{rel}"


def run(*, data: Path | None, out: Path, backbone: str, n_layers: int | None, minutes: float, console,
        quiet: bool = False) -> dict:
    """``quiet``: the result table and the winner only."""
    out = Path(out)
    note = (lambda *a, **k: None) if quiet else console.print
    if data is None:
        data = out / "data"
        ds = make_dataset(n_users=3000, n_items=300, noise=0.1, seed=0, name="synthetic")
        ds.save(data)
        note(f"synthetic catalog: {ds.n_items} items, {len(ds.users)} users, "
                      f"{ds.n_interactions} interactions -> {data}", soft_wrap=True)
    else:
        ds = SequenceDataset.load(data)
        note(f"dataset {ds.name}: {ds.n_items} items, {len(ds.users)} users")
    budget = {"data": {"path": str(data)}, "train": {"max_minutes": minutes}}
    sasrec = merge(merge(SASREC, budget), {"train": {"out": str(out / "sasrec")}})
    itemlm = merge(merge(merge(ITEMLM_CPU, budget), itemlm_from_sasrec(str(out / "sasrec" / "best"),
                                                                       SASREC["sasrec"]["dropout"])), {
        "itemlm": {"backbone": backbone, "n_layers": n_layers}, "train": {"out": str(out / "itemlm")}})
    results, reports = {}, {}
    for name, values in (("sasrec", sasrec), ("itemlm", itemlm)):  # ItemLM starts from SASRec's items
        cfg = from_dict(values)
        note(f"[bold]training {name}[/bold] (by epochs with early stopping, at most {minutes:g} min)")
        res = train(cfg, dataset=ds)
        # ranked without the user's history, as validation and `itemgen serve` do (RecBole keeps it)
        report = evaluate_checkpoint(res.best, split="test", exclude_history=True)
        reports[name] = report["path"]
        results[name] = {**report["metrics"], "steps": res.step, "epochs": res.epochs,
                         "train_seconds": round(res.train_seconds, 1)}
    paired = paired_difference(*(user_ndcg(out / name / "best", split="test", exclude_history=True)
                                 for name in ("itemlm", "sasrec")))
    results["itemlm_minus_sasrec"] = paired
    console.print(metrics_table({k: v for k, v in results.items() if k in ("sasrec", "itemlm")},
                                f"test split, full catalog less each user's history ({ds.name})"))
    console.print(f"[bold]{winner_line(results, paired)}[/bold]")
    pred = Predictor.load(out / "itemlm" / "best")
    user = ds.examples("test")[0]
    history = [ds.items.ids[i] for i in user.history[-5:]]
    recs = pred.recommend([history], k=5)[0]
    note(f"history (last 5): {', '.join(history)}")
    for r, rec in enumerate(recs, 1):
        note(f"  {r}. {rec['id']}  {rec['score']:.3f}  {rec['title'] or ''}")
    summary = out / "quickstart.json"
    atomic_write_text(summary, json.dumps(results, indent=2) + "\n")
    note(f"\ncheckpoints: {out / 'itemlm' / 'best'}, {out / 'sasrec' / 'best'}", soft_wrap=True)
    note(f"reports:     {reports['itemlm']}, {reports['sasrec']}, {summary}", soft_wrap=True)
    note(f"curves:      itemgen plot {out / 'itemlm'}", soft_wrap=True)
    note("next:\n"
                  "  itemgen data prepare table interactions.csv --out data/mine   # your own data\n"
                  "  itemgen train configs/sasrec.yaml data.path=data/mine train.out=runs/sasrec\n"
                  "  itemgen train configs/itemlm-cpu.yaml data.path=data/mine items.init_from=runs/sasrec/best\n"
                  f"  itemgen evaluate {out / 'itemlm' / 'best'} --split test --exclude-history\n"
                  f"  itemgen serve {out / 'itemlm' / 'best'}", soft_wrap=True)
    return results
