"""ItemLM: a Hugging Face causal LM in which every catalog item is ONE token (method.md 2-4).

Input side: item index -> item input vector (I, d_item) -> feed-forward projection -> (H,),
spliced into ``inputs_embeds`` at item slots. Output side: the hidden state before a slot scores
text tokens and items together through a head (heads/softmax.py). One forward pass gives the top-k.
Both sides' item vectors come from the item representation (item_repr.py, the ``items`` section):
ID, text or fused inputs; the head's own (untied), tied or text+id outputs. With
``items.text_match`` every query also carries the text-match part (models/text_match.py): the
hidden state h (H,) becomes [h ; M q] (H + F,) wherever a query is made (training, label_scores,
encode, encode_cached, sessions through finish_query), and the head's item vectors [v_i ; t_i].
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itemgen.core.config import Config, ItemLMConfig, ItemsConfig
from itemgen.data.dataset import ItemTable, earlier_items, history_pairs
from itemgen.data.prompts import PromptBuilder, collate
from itemgen.heads.clusters import Clusters, resolve_clusters
from itemgen.heads.softmax import FullSoftmaxHead, TwoLevelHead, exclude_pairs
from itemgen.models import packed_decoder
from itemgen.models.backbones import add_dropout, cache_kwargs, load_backbone
from itemgen.models.item_encoder import add_lora
from itemgen.models.item_repr import ItemRepr, compute_text_view, text_dim_of, text_encoder, upgrade_state_dict, uses_text
from itemgen.models.recommender import Recommender
from itemgen.models.text_view import item_texts

# The packed path keeps every item's first-layer q|k|v (with the (I, H) input table) up to this
# size; a larger catalog computes them per request (SmolLM2: 6 KiB an item, 1 GiB ~ 175k items).
FIRST_LAYER_TABLE_BYTES = 1 << 30


class ItemLM(Recommender):
    name = "itemlm"

    distillable = True  # a student or a teacher, with either head (training/distill.py)

    def __init__(self, backbone, tokenizer, items: ItemTable, cfg: ItemLMConfig, items_cfg: ItemsConfig | None = None,
                 clusters=None, text_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_items = len(items)
        self.backbone = backbone
        self.tokenizer = tokenizer
        H = backbone.config.hidden_size
        # item vectors: inputs (I, d_item) -> MLP -> (I, H); outputs (I, H) unless the head's own.
        # text_dim: the text view's width F (None: no text view)
        self.items = ItemRepr(self.n_items, cfg.item_dim, H, items_cfg or ItemsConfig(), model="itemlm",
                              text_dim=text_dim)
        self.hidden_drop = nn.Dropout(cfg.hidden_dropout)
        text_weight = (lambda: self.backbone.get_output_embeddings().weight) if cfg.text_vocab_in_softmax else None
        self.clusters = clusters  # clusters.Clusters, two_level only (saved as CKPT/clusters.json)
        match = self.items.match is not None
        if match and (cfg.head != "full" or cfg.text_vocab_in_softmax):
            raise ValueError("items.text_match needs itemlm.head=full and itemlm.text_vocab_in_softmax=false "
                             "(its text part is scored against items only)")
        if cfg.head == "two_level":
            if clusters is None:
                raise ValueError("itemlm.head=two_level needs item clusters (clusters.py)")
            self.head = TwoLevelHead(self.n_items, H, text_weight, clusters.check(self.n_items).assign,
                                     correction=cfg.cluster_correction, refine=cfg.cluster_refine)
        elif cfg.head == "full":
            self.head = FullSoftmaxHead(self.n_items, H, text_weight, item_weight=None
                                        if self.items.output_view == "untied" else self.items.output_vectors,
                                        extend=self.items.match_items if match else None)
        else:
            raise ValueError(f"itemlm.head={cfg.head!r} is not available (available: full, two_level)")
        self.prompts = PromptBuilder(tokenizer, items, cfg.fields, cfg.max_field_tokens, cfg.prompt)
        self.pad_token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if cfg.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        if cfg.freeze_text_embeddings:  # also the tied LM head: no (V, H) gradient or optimizer state
            self.backbone.get_input_embeddings().weight.requires_grad_(False)
        if cfg.lora_r > 0:
            add_lora(self.backbone, cfg.lora_r)
        add_dropout(self.backbone, cfg.backbone_dropout)  # training mode only
        self._packed: _PackedState | None = None  # what the packed path reuses (encode_histories)
        self.register_load_state_dict_post_hook(ItemLM._drop_packed)  # load_state_dict(assign=True) too

    @classmethod
    def build(cls, cfg: Config, items: ItemTable, checkpoint_dir=None) -> "ItemLM":
        if checkpoint_dir is None:
            backbone, tokenizer = load_backbone(cfg.itemlm.backbone, n_layers=cfg.itemlm.n_layers)
            if not cfg.itemlm.pretrained:  # same shape, the architecture's own random initialisation
                from transformers import AutoModelForCausalLM

                torch.manual_seed(cfg.train.seed)
                backbone = AutoModelForCausalLM.from_config(backbone.config).eval()
        else:  # architecture only; checkpoint.py loads every weight
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            bdir = Path(checkpoint_dir) / "backbone"
            bcfg = AutoConfig.from_pretrained(bdir)
            backbone = AutoModelForCausalLM.from_config(bcfg)
            tokenizer = AutoTokenizer.from_pretrained(bdir)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        clusters = None
        if cfg.itemlm.head == "two_level":
            clusters = resolve_clusters(cfg, len(items)) if checkpoint_dir is None else \
                Clusters.load(Path(checkpoint_dir) / "clusters.json", len(items))
        if not uses_text(cfg.items):
            return cls(backbone, tokenizer, items, cfg.itemlm, cfg.items, clusters)
        if checkpoint_dir is not None:  # the text view is in the checkpoint: only its width is needed
            text_dim = text_dim_of(checkpoint_dir)
            return cls(backbone, tokenizer, items, cfg.itemlm, cfg.items, clusters, text_dim)
        view = compute_text_view(cfg.items, items, text_encoder(cfg.items, backbone, tokenizer))  # (I, F)
        model = cls(backbone, tokenizer, items, cfg.itemlm, cfg.items, clusters, view.shape[1])
        model.items.set_text(view)  # once; the checkpoint keeps it
        if model.items.lexical is not None:  # the words' view, once too (models/lexical.py)
            model.items.set_lexical(item_texts(items, cfg.items.text_fields), cfg.train.seed)
        return model

    # state-dict names before the item representation was one component (old checkpoints)
    LEGACY_KEYS = {"item_embed.": "items.id_emb.", "item_encoder.text_feat": "items.text_view",
                   "item_encoder.text_proj.": "items.text_proj.", "item_proj.": "items.proj.",
                   "tied_scale": "items.tied_scale", "out_proj.": "items.out_proj."}

    def append_items(self, view: torch.Tensor, texts: list[str] | None = None) -> None:
        """Grow the catalog by len(view) items vectorised from their text view (N, F) alone
        (models/new_items.py, and the server's POST /v1/items in memory). The prompt builder keeps
        the old table, which only training prompts with text fields read (inference prompts are
        ID slots): the grown model serves at once; save and reload it before training on. The
        head's own output vectors (untied) can only grow with the text-match path: a new item's
        row is zero (and its ID gate closed), so it is scored by its text alone."""
        untied = self.items.output_view == "untied"
        if untied and self.items.match is None:
            raise ValueError("items.output=untied: new items have no output vectors (the head's are per item)")
        self.items.append_items(view, texts)  # texts: the lexical view's words (items.lexical)
        if untied:
            w = self.head.item_out
            self.head.item_out = nn.Parameter(torch.cat([w, w.new_zeros(len(view), w.shape[1])]))
        self.n_items = self.head._n_items = self.items.n_items
        self._packed = None

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return upgrade_state_dict(state, self.LEGACY_KEYS, n_items=self.n_items)

    def save_architecture(self, directory: Path) -> None:
        bdir = Path(directory) / "backbone"
        self.backbone.config.save_pretrained(bdir)
        self.tokenizer.save_pretrained(bdir)
        if self.clusters is not None:
            self.clusters.save(Path(directory) / "clusters.json")

    # ---- forward -----------------------------------------------------------------------
    @property
    def decoder(self):
        """The transformer without its LM head: we never want V-sized logits everywhere."""
        return getattr(self.backbone, self.backbone.base_model_prefix)

    def all_item_inputs(self) -> torch.Tensor:
        """(I, d_item) every item's input vector before the projection."""
        return self.items.all_raw_inputs()

    @torch.no_grad()
    def init_item_vectors(self, vectors: torch.Tensor, out_vectors: torch.Tensor | None = None) -> None:
        """Start from given item vectors instead of random ones (item_init.py): vectors (I, d_id)
        fill the ID table at the random table's scale (std 1), so the projection sees inputs of the
        size it was built for. The head's own output vectors (untied), or the ID residual of the
        text+id output, become the projected inputs, or out_vectors (I, H), at the random head's
        scale (std 0.02): the same logit scale as a random start, but with the given geometry."""
        self.items.init_ids(vectors, std=1.0)
        target = getattr(self.head, "item_out", None) if self.items.output_view == "untied" else self.items.id_out
        if target is not None:
            out = self.items.proj(self.all_item_inputs()) if out_vectors is None else out_vectors.float()
            out = out - out.mean(0)
            out = out * (0.02 / out.std().clamp_min(1e-8))
            if isinstance(self.head, TwoLevelHead):  # both levels from the given geometry
                self.head.set_item_vectors(out)
            else:
                target.copy_(out.to(target))

    def embed(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """tokens, items (B, L) -> inputs_embeds (B, L, H)."""
        text = self.backbone.get_input_embeddings()(tokens)  # (B, L, H)
        is_item = items >= 0  # (B, L)
        item = self.items(items[is_item])  # (N_slots, H): no MLP at text positions
        return text.masked_scatter(is_item[..., None], item.to(text.dtype))

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
        batch = collate(enc, self.pad_token, side="right")
        if self.exclude_history:  # (P, 2) (label, earlier item), labels in row-major order as h[sel]
            batch["exclude"] = torch.from_numpy(earlier_items(seqs, last_only=c.supervise == "last"))
        if self.repeat is not None:  # (P, 3) (label, earlier item, recency), labels as above
            batch["repeat"] = torch.from_numpy(history_pairs(seqs, last_only=c.supervise == "last"))
        return batch

    def n_labels(self, seqs) -> int:
        return sum(PromptBuilder.n_labels(len(s), self.cfg.supervise) for s in seqs)

    def loss(self, batch):
        self.items.begin_step()  # items.id_dropout: this step's ID-less items, on both sides
        h = self.hidden(batch)  # (B, L, H)
        sel = batch["labels"] >= 0  # (B, L)
        # (N, D): only N label positions reach the head; the text-match part undropped
        hs = self.with_text_match(self.hidden_drop(h[sel]), batch, sel)
        if self.sampled_loss is not None:  # loss.kind != full: sampled items only, text tokens left out
            return self.sampled_loss(hs, batch["labels"][sel], self.head.item_vectors())
        if self.distillation is not None and not isinstance(self.head, FullSoftmaxHead):
            # two-level: its exact log P(item) over the whole catalog (the repeat bias in level 2),
            # O(I) a label as the teacher's own scores are; the CE is the two-level loss's value
            logp = self.label_log_probs(hs, batch).float()  # (N, I)
            ce = F.nll_loss(logp, batch["labels"][sel], reduction="sum")
            return self.distillation(ce, logp, batch["teacher_scores"])
        if self.distillation is not None:  # full head: the teacher is matched over items only
            logits = self.head.logits(hs).float()  # (N, V + I) or (N, I)
            offset = logits.shape[1] - self.n_items
            logits = self.with_repeat(logits, batch, offset)
            ce = F.cross_entropy(exclude_pairs(logits, batch.get("exclude"), offset), batch["labels"][sel] + offset,
                                 reduction="sum")
            return self.distillation(ce, logits[:, offset:], batch["teacher_scores"])
        if not isinstance(self.head, FullSoftmaxHead):  # two-level: neither exclusion applies
            return self.head.loss(hs, batch["labels"][sel], self.repeat_triples(batch.get("repeat")))
        return self.head.loss(hs, batch["labels"][sel], batch.get("exclude"), self.items.unseen_in_training(),
                              adjust=None if self.repeat is None else lambda z, offset: self.with_repeat(z, batch, offset))

    def with_repeat(self, logits: torch.Tensor, batch, offset: int = 0) -> torch.Tensor:
        """logits (N, V + I) at a train_batch's labels + the repeat bias at each label's earlier
        items (models/repeat_bias.py; items start at ``offset``), as the head takes an item bias
        (a two-level head's enters its level-2 softmax: heads/softmax.TwoLevelHead.with_item_bias)."""
        triples = self.repeat_triples(batch.get("repeat"))
        if triples is None:
            return logits
        items = self.head.with_item_bias(logits[:, offset:], triples)
        return items if offset == 0 else torch.cat([logits[:, :offset], items], dim=1)

    def label_log_probs(self, hs: torch.Tensor, batch) -> torch.Tensor:
        """hs (N, D) at a train_batch's labels -> (N, I) log P(item), the repeat bias included (as
        the head takes it: heads/softmax item_log_probs)."""
        return self.head.item_log_probs(hs, self.repeat_triples(batch.get("repeat")))

    def repeat_triples(self, pairs: torch.Tensor | None):
        """(P, 3) (row, item, recency) pairs -> (rows, items, bias values) on the model's device,
        or None without a repeat bias or pairs."""
        if self.repeat is None or pairs is None or not len(pairs):
            return None
        pairs = pairs.to(self.device)
        return pairs[:, 0], pairs[:, 1], self.repeat.bias(pairs[:, 2])

    @property
    def bias_moves_other_items(self) -> bool:
        return self.repeat is not None and self.head.bias_renormalises

    def history_scores(self, scores: torch.Tensor, histories: list[np.ndarray] | None) -> torch.Tensor:
        triples = self.history_triples(histories)
        return scores if triples is None else self.head.with_item_bias(scores, triples)

    def history_triples(self, histories: list[np.ndarray] | None):
        """The repeat bias at ``histories``' items as (rows, items, values), or None (repeat_triples)."""
        return None if self.repeat is None or histories is None else self.repeat_triples(self.repeat.pairs(histories))

    def ranking_scores(self, query: torch.Tensor, histories: list[np.ndarray] | None) -> torch.Tensor:
        # the head takes the repeat bias itself: a refining two-level head's level 1 depends on it
        return self.head.item_log_probs(query, self.history_triples(histories))

    def label_scores(self, batch):
        h = self.hidden(batch)  # (B, L, H)
        sel = batch["labels"] >= 0
        return self.label_log_probs(self.with_text_match(h[sel], batch, sel), batch)  # (N, I)

    def with_text_match(self, h: torch.Tensor, batch: dict[str, torch.Tensor], at: torch.Tensor) -> torch.Tensor:
        """h (N, H) hidden states at the positions ``at`` (B, L) of ``batch`` -> (N, D) queries:
        [h ; M q] with the text-match path (q over the item slots up to each position), else h."""
        return h if self.items.match is None else self.items.match_at(h, batch["items"], at)

    def finish_query(self, h: torch.Tensor, histories: list[np.ndarray]) -> torch.Tensor:
        """h (B, H) hidden states at the end of the prompts of ``histories`` (as the prompts hold
        them: truncated) -> (B, D) the queries encode() gives (sessions.py, encode_cached)."""
        return h if self.items.match is None else self.items.match_histories(h, histories)

    # ---- inference ---------------------------------------------------------------------
    def query_batch(self, histories):
        return collate([self.prompts.inference_prompt(h) for h in histories], self.pad_token)

    def encode(self, batch):
        last = torch.zeros_like(batch["items"], dtype=torch.bool)
        last[:, -1] = True  # left padding puts every query last
        return self.with_text_match(self.hidden(batch)[:, -1], batch, last)  # (B, D)

    # ---- serving: reuse keys/values instead of recomputing them (serving/server.py, sessions.py) ----
    def new_cache(self, like=None):
        """An empty DynamicCache, or one holding ``like``'s keys/values expanded to ``like``'s
        batch size (``like=(cache, B)``). Tensors are shared, never written in place: updates
        concatenate and crop slices, so the source cache stays valid."""
        from transformers import DynamicCache

        if like is None:
            return DynamicCache(config=self.backbone.config)
        src, B = like
        return DynamicCache([(layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1))
                             for layer in src.layers], config=self.backbone.config)

    def extend(self, cache, tokens: torch.Tensor, items: torch.Tensor,
               attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run positions tokens/items (B, S) on top of ``cache`` (which grows by S); attention_mask
        (B, past + S), a 4D additive mask (B, 1, S, past + S), or None for no padding; position_ids
        (B, S) default to past, past + 1, ... -> hidden states (B, S, H)."""
        past = cache.get_seq_length()
        B, S = tokens.shape
        pos = position_ids if position_ids is not None else \
            torch.arange(past, past + S, device=tokens.device)[None].expand(B, S)
        out = self.decoder(inputs_embeds=self.embed(tokens, items), attention_mask=attention_mask,
                           position_ids=pos, use_cache=True, **cache_kwargs(self.decoder, cache))
        return out.last_hidden_state

    @torch.inference_mode()
    def prefix_cache(self):
        """Keys/values (1 row) of the constant prompt prefix every inference prompt starts with.
        Compute once per loaded model (stale if the weights change) and pass to encode_cached."""
        cache = self.new_cache()
        p = torch.as_tensor(self.prompts.prefix, dtype=torch.long, device=self.device)[None]  # (1, P)
        if p.shape[1]:
            self.extend(cache, p, torch.full_like(p, -1))
        return cache

    @torch.inference_mode()
    def encode_cached(self, histories: list[np.ndarray], prefix, pack_tokens: int = 1024) -> torch.Tensor:
        """= encode(query_batch(histories)), but the prompt prefix comes from ``prefix``
        (prefix_cache()) instead of being recomputed for every row, and rows are packed into one
        sequence without padding (up to ``pack_tokens`` tokens per forward pass): a row's tokens
        see the prefix and their own row only, at the positions they would have alone -> (B, D)."""
        P = prefix.get_seq_length()
        if P == 0:
            return self.encode(self.to_device(self.query_batch(histories)))
        enc = [self.prompts.inference_prompt(h) for h in histories]
        out, start, total = [], 0, 0
        for b, e in enumerate(enc):  # greedy packs of consecutive rows
            total += len(e) - P
            if b + 1 == len(enc) or total + len(enc[b + 1]) - P > pack_tokens:
                out.append(self._encode_pack(enc[start:b + 1], prefix))
                start, total = b + 1, 0
        return self.finish_query(torch.cat(out), histories)  # (B, D)

    def _encode_pack(self, enc, prefix) -> torch.Tensor:
        P = prefix.get_seq_length()
        n = torch.tensor([len(e) - P for e in enc])  # (B,) tokens after the prefix per row
        tokens = torch.from_numpy(np.concatenate([e.tokens[P:] for e in enc]))  # (T,)
        items = torch.from_numpy(np.concatenate([e.items[P:] for e in enc]))  # (T,)
        tokens = torch.where(tokens >= 0, tokens, self.pad_token)
        row = torch.repeat_interleave(torch.arange(len(enc)), n)  # (T,) which row each token is in
        pos = P + torch.arange(len(row)) - torch.repeat_interleave(n.cumsum(0) - n, n)  # (T,)
        see = (row[:, None] == row[None, :]) & (pos[:, None] >= pos[None, :])  # (T, T) own row, causal
        dtype = self.backbone.get_input_embeddings().weight.dtype
        mask = torch.zeros((1, 1, len(row), P + len(row)), dtype=dtype)  # additive; the prefix is visible
        mask[0, 0, :, P:].masked_fill_(~see, torch.finfo(dtype).min)
        dev = self.device
        h = self.extend(self.new_cache((prefix, 1)), tokens[None].to(dev), items[None].to(dev), mask.to(dev),
                        pos[None].to(dev))  # (1, T, H)
        return h[0, (n.cumsum(0) - 1).to(dev)]  # (B, H): each row's last token

    # ---- inference: the packed path (models/packed_decoder.py) --------------------------------
    def encode_histories(self, histories: list[np.ndarray]) -> torch.Tensor:
        """= encode(query_batch(histories)) -> (B, D), without computing on padding, on the
        constant prompt prefix or on the last layer's positions before each row's last token
        (packed_decoder.py); the reference (the HF forward on a padded batch) in training mode and
        where the backbone's layers are not the ones that path computes."""
        state = None if self.training else self._packed_state()
        if state is None or state.decoder is None:
            return super().encode_histories(histories)
        with torch.inference_mode():
            P, dev = state.decoder.prefix.length, state.item_inputs.device
            slots = self.prompts.slots_only  # the ids prompt: after the prefix, the history's items as they are
            if slots:
                rows = [np.asarray(h, dtype=np.int64) for h in histories]  # each row's items after the prefix
            else:
                enc = [self.prompts.inference_prompt(h) for h in histories]
                rows = [e.items[P:] for e in enc]
            if P == 0 and any(len(r) == 0 for r in rows):  # an empty prompt: the reference says what it does
                return super().encode_histories(histories)
            order = sorted(range(len(rows)), key=lambda b: len(rows[b]))  # by length: less padding in attention
            lengths = [len(rows[b]) for b in order]
            items_np = np.ascontiguousarray(rows[0]) if len(rows) == 1 else np.concatenate([rows[b] for b in order])
            items = torch.from_numpy(items_np).to(dev)  # (T,)
            first = None
            if slots or bool((items_np >= 0).all()):  # one item token per slot, no text after the prefix
                if state.item_first is None:
                    x = state.item_inputs.index_select(0, items)  # (T, H)
                else:  # both rows of each item in one gather: [input | first layer's q|k|v] (_packed_state)
                    both = state.item_table.index_select(0, items)  # (T, H + Q + 2 KV)
                    x, first = both[:, :state.item_inputs.shape[1]], both[:, state.item_inputs.shape[1]:]
            else:
                tokens = torch.from_numpy(np.concatenate([enc[b].tokens[P:] for b in order])).to(dev)  # (T,)
                is_item = items >= 0
                x = self.backbone.get_input_embeddings()(tokens.clamp(min=0))  # (T, H); item slots' -1 replaced next
                x[is_item] = state.item_inputs[items[is_item]].to(x.dtype)
            h = state.decoder.last_states(x, lengths, first)  # (B, H) in length order
            if any(b != i for i, b in enumerate(order)):  # back to the callers' order
                h = h.new_empty(h.shape).index_copy_(0, torch.tensor(order, device=dev), h)
            return self.finish_query(h, histories)

    @property
    def packs_histories(self) -> bool:
        """Whether encode_histories takes the packed path (its layers are ones packed_decoder.py
        computes): a server then needs no prefix cache of its own for one-shot requests."""
        return packed_decoder.supported(self.decoder)

    def _packed_state(self) -> "_PackedState":
        """What depends on the weights only, computed once per weights: every item's projected input
        vector (I, H) (ItemRepr's MLP then runs once per catalog, not once per history slot) and
        what the first layer projects it to (I, Q + 2 KV) (up to FIRST_LAYER_TABLE_BYTES), the
        layers' weights as the packed forward reads them and the prompt prefix's keys/values (no
        decoder: the layers are not the ones it computes). Kept while every parameter and buffer it
        was computed from is unchanged (in-place updates bump versions, moving devices changes
        storage); train(), loading a state dict and append_items drop it."""
        # the device of the state kept: were the model moved, its storages (in the key) would differ
        autocast = torch.is_autocast_enabled((self.device if self._packed is None else self._packed.device).type)
        if self._packed is not None and self._packed.current(autocast):
            return self._packed
        with torch.no_grad():  # derived tensors, no graph back to the weights
            self._packed = self._new_packed_state(autocast)
        return self._packed

    def _new_packed_state(self, autocast: bool) -> "_PackedState":
        deps = [*self.parameters(), *self.buffers()]
        decoder = None
        if packed_decoder.supported(self.decoder):
            dev = self.device
            cache = self.new_cache()
            p = torch.as_tensor(self.prompts.prefix, dtype=torch.long, device=dev)[None]  # (1, P)
            last = self.extend(cache, p, torch.full_like(p, -1))[0, -1] if p.shape[1] else None  # (H,)
            prefix = packed_decoder.Prefix.from_cache(cache, last) if p.shape[1] else \
                packed_decoder.Prefix([], [], None)
            decoder = packed_decoder.PackedDecoder(self.decoder, prefix)
        items = self.items(torch.arange(self.n_items, device=self.device)) if decoder is not None else None  # (I, H)
        first = None
        if decoder is not None and \
                items.shape[0] * (items.shape[1] + decoder.first_width) * items.element_size() <= FIRST_LAYER_TABLE_BYTES:
            table = torch.cat([items, decoder.first_projections(items)], dim=1)  # (I, H + Q + 2 KV): one gather
            items, first = table[:, :items.shape[1]], table[:, items.shape[1]:]
        versioned = [t for t in deps if not t.is_inference()]
        return _PackedState(deps, versioned, _PackedState.key_of(deps, versioned, autocast), self.device, items,
                            decoder, first, None if first is None else table)

    @staticmethod
    def _drop_packed(module, incompatible_keys) -> None:
        module._packed = None

    def train(self, mode: bool = True):
        self._packed = None  # fused AdamW updates weights without bumping versions (item_repr.py)
        return super().train(mode)

    def score_items(self, query):
        return self.head.item_log_probs(query)

    def item_vectors(self) -> torch.Tensor:
        """(I, D) output vectors, for exact and ANN top-k (D = H, or H + F with the text-match path)."""
        return self.head.item_vectors()


_VERSION = operator.attrgetter("_version")


@dataclass
class _PackedState:
    """What ItemLM's packed path reuses, and the tensors it was computed from."""

    deps: list[torch.Tensor]  # every parameter and buffer of the model when computed
    # those of them with a version counter: an inference tensor (made under inference_mode) has
    # none, and it cannot be updated in place outside inference_mode either
    versioned: list[torch.Tensor]
    key: tuple  # their versions and storage, and whether autocast was on
    device: torch.device  # the model's when computed
    item_inputs: torch.Tensor | None  # (I, H) every item's projected input vector
    decoder: packed_decoder.PackedDecoder | None  # the layers as it reads them, the prompt prefix's keys/values
    # (I, Q + 2 KV) what the first layer projects each item's input to, or None: over the budget
    item_first: torch.Tensor | None = None

    # (I, H + Q + 2 KV) item_inputs | item_first, the tensor both are columns of (one gather per batch)
    item_table: torch.Tensor | None = None

    @staticmethod
    def key_of(deps: list[torch.Tensor], versioned: list[torch.Tensor], autocast: bool) -> tuple:
        # map: checked on every query, a loop in C
        return autocast, tuple(map(_VERSION, versioned)), tuple(map(torch.Tensor.data_ptr, deps))

    def current(self, autocast: bool) -> bool:
        return self.key == self.key_of(self.deps, self.versioned, autocast)
