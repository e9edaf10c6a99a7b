"""The model side of the server: batched top-k over one loaded Predictor.

Everything here runs in the micro-batcher's worker thread (batching.py), under
``torch.inference_mode``. Rows of one batch share one encoder forward pass (the prompt prefix's
keys/values computed once at start, when the model has them); each decoder then scores its own
rows once, with the largest k asked for, and every row keeps its own first k.

Decoders are made once, at start (``Engine.__init__`` runs in the worker while the server
loads): a request never builds or writes anything. L2D decoders need a memory built offline
(``itemgen evaluate CKPT --decode l2d_global`` writes ``CKPT/l2d/memory.safetensors``); without
one they are unavailable (a 422 naming no server path). A batch whose pass fails is retried row
by row, so one request's failure never fails its batch-mates; a row whose scores are not finite
(corrupt weights) is an error, never an empty list.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itemgen.api import Predictor
from itemgen.data.dataset import ItemTable
from itemgen.models.new_items import addable_problem, check_new_items, encode_new_items, merge_catalog
from itemgen.models.text_view import TextEncoder, item_texts, load_text_encoder
from itemgen.serving.sessions import Session, session_query, supports_incremental
from itemgen.topk.ann import AnnTopK
from itemgen.topk.factory import DECODERS
from itemgen.topk.l2d import L2DTopK, load_memory

logger = logging.getLogger("itemgen.serve")

L2D_MISSING = ("no L2D memory was built for this checkpoint; it is built offline (`itemgen evaluate CKPT "
               "--decode l2d_global` writes CKPT/l2d/memory.safetensors) and loaded when the server starts")


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
        self.text_encoder: TextEncoder | None = None  # loaded on the first add_items
        self.added = 0  # items added since the server started (in memory only)
        self.decoders: dict = {}  # name -> decoder, every one this server can use
        self.unavailable: dict[str, DecoderUnavailable] = {}  # name -> why not
        for name in DECODERS:
            self._prepare(name)

    def _prepare(self, name: str) -> None:
        try:
            if name.startswith("l2d_"):
                memory = load_memory(self.model, self.predictor.directory)
                if memory is None:
                    raise FileNotFoundError(L2D_MISSING)
                self.decoders[name] = L2DTopK(self.model, kind=name[len("l2d_"):], memory=memory)
            else:
                self.decoders[name] = self.predictor.decoder(name)
        except Exception as e:  # an optional decoder that cannot load never stops the server
            if not isinstance(e, (ValueError, KeyError, ImportError, FileNotFoundError)):
                logger.warning("decoder %s unavailable: %s: %s", name, type(e).__name__, e)
            self.unavailable[name] = DecoderUnavailable(name, e, hide=self.predictor.directory)

    def decoder(self, name: str):
        if name in self.decoders:
            return self.decoders[name]
        if name in self.unavailable:
            raise self.unavailable[name]
        raise DecoderUnavailable(name, ValueError(f"decoder {name!r} is not available for this model "
                                                  f"(available: {', '.join(self.decoders)})"))

    @torch.inference_mode()
    def encode(self, histories: list[np.ndarray]) -> torch.Tensor:
        """-> (B, D) query states of the truncated histories."""
        hist = [np.asarray(h)[-self.max_history:] for h in histories]
        if self.model.packs_histories:  # no padding, prefix and item rows cached
            return self.model.encode_histories(hist)
        if self.prefix is not None:
            return self.model.encode_cached(hist, self.prefix)
        return self.model.encode(self.model.to_device(self.model.query_batch(hist)))

    @torch.inference_mode()
    def rank(self, query: torch.Tensor, rows: list[Query]) -> list[Ranked | Exception]:
        """query (B, D), one Query per row -> per row its top-k, or its error (an unavailable
        decoder, a decoder that failed on it, scores that are not finite)."""
        out: list[Ranked | Exception] = [None] * len(rows)  # type: ignore[list-item]
        by_decoder: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_decoder.setdefault(r.decode, []).append(i)
        for name, idx in by_decoder.items():
            try:
                decoder = self.decoder(name)
            except DecoderUnavailable as e:
                for i in idx:
                    out[i] = e
                continue
            try:
                got = self._topk(decoder, query, rows, idx)
            except Exception:
                if len(idx) == 1:
                    raise
                got = [self._row(decoder, query, rows, i) for i in idx]  # find the row that fails
            for i, r in zip(idx, got):
                out[i] = r
        return out

    def _row(self, decoder, query: torch.Tensor, rows: list[Query], i: int) -> Ranked | Exception:
        try:
            return self._topk(decoder, query, rows, [i])[0]
        except Exception as e:
            logger.exception("decoding one row failed")
            return e

    def _topk(self, decoder, query: torch.Tensor, rows: list[Query], idx: list[int]) -> list[Ranked | Exception]:
        k = max(rows[i].k for i in idx)
        exclude = [rows[i].history if rows[i].exclude_history else np.zeros(0, np.int64) for i in idx]
        sel = torch.as_tensor(idx, device=query.device)
        # histories: the repeat bias (models/repeat_bias.py), if the model has one; Recommender.decode_histories
        # says which rows need theirs (an empty one: none)
        none = np.zeros(0, np.int64)
        hist = [rows[i].history if self.model.needs_histories(rows[i].exclude_history) else none for i in idx]
        scores, ids = decoder.topk(query.index_select(0, sel), k, exclude=exclude, histories=hist)  # (b, k)
        scores, ids = scores.float().cpu().numpy(), ids.cpu().numpy()
        out: list[Ranked | Exception] = []
        for j, i in enumerate(idx):
            s, t = scores[j, :rows[i].k], ids[j, :rows[i].k]
            keep = np.isfinite(s)  # excluded items score -inf when too few remain
            left = self.model.n_items - (len(np.unique(exclude[j])) if len(exclude[j]) else 0)
            if np.isnan(s).any() or np.isposinf(s).any() or (left > 0 and not keep.any()):
                out.append(ModelOutputError(f"the model produced non-finite scores (NaN/inf) for this history "
                                            f"with decode={rows[i].decode!r}: its weights are likely corrupt"))
            else:
                out.append(Ranked(s[keep], t[keep]))
        return out

    def run_batch(self, rows: list[Query]) -> list[Ranked | Exception]:
        """The micro-batcher's callback: one encoder pass for the whole batch (row by row when
        the batch's pass fails, so only the rows that fail get an error)."""
        try:
            return self.rank(self.encode([r.history for r in rows]), rows)
        except Exception:
            if len(rows) == 1:
                raise
            logger.exception("a batch of %d failed: retrying its rows one by one", len(rows))
            out: list[Ranked | Exception] = []
            for r in rows:
                try:
                    out.append(self.rank(self.encode([r.history]), [r])[0])
                except Exception as e:
                    out.append(e)
            return out

    def self_check(self) -> None:
        """One cheap exact-decoding pass at load: a model whose scores are not finite (weights
        corrupt behind a valid header) is refused instead of serving empty lists."""
        r = self.run_batch([Query(np.zeros(1, dtype=np.int64), k=1, exclude_history=False)])[0]
        if isinstance(r, Exception):
            raise r

    @property
    def add_problem(self) -> str | None:
        """Why this model cannot take new items (None: it can; models/new_items.py)."""
        return addable_problem(self.predictor.cfg)

    @torch.no_grad()  # not inference_mode: the grown tensors must stay ordinary (versioned) tensors
    def add_items(self, new: ItemTable) -> dict:
        """Append ``new`` to the served catalog (exclusive worker call: no batch runs meanwhile,
        so no request sees a half-updated catalog). Checked against the catalog as it is NOW (an
        add queued before this one may have taken an id), then encoded by the checkpoint's frozen
        text encoder (loaded on the first add), appended to the model with no ID part as
        ``itemgen items add`` does, the ANN index extended (or rebuilt), and L2D decoders refused
        (their memory holds training prefixes only: they could never rank an added item). The
        catalog's ids change last, so an id is known only once the model can score it; anything
        that fails before the model grows leaves everything as it was."""
        cfg = self.predictor.cfg
        fields = tuple(cfg.items.text_fields)
        check_new_items(self.predictor.items, new, fields, "request")
        t0 = time.perf_counter()
        if self.text_encoder is None:
            try:
                self.text_encoder = load_text_encoder(cfg.items.text_encoder)
            except Exception as e:
                logger.exception("text encoder %r could not be loaded", cfg.items.text_encoder)
                name = Path(cfg.items.text_encoder).name  # a local folder's path is the server's business
                raise TextEncoderUnavailable(f"the checkpoint's text encoder {name!r} could not be loaded on this "
                                             f"server ({type(e).__name__}; see the server log)") from None
            logger.info("text encoder %r loaded in %.2f s", cfg.items.text_encoder, time.perf_counter() - t0)
        view = encode_new_items(new, self.text_encoder, fields)  # (N, F)
        if not torch.isfinite(view).all():
            raise ModelOutputError("the text encoder produced non-finite vectors for the new items")
        n_old = self.model.n_items
        self.model.append_items(view, item_texts(new, fields))
        ann = None
        for name, decoder in list(self.decoders.items()):
            if isinstance(decoder, AnnTopK):
                try:
                    ann = decoder.index.extend(self.model)
                except Exception as e:  # the index is then unusable: refused with the reason, never stale
                    logger.exception("the ANN index could not follow the added items")
                    self._refuse(name, RuntimeError(f"its index could not follow the items added to the catalog "
                                                    f"({type(e).__name__}); restart the server"))
            elif isinstance(decoder, L2DTopK):
                self._refuse(name, ValueError("items were added to this server's catalog, and an L2D memory (hidden "
                                              "states of training prefixes) can never rank them; use decode=exact "
                                              "or ann"))
        self.predictor.items = merge_catalog(self.predictor.items, new)
        self.added += len(new)
        logger.info("added %d items (%d -> %d) in %.3f s, ann index %s", len(new), n_old, self.model.n_items,
                    time.perf_counter() - t0, ann or "none")
        return {"added": list(new.ids), "items": self.model.n_items, "ann_index": ann}

    def _refuse(self, name: str, why: Exception) -> None:
        self.decoders.pop(name, None)
        self.unavailable[name] = DecoderUnavailable(name, why)

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
    def __init__(self, name: str, cause: Exception, hide=None):
        msg = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
        if hide is not None:  # the server's paths are not the client's business
            for p in sorted({str(hide), str(hide.resolve())}, key=len, reverse=True):
                msg = msg.replace(p, "<checkpoint>")
        super().__init__(f"decode={name!r} is not available for this model: {msg}")


class TextEncoderUnavailable(RuntimeError):
    """The checkpoint's text encoder cannot be loaded here: items cannot be added (503)."""


class ModelOutputError(RuntimeError):
    """The model's scores are not finite: an answer would be empty or garbage."""
