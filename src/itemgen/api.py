"""The library calls behind the CLI and the server: load a checkpoint, recommend, evaluate."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from itemgen.core.config import Config
from itemgen.core.io import atomic_write_text
from itemgen.data.dataset import DataError, SequenceDataset
from itemgen.data.load import load_dataset
from itemgen.evaluation.evaluate import evaluate, evaluate_decoder, rank_examples
from itemgen.evaluation.metrics import ndcg_gains
from itemgen.evaluation.segments import SHORT_HISTORY, TAIL_MAX, dataset_segments, segment_rules
from itemgen.models.checkpoint import CheckpointError, load_checkpoint, read_config, read_items
from itemgen.models.recommender import Recommender
from itemgen.topk.exact import check_k
from itemgen.topk.factory import make_decoder


class Predictor:
    """A loaded checkpoint that maps external item ids to top-k recommendations."""

    def __init__(self, model: Recommender, cfg: Config, items, directory: Path):
        self.model, self.cfg, self.items, self.directory = model, cfg, items, Path(directory)
        self._decoders: dict = {}

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "Predictor":
        model, cfg, items = load_checkpoint(directory, device)
        return cls(model, cfg, items, directory)

    def decoder(self, name: str = "exact"):
        got = self._decoders.get(name)  # first: resolving "exact" is a failed module attribute look-up
        if got is None:
            # models without full-catalog scores (beam search) name their own
            real = getattr(self.model, "default_decoder", "exact") if name == "exact" else name
            if real not in self._decoders:
                self._decoders[real] = make_decoder(real, self.model, checkpoint_dir=self.directory)
            got = self._decoders[name] = self._decoders[real]
        return got

    def to_indices(self, histories: list[list[str]], unknown: str = "error") -> list[np.ndarray]:
        """External ids -> index arrays; unknown ids raise KeyError listing them (or are dropped)."""
        out = []
        for h in histories:
            if unknown == "ignore":
                idx = self.items.index
                out.append(np.asarray([idx[x] for x in h if x in idx], dtype=np.int64))
            else:
                out.append(np.asarray(self.items.lookup(list(h)), dtype=np.int64))
        return out

    @torch.inference_mode()
    def topk_indices(self, histories: list[np.ndarray], k: int = 10, exclude_history: bool = True,
                     decode: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        check_k(k, self.model.n_items)
        max_h = self.cfg.data.max_history
        hist = [h[-max_h:] for h in histories]
        query = self.model.encode_histories(hist)  # (B, D)
        scores, ids = self.decoder(decode).topk(query, k, exclude=histories if exclude_history else None,
                                                histories=self.model.decode_histories(hist, exclude_history))
        return scores.float().cpu().numpy(), ids.cpu().numpy()

    def recommend(self, histories: list[list[str]], k: int = 10, exclude_history: bool = True,
                  decode: str = "exact", unknown: str = "error") -> list[list[dict]]:
        idx = self.to_indices(histories, unknown)
        scores, ids = self.topk_indices(idx, k, exclude_history, decode)
        return [[{"id": self.items.ids[i], "score": float(s), "title": self.items.title(i)}
                 for s, i in zip(srow, irow) if np.isfinite(s)] for srow, irow in zip(scores, ids)]


def load_eval_dataset(cfg: Config, data: str | Path | None) -> SequenceDataset:
    if data is not None:
        return SequenceDataset.load(data)
    return load_dataset(cfg)


def resolve_device(device: str = "auto") -> str:
    """auto -> cuda when a GPU is visible, else cpu; anything else is passed through."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def run_info() -> dict:
    """Who/what/where for result files: command, commit, hardware, date."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None

    # a copy of the tree on another machine (a lent GPU) names its commit; its .git may be stale
    commit = os.environ.get("GIT_COMMIT") or commit

    hw = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "torch": torch.__version__, "python": platform.python_version()}
    return {"command": " ".join(sys.argv), "git_commit": commit, "hardware": hw,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _model_and_data(checkpoint: Path, data: str | Path | None, device: str):
    """A checkpoint and the dataset to evaluate it on (its own unless ``data``), checked to match."""
    model, cfg, items = load_checkpoint(checkpoint, device=resolve_device(device))
    _, trained_on = read_items(checkpoint)
    ds = load_eval_dataset(cfg, data)
    want = trained_on.get("content_hash")
    if want is not None and want != ds.content_hash():
        raise DataError(f"{checkpoint} was trained on dataset {trained_on.get('name')!r} (hash {want}); "
                        f"the dataset given has hash {ds.content_hash()}: item indices would not match")
    if ds.n_items != len(items):
        raise CheckpointError(f"checkpoint has {len(items)} items, dataset {ds.n_items}")
    return model, cfg, ds


def user_ndcg(checkpoint: str | Path, *, split: str = "test", data: str | Path | None = None,
              exclude_history: bool = False, k: int = 10, device: str = "auto") -> np.ndarray:
    """(users,) each user's NDCG@k on the split (exact full-catalog ranking), in the dataset's user
    order: two checkpoints' arrays pair up for metrics.paired_difference."""
    model, cfg, ds = _model_and_data(Path(checkpoint), data, device)
    ranks = rank_examples(model, ds.examples(split), max_history=cfg.data.max_history,
                          exclude_history=exclude_history)
    return ndcg_gains(ranks, k)


def user_segments(checkpoint: str | Path, *, split: str = "test", data: str | Path | None = None,
                  ) -> dict[str, np.ndarray]:
    """Segment name -> (users,) bool mask, in the same user order as :func:`user_ndcg`: with it,
    evaluation.segments.paired_by_segment(user_ndcg(a), user_ndcg(b), masks) gives each
    segment's paired difference and its standard error (evaluation/segments.py)."""
    return dataset_segments(load_eval_dataset(read_config(checkpoint), data), split)


def report_name(split: str, decode: str = "exact", exclude_history: bool = False) -> str:
    """The default report file of an evaluation, one per protocol so that no run overwrites
    another's: eval_SPLIT[_DECODER][_history_masked].json."""
    return (f"eval_{split}{'' if decode == 'exact' else '_' + decode}"
            f"{'_history_masked' if exclude_history else ''}.json")


def evaluate_checkpoint(checkpoint: str | Path, *, split: str = "test", decode: str = "exact",
                        data: str | Path | None = None, exclude_history: bool = False,
                        batch_size: int = 128, out: str | Path | None = None, device: str = "auto") -> dict:
    """Evaluate a checkpoint on a split: every metric over all users and per segment
    (evaluation/segments.py); the JSON report goes to ``out`` or CHECKPOINT/:func:`report_name`."""
    checkpoint = Path(checkpoint)
    model, cfg, ds = _model_and_data(checkpoint, data, device)
    examples = ds.examples(split)
    segments = dataset_segments(ds, split)
    if decode == "exact":  # models without full-catalog scores (beam search) name their own decoder
        decode = getattr(model, "default_decoder", "exact")
    if decode == "exact":
        metrics = evaluate(model, examples, max_history=cfg.data.max_history, batch_size=batch_size,
                           exclude_history=exclude_history, segments=segments)
    else:
        decoder = make_decoder(decode, model, checkpoint_dir=checkpoint)
        metrics = evaluate_decoder(model, decoder, examples,
                                   max_history=cfg.data.max_history, batch_size=batch_size,
                                   exclude_history=exclude_history, segments=segments)
        if hasattr(decoder, "stats"):  # e.g. clusters opened (structure), index type (ann)
            metrics["decoder"] = decoder.stats()
    report = {"checkpoint": str(checkpoint), "model": cfg.model, "dataset": ds.name, "split": split,
              "decode": decode, "exclude_history": exclude_history, "metrics": metrics,
              "segment_rules": {"tail_max": TAIL_MAX, "short_history": SHORT_HISTORY,
                                "definitions": segment_rules(ds.cold_items is not None)},
              **run_info()}
    path = Path(out) if out is not None else checkpoint / report_name(split, decode, exclude_history)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    report["path"] = str(path)
    return report
