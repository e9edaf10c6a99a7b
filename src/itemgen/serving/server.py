"""The HTTP server: FastAPI routes over one loaded checkpoint.

    POST /v1/recommend                   one history -> top-k items
    POST /v1/recommend/batch             many histories
    GET  /v1/items/{id}                  one catalog item
    POST /v1/items                       add new items, vectorised from their text (in memory)
    POST /v1/sessions/{sid}/events       append an item to a server-side session
    GET  /v1/sessions/{sid}/recommend    top-k for a session (incremental keys/values)
    DELETE /v1/sessions/{sid}
    GET  /healthz  /readyz  /metrics     liveness, readiness, Prometheus

Every model call goes through one micro-batching worker thread (batching.py, engine.py).
Errors are JSON ``{"error": "<what is wrong>", ...}`` with a 4xx status; unexpected failures
are logged and answered with a bare 500, never a traceback. With an API key configured every
route but /healthz needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
from fastapi import FastAPI, Path as PathParam, Query as QueryParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from itemgen import __version__
from itemgen.api import Predictor
from itemgen.serving.batching import MicroBatcher
from itemgen.data.dataset import DataError
from itemgen.data.item_file import items_from_records
from itemgen.serving.engine import DecoderUnavailable, Engine, ModelOutputError, Query, Ranked, TextEncoderUnavailable
from itemgen.serving.sessions import SessionStore

logger = logging.getLogger("itemgen.serve")

API_KEY_ENV = "ITEMGEN_API_KEY"
SETTINGS_ENV = "ITEMGEN_SERVE_SETTINGS"  # JSON ServeSettings for --workers > 1 (app_from_env)
SESSION_ID = r"^[A-Za-z0-9_.:\-]{1,128}$"
SessionId = Annotated[str, PathParam(pattern=SESSION_ID, description="1-128 of A-Z a-z 0-9 _ . : -")]
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})  # metric labels; else "other"
MAX_JSON_DEPTH = 32  # request bodies nest at most 3 levels ({"histories": [[...]]})


@dataclass(frozen=True)
class ServeSettings:
    checkpoint: str
    batch_window_ms: float = 2.0  # how long the worker waits for more requests after the first
    max_batch: int = 32  # histories per forward pass (1 = micro-batching off)
    max_history: int = 200  # items a request history may hold (the model sees its last data.max_history)
    max_k: int = 1000
    max_batch_request: int = 256  # histories per /v1/recommend/batch request
    max_body_bytes: int = 1 << 20
    max_queue: int = 1024  # histories waiting for the model beyond which requests get 503 (shed load)
    max_sessions: int = 10_000
    session_ttl_s: float = 1800.0
    prefix_cache: bool = True  # reuse the prompt prefix's keys/values (ItemLM)
    # off with several worker processes (each would hold its own): sessions, and POST /v1/items
    # (an add would reach one process's model)
    sessions_enabled: bool = True
    # POST /v1/items: items per request. Encoding runs in the model worker and every recommendation
    # waits meanwhile: MiniLM took 9 ms an item on the shared 2 cores with one thread (1000 items:
    # 9.1 s), so 100 keeps the stall near 1 s; 0 turns adding off (docs/serve.md, Adding items)
    max_new_items: int = 100
    api_key_file: str | None = None
    # torch CPU threads of this process; 0: torch's default (one per core). 1 cannot oversubscribe
    # the cores whatever else runs: torch's default collapsed 16x under load (issue 22), while 1
    # costs at most 1.4-1.8x when a core is free (measured: docs/serve.md, Load benchmark)
    threads: int = 1

    def check(self) -> None:
        for name, ok in (("batch_window_ms", self.batch_window_ms >= 0), ("max_batch", self.max_batch >= 1),
                         ("max_history", self.max_history >= 1), ("max_k", self.max_k >= 1),
                         ("max_batch_request", self.max_batch_request >= 1),
                         ("max_body_bytes", self.max_body_bytes >= 1024), ("max_sessions", self.max_sessions >= 1),
                         ("session_ttl_s", self.session_ttl_s > 0), ("max_queue", self.max_queue >= 1),
                         ("max_new_items", self.max_new_items >= 0),
                         ("threads", self.threads is None or self.threads >= 0)):
            if not ok:
                raise ValueError(f"serve setting {name}={getattr(self, name)!r} is out of range")


def read_api_key(path: str | None) -> str | None:
    """The key from ``path`` (its first line) or else $ITEMGEN_API_KEY; None: no auth.

    Refused (ValueError), never silently turned into "no auth" or a key nobody can send: a blank
    first line, a variable set to blanks, and a key with characters outside visible ASCII
    (HTTP header values are bytes; a non-ASCII key would only match its latin-1 bytes)."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"API key file {path} does not exist")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"API key file {path} is not UTF-8 text") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"API key file {path}: the first line (the key) is empty")
        return _check_key(key, f"API key file {path}")
    raw = os.environ.get(API_KEY_ENV)
    if raw is None:
        return None
    if not raw.strip():
        raise ValueError(f"${API_KEY_ENV} is set but blank: give it a key, or unset it to serve without "
                         "authentication")
    return _check_key(raw.strip(), f"${API_KEY_ENV}")


def _check_key(key: str, where: str) -> str:
    bad = next((c for c in key if not 33 <= ord(c) <= 126), None)
    if bad is not None:
        raise ValueError(f"{where}: the key holds {bad!r}; keys are visible ASCII characters only "
                         "(no spaces or control characters)")
    return key


# ---- request and response models (the OpenAPI schema) --------------------------------------
ItemId = Annotated[str, Field(min_length=1, max_length=256)]
Decode = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$", description="top-k decoder: exact | structure | ann")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RecommendRequest(_Strict):
    history: list[ItemId] = Field(..., min_length=1, description="item ids, oldest first")
    k: int = Field(10, ge=1, description="how many items (at most the catalog size and the server's max_k)")
    exclude_history: bool = True
    decode: Decode = "exact"
    unknown_items: Literal["error", "ignore"] = "error"


class BatchRequest(_Strict):
    histories: list[list[ItemId]] = Field(..., min_length=1)
    k: int = Field(10, ge=1)
    exclude_history: bool = True
    decode: Decode = "exact"
    unknown_items: Literal["error", "ignore"] = "error"


class EventRequest(_Strict):
    item: ItemId


ItemText = Annotated[str, Field(max_length=10_000)]


class NewItem(_Strict):
    id: ItemId
    title: Optional[ItemText] = None
    brand: Optional[ItemText] = None
    category: Optional[ItemText] = None
    description: Optional[ItemText] = None
    price: Optional[ItemText] = None


class AddItemsRequest(_Strict):
    items: list[NewItem] = Field(..., min_length=1, description="new items: an id and text fields (those of the "
                                                                "checkpoint's items.text_fields count)")


class AddItemsResponse(BaseModel):
    added: list[str]
    items: int  # catalog size after
    ann_index: Optional[str] = None  # "extended" | "rebuilt" | None (no ANN index served)
    latency_ms: float


class ItemOut(BaseModel):
    id: str
    score: float
    title: Optional[str] = None


class RecommendResponse(BaseModel):
    items: list[ItemOut]
    model: str
    latency_ms: float


class BatchResult(BaseModel):
    items: list[ItemOut]


class BatchResponse(BaseModel):
    results: list[BatchResult]
    model: str
    latency_ms: float


class ItemInfo(BaseModel):
    id: str
    title: Optional[str] = None


class EventResponse(BaseModel):
    session: str
    length: int


class ErrorResponse(BaseModel):
    error: str
    unknown_items: Optional[list[str]] = None
    detail: Optional[list[dict]] = None


ERRORS = {s: {"model": ErrorResponse} for s in (401, 404, 413, 422, 500, 503)}
ADD_ERRORS = {s: {"model": ErrorResponse} for s in (401, 409, 413, 422, 500, 501, 503)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


# ---- metrics ---------------------------------------------------------------------------------
class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("itemgen_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("itemgen_request_seconds", "HTTP request latency", ["route"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("itemgen_batch_size", "histories per model forward pass", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.forward = Histogram("itemgen_forward_seconds", "model time per batch (encode + top-k)", registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.sessions = Gauge("itemgen_sessions", "live sessions", registry=r)
        self.session_bytes = Gauge("itemgen_session_cache_bytes", "keys/values held by sessions", registry=r)
        self.queue = Gauge("itemgen_queue_depth", "jobs waiting for the model worker", registry=r)

    def on_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.forward.observe(seconds)


# ---- the ASGI guard: metrics, API key, body size, clients that leave ---------------------
class Guard:
    """Outermost ASGI layer: counts every response (labels from fixed sets: route templates,
    known methods, statuses, ``client_abort`` for a client gone before its response), rejects
    missing/wrong API keys before any work, and buffers request bodies up to ``max_body_bytes``
    (413 beyond that, whatever Content-Length claims; 422 for bodies that are not UTF-8 or nest
    too deep, which FastAPI would answer with an unnamed 400). While the app works on a request
    it listens for the client's disconnect: a client that leaves cancels its request, so its
    histories still queued for the model are dropped instead of computed for nobody."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status_box: list = [None]
        gone = [False]  # the client disconnected before the response
        done = [False]  # the response was sent in full

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                done[0] = True
            await send(message)

        async def receive_watched():
            message = await receive()
            if message["type"] == "http.disconnect" and not done[0]:
                gone[0] = True
            return message

        try:
            await self._guarded(scope, receive_watched, send_counted, answered=lambda: done[0])
        finally:
            # every label from a fixed set, whatever the client sends: route templates (never raw
            # paths or ids), known methods, and "other" for the rest
            route = getattr(scope.get("route"), "path", None) or self.state.route_of(scope)
            method = scope.get("method", "")
            status = status_box[0]
            if status is None:  # no response: the client left mid-request, or the app failed (a 500 follows)
                status = "client_abort" if gone[0] else 500
            m = self.state.metrics
            m.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - t0)

    async def _guarded(self, scope, receive, send, answered):
        key = self.state.api_key
        if key is not None and scope["path"] != "/healthz" and not _authorized(scope, key):
            return await _reply(send, 401, {"error": "missing or invalid API key: send 'Authorization: "
                                                     "Bearer <key>' or 'X-API-Key: <key>'"},
                                [(b"www-authenticate", b"Bearer")])
        limit = self.state.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return await _reply(send, 413, {"error": f"request body of {int(declared)} bytes is over the "
                                                             f"limit of {limit} bytes"})
            except ValueError:
                return await _reply(send, 400, {"error": "Content-Length is not a number"})
        chunks, size = [], 0
        while True:  # every method's body (a GET's is empty): the app gets it whole
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _reply(send, 413, {"error": f"request body is over the limit of {limit} bytes"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope.get("method") in ("POST", "PUT", "PATCH") and _is_json(scope):
            problem = json_body_problem(body)
            if problem:
                return await _reply(send, 422, {"error": problem})
        await _until_disconnect(self.app(scope, _replay(body), send), receive, answered)


def _replay(body: bytes):
    """The app's ``receive``: the buffered body once; after that only the Guard listens to the
    client (the app waits forever, as it would for a client that sends nothing more)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # cancelled with the app's task
    return receive


async def _until_disconnect(app_call, receive, answered) -> None:
    """Run ``app_call`` while listening for the client leaving; if it leaves before the app
    has answered, cancel the app (its queued model work with it: batching.py skips cancelled
    jobs). ``receive`` also reports a disconnect once the response is complete (uvicorn, test
    clients): ``answered()`` tells the two apart, and an answered app is left to finish."""
    app_task = asyncio.ensure_future(app_call)

    async def listen():
        while (await receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(listen())
    try:
        await asyncio.wait({app_task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request was cancelled (shutdown): so is its app
        app_task.cancel()
        listener.cancel()
        raise
    left = listener.done() and not listener.cancelled() and listener.exception() is None
    if left and not app_task.done() and not answered():
        app_task.cancel()
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    try:
        await app_task
    except asyncio.CancelledError:
        if not app_task.cancelled() or asyncio.current_task().cancelling():
            raise  # not the cancel above: ours to pass on


def _is_json(scope) -> bool:
    """FastAPI parses a body as JSON without a Content-Type or with a JSON one."""
    ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return not ctype or ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


def json_body_problem(body: bytes) -> str | None:
    """What FastAPI would only call "an error parsing the body" (400), named: a body that is not
    UTF-8, or nests arrays/objects deeper than MAX_JSON_DEPTH (json would hit Python's recursion
    limit). Linear in the body (a few vectorised passes: 1 MiB of any shape in tens of ms); a
    regex over strings backtracked quadratically on an unclosed string of escaped quotes (issue
    22). None when neither applies."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"request body is not valid UTF-8 (byte {e.start}): send JSON encoded as UTF-8"
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return None
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        return f"request body nests arrays/objects {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted"
    return None


def json_depth(body: bytes) -> int:
    """Deepest nesting of [ and { outside JSON strings, as json's parser would meet it up to the
    first error (what follows an error is never parsed, so miscounting it is harmless)."""
    a = np.frombuffer(body, dtype=np.uint8)  # (n,)
    if len(a) == 0:
        return 0
    pos = np.arange(len(a))
    backslash = a == ord("\\")
    last_other = np.maximum.accumulate(np.where(backslash, -1, pos))  # (n,) last non-backslash at or before i
    run_before = np.zeros(len(a), dtype=np.int64)  # (n,) backslashes right before i
    run_before[1:] = pos[:-1] - last_other[:-1]
    quote = (a == ord('"')) & (run_before % 2 == 0)  # an odd run of backslashes escapes the quote
    outside = np.cumsum(quote) % 2 == 0  # (n,) not inside a string (a quote itself flips the parity)
    step = (((a == ord("[")) | (a == ord("{"))) & outside).astype(np.int8) \
        - (((a == ord("]")) | (a == ord("}"))) & outside).astype(np.int8)
    step = step[step != 0]
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _authorized(scope, key: str) -> bool:
    given = _header(scope, b"x-api-key")
    if given is None:
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8"))  # constant time


async def _reply(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


# ---- server state ----------------------------------------------------------------------------
class ServerState:
    def __init__(self, settings: ServeSettings, predictor: Predictor | None, api_key: str | None):
        settings.check()
        self.settings, self.predictor, self.api_key = settings, predictor, api_key
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.batcher: MicroBatcher | None = None
        self.sessions: SessionStore | None = None
        self.model_name = "unloaded"
        self.broken: str | None = None  # why a loaded model cannot serve (its scores are not finite)
        self.routes: list = []  # the app's routes: metric labels for requests that never reached them

    def route_of(self, scope) -> str:
        """The route template a request's path matches ("other": none), for requests that ended
        before the router saw them (a client gone mid-body, a 401, a 413)."""
        for r in self.routes:
            if getattr(r, "path", None) and r.matches(scope)[0] is not Match.NONE:
                return r.path
        return "other"

    # called in the worker thread: torch only ever runs there
    def _load(self) -> None:
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)
        if self.predictor is None:
            self.predictor = Predictor.load(self.settings.checkpoint)
        engine = Engine(self.predictor, use_prefix_cache=self.settings.prefix_cache)
        try:
            engine.self_check()
        except ModelOutputError as e:
            self.broken = str(e)
            logger.error("not ready: %s", e)
        self.engine = engine
        cfg = self.predictor.cfg
        desc = cfg.model
        if cfg.model == "itemlm":
            desc += f"/{cfg.itemlm.backbone}" + (f"-{cfg.itemlm.n_layers}L" if cfg.itemlm.n_layers else "")
        self.model_name = f"{Path(self.settings.checkpoint).name} ({desc})"

    async def start(self) -> None:
        s = self.settings
        self.batcher = MicroBatcher(self._run_batch, window_s=s.batch_window_ms / 1000, max_batch=s.max_batch,
                                    on_batch=self.metrics.on_batch)
        self.batcher.start()
        await self.batcher.call(self._load)
        self.sessions = SessionStore(s.max_sessions, s.session_ttl_s, max_events=s.max_history)
        self.metrics.sessions.set_function(lambda: len(self.sessions))
        self.metrics.session_bytes.set_function(self.sessions.cache_bytes)
        self.metrics.queue.set_function(self.batcher.pending)
        logger.info("ready: %s, %d items, prefix cache %s, sessions %s", self.model_name, self.n_items,
                    self.engine.prefix is not None, "incremental" if self.engine.incremental else "recompute")

    def _run_batch(self, rows):
        return self.engine.run_batch(rows)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.batcher is not None and self.batcher.alive and not self.broken

    def require_ready(self) -> Engine:
        if self.broken:
            raise ApiError(503, f"the model cannot serve: {self.broken}")
        if not self.ready:
            raise ApiError(503, "the model is not loaded (yet)")
        return self.engine

    @property
    def n_items(self) -> int:
        return self.predictor.model.n_items

    # ---- validation ---------------------------------------------------------------------------
    def check_k(self, k: int) -> None:
        limit = min(self.n_items, self.settings.max_k)
        if not 1 <= k <= limit:
            cap = "" if limit == self.n_items else f", this server returns at most {limit}"
            raise ApiError(422, f"k must be between 1 and {limit} (the catalog has {self.n_items} items{cap}), got {k}")

    def resolve(self, histories: list[list[str]], unknown: str) -> list[np.ndarray]:
        """External ids -> index arrays; unknown ids are a 422 listing them, or are dropped."""
        limit = self.settings.max_history
        for i, h in enumerate(histories):
            where = f"history {i}" if len(histories) > 1 else "history"
            if not h:
                raise ApiError(422, f"{where} is empty: give at least one item id")
            if len(h) > limit:
                raise ApiError(422, f"{where} has {len(h)} items; this server accepts at most {limit}")
        index = self.predictor.items.index
        missing = list(dict.fromkeys(x for h in histories for x in h if x not in index))
        if missing and unknown == "error":
            shown = missing[:50]
            raise ApiError(422, f"unknown item ids: {', '.join(_clip(x) for x in shown)}"
                                + (f" (+{len(missing) - 50} more)" if len(missing) > 50 else "")
                                + "; send unknown_items='ignore' to drop them",
                           unknown_items=[_clip(x) for x in shown])
        out = []
        for i, h in enumerate(histories):
            idx = np.asarray([index[x] for x in h if x in index], dtype=np.int64)
            if len(idx) == 0:
                where = f"history {i}" if len(histories) > 1 else "history"
                raise ApiError(422, f"{where} has no known item ids (all {len(h)} were unknown and dropped)",
                               unknown_items=[_clip(x) for x in dict.fromkeys(h)][:50])
            out.append(idx)
        return out

    def format(self, r: Ranked) -> list[dict]:
        items = self.predictor.items
        return [{"id": items.ids[i], "score": float(s), "title": items.title(i)} for s, i in zip(r.scores, r.ids)]

    def check_queue(self, rows: int = 1) -> None:
        """Shed load instead of queueing without bound: latency would grow for everyone."""
        if self.batcher.pending() + rows > self.settings.max_queue:
            raise ApiError(503, f"server overloaded: {self.batcher.pending()} histories waiting for the model; "
                                "retry shortly")

    async def rank(self, q: Query) -> Ranked:
        return await self.answer(self.batcher.submit(q))

    async def answer(self, pending) -> Ranked:
        """Await a worker result; an unavailable decoder is the client's 422 (its message holds
        no server path: engine.py), non-finite scores a 500 saying so, anything else a bare 500."""
        try:
            return await pending
        except DecoderUnavailable as e:
            raise ApiError(422, str(e)) from None
        except ModelOutputError as e:
            logger.error("%s", e)
            raise ApiError(500, str(e)) from None


def _clip(x: str, n: int = 64) -> str:
    return x if len(x) <= n else x[:n] + "..."


# ---- the app ---------------------------------------------------------------------------------
def create_app(settings: ServeSettings, predictor: Predictor | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app for ``settings``; ``predictor`` skips loading (tests). ``api_key`` None
    reads --api-key-file / $ITEMGEN_API_KEY; "" turns auth off whatever the environment says."""
    key = read_api_key(settings.api_key_file) if api_key is None else (api_key or None)
    state = ServerState(settings, predictor, key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:  # uvicorn has finished the requests in flight by now
            state.stop()

    app = FastAPI(title="itemgen", version=__version__, lifespan=lifespan,
                  description="Next-item recommendations from an itemgen checkpoint (items are single tokens).")
    app.state.itemgen = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"error": e.message, **e.extra}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        detail = []
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ())]
            if loc and loc[0] in ("body", "query", "path"):
                loc = loc[1:] if len(loc) > 1 else loc
            msg = err.get("msg", "invalid")
            if err.get("type") == "json_invalid":
                msg = "request body is not valid JSON"
            elif tuple(err.get("loc", ())) == ("body",) and err.get("type") in ("dict_type", "model_attributes_type"):
                msg = "request body must be a JSON object (Content-Type: application/json)"
            detail.append({"field": ".".join(loc), "message": msg})
        text = "; ".join(f"{d['field']}: {d['message']}" for d in detail[:10])
        return JSONResponse({"error": f"invalid request: {text}", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else "error"
        if e.status_code == 400 and msg == "There was an error parsing the body":  # what the guard did not name
            return JSONResponse({"error": "request body could not be parsed as JSON"}, status_code=422)
        if e.status_code == 404:
            msg = f"no route {request.url.path}"
        elif e.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": msg}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error"}, status_code=500)

    def model_name() -> str:
        return state.model_name

    @app.post("/v1/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(req: RecommendRequest):
        """Top-k next items for one history (item ids oldest first)."""
        t0 = time.perf_counter()
        state.require_ready()
        state.check_k(req.k)
        (idx,) = state.resolve([req.history], req.unknown_items)
        state.check_queue()
        r = await state.rank(Query(idx, req.k, req.exclude_history, req.decode))
        return {"items": state.format(r), "model": model_name(), "latency_ms": (time.perf_counter() - t0) * 1e3}

    @app.post("/v1/recommend/batch", response_model=BatchResponse, responses=ERRORS)
    async def recommend_batch(req: BatchRequest):
        """Top-k for many histories at once (they join the same micro-batches as single requests)."""
        t0 = time.perf_counter()
        state.require_ready()
        if len(req.histories) > settings.max_batch_request:
            raise ApiError(422, f"{len(req.histories)} histories in one request; this server accepts at most "
                                f"{settings.max_batch_request}")
        state.check_k(req.k)
        idx = state.resolve(req.histories, req.unknown_items)
        state.check_queue(len(idx))
        ranked = await asyncio.gather(*[state.rank(Query(h, req.k, req.exclude_history, req.decode)) for h in idx])
        return {"results": [{"items": state.format(r)} for r in ranked], "model": model_name(),
                "latency_ms": (time.perf_counter() - t0) * 1e3}

    @app.get("/v1/items/{item_id:path}", response_model=ItemInfo, responses=ERRORS)
    async def item(item_id: str):
        """One catalog item by its id."""
        state.require_ready()
        i = state.predictor.items.index.get(item_id)
        if i is None:
            raise ApiError(404, f"unknown item id: {_clip(item_id)}")
        return {"id": item_id, "title": state.predictor.items.title(i)}

    @app.post("/v1/items", status_code=201, response_model=AddItemsResponse, responses=ADD_ERRORS)
    async def add_items(req: AddItemsRequest):
        """Add new items to the served catalog, vectorised from their text by the checkpoint's frozen
        text encoder (no retraining): recommendable from the next request on. In memory only: a
        restart serves the checkpoint's catalog again (persist with `itemgen items add`)."""
        t0 = time.perf_counter()
        engine = state.require_ready()
        if not settings.sessions_enabled:
            raise ApiError(501, "adding items needs a single server process (--workers 1): each worker process "
                                "holds its own model, and an add would reach only one of them")
        problem = engine.add_problem
        if problem:
            raise ApiError(409, f"this model cannot take new items: {problem}")
        limit = settings.max_new_items
        if limit == 0:
            raise ApiError(409, "adding items is turned off on this server (--max-new-items 0)")
        if len(req.items) > limit:
            raise ApiError(422, f"{len(req.items)} items in one request; this server adds at most {limit} per "
                                "request (--max-new-items); nothing was added")
        try:
            new = items_from_records([i.model_dump(exclude_none=True) for i in req.items], "request")
            state.check_queue()
            done = await state.batcher.call(engine.add_items, new)
        except DataError as e:
            raise ApiError(422, f"{e}; nothing was added") from None
        except TextEncoderUnavailable as e:
            raise ApiError(503, f"{e}; nothing was added") from None
        except ModelOutputError as e:
            logger.error("%s", e)
            raise ApiError(500, f"{e}; nothing was added") from None
        return {**done, "latency_ms": (time.perf_counter() - t0) * 1e3}

    def sessions_on():
        if not settings.sessions_enabled:
            raise ApiError(501, "sessions need a single server process (--workers 1): each worker process "
                                "would keep its own sessions")

    @app.post("/v1/sessions/{sid}/events", response_model=EventResponse, responses=ERRORS)
    async def session_event(sid: SessionId, req: EventRequest):
        """Append one item to a session (created on its first event)."""
        state.require_ready()
        sessions_on()
        if req.item not in state.predictor.items.index:
            raise ApiError(422, f"unknown item ids: {_clip(req.item)}", unknown_items=[_clip(req.item)])
        n = state.sessions.add(sid, state.predictor.items.index[req.item])
        return {"session": sid, "length": n}

    @app.get("/v1/sessions/{sid}/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def session_recommend(sid: SessionId, k: Annotated[int, QueryParam(ge=1)] = 10,
                                exclude_history: bool = True,
                                decode: Annotated[str, QueryParam(pattern=r"^[a-z0-9_]{1,32}$")] = "exact"):
        """Top-k for a session's history; only items added since its last recommendation are prefilled."""
        t0 = time.perf_counter()
        engine = state.require_ready()
        sessions_on()
        state.check_k(k)
        s = state.sessions.get(sid)
        if s is None:
            raise ApiError(404, f"no session {sid} (never created, expired or evicted)")
        items, dropped = state.sessions.snapshot(s)
        state.check_queue()
        if engine.incremental:
            job = state.batcher.call(engine.run_session, s, items, dropped, k, exclude_history, decode)
            r = await state.answer(job)
        else:
            r = await state.rank(Query(np.asarray(items, dtype=np.int64), k, exclude_history, decode))
        return {"items": state.format(r), "model": model_name(), "latency_ms": (time.perf_counter() - t0) * 1e3}

    @app.delete("/v1/sessions/{sid}", status_code=204, responses=ERRORS)
    async def session_delete(sid: SessionId):
        state.require_ready()
        sessions_on()
        if not state.sessions.delete(sid):
            raise ApiError(404, f"no session {sid}")
        return Response(status_code=204)

    @app.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD
    @app.get("/healthz")
    async def healthz():
        """The process is alive (no API key needed)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        """The model is loaded and its worker is running."""
        if state.broken:
            raise ApiError(503, f"not ready: {state.broken}")
        if not state.ready:
            raise ApiError(503, "not ready: the model is not loaded or its worker stopped")
        e = state.engine
        return {"status": "ready", "model": state.model_name, "items": state.n_items,
                "prefix_cache": e.prefix is not None, "sessions": "incremental" if e.incremental else "recompute",
                "batch_window_ms": settings.batch_window_ms, "max_batch": settings.max_batch,
                "added_items": e.added}

    @app.get("/metrics")
    async def metrics():
        """Prometheus metrics (text format)."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    state.routes = app.router.routes
    app.add_middleware(Guard, state=state)  # inside Starlette's error middleware: crashes are counted too
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for --workers > 1: each worker process builds its own app."""
    blob = json.loads(os.environ[SETTINGS_ENV])
    return create_app(ServeSettings(**blob))


def settings_env(settings: ServeSettings) -> str:
    return json.dumps(asdict(settings))
