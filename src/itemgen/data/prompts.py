"""Prompts that interleave text tokens and item slots (method.md section 2).

An encoded prompt is three aligned int arrays of length L:
    tokens[p]  text token id, or -1 where p is an item slot
    items[p]   item index at an item slot, else -1
    labels[p]  the item the hidden state at p must predict (the next slot's item), else -1

Pieces of text are tokenized once and cached; prompts are built by concatenating token ids,
never by re-tokenizing whole strings, so a prompt costs O(L) list work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from itemgen.data.dataset import ItemTable

STYLES = {
    # the paper's wording (method.md section 2)
    "default": dict(
        prefix="The user has interacted with the following items in chronological order:",
        item_open=" id:", item_close=",",
        question=" Which item will the user interact with next? id:"),
    # ids and minimal separators: the shortest prompt (latency work, issue 4)
    "compact": dict(prefix="History:", item_open="", item_close="", question=" Next:"),
    # no question: the next item is read at the last item's slot, where every other label of a
    # training sequence is read too (SASRec's query position)
    "ids": dict(prefix="History:", item_open="", item_close="", question=""),
}


@dataclass
class Encoded:
    tokens: np.ndarray  # (L,) int64
    items: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64

    def __len__(self) -> int:
        return len(self.tokens)


class PromptBuilder:
    def __init__(self, tokenizer, items: ItemTable | None = None, fields: tuple[str, ...] = (),
                 max_field_tokens: int = 16, style: str = "default"):
        if style not in STYLES:
            raise ValueError(f"prompt style {style!r} is not one of {', '.join(STYLES)}")
        self.tokenizer = tokenizer
        self.items = items
        self.fields = tuple(f for f in fields if items is not None and f in items.fields)
        self.max_field_tokens = max_field_tokens
        self.style = style
        tok = self._tok
        s = STYLES[style]
        self.prefix = tok(s["prefix"])
        self.item_open = tok(s["item_open"])
        self.item_close = tok(s["item_close"])
        self.question = tok(s["question"])
        self._field_tokens: dict[str, list[list[int]]] | None = None

    def _tok(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    @property
    def field_tokens(self) -> dict[str, list[list[int]]]:
        """field -> per item the tokens of ' field: value' (empty when missing), built once."""
        if self._field_tokens is None:
            out = {}
            for f in self.fields:
                values = self.items.fields[f]
                texts = [f" {f}: {v}" if v else "" for v in values]
                ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                label = len(self._tok(f" {f}:"))
                out[f] = [list(x[: label + self.max_field_tokens]) if t else [] for x, t in zip(ids, texts)]
            self._field_tokens = out
        return self._field_tokens

    def encode(self, history, target: int | None = None, item_fields=None, supervise: str = "last") -> Encoded:
        """history: item indices oldest first; target: the label item (training) or None
        (inference: the prompt ends where the next item would go). item_fields[i] lists the
        fields shown for item i of history+[target]. supervise='all' labels every history slot
        after the first as well (each predicts its own item from the tokens before it)."""
        tokens: list[int] = list(self.prefix)
        items: list[int] = [-1] * len(tokens)
        labels: list[int] = [-1] * len(tokens)
        ft = self.field_tokens if item_fields is not None else None

        def text(ids):
            tokens.extend(ids)
            items.extend([-1] * len(ids))
            labels.extend([-1] * len(ids))

        def slot(item: int, label: bool):
            if label:
                labels[-1] = item  # predicted from the hidden state just before the slot
            tokens.append(-1)
            items.append(int(item))
            labels.append(-1)

        for i, item in enumerate(history):
            if i:
                text(self.item_close)
            text(self.item_open)
            slot(item, supervise == "all" and i > 0 and len(tokens) > 0)
            if ft is not None:
                for f in item_fields[i]:
                    text(ft[f][item])
        text(self.question)
        if target is not None:
            slot(target, True)
        return Encoded(np.asarray(tokens, np.int64), np.asarray(items, np.int64), np.asarray(labels, np.int64))

    def training_example(self, seq, rng: np.random.Generator, id_only_share: float,
                         field_keep_prob: float, supervise: str) -> Encoded:
        """seq: history + target (the last item is the label). Text fields are sampled per item."""
        seq = np.asarray(seq)
        fields = None
        if self.fields and rng.random() >= id_only_share:
            keep = rng.random((len(seq), len(self.fields))) < field_keep_prob
            fields = [tuple(f for f, k in zip(self.fields, row) if k) for row in keep]
        return self.encode(seq[:-1], int(seq[-1]), fields, supervise)

    @property
    def slots_only(self) -> bool:
        """Whether an inference prompt is the prefix then one item slot per history item, nothing
        else (the ids style): its items after the prefix are the history itself."""
        return not (self.item_open or self.item_close or self.question)

    def inference_prompt(self, history) -> Encoded:
        return self.encode(np.asarray(history), None, None, "last")

    @staticmethod
    def n_labels(seq_len: int, supervise: str) -> int:
        """How many labels training_example makes for a sequence of seq_len items."""
        return 1 if supervise == "last" else max(seq_len - 1, 0)


def collate(encoded: list[Encoded], pad_token: int, side: str = "left") -> dict[str, torch.Tensor]:
    """Pad to the longest prompt. Left (inference): the last position is every row's query
    position. Right (training): no position before a row's first token is padding, so no query
    row has every key masked. On an H100 under bf16 autocast, left-padded training went NaN within
    400 steps (an all-masked row's NaN reaches real rows through zero attention weights) and the
    same run right-padded did not; the loss is the same either way (tested).
    Returns tokens/items/labels (B, L), attention_mask (B, L), position_ids (B, L)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    B, L = len(encoded), max(len(e) for e in encoded)
    tokens = torch.full((B, L), pad_token, dtype=torch.long)
    items = torch.full((B, L), -1, dtype=torch.long)
    labels = torch.full((B, L), -1, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, e in enumerate(encoded):
        n = len(e)
        sl = slice(L - n, L) if side == "left" else slice(0, n)
        t = torch.from_numpy(e.tokens)
        tokens[b, sl] = torch.where(t >= 0, t, torch.full_like(t, pad_token))
        items[b, sl] = torch.from_numpy(e.items)
        labels[b, sl] = torch.from_numpy(e.labels)
        mask[b, sl] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"tokens": tokens, "items": items, "labels": labels, "attention_mask": mask,
            "position_ids": position_ids}
