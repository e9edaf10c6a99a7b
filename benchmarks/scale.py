"""Scale benchmark (issue #3): full vs two-level softmax at 10^4, 10^5, 10^6 items, hidden 576.

    flock /tmp/itemgen-bench.lock python benchmarks/scale.py                      # everything
    flock /tmp/itemgen-bench.lock python benchmarks/scale.py --sizes 1000000 --parts train

Each (part, size) runs in a fresh subprocess (peak memory is measured per process, and a 10^6
item table is 2.3 GB), on ONE torch/FAISS thread so that every method gets the same core.
Results merge into benchmarks/results/scale.json (one entry per part/regime/size, each with its
own command, commit and date) and docs/scale.md is rewritten from the whole file.

The synthetic model (no training: timings and exactness do not depend on learned values, but
decoder shortcuts depend on how peaked the model is, so its shape is stated exactly):
  - H = 576 (SmolLM2-135M), |V| = 49152 text tokens in the softmax (SmolLM2's vocabulary),
    text output vectors ~ N(0, 1/H); C = round(sqrt(|I|)) clusters, items assigned by a seeded
    random balanced assignment.
  - centroids e_c ~ N(0, a^2/H), item vectors e_t ~ N(0, b^2/H): an item's full vector is
    u_t = e_c(t) + e_t, i.e. items of a cluster lie around their centroid (as k-means clusters of
    a trained model do). The full-softmax model uses u_t as its item output vectors.
  - a hidden state for target t: h = T * (u_t / |u_t| + sigma * z / sqrt(H)), z ~ N(0, I_H):
    the normalised target vector plus isotropic noise of norm about sigma, scaled by T.
  - regimes: "clustered" a=1, b=0.5, T=16, sigma=3 (main); "diffuse" a=1, b=1, T=10, sigma=2
    (items spread as far from their centroid as centroids from each other: a sensitivity check).
  - log Z_c for ANN is estimated on 2048 "training" states drawn the same way with other targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
DOC = ROOT / "docs" / "scale.md"
H, V = 576, 49152
REGIMES = {"clustered": dict(a=1.0, b=0.5, T=16.0, sigma=3.0), "diffuse": dict(a=1.0, b=1.0, T=10.0, sigma=2.0)}


# ---- shared helpers (run inside workers) ---------------------------------------------------

def _one_thread():
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def rss_reset() -> int:
    """Reset the peak-RSS counter (VmHWM) to the current RSS; -> current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def make_head(kind: str, n_items: int, regime: dict | None, seed: int = 0):
    """A full or two-level head over |V| text tokens and n_items items (see the module docstring)."""
    import torch
    from torch import nn

    from itemgen.heads.softmax import FullSoftmaxHead, TwoLevelHead

    g = torch.Generator().manual_seed(seed)
    C = max(1, round(math.sqrt(n_items)))
    text = nn.Parameter(torch.empty(V, H).normal_(0, 1 / math.sqrt(H), generator=g))
    assign = torch.randperm(n_items, generator=g) % C
    a, b = (regime["a"], regime["b"]) if regime else (1.0, 0.5)
    two = TwoLevelHead(n_items, H, lambda: text, assign, sparse_grad=kind == "two_level_sparse")
    with torch.no_grad():
        two.centroids.normal_(0, a / math.sqrt(H), generator=g)
        two.item_out.normal_(0, b / math.sqrt(H), generator=g)
    if kind == "full":
        full = FullSoftmaxHead(n_items, H, lambda: text)
        full.item_out = nn.Parameter(two.item_vectors().detach())  # u_t = e_c(t) + e_t
        return full, text
    return two, text


def hidden_states(head, n: int, regime: dict, seed: int):
    """(n, H) states near n random target items, and the targets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, head.n_items, (n,), generator=g)
    with torch.no_grad():
        u = head.item_vectors()[targets]
        u = u / u.norm(dim=1, keepdim=True)
        h = regime["T"] * (u + regime["sigma"] * torch.randn(n, H, generator=g) / math.sqrt(H))
    return h, targets


# ---- (a) training-head step ----------------------------------------------------------------

def train_worker(n_items: int, kind: str, repeats: int, n_labels: int = 64) -> dict:
    import torch

    _one_thread()
    head, text = make_head(kind, n_items, None)
    params = [p for p in head.parameters()] + [text]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n_labels, H, generator=g, requires_grad=True)
    targets = torch.randint(0, n_items, (n_labels,), generator=g)

    def step():
        loss = head.loss(h, targets)
        loss.backward()

    def clear():
        for p in params:
            p.grad = None
        h.grad = None

    base = rss_reset()  # peak = what one forward+backward (activations + gradients) adds
    step()
    peak = _status("VmHWM") - base
    clear()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        clear()
    return {"step_ms_median": round(1e3 * statistics.median(times), 2), "step_ms": [round(1e3 * t, 2) for t in times],
            "peak_mib": round(peak / 2 ** 20, 1), "labels": n_labels}


# ---- (b) top-10 decoding -------------------------------------------------------------------

def decode_worker(n_items: int, regime_name: str, q1: int, n_queries: int, ann_kinds: list[str]) -> dict:
    import types

    import faiss
    import torch

    from itemgen.topk.ann import AnnIndex, AnnTopK
    from itemgen.topk.exact import ExactTopK
    from itemgen.topk.structure import StructureTopK

    _one_thread()
    regime = REGIMES[regime_name]
    head, _ = make_head("two_level", n_items, regime)
    model = types.SimpleNamespace(head=head, n_items=n_items, name="itemlm", score_items=head.item_log_probs,
                                  item_vectors=head.item_vectors,
                                  ranking_scores=lambda query, histories: head.item_log_probs(query))
    queries, targets = hidden_states(head, n_queries, regime, seed=2)
    train_states, _ = hidden_states(head, 2048, regime, seed=1)
    k, B = 10, 64
    decoders = {"exact": ExactTopK(model), "structure": StructureTopK(model)}
    builds = {}
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(2)  # building is not what is timed
    from itemgen.topk.ann import estimate_log_normalizers

    log_norm = estimate_log_normalizers(head, train_states)
    builds["log_norm_seconds"] = round(time.perf_counter() - t0, 2)
    search_params, ivf = {}, None
    for spec in ann_kinds:
        kind, _, arg = spec.partition(":")
        t0 = time.perf_counter()
        if kind == "ivf":  # one IVF index, searched with several nprobe values
            if ivf is None:
                ivf = AnnIndex.build(model, "ivf", log_norm=log_norm)
                builds["ivf"] = round(time.perf_counter() - t0, 2)
            search_params[f"ann_{spec}"] = int(arg)
            decoders[f"ann_{spec}"] = AnnTopK(model, index=ivf)
            continue
        if kind == "hnsw":
            idx = AnnIndex.build(model, "hnsw", log_norm=log_norm, hnsw_m=16, ef_construction=64,
                                 ef_search=int(arg))
        else:
            idx = AnnIndex.build(model, "flat", log_norm=log_norm)
        builds[spec] = round(time.perf_counter() - t0, 2)
        decoders[f"ann_{spec}"] = AnnTopK(model, index=idx)
    faiss.omp_set_num_threads(1)
    out = {"clusters": head.n_clusters, "queries": n_queries, "batch1_queries": q1, "build_seconds": builds}
    ref_ids = None
    with torch.inference_mode():
        for name, dec in decoders.items():
            if name in search_params:
                dec.index.set_search(nprobe=search_params[name])
            one = []
            for i in range(q1):
                t0 = time.perf_counter()
                dec.topk(queries[i:i + 1], k)
                one.append(time.perf_counter() - t0)
            if name == "structure":
                dec.opened, dec.queries = 0, 0
            batch, ids = [], []
            for s in range(0, n_queries, B):
                t0 = time.perf_counter()
                _, top = dec.topk(queries[s:s + B], k)
                batch.append(time.perf_counter() - t0)
                ids.append(top)
            ids = torch.cat(ids)
            row = {"batch1_ms_per_query": round(1e3 * statistics.median(one), 3),
                   "batch64_ms_per_query": round(1e3 * statistics.median(batch) / B, 3),
                   "batch64_ms_per_batch": round(1e3 * statistics.median(batch), 2),
                   "target_in_top10": round(float((ids == targets[:, None]).any(1).float().mean()), 4)}
            if ref_ids is None:
                ref_ids = ids
                row["target_at_1"] = round(float((ids[:, 0] == targets).float().mean()), 4)
            else:
                overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, ref_ids)]
                row["recall@10_vs_exact"] = round(float(sum(overlap) / len(overlap)), 4)
                row["identical_top10"] = bool(torch.equal(ids, ref_ids))
            if name == "structure":
                row["clusters_opened_mean"] = dec.stats()["clusters_opened_mean"]
            out[name] = row
    ex = out["exact"]
    for name in decoders:
        if name != "exact":
            out[name]["speedup_batch1"] = round(ex["batch1_ms_per_query"] / out[name]["batch1_ms_per_query"], 2)
            out[name]["speedup_batch64"] = round(ex["batch64_ms_per_query"] / out[name]["batch64_ms_per_query"], 2)
    return out


# ---- driver --------------------------------------------------------------------------------

def run_worker(args: list[str], timeout: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",  # big buffers: mmap'd and returned on free
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ann_specs(n_items: int) -> list[str]:
    specs = ["ivf:1", "ivf:4", "ivf:16", "ivf:64"]
    if n_items <= 100_000:
        specs += ["hnsw:64", "flat"]
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--parts", default="train,decode")
    ap.add_argument("--regimes", default="clustered,diffuse")
    ap.add_argument("--repeats", type=int, default=3, help="timed training steps per head")
    ap.add_argument("--queries", type=int, default=256, help="queries per decoder (batches of 64)")
    ap.add_argument("--batch1-queries", type=int, default=20)
    ap.add_argument("--diffuse-max", type=int, default=100_000, help="largest catalog for the diffuse regime")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", nargs="*")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.worker is not None:
        w = args.worker
        if w[0] == "train":
            print(json.dumps(train_worker(int(w[1]), w[2], int(w[3]))))
        else:
            print(json.dumps(decode_worker(int(w[1]), w[2], int(w[3]), int(w[4]), w[5].split(","))))
        return

    from itemgen.api import run_info

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["setup"] = {"hidden": H, "text_tokens": V, "clusters": "round(sqrt(items)), random balanced",
                        "regimes": REGIMES, "threads": 1, "labels_per_step": 64, "k": 10,
                        "description": __doc__.split("The synthetic model")[1].strip()}
    info = run_info()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    for part in args.parts.split(","):
        for n in sizes:
            if part == "train":
                entry = {"run": info}
                for kind in ("full", "two_level", "two_level_sparse"):
                    print(f"train {n} {kind} ...", flush=True)
                    entry[kind] = run_worker(["train", str(n), kind, str(args.repeats)], 590)
                f, t, s = entry["full"], entry["two_level"], entry["two_level_sparse"]
                for name, row in (("two_level", t), ("two_level_sparse", s)):
                    row["speedup_vs_full"] = round(f["step_ms_median"] / row["step_ms_median"], 2)
                    row["memory_ratio_vs_full"] = round(f["peak_mib"] / max(row["peak_mib"], 0.1), 2)
                results.setdefault("train", {})[str(n)] = entry
                print(json.dumps(entry), flush=True)
            else:
                for regime in args.regimes.split(","):
                    if regime == "diffuse" and n > args.diffuse_max:
                        continue
                    print(f"decode {n} {regime} ...", flush=True)
                    entry = run_worker(["decode", str(n), regime, str(args.batch1_queries), str(args.queries),
                                        ",".join(ann_specs(n))], 590)
                    entry["run"] = info
                    results.setdefault("decode", {}).setdefault(regime, {})[str(n)] = entry
                    print(json.dumps(entry), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            os.replace(tmp, out)
    write_doc(results)


def write_doc(results: dict) -> None:
    lines = ["# Scale: two-level softmax, structure and ANN decoding", "",
             "Produced by `flock /tmp/itemgen-bench.lock python benchmarks/scale.py` "
             "(results: `benchmarks/results/scale.json`; each entry names its command, commit and date). "
             "One CPU thread for every method; medians of repeated runs; ratios from the same run. "
             "10^7 items were not run: one float32 table of 10^7 x 576 is 23 GB and a float16 one 11.5 GB "
             "before any gradient or index copy, on a 24 GB machine shared by several developers.", "",
             "Synthetic model: " + results.get("setup", {}).get("description", ""), "",
             "## Using it", "",
             "```bash",
             "itemgen clusters build DATA --method kmeans        # or frequency | random; DATA/clusters/kmeans.json",
             "itemgen train configs/itemlm-cpu.yaml data.path=DATA itemlm.head=two_level itemlm.cluster_method=kmeans items.dropout=0.3 itemlm.hidden_dropout=0.3",
             "itemgen evaluate RUN/best --decode structure       # exact top-k, clusters opened in the report",
             "itemgen index build RUN/best --type ivf            # flat | ivf | hnsw, saved as RUN/best/ann.faiss",
             "itemgen evaluate RUN/best --decode ann",
             "```", ""]
    if "train" in results:
        lines += ["## Training-head step (forward + backward, 64 labels, |V| = 49152 text tokens included)", "",
                  "| items | head | step ms | peak MiB | speed-up vs full | memory ratio vs full |",
                  "|---:|---|---:|---:|---:|---:|"]
        for n in sorted(results["train"], key=int):
            e = results["train"][n]
            for kind in ("full", "two_level", "two_level_sparse"):
                r = e[kind]
                lines.append(f"| {int(n):,} | {kind} | {r['step_ms_median']} | {r['peak_mib']} | "
                             f"{r.get('speedup_vs_full', '')} | {r.get('memory_ratio_vs_full', '')} |")
        lines += ["", "`two_level` keeps a dense gradient for the item table (what `training/loop.py`'s AdamW needs); "
                  "`two_level_sparse` gives it a sparse gradient (rows of the labels' clusters only, "
                  "`TwoLevelHead(sparse_grad=True)`, for a sparse optimizer). Peak MiB = peak RSS added by "
                  "one step over the parameters (activations + gradients).", ""]
    for regime, by_size in results.get("decode", {}).items():
        lines += [f"## Top-10 decoding, {regime} regime", "",
                  "| items | decoder | ms/query batch 1 | ms/query batch 64 | speed-up b1 | speed-up b64 | "
                  "recall@10 vs exact | identical | clusters opened | target in top-10 |",
                  "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for n in sorted(by_size, key=int):
            e = by_size[n]
            for name, r in e.items():
                if not isinstance(r, dict) or "batch1_ms_per_query" not in r:
                    continue
                lines.append(f"| {int(n):,} | {name} | {r['batch1_ms_per_query']} | {r['batch64_ms_per_query']} | "
                             f"{r.get('speedup_batch1', '')} | {r.get('speedup_batch64', '')} | "
                             f"{r.get('recall@10_vs_exact', '')} | {r.get('identical_top10', '')} | "
                             f"{r.get('clusters_opened_mean', '')} | {r['target_in_top10']} |")
        lines.append("")
    lines += targets(results)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")


def targets(results: dict, n: str = "1000000") -> list[str]:
    """The issue's targets at 10^6 items, read off the measured figures (met / NOT met)."""
    out = ["## Targets at 10^6 items (issue #3)", ""]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    tr = results.get("train", {}).get(n)
    if tr:
        for kind in ("two_level", "two_level_sparse"):
            r = tr[kind]
            out.append(f"- training head, {kind}: {r['speedup_vs_full']}x faster "
                       f"({verdict(r['speedup_vs_full'] >= 10)}, target 10x), {r['memory_ratio_vs_full']}x less "
                       f"peak memory ({verdict(r['memory_ratio_vs_full'] >= 10)}, target 10x)")
    de = results.get("decode", {}).get("clustered", {}).get(n)
    if de:
        s = de["structure"]
        out.append(f"- structure: identical top-10 {s['identical_top10']} ({verdict(s['identical_top10'])}); "
                   f"{s['speedup_batch1']}x faster at batch 1, {s['speedup_batch64']}x at batch 64 "
                   f"({verdict(min(s['speedup_batch1'], s['speedup_batch64']) >= 20)}, target 20x)")
        anns = {k: v for k, v in de.items() if k.startswith("ann_") and isinstance(v, dict)}
        for name, r in anns.items():
            ok = r["recall@10_vs_exact"] >= 0.95 and min(r["speedup_batch1"], r["speedup_batch64"]) >= 50
            out.append(f"- {name}: recall@10 {r['recall@10_vs_exact']}, {r['speedup_batch1']}x faster at batch 1, "
                       f"{r['speedup_batch64']}x at batch 64 ({verdict(ok)}: target recall >= 0.95 and 50x)")
    if len(out) == 2:
        out.append("- (no 10^6 results yet)")
    return out + [""]


if __name__ == "__main__":
    main()
