"""The one interface every model implements, so training, evaluation, the CLI and serving
never special-case a model.

A recommender turns histories into query vectors (``encode``) and query vectors into scores
over the whole catalog (``score_items``); decoders (itemgen.topk) may shortcut the second step.
Training sees a batch built from item sequences whose last item is the label.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Recommender(nn.Module):
    name: str = "base"
    n_items: int
    # set by losses.attach_loss when config loss.kind != full; models then route the final states at
    # label positions through it instead of the full-catalog cross-entropy
    sampled_loss = None
    # set by training/distill.py when config distill.teacher is set: models that can learn from a
    # teacher (distillable) add its term to their cross-entropy, given batch["teacher_scores"]
    distillation = None
    # set by training/losses.attach_loss from loss.exclude_history: train_batch then also lists the
    # (label, earlier item) pairs its labels' softmaxes leave out, under "exclude"
    exclude_history = False
    distillable = False

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

    def label_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, I) item scores at every label of a train_batch, labels in order (row by row, left
        to right): what a distillation teacher gives its student (training/distill.py)."""
        raise NotImplementedError(f"{self.name} cannot be a distillation teacher")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # training goes through forward() so that DDP wrappers see it
        return self.loss(batch)

    # ---- inference ---------------------------------------------------------------------
    def query_batch(self, histories: list[np.ndarray]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """-> (B, D) query states."""
        raise NotImplementedError

    # Whether encode_histories is such a faster path (a server then keeps no prefix cache of its own).
    packs_histories: bool = False

    def encode_histories(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Histories (as the model should read them: already truncated) -> (B, D) query states,
        equal to encode(query_batch(histories)); a model may compute them by a faster path with
        the same result (ItemLM: models/packed_decoder.py). Serving and Predictor call this."""
        return self.encode(self.to_device(self.query_batch(histories)))

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
        return self.score_items(self.encode_histories(histories))

