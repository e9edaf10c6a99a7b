"""Training recipes that were measured (docs/quality.md), as config overrides. The quickstart and
benchmarks/quality.py build their configs from these, and configs/*.yaml hold the same values
(a test keeps them equal), so the recipe a user runs is the recipe that was benchmarked."""

from __future__ import annotations

# Train by epochs; stop when validation NDCG@10 over ALL validation users has not improved for
# `patience` epochs (a fixed step count stopped SASRec while it was still improving).
EPOCHS = {"max_steps": 10**7, "max_epochs": 200, "eval_every_epochs": 1, "lr_schedule": "constant",
          "eval_users": None, "patience": 10}

# RecBole 1.2.1's SASRec defaults where they helped: dropout 0.5, lr 1e-3, hidden 64, FFN 256.
SASREC = {"model": "sasrec", "data": {"max_history": 50},
          "sasrec": {"hidden": 64, "n_layers": 2, "n_heads": 2, "dropout": 0.5, "ffn": 256},
          "train": {**EPOCHS, "batch_size": 128, "lr": 1e-3, "warmup_steps": 0}}

# ItemLM on CPU: SmolLM2-135M cut to 2 layers, fine-tuned at a tenth of the new parts' lr (3e-4:
# it starts from trained item vectors, and 1e-3 peaked after 2-3 epochs, then overfit); the
# `ids` prompt (every label, the target too, read at the previous item's slot, as in SASRec);
# items-only softmax and a frozen token table (ID-only prompts never need them: 5.4x cheaper
# steps, measured); item vectors tied (output = scaled projected input) and started from the same
# dataset's trained SASRec (itemlm.init_from: set by the caller); dropout 0.5 on item inputs and
# on hidden states at labels (docs/quality.md, ablation).
ITEMLM_CPU = {"model": "itemlm", "data": {"max_history": 50},
              "itemlm": {"backbone": "smollm2-135m", "n_layers": 2, "prompt": "ids", "id_only_share": 1.0,
                         "fields": ["title", "brand", "category"], "max_field_tokens": 8,
                         "text_vocab_in_softmax": False, "freeze_text_embeddings": True,
                         "tie_items": True, "item_dropout": 0.5, "hidden_dropout": 0.5, "init": "sasrec"},
              "train": {**EPOCHS, "batch_size": 32, "lr": 3e-4, "backbone_lr": 3e-5, "warmup_steps": 100,
                        "max_epochs": 15, "patience": 3}}


def merge(a: dict, b: dict) -> dict:
    """b's values over a's, section by section."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
