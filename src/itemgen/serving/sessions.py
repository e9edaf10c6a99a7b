"""Sessions: a user's running history kept on the server, with the keys/values of its prompt.

A session's cache holds the prompt up to its last item (prefix + item pieces). A recommendation
runs only what is new on top of it: the pieces of items added since the last call plus the
constant question suffix; the question is then cropped off again (DynamicCache.crop), so the
cache always ends after the last item. The result equals a full recompute of the same prompt
(test_serve.py checks it). When the history outgrows the model's prompt window
(``data.max_history``) the prompt's first item changes, so the cache is rebuilt from the prefix.

Models without an incremental path (SASRec and the other ID-only models) keep only the item
list; their session recommendations are ordinary batched requests.

Memory is bounded: at most ``max_sessions`` (least recently used evicted first), each idle for
at most ``ttl_s`` seconds, each keeping at most ``max_events`` items.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Session:
    items: list[int] = field(default_factory=list)  # every kept event, oldest first
    cache: object | None = None  # DynamicCache (1 row): prefix + pieces of items[start:start + cached]
    start: int = 0  # absolute event number of the cache's first item
    cached: int = 0  # how many items after ``start`` the cache holds
    dropped: int = 0  # events dropped from the front of ``items`` (max_events)
    touched: float = field(default_factory=time.monotonic)

    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers
                   for t in (layer.keys, layer.values) if t is not None)


class SessionStore:
    """LRU + TTL map from session id to Session. Thread-safe: handlers add events on the event
    loop, the model worker reads and updates caches."""

    def __init__(self, max_sessions: int = 10_000, ttl_s: float = 1800.0, max_events: int = 200,
                 clock=time.monotonic):
        if max_sessions < 1 or ttl_s <= 0 or max_events < 1:
            raise ValueError("sessions need max_sessions >= 1, ttl > 0 and max_events >= 1")
        self.max_sessions, self.ttl_s, self.max_events = max_sessions, ttl_s, max_events
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self._clock = clock
        self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire(self, now: float) -> None:
        # least recently used first: stop at the first one still fresh
        while self._sessions:
            sid, s = next(iter(self._sessions.items()))
            if now - s.touched <= self.ttl_s:
                break
            del self._sessions[sid]
            self.evicted += 1

    def add(self, sid: str, item: int) -> int:
        """Append an event (creating the session); returns the session's length."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            s = self._sessions.get(sid)
            if s is None:
                s = self._sessions[sid] = Session()
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
                    self.evicted += 1
            self._sessions.move_to_end(sid)
            s.touched = now
            s.items.append(int(item))
            if len(s.items) > self.max_events:
                cut = len(s.items) - self.max_events
                del s.items[:cut]
                s.dropped += cut
            return len(s.items)

    def get(self, sid: str) -> Session | None:
        now = self._clock()
        with self._lock:
            self._expire(now)
            s = self._sessions.get(sid)
            if s is not None:
                self._sessions.move_to_end(sid)
                s.touched = now
            return s

    def snapshot(self, s: Session) -> tuple[list[int], int]:
        """(kept events, how many were dropped before them), read together."""
        with self._lock:
            return list(s.items), s.dropped

    def delete(self, sid: str) -> bool:
        with self._lock:
            return self._sessions.pop(sid, None) is not None

    def cache_bytes(self) -> int:
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.nbytes() for s in sessions)


def supports_incremental(model) -> bool:
    prompts = getattr(model, "prompts", None)
    return hasattr(model, "extend") and hasattr(model, "prefix_cache") and prompts is not None \
        and len(prompts.question) > 0


@torch.inference_mode()
def session_query(model, prefix, s: Session, items: list[int], dropped: int, max_history: int) -> torch.Tensor:
    """The query (1, D) for ``items`` (the session's events, the first being event number
    ``dropped``), computing only what ``s.cache`` lacks. Call from the model worker only."""
    P = model.prompts
    total = dropped + len(items)  # absolute number of events
    start = max(dropped, total - max_history)  # absolute event number of the prompt's first item
    if s.cache is None or s.start != start or s.cached > total - start:
        s.cache, s.start, s.cached = model.new_cache((prefix, 1)), start, 0  # window moved: rebuild
    tokens: list[int] = []
    slots: list[int] = []
    for n in range(start + s.cached, total):  # pieces exactly as PromptBuilder.encode writes them
        piece = (P.item_close if n > start else []) + P.item_open
        tokens += piece + [-1]
        slots += [-1] * len(piece) + [items[n - dropped]]
    tokens += P.question
    slots += [-1] * len(P.question)
    dev = model.device
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=dev)[None]  # (1, S)
    it = torch.as_tensor(np.asarray(slots, dtype=np.int64), device=dev)[None]  # (1, S)
    h = model.extend(s.cache, torch.where(t >= 0, t, model.pad_token), it)  # (1, S, H)
    s.cache.crop(-len(P.question))  # keep prefix + items only; the question is re-run next time
    s.cached = total - start
    # the parts of the query that are no hidden state (items.text_match) come from the prompt's items
    return model.finish_query(h[:, -1], [np.asarray(items[start - dropped:], dtype=np.int64)])  # (1, D)
