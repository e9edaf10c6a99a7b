"""The README's first command: data -> SASRec, then ItemLM with item text started from it -> test
metrics side by side, on all users, on the warm items and on NEW items (never seen in training),
with the winner -> one recommendation -> a new item added to the trained checkpoint without
retraining -> where everything is and what to run next. Runs on a synthetic catalog by default
(10% of its items new: make_cold), or on a prepared dataset. Both models use the recipes of
core/recipes.py (SASREC, ITEMLM_TEXT), so the quickstart follows them when they change."""

from __future__ import annotations

import json
from pathlib import Path

from itemgen.api import Predictor, evaluate_checkpoint, user_ndcg, user_segments
from itemgen.cli.common import metrics_table
from itemgen.core.config import from_dict
from itemgen.core.io import atomic_write_text
from itemgen.core.recipes import ITEMLM_CPU, ITEMLM_TEXT, SASREC, itemlm_from_sasrec, merge
from itemgen.data.dataset import SequenceDataset, make_cold
from itemgen.data.synthetic import GROUPS, item_fields, item_id, make_dataset
from itemgen.evaluation.segments import paired_by_segment
from itemgen.models.new_items import add_items
from itemgen.training.loop import train

COLD_SHARE = 0.1  # of the synthetic catalog's items are new: they appear only as test targets
SEGMENTS = (("all", "all"), ("warm", "warm"), ("new items", "cold"))  # table row label, segment key
TABLE_COLUMNS = ("users", "ndcg@10", "recall@10")


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


def segment_rows(label: str, metrics: dict) -> dict[str, dict]:
    """Table rows of one model: all users, then each segment the report has (warm, new items)."""
    rows = {}
    for name, key in SEGMENTS:
        m = metrics if key == "all" else metrics.get("segments", {}).get(key)
        if m:
            rows[f"{label}, {name}"] = m
    return rows


def has_text(ds: SequenceDataset, fields) -> bool:
    return any(any(v for v in ds.items.fields.get(f, [])) for f in fields)


def run(*, data: Path | None, out: Path, backbone: str, n_layers: int | None, minutes: float, console,
        quiet: bool = False) -> dict:
    """``quiet``: the result table and the winner only."""
    out = Path(out)
    note = (lambda *a, **k: None) if quiet else console.print
    synthetic = data is None
    if synthetic:
        data = out / "data"
        ds = make_cold(make_dataset(n_users=3000, n_items=300, noise=0.1, seed=0, name="synthetic"), COLD_SHARE, seed=0)
        ds.save(data)
        cold = ds.cold_manifest()
        note(f"synthetic catalog (made-up data, no real products or users): {ds.n_items} items with titles, "
             f"{len(ds.users)} users, {ds.n_interactions} interactions -> {data}", soft_wrap=True)
        note(f"{cold['count']} of its items ({COLD_SHARE:.0%}) are new: they appear only at test time, as the "
             f"target of {cold['cold_test_users']} test users, never in training or validation", soft_wrap=True)
    else:
        ds = SequenceDataset.load(data)
        note(f"dataset {ds.name}: {ds.n_items} items, {len(ds.users)} users"
             + (f", {len(ds.cold_items)} new items (test targets only)" if ds.cold_items is not None else ""))
    # ItemLM reads item text when the data has some (the recipe for datasets with text), else IDs only
    lm_recipe = ITEMLM_TEXT if has_text(ds, ITEMLM_TEXT["items"]["text_fields"]) else ITEMLM_CPU
    lm_name = "ItemLM + text" if lm_recipe is ITEMLM_TEXT else "ItemLM"
    budget = {"data": {"path": str(data)}, "train": {"max_minutes": minutes}}
    sasrec = merge(merge(SASREC, budget), {"train": {"out": str(out / "sasrec")}})
    itemlm = merge(merge(merge(lm_recipe, budget), itemlm_from_sasrec(str(out / "sasrec" / "best"),
                                                                      SASREC["sasrec"]["dropout"])), {
        "itemlm": {"backbone": backbone, "n_layers": n_layers}, "train": {"out": str(out / "itemlm")}})
    results, reports = {}, {}
    for name, label, values in (("sasrec", "SASRec", sasrec), ("itemlm", lm_name, itemlm)):
        cfg = from_dict(values)  # ItemLM starts from SASRec's items
        note(f"[bold]training {label}[/bold] (by epochs with early stopping, at most {minutes:g} min)")
        res = train(cfg, dataset=ds)
        # ranked without the user's history, as validation and `itemgen serve` do (RecBole keeps it)
        report = evaluate_checkpoint(res.best, split="test", exclude_history=True)
        reports[name] = report["path"]
        results[name] = {**report["metrics"], "steps": res.step, "epochs": res.epochs,
                         "train_seconds": round(res.train_seconds, 1)}
    per_user = [user_ndcg(out / name / "best", split="test", exclude_history=True) for name in ("itemlm", "sasrec")]
    by_segment = paired_by_segment(*per_user, user_segments(out / "itemlm" / "best", split="test"))
    paired = {k: v for k, v in by_segment["all"].items() if k != "users"}
    results["itemlm_minus_sasrec"] = paired
    results["itemlm_minus_sasrec_by_segment"] = {k: by_segment[k] for k in ("warm", "cold") if k in by_segment}
    rows = {**segment_rows("SASRec", results["sasrec"]), **segment_rows(lm_name, results["itemlm"])}
    console.print(metrics_table(rows, f"test split, full catalog less each user's history ({ds.name})",
                                cols=TABLE_COLUMNS, first="model, test targets"))
    console.print(f"[bold]{winner_line(results, paired)}[/bold]")
    if "cold" in by_segment:
        c = by_segment["cold"]
        note(f"on new items, {lm_name} - SASRec: NDCG@10 {c['diff']:+.4f} ± {c['se']:.4f} s.e. over the same "
             f"{c['users']} users (SASRec's vectors of new items are untrained; {lm_name} reads their text)"
             if lm_recipe is ITEMLM_TEXT else
             f"on new items, ItemLM - SASRec: NDCG@10 {c['diff']:+.4f} ± {c['se']:.4f} s.e. ({c['users']} users; "
             "the data has no item text, so neither model can know a new item)", soft_wrap=True)
    pred = Predictor.load(out / "itemlm" / "best")
    user = ds.examples("test")[0]
    history = [ds.items.ids[i] for i in user.history[-5:]]
    note(f"history (last 5): {', '.join(history)}")
    for r, rec in enumerate(pred.recommend([history], k=5)[0], 1):
        note(f"  {r}. {rec['id']}  {rec['score']:.3f}  {rec['title'] or ''}")
    if synthetic and lm_recipe is ITEMLM_TEXT and not quiet:
        results["added_item"] = show_new_item(ds, out, lm_name, note)
    summary = out / "quickstart.json"
    atomic_write_text(summary, json.dumps(results, indent=2) + "\n")
    note(f"\ncheckpoints: {out / 'itemlm' / 'best'}, {out / 'sasrec' / 'best'}", soft_wrap=True)
    note(f"reports:     {reports['itemlm']}, {reports['sasrec']}, {summary}", soft_wrap=True)
    note(f"curves:      itemgen plot {out / 'itemlm'}", soft_wrap=True)
    note("next:\n"
         "  itemgen data prepare table interactions.csv --items items.csv --out data/mine   # your own data\n"
         "  itemgen train configs/sasrec.yaml data.path=data/mine train.out=runs/sasrec\n"
         f"  itemgen train configs/{'itemlm-text' if lm_recipe is ITEMLM_TEXT else 'itemlm-cpu'}.yaml "
         "data.path=data/mine items.init_from=runs/sasrec/best\n"
         f"  itemgen evaluate {out / 'itemlm' / 'best'} --split test --exclude-history\n"
         f"  itemgen serve {out / 'itemlm' / 'best'}", soft_wrap=True)
    return results


def show_new_item(ds: SequenceDataset, out: Path, lm_name: str, note) -> dict:
    """Add one new synthetic item to the trained ItemLM (models/new_items.py, as `itemgen items
    add` does) and rank it for a test history after which the synthetic rule puts its group next:
    the last history item's category names the group its title's adjective names."""
    index = ds.n_items
    fields = {"id": item_id(index), **item_fields(index, next_group=0)}
    group = index % GROUPS
    user = next(e for e in ds.examples("test") if ds.items.fields["category"][e.history[-1]] == f"group {group}")
    history = [ds.items.ids[i] for i in user.history[-5:]]
    new_file, ckpt, with_new = out / "new_items.jsonl", out / "itemlm" / "best", out / "itemlm" / "with-new"
    atomic_write_text(new_file, json.dumps(fields) + "\n")
    add_items(ckpt, new_file, with_new, overwrite=True)
    pred = Predictor.load(with_new)
    ranked = [r["id"] for r in pred.recommend([history], k=len(pred.items))[0]]
    rank = ranked.index(fields["id"]) + 1 if fields["id"] in ranked else None
    last = ds.items.ids[user.history[-1]]
    note(f"\n[bold]a new item, without retraining[/bold]: {new_file} holds {fields['id']} \"{fields['title']}\" "
         f"({fields['brand']}, {fields['category']}), a {fields['title'].split()[0]} item: in the "
         f"synthetic catalog that is what follows an item of category \"group {group}\" such as {last} "
         f"\"{ds.items.title(user.history[-1])}\"", soft_wrap=True)
    note(f"  itemgen items add {ckpt} {new_file} --out {with_new}\n"
         f"  itemgen recommend {with_new} --history {','.join(history)}", soft_wrap=True)
    note(f"{lm_name} ranks {fields['id']} {rank if rank else '-'} of {len(pred.items)} after that history "
         f"(top 3: {', '.join(ranked[:3])})", soft_wrap=True)
    return {"item": fields, "history": history, "rank": rank, "n_items": len(pred.items)}
