"""What the item representation holds before the first step (``items.init``, and which items have
an ID part), computed from the training data. Only training calls this: a checkpoint already
holds the trained vectors.

    random   the paper's default: the ID table starts random and trains with the model
    text     "text initialisation": the ID table = PCA of the text view (items.text_encoder over
             items.text_fields) to the table's width; the untied output vectors = the text view
             itself when it is as wide as the model
    ials     implicit ALS item factors of the TRAINING split (the paper's WALS option)
    sasrec   the item embeddings of a trained SASRec checkpoint (E4SRec style; items.init_from)

Items with no interaction in the training split get no ID part in a view with text
(item_repr.py): ``id_known`` is counted here.
"""

from __future__ import annotations

import numpy as np
import torch

from itemgen.core.config import Config
from itemgen.data.dataset import SequenceDataset
from itemgen.heads.clusters import als_item_factors
from itemgen.models.checkpoint import CheckpointError, load_checkpoint
from itemgen.models.item_repr import compute_text_view, text_encoder
from itemgen.training.losses import item_counts


def pca(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, F) -> (N, dim): projection on the top principal directions (zero-padded if F < dim)."""
    x = x.float() - x.float().mean(0)
    k = min(dim, *x.shape)
    _, _, v = torch.pca_lowrank(x, q=k, center=False, niter=4)  # v (F, k)
    out = x @ v
    return torch.nn.functional.pad(out, (0, dim - k))


def text_vectors(model, cfg: Config, ds: SequenceDataset) -> torch.Tensor:
    """(I, F) the standardised text view (the model's own, or encoded now for an ID-only input);
    items without text get the mean of the others."""
    if model.items.has_text:
        feats = model.items.text_features().clone()
    else:
        view = compute_text_view(cfg.items, ds.items, text_encoder(cfg.items, getattr(model, "backbone", None),
                                                                   getattr(model, "tokenizer", None)))
        has = view.abs().sum(1) > 0
        feats = (view - view[has].mean(0)) / view[has].std(0).clamp_min(1e-6)
    has = feats.abs().sum(1) > 0
    feats[~has] = feats[has].mean(0)
    return feats


def sasrec_vectors(path: str, ds: SequenceDataset) -> torch.Tensor:
    try:
        sas, cfg, items = load_checkpoint(path)
    except (CheckpointError, OSError) as e:
        raise CheckpointError(f"items.init_from={path}: {e}") from None
    if cfg.model != "sasrec":
        raise CheckpointError(f"items.init_from={path} is a {cfg.model} checkpoint, not sasrec")
    if list(items.ids) != list(ds.items.ids):
        raise CheckpointError(f"items.init_from={path} was trained on another catalog "
                              f"({len(items)} items) than data.path ({len(ds.items)} items)")
    return sas.items.output_vectors().detach().float()  # (I, d): the ID side (no text-match columns)


def init_items(model, cfg: Config, ds: SequenceDataset) -> None:
    """Prepare a freshly built model's item representation as the ``items`` section says."""
    if cfg.model not in ("itemlm", "sasrec"):
        return
    rep = model.items
    if rep.has_text:  # no training interaction, no ID part (a new item's case, learned by the text path)
        rep.set_counts(torch.from_numpy(item_counts(ds.split.train, ds.n_items)))  # and text_gate's buckets
    it = cfg.items
    if it.init == "random":
        return
    width = rep.id_emb.weight.shape[1]
    out = None
    if it.init == "text":
        feats = text_vectors(model, cfg, ds)  # (I, F)
        vectors = pca(feats, width)
        if feats.shape[1] == rep.width and rep.output_view == "untied":  # else outputs = projected inputs
            out = feats
    elif it.init == "ials":
        vectors = torch.from_numpy(np.asarray(als_item_factors(ds, factors=width, seed=cfg.train.seed)))
    else:
        vectors = sasrec_vectors(it.init_from, ds)
        if it.input == "nullspace":  # the ID part is null_dim wide: its top principal directions
            vectors = pca(vectors, width)
    model.init_item_vectors(vectors, out_vectors=out)
