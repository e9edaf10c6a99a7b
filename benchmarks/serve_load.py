"""Load benchmark of `itemgen serve`: the real server as a subprocess on 127.0.0.1, a bounded
asyncio httpx load with real test-user histories. Writes benchmarks/results/serve.json and the
results table in docs/serve.md.

    # a checkpoint (any; docs/serve.md names the one behind the committed figures)
    itemgen data prepare lcrec ../shared/datasets/amazon2018-scientific --out /tmp/sci
    OMP_NUM_THREADS=1 itemgen train configs/itemlm-cpu.yaml data.path=/tmp/sci train.out=/tmp/serve-run
    # the load (one invocation, about 5 minutes with the defaults)
    flock /tmp/itemgen-bench.lock python benchmarks/serve_load.py --checkpoint /tmp/serve-run/best

With ``--compare-threads 1,2,0`` it first compares torch thread counts (``itemgen serve
--threads N``; 0 = torch's default, one per core): one server per candidate, all started side
by side, then at each level ``--compare-rounds`` rounds of ``--compare-duration`` seconds per
candidate, in rotating order so that the machine's other load falls on all of them alike;
medians over rounds. OMP_NUM_THREADS is removed from every server's environment: only
``--threads`` differs.

What it measures, on one server with micro-batching on (the defaults of `itemgen serve`):
a warm-up, the server's RSS, then ``--duration`` seconds at each of 1, 8 and 32 concurrent
clients (each client sends its next request as soon as the last one is answered), the RSS
again. Then micro-batching off (a second server, ``--max-batch 1``) against on, at 32 clients,
in ``--ratio-rounds`` alternating rounds; the ratio is the median over rounds. Last, sessions:
for users replayed one by one, an event + session recommendation against a stateless request
with the same history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from itemgen.api import run_info  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.data.dataset import SequenceDataset  # noqa: E402
from itemgen.models.checkpoint import read_config  # noqa: E402

BEGIN, END = "<!-- serve_load:begin -->", "<!-- serve_load:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    def __init__(self, checkpoint: str, threads: int | None, extra: list[str], log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        # only --threads sets the server's threads (0: torch's default), as for a user's `itemgen serve`
        env = {k: v for k, v in os.environ.items() if k not in ("ITEMGEN_API_KEY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.cmd = [sys.executable, "-m", "itemgen.cli", "serve", checkpoint, "--port", str(self.port),
                    *(["--threads", str(threads)] if threads is not None else []), "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.get(f"{self.base}/readyz", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base}/metrics", timeout=30).text
        out = {}
        for name in ("itemgen_batch_size_sum", "itemgen_batch_size_count", "itemgen_forward_seconds_sum"):
            m = re.search(rf"^{name} (\S+)$", text, re.M)
            out[name] = float(m.group(1)) if m else float("nan")
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()


async def load(base: str, clients: int, duration: float, histories: list[list[str]], k: int) -> dict:
    """``clients`` closed-loop clients for ``duration`` seconds; requests started before the
    deadline are finished and counted, then every client stops."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def one(c: int):
            rng = random.Random(c)
            while time.perf_counter() < deadline:
                h = histories[rng.randrange(len(histories))]
                s = time.perf_counter()
                try:
                    r = await client.post("/v1/recommend", json={"history": h, "k": k})
                    ok = r.status_code == 200 and len(r.json()["items"]) > 0
                    key = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                if key is None:
                    latencies.append(time.perf_counter() - s)
                else:
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*[one(c) for c in range(clients)])
        elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    q = (lambda p: float(np.percentile(lat, p))) if len(lat) else (lambda p: float("nan"))
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies),
            "errors": sum(errors.values()), "error_kinds": errors,
            "throughput_rps": len(latencies) / elapsed, "p50_ms": q(50), "p95_ms": q(95), "p99_ms": q(99),
            "mean_ms": float(lat.mean()) if len(lat) else float("nan")}


def with_batches(server: Server, before: dict, result: dict) -> dict:
    after = server.metrics()
    n = after["itemgen_batch_size_count"] - before["itemgen_batch_size_count"]
    rows = after["itemgen_batch_size_sum"] - before["itemgen_batch_size_sum"]
    fwd = after["itemgen_forward_seconds_sum"] - before["itemgen_forward_seconds_sum"]
    result["mean_batch_size"] = rows / n if n else float("nan")
    result["mean_forward_ms"] = fwd / n * 1e3 if n else float("nan")
    return result


def run_level(server: Server, clients: int, duration: float, histories, k: int) -> dict:
    before = server.metrics()
    r = asyncio.run(load(server.base, clients, duration, histories, k))
    return with_batches(server, before, r)


def sessions_vs_stateless(base: str, histories: list[list[str]], k: int, users: int) -> dict:
    """Per user: replay all but the last item into a session (untimed), then time the event of
    the last item + the session recommendation, against one stateless request with the whole
    history. Sequential, one client."""
    ev, st = [], []
    with httpx.Client(base_url=base, timeout=60) as c:
        for u, h in enumerate(histories[:users]):
            sid = f"bench-{u}"
            for item in h[:-1]:
                c.post(f"/v1/sessions/{sid}/events", json={"item": item}).raise_for_status()
            c.get(f"/v1/sessions/{sid}/recommend", params={"k": k}).raise_for_status()  # prefill so far
            t = time.perf_counter()
            c.post(f"/v1/sessions/{sid}/events", json={"item": h[-1]}).raise_for_status()
            a = c.get(f"/v1/sessions/{sid}/recommend", params={"k": k})
            ev.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = c.post("/v1/recommend", json={"history": h, "k": k})
            st.append(time.perf_counter() - t)
            a.raise_for_status(), b.raise_for_status()
            if [x["id"] for x in a.json()["items"]] != [x["id"] for x in b.json()["items"]]:
                raise RuntimeError(f"session and stateless rankings differ for user {u}")
            c.delete(f"/v1/sessions/{sid}")
    return {"users": len(ev), "session_event_plus_recommend_p50_ms": statistics.median(ev) * 1e3,
            "stateless_recommend_p50_ms": statistics.median(st) * 1e3, "rankings_equal": True}


def compare_threads(args, candidates: list[int], levels: list[int], histories, logs: Path) -> dict:
    """Every candidate's server side by side; per level, rounds in rotating order; medians."""
    servers = {t: Server(args.checkpoint, t, ["--batch-window-ms", str(args.batch_window_ms), "--max-batch",
                                              str(args.max_batch)], Path(f"{logs}.threads{t}.log"))
               for t in candidates}
    out = {"candidates": candidates, "rounds": args.compare_rounds, "seconds_per_round": args.compare_duration,
           "levels": []}
    try:
        for srv in servers.values():
            srv.wait_ready()
        for srv in servers.values():
            asyncio.run(load(srv.base, 8, args.warmup, histories, args.k))
        for c in levels:
            runs: dict[int, list[dict]] = {t: [] for t in candidates}
            for i in range(args.compare_rounds):
                order = candidates[i % len(candidates):] + candidates[:i % len(candidates)]
                for t in order:
                    runs[t].append(run_level(servers[t], c, args.compare_duration, histories, args.k))
            for t in candidates:
                rs = runs[t]
                row = {"threads": t, "clients": c, "errors": sum(r["errors"] for r in rs),
                       **{key: statistics.median(r[key] for r in rs)
                          for key in ("throughput_rps", "p50_ms", "p99_ms", "mean_batch_size")},
                       "rounds_rps": [r["throughput_rps"] for r in rs]}
                out["levels"].append(row)
                print("threads", json.dumps(row), flush=True)
    finally:
        out["server_exit_codes"] = {t: srv.stop() for t, srv in servers.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory to serve")
    ap.add_argument("--data", help="prepared dataset for test histories (default: the checkpoint's data.path)")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients per level")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    ap.add_argument("--ratio-duration", type=float, default=15.0, help="seconds per batching on/off round")
    ap.add_argument("--ratio-rounds", type=int, default=3)
    ap.add_argument("--ratio-clients", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="--threads of each server process (default: none given, the server's default)")
    ap.add_argument("--compare-threads", default="", help="e.g. 1,2,0: compare these --threads first")
    ap.add_argument("--compare-duration", type=float, default=10.0, help="seconds per candidate per round")
    ap.add_argument("--compare-rounds", type=int, default=3)
    ap.add_argument("--compare-only", action="store_true", help="only the thread comparison (JSON, no doc)")
    ap.add_argument("--batch-window-ms", type=float, default=2.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--session-users", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs/serve.md"))
    args = ap.parse_args()

    cfg = read_config(args.checkpoint)
    ds = SequenceDataset.load(args.data or cfg.data.path)
    histories = [[ds.items.ids[i] for i in e.history] for e in ds.examples("test")]
    histories = [h[-200:] for h in histories if h]
    random.Random(0).shuffle(histories)
    levels = [int(x) for x in args.levels.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="itemgen-serve-load-")) / "server"  # server logs stay out of the repo
    common = ["--batch-window-ms", str(args.batch_window_ms)]
    threads_cmp = None
    if args.compare_threads:
        cands = [int(x) for x in args.compare_threads.split(",")]
        threads_cmp = compare_threads(args, cands, levels, histories, logs)
        if args.compare_only:
            report = {"benchmark": "serve_load --compare-only", **run_info(),
                      "profile": {"model": cfg.model, "max_history": cfg.data.max_history, "items": ds.n_items,
                                  "dataset": ds.name, "checkpoint": str(args.checkpoint)},
                      "settings": {k: v for k, v in vars(args).items() if k not in ("out", "doc")},
                      "threads_comparison": threads_cmp}
            atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.out}")
            return
    on = Server(args.checkpoint, args.threads, [*common, "--max-batch", str(args.max_batch)], Path(f"{logs}.on.log"))
    off = Server(args.checkpoint, args.threads, [*common, "--max-batch", "1"], Path(f"{logs}.off.log"))
    try:
        ready = on.wait_ready()
        off.wait_ready()
        print(f"serving {ready['model']}: {ready['items']} items; {len(histories)} test histories", flush=True)
        asyncio.run(load(on.base, 8, args.warmup, histories, args.k))
        asyncio.run(load(off.base, 8, args.warmup / 2, histories, args.k))
        rss_before = rss_mb(on.proc.pid)
        results = []
        for c in levels:
            r = run_level(on, c, args.duration, histories, args.k)
            results.append(r)
            print(json.dumps(r), flush=True)
        rss_after = rss_mb(on.proc.pid)
        rounds = []
        for i in range(args.ratio_rounds):
            b = run_level(on, args.ratio_clients, args.ratio_duration, histories, args.k)
            u = run_level(off, args.ratio_clients, args.ratio_duration, histories, args.k)
            rounds.append({"batched": b, "unbatched": u, "ratio": b["throughput_rps"] / u["throughput_rps"]})
            print(f"round {i}: batched {b['throughput_rps']:.1f} rps, unbatched {u['throughput_rps']:.1f} rps",
                  flush=True)
        session = sessions_vs_stateless(on.base, [h for h in histories if len(h) >= 2], args.k, args.session_users)
        print(json.dumps(session), flush=True)
        rss_end = rss_mb(on.proc.pid)
    finally:
        codes = {"batched": on.stop(), "unbatched": off.stop()}
    ratio = statistics.median(r["ratio"] for r in rounds)
    by = {r["clients"]: r for r in results}
    growth = rss_after / rss_before - 1
    all_errors = sum(r["errors"] for r in results) + sum(x["errors"] for r in rounds for x in (r["batched"], r["unbatched"]))
    targets = {
        "zero_errors": {"value": all_errors, "met": all_errors == 0},
        "p99_over_p50_at_32": {"value": by[32]["p99_ms"] / by[32]["p50_ms"] if 32 in by else None,
                               "target": 4.0, "met": 32 in by and by[32]["p99_ms"] <= 4 * by[32]["p50_ms"]},
        "p99_over_p50_at_8": {"value": by[8]["p99_ms"] / by[8]["p50_ms"] if 8 in by else None,
                              "target": 3.0, "met": 8 in by and by[8]["p99_ms"] <= 3 * by[8]["p50_ms"]},
        "batching_speedup_at_32": {"value": ratio, "target": 3.0, "met": ratio >= 3.0},
        "memory_growth": {"value": growth, "target": 0.10, "met": growth < 0.10},
    }
    icfg = cfg.itemlm
    report = {
        "benchmark": "serve_load", **run_info(),
        "profile": {"model": cfg.model, "backbone": icfg.backbone if cfg.model == "itemlm" else None,
                    "n_layers": icfg.n_layers if cfg.model == "itemlm" else None,
                    "prompt": icfg.prompt if cfg.model == "itemlm" else None,
                    "max_history": cfg.data.max_history, "items": ready["items"], "dataset": ds.name,
                    "checkpoint": str(args.checkpoint), "server": ready},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "doc")},
        "levels": results, "batching_rounds": rounds, "batching_speedup_median": ratio,
        "rss_mb": {"before_levels": rss_before, "after_levels": rss_after, "end": rss_end, "growth": growth},
        "sessions": session, "targets": targets, "server_exit_codes": codes, "threads_comparison": threads_cmp,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    write_doc(Path(args.doc), report)
    print(f"wrote {args.out} and {args.doc}")


def threads_text(threads: int | None) -> str:
    if threads is None:
        return "the server's default --threads"
    return "torch's default threads per server" if threads == 0 else f"--threads {threads} per server"


def write_doc(path: Path, rep: dict) -> None:
    p = rep["profile"]
    layers = f" ({p['n_layers']} layers)" if p.get("n_layers") else ""
    lines = [f"Measured {rep['date']} on {rep['hardware']['cores']} shared CPU cores ({rep['hardware']['cpu']}), "
             f"commit {str(rep['git_commit'])[:10]}: {p['model']} / {p['backbone']}{layers}, prompt {p['prompt']}, "
             f"{p['items']} items ({p['dataset']}), {threads_text(rep['settings']['threads'])}, "
             f"{rep['settings']['duration']:.0f} s per level, window {rep['settings']['batch_window_ms']} ms, "
             f"max batch {rep['settings']['max_batch']}.", "",
             "| clients | requests | errors | throughput (req/s) | p50 ms | p95 ms | p99 ms | mean batch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["levels"]:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['throughput_rps']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch_size']:.1f} |")
    cmp = rep.get("threads_comparison")
    if cmp:
        lines += ["", f"Torch threads per server (`--threads`; 0 = torch's default), all servers side by side, "
                      f"medians of {cmp['rounds']} rounds of {cmp['seconds_per_round']:.0f} s per candidate and level:",
                  "", "| clients | --threads | req/s | p50 ms | p99 ms | p99/p50 | errors | req/s per round |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in cmp["levels"]:
            lines.append(f"| {r['clients']} | {r['threads']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['p99_ms'] / r['p50_ms']:.2f} | {r['errors']} | "
                         f"{', '.join(f'{x:.1f}' for x in r['rounds_rps'])} |")
    lines += ["", f"Micro-batching at {rep['settings']['ratio_clients']} clients, alternating rounds of "
                  f"{rep['settings']['ratio_duration']:.0f} s:", "",
              "| round | batched req/s | unbatched req/s | ratio |", "|---:|---:|---:|---:|"]
    for i, r in enumerate(rep["batching_rounds"]):
        lines.append(f"| {i} | {r['batched']['throughput_rps']:.1f} | {r['unbatched']['throughput_rps']:.1f} | "
                     f"{r['ratio']:.2f} |")
    s, m, t = rep["sessions"], rep["rss_mb"], rep["targets"]
    yes = lambda x: "met" if x["met"] else "**not met**"
    ratio = lambda x: "n/a" if x["value"] is None else f"{x['value']:.2f}x"
    lines += ["", f"Server RSS {m['before_levels']:.0f} MB before the levels, {m['after_levels']:.0f} MB after "
                  f"({m['growth'] * 100:+.1f}%), {m['end']:.0f} MB at the end.",
              f"Sessions ({s['users']} users, one client): event + session recommendation p50 "
              f"{s['session_event_plus_recommend_p50_ms']:.1f} ms vs stateless request p50 "
              f"{s['stateless_recommend_p50_ms']:.1f} ms; rankings equal.", "",
              "| target | value | |", "|---|---:|---|",
              f"| zero errors | {t['zero_errors']['value']} | {yes(t['zero_errors'])} |",
              f"| p99 <= 4x p50 at 32 clients | {ratio(t['p99_over_p50_at_32'])} | "
              f"{yes(t['p99_over_p50_at_32'])} |",
              f"| p99 <= 3x p50 at 8 clients | {ratio(t['p99_over_p50_at_8'])} | {yes(t['p99_over_p50_at_8'])} |",
              f"| micro-batching >= 3x unbatched at 32 clients | {t['batching_speedup_at_32']['value']:.2f}x | "
              f"{yes(t['batching_speedup_at_32'])} |",
              f"| memory growth < 10% | {t['memory_growth']['value'] * 100:+.1f}% | {yes(t['memory_growth'])} |"]
    table = "\n".join(lines)
    text = path.read_text() if path.exists() else f"# Serving\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    atomic_write_text(path, f"{head}{BEGIN}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    main()
