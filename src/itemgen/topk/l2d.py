"""L2D, latent-space decoding (Wang et al. 2025, arXiv 2509.11524; method.md section 7).

A model tuned in language space (the title baseline) is decoded without generating text:

1. Memory: for every training prefix (history s[:j], target s[j]) keep the model's last
   hidden state h_j at the end of the prompt and the target v_j. Stored as a float16 matrix
   (N, D) with the targets (N,), beside the checkpoint in ``CKPT/l2d/memory.safetensors``.
2. Item representations, then ranking by L2 distance to the test state h:
   - global: g_v = mean of every h_j whose target is v            (decoder ``l2d_global``)
   - local:  the M memory states nearest to h (FAISS, exact L2 over the float16 matrix); each
     item among their targets is represented by the mean of ITS states among those M
                                                                    (decoder ``l2d_local``)
     Items with no state among the M rank below all of those, by their global distance.

Items never seen as a target have no representation and are never recommended (cold start):
their score is -inf and they come last. Works for any Recommender: the state is ``encode``'s
output, or, for generative models whose ``encode`` returns the prompt batch, the LM's last
hidden state at the end of the prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itemgen.data.dataset import training_sequences
from itemgen.data.load import load_dataset
from itemgen.models.checkpoint import read_config
from itemgen.models.recommender import Recommender
from itemgen.topk.exact import check_k, mask_items

MEMORY_DIR = "l2d"
MEMORY_FILE = "memory.safetensors"
DEFAULT_M = 100


@torch.inference_mode()
def query_states(model: Recommender, query) -> torch.Tensor:
    """``model.encode`` output -> (B, D) float32 last hidden states."""
    if isinstance(query, torch.Tensor):
        return query.float()
    if isinstance(query, dict) and hasattr(model, "decoder"):  # generative: the query is the prompt
        b = model.to_device(query)
        h = model.decoder(input_ids=b["tokens"], attention_mask=b["attention_mask"],
                          position_ids=b["position_ids"], use_cache=False).last_hidden_state
        return h[:, -1].float()  # (B, D): left padding puts every prompt's end last
    raise TypeError(f"L2D needs hidden states from {model.name}.encode, got {type(query).__name__}")


def training_prefixes(sequences: list[np.ndarray], max_history: int,
                      per_sequence: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Every (history, target) a sequence holds, most recent ``per_sequence`` of each (None: all)."""
    hist, tgt = [], []
    for s in sequences:
        js = range(1, len(s))
        if per_sequence is not None:
            js = js[-per_sequence:]
        for j in js:
            hist.append(np.asarray(s[max(0, j - max_history):j], dtype=np.int64))
            tgt.append(int(s[j]))
    return hist, np.asarray(tgt, dtype=np.int64)


@dataclass
class Memory:
    states: torch.Tensor  # (N, D) float16
    targets: torch.Tensor  # (N,) int64 item index of each state
    n_items: int
    meta: dict

    def __post_init__(self) -> None:
        if self.states.ndim != 2 or self.targets.shape != (self.states.shape[0],):
            raise ValueError(f"L2D memory: states {tuple(self.states.shape)} and targets "
                             f"{tuple(self.targets.shape)} do not match")
        if len(self.targets) and not (0 <= int(self.targets.min()) and int(self.targets.max()) < self.n_items):
            raise ValueError(f"L2D memory: target indices outside 0..{self.n_items - 1}")
        self.states = self.states.to(torch.float16)
        self._global = None
        self._index = None

    @property
    def counts(self) -> torch.Tensor:
        """(I,) memory states per item; 0 = cold (never a training target)."""
        return torch.bincount(self.targets, minlength=self.n_items)

    def global_reps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (I, D) float32 mean state per item (zero rows for cold items), (I,) warm mask."""
        if self._global is None:
            D = self.states.shape[1]
            sums = torch.zeros(self.n_items, D).index_add_(0, self.targets, self.states.float())
            counts = self.counts
            self._global = (sums / counts.clamp_min(1)[:, None], counts > 0)
        return self._global

    def index(self):
        """FAISS exact-L2 index over the float16 states (fp16 scalar quantizer: no float32 copy)."""
        if self._index is None:
            import faiss  # the ann extra (faiss-cpu)

            ix = faiss.IndexScalarQuantizer(self.states.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
            ix.add(np.ascontiguousarray(self.states.float().numpy()))
            self._index = ix
        return self._index

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MEMORY_FILE
        fd, tmp = tempfile.mkstemp(prefix=f".{MEMORY_FILE}.", dir=directory)
        os.close(fd)
        try:
            save_file({"states": self.states.contiguous(), "targets": self.targets.contiguous()}, tmp,
                      metadata={"meta": json.dumps({**self.meta, "n_items": self.n_items})})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Memory":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no L2D memory at {path}")
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            states, targets = f.get_tensor("states"), f.get_tensor("targets")
        return cls(states, targets, int(meta.pop("n_items")), meta)


@torch.inference_mode()
def build_memory(model: Recommender, sequences: list[np.ndarray], *, max_history: int,
                 per_sequence: int | None = None, batch_size: int = 64, meta: dict | None = None) -> Memory:
    """Run the model over every training prefix and keep (last hidden state, target)."""
    hist, targets = training_prefixes(sequences, max_history, per_sequence)
    if not hist:
        raise ValueError("L2D memory: no training prefixes (sequences need at least 2 items)")
    was_training = model.training
    model.eval()
    order = np.argsort([len(h) for h in hist], kind="stable")  # similar lengths together: less padding
    states = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        h = query_states(model, model.encode(model.to_device(model.query_batch([hist[i] for i in idx]))))
        if states is None:
            states = torch.empty(len(hist), h.shape[1], dtype=torch.float16)
        states[torch.as_tensor(idx)] = h.cpu().to(torch.float16)
    model.train(was_training)
    info = {"model": model.name, "prefixes": len(hist), "max_history": max_history, "per_sequence": per_sequence}
    return Memory(states, torch.as_tensor(targets), model.n_items, {**info, **(meta or {})})


def weights_digest(checkpoint_dir: Path) -> str:
    h = hashlib.sha256()
    with open(Path(checkpoint_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def memory_path(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / MEMORY_DIR / MEMORY_FILE


def load_memory(model: Recommender, checkpoint_dir: str | Path) -> Memory | None:
    """CKPT/l2d/memory.safetensors if it was built from this checkpoint's weights; None when no
    memory was built (ValueError when it was built from other weights). Never builds: what a
    server calls at start (building takes minutes and writes into the checkpoint)."""
    path = memory_path(checkpoint_dir)
    if not path.is_file():
        return None
    mem = Memory.load(path)
    if mem.meta.get("weights") != weights_digest(checkpoint_dir) or mem.n_items != model.n_items:
        raise ValueError("the L2D memory was built from other weights: build it again with "
                         "`itemgen evaluate CKPT --decode l2d_global`")
    return mem


def memory_for_checkpoint(model: Recommender, checkpoint_dir: str | Path, *, per_sequence: int | None = None,
                          rebuild: bool = False) -> Memory:
    """CKPT/l2d/memory.safetensors, built from the checkpoint's training split when missing or
    when it was built from other weights (offline: evaluation and the CLI, never the server)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not rebuild:
        try:
            mem = load_memory(model, checkpoint_dir)
        except ValueError:  # built from other weights: rebuilt below
            mem = None
        if mem is not None:
            return mem
    cfg = read_config(checkpoint_dir)
    ds = load_dataset(cfg)
    if ds.n_items != model.n_items:
        raise ValueError(f"L2D memory: dataset {cfg.data.path} has {ds.n_items} items, the model {model.n_items}")
    mem = build_memory(model, training_sequences(ds, cfg.data.max_history), max_history=cfg.data.max_history,
                       per_sequence=per_sequence,
                       meta={"weights": weights_digest(checkpoint_dir), "dataset": ds.name})
    mem.save(checkpoint_dir / MEMORY_DIR)
    return mem


def exact_neighbours(states: torch.Tensor, h: torch.Tensor, m: int, chunk: int = 65536) -> np.ndarray:
    """states (N, D) float16, h (B, D) -> (B, m) indices of the m nearest states by L2 (-1 where
    N < m), nearest first; memory chunks of ``chunk`` rows so no (B, N) float32 copy of the states."""
    h = h.float()
    best_d = torch.full((len(h), 0), float("inf"))
    best_i = torch.zeros((len(h), 0), dtype=torch.long)
    for a in range(0, len(states), chunk):
        s = states[a:a + chunk].float()  # (n, D)
        d = (s.square().sum(1)[None] - 2 * h @ s.T) + h.square().sum(1, keepdim=True)  # (B, n)
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.arange(a, a + len(s)).expand(len(h), -1)], 1)
        best_d, sel = torch.topk(d, min(m, d.shape[1]), dim=1, largest=False)
        best_i = torch.gather(i, 1, sel)
    out = np.full((len(h), m), -1, dtype=np.int64)
    out[:, :best_i.shape[1]] = best_i.numpy()
    return out


class L2DTopK:
    """``topk(query, k, exclude) -> (scores, ids)``; scores are negative squared L2 distances."""

    def __init__(self, model: Recommender, kind: str = "global", memory: Memory | None = None,
                 checkpoint_dir: str | Path | None = None, m: int = DEFAULT_M, **_):
        if kind not in ("global", "local"):
            raise ValueError(f"L2D kind must be global or local, not {kind!r}")
        if m < 1:
            raise ValueError(f"L2D local needs M >= 1 nearest states, got {m}")
        if model.repeat is not None:  # its scores come from stored states, not from the history
            raise ValueError("L2D decoding does not apply a repeat bias (repeat.bias): decode exact or ann")
        if memory is None:
            if checkpoint_dir is None:
                raise ValueError("L2D decoding needs a memory: a checkpoint directory to build it from")
            memory = memory_for_checkpoint(model, checkpoint_dir)
        if memory.n_items != model.n_items:
            raise ValueError(f"L2D memory covers {memory.n_items} items, the model {model.n_items}")
        self.model, self.kind, self.memory, self.m = model, kind, memory, m
        self.name = f"l2d_{kind}"

    def global_scores(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, D) -> (B, I) -||h - g_v||^2, -inf for cold items."""
        g, warm = self.memory.global_reps()
        d = torch.cdist(h, g.to(h.device)).square()  # (B, I)
        return torch.where(warm.to(h.device), -d, torch.full_like(d, float("-inf")))

    def local_scores(self, h: torch.Tensor, neighbours: np.ndarray | None = None) -> torch.Tensor:
        """h (B, D) -> (B, I): items among the targets of the M nearest states score -||h - l_v||^2
        (l_v = mean of v's states among them); the others rank below, in global order; cold -inf.
        ``neighbours`` (B, M) state indices replaces the FAISS search (the brute-force reference)."""
        if neighbours is None:
            neighbours = self._search(h)
        scores = self.global_scores(h)  # (B, I) fallback order
        for b in range(h.shape[0]):
            nb = torch.as_tensor(neighbours[b][neighbours[b] >= 0])  # (M,)
            items, inv = torch.unique(self.memory.targets[nb], return_inverse=True)  # (U,), (M,)
            states = self.memory.states[nb].float()  # (M, D)
            local = torch.zeros(len(items), states.shape[1]).index_add_(0, inv, states)
            local /= torch.bincount(inv, minlength=len(items))[:, None]  # (U, D)
            d_local = (local - h[b].cpu()).square().sum(1)  # (U,)
            row = scores[b]
            finite = torch.isfinite(row)  # warm items (the M states' targets among them)
            # shift the fallback below the worst local score, keeping its global order
            row[finite] += -d_local.max() - 1.0 - row[finite].max()
            row[items] = -d_local
        return scores

    def _search(self, h: torch.Tensor) -> np.ndarray:
        """(B, D) -> (B, M) indices of the nearest memory states (-1 where fewer exist)."""
        try:
            import faiss  # the ann extra (faiss-cpu)
        except ImportError:  # the ann extra is optional: exact search in torch gives the same neighbours
            return exact_neighbours(self.memory.states, h, self.m)
        index = self.memory.index()
        threads = faiss.omp_get_max_threads()
        # FAISS's OpenMP team spinning against torch's threads cost ~1 s per request on a busy
        # CPU (measured); one thread is as fast for the small batches decoding sees
        faiss.omp_set_num_threads(1)
        try:
            _, nb = index.search(np.ascontiguousarray(h.cpu().numpy()), self.m)
        finally:
            faiss.omp_set_num_threads(threads)
        return nb

    @torch.inference_mode()
    def topk(self, query, k: int, exclude=None, histories=None) -> tuple[torch.Tensor, torch.Tensor]:
        # histories: unused, the constructor refuses a model with a repeat bias
        check_k(k, self.model.n_items)
        h = query_states(self.model, query).cpu()  # (B, D)
        scores = self.global_scores(h) if self.kind == "global" else self.local_scores(h)
        return torch.topk(mask_items(scores, exclude), k, dim=1)
