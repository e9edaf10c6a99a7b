"""The HTTP server: every route, every bad input, auth on and off, the fast paths against their
slow references (cached prompt prefix, sessions, micro-batching), and the real server process
over loopback with a graceful shutdown."""

import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from itemgen.api import Predictor
from itemgen.core.config import from_dict
from itemgen.data.synthetic import make_dataset
from itemgen.models.registry import build_model
from itemgen.serving.batching import MicroBatcher
from itemgen.serving.engine import Engine, Query
from itemgen.serving.server import ServeSettings, create_app, read_api_key
from itemgen.serving.sessions import SessionStore
from itemgen.training.loop import train

RULE = dict(n_users=600, n_items=40, min_len=4, max_len=8, noise=0.0, seed=1)
KEY = "s3cret-key"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared, busy CPU, spinning OpenMP threads make tiny models many
    times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return make_dataset(**RULE)


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory):
    """A tiny ItemLM checkpoint from the real training loop (a few steps: the server's answers
    are checked against the Predictor's slow path, not against the rule)."""
    out = tmp_path_factory.mktemp("itemlm")
    cfg = from_dict({"model": "itemlm", "data": {"path": "synthetic-inline", "max_history": 10},
                     "itemlm": {"backbone": "tiny", "prompt": "compact", "item_dim": 32, "id_only_share": 0.5},
                     "train": {"out": str(out), "lr": 1e-2, "batch_size": 32, "max_steps": 20, "eval_every": 20,
                               "eval_users": 50, "warmup_steps": 2, "progress": False, "patience": 100}})
    return train(cfg, dataset=data).best


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor.load(ckpt)


def untrained(data, model: str, prompt: str = "default", max_history: int = 5) -> Predictor:
    """Random weights are enough for parity checks; a short window makes sessions slide."""
    cfg = from_dict({"model": model, "data": {"path": "x", "max_history": max_history},
                     "itemlm": {"backbone": "tiny", "prompt": prompt, "item_dim": 16},
                     "sasrec": {"hidden": 16, "dropout": 0.0}})
    torch.manual_seed(0)
    return Predictor(build_model(cfg, data.items).eval(), cfg, data.items, Path("untrained"))


def ids(data, hist):
    return [data.items.ids[i] for i in hist]


@pytest.fixture(scope="module")
def client(predictor, ckpt):
    app = create_app(ServeSettings(checkpoint=str(ckpt), max_history=12, max_k=30, max_batch_request=4,
                                   max_body_bytes=4096), predictor=predictor, api_key="")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def error_of(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


# ---- fast paths against their references --------------------------------------------------
@pytest.mark.parametrize("prompt", ["compact", "default"])
def test_prefix_cache_matches_full_prompt(data, prompt):
    model = untrained(data, "itemlm", prompt).model
    hist = [np.asarray(e.history[-5:]) for e in data.split.test[:12]]  # lengths differ: padding
    with torch.inference_mode():
        full = model.encode(model.query_batch(hist))  # (B, H)
        prefix = model.prefix_cache()
        cached = model.encode_cached(hist, prefix)
        again = model.encode_cached(hist[:3], prefix)  # the prefix cache is reused, not consumed
        packs = model.encode_cached(hist, prefix, pack_tokens=20)  # several forward passes
        top_cached = model.score_items(cached).argsort(1, descending=True)[:, :5]
        top_full = model.score_items(full).argsort(1, descending=True)[:, :5]
    assert prefix.get_seq_length() == len(model.prompts.prefix) > 0
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, full[:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packs, full, atol=1e-5, rtol=1e-4)
    assert torch.equal(top_cached, top_full)


@pytest.mark.parametrize("model_name", ["itemlm", "sasrec"])
def test_session_path_equals_full_recompute(data, model_name):
    pred = untrained(data, model_name, "default", max_history=5)
    engine = Engine(pred)
    assert engine.incremental == (model_name == "itemlm")
    store = SessionStore(max_sessions=4, ttl_s=60, max_events=7)  # keeps 7 events, the model sees 5
    events = [int(x) for x in np.random.default_rng(3).integers(0, 40, size=12)]
    for n, item in enumerate(events, 1):
        store.add("u", item)
        s = store.get("u")
        items, dropped = store.snapshot(s)
        assert items == events[max(0, n - 7):n] and dropped == max(0, n - 7)
        if n in (3, 6, 9):  # sometimes several events arrive between two recommendations
            continue
        if engine.incremental:
            got = engine.run_session(s, items, dropped, k=10, exclude_history=True, decode="exact")
            assert s.cache.get_seq_length() < len(pred.model.query_batch([items[-5:]])["tokens"][0])
        else:
            got = engine.run_batch([Query(np.asarray(items), 10, True, "exact")])[0]
        ref_scores, ref_ids = pred.topk_indices([np.asarray(items)], k=10, exclude_history=True)
        assert list(got.ids) == list(ref_ids[0]), n
        np.testing.assert_allclose(got.scores, ref_scores[0], atol=1e-4, rtol=1e-4)
        assert not set(got.ids) & set(items)
    if engine.incremental:  # a stale, longer cache (requests answered out of order) is rebuilt
        s = store.get("u")
        items, dropped = store.snapshot(s)
        got = engine.run_session(s, items[:-2], dropped, k=5, exclude_history=False, decode="exact")
        ref_scores, ref_ids = pred.topk_indices([np.asarray(items[:-2])], k=5, exclude_history=False)
        assert list(got.ids) == list(ref_ids[0])


def test_micro_batched_rows_equal_unbatched(data, predictor):
    engine = Engine(predictor)
    rows = [Query(np.asarray(e.history), k, excl, "exact")
            for e, k, excl in zip(data.split.test[:9], [1, 5, 10] * 3, [True, False, False] * 3)]
    batched = engine.run_batch(rows)
    for row, b in zip(rows, batched):
        (single,) = engine.run_batch([row])
        assert list(b.ids) == list(single.ids) and len(b.ids) == row.k
        np.testing.assert_allclose(b.scores, single.scores, atol=1e-5, rtol=1e-5)


def test_session_store_lru_and_ttl():
    now = [100.0]
    store = SessionStore(max_sessions=2, ttl_s=10, max_events=3, clock=lambda: now[0])
    store.add("a", 1)
    store.add("b", 2)
    store.get("a")  # a is now the most recently used
    store.add("c", 3)  # evicts b
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    for x in (4, 5, 6):
        store.add("a", x)
    assert store.snapshot(store.get("a")) == ([4, 5, 6], 1)
    now[0] += 6
    assert store.get("a") is not None  # touched at 106
    now[0] += 5  # c idled 11 s: past the TTL; a only 5 s
    assert store.get("c") is None and store.get("a") is not None
    assert store.delete("a") and not store.delete("a") and len(store) == 0
    with pytest.raises(ValueError, match="max_sessions"):
        SessionStore(max_sessions=0)


def test_micro_batcher_batches_runs_exclusive_calls_and_delivers_errors():
    sizes = []

    def run(payloads):
        sizes.append(len(payloads))
        return [ValueError(f"bad {p}") if p == 7 else p * 10 for p in payloads]

    async def main():
        b = MicroBatcher(run, window_s=0.05, max_batch=4)
        b.start()
        jobs = [asyncio.ensure_future(b.submit(i)) for i in range(10)]
        done = await asyncio.gather(*jobs, return_exceptions=True)
        alone = await b.call(lambda x: x + 1, 41)
        with pytest.raises(ZeroDivisionError):
            await b.call(lambda: 1 / 0)
        b.stop()
        with pytest.raises(RuntimeError, match="not running"):
            await b.submit(1)
        return done, alone

    done, alone = asyncio.run(main())
    assert sizes == [4, 4, 2] and alone == 42
    assert [d for i, d in enumerate(done) if i != 7] == [i * 10 for i in range(10) if i != 7]
    assert isinstance(done[7], ValueError)
    with pytest.raises(ValueError, match="max batch"):
        MicroBatcher(run, max_batch=0)


# ---- routes ------------------------------------------------------------------------------
def test_recommend_matches_the_predictor(client, data, predictor):
    hist = ids(data, data.split.test[0].history)
    r = client.post("/v1/recommend", json={"history": hist, "k": 5, "exclude_history": False})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = predictor.recommend([hist], k=5, exclude_history=False)[0]  # the slow path, no prefix cache
    assert [x["id"] for x in body["items"]] == [x["id"] for x in ref]
    np.testing.assert_allclose([x["score"] for x in body["items"]], [x["score"] for x in ref], atol=1e-5)
    assert [x["title"] for x in body["items"]] == [data.items.fields["title"][data.items.index[x["id"]]]
                                                   for x in body["items"]]
    assert all(a["score"] >= b["score"] for a, b in zip(body["items"], body["items"][1:]))
    assert body["latency_ms"] > 0 and "itemlm/tiny" in body["model"]
    excl = client.post("/v1/recommend", json={"history": hist, "k": 30}).json()["items"]
    assert len(excl) == 30 and not {x["id"] for x in excl} & set(hist)  # exclude_history defaults on


def test_batch_route_equals_single_requests(client, data):
    hists = [ids(data, e.history) for e in data.split.test[:4]]
    r = client.post("/v1/recommend/batch", json={"histories": hists, "k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for h, res in zip(hists, results):
        single = client.post("/v1/recommend", json={"history": h, "k": 3}).json()["items"]
        assert [x["id"] for x in res["items"]] == [x["id"] for x in single]


def test_items_health_ready_metrics_openapi(client, data):
    r = client.get(f"/v1/items/{data.items.ids[3]}")
    assert r.json() == {"id": data.items.ids[3], "title": data.items.fields["title"][3]}
    assert "unknown item id: NOPE" in error_of(client.get("/v1/items/NOPE"), 404)["error"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.post("/v1/recommend", json={"history": ids(data, [1])}).status_code == 200
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["items"] == 40 and ready["prefix_cache"] is True
    assert ready["sessions"] == "incremental"
    client.post("/v1/recommend", json={"history": ["NOPE"]})
    text = client.get("/metrics").text
    assert 'itemgen_requests_total{method="POST",route="/v1/recommend",status="200"}' in text
    assert 'itemgen_requests_total{method="POST",route="/v1/recommend",status="422"}' in text
    assert 'route="/v1/items/{item_id:path}",status="404"' in text  # templates, never raw ids
    assert "itemgen_batch_size_count" in text and "itemgen_forward_seconds_bucket" in text
    assert "itemgen_request_seconds_bucket" in text and "itemgen_sessions" in text
    schema = client.get("/openapi.json").json()
    assert {"RecommendRequest", "RecommendResponse", "BatchRequest", "ErrorResponse"} <= set(schema["components"]["schemas"])
    assert "/v1/sessions/{sid}/recommend" in schema["paths"]


def test_session_routes(client, data):
    hist = ids(data, data.split.test[1].history)
    for n, item in enumerate(hist, 1):
        r = client.post("/v1/sessions/user-1/events", json={"item": item})
        assert r.json() == {"session": "user-1", "length": n}
        got = client.get("/v1/sessions/user-1/recommend", params={"k": 5}).json()["items"]
        ref = client.post("/v1/recommend", json={"history": hist[:n], "k": 5}).json()["items"]
        assert [x["id"] for x in got] == [x["id"] for x in ref]
        np.testing.assert_allclose([x["score"] for x in got], [x["score"] for x in ref], atol=1e-4)
    assert client.delete("/v1/sessions/user-1").status_code == 204
    assert "no session user-1" in error_of(client.get("/v1/sessions/user-1/recommend"), 404)["error"]
    error_of(client.delete("/v1/sessions/user-1"), 404)


def test_unknown_items_are_listed_or_dropped(client, data):
    hist = ids(data, data.split.test[0].history)
    body = error_of(client.post("/v1/recommend", json={"history": hist + ["NOPE", "ALSO", "NOPE"]}), 422)
    assert body["unknown_items"] == ["NOPE", "ALSO"] and "unknown item ids: NOPE, ALSO" in body["error"]
    ok = client.post("/v1/recommend", json={"history": hist + ["NOPE"], "unknown_items": "ignore"})
    assert ok.json()["items"] == client.post("/v1/recommend", json={"history": hist}).json()["items"]
    body = error_of(client.post("/v1/recommend", json={"history": ["NOPE"], "unknown_items": "ignore"}), 422)
    assert "no known item ids" in body["error"]
    body = error_of(client.post("/v1/recommend/batch", json={"histories": [hist, ["X1"]]}), 422)
    assert body["unknown_items"] == ["X1"]
    assert "unknown item ids: ZZ" in error_of(client.post("/v1/sessions/s/events", json={"item": "ZZ"}), 422)["error"]


BAD = [  # (method, path, body or raw bytes, status, words the message must contain)
    ("post", "/v1/recommend", {"history": []}, 422, "history: List should have at least 1 item"),
    ("post", "/v1/recommend", {"history": ["I00001"], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("post", "/v1/recommend", {"history": ["I00001"], "k": 31}, 422, "k must be between 1 and 30"),
    ("post", "/v1/recommend", {"history": ["I00001"] * 13}, 422, "history has 13 items; this server accepts at most 12"),
    ("post", "/v1/recommend", {"history": "I00001"}, 422, "history: Input should be a valid list"),
    ("post", "/v1/recommend", {"history": [1, 2]}, 422, "history.0: Input should be a valid string"),
    ("post", "/v1/recommend", {"history": ["I00001"], "k": "5"}, 422, "k: Input should be a valid integer"),
    ("post", "/v1/recommend", {"history": ["I00001"], "k": 2.5}, 422, "k: Input should be a valid integer"),
    ("post", "/v1/recommend", {"history": ["I00001"], "histroy": []}, 422, "histroy: Extra inputs are not permitted"),
    ("post", "/v1/recommend", {"history": ["I00001"], "unknown_items": "skip"}, 422, "unknown_items: Input should be"),
    ("post", "/v1/recommend", {"history": ["I00001"], "decode": "ann"}, 422, "decode='ann' is not available"),
    ("post", "/v1/recommend", {"history": ["I00001"], "decode": "nope"}, 422, "decoder 'nope' is not available"),
    ("get", "/v1/sessions/u/recommend?decode=nope", None, 404, "no session u"),
    ("post", "/v1/recommend", {"history": ["I00001"], "decode": "../etc"}, 422, "decode: String should match"),
    ("post", "/v1/recommend", b"{not json", 422, "request body is not valid JSON"),
    ("post", "/v1/recommend", b"history=I00001", 422, "request body must be a JSON object"),
    ("post", "/v1/recommend", None, 422, "Field required"),
    ("post", "/v1/recommend", {"history": ["x" * 300]}, 422, "at most 256 characters"),
    ("post", "/v1/recommend", {"history": ["I00001"] * 2000}, 413, "over the limit of 4096 bytes"),
    ("post", "/v1/recommend/batch", {"histories": [["I00001"]] * 5}, 422, "5 histories in one request; this server accepts at most 4"),
    ("post", "/v1/recommend/batch", {"histories": [["I00001"], []]}, 422, "history 1 is empty"),
    ("get", "/v1/sessions/u/recommend?k=abc", None, 422, "k: Input should be a valid integer"),
    ("get", "/v1/sessions/bad%20id!/recommend", None, 422, "sid: String should match pattern"),
    ("post", "/v1/sessions/u/events", {"item": 5}, 422, "item: Input should be a valid string"),
    ("get", "/v1/nothing", None, 404, "no route /v1/nothing"),
    ("get", "/v1/recommend", None, 405, "method GET is not allowed"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD, ids=[f"{b[1]}-{b[4][:30]}" for b in BAD])
def test_bad_input_is_a_clear_4xx(client, method, path, body, status, words):
    kw = {"json": body} if body is not None else {}
    if isinstance(body, bytes):
        ctype = "application/json" if body.startswith(b"{") else "application/x-www-form-urlencoded"
        kw = {"content": body, "headers": {"content-type": ctype}}
    r = client.request(method.upper(), path, **kw)
    assert words in error_of(r, status)["error"]
    assert "/tmp" not in r.text and "pytest" not in r.text  # no server paths


def test_chunked_oversized_body_is_413(client):
    def chunks():  # no Content-Length: the guard must count what arrives
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert "over the limit" in error_of(r, 413)["error"]


def test_internal_errors_do_not_leak(client, data, monkeypatch):
    engine = client.app.state.itemgen.engine

    def boom(rows):
        raise RuntimeError("secret internals /home/model.py")

    monkeypatch.setattr(engine, "run_batch", boom)
    r = client.post("/v1/recommend", json={"history": ids(data, [1, 2])})
    assert error_of(r, 500) == {"error": "internal server error"} and "secret" not in r.text
    monkeypatch.undo()
    assert client.post("/v1/recommend", json={"history": ids(data, [1, 2])}).status_code == 200  # still serving


def test_overload_is_shed_with_503(client, data, monkeypatch):
    state = client.app.state.itemgen
    monkeypatch.setattr(state.batcher, "pending", lambda: 5000)  # as if 5000 histories were queued
    r = client.post("/v1/recommend", json={"history": ids(data, [1, 2])})
    assert "server overloaded" in error_of(r, 503)["error"] and r.headers["retry-after"] == "1"
    monkeypatch.undo()
    assert client.post("/v1/recommend", json={"history": ids(data, [1, 2])}).status_code == 200


def test_api_key(predictor, ckpt, data, tmp_path, monkeypatch):
    app = create_app(ServeSettings(checkpoint=str(ckpt)), predictor=predictor, api_key=KEY)
    body = {"history": ids(data, [1, 2]), "k": 2}
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        for path in ("/readyz", "/metrics", "/openapi.json", f"/v1/items/{data.items.ids[0]}"):
            assert "missing or invalid API key" in error_of(c.get(path), 401)["error"]
        error_of(c.post("/v1/recommend", json=body), 401)
        error_of(c.post("/v1/recommend", json=body, headers={"X-API-Key": KEY + "x"}), 401)
        error_of(c.post("/v1/recommend", json=body, headers={"Authorization": f"Basic {KEY}"}), 401)
        assert c.post("/v1/recommend", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.post("/v1/recommend", json=body, headers={"X-API-Key": KEY}).status_code == 200
        assert 'status="401"' in c.get("/metrics", headers={"X-API-Key": KEY}).text
    monkeypatch.setenv("ITEMGEN_API_KEY", "from-env")
    assert read_api_key(None) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert read_api_key(str(tmp_path / "key")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_api_key(str(tmp_path / "missing"))
    monkeypatch.delenv("ITEMGEN_API_KEY")
    assert read_api_key(None) is None


def test_sessions_off_with_several_workers_and_unavailable_session_decoder(predictor, ckpt, data, client):
    app = create_app(ServeSettings(checkpoint=str(ckpt), sessions_enabled=False), predictor=predictor, api_key="")
    with TestClient(app) as c:
        body = error_of(c.post("/v1/sessions/a/events", json={"item": data.items.ids[0]}), 501)
        assert "--workers 1" in body["error"]
        assert c.post("/v1/recommend", json={"history": ids(data, [1])}).status_code == 200
    client.post("/v1/sessions/dec/events", json={"item": data.items.ids[0]})
    body = error_of(client.get("/v1/sessions/dec/recommend", params={"decode": "nope"}), 422)
    assert "decoder 'nope' is not available" in body["error"]
    assert client.get("/v1/sessions/dec/recommend").status_code == 200  # the session still works


def test_concurrent_requests_are_micro_batched_and_equal_unbatched(predictor, ckpt, data):
    hists = [ids(data, e.history) for e in data.split.test[:24]]

    async def serve_all(settings):
        app = create_app(settings, predictor=predictor, api_key="")
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                rs = await asyncio.gather(*[c.post("/v1/recommend", json={"history": h, "k": 5}) for h in hists])
                metrics = (await c.get("/metrics")).text
        return [r.json()["items"] for r in rs], metrics

    batched, m1 = asyncio.run(serve_all(ServeSettings(str(ckpt), batch_window_ms=50, max_batch=16)))
    single, m2 = asyncio.run(serve_all(ServeSettings(str(ckpt), max_batch=1)))
    count = lambda text: float(next(l for l in text.splitlines() if l.startswith("itemgen_batch_size_count")).split()[1])
    assert count(m2) == len(hists) and count(m1) < len(hists) / 2  # batches formed
    for b, s in zip(batched, single):
        assert [x["id"] for x in b] == [x["id"] for x in s]
        np.testing.assert_allclose([x["score"] for x in b], [x["score"] for x in s], atol=1e-5)


def test_worker_processes_build_their_app_from_the_environment(ckpt, data, monkeypatch):
    """--workers N: each uvicorn worker process calls app_from_env (sessions off, metrics per process)."""
    from itemgen.serving.server import SETTINGS_ENV, app_from_env, settings_env

    monkeypatch.setenv(SETTINGS_ENV, settings_env(ServeSettings(str(ckpt), max_batch=4, sessions_enabled=False)))
    monkeypatch.delenv("ITEMGEN_API_KEY", raising=False)
    with TestClient(app_from_env()) as c:
        assert c.get("/readyz").json()["max_batch"] == 4
        assert c.post("/v1/recommend", json={"history": ids(data, [1, 2])}).status_code == 200
        assert c.post("/v1/sessions/a/events", json={"item": data.items.ids[0]}).status_code == 501
    from uvicorn.importer import import_from_string

    from itemgen.cli.serve import APP_FACTORY

    assert import_from_string(APP_FACTORY) is app_from_env  # the string `itemgen serve --workers N` hands uvicorn


def test_cli_rejects_bad_arguments(tmp_path, ckpt):
    from typer.testing import CliRunner

    from itemgen.cli import app

    r = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert r.exit_code == 2 and "not an itemgen checkpoint" in r.output
    (tmp_path / "k").write_text("")
    r = CliRunner().invoke(app, ["serve", str(ckpt), "--api-key-file", str(tmp_path / "k")])
    assert r.exit_code == 2 and "is empty" in r.output


# ---- the real server --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_over_loopback_and_graceful_shutdown(ckpt, data, predictor, tmp_path):
    port = free_port()
    (tmp_path / "key").write_text(KEY)
    env = {k: v for k, v in os.environ.items() if k != "ITEMGEN_API_KEY"}
    # a long batch window holds each request for ~1 s: long enough to shut down mid-request
    proc = subprocess.Popen([sys.executable, "-m", "itemgen.cli", "serve", str(ckpt), "--port", str(port),
                             "--api-key-file", str(tmp_path / "key"), "--batch-window-ms", "1500",
                             "--max-batch", "64", "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{base}/readyz", headers=auth, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.3)
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 401
        body = {"history": ids(data, data.split.test[2].history), "k": 3, "exclude_history": False}
        want = [x["id"] for x in predictor.recommend([body["history"]], k=3, exclude_history=False)[0]]
        r = httpx.post(f"{base}/v1/recommend", json=body, headers=auth, timeout=30)
        assert r.status_code == 200 and [x["id"] for x in r.json()["items"]] == want
        assert "server" not in r.headers  # no version banner
        # shut down while a request is in flight: it must still be answered
        box = {}
        t = threading.Thread(target=lambda: box.update(r=httpx.post(f"{base}/v1/recommend", json=body,
                                                                     headers=auth, timeout=30)))
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert box["r"].status_code == 200 and [x["id"] for x in box["r"].json()["items"]] == want
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---- hostile input: metric labels, aborted bodies, parse errors, slow clients, bad checkpoints ----
def series(text: str, name: str = "itemgen_requests_total") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_metric_labels_are_bounded_whatever_clients_send(client):
    before = len(series(client.get("/metrics").text))
    for i in range(60):  # invented methods and paths: each would be a new series if labels copied them
        client.request(f"FOO{i}", f"/v1/recommend/{i}")
        client.get(f"/nothing/{i}")
        client.request(f"BAR{i}", "/healthz")
    text = client.get("/metrics").text
    rows = series(text)
    assert len(rows) - before <= 4, rows  # a few new (route, method, status) combinations, not 180
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', row)) for row in rows]
    methods, routes = {x["method"] for x in labels}, {x["route"] for x in labels}
    assert methods <= {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other"}
    assert "other" in methods and "other" in routes
    assert routes <= {r.path for r in client.app.routes} | {"other"}  # templates, never what the client sent
    assert 'method="other",route="/healthz",status="405"' in text


def test_a_client_gone_mid_body_is_a_client_abort_not_a_500(client, data):
    app = client.app  # the app of the running test client (its lifespan has started)
    sent = []
    errors_before = [x for x in series(client.get("/metrics").text) if 'status="500"' in x]

    async def call():
        messages = iter([{"type": "http.request", "body": b'{"history": ["', "more_body": True},
                         {"type": "http.disconnect"}])

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/recommend", "raw_path": b"/v1/recommend", "root_path": "",
                 "query_string": b"", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)

    asyncio.run(call())
    assert sent == []  # nothing was answered: nobody was there to read it
    text = client.get("/metrics").text
    # the route's template, though the router never saw the request (issue 22, defect 13)
    assert 'method="POST",route="/v1/recommend",status="client_abort"' in text
    assert [x for x in series(text) if 'status="500"' in x] == errors_before


@pytest.mark.parametrize("body, words", [
    (b'{"history": ["\xff\xfe"]}', "request body is not valid UTF-8 (byte 14)"),
    (b"[" * 2000 + b"]" * 2000, "nests arrays/objects 2000 levels deep; at most 32"),  # past json's recursion limit
    (b'{"history": ' + b"[" * 40 + b"]" * 40 + b"}", "41 levels deep"),
])
def test_parse_errors_are_a_422_naming_the_problem(client, body, words):
    r = client.post("/v1/recommend", content=body, headers={"content-type": "application/json"})
    assert words in error_of(r, 422)["error"]


def test_deep_brackets_inside_strings_are_not_nesting(client, data):
    hist = ids(data, data.split.test[0].history)
    body = {"history": hist + ["[" * 50 + "{" * 50], "unknown_items": "ignore"}
    assert client.post("/v1/recommend", json=body).status_code == 200


@pytest.fixture()
def live_server(predictor, ckpt):
    """The app on a real uvicorn server (the protocol `itemgen serve` uses, a 1 s client
    timeout) in a thread of this process, on 127.0.0.1."""
    import uvicorn

    from itemgen.serving.http import protocol

    app = create_app(ServeSettings(checkpoint=str(ckpt), max_body_bytes=4096), predictor=predictor, api_key="")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=protocol(1.0), lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(30)


def read_until_closed(sock, limit_s: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection -> (bytes, seconds it took)."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return b"".join(chunks), math.inf
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - t0


def test_slow_clients_are_closed_while_others_are_served(live_server, data):
    port = live_server
    body = {"history": ids(data, [1, 2]), "k": 2}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as slow, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as trickle:
        slow.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Ty")  # a head cut short, then nothing
        t0 = time.monotonic()
        for _ in range(3):  # meanwhile other clients are served
            r = httpx.post(f"http://127.0.0.1:{port}/v1/recommend", json=body, timeout=10)
            assert r.status_code == 200
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(4):  # a byte now and then does not keep a head open past the deadline
            time.sleep(0.3)
            try:
                trickle.sendall(b"X")
            except OSError:
                break
        got, _ = read_until_closed(slow, 10)
        slow_s = time.monotonic() - t0
        assert b" 408 " in got.split(b"\r\n")[0] and b'"error": "request head not complete within 1 s"' in got
        assert slow_s < 3, slow_s  # the deadline is 1 s
        assert b" 408 " in read_until_closed(trickle, 10)[0]
        assert read_until_closed(idle, 10) == (b"", pytest.approx(0, abs=3))  # silent connections just close
    # a body that stops coming: closed after the timeout, counted as the client's abort
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"history\": [")
        got, took = read_until_closed(s, 10)
        assert took < 3 and got == b""
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'method="POST",route="/v1/recommend",status="client_abort"} 1.0' in metrics
    assert 'status="500"' not in metrics


def test_malformed_http_is_answered_in_json(live_server):
    for raw, status in ((b"GARBAGE\r\n\r\n", 400), (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
                        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000, 431)):  # a head past h11's 16 KiB
        with socket.create_connection(("127.0.0.1", live_server), timeout=5) as s:
            s.sendall(raw)
            got, took = read_until_closed(s, 10)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), got[:200]
        assert b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"].startswith("malformed HTTP request: ")


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model.safetensors").unlink(), "missing model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
     "model.safetensors is corrupt"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     "model.safetensors is corrupt"),
    (lambda d: (d / "items.json").write_text("{"), "items.json is corrupt"),
])
def test_serve_refuses_a_broken_checkpoint_in_one_line(ckpt, tmp_path, damage, words):
    from typer.testing import CliRunner

    from itemgen.cli import app

    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    damage(broken)
    r = CliRunner().invoke(app, ["serve", str(broken), "--port", str(free_port())])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.output
