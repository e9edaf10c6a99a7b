"""Micro-batching: every model call runs in ONE worker thread (torch is never entered from two
threads at once), and requests that arrive together share one forward pass.

The worker takes the first waiting job, then keeps collecting jobs for at most ``window_s`` or
until ``max_batch`` jobs are in hand, and hands the list to ``run_batch``. Under load the queue
is already full when the worker comes back, so batches form without waiting; ``max_batch=1``
turns batching off (one forward pass per request), the baseline of the load benchmark.
Exclusive calls (``call``) run alone in the same thread: session updates, loading the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Job:
    payload: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    exclusive: bool = False  # payload is (fn, args): run alone, not batched
    queued_at: float = field(default_factory=time.perf_counter)


def _settle(fut: asyncio.Future, value: Any) -> None:
    if fut.done():  # the client went away and the handler was cancelled
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


class MicroBatcher:
    """``run_batch(payloads) -> results`` (one per payload, an Exception instance for a payload
    that failed) is only ever called from the worker thread. ``on_batch(n, seconds)`` reports
    each batch's size and run time (metrics)."""

    def __init__(self, run_batch: Callable[[list], list], *, window_s: float = 0.002, max_batch: int = 32,
                 on_batch: Callable[[int, float], None] | None = None, name: str = "itemgen-model"):
        if window_s < 0 or max_batch < 1:
            raise ValueError(f"batch window must be >= 0 and max batch >= 1, got {window_s}, {max_batch}")
        self.run_batch, self.window_s, self.max_batch, self.on_batch = run_batch, window_s, max_batch, on_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._started = self._stopped = False
        self._waiting = 0  # jobs whose request still waits (not answered, not cancelled); event-loop side

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish every job already queued, then end the worker thread."""
        if self._started and not self._stopped:
            self._stopped = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending(self) -> int:
        """Jobs still wanted: queued or running, less those whose client left (their request was
        cancelled; the worker skips them), so clients that leave do not shed others' load."""
        return self._waiting

    async def submit(self, payload: Any) -> Any:
        """Queue one batchable payload; resolves to its result (or raises its exception)."""
        return await self._put(payload, exclusive=False)

    async def call(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` alone in the worker thread."""
        return await self._put((fn, args), exclusive=True)

    async def _put(self, payload, exclusive: bool):
        if self._stopped or not self._started:
            raise RuntimeError("the model worker is not running")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting += 1
        fut.add_done_callback(self._done)
        self._queue.put(_Job(payload, fut, loop, exclusive))
        return await fut

    def _done(self, _fut) -> None:
        self._waiting -= 1

    # ---- worker thread -------------------------------------------------------------------
    def _loop(self) -> None:
        carry = None  # a job taken while filling a batch that must run on its own
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is _STOP:
                return
            if job.exclusive:
                self._run_exclusive(job)
                continue
            batch = [job]
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch:
                wait = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or nxt.exclusive:
                    carry = nxt
                    break
                batch.append(nxt)
            self._run(batch)

    def _run_exclusive(self, job: _Job) -> None:
        if job.future.done():  # its request was cancelled while queued (the client left)
            return
        fn, args = job.payload
        try:
            result = fn(*args)
        except Exception as e:  # delivered to the waiting request, never kills the worker
            result = e
        _deliver(job, result)

    def _run(self, batch: list[_Job]) -> None:
        live = [j for j in batch if not j.future.done()]  # skip requests cancelled while queued
        if not live:
            return
        t0 = time.perf_counter()
        try:
            results = self.run_batch([j.payload for j in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} jobs")
        except Exception as e:
            logger.exception("batch of %d failed", len(live))
            results = [e] * len(live)
        if self.on_batch is not None:
            self.on_batch(len(live), time.perf_counter() - t0)
        for j, r in zip(live, results):
            _deliver(j, r)


def _deliver(job: _Job, result: Any) -> None:
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result)
    except RuntimeError:  # its event loop has closed: nobody waits for it, and the worker goes on
        pass
