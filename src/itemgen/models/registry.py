"""Model name -> class: the one place that knows every model. The names themselves live in
``core/config.py`` (``MODEL_NAMES``), so the config validates ``model`` without importing a model."""

from __future__ import annotations

from itemgen.core.config import MODEL_NAMES, Config
from itemgen.data.dataset import ItemTable
from itemgen.models.bert4rec import BERT4Rec
from itemgen.models.gru4rec import GRU4Rec
from itemgen.models.itemlm import ItemLM
from itemgen.models.recommender import Recommender
from itemgen.models.repeat_bias import make_repeat_bias
from itemgen.models.sasrec import SASRec
from itemgen.models.semantic_ids import SemanticIDLM
from itemgen.models.text_knn import TextKNN
from itemgen.models.title_lm import TitleLM

# each takes (cfg, items, checkpoint_dir); the keys are exactly core.config.MODEL_NAMES
BUILDERS = {
    "itemlm": lambda cfg, items, checkpoint_dir: ItemLM.build(cfg, items, checkpoint_dir),
    "sasrec": lambda cfg, items, checkpoint_dir: SASRec.build(cfg, items, checkpoint_dir),
    "bert4rec": lambda cfg, items, checkpoint_dir: BERT4Rec(len(items), cfg.bert4rec, cfg.data.max_history),
    "gru4rec": lambda cfg, items, checkpoint_dir: GRU4Rec(len(items), cfg.gru4rec, cfg.data.max_history),
    "title": lambda cfg, items, checkpoint_dir: TitleLM.build(cfg, items, checkpoint_dir),
    "semantic_id": lambda cfg, items, checkpoint_dir: SemanticIDLM.build(cfg, items, checkpoint_dir),
    "text_knn": lambda cfg, items, checkpoint_dir: TextKNN.build(cfg, items, checkpoint_dir),
}


def build_model(cfg: Config, items: ItemTable, checkpoint_dir=None) -> Recommender:
    """A fresh model for ``cfg`` (pretrained backbone weights where it has one), or the
    architecture saved in ``checkpoint_dir`` (weights are loaded by checkpoint.py)."""
    if cfg.model not in BUILDERS:
        raise ValueError(f"unknown model {cfg.model!r} (known: {', '.join(MODEL_NAMES)})")
    model = BUILDERS[cfg.model](cfg, items, checkpoint_dir)
    repeat = make_repeat_bias(cfg.repeat, cfg.data.max_history)
    if repeat is not None:  # a submodule: its parameter trains and is saved with the model
        model.repeat = repeat
    return model
