"""Checkpoints written before the package split (tests/fixtures/old_checkpoints) still load and
recommend exactly what they recommended then."""

import json
from pathlib import Path

import pytest

from itemgen.api import Predictor
from itemgen.models.checkpoint import load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "old_checkpoints"


def _same(got: list[list[dict]], want: list[list[dict]]) -> None:
    assert [[r["id"] for r in row] for row in got] == [[r["id"] for r in row] for row in want]
    assert [[r["title"] for r in row] for row in got] == [[r["title"] for r in row] for row in want]
    for g, w in zip(got, want):
        assert [r["score"] for r in g] == pytest.approx([r["score"] for r in w], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["sasrec", "itemlm"])
def test_old_checkpoint_loads_and_recommends_the_same(name):
    ckpt = FIXTURES / name
    expected = json.loads((ckpt / "expected.json").read_text())
    model, cfg, items = load_checkpoint(ckpt)
    assert cfg.model == name and len(items) == 20 and model.n_items == 20
    pred = Predictor.load(ckpt)
    _same(pred.recommend(expected["histories"], k=expected["k"]), expected["recommendations"])
    if "recommendations_structure" in expected:  # the two-level head's exact structure decoder
        _same(pred.recommend(expected["histories"], k=expected["k"], decode="structure"),
              expected["recommendations_structure"])
