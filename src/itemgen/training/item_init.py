"""Where ItemLM's item vectors start (``itemlm.init``), computed before the first step.

    random   the paper's default: the table starts random and trains with the LLM
    text     the backbone's own last hidden states of each item's title (mean over its tokens),
             reduced to itemlm.item_dim by PCA for the ID table, whole (H) for the output vectors
    ials     implicit ALS item factors of the TRAINING split (the paper's WALS option)
    sasrec   the item embeddings of a trained SASRec checkpoint (E4SRec style; itemlm.init_from)

Only training calls this: a checkpoint already holds the trained vectors.
"""

from __future__ import annotations

import numpy as np
import torch

from itemgen.core.config import Config
from itemgen.data.dataset import DataError, SequenceDataset
from itemgen.heads.clusters import als_item_factors
from itemgen.models.checkpoint import CheckpointError, load_checkpoint
from itemgen.models.item_encoder import text_features, title_encoder


def pca(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, F) -> (N, dim): projection on the top principal directions (zero-padded if F < dim)."""
    x = x.float() - x.float().mean(0)
    k = min(dim, *x.shape)
    _, _, v = torch.pca_lowrank(x, q=k, center=False, niter=4)  # v (F, k)
    out = x @ v
    return torch.nn.functional.pad(out, (0, dim - k))


def title_vectors(model, ds: SequenceDataset) -> torch.Tensor:
    """(I, F) states of each title (the backbone's, or itemlm.text_backbone's: F its width);
    items without a title get the mean of the others."""
    titles = ds.items.fields.get("title")
    if titles is None or not any((t or "").strip() for t in titles):
        raise DataError("itemlm.init=text needs item titles, and this dataset has none "
                        "(use itemlm.init=ials or random)")
    text_lm, text_tok = title_encoder(model.cfg, model.backbone, model.tokenizer)
    feats = text_features(text_lm, text_tok, titles).clone()  # (I, F), out of inference mode
    has = feats.abs().sum(1) > 0
    feats[~has] = feats[has].mean(0)
    # standardise per dimension: LM states have a few huge outlier dimensions (item_encoder.py)
    return (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)


def sasrec_vectors(path: str, ds: SequenceDataset) -> torch.Tensor:
    try:
        sas, cfg, items = load_checkpoint(path)
    except (CheckpointError, OSError) as e:
        raise CheckpointError(f"itemlm.init_from={path}: {e}") from None
    if cfg.model != "sasrec":
        raise CheckpointError(f"itemlm.init_from={path} is a {cfg.model} checkpoint, not sasrec")
    if list(items.ids) != list(ds.items.ids):
        raise CheckpointError(f"itemlm.init_from={path} was trained on another catalog "
                              f"({len(items)} items) than data.path ({len(ds.items)} items)")
    return sas.item_vectors().detach().float()  # (I, d)


def init_items(model, cfg: Config, ds: SequenceDataset) -> None:
    """Set a freshly built ItemLM's item vectors as ``itemlm.init`` says (no-op for random)."""
    m = cfg.itemlm
    if cfg.model != "itemlm" or m.init == "random":
        return
    if m.init == "text":
        feats = title_vectors(model, ds)  # (I, F)
        same_width = feats.shape[1] == model.backbone.config.hidden_size  # else outputs = projected inputs
        model.init_item_vectors(pca(feats, m.item_dim), out_vectors=feats if same_width and not m.tie_items else None)
    elif m.init == "ials":
        f = als_item_factors(ds, factors=m.item_dim, seed=cfg.train.seed)
        model.init_item_vectors(torch.from_numpy(np.asarray(f)))
    elif m.init == "sasrec":
        model.init_item_vectors(sasrec_vectors(m.init_from, ds))
