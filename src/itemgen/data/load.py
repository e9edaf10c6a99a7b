"""The dataset a config names: a prepared dataset directory, or the synthetic catalog."""

from __future__ import annotations

from itemgen.core.config import Config, ConfigError
from itemgen.data.dataset import SequenceDataset
from itemgen.data.synthetic import make_dataset


def load_dataset(cfg: Config) -> SequenceDataset:
    if cfg.data.path == "synthetic":
        return make_dataset(cfg.data.synthetic_users, cfg.data.synthetic_items, noise=0.1, seed=cfg.train.seed)
    if not cfg.data.path:
        raise ConfigError("data.path is not set: a prepared dataset directory, or 'synthetic'")
    return SequenceDataset.load(cfg.data.path)
