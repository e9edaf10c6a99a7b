"""The one interface every model implements, so training, evaluation, the CLI and serving
never special-case a model.

A recommender turns histories into query vectors (``encode``) and query vectors into scores
over the whole catalog (``score_items``); decoders (decoding.py) may shortcut the second step.
Training sees a batch built from item sequences whose last item is the label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from itemgen.config import Config
    from itemgen.data import ItemTable

MODEL_NAMES = ("itemlm", "sasrec", "bert4rec", "gru4rec", "title", "semantic_id")


class Recommender(nn.Module):
    name: str = "base"
    n_items: int
    # set by losses.attach_loss when config loss.kind != full; models then route the final states at
    # label positions through it instead of the full-catalog cross-entropy
    sampled_loss = None

    # ---- training ----------------------------------------------------------------------
    def train_batch(self, seqs: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """seqs: item sequences (history + label, already truncated) -> a CPU batch."""
        raise NotImplementedError

    def n_labels(self, seqs: list[np.ndarray]) -> int:
        """How many labels train_batch(seqs) supervises (for exact loss normalisation)."""
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum (not mean) of the per-label losses of the batch."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # training goes through forward() so that DDP wrappers see it
        return self.loss(batch)

    # ---- inference ---------------------------------------------------------------------
    def query_batch(self, histories: list[np.ndarray]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """-> (B, D) query states."""
        raise NotImplementedError

    def score_items(self, query: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, I) scores over the full catalog; higher is better."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device
        return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @torch.inference_mode()
    def scores(self, histories: list[np.ndarray]) -> torch.Tensor:
        """The slow, obvious path: every item's score for each history, (B, I)."""
        return self.score_items(self.encode(self.to_device(self.query_batch(histories))))


def build_model(cfg: "Config", items: "ItemTable", checkpoint_dir=None) -> Recommender:
    """A fresh model for ``cfg`` (pretrained backbone weights where it has one), or the
    architecture saved in ``checkpoint_dir`` (weights are loaded by checkpoint.py)."""
    if cfg.model == "itemlm":
        from itemgen.model import ItemLM

        return ItemLM.build(cfg, items, checkpoint_dir)
    if cfg.model == "sasrec":
        from itemgen.sasrec import SASRec

        return SASRec(len(items), cfg.sasrec, cfg.data.max_history)
    if cfg.model == "bert4rec":
        from itemgen.bert4rec import BERT4Rec

        return BERT4Rec(len(items), cfg.bert4rec, cfg.data.max_history)
    if cfg.model == "gru4rec":
        from itemgen.gru4rec import GRU4Rec

        return GRU4Rec(len(items), cfg.gru4rec, cfg.data.max_history)
    if cfg.model == "title":
        from itemgen.title_lm import TitleLM

        return TitleLM.build(cfg, items, checkpoint_dir)
    if cfg.model == "semantic_id":
        from itemgen.semantic_ids import SemanticIDLM

        return SemanticIDLM.build(cfg, items, checkpoint_dir)
    raise ValueError(f"unknown model {cfg.model!r} (known: {', '.join(MODEL_NAMES)})")
