"""The model side of the server: batched top-k over one loaded Predictor.

Everything here runs in the micro-batcher's worker thread (batching.py), under
``torch.inference_mode``. Rows of one batch share one encoder forward pass (the prompt prefix's
keys/values computed once at start, when the model has them); each decoder then scores its own
rows once, with the largest k asked for, and every row keeps its own first k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from itemgen.api import Predictor
from itemgen.serving.sessions import Session, session_query, supports_incremental


@dataclass
class Query:
    """One history to rank for: item indices oldest first (already validated)."""
    history: np.ndarray
    k: int
    exclude_history: bool = True
    decode: str = "exact"


@dataclass
class Ranked:
    scores: np.ndarray  # (k',) best first; k' <= k where exclusion left fewer finite scores
    ids: np.ndarray  # (k',) item indices


class Engine:
    def __init__(self, predictor: Predictor, use_prefix_cache: bool = True):
        self.predictor = predictor
        self.model = predictor.model
        self.max_history = predictor.cfg.data.max_history
        self.prefix = None
        if use_prefix_cache and hasattr(self.model, "prefix_cache"):
            self.prefix = self.model.prefix_cache()
        self.incremental = self.prefix is not None and supports_incremental(self.model)

    @torch.inference_mode()
    def encode(self, histories: list[np.ndarray]) -> torch.Tensor:
        """-> (B, D) query states of the truncated histories."""
        hist = [np.asarray(h)[-self.max_history:] for h in histories]
        if self.prefix is not None:
            return self.model.encode_cached(hist, self.prefix)
        return self.model.encode(self.model.to_device(self.model.query_batch(hist)))

    @torch.inference_mode()
    def rank(self, query: torch.Tensor, rows: list[Query]) -> list[Ranked | Exception]:
        """query (B, D), one Query per row -> per row its top-k, or the error of its decoder."""
        out: list[Ranked | Exception] = [None] * len(rows)  # type: ignore[list-item]
        by_decoder: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_decoder.setdefault(r.decode, []).append(i)
        for name, idx in by_decoder.items():
            try:
                decoder = self.predictor.decoder(name)
            except (ValueError, KeyError, ImportError, FileNotFoundError) as e:
                for i in idx:
                    out[i] = DecoderUnavailable(name, e)
                continue
            k = max(rows[i].k for i in idx)
            exclude = [rows[i].history if rows[i].exclude_history else np.zeros(0, np.int64) for i in idx]
            sel = torch.as_tensor(idx, device=query.device)
            scores, ids = decoder.topk(query.index_select(0, sel), k, exclude=exclude)  # (b, k)
            scores, ids = scores.float().cpu().numpy(), ids.cpu().numpy()
            for j, i in enumerate(idx):
                s, t = scores[j, :rows[i].k], ids[j, :rows[i].k]
                keep = np.isfinite(s)  # excluded items score -inf when too few remain
                out[i] = Ranked(s[keep], t[keep])
        return out

    def run_batch(self, rows: list[Query]) -> list[Ranked | Exception]:
        """The micro-batcher's callback: one encoder pass for the whole batch."""
        return self.rank(self.encode([r.history for r in rows]), rows)

    @torch.inference_mode()
    def run_session(self, session: Session, items: list[int], dropped: int, k: int, exclude_history: bool,
                    decode: str) -> Ranked:
        """A session's top-k, extending its cached keys/values (exclusive worker call)."""
        q = Query(np.asarray(items, dtype=np.int64), k, exclude_history, decode)
        query = session_query(self.model, self.prefix, session, items, dropped, self.max_history)
        r = self.rank(query, [q])[0]
        if isinstance(r, Exception):
            raise r
        return r


class DecoderUnavailable(ValueError):
    def __init__(self, name: str, cause: Exception):
        msg = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
        super().__init__(f"decode={name!r} is not available for this model: {msg}")
