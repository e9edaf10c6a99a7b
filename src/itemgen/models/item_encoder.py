"""Item encoders for ItemLM's input side (the ILM idea, arXiv 2406.02844): an item's input
vector built from its text, so a FROZEN backbone reads item vectors that already carry meaning.

``itemlm.item_encoder``:
    none      the ID table alone (the paper's default; item vectors start random)
    text      a trainable linear map of the item's text features (no per-item free parameters)
    text+id   text part + the ID table, summed (text prior, collaborative correction)

Text features are the frozen backbone's last hidden states mean-pooled over the item's title
tokens, computed ONCE when a model is built from pretrained weights. They live in a persistent
buffer, so the checkpoint carries them and loading never recomputes them (the checkpoint is the
cache). ``itemlm.lora_r > 0`` adds LoRA adapters (peft) to the frozen backbone's attention.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from itemgen.models.backbones import load_backbone

ENCODERS = ("none", "text", "text+id")


@torch.inference_mode()
def text_features(backbone, tokenizer, texts: list[str | None], *, max_tokens: int = 32,
                  batch_size: int = 64) -> torch.Tensor:
    """-> (I, H) float32: mean of the backbone's last hidden states over each text's first
    ``max_tokens`` tokens; a missing or empty text gives a zero row."""
    decoder = getattr(backbone, backbone.base_model_prefix)
    H = backbone.config.hidden_size
    ids = [tokenizer((t or "").strip(), add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    out = torch.zeros(len(texts), H)
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: len(ids[i]))  # less padding
    dev = next(backbone.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        L = max(len(ids[i]) for i in idx)
        tok = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):  # right padding: positions 0..n-1 as in any plain prompt
            tok[r, :len(ids[i])] = torch.as_tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        h = decoder(input_ids=tok.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
        m = mask.to(dev, h.dtype)[..., None]  # (B, L, 1)
        out[idx] = ((h * m).sum(1) / m.sum(1)).float().cpu()  # (B, H)
    return out


def title_encoder(cfg, backbone, tokenizer):
    """The (model, tokenizer) that encodes item titles: the model's own backbone, or
    ``cfg.text_backbone`` (an ItemLMConfig) loaded whole, e.g. every layer of a backbone that the
    recommender itself cuts to its first few."""
    if not cfg.text_backbone:
        return backbone, tokenizer
    text_lm, text_tok = load_backbone(cfg.text_backbone, dtype=backbone.dtype)
    return text_lm.to(backbone.device), text_tok


class ItemEncoder(nn.Module):
    """item index (...) -> (..., d_item) from fixed text features (I, F) through a trainable
    linear map. The ID part of ``text+id`` is ItemLM's own item table, added by the model."""

    def __init__(self, n_items: int, feature_dim: int, item_dim: int):
        super().__init__()
        self.register_buffer("text_feat", torch.zeros(n_items, feature_dim))  # (I, F), not trained
        self.text_proj = nn.Linear(feature_dim, item_dim)

    @torch.no_grad()
    def set_features(self, feats: torch.Tensor) -> None:
        """Store standardised features: LM hidden states have a few huge dimensions that would
        otherwise dominate the linear map. Zero rows (no text) stay zero."""
        if feats.shape != self.text_feat.shape:
            raise ValueError(f"text features have shape {tuple(feats.shape)}, expected {tuple(self.text_feat.shape)}")
        has = feats.abs().sum(1) > 0  # (I,)
        if has.any():
            mu = feats[has].mean(0)
            sd = feats[has].std(0, unbiased=False).clamp_min(1e-6)
            feats = torch.where(has[:, None], (feats - mu) / sd, torch.zeros_like(feats))
        self.text_feat.copy_(feats)

    def fit_text(self, backbone, tokenizer, titles: list[str | None] | None) -> int:
        """Compute and store the features from item titles; -> how many items had no title."""
        if titles is None:
            raise ValueError("itemlm.item_encoder needs item titles, and this dataset has none "
                             "(use itemlm.item_encoder=none)")
        self.set_features(text_features(backbone, tokenizer, titles))
        return sum(1 for t in titles if not (t or "").strip())

    @property
    def feature_dim(self) -> int:
        return self.text_feat.shape[1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text_feat[items])  # (..., d_item)


def add_lora(backbone, r: int) -> None:
    """LoRA adapters of rank r on the backbone's attention (peft's default targets for the
    architecture), in place; base weights stay frozen, only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model  # the peft extra

    for p in backbone.parameters():
        p.requires_grad_(False)
    try:
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0), backbone)
    except ValueError as e:
        raise ValueError(f"itemlm.lora_r={r}: peft cannot place LoRA adapters on this backbone: {e}") from None


@contextmanager
def adapters_disabled(backbone):
    """Run the backbone as it was before LoRA (for checking its text generation)."""
    layers = [m for m in backbone.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield backbone
    finally:
        for m in layers:
            m.enable_adapters(True)
