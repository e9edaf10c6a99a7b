"""ItemLM: a Hugging Face causal LM in which every catalog item is ONE token (method.md 2-4).

Input side: item index -> item table (I, d_item) -> feed-forward projection -> (H,), spliced
into ``inputs_embeds`` at item slots. Output side: the hidden state before a slot scores text
tokens and items together through a head (heads.py). One forward pass gives the top-k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from itemgen.config import Config, ItemLMConfig
from itemgen.data import ItemTable
from itemgen.heads import FullSoftmaxHead
from itemgen.item_encoder import ItemEncoder, add_lora
from itemgen.prompts import PromptBuilder, collate
from itemgen.recommender import Recommender


class ItemLM(Recommender):
    name = "itemlm"

    def __init__(self, backbone, tokenizer, items: ItemTable, cfg: ItemLMConfig):
        super().__init__()
        self.cfg = cfg
        self.n_items = len(items)
        self.backbone = backbone
        self.tokenizer = tokenizer
        H = backbone.config.hidden_size
        # item input vectors: ID table and/or an encoder of item text (item_encoder.py)
        self.item_embed = nn.Embedding(self.n_items, cfg.item_dim) if cfg.item_encoder != "text" else None  # (I, d_item)
        self.item_encoder = ItemEncoder(self.n_items, H, cfg.item_dim) if cfg.item_encoder != "none" else None
        self.item_proj = nn.Sequential(nn.Linear(cfg.item_dim, H), nn.GELU(), nn.Linear(H, H))
        text_weight = (lambda: self.backbone.get_output_embeddings().weight) if cfg.text_vocab_in_softmax else None
        if cfg.head != "full":
            raise ValueError(f"itemlm.head={cfg.head!r} is not available (available: full)")
        self.head = FullSoftmaxHead(self.n_items, H, text_weight)
        self.prompts = PromptBuilder(tokenizer, items, cfg.fields, cfg.max_field_tokens, cfg.prompt)
        self.pad_token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if cfg.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        if cfg.lora_r > 0:
            add_lora(self.backbone, cfg.lora_r)

    @classmethod
    def build(cls, cfg: Config, items: ItemTable, checkpoint_dir=None) -> "ItemLM":
        if checkpoint_dir is None:
            from itemgen.backbones import load_backbone

            backbone, tokenizer = load_backbone(cfg.itemlm.backbone, n_layers=cfg.itemlm.n_layers)
        else:  # architecture only; checkpoint.py loads every weight
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            bdir = Path(checkpoint_dir) / "backbone"
            bcfg = AutoConfig.from_pretrained(bdir)
            backbone = AutoModelForCausalLM.from_config(bcfg)
            tokenizer = AutoTokenizer.from_pretrained(bdir)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        model = cls(backbone, tokenizer, items, cfg.itemlm)
        if checkpoint_dir is None and model.item_encoder is not None:  # once; the checkpoint keeps them
            model.item_encoder.fit_text(backbone, tokenizer, items.fields.get("title"))
        return model

    def save_architecture(self, directory: Path) -> None:
        bdir = Path(directory) / "backbone"
        self.backbone.config.save_pretrained(bdir)
        self.tokenizer.save_pretrained(bdir)

    # ---- forward -----------------------------------------------------------------------
    @property
    def decoder(self):
        """The transformer without its LM head: we never want V-sized logits everywhere."""
        return getattr(self.backbone, self.backbone.base_model_prefix)

    def item_input(self, items: torch.Tensor) -> torch.Tensor:
        """item indices (...) -> (..., d_item): ID vector, text-encoder vector, or their sum."""
        vec = self.item_embed(items) if self.item_embed is not None else None
        if self.item_encoder is not None:
            vec = self.item_encoder(items) if vec is None else vec + self.item_encoder(items)
        return vec

    def embed(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """tokens, items (B, L) -> inputs_embeds (B, L, H)."""
        text = self.backbone.get_input_embeddings()(tokens)  # (B, L, H)
        is_item = items >= 0
        item = self.item_proj(self.item_input(items.clamp(min=0)))  # (B, L, H)
        return torch.where(is_item[..., None], item.to(text.dtype), text)

    def hidden(self, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """-> last hidden states (B, L, H)."""
        out = self.decoder(inputs_embeds=self.embed(batch["tokens"], batch["items"]),
                           attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                           use_cache=False, **kwargs)
        return out.last_hidden_state

    # ---- training ----------------------------------------------------------------------
    def train_batch(self, seqs, rng):
        c = self.cfg
        enc = [self.prompts.training_example(s, rng, c.id_only_share, c.field_keep_prob, c.supervise) for s in seqs]
        return collate(enc, self.pad_token)

    def n_labels(self, seqs) -> int:
        return sum(PromptBuilder.n_labels(len(s), self.cfg.supervise) for s in seqs)

    def loss(self, batch):
        h = self.hidden(batch)  # (B, L, H)
        sel = batch["labels"] >= 0  # (B, L)
        if self.sampled_loss is not None:  # loss.kind != full: sampled items only, text tokens left out
            return self.sampled_loss(h[sel], batch["labels"][sel], self.head.item_vectors())
        return self.head.loss(h[sel], batch["labels"][sel])  # only N label positions reach the head

    # ---- inference ---------------------------------------------------------------------
    def query_batch(self, histories):
        return collate([self.prompts.inference_prompt(h) for h in histories], self.pad_token)

    def encode(self, batch):
        return self.hidden(batch)[:, -1]  # (B, H): left padding puts every query last

    def score_items(self, query):
        return self.head.item_log_probs(query)

    def item_vectors(self) -> torch.Tensor:
        """(I, H) output vectors, for exact and ANN top-k."""
        return self.head.item_vectors()
