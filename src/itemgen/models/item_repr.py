"""The item representation: how a catalog item becomes the vectors a model reads (input side)
and scores (output side), as ONE component that ItemLM and SASRec compose (``items:`` section,
core/config.py ItemsConfig) and that ``itemgen items add`` extends to new items.

Input views (``items.input``), item index (...) -> (..., d) before the model's projection:

    id         the ID table (I, d) (the paper's and SASRec's default)
    text       a trainable linear map of the text view (F -> d): no per-item parameters
    text+id    that map + the ID table, summed (LLM-ESR-like text prior, collaborative correction)
    dual       [ID (d) ; mapped text (d)] -> a linear map to d (AlphaFuse's "dual view" baseline)
    nullspace  AlphaFuse (SIGIR'25): the text view on its top-d principal directions, whitened and
               FROZEN; an ID table (I, null_dim) is added to the last null_dim (lowest-variance)
               coordinates, so collaborative signal is learned where the text says least

Output views (``items.output``), -> (I, H) vectors scored by a dot product with the hidden state:

    untied     the head's own item vectors (heads/softmax.py; the two-level head's only choice)
    tied       the projected input vectors (ItemLM: a learned scale times the projection, or a
               linear map of the input vectors; SASRec: the input vectors themselves)
    text+id    a linear map of the text view + an ID residual (I, H)

The text view (I, F) is computed ONCE at build by a frozen encoder (models/text_view.py) and kept
as a buffer with the per-dimension centre and scale it is standardised with: loading never
recomputes it, and a new item is encoded and standardised the same way (``append_items``).

The text-match path (``items.text_match``, models/text_match.py): the model's query gains M q
(the mapped mean text view of the last n history items) and every item vector its text view t_i,
by concatenation, so scores are h . v_i + (M q) . t_i: a learned text-kNN beside the ID scores.
It works with every input and output view (the component keeps the text view for it even when
both are ID-only); an output with no text part of its own (untied, or tied to ID inputs) gets
the ID gate below on v_i, so an item without an ID part is scored by its text alone. With
``items.text_gate`` the text part is weighed per item by its bucket (ID closed, or its training-
count bucket, kept as ``item_bucket`` in the checkpoint): [v_i ; g(b_i) t_i ; c(b_i)].

The ID gate: items with no training interaction (``id_known`` False, set from the training
split before the first step) get NO ID part on either side, only text, exactly as a new item
will. ``items.id_dropout`` also closes the gate for a random share of items each training step
(DropoutNet), so the text path learns to rank ID-less items and the model cannot learn that
ID-less items are never targets. The gate only applies to views with a text part: an ID-only
model keeps every ID vector (an untrained one is all it has).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from itemgen.core.config import ItemsConfig
from itemgen.data.dataset import DataError, ItemTable
from itemgen.models.lexical import LexicalView
from itemgen.models.text_match import TextGate, TextMatch
from itemgen.models.text_view import TextEncoder, encode_items, load_text_encoder

TEXT_INPUTS = ("text", "text+id", "dual", "nullspace")


def uses_text(cfg: ItemsConfig) -> bool:
    """Whether the component keeps a text view (init=text alone only reads one once)."""
    return cfg.input in TEXT_INPUTS or cfg.output == "text+id" or cfg.text_match > 0


def output_view(cfg: ItemsConfig, model: str) -> str:
    """items.output with ``auto`` resolved: ItemLM's own head vectors, SASRec's tied table."""
    if cfg.output != "auto":
        return cfg.output
    return "tied" if model == "sasrec" else "untied"


def text_encoder(cfg: ItemsConfig, backbone=None, tokenizer=None) -> TextEncoder:
    """The frozen encoder items.text_encoder names; "" = ``backbone`` as built (ItemLM's own)."""
    if cfg.text_encoder:
        return load_text_encoder(cfg.text_encoder)
    if backbone is None:
        raise ValueError("items.text_encoder is empty (the model's own backbone) and this model has no "
                         "backbone: name an encoder (minilm, a backbone name or a local folder)")
    return TextEncoder("", getattr(backbone, backbone.base_model_prefix), tokenizer)


def compute_text_view(cfg: ItemsConfig, items: ItemTable, encoder: TextEncoder) -> torch.Tensor:
    """(I, F) every item's text view (zero rows for items without text); a catalog with no item
    text at all is an error naming the fields."""
    view, missing = encode_items(items, encoder, cfg.text_fields)
    if missing == len(items):
        raise DataError(f"items.input={cfg.input} / items.output={cfg.output} / items.init={cfg.init} / "
                        f"items.text_match={cfg.text_match} need item "
                        f"text, and no item has any of items.text_fields ({', '.join(cfg.text_fields)}): "
                        "use items.input=id")
    return view


class ItemRepr(nn.Module):
    """Item vectors of one catalog of ``n_items``.

    n_items  I
    dim      d: input vectors' width before ``proj`` (ItemLM: itemlm.item_dim; SASRec: hidden)
    width    H: the model's width, of projected inputs and of output vectors
    text_dim F: the text view's width (None: no text view)
    project  "mlp": d -> H -> H feed-forward (ItemLM) | "identity": d == H (SASRec)
    id_std   std of a random ID table (ItemLM: 1, nn.Embedding's; SASRec: 0.02)
    pad_row  the ID table has a leading zero row for padding (SASRec's layout, index + 1)
    dim_key  the config key that sets d (for error messages)
    """

    def __init__(self, n_items: int, dim: int, width: int, cfg: ItemsConfig, *, model: str,
                 text_dim: int | None = None, project: str = "mlp", id_std: float = 1.0, pad_row: bool = False,
                 dim_key: str = "itemlm.item_dim"):
        super().__init__()
        self.cfg, self.n_items, self.dim, self.width = cfg, n_items, dim, width
        self.input_view, self.output_view = cfg.input, output_view(cfg, model)
        self.pad, self.id_std, self.dim_key = int(pad_row), id_std, dim_key
        self.has_text = uses_text(cfg)
        if self.has_text and not text_dim:
            raise ValueError(f"items.input={cfg.input} / items.output={cfg.output} need a text view")
        if cfg.input == "nullspace" and not 1 <= cfg.null_dim < dim:
            raise ValueError(f"items.null_dim={cfg.null_dim} must be in [1, {dim}) (the input width)")
        # the ID table (I [+ 1], d_id): every input view but text has one ("emb" in its name: no
        # weight decay, as for every embedding table, training/loop.py)
        self.id_emb = None
        if cfg.input != "text":
            d_id = cfg.null_dim if cfg.input == "nullspace" else dim
            self.id_emb = nn.Embedding(n_items + self.pad, d_id, padding_idx=0 if pad_row else None)
            if id_std != 1.0:
                nn.init.normal_(self.id_emb.weight, std=id_std)
            if pad_row:
                with torch.no_grad():
                    self.id_emb.weight[0].zero_()
            if cfg.freeze_id:
                self.id_emb.weight.requires_grad_(False)
        # which items have an ID part (no training interaction: none); all until set_known
        self.register_buffer("id_known", torch.ones(n_items, dtype=torch.bool))  # (I,)
        self.text_proj = self.dual_map = None
        if self.has_text:
            self.register_buffer("text_view", torch.zeros(n_items, text_dim))  # (I, F) as the encoder gave it
            self.register_buffer("text_center", torch.zeros(text_dim))  # (F,) standardisation, fixed at build
            self.register_buffer("text_scale", torch.ones(text_dim))  # (F,)
            if cfg.input in ("text", "text+id", "dual"):
                self.text_proj = nn.Linear(text_dim, dim)
                if cfg.input == "text+id":
                    # the fused views start from their ID part: a model whose ID table starts from a
                    # trained SASRec (items.init=sasrec) starts where it left off and learns what text adds
                    nn.init.zeros_(self.text_proj.weight)
                    nn.init.zeros_(self.text_proj.bias)
                elif id_std != 1.0:  # text part at the ID table's scale (SASRec's 0.02), not ~0.6
                    nn.init.normal_(self.text_proj.weight, std=id_std / text_dim ** 0.5)
                    nn.init.zeros_(self.text_proj.bias)
            if cfg.input == "dual":
                self.dual_map = nn.Linear(2 * dim, dim)
                with torch.no_grad():  # starts as the ID view, [I | 0], for the reason above
                    self.dual_map.weight.copy_(torch.cat([torch.eye(dim), torch.zeros(dim, dim)], 1))
                    self.dual_map.bias.zero_()
            if cfg.input == "nullspace":  # (F, d) principal directions / sqrt(variance), set by set_text
                self.register_buffer("null_basis", torch.zeros(text_dim, dim))
        # the text-match path: M (F, F) on the query side, the text view beside every item vector
        self.match = TextMatch(text_dim, cfg.text_match, cfg.text_match_scale) if cfg.text_match > 0 else None
        # the item-side gate on it: g, c per bucket; every item's training-count bucket (set_counts)
        self.gate = TextGate(tuple(cfg.text_gate), cfg.text_gate_open) \
            if self.match is not None and cfg.text_gate else None
        if self.gate is not None:
            self.register_buffer("item_bucket", torch.ones(n_items, dtype=torch.long))  # (I,) 1..: open buckets
        if self.match is not None:
            # a logit added to every ID-closed item's score when scoring (never in training):
            # items.closed_prior, or chosen on validation (items.closed_prior_search). The training
            # loss leaves new items far below where they rank well (docs/text_notes.md, section 6)
            self.register_buffer("closed_prior", torch.tensor(float(cfg.closed_prior)))
        # the lexical view (models/lexical.py): w(b_i) u_i . q + beta(b_i) when scoring, weights
        # chosen on validation (evaluation/score_search.py); built by set_lexical, or loaded
        self.lexical = LexicalView(n_items, cfg.lexical) if self.match is not None and cfg.lexical > 0 else None
        # an output view without a text part of its own: the ID gate applies to v_i in match_items
        self._gate_matched = self.output_view == "untied" or self.output_view == "tied" and self.input_view == "id"
        self._match_cache = None
        self.proj = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width)) \
            if project == "mlp" else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        # output view tied: ItemLM's projected inputs at a learned scale (input) or a linear map
        self.tied_scale = self.out_proj = None
        if self.output_view == "tied" and project == "mlp":
            if cfg.tie_projection == "linear":
                # output vector = W x_i, so scores are bilinear in the input vectors as SASRec's
                self.out_proj = nn.Linear(dim, width, bias=False)
                nn.init.normal_(self.out_proj.weight, std=0.003)  # initial logit std ~1 (|h| ~ 40, table std 1)
            else:
                self.tied_scale = nn.Parameter(torch.tensor(0.1))
        self.out_text = self.id_out = None
        if self.output_view == "text+id":
            self.out_text = nn.Linear(text_dim, width)
            nn.init.zeros_(self.out_text.weight)  # the text part starts at zero, as the text+id input's
            nn.init.zeros_(self.out_text.bias)
            self.id_out = nn.Parameter(torch.randn(n_items, width) * 0.02)  # (I, H) ID residual
        self._step_gate: torch.Tensor | None = None
        self._cache = None

    # ---- set once before training -------------------------------------------------------------
    @torch.no_grad()
    def set_text(self, view: torch.Tensor) -> None:
        """Store the text view (I, F) (zero rows: no text) and fix its standardisation (and, for
        nullspace, the principal directions) from the rows that have text."""
        if not self.has_text:
            raise ValueError("this item representation keeps no text view")
        if view.shape != self.text_view.shape:
            raise ValueError(f"text view has shape {tuple(view.shape)}, expected {tuple(self.text_view.shape)}")
        view = view.float()
        has = view.abs().sum(1) > 0  # (I,)
        if int(has.sum()) >= 2:
            # LM states have a few huge dimensions that would otherwise dominate the linear maps;
            # and the rows are brought to norm ~1 (the sqrt(F)): under Adam a weight moves ~lr per
            # step whatever its gradient, so a map of F unit-variance features would move its
            # outputs ~sqrt(F) times faster than an ID vector moves, and the zero-started text part
            # swamped the SASRec-started ID part within the first epoch (office: validation
            # NDCG@10 0.048 vs 0.069 for the ID-only recipe after one epoch, measured)
            self.text_center.copy_(view[has].mean(0))
            self.text_scale.copy_(view[has].std(0, unbiased=False).clamp_min(1e-6) * view.shape[1] ** 0.5)
        self.text_view.copy_(view)
        if self.input_view == "nullspace":
            x = self.text_features()[has]  # (N, F)
            _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)  # s (k,), vh (k, F)
            k = min(self.dim, len(s))
            var = (s[:k] ** 2 / max(len(x) - 1, 1)).clamp_min(1e-6)
            self.null_basis.zero_()
            # whitened: every coordinate has the ID table's variance (AlphaFuse's standardisation)
            self.null_basis[:, :k] = vh[:k].T / var.sqrt() * self.id_std

    @torch.no_grad()
    def set_known(self, known: torch.Tensor) -> None:
        """known (I,) bool: items with at least one training interaction (the rest get no ID part)."""
        self.id_known.copy_(torch.as_tensor(known, dtype=torch.bool))

    @torch.no_grad()
    def set_counts(self, counts) -> None:
        """counts (I,) each item's training interactions: which items have an ID part (at least
        items.id_min_count), and (with items.text_gate) each item's count bucket, as the model saw
        them in training (bucket 0: none, the items training leaves out)."""
        counts = torch.as_tensor(counts, dtype=torch.long)
        self.set_known(counts >= self.cfg.id_min_count)
        if self.gate is not None:
            self.item_bucket.copy_(self.gate.buckets(counts))
        if self.lexical is not None:
            self.lexical.set_counts(counts)

    @torch.no_grad()
    def set_lexical(self, texts: list[str], seed: int = 0) -> None:
        """Build the lexical view from every item's text (item_text over items.text_fields), once."""
        if self.lexical is None:
            raise ValueError("this item representation has no lexical view (items.lexical)")
        self.lexical.fit(texts, self.cfg.lexical_min_df, seed)

    @torch.no_grad()
    def init_ids(self, vectors: torch.Tensor, std: float) -> None:
        """Fill the ID table with ``vectors`` (I, d_id), centred and rescaled to ``std`` (the
        random table's), so the layers after it see inputs of the size they were built for."""
        if self.id_emb is None:
            raise ValueError("items.init needs an ID table (items.input=text has none)")
        I, d = self.id_emb.weight.shape[0] - self.pad, self.id_emb.weight.shape[1]
        if tuple(vectors.shape) != (I, d):
            raise ValueError(f"item init vectors have shape {tuple(vectors.shape)}, the ID table is ({I}, {d}): "
                             f"set {self.dim_key}={vectors.shape[1]}" if vectors.shape[0] == I else
                             f"item init vectors cover {vectors.shape[0]} items, the catalog has {I}")
        v = vectors.float()
        v = v - v.mean(0)
        self.id_emb.weight[self.pad:].copy_((v * (std / v.std().clamp_min(1e-8))).to(self.id_emb.weight))

    # ---- the ID gate ---------------------------------------------------------------------------
    def begin_step(self) -> None:
        """A training step starts: draw which known items keep their ID part (items.id_dropout)."""
        if self.training and self.cfg.id_dropout > 0:
            keep = torch.rand(self.n_items, device=self.id_known.device) >= self.cfg.id_dropout
            self._step_gate = self.id_known & keep  # (I,)
        else:
            self._step_gate = None

    def unseen_in_training(self) -> torch.Tensor | None:
        """(I,) bool: items no training example shows (id_known False), for a model with a text
        view; None otherwise. Training leaves them out of the softmax: they do not exist yet when
        the model trains, as a new item will not. Kept in as ever-negatives, they taught the text
        path that their text region is never a target: office cold10, items.text_match=3 with
        id_dropout 0.2 scored new items NDCG@10 0.0013 against text-kNN's 0.0507 (measured)."""
        if not self.has_text:
            return None
        # with the gate, id_known may also close items seen a few times (items.id_min_count)
        unseen = ~self.id_known if self.gate is None else self.item_bucket == 0
        return unseen if bool(unseen.any()) else None

    def id_gate(self) -> torch.Tensor | None:
        """(I,) bool: items whose ID part counts now; None: every item's (ID-only views)."""
        if not self.has_text:
            return None
        if self.training and self._step_gate is not None:
            return self._step_gate
        return self.id_known

    # ---- input side ----------------------------------------------------------------------------
    def text_features(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """(..., F) standardised text view of ``items`` (None: all); zero rows stay zero."""
        view = self.text_view if items is None else self.text_view[items]
        has = view.abs().sum(-1, keepdim=True) > 0
        return torch.where(has, (view - self.text_center) / self.text_scale, torch.zeros_like(view))

    def _id(self, items: torch.Tensor) -> torch.Tensor:
        """(..., d_id) ID vectors, zero where the gate is closed."""
        vec = self.id_emb(items + self.pad)
        gate = self.id_gate()
        return vec if gate is None else vec * gate[items][..., None].to(vec.dtype)

    def raw_input(self, items: torch.Tensor) -> torch.Tensor:
        """item indices (...) -> (..., d) input vectors before the projection."""
        v = self.input_view
        if v == "id":
            return self.id_emb(items + self.pad)
        if v == "text":
            return self.text_proj(self.text_features(items))
        if v == "text+id":
            return self._id(items) + self.text_proj(self.text_features(items))
        if v == "dual":
            return self.dual_map(torch.cat([self._id(items), self.text_proj(self.text_features(items))], -1))
        sem = self.text_features(items) @ self.null_basis  # (..., d) frozen semantic coordinates
        return torch.cat([sem[..., :-self.cfg.null_dim], sem[..., -self.cfg.null_dim:] + self._id(items)], -1)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """item indices (...) -> (..., H) projected input vectors (items.dropout in training)."""
        return self.drop(self.proj(self.raw_input(items)))

    def all_raw_inputs(self) -> torch.Tensor:
        """(I, d) every item's input vector before the projection."""
        if self.input_view == "id":
            return self.id_emb.weight[self.pad:]
        return self.raw_input(torch.arange(self.n_items, device=self.id_known.device))

    # ---- output side ---------------------------------------------------------------------------
    def output_vectors(self) -> torch.Tensor:
        """(I, H) every item's output vector (not for output untied: the head has its own)."""
        if torch.is_grad_enabled() or self._step_gate is not None:  # training: recomputed every step
            return self._outputs()
        # scoring (evaluation, serving): kept until a weight it depends on changes: loading and
        # in-place updates bump the tensors' versions, moving devices changes their storage, and
        # train() / eval() drop it, because fused AdamW (training/loop.py) updates weights WITHOUT
        # bumping versions (a stale cache made every validation score the first one's vectors)
        key = tuple((t._version, t.data_ptr()) for t in list(self.parameters()) + list(self.buffers()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._outputs())
        return self._cache[1]

    def _outputs(self) -> torch.Tensor:
        if self.output_view == "text+id":
            res = self.id_out
            gate = self.id_gate()
            if gate is not None:
                res = res * gate[:, None].to(res.dtype)  # unknown (or dropped) items: text alone
            return self.out_text(self.text_features()) + res  # (I, H)
        if self.output_view != "tied":
            raise ValueError(f"items.output={self.output_view}: the head keeps the item vectors")
        x = self.all_raw_inputs()  # (I, d)
        if self.out_proj is not None:
            return self.out_proj(x)
        if self.tied_scale is not None:
            return self.proj(x) * self.tied_scale
        return self.proj(x)  # SASRec: the input table itself (identity projection)

    # ---- the text-match path (models/text_match.py) ---------------------------------------------
    def match_items(self, v: torch.Tensor) -> torch.Tensor:
        """(I, H) the model's item vectors -> (I, H + F + 1) [v_i ; t_i ; c_i], v_i zero where the ID gate is
        closed for an output without a text part (an output with one gates its ID part itself).
        Scoring keeps the result until v, the text view or the gate changes (output_vectors' rule)."""
        training = torch.is_grad_enabled() or self._step_gate is not None
        key = None
        if not training:
            # v is the head's own table (untied) or derives from this component's tensors (an
            # inference-mode result of output_vectors carries no version: its sources do)
            deps = [*self.parameters(), *self.buffers()] + ([] if v.is_inference() else [v])
            key = tuple((t._version, t.data_ptr()) for t in deps)
            if self._match_cache is not None and self._match_cache[0] == key:
                return self._match_cache[1]
        open_ = self.id_gate()  # (I,) bool (the match path always has a text view)
        if self._gate_matched and not bool(open_.all()):
            v = v * open_[:, None].to(v.dtype)
        text = self.text_view.to(v.dtype)  # (I, F)
        # (I,) the closed-item prior, when scoring: on ID-closed items (new, unknown, added)
        prior = v.new_zeros(len(v)) if training else (~open_).to(v.dtype) * self.closed_prior.to(v.dtype)
        if self.gate is None:
            out = torch.cat([v, text, prior[:, None]], 1)  # (I, H + F + 1)
        else:  # ID closed (new, unknown or dropped this step): bucket 0, as a new item's
            g, c = self.gate(torch.where(open_, self.item_bucket, torch.zeros_like(self.item_bucket)))
            out = torch.cat([v, text * g[:, None].to(v.dtype), (c.to(v.dtype) + prior)[:, None]], 1)  # (I, H + F + 1)
        if self._lexical_on():  # [.. ; c_i + beta(b_i) ; w(b_i) u_i] (I, H + F + 1 + k)
            lex = self.lexical
            b = lex.buckets(open_)
            out[:, -1] += lex.bias.to(v.dtype)[b]
            out = torch.cat([out, lex.vectors.to(v.dtype) * lex.weight.to(v.dtype)[b][:, None]], 1)
        if key is not None:
            self._match_cache = (key, out)
        return out

    def match_at(self, h: torch.Tensor, items: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """h (N, H) query states at the positions ``at`` (B, L) of a batch whose item slots are
        ``items`` (B, L) (-1 elsewhere) -> (N, H + F + 1) [h ; M q ; 1], q over the slots up to
        each position."""
        q_lex = self.match.slot_means(self.lexical.vectors, items, at) if self._lexical_on() else None  # (N, k)
        return self._match_query(h, self.match.slot_means(self.text_view, items, at), q_lex)  # q (N, F)

    def match_histories(self, h: torch.Tensor, histories) -> torch.Tensor:
        """h (B, H) query states at the end of ``histories`` -> (B, H + F + 1) [h ; M q ; 1]."""
        q_lex = self.match.history_means(self.lexical.vectors, histories) if self._lexical_on() else None  # (B, k)
        return self._match_query(h, self.match.history_means(self.text_view, histories), q_lex)  # q (B, F)

    def _match_query(self, h: torch.Tensor, q: torch.Tensor, q_lex: torch.Tensor | None = None) -> torch.Tensor:
        # the 1 reads every item's bias: the gate's c(b_i), the closed-item prior, beta(b_i)
        parts = [h, self.match(q).to(h.dtype), h.new_ones(h.shape[0], 1)]
        return torch.cat(parts if q_lex is None else parts + [q_lex.to(h.dtype)], 1)

    def _lexical_on(self) -> bool:
        """The lexical columns take part when scoring (eval mode), never in training: its weights
        are not trained, and k more columns in every training logit would cost for nothing."""
        return self.lexical is not None and not self.training

    def closed(self) -> torch.Tensor | None:
        """(I,) bool: items scored without an ID part (new, unknown, added), which the closed-item
        prior lifts; None for a model without the text-match path (it has no prior)."""
        return None if self.match is None else ~self.id_gate()

    @torch.no_grad()
    def set_closed_prior(self, value: float) -> None:
        if self.match is None:
            raise ValueError("the closed-item prior needs the text-match path (items.text_match)")
        self.closed_prior.fill_(float(value))

    def train(self, mode: bool = True):
        self._cache = self._match_cache = None  # see output_vectors
        self._step_gate = None
        return super().train(mode)

    # ---- new items -----------------------------------------------------------------------------
    @torch.no_grad()
    def append_items(self, view: torch.Tensor, texts: list[str] | None = None) -> None:
        """Add len(view) items at the end of the catalog from their text view (N, F) alone: no
        ID part (id_known False, zero ID rows), so their vectors come from text as an unknown
        item's. Every item-indexed tensor grows; trained weights are unchanged. ``texts`` (N,):
        their text (text_view.item_text), which the lexical view encodes (items.lexical)."""
        if not self.has_text:
            raise ValueError("this model keeps no text view (items.input / items.output have no text part)")
        n = view.shape[0]
        if view.ndim != 2 or view.shape[1] != self.text_view.shape[1]:
            raise ValueError(f"new items' text view has shape {tuple(view.shape)}, "
                             f"expected (N, {self.text_view.shape[1]})")
        if self.lexical is not None:
            if texts is None or len(texts) != n:
                raise ValueError(f"items.lexical: the {n} new items' texts are needed for their lexical view")
            self.lexical.append(self.lexical.encode(texts))
        dev = self.text_view.device
        self.text_view = torch.cat([self.text_view, view.to(dev, self.text_view.dtype)])
        self.id_known = torch.cat([self.id_known, torch.zeros(n, dtype=torch.bool, device=dev)])
        if self.gate is not None:  # the closed bucket, as any item without training interactions
            self.item_bucket = torch.cat([self.item_bucket, torch.zeros(n, dtype=torch.long, device=dev)])
        if self.id_emb is not None:
            w = self.id_emb.weight
            self.id_emb.weight = nn.Parameter(torch.cat([w, w.new_zeros(n, w.shape[1])]),
                                                requires_grad=w.requires_grad)
            self.id_emb.num_embeddings += n
        if self.id_out is not None:
            self.id_out = nn.Parameter(torch.cat([self.id_out, self.id_out.new_zeros(n, self.width)]))
        self.n_items += n
        self._cache = self._match_cache = None


def upgrade_state_dict(state: dict[str, torch.Tensor], renames: dict[str, str], prefix: str = "items.",
                       n_items: int | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors written before the ``items`` component, under today's names:
    ``renames`` maps old key prefixes (e.g. "item_embed.") to new ones (e.g. "items.id_emb.");
    an old text feature table was stored standardised (centre 0, scale 1), and every item had its
    ID part then (id_known all True). State dicts already in today's layout come back unchanged."""
    if any(k.startswith(prefix) for k in state):
        if prefix + "match.scale" in state and prefix + "closed_prior" not in state:  # before the prior: none
            state = {**state, prefix + "closed_prior": torch.tensor(0.0)}
        return state
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key == old or key.startswith(old) and old.endswith("."):
                key = new + key[len(old):] if old.endswith(".") else new
                break
        out[key] = value
    if n_items is not None:
        out[prefix + "id_known"] = torch.ones(n_items, dtype=torch.bool)
    if prefix + "text_view" in out:
        dim = out[prefix + "text_view"].shape[1]
        out[prefix + "text_center"] = torch.zeros(dim)
        out[prefix + "text_scale"] = torch.ones(dim)
    return out


def text_dim_of(checkpoint_dir) -> int | None:
    """The text view's width F from a checkpoint's tensor shapes (today's name or the old one),
    read from the safetensors header: the view itself is loaded with the other weights."""
    with safe_open(str(Path(checkpoint_dir) / "model.safetensors"), "pt") as f:
        for key in ("items.text_view", "item_encoder.text_feat"):
            if key in f.keys():
                return f.get_slice(key).get_shape()[1]
    return None
