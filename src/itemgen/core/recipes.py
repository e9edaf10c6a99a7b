"""Training recipes that were measured (docs/quality.md), as config overrides. The quickstart and
benchmarks/quality.py build their configs from these, and configs/*.yaml hold the same values
(a test keeps them equal), so the recipe a user runs is the recipe that was benchmarked."""

from __future__ import annotations

# Train by epochs; stop when validation NDCG@10 over ALL validation users has not improved for
# `patience` epochs (a fixed step count stopped SASRec while it was still improving).
EPOCHS = {"max_steps": 10**7, "max_epochs": 200, "eval_every_epochs": 1, "lr_schedule": "constant",
          "eval_users": None, "patience": 10}

# RecBole 1.2.1's SASRec defaults where they helped: lr 1e-3, hidden 64, FFN 256; dropout chosen
# per dataset from SASREC_DROPOUTS by validation (`itemgen tune`: with the repeat bias, 0.5,
# RecBole's default, was best on all three datasets; without it, 0.3 on office and instruments).
# Validation ranks with the user's history masked, as `itemgen serve` does (no dataset here
# repeats an item). RecBole keeps the history for sequential
# models, so published figures compare with the history-kept test column; benchmarks/quality.py's
# `sasrec-kept` chooses the dropout by history-kept validation for that comparison.
SASREC_DROPOUTS = (0.1, 0.2, 0.3, 0.5)
# Both recipes learn a bias on the scores of the user's history items (repeat.bias=recency,
# models/repeat_bias.py): on instruments it raised validation NDCG@10 with the history kept from
# 0.1042 to 0.1242 (SASRec, dropout 0.3) and with it masked from 0.1214 to 0.1244 (docs/quality.md,
# "A learned awareness of repeats"). A two-level head adds it to the level-2 logits of the
# history items (heads/softmax.TwoLevelHead.with_item_bias).
REPEAT = {"repeat": {"bias": "recency"}}
SASREC = {"model": "sasrec", "data": {"max_history": 50}, **REPEAT,
          "sasrec": {"hidden": 64, "n_layers": 2, "n_heads": 2, "dropout": 0.5, "ffn": 256},
          "train": {**EPOCHS, "batch_size": 128, "lr": 1e-3, "warmup_steps": 0, "eval_exclude_history": True}}

# ItemLM on CPU: a SmolLM2-135M-shaped backbone cut to 2 layers and randomly initialised (the
# pretrained weights scored lower on every ID-only dataset: docs/quality.md), trained at a tenth of
# the new parts' lr (3e-4: it starts from trained item vectors, and 1e-3 overfit after 2-3 epochs);
# the `ids` prompt (every label, the target too, read at the previous item's slot, as in SASRec);
# items-only softmax and a frozen token table (ID-only prompts never need them: 5.4x cheaper
# steps, measured); separate input and output item vectors, both started from the same dataset's
# tuned SASRec, with that SASRec's dropout on item inputs and on hidden states at labels
# (itemlm_from_sasrec; the caller names the checkpoint). The lr decays to 0 over 5 epochs (cosine):
# over 3 seeds it was within about one s.e. of a constant lr with patience 3 (above it on office
# and instruments, below on scientific) at a fixed, lower cost (docs/quality.md, abl-constant-lr).
ITEMLM_CPU = {"model": "itemlm", "data": {"max_history": 50}, **REPEAT,
              "itemlm": {"backbone": "smollm2-135m", "n_layers": 2, "pretrained": False, "prompt": "ids",
                         "id_only_share": 1.0, "fields": ["title", "brand", "category"], "max_field_tokens": 8,
                         "text_vocab_in_softmax": False, "freeze_text_embeddings": True, "hidden_dropout": 0.5},
              "items": {"input": "id", "output": "untied", "dropout": 0.5, "init": "sasrec"},
              "train": {**EPOCHS, "batch_size": 32, "lr": 3e-4, "backbone_lr": 3e-5, "warmup_steps": 100,
                        "max_epochs": 5, "lr_schedule": "cosine", "patience": 3, "eval_exclude_history": True}}


def itemlm_from_sasrec(checkpoint: str, dropout: float) -> dict:
    """Overrides that start ItemLM from a trained SASRec: its item vectors and its dropout (the
    rate validation chose for the same data is the regularisation ItemLM's new parts need too)."""
    return {"items": {"init": "sasrec", "init_from": str(checkpoint), "dropout": dropout},
            "itemlm": {"hidden_dropout": dropout}}


def merge(a: dict, b: dict) -> dict:
    """b's values over a's, section by section."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ItemLM with item text (issue 20), for datasets whose items have text: the CPU recipe (ID input,
# untied output vectors started from the SASRec it is given) plus the text-match path
# (models/text_match.py): the query also matches the frozen all-MiniLM-L6-v2 view of title, brand
# and category of the user's last 3 items against every item's, through a learned map that starts
# as text-kNN; a random 20% of items each step have their ID part hidden (DropoutNet), so the text
# path alone learns to rank them, as it must rank an item never seen in training (those are left
# out of the training softmax, and `itemgen items add` gives a new item its text part at once).
# Chosen by office validation NDCG@10 (history masked) over the fused views: 0.0808 against 0.0775
# (text+id on both sides) and 0.0764 (the ID recipe) (benchmarks/text.py, docs/text.md).
# Then the lexical view (models/lexical.py): each item's words (TF-IDF on a 256-dim LSA basis)
# against the words of the user's last 3 items, weighed per item bucket (ID closed / tail / head),
# with the closed-item prior, all chosen at every validation (evaluation/score_search.py); new
# items' weight and prior by the warm-floor rule: as much room as keeps the other validation users
# at 98% of what the SASRec the recipe starts from gives them; the tail bucket's weight so that tail
# targets rank at least as well as by the words alone (docs/text_notes.md, section 8).
ITEMLM_TEXT = merge(ITEMLM_CPU, {"items": {"text_encoder": "minilm", "text_fields": ["title", "brand", "category"],
                                           "text_match": 3, "id_dropout": 0.2, "closed_prior_search": 12.0,
                                           "lexical": 256, "closed_prior_rule": "warm_floor",
                                           "closed_prior_floor_from": "init", "lexical_rule": "tail_floor"}})


# ItemLM on a GPU: the same recipe with the whole pretrained backbone, the paper's prompt and item
# text in 75% of training examples (the paper's paradigm; IDs alone at inference). NOT measured
# yet (no GPU was lent): on CPU, 2 pretrained layers scored lower than random ones with ID-only
# prompts and with text in training alike; the whole pretrained backbone is what is left to try.
ITEMLM_GPU = merge(ITEMLM_CPU, {"itemlm": {"n_layers": None, "pretrained": True, "prompt": "default",
                                           "id_only_share": 0.25},
                                "train": {"batch_size": 64}})
