"""Multi-token item models: every item is written as a SEQUENCE of tokens of a causal LM (its
title, or its semantic-ID tuple) in the history and as the label; the top-k comes from beam
search constrained by a prefix trie over the catalog (trie.py). The baselines the single-token
ItemLM is measured against (method.md sections 1, 5 and 7).

A subclass supplies, per item, the input tokens that write it in a history and the output
tokens that spell it as a label (ending so that no item's label is a prefix of another's),
plus the output space: label tokens index rows ``out_offset ..`` of the LM's output embedding.

With the ``ids`` prompt (ItemLM's recipe template, data/prompts.py) a history item is instead ONE
learned input vector (``item_in``), so the prompt is token for token ItemLM's; only the answer
is spelled in the method's own tokens. Comparisons of decoding (benchmarks/latency.py) then
differ in nothing but the decode steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itemgen.data.prompts import Encoded, collate
from itemgen.models.backbones import cache_kwargs, output_cache
from itemgen.models.recommender import Recommender
from itemgen.models.trie import Trie, beam_search

STYLES = {
    "default": dict(prefix="The user has interacted with the following items in chronological order:",
                    item_open="", item_close=";", question=" Which item will the user interact with next?"),
    "compact": dict(prefix="History:", item_open="", item_close=";", question=" Next:"),
    # ItemLM's recipe template: one item slot per history item, no separator, no question (the
    # first answer token is read at the last item's slot)
    "ids": dict(prefix="History:", item_open="", item_close="", question=""),
}
ITEM_SLOTS = ("ids",)  # styles that write a history item as one learned vector, not as its tokens


class GenerativeItemLM(Recommender):
    """Items as token sequences. ``encode`` returns the prompt batch itself (a generative model's
    query is its prompt), and the "beam" decoder (topk/beam.py) turns it into a top-k list."""

    default_decoder = "beam"
    separators = True  # False: items follow each other without a separator (fixed-length codes)

    def __init__(self, backbone, tokenizer, n_items: int, style: str = "default"):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"prompt style {style!r} is not one of {', '.join(STYLES)}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.n_items = n_items
        self.style = style
        self.pad_token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        s = STYLES[style]
        tok = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []  # noqa: E731
        self.prefix, self.item_open = tok(s["prefix"]), tok(s["item_open"])
        self.item_close = tok(s["item_close"]) if self.separators else []
        self.question = tok(s["question"])
        self._trie: Trie | None = None
        # (I, H) one input vector per item (ids prompt only), drawn at the text embeddings' scale
        self.item_in: nn.Embedding | None = None
        if style in ITEM_SLOTS:
            w = backbone.get_input_embeddings().weight
            self.item_in = nn.Embedding(n_items, w.shape[1])
            with torch.no_grad():
                self.item_in.weight.normal_(0.0, float(w.float().std()))

    # ---- what a subclass defines -------------------------------------------------------
    item_tokens: list[list[int]]  # per item: input token ids that write it in a history
    label_tokens: list[list[int]]  # per item: output indices that spell it as a label
    out_offset: int = 0  # output index j is input token out_offset + j
    out_size: int  # size T of the output space

    def out_weight(self) -> torch.Tensor:
        """(T, H) output vectors of the label tokens (rows of the LM's output embedding)."""
        w = self.backbone.get_output_embeddings().weight
        return w[self.out_offset:self.out_offset + self.out_size]

    @property
    def trie(self) -> Trie:
        if self._trie is None:
            self._trie = Trie(self.label_tokens)
        return self._trie

    # ---- prompts -----------------------------------------------------------------------
    @property
    def decoder(self):
        """The transformer without its LM head: logits only where a label is."""
        return getattr(self.backbone, self.backbone.base_model_prefix)

    def encode_prompt(self, history, target: int | None = None) -> Encoded:
        """history (+ target as label tokens, for training) -> Encoded (labels = output indices;
        items = the item at an item slot (ids prompt), else -1)."""
        toks = list(self.prefix)
        slots = [-1] * len(toks)
        for i, item in enumerate(history):
            piece = (self.item_close if i else []) + self.item_open
            toks += piece
            slots += [-1] * len(piece)
            if self.item_in is None:
                toks += self.item_tokens[int(item)]
                slots += [-1] * len(self.item_tokens[int(item)])
            else:
                toks.append(-1)  # collate writes the pad token; embed() puts the item's vector there
                slots.append(int(item))
        toks += self.question
        slots += [-1] * len(self.question)
        labels = [-1] * len(toks)
        if target is not None:
            lab = self.label_tokens[int(target)]
            # the state at the last question token predicts lab[0], the state at lab[j] predicts lab[j+1]
            labels[-1] = lab[0]
            toks += [self.out_offset + t for t in lab[:-1]]
            slots += [-1] * (len(lab) - 1)
            labels += lab[1:]
        return Encoded(np.asarray(toks, np.int64), np.asarray(slots, np.int64), np.asarray(labels, np.int64))

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A collated prompt batch -> inputs_embeds (B, L, H): token embeddings, and each item
        slot's learned vector (ids prompt)."""
        text = self.backbone.get_input_embeddings()(batch["tokens"])  # (B, L, H)
        if self.item_in is None:
            return text
        is_item = batch["items"] >= 0  # (B, L)
        return text.masked_scatter(is_item[..., None], self.item_in(batch["items"][is_item]).to(text.dtype))

    # ---- training ----------------------------------------------------------------------
    def train_batch(self, seqs, rng):
        return collate([self.encode_prompt(s[:-1], int(s[-1])) for s in seqs], self.pad_token, side="right")

    def n_labels(self, seqs) -> int:
        return sum(len(self.label_tokens[int(s[-1])]) for s in seqs)

    def loss(self, batch):
        h = self.decoder(inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], use_cache=False).last_hidden_state  # (B, L, H)
        sel = batch["labels"] >= 0
        logits = F.linear(h[sel], self.out_weight())  # (N, T): only label positions reach the head
        return F.cross_entropy(logits.float(), batch["labels"][sel], reduction="sum")

    # ---- inference ---------------------------------------------------------------------
    def query_batch(self, histories):
        return collate([self.encode_prompt(h) for h in histories], self.pad_token)

    def encode(self, batch):
        return batch

    def score_items(self, query):
        raise NotImplementedError(f"{self.name} generates items token by token and has no full-catalog "
                                  "scores: evaluate it with a top-k decoder (decode='beam')")

    def _log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(F.linear(h, self.out_weight()).float(), dim=-1)  # (N, T)

    @torch.inference_mode()
    def beam_topk(self, batch: dict[str, torch.Tensor], k: int, exclude=None,
                  num_beams: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt batch -> (scores, ids) (B, k) by trie-constrained beam search with a KV cache."""
        batch = self.to_device(batch)
        mask, pos = batch["attention_mask"], batch["position_ids"][:, -1]  # (B, L), (B,)
        out = self.decoder(inputs_embeds=self.embed(batch), attention_mask=mask,
                           position_ids=batch["position_ids"], use_cache=True)
        cache = output_cache(out)
        state = {"mask": mask, "pos": pos}
        dev = mask.device

        def step(parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            parents = parents.to(dev)
            cache.reorder_cache(parents)  # (N, ...) rows follow their parent beams
            m = torch.cat([state["mask"][parents], torch.ones_like(parents)[:, None]], dim=1)  # (N, L + t)
            p = state["pos"][parents] + 1  # (N,)
            state["mask"], state["pos"] = m, p
            o = self.decoder(input_ids=(tokens.to(dev) + self.out_offset)[:, None], attention_mask=m,
                             position_ids=p[:, None], use_cache=True, **cache_kwargs(self.decoder, cache))
            return self._log_probs(o.last_hidden_state[:, -1]).cpu()

        first = self._log_probs(out.last_hidden_state[:, -1]).cpu()  # (B, T)
        return beam_search(first, step, self.trie, k, num_beams, exclude)
