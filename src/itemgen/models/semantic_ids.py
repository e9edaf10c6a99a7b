"""Semantic-ID baseline (TIGER style): every item is a tuple of L codes from residual k-means on
item embeddings, plus one code that separates items whose L codes collide. Codes are new tokens
of the backbone (one block of ``codebook`` tokens per level, then the collision codes); the
history is written as code tuples; decoding is beam search constrained to the catalog's tuples
(generative.py, trie.py). The output softmax runs over the code tokens only, as in TIGER.

Item embeddings (``semantic_ids.embeddings``):
    text  mean-pooled last hidden states of the backbone over each item's title, brand and
          category (the pretrained backbone, before any training);
    ials  iALS factors (implicit) fitted on the training split of ``data.path``, for datasets
          without text;
    auto  text when the items have titles, else ials.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from itemgen.core.config import Config, SemanticIDConfig
from itemgen.data.dataset import DataError, ItemTable, training_sequences
from itemgen.data.load import load_dataset
from itemgen.models.backbones import load_backbone
from itemgen.models.generative import GenerativeItemLM
from itemgen.models.title_lm import _backbone_from_checkpoint

CODES_FILE = "semantic_ids.json"  # checkpoint file: the codes and the text vocabulary size


class SemanticIDLM(GenerativeItemLM):
    name = "semantic_id"
    separators = False  # fixed-length tuples of level-specific tokens need no separator

    def __init__(self, backbone, tokenizer, codes: np.ndarray, codebook: int, text_vocab: int,
                 cfg: SemanticIDConfig):
        super().__init__(backbone, tokenizer, len(codes), cfg.prompt)
        codes = np.asarray(codes, dtype=np.int64)  # (I, L + 1)
        if codes.ndim != 2 or codes.shape[1] < 2:
            raise ValueError(f"codes must be (items, levels + 1), got shape {codes.shape}")
        if len({tuple(c) for c in codes.tolist()}) != len(codes):
            raise ValueError("semantic IDs are not unique per item")
        self.cfg = cfg
        self.codes, self.codebook, self.text_vocab = codes, codebook, text_vocab
        L = codes.shape[1] - 1
        n_collision = int(codes[:, L].max()) + 1
        # output index of level l code c: l * codebook + c; collision code j: L * codebook + j
        self.out_offset, self.out_size = text_vocab, L * codebook + n_collision
        if backbone.get_input_embeddings().weight.shape[0] != text_vocab + self.out_size:
            add_code_tokens(backbone, text_vocab, self.out_size, cfg.seed)
        self.label_tokens = [[lvl * codebook + int(c) for lvl, c in enumerate(row[:L])] + [L * codebook + int(row[L])]
                             for row in codes]
        self.item_tokens = [[text_vocab + t for t in lab] for lab in self.label_tokens]

    @classmethod
    def build(cls, cfg: Config, items: ItemTable, checkpoint_dir=None) -> "SemanticIDLM":
        c = cfg.semantic_ids
        if checkpoint_dir is not None:
            backbone, tokenizer = _backbone_from_checkpoint(checkpoint_dir)
            meta = json.loads((Path(checkpoint_dir) / CODES_FILE).read_text())
            return cls(backbone, tokenizer, np.asarray(meta["codes"]), meta["codebook"], meta["text_vocab"], c)

        backbone, tokenizer = load_backbone(c.backbone, n_layers=c.n_layers)
        text_vocab = backbone.get_input_embeddings().weight.shape[0]
        if c.codes:  # the same codes as an earlier run: comparisons across seeds, backbones, machines
            codes, codebook = load_codes(c.codes, len(items))
        else:
            emb = item_embeddings(cfg, items, backbone, tokenizer)
            codebook = min(c.codebook_size, len(items))
            codes = with_collision_code(residual_kmeans(emb, c.levels, codebook, c.seed))
        return cls(backbone, tokenizer, codes, codebook, text_vocab, c)

    def save_architecture(self, directory: Path) -> None:
        bdir = Path(directory) / "backbone"
        self.backbone.config.save_pretrained(bdir)
        self.tokenizer.save_pretrained(bdir)
        (Path(directory) / CODES_FILE).write_text(json.dumps(
            {"codes": self.codes.tolist(), "codebook": self.codebook, "text_vocab": self.text_vocab}) + "\n")


def load_codes(path: str | Path, n_items: int) -> tuple[np.ndarray, int]:
    """A checkpoint's semantic_ids.json (or its folder) -> codes (I, L + 1), codebook size."""
    path = Path(path)
    path = path / CODES_FILE if path.is_dir() else path
    try:
        meta = json.loads(path.read_text())
        codes, codebook = np.asarray(meta["codes"], dtype=np.int64), int(meta["codebook"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"semantic_ids.codes: cannot read codes from {path}: {e}") from e
    if codes.ndim != 2 or len(codes) != n_items:
        raise DataError(f"semantic_ids.codes: {path} has codes of shape {codes.shape}, the catalog {n_items} items")
    return codes, codebook


def add_code_tokens(backbone, text_vocab: int, n_codes: int, seed: int = 0) -> None:
    """Append n_codes token rows, drawn at random with the text embeddings' scale. (HF's default,
    mean resizing, can give every new row the same vector: codes would start indistinguishable.)"""
    backbone.resize_token_embeddings(text_vocab + n_codes, mean_resizing=False)
    with torch.no_grad():
        w = backbone.get_input_embeddings().weight  # (V + T, H)
        g = torch.Generator().manual_seed(seed)
        new = torch.randn(n_codes, w.shape[1], generator=g) * w[:text_vocab].float().std()
        w[text_vocab:] = new.to(w.dtype)
        out = backbone.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != w.data_ptr():  # untied output rows too
            out.weight[text_vocab:] = new.to(out.weight.dtype)


# ---- item embeddings -------------------------------------------------------------------------
def item_embeddings(cfg: Config, items: ItemTable, backbone, tokenizer) -> np.ndarray:
    kind = cfg.semantic_ids.embeddings
    has_text = "title" in items.fields and any(t for t in items.fields["title"])
    if kind == "auto":
        kind = "text" if has_text else "ials"
    if kind == "text":
        if not has_text:
            raise DataError("semantic_ids.embeddings=text needs item titles; this dataset has none (use ials)")
        return text_embeddings(items, backbone, tokenizer)
    if kind == "ials":
        ds = load_dataset(cfg)
        if ds.n_items != len(items):
            raise DataError(f"semantic_ids.embeddings=ials reads data.path={cfg.data.path!r}, which has "
                            f"{ds.n_items} items, not the {len(items)} being trained")
        return ials_embeddings(training_sequences(ds, cfg.data.max_history), len(items), seed=cfg.semantic_ids.seed)
    raise ValueError(f"semantic_ids.embeddings: {kind!r} is not one of auto, text, ials")


@torch.inference_mode()
def text_embeddings(items: ItemTable, backbone, tokenizer, max_tokens: int = 64, batch_size: int = 64) -> np.ndarray:
    """(I, H) mean of the backbone's last hidden states over each item's text."""
    f = items.fields
    texts = [" ".join(str(f[k][i]) for k in ("title", "brand", "category") if k in f and f[k][i]) or items.ids[i]
             for i in range(len(items))]
    base = getattr(backbone, backbone.base_model_prefix)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [x[:max_tokens] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    out = np.zeros((len(items), backbone.config.hidden_size), dtype=np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = max(len(ids[i]) for i in idx)
        tok = torch.full((len(idx), L), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            tok[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        h = base(input_ids=tok, attention_mask=mask, use_cache=False).last_hidden_state  # (b, L, H)
        m = mask[..., None].to(h.dtype)
        out[idx] = ((h * m).sum(1) / m.sum(1)).float().numpy()
    return out


def ials_embeddings(sequences: list[np.ndarray], n_items: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """(I, dim) iALS item factors from the training sequences (users x items, implicit counts)."""
    import scipy.sparse as sp  # the ann extra (scipy comes with implicit)
    from implicit.als import AlternatingLeastSquares  # the ann extra

    rows = np.concatenate([np.full(len(s), u) for u, s in enumerate(sequences)])
    cols = np.concatenate(sequences)
    ui = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(sequences), n_items))
    ui.sum_duplicates()
    model = AlternatingLeastSquares(factors=dim, iterations=15, regularization=0.05, random_state=seed)
    model.fit(ui, show_progress=False)
    f = model.item_factors
    return np.asarray(f.to_numpy() if hasattr(f, "to_numpy") else f, dtype=np.float32)


# ---- codes -----------------------------------------------------------------------------------
def residual_kmeans(emb: np.ndarray, levels: int, codebook: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """(I, D) embeddings -> (I, levels) codes: k-means (faiss) on the embedding, then on what the
    chosen centroid leaves over, level by level. Embeddings are centred and L2-normalised first."""
    import faiss  # the ann extra (faiss-cpu)

    x = np.asarray(emb, dtype=np.float32)
    x = x - x.mean(0, keepdims=True)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = np.ascontiguousarray(x)
    k = min(codebook, len(x))
    codes = np.zeros((len(x), levels), dtype=np.int64)
    for lvl in range(levels):
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed + lvl, verbose=False, min_points_per_centroid=1)
        km.train(x)
        _, assign = km.index.search(x, 1)
        codes[:, lvl] = assign[:, 0]
        x = np.ascontiguousarray(x - km.centroids[assign[:, 0]])
    return codes


def with_collision_code(codes: np.ndarray) -> np.ndarray:
    """(I, L) -> (I, L + 1): items sharing all L codes get 0, 1, 2, ... in index order."""
    seen: dict[tuple, int] = {}
    extra = np.zeros(len(codes), dtype=np.int64)
    for i, row in enumerate(map(tuple, codes.tolist())):
        extra[i] = seen.get(row, 0)
        seen[row] = extra[i] + 1
    return np.concatenate([codes, extra[:, None]], axis=1)
