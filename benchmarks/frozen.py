"""Frozen-LLM item-encoder mode against full fine-tuning (issue 6, item 4), one CPU profile.

    flock /tmp/itemgen-bench.lock python benchmarks/frozen.py --data DATASET_DIR

Variants, all ItemLM on the same split, backbone, prompt and step count:
    full            every weight trains (backbone at train.backbone_lr)
    frozen          backbone frozen; ID table, projection and output head train
    frozen_text_id  frozen + item encoder text+id (frozen-backbone title features + ID table)
    frozen_lora     frozen_text_id + LoRA adapters (rank --lora-r) on the attention

For each: trainable parameters; training speed as the median seconds per optimizer step over
repeated timed steps on the same batches (measured side by side in one process); quality after a
fixed number of training steps (test split, exact full-catalog scoring); per-request latency
(one history per call, median); and whether the backbone's greedy text continuation of fixed
prompts is identical before and after training (LoRA: with the adapters switched off).
Writes benchmarks/results/frozen.json and docs/frozen.md.
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

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = ["The best microscope for a beginner is", "Safety goggles protect your eyes from"]


def variants(lora_r: int) -> dict[str, dict]:
    return {
        "full": {"freeze_backbone": False},
        "frozen": {"freeze_backbone": True},
        "frozen_text_id": {"freeze_backbone": True, "input": "text+id"},
        "frozen_lora": {"freeze_backbone": True, "input": "text+id", "lora_r": lora_r},
    }


def make_config(args, name: str, itemlm: dict):
    from itemgen.core.config import from_dict

    itemlm = dict(itemlm)
    # the item input view; titles encoded by the model's own (frozen) backbone, as measured
    items = {"input": itemlm.pop("input", "id"), "text_encoder": "", "text_fields": ["title"]}
    return from_dict({
        "items": items,
        "model": "itemlm",
        "data": {"path": str(args.data), "max_history": args.max_history},
        "itemlm": {"backbone": args.backbone, "n_layers": args.n_layers, "item_dim": 64, "fields": ["title"],
                   "max_field_tokens": args.max_field_tokens, **itemlm},
        "train": {"out": str(Path(args.workdir) / name), "seed": 0, "batch_size": args.batch_size, "lr": args.lr,
                  "backbone_lr": args.backbone_lr, "warmup_steps": 10, "max_steps": args.steps,
                  "eval_every": args.steps, "eval_users": args.valid_users, "patience": 100, "progress": False},
    })


def greedy(backbone, tokenizer) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for text in PROMPTS:
            ids = torch.as_tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=backbone.device)
            g = backbone.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
            out.append(g[0, ids.shape[1]:].tolist())
    return out


def step_seconds(model, cfg, seqs, repeats: int, steps: int) -> float:
    """Median seconds per optimizer step (forward, backward, AdamW) on fixed batches; the model's
    weights move, which does not change the cost of a step."""
    from itemgen.training.loop import make_optimizer

    opt = make_optimizer(model, cfg)
    model.train()
    rng = np.random.default_rng(0)
    bs = cfg.train.batch_size
    batches = [model.to_device(model.train_batch(seqs[i * bs:(i + 1) * bs], rng)) for i in range(steps)]
    n_labels = [model.n_labels(seqs[i * bs:(i + 1) * bs]) for i in range(steps)]
    times = []
    for r in range(repeats + 1):  # the first pass warms up allocators and is dropped
        t0 = time.perf_counter()
        for b, n in zip(batches, n_labels):
            loss = model(b) / n
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if r:
            times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


@torch.inference_mode()
def request_latency_ms(model, examples, max_history: int, n: int) -> float:
    from itemgen.topk.factory import make_decoder

    dec = make_decoder("exact", model)
    model.eval()
    times = []
    for ex in examples[:n + 3]:
        t0 = time.perf_counter()
        q = model.encode(model.to_device(model.query_batch([ex.history[-max_history:]])))
        dec.topk(q, 10)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[3:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory (itemgen data prepare)")
    p.add_argument("--backbone", default="smollm2-135m")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=150, help="training steps per variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backbone-lr", type=float, default=3e-4)
    p.add_argument("--max-history", type=int, default=5)
    p.add_argument("--max-field-tokens", type=int, default=12)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--valid-users", type=int, default=64, help="validation users at the end of training")
    p.add_argument("--test-users", type=int, default=1000, help="test users scored (fixed subset)")
    p.add_argument("--timing-steps", type=int, default=4)
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--latency-requests", type=int, default=20)
    p.add_argument("--only", default=None, help="comma-separated subset of variants")
    p.add_argument("--timing-only", action="store_true", help="parameters and step time only (no training)")
    p.add_argument("--workdir", default="/tmp/itemgen-frozen")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/frozen.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/frozen.md"))
    args = p.parse_args(argv)

    from itemgen.api import run_info
    from itemgen.core.io import atomic_write_text
    from itemgen.data.dataset import SequenceDataset
    from itemgen.data.dataset import training_sequences
    from itemgen.evaluation.evaluate import evaluate, subsample
    from itemgen.models.item_encoder import adapters_disabled
    from itemgen.models.registry import build_model
    from itemgen.training.loop import train

    torch.manual_seed(0)
    ds = SequenceDataset.load(args.data)
    test = subsample(ds.split.test, args.test_users, seed=0)
    seqs = training_sequences(ds, args.max_history)
    timing_seqs = [seqs[i] for i in np.random.default_rng(1).permutation(len(seqs))[:args.timing_steps * args.batch_size]]
    chosen = variants(args.lora_r)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    results = {}
    for name, itemlm in chosen.items():
        print(f"== {name}", file=sys.stderr, flush=True)
        cfg = make_config(args, name, itemlm)
        torch.manual_seed(0)
        fresh = build_model(cfg, ds.items).to(DEVICE)
        n_params = sum(p.numel() for p in fresh.parameters())
        n_train = sum(p.numel() for p in fresh.parameters() if p.requires_grad)
        gen_before = None if args.timing_only else greedy(fresh.backbone, fresh.tokenizer)
        sec_step = step_seconds(fresh, cfg, timing_seqs, args.timing_repeats, args.timing_steps)
        del fresh
        if args.timing_only:
            results[name] = {"method": f"itemlm-{name}", "itemlm": itemlm, "params": n_params,
                             "trainable_params": n_train, "trainable_share": round(n_train / n_params, 5),
                             "seconds_per_step": round(sec_step, 4),
                             "examples_per_second": round(args.batch_size / sec_step, 2)}
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
            write(args, ds, test, results)
            continue
        res = train(cfg, dataset=ds)
        from itemgen.models.checkpoint import load_checkpoint

        model, _, _ = load_checkpoint(res.out / "last", DEVICE)
        metrics = evaluate(model, test, max_history=args.max_history)
        with adapters_disabled(model.backbone):
            gen_after = greedy(model.backbone, model.tokenizer)
        latency = request_latency_ms(model, test, args.max_history, args.latency_requests)
        results[name] = {
            "method": f"itemlm-{name}", "itemlm": itemlm, "params": n_params, "trainable_params": n_train,
            "trainable_share": round(n_train / n_params, 5),
            "seconds_per_step": round(sec_step, 4), "examples_per_second": round(args.batch_size / sec_step, 2),
            "train_seconds": round(res.train_seconds, 1), "train_steps": res.step,
            "test": metrics, "latency_ms": round(latency, 2),
            "generation_unchanged": gen_after == gen_before,
            "generation_before": gen_before, "generation_after": gen_after,
        }
        print(json.dumps({name: {k: v for k, v in results[name].items() if not k.startswith("generation_")}}),
              file=sys.stderr, flush=True)
        del model
        write(args, ds, test, results)
    return write(args, ds, test, results)


def write(args, ds, test, results: dict) -> dict:
    """Write the JSON and the Markdown table (after every variant: a cut-short run keeps its rows)."""
    from itemgen.api import run_info
    from itemgen.core.io import atomic_write_text

    if "full" in results:
        for r in results.values():
            r["speedup_vs_full"] = round(results["full"]["seconds_per_step"] / r["seconds_per_step"], 3)
    info = run_info()
    if os.environ.get("GIT_COMMIT"):  # a copy of the tree without its history (a device machine)
        info["git_commit"] = os.environ["GIT_COMMIT"]
    report = {
        "benchmark": "frozen", **info,
        "profile": {"device": "cuda" if torch.cuda.is_available() else "cpu", "backbone": args.backbone,
                    "n_layers": args.n_layers, "steps": args.steps,
                    "batch_size": args.batch_size, "lr": args.lr, "backbone_lr": args.backbone_lr,
                    "max_history": args.max_history, "fields": ["title"], "max_field_tokens": args.max_field_tokens,
                    "test_users": len(test), "timing": f"median of {args.timing_repeats} x {args.timing_steps} steps",
                    "timing_only": args.timing_only},
        "dataset": ds.name, "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(args.doc), markdown(report))
    return report


def markdown(rep: dict) -> str:
    pr = rep["profile"]
    lines = [
        "# Frozen-LLM item-encoder mode vs full fine-tuning",
        "",
        f"Dataset `{rep['dataset']}`, backbone {pr['backbone']} truncated to {pr['n_layers']} layers, "
        f"{rep['hardware']['gpu'] or 'CPU only'} ({rep['hardware']['cores']} CPU cores), "
        + ("timing only (no training, no quality), batch " if pr.get("timing_only") else f"{pr['steps']} steps of batch ")
        + f"{pr['batch_size']}, "
        f"max_history {pr['max_history']}, item text = title ({pr['max_field_tokens']} tokens). "
        + ("" if pr.get("timing_only") else f"Test metrics on {pr['test_users']} test users, exact full-catalog scoring. ")
        + f"Step time: {pr['timing']} on the same "
        "batches, measured side by side in one run.",
        "",
        f"Command: `{rep['command']}` at commit `{rep['git_commit']}`, {rep['date']}.",
        "",
        "| variant | trainable params | share | s/step | speedup | R@1 | R@10 | NDCG@10 | MRR | latency ms | generation unchanged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rep["results"].items():
        if "test" not in r:  # --timing-only
            lines.append(f"| {name} | {r['trainable_params']:,} | {r['trainable_share']:.3f} | {r['seconds_per_step']:.3f} | "
                         f"{r.get('speedup_vs_full', float('nan')):.2f}x | not measured | not measured | not measured | "
                         "not measured | not measured | not measured |")
            continue
        m = r["test"]
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['trainable_share']:.3f} | {r['seconds_per_step']:.3f} | "
                     f"{r.get('speedup_vs_full', float('nan')):.2f}x | {m['recall@1']:.4f} | {m['recall@10']:.4f} | "
                     f"{m['ndcg@10']:.4f} | {m['mrr']:.4f} | {r['latency_ms']:.1f} | {r['generation_unchanged']} |")
    lines += ["", "Generation check: greedy continuation (16 tokens) of fixed prompts by the backbone before "
              "and after training; for LoRA the adapters are switched off (the base weights are what must "
              "not change).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
