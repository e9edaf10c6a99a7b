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
import multiprocessing
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
        # the server's own latency histogram of /v1/recommend (Guard: app entry to response)
        for line in text.splitlines():
            if line.startswith("itemgen_request_seconds_bucket{") and 'route="/v1/recommend"' in line:
                le = re.search(r'le="([^"]+)"', line).group(1)
                out[f"le:{le}"] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()


async def _clients(base: str, first: int, clients: int, start_at: float, duration: float,
                   histories: list[list[str]], k: int) -> tuple[list[float], dict[str, int], float]:
    """Clients ``first`` .. ``first + clients - 1`` of a load, in this process: closed loops from
    ``start_at`` (time.monotonic, the same clock in every process) for ``duration`` seconds;
    requests started before the deadline are finished and counted. -> (latencies s, errors, elapsed s)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        deadline = start_at + duration

        async def one(c: int):
            rng = random.Random(c)
            while time.monotonic() < deadline:
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

        await asyncio.gather(*[one(c) for c in range(first, first + clients)])
        elapsed = time.monotonic() - start_at
    return latencies, errors, elapsed


def _client_proc(base: str, first: int, clients: int, start_at: float, duration: float, k: int):
    return asyncio.run(_clients(base, first, clients, start_at, duration, _HISTORIES, k))


_HISTORIES: list[list[str]] = []  # set before the client processes fork (not pickled per call)


def load(base: str, clients: int, duration: float, histories: list[list[str]], k: int, procs: int = 1) -> dict:
    """``clients`` closed-loop clients for ``duration`` seconds, spread over ``procs`` client
    processes (each its own asyncio loop and httpx pool), all starting at the same moment: one
    process's event loop serialises every client's request and response handling, which can
    itself make the tail that is measured."""
    procs = max(1, min(procs, clients))
    if procs == 1:
        latencies, errors, elapsed = asyncio.run(_clients(base, 0, clients, time.monotonic(), duration, histories, k))
    else:
        global _HISTORIES
        _HISTORIES = histories
        share = [clients // procs + (i < clients % procs) for i in range(procs)]
        firsts = [sum(share[:i]) for i in range(procs)]
        start_at = time.monotonic() + 1.0  # every process is up and connected by then
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            parts = pool.starmap(_client_proc, [(base, f, n, start_at, duration, k) for f, n in zip(firsts, share)])
        latencies = [x for lat, _, _ in parts for x in lat]
        errors = {}
        for _, errs, _ in parts:
            for key, n in errs.items():
                errors[key] = errors.get(key, 0) + n
        elapsed = max(e for _, _, e in parts)
    lat = np.asarray(latencies) * 1e3
    q = (lambda p: float(np.percentile(lat, p))) if len(lat) else (lambda p: float("nan"))
    return {"clients": clients, "client_procs": procs, "seconds": round(elapsed, 2), "requests": len(latencies),
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
    result["server_histogram"] = server_histogram(before, after)
    return result


def server_histogram(before: dict, after: dict) -> dict:
    """What the server's own histogram (itemgen_request_seconds, /v1/recommend) counted between
    two scrapes: per bucket bound the requests at or under it, and the bucket bounds that hold
    the median and the 99th percentile (upper bounds: the histogram has no finer resolution)."""
    bounds = sorted((k[3:] for k in after if k.startswith("le:")), key=lambda b: float(b))
    cum = {b: after[f"le:{b}"] - before.get(f"le:{b}", 0.0) for b in bounds}
    total = cum.get("+Inf", 0.0)
    quant = lambda q: next((b for b in bounds if total and cum[b] >= q * total), None)
    return {"requests": total, "p50_le_s": quant(0.5), "p99_le_s": quant(0.99),
            "share_le_0.25s": cum.get("0.25", 0.0) / total if total else None,
            "share_le_0.5s": cum.get("0.5", 0.0) / total if total else None, "cumulative": cum}


def run_level(server: Server, clients: int, duration: float, histories, k: int, procs: int = 1) -> dict:
    before = server.metrics()
    r = load(server.base, clients, duration, histories, k, procs)
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
            load(srv.base, 8, args.warmup, histories, args.k)
        for c in levels:
            runs: dict[int, list[dict]] = {t: [] for t in candidates}
            for i in range(args.compare_rounds):
                order = candidates[i % len(candidates):] + candidates[:i % len(candidates)]
                for t in order:
                    runs[t].append(run_level(servers[t], c, args.compare_duration, histories, args.k, args.client_procs))
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
    ap.add_argument("--client-procs", type=int, default=1,
                    help="load-client processes the clients of a level are spread over (each its own event loop)")
    ap.add_argument("--levels-only", action="store_true",
                    help="one server at its defaults, the levels only (--repeats each; with --compare-procs, "
                         "1 client process against --client-procs at the top level); the run is APPENDED to "
                         "--out under client_procs_runs, the file's other keys kept")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per level with --levels-only (medians)")
    ap.add_argument("--compare-procs", action="store_true",
                    help="with --levels-only: at the top level, alternate 1 client process and --client-procs")
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
    if args.levels_only:
        return levels_only(args, cfg, ds, histories, levels, logs)
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
        load(on.base, 8, args.warmup, histories, args.k)
        load(off.base, 8, args.warmup / 2, histories, args.k)
        rss_before = rss_mb(on.proc.pid)
        results = []
        for c in levels:
            r = run_level(on, c, args.duration, histories, args.k, args.client_procs)
            results.append(r)
            print(json.dumps(r), flush=True)
        rss_after = rss_mb(on.proc.pid)
        rounds = []
        for i in range(args.ratio_rounds):
            b = run_level(on, args.ratio_clients, args.ratio_duration, histories, args.k, args.client_procs)
            u = run_level(off, args.ratio_clients, args.ratio_duration, histories, args.k, args.client_procs)
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


SUMMARY_KEYS = ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "mean_batch_size", "mean_forward_ms")


def median_row(rs: list[dict]) -> dict:
    """Medians over rounds of one level (errors summed), each round's figures kept."""
    return {"clients": rs[0]["clients"], "client_procs": rs[0]["client_procs"],
            "requests": sum(r["requests"] for r in rs), "errors": sum(r["errors"] for r in rs),
            **{key: statistics.median(r[key] for r in rs) for key in SUMMARY_KEYS},
            "p99_over_p50": statistics.median(r["p99_ms"] / r["p50_ms"] for r in rs),
            "server_p99_le_s": [r["server_histogram"]["p99_le_s"] for r in rs],
            "server_share_le_0.5s": [r["server_histogram"]["share_le_0.5s"] for r in rs], "rounds": rs}


def levels_only(args, cfg, ds, histories, levels: list[int], logs: Path) -> None:
    """The levels on one server at its defaults, ``--repeats`` rounds each (medians), clients in
    ``--client-procs`` processes; appended to --out (client_procs_runs) and docs (PROCS block)."""
    srv = Server(args.checkpoint, args.threads, [], Path(f"{logs}.levels.log"))
    try:
        ready = srv.wait_ready()
        print(f"serving {ready['model']}: {ready['items']} items; {len(histories)} test histories", flush=True)
        load(srv.base, 8, args.warmup, histories, args.k, args.client_procs)
        rss_before = rss_mb(srv.proc.pid)
        rows = []
        for c in levels:
            rs = [run_level(srv, c, args.duration, histories, args.k, args.client_procs) for _ in range(args.repeats)]
            rows.append(median_row(rs))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}), flush=True)
        rss_after = rss_mb(srv.proc.pid)
        procs_cmp = None
        if args.compare_procs and args.client_procs > 1:
            top, by = max(levels), {1: [], args.client_procs: []}
            for i in range(args.repeats):
                for p in ((1, args.client_procs) if i % 2 == 0 else (args.client_procs, 1)):
                    by[p].append(run_level(srv, top, args.duration, histories, args.k, p))
            procs_cmp = [median_row(rs) for rs in by.values()]
            for r in procs_cmp:
                print("procs", json.dumps({k: v for k, v in r.items() if k != "rounds"}), flush=True)
    finally:
        code = srv.stop()
    by_c = {r["clients"]: r for r in rows}
    top = max(levels)
    growth = rss_after / rss_before - 1
    errors = sum(r["errors"] for r in rows)
    run = {**run_info(), "mode": "levels_only", "server": ready, "server_args": "defaults (none given)",
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "doc")},
           "levels": rows, "procs_comparison": procs_cmp,
           "rss_mb": {"before_levels": rss_before, "after_levels": rss_after, "growth": growth},
           "targets": {"zero_errors": {"value": errors, "met": errors == 0},
                       f"p99_over_p50_at_{top}": {"value": by_c[top]["p99_over_p50"], "target": 4.0,
                                                  "met": by_c[top]["p99_over_p50"] <= 4.0},
                       "memory_growth": {"value": growth, "target": 0.10, "met": growth < 0.10}},
           "server_exit_code": code}
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"benchmark": "serve_load"}
    report.setdefault("client_procs_runs", []).append(run)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    write_procs_doc(Path(args.doc), run, cfg, ds)
    print(f"wrote {out} (client_procs_runs) and {args.doc}")


PROCS_BEGIN, PROCS_END = "<!-- serve_load_procs:begin -->", "<!-- serve_load_procs:end -->"


def write_procs_doc(path: Path, run: dict, cfg, ds) -> None:
    st = run["settings"]
    fmt = lambda r: (f"| {r['clients']} | {r['client_procs']} | {r['requests']} | {r['errors']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_over_p50']:.2f} | "
                     f"{r['mean_batch_size']:.1f} | {', '.join(str(x) for x in r['server_p99_le_s'])} | "
                     f"{', '.join(f'{x:.3f}' for x in r['server_share_le_0.5s'])} |")
    head = ("| clients | client procs | requests | errors | req/s | p50 ms | p99 ms | p99/p50 | mean batch | "
            "server p99 bucket (s), per round | server share <= 0.5 s, per round |")
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    lines = [f"Measured {run['date']} on {run['hardware']['cores']} shared CPU cores, commit "
             f"{str(run['git_commit'])[:10]}: {cfg.model}, {run['server']['items']} items ({ds.name}), the server's "
             f"default settings, clients in {st['client_procs']} processes, medians of {st['repeats']} rounds of "
             f"{st['duration']:.0f} s per level. Command: `{run['command']}`", "", head, rule]
    lines += [fmt(r) for r in run["levels"]]
    if run["procs_comparison"]:
        lines += ["", f"Client processes at {max(r['clients'] for r in run['levels'])} clients, alternating rounds "
                      "on the same server:", "", head, rule]
        lines += [fmt(r) for r in run["procs_comparison"]]
    t, m = run["targets"], run["rss_mb"]
    key = next(k for k in t if k.startswith("p99_over_p50"))
    lines += ["", f"Server RSS {m['before_levels']:.0f} MB before the levels, {m['after_levels']:.0f} MB after "
                  f"({m['growth'] * 100:+.1f}%). Errors: {t['zero_errors']['value']}. "
                  f"p99 <= 4x p50 at {key.rsplit('_', 1)[1]} clients: {t[key]['value']:.2f}x, "
                  f"{'met' if t[key]['met'] else '**not met**'}."]
    text = path.read_text()
    if PROCS_BEGIN not in text:
        text = text.replace(END, f"{END}\n\n{PROCS_BEGIN}\n{PROCS_END}", 1)
    head_, rest = text.split(PROCS_BEGIN, 1)
    atomic_write_text(path, f"{head_}{PROCS_BEGIN}\n" + "\n".join(lines) + f"\n{PROCS_END}" + rest.split(PROCS_END, 1)[1])


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
