"""The closed-item prior (items.closed_prior, chosen on validation with items.closed_prior_search:
evaluation/closed_prior.py) and validation's own new items (make_cold's valid_fraction,
``data prepare --cold-valid-items``).

Known answer: the prior adds exactly its value to every ID-closed item's score and nothing to the
others, only when scoring. Parity: the one-pass grid search ranks every value as a model whose
prior is set to it ranks (rank_examples). Training with the search stores the chosen value in the
best checkpoint, which scores with it. The split: no validation-new item in any training input or
label, only as an evaluated user's validation target; the test's new items are those of the split
without them."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from itemgen.cli import app
from itemgen.core.config import ConfigError, from_dict
from itemgen.data.dataset import DataError, SequenceDataset, make_cold
from itemgen.data.synthetic import make_dataset
from itemgen.evaluation.closed_prior import best_prior, prior_grid, ranks_by_prior
from itemgen.evaluation.evaluate import rank_examples
from itemgen.evaluation.segments import dataset_segments
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.registry import build_model
from itemgen.training.item_init import init_items
from itemgen.training.loop import train

runner = CliRunner()


def _cfg(out="unused", items=None, **train):
    return from_dict({"model": "itemlm", "data": {"path": "x", "max_history": 6},
                      "itemlm": {"backbone": "tiny", "prompt": "compact", "item_dim": 16, "supervise": "all",
                                 "id_only_share": 1.0, "text_vocab_in_softmax": False},
                      "items": {"text_encoder": "tiny", "text_match": 3, "id_dropout": 0.2, **(items or {})},
                      "train": {"out": str(out), "max_steps": 1, "eval_every": 1, "eval_users": None,
                                "progress": False, "batch_size": 16, "warmup_steps": 0,
                                "eval_exclude_history": True, **train}})


@pytest.fixture(scope="module")
def cold():
    return make_cold(make_dataset(n_users=300, n_items=40, noise=0.1, min_len=4, max_len=9, seed=2), 0.15,
                     seed=1, valid_fraction=0.15)


def _model(ds, **items):
    cfg = _cfg(items=items)
    torch.manual_seed(0)
    m = build_model(cfg, ds.items)
    init_items(m, cfg, ds)
    return m.eval(), cfg


# ---- the split -------------------------------------------------------------------------------
def test_validation_new_items_only_as_validation_targets(cold):
    vnew, new = set(cold.new_items("valid").tolist()), set(cold.new_items("test").tolist())
    assert vnew and new and not vnew & new
    for seq in cold.split.train:  # neither kind in any training input or label
        assert not (vnew | new) & set(seq.tolist())
    for e in cold.split.valid:  # validation inputs are old items; its targets may be validation-new
        assert not (vnew | new) & set(e.history.tolist()) and e.target not in new
    for e in cold.split.test:  # test targets never validation-new; test histories may hold them
        assert e.target not in vnew and not new & set(e.history.tolist())
    assert any(e.target in vnew for e in cold.split.valid) and any(e.target in new for e in cold.split.test)
    segs = dataset_segments(cold, "valid")
    assert segs["cold"].sum() == sum(e.target in vnew for e in cold.split.valid)
    assert segs["pop:0"][segs["cold"]].all()  # never trained
    m = cold.manifest()["cold_items"]
    assert m["valid"]["count"] == len(vnew) == round(0.15 * 40) and m["valid"]["cold_valid_users"] == segs["cold"].sum()


def test_the_test_new_items_are_those_of_the_split_without_validation_ones():
    base = make_dataset(n_users=300, n_items=40, noise=0.1, seed=2)
    a, b = make_cold(base, 0.15, seed=1), make_cold(base, 0.15, seed=1, valid_fraction=0.15)
    assert a.cold_items.tolist() == b.cold_items.tolist()
    assert len(a.new_items("valid")) == 0 and a.content_hash() != b.content_hash()


def test_validation_new_items_survive_save_and_load(cold, tmp_path):
    cold.save(tmp_path / "d")
    back = SequenceDataset.load(tmp_path / "d")
    assert back.new_items("valid").tolist() == cold.new_items("valid").tolist()
    assert back.cold.valid_fraction == 0.15 and back.content_hash() == cold.content_hash()


def test_a_validation_new_item_outside_a_validation_target_is_refused(cold):
    ds = SequenceDataset(cold.name, cold.items, list(cold.users), [s.copy() for s in cold.sequences],
                         cold.source, cold.cold)
    ds.sequences[0] = np.concatenate([[int(cold.new_items("valid")[0])], ds.sequences[0]])
    with pytest.raises(DataError, match="validation-new item outside its validation target"):
        ds.validate()


@pytest.mark.parametrize("fraction,valid,match", [(0.1, -0.1, "cold valid items"), (0.5, 0.5, "leaves none"),
                                                   (0.1, 0.001, "is no item")])
def test_bad_validation_fraction(fraction, valid, match):
    with pytest.raises(DataError, match=match):
        make_cold(make_dataset(n_users=50, n_items=20, seed=0), fraction, 0, valid)


def test_prepare_cli_cold_valid_items(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp"] + [f"u{u},i{i},{t}" for u in range(120)
                                            for t, i in enumerate(rng.choice(25, 6, replace=False))]
    csv = tmp_path / "inter.csv"
    csv.write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["data", "prepare", "table", str(csv), "--out", str(tmp_path / "c"),
                              "--cold-items", "0.2", "--cold-valid-items", "0.2"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["cold_items"]["count"] == 5 and manifest["cold_items"]["valid"]["count"] == 5
    res = runner.invoke(app, ["data", "prepare", "table", str(csv), "--out", str(tmp_path / "d"),
                              "--cold-valid-items", "0.2"])
    assert res.exit_code == 2 and "--cold-valid-items needs --cold-items" in res.output
    assert not (tmp_path / "d").exists()


# ---- the prior -------------------------------------------------------------------------------
def test_the_prior_lifts_closed_items_by_its_value_only_when_scoring(cold):
    m, _ = _model(cold)
    closed = m.items.closed()
    assert closed[cold.new_items("test")].all() and closed[cold.new_items("valid")].all() and (~closed).any()
    hist = [e.history for e in cold.split.test[:8]]
    with torch.inference_mode():
        before = m.item_vectors() @ torch.ones(m.item_vectors().shape[1])  # any query: a row of ones
        s0 = m.scores(hist)
    m.items.set_closed_prior(2.5)
    with torch.inference_mode():
        after = m.item_vectors() @ torch.ones(m.item_vectors().shape[1])
        s1 = m.scores(hist)
    torch.testing.assert_close(after - before, 2.5 * closed.float())
    # ItemLM's scores are log-probabilities: closed items rise by 2.5 against the others
    d = s1 - s0
    torch.testing.assert_close(d[:, closed] - d[:, ~closed].mean(1, keepdim=True), torch.full_like(d[:, closed], 2.5),
                               atol=1e-4, rtol=0)
    m.train()
    m.items.begin_step()
    with torch.no_grad():  # training never sees it
        assert not m.items.match_items(m.head.item_out)[:, -1].any()


@pytest.mark.parametrize("masked", [True, False])
def test_grid_ranks_equal_each_prior_set_on_the_model(cold, masked):
    m, cfg = _model(cold)
    grid = prior_grid(3.0)
    assert grid.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0]
    m.items.set_closed_prior(0.7)  # left as it was
    by = ranks_by_prior(m, cold.split.valid, grid, max_history=6, batch_size=32, exclude_history=masked)
    assert float(m.items.closed_prior) == pytest.approx(0.7)
    for g in (0, 4, 12):
        m.items.set_closed_prior(float(grid[g]))
        want = rank_examples(m, cold.split.valid, max_history=6, batch_size=7, exclude_history=masked)
        assert np.array_equal(by[g], want), g
    value, metrics = best_prior(by, grid)
    assert metrics["closed_prior"] == value and value in grid
    assert metrics["ndcg@10"] == max(best_prior(by[g:g + 1], grid[g:g + 1])[1]["ndcg@10"] for g in range(len(grid)))


def test_best_prior_keeps_the_smallest_of_equals():
    ranks = np.array([[1, 20, 20], [1, 20, 20], [1, 1, 20], [1, 1, 20]])
    value, metrics = best_prior(ranks, np.array([0.0, 0.25, 0.5, 0.75]))
    assert value == 0.5 and metrics["closed_prior"] == 0.5


def test_training_chooses_the_prior_and_the_checkpoint_keeps_it(cold, tmp_path):
    cfg = _cfg(tmp_path / "run", items={"closed_prior_search": 4.0}, max_steps=4, eval_every=2, lr=1e-2)
    res = train(cfg, dataset=cold)
    chosen = res.best_valid["closed_prior"]
    model, _, _ = load_checkpoint(res.best)
    assert float(model.items.closed_prior) == chosen
    # validation NDCG@10 at the chosen prior is the best of the grid for the best checkpoint's weights
    by = ranks_by_prior(model, cold.split.valid, prior_grid(4.0), max_history=6, exclude_history=True)
    assert best_prior(by, prior_grid(4.0)) == (chosen, {**res.best_valid})
    logged = [json.loads(x)["valid"] for x in (res.out / "log.jsonl").read_text().splitlines()]
    assert all("closed_prior" in v for v in logged)


def test_an_old_text_match_checkpoint_loads_with_no_prior(cold, tmp_path):
    from safetensors.torch import load_file, save_file

    res = train(_cfg(tmp_path / "run"), dataset=cold)
    path = res.best / "model.safetensors"
    state = load_file(str(path))
    state.pop("items.closed_prior")
    save_file(state, str(path))
    (res.best / "checksums.json").unlink(missing_ok=True)
    model, _, _ = load_checkpoint(res.best)
    assert float(model.items.closed_prior) == 0.0


@pytest.mark.parametrize("items,match", [
    ({"text_match": 0, "id_dropout": 0.0, "closed_prior_search": 4.0}, "need items.text_match"),
    ({"text_match": 0, "id_dropout": 0.0, "closed_prior": 1.0}, "need items.text_match"),
    ({"closed_prior_search": -1.0}, "closed_prior_search must be in"),
    ({"closed_prior": float("nan")}, "closed_prior must be a finite"),
])
def test_config_errors(items, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(items=items)
