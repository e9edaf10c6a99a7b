"""SASRec (Kang & McAuley, 2018): causal self-attention over item ids, every position predicts
the next item, cross-entropy over the full catalog (the strong variant, not sampled BCE).

Its item vectors come from the item representation (item_repr.py, the ``items`` section) at the
model's width, tied on both sides as SASRec does: ``items.input=text+id`` makes "SASRec + text"
(a projected text view plus the ID table), ``items.output=text+id`` a separate text+id output.
``items.text_match`` adds the text-match path (models/text_match.py): queries [h ; M q], item
vectors [v_i ; t_i]."""

from __future__ import annotations


import torch
from torch import nn

from itemgen.core.config import Config, ItemsConfig, SASRecConfig
from itemgen.data.dataset import ItemTable
from itemgen.models.item_repr import ItemRepr, compute_text_view, text_dim_of, text_encoder, upgrade_state_dict, uses_text
from itemgen.models.next_item import NextItemRecommender
from itemgen.models.text_view import item_texts


class SASRec(NextItemRecommender):
    name = "sasrec"

    # state-dict names before the item representation was one component (old checkpoints)
    LEGACY_KEYS = {"item_emb.": "items.id_emb."}

    def __init__(self, n_items: int, cfg: SASRecConfig, max_len: int, items_cfg: ItemsConfig | None = None,
                 text_dim: int | None = None):
        super().__init__()
        self.n_items, self.max_len, self.cfg = n_items, max_len, cfg
        d = cfg.hidden
        # (I + 1, d) ID table with a zero padding row, N(0, 0.02) as before; text parts at that scale
        self.items = ItemRepr(n_items, d, d, items_cfg or ItemsConfig(), model="sasrec", text_dim=text_dim,
                              project="identity", id_std=0.02, pad_row=True, dim_key="sasrec.hidden")
        self.pos_emb = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        pre = cfg.layout == "pre_ln"
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, dim_feedforward=cfg.ffn or d, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=pre)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)  # pre_ln: after the blocks; post_ln: on the input embeddings
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    @classmethod
    def build(cls, cfg: Config, items: ItemTable, checkpoint_dir=None) -> "SASRec":
        if not uses_text(cfg.items):
            return cls(len(items), cfg.sasrec, cfg.data.max_history, cfg.items)
        if checkpoint_dir is not None:  # the text view is in the checkpoint: only its width is needed
            text_dim = text_dim_of(checkpoint_dir)
            return cls(len(items), cfg.sasrec, cfg.data.max_history, cfg.items, text_dim)
        view = compute_text_view(cfg.items, items, text_encoder(cfg.items))  # (I, F)
        model = cls(len(items), cfg.sasrec, cfg.data.max_history, cfg.items, view.shape[1])
        model.items.set_text(view)  # once; the checkpoint keeps it
        if model.items.lexical is not None:  # the words' view, once too (models/lexical.py)
            model.items.set_lexical(item_texts(items, cfg.items.text_fields), cfg.train.seed)
        return model

    def append_items(self, view: torch.Tensor, texts: list[str] | None = None) -> None:
        """Grow the catalog by len(view) items vectorised from their text view (N, F) alone
        (models/new_items.py)."""
        self.items.append_items(view, texts)  # texts: the lexical view's words (items.lexical)
        self.n_items = self.items.n_items

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return upgrade_state_dict(state, self.LEGACY_KEYS, n_items=self.n_items)

    @torch.no_grad()
    def init_item_vectors(self, vectors: torch.Tensor, out_vectors: torch.Tensor | None = None) -> None:
        """vectors (I, d) fill the ID table at its random scale (std 0.02); outputs are tied."""
        self.items.init_ids(vectors, std=0.02)

    def item_emb(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) shifted ids (0 = padding) -> (B, L, d) input vectors, zero at padding."""
        e = self.items(x - 1)  # padding reads row 0 of the ID table (zero) / any text row, masked:
        return e * (x > 0)[..., None].to(e.dtype)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) shifted ids -> (B, L, d)."""
        L = x.shape[1]
        pos = self.pos_emb(torch.arange(L, device=x.device))[None]  # (1, L, d)
        causal = nn.Transformer.generate_square_subsequent_mask(L, device=x.device)
        if self.cfg.layout == "post_ln":
            h = self.drop(self.norm(self.item_emb(x) + pos))
            return self.blocks(h, mask=causal, is_causal=True)
        h = self.drop(self.item_emb(x) * (self.cfg.hidden ** 0.5) + pos)
        return self.norm(self.blocks(h, mask=causal, is_causal=True))

    def loss(self, batch):
        self.items.begin_step()  # items.id_dropout: this step's ID-less items, on both sides
        return super().loss(batch)

    def unseen_in_training(self) -> torch.Tensor | None:
        return self.items.unseen_in_training()

    def queries(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """-> (N, d) states at ``at``, or (N, d + F) [h ; M q] with the text-match path."""
        h = super().queries(x, at)
        return h if self.items.match is None else self.items.match_at(h, x - 1, at)  # x - 1: padding -1

    def item_vectors(self) -> torch.Tensor:
        v = self.items.output_vectors()  # (I, d)
        return v if self.items.match is None else self.items.match_items(v)  # (I, d [+ F])
