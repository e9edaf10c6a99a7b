"""Title baseline in language space (CALRec style): items in the history are written as their
title, brand and category; the label is the title followed by an end token; decoding is beam
search constrained to the catalog's titles (generative.py, trie.py).

Items without a title are written as their external id. Identical (or identically truncated)
titles share one trie leaf and come out together, lowest item index first.
"""

from __future__ import annotations

import json
from pathlib import Path

from itemgen.core.config import Config, TitleLMConfig
from itemgen.data.dataset import DataError, ItemTable
from itemgen.models.backbones import load_backbone
from itemgen.models.generative import GenerativeItemLM

TEXT_FILE = "item_text.json"  # checkpoint file: the item texts the model was trained with


class TitleLM(GenerativeItemLM):
    name = "title"

    def __init__(self, backbone, tokenizer, items: ItemTable, cfg: TitleLMConfig):
        super().__init__(backbone, tokenizer, len(items), cfg.prompt)
        if "title" not in items.fields or all(t is None for t in items.fields["title"]):
            raise DataError("the title baseline needs item titles; this dataset has none "
                            f"(fields: {', '.join(items.fields) or 'none'})")
        self.cfg = cfg
        self.texts = {f: items.fields[f] for f in ("title", "brand", "category") if f in items.fields}
        end = tokenizer.eos_token_id
        if end is None:
            raise ValueError("the title baseline needs a tokenizer with an end-of-sequence token")
        titles = [t if t else f"item {i}" for t, i in zip(self.texts["title"], items.ids)]
        tok = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        cap = cfg.max_title_tokens
        self.label_tokens = [list(x[:cap]) + [end] for x in tok([" " + t for t in titles])]
        extra = {f: tok([f" ({f}: {v})" if v else "" for v in self.texts[f]])
                 for f in ("brand", "category") if f in self.texts}
        # a history item: the title (as in its label, without the end token), then brand and category
        self.item_tokens = [lab[:-1] + [t for f in extra for t in extra[f][i][:cfg.max_field_tokens]]
                            for i, lab in enumerate(self.label_tokens)]
        self.out_offset, self.out_size = 0, self.backbone.get_output_embeddings().weight.shape[0]

    @classmethod
    def build(cls, cfg: Config, items: ItemTable, checkpoint_dir=None) -> "TitleLM":
        c = cfg.title
        if checkpoint_dir is None:
            backbone, tokenizer = load_backbone(c.backbone, n_layers=c.n_layers)
        else:
            backbone, tokenizer = _backbone_from_checkpoint(checkpoint_dir)
            texts = json.loads((Path(checkpoint_dir) / TEXT_FILE).read_text())
            items = ItemTable(items.ids, texts)
        return cls(backbone, tokenizer, items, c)

    def save_architecture(self, directory: Path) -> None:
        bdir = Path(directory) / "backbone"
        self.backbone.config.save_pretrained(bdir)
        self.tokenizer.save_pretrained(bdir)
        (Path(directory) / TEXT_FILE).write_text(json.dumps(self.texts) + "\n")


def _backbone_from_checkpoint(checkpoint_dir):
    """The backbone architecture saved in a checkpoint (weights are loaded by checkpoint.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    bdir = Path(checkpoint_dir) / "backbone"
    backbone = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(bdir))
    tokenizer = AutoTokenizer.from_pretrained(bdir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return backbone, tokenizer
