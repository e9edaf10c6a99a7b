"""docs/latency.md and docs/latency.png from benchmarks/results/latency.json (called by
benchmarks/latency.py after every run; `python benchmarks/latency_report.py` rebuilds them)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC, PNG = ROOT / "docs" / "latency.md", ROOT / "docs" / "latency.png"
RESULTS = ROOT / "benchmarks" / "results" / "latency.json"

LABELS = {"itemlm": "ItemLM single-step, full softmax over items", "itemlm_two_level": "ItemLM single-step, two-level + structure",
          "title": "Title, constrained beam search", "semantic_id": "Semantic IDs, constrained beam search",
          "itemlm_compact": "ItemLM, compact prompt", "itemlm_prefix_kv": "ItemLM + prefix KV reused",
          "itemlm_compact_prefix_kv": "ItemLM, compact prompt + prefix KV reused",
          "itemlm_packed": "ItemLM single-step, packed path (as served)"}
MAIN = ("itemlm", "itemlm_packed", "itemlm_two_level", "title", "semantic_id")
PER_USER = "per_user_cost"  # benchmarks/per_user_cost.py


def fmt(x, nd=1):
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def is_latency_run(r) -> bool:
    """A dataset x profile entry written by benchmarks/latency.py (other keys belong to other benchmarks)."""
    return isinstance(r, dict) and "cost_model" in r and "methods" in r


def write_report(allres: dict) -> None:
    lines = ["# Latency: single-token items against multi-token baselines", "",
             "Produced by `benchmarks/latency.py` (command, commit, hardware and every figure: "
             "`benchmarks/results/latency.json`). Every method reads the SAME prompt, the recipe's "
             "(`configs/itemlm-cpu.yaml`, `prompt: ids`): \"History:\" then one token per history item, the last "
             "`max_history` items. ItemLM reads its top-10 off the last position in one forward pass; the title and "
             "semantic-ID baselines read the same tokens (their history items are learned item tokens too) and "
             "generate the answer as title tokens or semantic-ID codes, beam width 10, constrained to the catalog "
             "(KV cache, `torch.inference_mode`). The methods therefore differ in their decoding only. Backbone: "
             "SmolLM2-135M's shape cut to the profile's layers, item weights freshly initialised (latency does not "
             "depend on their values, except the two-level structure decoder's: see the notes); ItemLM is the recipe's model (items-only softmax, untied item vectors). "
             "Users are timed round-robin user by user, batch 1, top-10. The template, history length, layers and "
             "thread count of every table are in the line above it.", ""]
    runs = {name: r for name, r in allres.items() if is_latency_run(r)}
    if runs:
        lines += _targets(runs)
    for name, r in runs.items():
        p = r["profile"]
        if r.get("tag") == "further":
            lines += _floor(name, r)
            continue
        tag = r.get("tag") or ""
        lines += [f"## {r['dataset']}, {p['n_layers']} layers{f' ({tag})' if tag else ''} ({r['n_items']} items)", "",
                  f"Template: {p.get('prompt', 'n/a')} prompt for every method; histories of up to "
                  f"{p['max_history']} items (mean {fmt(p.get('mean_history_items'), 1)} in the sample); "
                  f"SmolLM2-135M, {p['n_layers']} layers; {p['threads']} thread(s). "
                  f"{p['latency_users']} of the {p['users_sampled']} sampled test users timed at batch 1 (medians); "
                  f"throughput over {p['throughput_users']} users at batch {p['batch']}; "
                  f"{r['date']}, commit {str(r['git_commit'])[:8]}.", "",
                  f"| method | prompt tokens | decode steps | p50 ms (b=1) | p95 ms (b=1) | users/s (b={p['batch']}) "
                  "| ItemLM speedup, measured | predicted | x bare forward | NDCG@10 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k in MAIN:
            m = r["methods"].get(k)
            if m is None or "p50_ms_batch1" not in m:
                if k in r.get("skipped", {}):
                    lines.append(f"| {LABELS[k]} | skipped: {r['skipped'][k]} | | | | | | | | |")
                continue
            q = (m.get("quality") or {}).get("ndcg@10")
            lines.append(f"| {LABELS[k]} | {fmt(m['mean_prefill_tokens'])} | {fmt(m['decode_steps'])} | "
                         f"{fmt(m['p50_ms_batch1'])} | {fmt(m['p95_ms_batch1'])} | "
                         f"{fmt(m['throughput_users_per_s_batch'], 2)} | {fmt(m.get('measured_speedup_of_itemlm'), 2)}x | "
                         f"{fmt(m.get('predicted_speedup_of_itemlm'), 2)}x | {fmt(m.get('vs_bare_forward'), 2)}x | "
                         f"{fmt(q, 4) if q is not None else 'not measured'} |")
        measured = {k: (r["methods"].get(k, {}).get("quality") or {}) for k in MAIN}
        measured = {k: q for k, q in measured.items() if q.get("ndcg@10") is not None}
        if measured:
            lines += ["", f"NDCG@10 on all {p['users_sampled']} sampled users, history kept (the published protocol), "
                      "from checkpoints with this template and layer count:", ""]
            lines += [f"- {LABELS[k]}: `{q.get('checkpoint')}` ({q.get('prompt')} prompt, {q.get('n_layers')} layers, "
                      f"max_history {q.get('max_history')}), best checkpoint at step {q.get('train_steps')}"
                      + (f", validation NDCG@10 {q['valid_ndcg@10']:.4f}" if q.get("valid_ndcg@10") is not None else "")
                      + "." for k, q in measured.items()]
        lines += ["", "NDCG@10 \"not measured\": no checkpoint of that method with this template and layer count "
                  "exists (figures from other templates are not carried over)."]
        cm = r["cost_model"]
        lines += ["", f"Cost model: prefill {cm['prefill_ms_per_token']:.3f} ms/token + {cm['prefill_ms_intercept']:.1f} ms "
                  f"(bare forward passes at {', '.join(cm['prefill_ms_by_tokens'])} tokens); per decode step (10 beams, "
                  "cached, at the method's prompt length, transformer only): " + ", ".join(
                      f"{LABELS[k].split(',')[0]} {r['methods'][k]['decode_step_ms']:.1f} ms" for k in MAIN
                      if k in r["methods"] and r["methods"][k].get("decode_steps", 0) > 0) + "; output layer per "
                  "scoring (ItemLM: head + top-k for 1 query; baselines: log-softmax for 10 beams): " + ", ".join(
                      f"{LABELS[k].split(',')[0]}{' 2-level' if 'two_level' in k else ''} "
                      f"{r['methods'][k]['output_layer_ms']:.2f} ms" for k in MAIN
                      if "output_layer_ms" in r["methods"].get(k, {})) + ". Predicted latency = prefill(prompt "
                  "tokens) + decode steps x per-step cost + (decode steps + 1) x output layer; the speedup columns divide each method's "
                  "latency by ItemLM's; \"x bare forward\" divides it by one forward pass of the bare transformer "
                  "over the same number of tokens.", ""]
        extra = [k for k in r["methods"] if k not in MAIN]
        if extra:
            lines += _floor_rows(r, ("itemlm", "itemlm_two_level", *extra))
    lines += per_user_cost_section(allres.get(PER_USER))
    notes = ROOT / "docs" / "latency_notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    _atomic(DOC, "\n".join(lines) + "\n")
    _plot(allres)


def _targets(runs: dict) -> list[str]:
    """Issue 21's three targets, met or not, for every dataset x profile."""
    names = {"itemlm_speedup_over_title": "vs titles, batch 1", "itemlm_speedup_over_semantic_id":
             "vs semantic IDs, batch 1", "itemlm_over_bare_forward": "vs a bare forward, same tokens"}
    names = {**{k: "ItemLM (reference forward) " + v for k, v in names.items()},
             **{k.replace("itemlm_", "itemlm_packed_", 1): "ItemLM packed (as served) " + v for k, v in names.items()}}
    lines = ["## Targets", "", "| dataset, layers | template, max_history, threads | target | measured | met? |",
             "|---|---|---|---:|---|"]
    for r in runs.values():
        p = r["profile"]
        tag = f" ({r['tag']})" if r.get("tag") else ""
        for k, t in r.get("targets", {}).items():
            lines.append(f"| {r['dataset']}, {p['n_layers']} layers{tag} | {p.get('prompt')}, {p['max_history']}, "
                         f"{p['threads']} | {names.get(k, k)} {t['target']} | {t['value']:.2f}x | "
                         f"{'met' if t['met'] else 'not met'} |")
    return lines + [""]


def per_user_cost_section(r: dict | None) -> list[str]:
    """ "Per-user cost against SASRec" from benchmarks/per_user_cost.py's entry (none: no section)."""
    if not r:
        return []
    p, t = r["profile"], r["targets"]
    b1, bn = r["batch1_p50_ms_per_user"], r[f"batch{p['batch']}_ms_per_user"]
    fl = r["flops_per_user"]
    met = {True: "met", False: "not met"}
    label = {"itemlm": "ItemLM, `Predictor.topk_indices` (packed path)",
             "itemlm_reference": "ItemLM before (HF forward on a padded batch)", "sasrec": "SASRec"}
    lines = ["## Per-user cost against SASRec", "",
             f"`benchmarks/per_user_cost.py` on {r['dataset']} ({p['n_items']} items): the recipe's trained checkpoints, "
             f"`Predictor.topk_indices`, top-{p['k']} with the history masked, {p['threads']} thread, the same "
             f"{p['users']} test users for every method (mean history {p['mean_history_items']} items, max_history "
             f"{p['max_history']['itemlm']}), timed side by side in rotating order, median of {p['repeats']} repeats "
             f"(batch 1: p50 over users; batch {p['batch']}: total time / users). ItemLM: {p['itemlm_layers']} layers "
             f"of width {p['itemlm_hidden']}, `{p['itemlm_prompt']}` prompt; SASRec: width {p['sasrec_hidden']}. "
             f"{r['date']}, commit {str(r['git_commit'])[:8]}, load average {p['load_average_1min'][0]} -> "
             f"{p['load_average_1min'][1]} on {r['hardware']['cores']} shared cores.", "",
             f"| method | batch 1 p50 ms/user | x SASRec | CPU ms | x SASRec | batch {p['batch']} ms/user | x SASRec "
             "| CPU ms | x SASRec | GFLOPs/user |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ("itemlm", "itemlm_reference", "sasrec"):
        cells = []
        for d in (b1, bn):
            for clock, ratio in (("median_ms", "ratio_to_sasrec"), ("cpu_median_ms", "cpu_ratio_to_sasrec")):
                cells += [f"{d[k][clock]:.3f}", "1x" if k == "sasrec" else f"{d[k][ratio]:.2f}x"]
        lines.append(f"| {label[k]} | " + " | ".join(cells) + f" | {fl[k] / 1e9:.4f} |")
    c = r["parity"]
    lines += ["", f"Targets: ItemLM at most {t['batch1_max_ratio']:g}x SASRec at batch 1: "
              f"**{met[t['batch1_met']]}** ({b1['itemlm']['ratio_to_sasrec']:.2f}x); at most {t['batch64_max_ratio']:g}x "
              f"at batch 64: **{met[t['batch64_met']]}** ({bn['itemlm']['ratio_to_sasrec']:.2f}x). The packed path's "
              f"top-{p['k']} equals the reference's for {c['users_with_identical_top_k']} of {c['users']} users "
              f"(largest score difference {c['max_abs_score_difference']:.1e}). The targets are read on the wall clock; "
              "CPU ms is the thread's CPU time (it leaves out the time other processes held the core). FLOPs per user (matmuls and "
              f"attention, torch.utils.flop_counter, batch {p['batch']}): ItemLM {r['flops_ratio_itemlm_to_sasrec']:.0f}x "
              "SASRec's" + (lambda w: "" if w is None else
                            f"; weights a batch-1 query reads (layers and output item vectors): ItemLM "
                            f"{w['itemlm'] / 2**20:.1f} MiB, SASRec {w['sasrec'] / 2**20:.2f} MiB")(
                  r.get("weight_bytes_per_query")) + ".", ""]
    earlier = r.get("earlier_runs") or []
    if earlier:  # timing on shared cores is noisy: every run is listed, the targets read the latest
        key = f"batch{p['batch']}_ratio"
        lines += ["Earlier runs (ItemLM / SASRec per user, wall clock; the table above is the latest run):", "",
                  f"| date | commit | load | batch 1 | batch {p['batch']} |", "|---|---|---|---:|---:|"]
        for e in earlier:
            lines.append(f"| {e['date']} | {str(e['git_commit'])[:8]} | {e['load_average_1min'][0]} -> "
                         f"{e['load_average_1min'][1]} | {e['batch1_ratio']:.2f}x | {e[key]:.2f}x |")
        lines.append("")
    return lines


def _floor(name: str, r: dict) -> list[str]:
    p = r["profile"]
    return [f"## {name}: the single-step floor", "",
            f"{p['latency_users']} users at batch 1 (same users for every variant, round-robin), throughput over "
            f"{p['throughput_users']} users at batch {p['batch']}; {p['threads']} thread(s); {r['date']}.", ""] + \
        _floor_rows(r, ("itemlm", "itemlm_compact", "itemlm_prefix_kv", "itemlm_compact_prefix_kv"))


def _floor_rows(r: dict, kinds) -> list[str]:
    lines = ["Against a bare forward pass of the backbone (no item embeddings, no head) over the same number of "
             "prompt tokens, batch 1:", "",
             f"| variant | prompt tokens computed | p50 ms | p95 ms | users/s (b={r['profile']['batch']}) | bare forward ms (full prompt) | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in kinds:
        m = r["methods"].get(k)
        if m is None or "p50_ms_batch1" not in m:
            continue
        lines.append(f"| {LABELS[k]} | {fmt(m['mean_prefill_tokens'])} | {fmt(m['p50_ms_batch1'])} | "
                     f"{fmt(m['p95_ms_batch1'])} | {fmt(m['throughput_users_per_s_batch'], 2)} | "
                     f"{fmt(m['bare_forward_ms_full_prompt'])} | {fmt(m['vs_bare_forward'], 3)}x |")
    return lines + [""]


def _atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _plot(allres: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allres = {n: r for n, r in allres.items() if is_latency_run(r) and r.get("tag") != "further"}
    if not allres:
        return
    fig, axes = plt.subplots(1, len(allres), figsize=(5.5 * len(allres), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], allres.items()):
        ks = [k for k in MAIN if "p50_ms_batch1" in r["methods"].get(k, {})]
        p50 = [r["methods"][k]["p50_ms_batch1"] for k in ks]
        p95 = [r["methods"][k]["p95_ms_batch1"] for k in ks]
        pred = [r["methods"][k]["predicted_ms"] for k in ks]
        x = range(len(ks))
        ax.bar([i - 0.2 for i in x], p50, 0.4, label="measured p50")
        ax.errorbar([i - 0.2 for i in x], p50, yerr=[[0] * len(ks), [b - a for a, b in zip(p50, p95)]],
                    fmt="none", ecolor="k", capsize=3, label="to p95")
        ax.bar([i + 0.2 for i in x], pred, 0.4, label="cost model")
        ax.set_yscale("log")
        ax.set_xticks(list(x), [LABELS[k].split(",")[0] + ("\n2-level" if "two_level" in k else "") for k in ks], fontsize=8)
        ax.set_ylabel("ms per user, batch 1")
        ax.set_title(f"{r['dataset']}: top-10, {r['profile']['n_layers']} layers, {r['profile'].get('prompt')} prompt",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=PNG.parent, prefix=".latency.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, PNG)


if __name__ == "__main__":
    write_report(json.loads(RESULTS.read_text()))
