"""Choose one config value by validation (``itemgen tune``): one training run per value, each in
its own folder, and the value whose best validation NDCG@10 is highest wins. The choice is written
to OUT/selected.json, so the next step (an ItemLM started from the chosen SASRec) can read it.

The quality benchmark gives SASRec its dropout this way on every dataset: 0.5 (RecBole's
default) is best on some catalogs and 0.1-0.3 on others (docs/quality.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from itemgen.core.config import Config, ConfigError, with_values
from itemgen.core.io import atomic_write_text
from itemgen.data.dataset import SequenceDataset
from itemgen.training.loop import TrainResult, train


@dataclass
class TuneResult:
    key: str
    value: object  # the chosen value
    best: TrainResult  # its run
    runs: list[dict]  # every value: its folder, best validation metrics, steps, epochs, seconds

    def to_dict(self) -> dict:
        return {"key": self.key, "value": self.value, "checkpoint": str(self.best.best), "runs": self.runs}


def run_folder(out: Path, key: str, value) -> Path:
    return Path(out) / f"{key}={value}"


def grid_search(cfg: Config, key: str, values: list, *, dataset: SequenceDataset | None = None) -> TuneResult:
    """Train ``cfg`` once per value of ``key`` (a dotted config key) into train.out/KEY=VALUE/;
    -> the value with the best validation NDCG@10 (the first one on ties)."""
    if not values:
        raise ConfigError(f"tune {key}: no values to try")
    configs = [with_values(cfg, {key: v, "train.out": str(run_folder(cfg.train.out, key, v))}) for v in values]
    best, runs = None, []
    for value, c in zip(values, configs):  # every config checked before the first run
        res = train(c, dataset=dataset)
        score = res.best_valid.get("ndcg@10", float("-inf"))
        runs.append({"value": value, "out": str(res.out), "best_valid": res.best_valid, "steps": res.step,
                     "epochs": res.epochs, "best_step": res.best_step, "train_seconds": round(res.train_seconds, 1)})
        if best is None or score > best[0]:
            best = (score, value, res)
    result = TuneResult(key, best[1], best[2], runs)
    out = Path(cfg.train.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "selected.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def read_selected(out: str | Path) -> dict:
    """The choice a grid search wrote to OUT/selected.json."""
    path = Path(out) / "selected.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tuning result here (run `itemgen tune` with train.out={out})")
    return json.loads(path.read_text())
