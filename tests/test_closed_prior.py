"""The closed-item prior (items.closed_prior, chosen on validation with items.closed_prior_search:
evaluation/closed_prior.py).

Known answer: the prior adds exactly its value to every ID-closed item's score and nothing to the
others, only when scoring. Parity: the one-pass grid search ranks every value as the slow
reference does (the model's ID gate closed on the probe, its prior set to the value, a cold
split's new items left out, every item scored). Training with the search stores the chosen value
in the best checkpoint, which scores with it, and reproduces its validation figure. The probe is a
fixed random share of the trained items."""

import json

import numpy as np
import pytest
import torch

from itemgen.core.config import ConfigError, from_dict
from itemgen.data.dataset import DataError, SequenceDataset, make_cold
from itemgen.data.synthetic import make_dataset
from itemgen.evaluation.closed_prior import best_prior, prior_grid, probe_items, ranks_by_prior
from itemgen.evaluation.evaluate import rank_examples
from itemgen.evaluation.segments import dataset_segments
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.registry import build_model
from itemgen.training.item_init import init_items
from itemgen.training.loop import train



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
    return make_cold(make_dataset(n_users=300, n_items=40, noise=0.1, min_len=4, max_len=9, seed=2), 0.15, seed=1)


def _model(ds, **items):
    cfg = _cfg(items=items)
    torch.manual_seed(0)
    m = build_model(cfg, ds.items)
    init_items(m, cfg, ds)
    return m.eval(), cfg


# ---- the prior -------------------------------------------------------------------------------
def test_the_prior_lifts_closed_items_by_its_value_only_when_scoring(cold):
    m, _ = _model(cold)
    closed = m.items.closed()
    assert closed[cold.cold_items].all() and (~closed).any()
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


def _reference_ranks(m, examples, value, masked, probe, absent) -> np.ndarray:
    """The slow reference: the probe's ID part closed, the prior set, every item scored."""
    known = m.items.id_known.clone()
    m.items.set_known(known & ~probe)
    m.items.set_closed_prior(value)
    with torch.inference_mode():
        scores = m.scores([e.history[-6:] for e in examples])
    scores = scores.clone()  # a normal tensor, to mask in place
    m.items.set_known(known)
    if masked:
        for r, e in enumerate(examples):
            scores[r, torch.as_tensor(e.history)] = float("-inf")
    scores[:, absent] = float("-inf")
    t = scores[torch.arange(len(examples)), torch.as_tensor([e.target for e in examples])]
    return (scores >= t[:, None]).sum(1).numpy()


@pytest.mark.parametrize("masked", [True, False])
def test_grid_ranks_equal_the_slow_reference(cold, masked):
    m, cfg = _model(cold)
    grid = prior_grid(3.0)
    assert grid.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0]
    probe = probe_items(m.items.id_known, 0.2, seed=0)
    absent = torch.zeros(cold.n_items, dtype=torch.bool)
    absent[torch.from_numpy(cold.cold_items)] = True
    known = m.items.id_known.clone()
    m.items.set_closed_prior(0.7)  # left as it was, and the ID gate too
    by = ranks_by_prior(m, cold.split.valid, grid, max_history=6, batch_size=32, exclude_history=masked,
                        probe=probe, absent=absent)
    assert float(m.items.closed_prior) == pytest.approx(0.7) and torch.equal(m.items.id_known, known)
    for g in (0, 4, 12):
        want = _reference_ranks(m, cold.split.valid, float(grid[g]), masked, probe, absent)
        assert np.array_equal(by[g], want), g
    # without a probe: the model as it scores, its prior set to the value (absent items left out alike)
    plain = ranks_by_prior(m, cold.split.valid, grid, max_history=6, exclude_history=masked, absent=absent)
    m.items.set_closed_prior(float(grid[8]))
    assert np.array_equal(plain[8], rank_examples(m, cold.split.valid, max_history=6, batch_size=7,
                                                  exclude_history=masked, absent=absent))
    assert not np.array_equal(plain[8], rank_examples(m, cold.split.valid, max_history=6, exclude_history=masked))
    value, metrics = best_prior(by, grid)
    assert metrics["closed_prior"] == value and value in grid
    assert metrics["ndcg@10"] == max(best_prior(by[g:g + 1], grid[g:g + 1])[1]["ndcg@10"] for g in range(len(grid)))


def test_the_probe_is_a_fixed_share_of_the_trained_items():
    known = torch.ones(200, dtype=torch.bool)
    known[:50] = False
    p = probe_items(known, 0.1, seed=3)
    assert int(p.sum()) == 15 and not p[:50].any()
    assert torch.equal(p, probe_items(known, 0.1, seed=3)) and not torch.equal(p, probe_items(known, 0.1, seed=4))


def test_best_prior_keeps_the_smallest_of_equals():
    ranks = np.array([[1, 20, 20], [1, 20, 20], [1, 1, 20], [1, 1, 20]])
    value, metrics = best_prior(ranks, np.array([0.0, 0.25, 0.5, 0.75]))
    assert value == 0.5 and metrics["closed_prior"] == 0.5


def test_training_chooses_the_prior_and_the_checkpoint_keeps_it(cold, tmp_path):
    cfg = _cfg(tmp_path / "run", items={"closed_prior_search": 4.0, "closed_prior_probe": 0.2}, max_steps=4,
               eval_every=2, lr=1e-2)
    res = train(cfg, dataset=cold)
    chosen = res.best_valid["closed_prior"]
    model, _, _ = load_checkpoint(res.best)
    assert float(model.items.closed_prior) == chosen
    # the best checkpoint's validation figure: its weights, the same probe, the cold split's new items absent
    absent = torch.zeros(cold.n_items, dtype=torch.bool)
    absent[torch.from_numpy(cold.cold_items)] = True
    by = ranks_by_prior(model, cold.split.valid, prior_grid(4.0), max_history=6, exclude_history=True,
                        probe=probe_items(model.items.id_known, 0.2, cfg.train.seed), absent=absent)
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
    ({"closed_prior_search": 4.0, "closed_prior_probe": 0.0}, "closed_prior_probe must be in"),
])
def test_config_errors(items, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(items=items)
