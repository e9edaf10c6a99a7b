"""The text-similarity baseline (models/text_knn.py): known answers, the train/evaluate/recommend path."""

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from itemgen.api import Predictor
from itemgen.cli import app
from itemgen.core.config import load_config
from itemgen.data.dataset import ItemTable, SequenceDataset
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.registry import build_model
from itemgen.models.text_knn import tfidf_csr
from itemgen.serving.server import ServeSettings, create_app

runner = CliRunner()

TITLES = ["red running shoes", "blue running shoes", "stainless steel kettle", "electric kettle steel",
          "mechanical keyboard", "wireless keyboard mouse", "paper notebook", ""]


def _items() -> ItemTable:
    return ItemTable([f"i{k}" for k in range(len(TITLES))], {"title": TITLES})


def _model(**over):
    cfg = load_config(None, ["model=text_knn", "text_knn.fields=[title]", *[f"text_knn.{k}={v}" for k, v in over.items()]])
    return build_model(cfg, _items())


def test_tfidf_known_values():
    indptr, indices, values, n_terms = tfidf_csr(["a b", "a", ""])
    assert n_terms == 2 and indptr.tolist() == [0, 2, 3, 3]
    # idf(a) = ln(4/3) + 1, idf(b) = ln(4/2) + 1; row 0 normalised
    ia, ib = np.log(4 / 3) + 1, np.log(2) + 1
    assert values[:2] == pytest.approx(np.array([ia, ib]) / np.hypot(ia, ib))
    assert values[2] == pytest.approx(1.0)


def test_tfidf_top1_is_the_obvious_item():
    model = _model()
    # a history of kettles: the other kettle first; a history of shoes: the other shoes first
    scores = model.scores([np.array([2]), np.array([0]), np.array([4]), np.array([4, 0])])  # (4, I)
    assert scores.shape == (4, len(TITLES))
    top = scores.clone()
    top[0, 2] = top[1, 0] = top[2, 4] = top[3, 4] = top[3, 0] = -1  # the history itself aside
    assert top.argmax(1).tolist() == [3, 1, 5, 1]
    # mean of cosines: item 1 against history [4, 0] = (cos(1, 4) + cos(1, 0)) / 2 = cos(1, 0) / 2
    assert scores[3, 1].item() == pytest.approx(scores[1, 1].item() / 2, rel=1e-5)
    assert scores[0, 7].item() == 0.0  # an item without text is similar to nothing


def test_last_n_limits_the_history_used():
    full = _model(last_n=3).scores([np.array([2, 4, 0])])
    last1 = _model(last_n=1).scores([np.array([2, 4, 0])])
    assert last1[0, 3].item() == 0.0 and full[0, 3].item() > 0  # the kettle is outside the last item
    assert last1.argmax(1).item() == 0 and torch.topk(last1, 2).indices[0, 1].item() == 1


def test_dense_encoder_path_matches_dense_cosines():
    model = _model(encoder="tiny")  # a frozen tiny LM: dense unit rows
    v = model.item_vectors()
    assert v.shape[0] == len(TITLES) and torch.allclose(v[0].norm(), torch.tensor(1.0), atol=1e-5)
    s = model.scores([np.array([0, 2])])
    assert torch.allclose(s[0], (v @ v[0] + v @ v[2]) / 2, atol=1e-5)


def test_train_writes_a_checkpoint_that_evaluates_and_recommends(tmp_path):
    seqs = [np.array(s) for s in ([0, 4, 2, 3], [5, 0, 1], [6, 2, 3], [4, 1, 0], [6, 4, 5], [6, 3, 2])]
    ds = SequenceDataset("kettles", _items(), [f"u{k}" for k in range(len(seqs))], seqs)
    ds.save(tmp_path / "data")
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "configs/text-knn.yaml", f"data.path={tmp_path / 'data'}",
                              f"train.out={out}", "train.progress=false", "text_knn.last_n=1"])
    assert res.exit_code == 0, res.output
    assert (out / "best" / "model.safetensors").is_file() and not (out / "last").exists()
    model, cfg, _ = load_checkpoint(out / "best")
    built = build_model(cfg, _items())
    assert torch.equal(model.item_vectors(), built.item_vectors())
    res = runner.invoke(app, ["evaluate", str(out / "best"), "--exclude-history"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "best" / "eval_test_history_masked.json").read_text())
    # every test target is the other item of the same kind as the user's previous item: all rank 1
    assert report["model"] == "text_knn" and report["metrics"]["recall@1"] == 1.0
    predictor = Predictor.load(out / "best")
    recs = predictor.recommend([["i2"]], k=2)[0]
    assert [r["id"] for r in recs] == ["i3", recs[1]["id"]] and recs[0]["title"] == "electric kettle steel"
    server = create_app(ServeSettings(checkpoint=str(out / "best")), predictor=predictor, api_key="")
    with TestClient(server) as client:  # served like any model
        r = client.post("/v1/recommend", json={"history": ["i0"], "k": 1})
        assert r.status_code == 200, r.text
        assert [x["id"] for x in r.json()["items"]] == ["i1"]


def test_corrupt_tfidf_vectors_are_refused():
    model = _model()
    with torch.no_grad():
        model.csr_indices[0] = 10_000  # a term outside the vocabulary
    model._sparse = None
    with pytest.raises(ValueError, match="do not describe 8 items"):
        model.scores([np.array([0])])
