"""Every model behind the one interface: learns a known next-item rule, round-trips through a
checkpoint with identical scores, resumes exactly where it stopped."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from itemgen.api import Predictor, evaluate_checkpoint, user_ndcg
from itemgen.core.config import from_dict
from itemgen.data.synthetic import make_dataset
from itemgen.models.checkpoint import CheckpointError, load_checkpoint
from itemgen.training.loop import train

RULE = dict(n_users=600, n_items=40, min_len=4, max_len=8, noise=0.0, seed=1)

MODELS = {
    "sasrec": {"model": "sasrec", "sasrec": {"hidden": 32, "dropout": 0.0},
               "train": {"lr": 5e-3, "batch_size": 64, "max_steps": 120}},
    "itemlm": {"model": "itemlm",
               "itemlm": {"backbone": "tiny", "prompt": "compact", "item_dim": 32, "id_only_share": 0.5},
               "train": {"lr": 3e-3, "batch_size": 32, "max_steps": 150}},
}


def config(name, out, **train):
    base = MODELS[name]
    t = {"out": str(out), "eval_every": 50, "eval_users": None, "warmup_steps": 10, "progress": False,
         "patience": 100, **base["train"], **train}
    return from_dict({**base, "data": {"path": "synthetic-inline", "max_history": 10}, "train": t})


@pytest.fixture(scope="module")
def rule_data():
    return make_dataset(**RULE)


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, rule_data, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    cfg = config(request.param, out)
    result = train(cfg, dataset=rule_data)
    return request.param, cfg, result


def test_learns_the_rule(trained, rule_data):
    name, cfg, result = trained
    model, _, _ = load_checkpoint(result.best)
    from itemgen.evaluation.evaluate import evaluate

    m = evaluate(model, rule_data.split.test, max_history=cfg.data.max_history)
    assert m["recall@1"] >= 0.9, (name, m)


def test_user_ndcg_is_the_report_user_by_user(trained, rule_data, tmp_path):
    """The per-user NDCG@10 that paired comparisons use averages to the evaluation report's."""
    name, cfg, result = trained
    rule_data.save(tmp_path / "data")
    gains = user_ndcg(result.best, data=tmp_path / "data", exclude_history=True)
    report = evaluate_checkpoint(result.best, data=tmp_path / "data", exclude_history=True, out=tmp_path / "r.json")
    assert gains.shape == (report["metrics"]["users"],)
    assert np.isclose(gains.mean(), report["metrics"]["ndcg@10"]), name


def test_checkpoint_round_trip_identical_scores(trained, rule_data):
    name, cfg, result = trained
    a, _, items = load_checkpoint(result.best)
    b, _, _ = load_checkpoint(result.best)
    hist = [e.history for e in rule_data.split.test[:16]]
    assert torch.equal(a.scores(hist), b.scores(hist))
    assert items.ids == rule_data.items.ids
    # the saved weights are exactly the model's
    sd = load_file(str(result.best / "model.safetensors"))
    for k, v in sd.items():
        assert torch.equal(a.state_dict()[k], v), k


def test_recommend_by_external_ids(trained, rule_data):
    name, cfg, result = trained
    pred = Predictor.load(result.best)
    ex = rule_data.split.test[0]
    hist = [rule_data.items.ids[i] for i in ex.history]
    recs = pred.recommend([hist], k=5, exclude_history=False)[0]
    assert len(recs) == 5 and recs[0]["id"] == rule_data.items.ids[ex.target]
    assert recs[0]["title"] == rule_data.items.fields["title"][ex.target]
    assert all(r1["score"] >= r2["score"] for r1, r2 in zip(recs, recs[1:]))
    with pytest.raises(KeyError, match="unknown item ids: NOPE, ALSO"):
        pred.recommend([hist + ["NOPE", "ALSO"]], k=5)
    assert pred.recommend([hist + ["NOPE"]], k=5, unknown="ignore", exclude_history=False)[0] == recs
    with pytest.raises(ValueError, match="k must be between 1 and the catalog size 40"):
        pred.recommend([hist], k=41)
    excl = pred.recommend([hist], k=40 - len(set(hist)), exclude_history=True)[0]
    assert not {r["id"] for r in excl} & set(hist)


def test_resume_continues_exactly(rule_data, tmp_path):
    straight = train(config("sasrec", tmp_path / "a", max_steps=40, eval_every=10), dataset=rule_data)
    first = train(config("sasrec", tmp_path / "b", max_steps=40, eval_every=10, stop_at=20), dataset=rule_data)
    assert first.stopped == "paused" and first.step == 20
    resumed = train(config("sasrec", tmp_path / "b", max_steps=40, eval_every=10), dataset=rule_data, resume=True)
    assert resumed.step == 40
    a = load_file(str(straight.out / "last" / "model.safetensors"))
    b = load_file(str(resumed.out / "last" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_without_checkpoint_is_an_error(rule_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(config("sasrec", tmp_path / "none"), dataset=rule_data, resume=True)


def test_bad_checkpoints(tmp_path, trained):
    with pytest.raises(CheckpointError, match="not an itemgen checkpoint"):
        load_checkpoint(tmp_path)
    name, cfg, result = trained
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(result.best, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_checkpoint(broken)


def test_non_finite_loss_stops_training_before_the_weights_are_hit(rule_data, tmp_path, monkeypatch):
    from itemgen.models.next_item import NextItemRecommender

    orig, calls = NextItemRecommender.loss, {"n": 0}

    def nan_at_third_step(self, batch):
        calls["n"] += 1
        out = orig(self, batch)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(NextItemRecommender, "loss", nan_at_third_step)
    with pytest.raises(FloatingPointError, match="step 3"):
        train(config("sasrec", tmp_path, max_steps=6, eval_every=2), dataset=rule_data)
    weights = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # step 2's checkpoint is intact
