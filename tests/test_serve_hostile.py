"""The server against a hostile or careless client (issue 22): bodies shaped to make the body
check slow, clients that leave or trickle, oversized heads, decoders that would build on a
request, corrupt models, API key edge cases. Each test failed before its fix; all are fast
(growth rates from small bodies, deadlines of about a second)."""

import asyncio
import json
import math
import shutil
import socket
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
from itemgen.data.dataset import training_sequences
from itemgen.models.registry import build_model
from itemgen.serving.engine import Engine, ModelOutputError, Query
from itemgen.serving.server import MAX_JSON_DEPTH, ServeSettings, create_app, json_body_problem, read_api_key
from itemgen.topk import l2d
# the tiny trained ItemLM checkpoint and the helpers of the server's main tests (fixtures are
# module-scoped: this module gets its own instances)
from test_serve import ckpt, data, error_of, ids, live_server, predictor  # noqa: F401

@pytest.fixture(scope="module")
def client(predictor, ckpt):
    app = create_app(ServeSettings(checkpoint=str(ckpt), max_body_bytes=2 << 20), predictor=predictor, api_key="")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def best_time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- defect 1: the body check is linear -------------------------------------------------
def escaped_quotes(n: int) -> bytes:
    """The probe's body: 33 '[', a '"', then n copies of '\\"' (a string that never closes)."""
    return b"[" * 33 + b'"' + b'\\"' * n


HOSTILE_SHAPES = {
    "escaped quotes": escaped_quotes,
    "backslash runs": lambda n: b"[" * 33 + b'"' + b"\\" * (2 * n),
    "many short strings": lambda n: b"[" * 33 + b'"a",' * (n // 2),
    "unclosed strings": lambda n: b"[" * 33 + b'"[' * n,
    "brackets": lambda n: b"[" * (2 * n),
    "objects": lambda n: b'{"a":' * (n // 2),
}


@pytest.mark.parametrize("shape", sorted(HOSTILE_SHAPES))
def test_body_check_time_grows_linearly(shape):
    make = HOSTILE_SHAPES[shape]
    small, large = make(4000), make(16000)  # 4x the bytes
    t_small = best_time(lambda: json_body_problem(small))
    t_large = best_time(lambda: json_body_problem(large))
    # quadratic is 16x (the probe's 31 KiB took 4.3 s); linear is 4x plus fixed costs
    assert t_large < 8 * t_small + 0.005, (t_small, t_large)


def test_a_1_mib_body_of_any_shape_is_answered_quickly(client):
    for shape, make in HOSTILE_SHAPES.items():
        body = make(1 << 19)[: 1 << 20]
        t0 = time.perf_counter()
        r = client.post("/v1/recommend", content=body, headers={"content-type": "application/json"})
        took = time.perf_counter() - t0
        error_of(r, 422)
        assert took < 2.0, (shape, took)  # about 0.1 s here; generous for a loaded machine
    t0 = time.perf_counter()
    assert json_body_problem(escaped_quotes(1 << 19)) is not None  # 33 levels: too deep
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("body, depth", [
    (b'{"a": [[1]]}', 3), (b'{"a": "[[[\\"[["}', 1), (b'["\\\\", [[]]]', 3), (b"[" * 40, 40),
    (b'["\\\\\\"[[[[", [[]]]', 3), (b'[[[]], [[[]]]]', 4), (b"", 0),
])
def test_depth_counts_only_brackets_outside_strings(body, depth):
    from itemgen.serving.server import json_depth

    assert json_depth(body) == depth
    deep = b"[" * (MAX_JSON_DEPTH + 1) + body + b"]" * (MAX_JSON_DEPTH + 1)
    assert json_body_problem(deep) is not None


# ---- defect 2: L2D is never built on a request ------------------------------------------
@pytest.fixture()
def ckpt_copy(ckpt, tmp_path):
    out = tmp_path / "served"
    shutil.copytree(ckpt, out)
    return out


def test_l2d_is_never_built_or_written_on_a_request(ckpt_copy, data, monkeypatch):
    predictor = Predictor.load(ckpt_copy)
    app = create_app(ServeSettings(checkpoint=str(ckpt_copy)), predictor=predictor, api_key="")
    with TestClient(app) as c:
        calls = []
        monkeypatch.setattr(l2d, "weights_digest", lambda *a: calls.append("digest") or "x")
        monkeypatch.setattr(l2d, "build_memory", lambda *a, **k: calls.append("build"))
        hist = ids(data, [1, 2, 3])
        for decode in ("l2d_global", "l2d_local"):
            body = error_of(c.post("/v1/recommend", json={"history": hist, "decode": decode}), 422)
            assert "built offline" in body["error"] and str(ckpt_copy) not in body["error"]
            assert "/" not in body["error"].replace("CKPT/l2d/memory.safetensors", "")  # no server path
        # batch-mates with another decoder are answered
        r = c.post("/v1/recommend/batch", json={"histories": [hist, hist], "decode": "l2d_global"})
        error_of(r, 422)
        assert c.post("/v1/recommend", json={"history": hist}).status_code == 200
    assert calls == []  # nothing hashed, nothing built per request
    assert not (ckpt_copy / l2d.MEMORY_DIR).exists()  # nothing written into the checkpoint


def test_l2d_memory_built_offline_is_loaded_at_start(ckpt_copy, data):
    predictor = Predictor.load(ckpt_copy)
    seqs = training_sequences(data, predictor.cfg.data.max_history)
    mem = l2d.build_memory(predictor.model, seqs, max_history=predictor.cfg.data.max_history, per_sequence=1,
                           meta={"weights": l2d.weights_digest(ckpt_copy)})
    mem.save(ckpt_copy / l2d.MEMORY_DIR)
    hist = ids(data, [1, 2, 3])
    app = create_app(ServeSettings(checkpoint=str(ckpt_copy)), predictor=predictor, api_key="")
    with TestClient(app) as c:
        r = c.post("/v1/recommend", json={"history": hist, "k": 5, "decode": "l2d_global"})
        assert r.status_code == 200, r.text
        want = L2DRef(predictor, mem, [1, 2, 3], 5)
        assert [x["id"] for x in r.json()["items"]] == want
    # a memory from other weights is refused at start (the decoder is unavailable), never rebuilt
    meta_mem = l2d.Memory(mem.states, mem.targets, mem.n_items, {"weights": "other"})
    meta_mem.save(ckpt_copy / l2d.MEMORY_DIR)
    stamp = (ckpt_copy / l2d.MEMORY_DIR / l2d.MEMORY_FILE).stat().st_mtime_ns
    with TestClient(create_app(ServeSettings(checkpoint=str(ckpt_copy)), predictor=predictor, api_key="")) as c:
        body = error_of(c.post("/v1/recommend", json={"history": hist, "decode": "l2d_global"}), 422)
        assert "other weights" in body["error"] and str(ckpt_copy) not in body["error"]
    assert (ckpt_copy / l2d.MEMORY_DIR / l2d.MEMORY_FILE).stat().st_mtime_ns == stamp


def L2DRef(predictor, mem, hist, k):
    dec = l2d.L2DTopK(predictor.model, "global", memory=mem)
    h = np.asarray(hist)
    q = predictor.model.encode(predictor.model.to_device(predictor.model.query_batch([h])))
    _, top = dec.topk(q, k, exclude=[h])
    return [predictor.items.ids[i] for i in top[0].tolist()]


def test_one_failing_row_never_fails_its_batch_mates(predictor, monkeypatch):
    engine = Engine(predictor)
    exact = engine.decoder("exact")

    class Flaky:  # fails on any call that includes a row asking for k=7
        def topk(self, query, k, exclude=None, histories=None):
            if k == 7:
                raise RuntimeError("this row's decoder failed")
            return exact.topk(query, k, exclude=exclude, histories=histories)

    monkeypatch.setitem(engine.decoders, "exact", Flaky())
    h = np.asarray([1, 2, 3])
    rows = [Query(h, 5), Query(h, 7), Query(h, 3), Query(h, 5, decode="l2d_global")]
    out = engine.run_batch(rows)
    assert [type(x).__name__ for x in out] == ["Ranked", "RuntimeError", "Ranked", "DecoderUnavailable"]
    assert len(out[0].ids) == 5 and len(out[2].ids) == 3

    def bad_encode(histories):  # the batch's encoder pass fails because of one history
        if any(len(x) == 4 for x in histories):
            raise RuntimeError("this history broke the encoder")
        return Engine.encode(engine, histories)

    monkeypatch.setattr(engine, "encode", bad_encode)
    out = engine.run_batch([Query(h, 5), Query(np.arange(4), 5), Query(h, 2)])
    assert [type(x).__name__ for x in out] == ["Ranked", "RuntimeError", "Ranked"]


# ---- defect 3: work for clients that have gone ------------------------------------------
def test_a_client_that_leaves_cancels_its_queued_work(client, data, monkeypatch):
    app = client.app
    state = app.state.itemgen
    computed = []
    real = state.engine.run_batch
    monkeypatch.setattr(state.engine, "run_batch", lambda rows: computed.extend(rows) or real(rows))
    hists = [ids(data, e.history) for e in data.split.test[:64]]
    body = json.dumps({"histories": hists, "k": 20}).encode()
    sent = []

    async def scenario():
        release = threading.Event()
        blocker = asyncio.ensure_future(state.batcher.call(release.wait, 10))  # the model is busy
        await asyncio.sleep(0.05)
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive():
            m = next(messages, None)
            if m is not None:
                return m
            await asyncio.sleep(0.2)  # the client closes its socket right after sending
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/recommend/batch", "raw_path": b"/v1/recommend/batch",
                 "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        try:
            t0 = time.perf_counter()
            await asyncio.wait_for(app(scope, receive, send), 5)
            took = time.perf_counter() - t0
            assert state.batcher.pending() <= 1  # the left client's 64 histories no longer count as load
        finally:
            release.set()
            await blocker
        await state.batcher.call(lambda: None)  # the worker has been through its queue
        return took

    took = asyncio.run(scenario())
    assert took < 3  # the request ended when its client left, not when the model got to it
    assert computed == [] and sent == []  # none of its 64 histories was computed, nothing sent
    text = client.get("/metrics").text
    assert 'method="POST",route="/v1/recommend/batch",status="client_abort"} 1.0' in text
    assert 'route="/v1/recommend/batch",status="200"' not in text


# ---- defect 5: the thread default -------------------------------------------------------
def test_serving_defaults_to_one_torch_thread(predictor, ckpt):
    import inspect

    from itemgen.cli.serve import serve

    assert ServeSettings(checkpoint="x").threads == 1
    assert inspect.signature(serve).parameters["threads"].default.default == 1
    for threads, want in ((None, 1), (2, 2)):
        kw = {} if threads is None else {"threads": threads}
        app = create_app(ServeSettings(checkpoint=str(ckpt), **kw), predictor=predictor, api_key="")
        with TestClient(app):
            got = asyncio.run(_in_worker(app, torch.get_num_threads))
        assert got == want
    torch.set_num_threads(1)


async def _in_worker(app, fn):
    return await app.state.itemgen.batcher.call(fn)


# ---- defect 6: a model with non-finite scores never answers 200 with an empty list -----
def nan_predictor(data) -> Predictor:
    cfg = from_dict({"model": "sasrec", "data": {"path": "x", "max_history": 5}, "sasrec": {"hidden": 16}})
    model = build_model(cfg, data.items).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # what 0xFF bytes over the weights read as
    return Predictor(model, cfg, data.items, Path("corrupt"))


def test_a_model_with_non_finite_scores_is_not_ready(data):
    app = create_app(ServeSettings(checkpoint="corrupt"), predictor=nan_predictor(data), api_key="")
    with TestClient(app) as c:
        assert "non-finite scores" in error_of(c.get("/readyz"), 503)["error"]
        body = error_of(c.post("/v1/recommend", json={"history": ids(data, [1, 2])}), 503)
        assert "non-finite" in body["error"]
        assert c.get("/healthz").status_code == 200  # alive, not ready


def test_non_finite_scores_on_a_request_are_a_500_not_an_empty_200(client, data, monkeypatch):
    engine = client.app.state.itemgen.engine
    real = Engine.encode

    def nan_encode(histories):
        q = real(engine, histories)
        return torch.full_like(q, float("nan"))

    monkeypatch.setattr(engine, "encode", nan_encode)
    body = error_of(client.post("/v1/recommend", json={"history": ids(data, [1, 2]), "k": 3}), 500)
    assert "non-finite scores" in body["error"]
    monkeypatch.undo()
    assert len(client.post("/v1/recommend", json={"history": ids(data, [1, 2]), "k": 3}).json()["items"]) == 3
    with pytest.raises(ModelOutputError):
        Engine(nan_predictor(data)).self_check()


# ---- defects 7, 8: the API key ----------------------------------------------------------
def test_api_key_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("ITEMGEN_API_KEY", raising=False)
    assert read_api_key(None) is None
    for blank in ("   ", "\t\n", ""):
        monkeypatch.setenv("ITEMGEN_API_KEY", blank)
        with pytest.raises(ValueError, match="set but blank"):
            read_api_key(None)  # never "no authentication" by accident
    monkeypatch.setenv("ITEMGEN_API_KEY", " from-env \n")
    assert read_api_key(None) == "from-env"
    monkeypatch.setenv("ITEMGEN_API_KEY", "clé")
    with pytest.raises(ValueError, match="visible ASCII"):
        read_api_key(None)
    f = tmp_path / "key"
    f.write_text("first-line\nsecond line: a comment\n")
    assert read_api_key(str(f)) == "first-line"  # the first line, as documented
    for text, words in (("clé-secrète\n", "visible ASCII"), ("a key\n", "visible ASCII"),
                        ("\nkey-on-line-2\n", r"first line \(the key\) is empty")):
        f.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=words):
            read_api_key(str(f))
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_api_key(str(f))


def test_serve_refuses_a_blank_key_in_the_environment(ckpt, monkeypatch):
    from typer.testing import CliRunner

    from itemgen.cli import app

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("started serving with a blank key"))
    monkeypatch.setenv("ITEMGEN_API_KEY", "  ")
    r = CliRunner().invoke(app, ["serve", str(ckpt), "--port", "1"])
    assert r.exit_code == 2 and "error: $ITEMGEN_API_KEY is set but blank" in r.output


def test_a_two_line_key_file_serves_its_first_line(predictor, ckpt, data, tmp_path):
    (tmp_path / "key").write_text("k3y\nrotated-later\n")
    app = create_app(ServeSettings(checkpoint=str(ckpt), api_key_file=str(tmp_path / "key")), predictor=predictor)
    with TestClient(app) as c:
        assert c.get("/readyz", headers={"X-API-Key": "k3y"}).status_code == 200
        error_of(c.get("/readyz", headers={"X-API-Key": "k3y\nrotated-later"}), 401)


# ---- defect 16: HEAD /healthz (load balancers) ------------------------------------------
def test_head_healthz_is_200(client):
    r = client.head("/healthz")
    assert r.status_code == 200 and r.content == b""
    assert client.get("/healthz").json() == {"status": "ok"}
    assert "/healthz" in client.get("/openapi.json").json()["paths"]


# ---- the real server: bodies that trickle, heads over the limit -------------------------
def test_a_body_trickled_byte_by_byte_is_closed_at_the_deadline(live_server, data):
    body = json.dumps({"history": ids(data, [1, 2])}).encode()
    with socket.create_connection(("127.0.0.1", live_server), timeout=5) as s:
        s.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        t0 = time.monotonic()
        closed_at = math.inf
        for byte in body:  # one byte every 0.25 s: each pause well under the 1 s timeout
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic() - t0
                break
            s.settimeout(0.25)
            try:
                if s.recv(65536) == b"":
                    closed_at = time.monotonic() - t0
                    break
            except socket.timeout:
                pass
            except OSError:
                closed_at = time.monotonic() - t0
                break
            if time.monotonic() - t0 > 6:
                break
    assert closed_at < 3, closed_at  # the body's deadline is 1 s from its head
    metrics = httpx.get(f"http://127.0.0.1:{live_server}/metrics", timeout=10).text
    assert 'method="POST",route="/v1/recommend",status="client_abort"} 1.0' in metrics


def send_raw(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        s.settimeout(5)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in b"".join(chunks).lower():
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                if len(rest) >= length:
                    break
    return b"".join(chunks)


def test_request_heads_over_16_kib_are_431_however_they_arrive(live_server):
    def head(pad: int) -> bytes:
        return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"

    assert send_raw(live_server, head(16_000)).startswith(b"HTTP/1.1 200 ")  # under 16 KiB: served
    for pad in (17_000, 100_000):  # in one write: h11 alone accepted the 100 KB head
        got = send_raw(live_server, head(pad))
        status, _, body = got.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 431 "), got[:200]
        assert "over the limit of 16384 bytes" in json.loads(body)["error"]
    # in two writes, the first already past the limit and incomplete: h11's own check answers, as
    # the one above may (a 17 KB write can reach the server in several reads); the same 431 and words
    with socket.create_connection(("127.0.0.1", live_server), timeout=5) as s:
        s.sendall(head(20_000)[:18_000])
        time.sleep(0.2)
        try:
            s.sendall(head(20_000)[18_000:])
        except OSError:  # the server may have answered and closed already
            pass
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    status, _, body = got.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 431 "), got[:200]
    assert "over the limit of 16384 bytes" in json.loads(body)["error"]
