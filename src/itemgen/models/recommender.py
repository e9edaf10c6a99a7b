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

    @property
    def repeat(self):
        """models/repeat_bias.RepeatBias or None: a learned bias on the scores of the user's history
        items, in training and wherever scores come from a history. models/registry.py sets it from
        config ``repeat`` (``model.repeat = ...`` registers a submodule; a class attribute would hide it)."""
        return self._modules.get("repeat")

    def decode_histories(self, histories: list[np.ndarray], exclude_history: bool) -> list[np.ndarray] | None:
        """The histories a decoder is given with these rows (its ``histories``): for the repeat bias.
        With the history masked a plain bias moves only items the mask removes, so none are needed
        (sparing ANN re-scoring them); a two-level head's bias also renormalises the clusters it
        touches (ItemLM.history_scores), so it needs them either way. None: no bias to apply."""
        return histories if self.needs_histories(exclude_history) else None

    def needs_histories(self, exclude_history: bool) -> bool:
        """Whether a decoder needs the histories of rows ranked with (or without) the history masked."""
        return self.repeat is not None and (not exclude_history or self.bias_moves_other_items)

    # whether the repeat bias changes the scores of items outside the history (ItemLM with a two-level head)
    bias_moves_other_items: bool = False

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
        return self.ranking_scores(self.encode_histories(histories), histories)

    def ranking_scores(self, query: torch.Tensor, histories: list[np.ndarray] | None) -> torch.Tensor:
        """(B, D) query states from ``histories`` -> (B, I) what the model ranks by (exact top-k's
        scores): score_items with the repeat bias at the history items (history_scores)."""
        return self.history_scores(self.score_items(query), histories)

    def history_scores(self, scores: torch.Tensor, histories: list[np.ndarray] | None) -> torch.Tensor:
        """scores (B, I) from ``histories``' queries -> what the model ranks by: with a repeat bias,
        its value added at each history item (None: histories unknown, scores as they are)."""
        if self.repeat is None or histories is None:
            return scores
        return self.repeat.add_histories(scores, histories)

