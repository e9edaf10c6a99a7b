"""BERT4Rec and GRU4Rec behind the one recommender interface: each learns the known next-item
rule, labels are counted exactly, scores match the slow path, checkpoints round-trip."""

import numpy as np
import pytest
import torch

from itemgen.core.config import ConfigError, from_dict
from itemgen.data.synthetic import make_dataset
from itemgen.evaluation.evaluate import evaluate
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.registry import build_model
from itemgen.training.loop import train

RULE = dict(n_users=600, n_items=40, min_len=4, max_len=8, noise=0.0, seed=1)


def config(name, out, **sections):
    t = {"out": str(out), "lr": 5e-3, "batch_size": 64, "max_steps": 120, "eval_every": 40, "eval_users": None,
         "warmup_steps": 10, "progress": False, "patience": 100}
    return from_dict({"model": name, name: {"hidden": 32, "dropout": 0.0, **sections.get(name, {})},
                      "data": {"path": "synthetic-inline", "max_history": 10}, "train": t})


@pytest.fixture(scope="module")
def rule_data():
    return make_dataset(**RULE)


@pytest.fixture(scope="module", params=["bert4rec", "gru4rec"])
def trained(request, rule_data, tmp_path_factory):
    cfg = config(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, cfg, train(cfg, dataset=rule_data)


def test_learns_the_rule(trained, rule_data):
    name, cfg, result = trained
    model, loaded_cfg, _ = load_checkpoint(result.best)
    assert model.name == name and loaded_cfg.model == name
    m = evaluate(model, rule_data.split.test, max_history=cfg.data.max_history)
    assert m["recall@1"] >= 0.9, (name, m)


def test_encode_score_matches_item_vectors(trained, rule_data):
    name, cfg, result = trained
    model, _, _ = load_checkpoint(result.best)
    hist = [e.history for e in rule_data.split.test[:8]]
    with torch.inference_mode():
        q = model.encode(model.query_batch(hist))  # (B, d)
        assert torch.allclose(model.scores(hist), q @ model.item_vectors().T)
    assert model.item_vectors().shape == (40, 32)
    # a history's score does not depend on what else is in the batch (padding is invisible)
    one = model.scores(hist[:1])
    assert torch.allclose(one, model.scores(hist)[:1], atol=1e-5)


@pytest.mark.parametrize("name", ["bert4rec", "gru4rec"])
def test_n_labels_counts_supervised_positions(name, rule_data, tmp_path):
    model = build_model(config(name, tmp_path), rule_data.items)
    seqs = [np.arange(n) % 40 for n in (2, 3, 7, 11, 30)]  # 30 > max_len: truncated
    for seed in range(5):
        batch = model.train_batch(seqs, np.random.default_rng(seed))
        assert int((batch["y"] >= 0).sum()) == model.n_labels(seqs)


def test_bert4rec_masks_a_fixed_number_of_random_positions(rule_data, tmp_path):
    model = build_model(config("bert4rec", tmp_path, bert4rec={"mask_prob": 0.3, "mask_last_prob": 0.0}),
                        rule_data.items)
    seq = np.arange(10)
    assert model.n_masks(10) == 3 and model.n_masks(2) == 1
    seen = set()
    for seed in range(30):
        b = model.train_batch([seq], np.random.default_rng(seed))
        masked = (b["x"][0] == model.mask_token).nonzero().flatten().tolist()
        assert len(masked) == 3
        assert b["y"][0, masked].tolist() == seq[masked].tolist()  # labels are the hidden items
        keep = [i for i in range(10) if i not in masked]
        assert b["x"][0, keep].tolist() == (seq[keep] + 1).tolist()
        seen.update(masked)
    assert seen == set(range(10))  # positions are random, not fixed
    always_last = build_model(config("bert4rec", tmp_path, bert4rec={"mask_prob": 0.3, "mask_last_prob": 1.0}),
                              rule_data.items)
    b = always_last.train_batch([seq], np.random.default_rng(0))
    assert b["x"][0, -1] == always_last.mask_token and int((b["y"] >= 0).sum()) == 3


def test_bert4rec_query_appends_the_mask(rule_data, tmp_path):
    model = build_model(config("bert4rec", tmp_path), rule_data.items)
    q = model.query_batch([np.array([5, 6, 7]), np.arange(20)])  # 20 > max_history: last 10 kept
    assert q["x"][0, :4].tolist() == [6, 7, 8, model.mask_token]
    assert q["lengths"].tolist() == [4, 11] and q["x"][1, 10] == model.mask_token
    assert q["x"][1, :10].tolist() == (np.arange(10, 20) + 1).tolist()


def test_bad_sections_are_config_errors():
    with pytest.raises(ConfigError, match="bert4rec.mask_prob"):
        from_dict({"model": "bert4rec", "bert4rec": {"mask_prob": 0.0}})
    with pytest.raises(ConfigError, match="bert4rec.hidden must be divisible"):
        from_dict({"model": "bert4rec", "bert4rec": {"hidden": 30, "n_heads": 4}})
    with pytest.raises(ConfigError, match="unknown config key in gru4rec: heads"):
        from_dict({"model": "gru4rec", "gru4rec": {"heads": 2}})
