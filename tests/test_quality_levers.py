"""The levers of the quality work (issue 11): item-vector initialisation, tied item vectors,
dropout, epoch budgets, and the collapse check reported by evaluation."""

import json
import math

import numpy as np
import pytest
import torch

from itemgen.core.config import ConfigError, TrainConfig, from_dict
from itemgen.data.dataset import ItemTable, SequenceDataset
from itemgen.data.synthetic import make_dataset
from itemgen.evaluation.evaluate import evaluate
from itemgen.evaluation.metrics import diversity, ranking_metrics
from itemgen.models.checkpoint import CheckpointError, load_checkpoint
from itemgen.models.registry import build_model
from itemgen.training.item_init import init_items
from itemgen.training.loop import budget, lr_lambda, train


@pytest.fixture(scope="module")
def data():
    ds = make_dataset(n_users=80, n_items=24, min_len=4, max_len=7, seed=5)
    titles = list(ds.items.fields["title"])
    titles[1] = titles[0]  # items 0 and 1 share a title; item 2 has its own
    fields = {**ds.items.fields, "title": titles}
    return SequenceDataset(ds.name, ItemTable(ds.items.ids, fields), ds.users, ds.sequences, ds.source)


def cfg_for(out, model="itemlm", train_extra=None, **itemlm):
    return from_dict({"model": model, "data": {"path": "x", "max_history": 6},
                      "itemlm": {"backbone": "tiny", "prompt": "compact", "item_dim": 16, **itemlm},
                      "sasrec": {"hidden": 16, "n_heads": 2},
                      "train": {"out": str(out), "max_steps": 1, "eval_every": 1, "eval_users": 10,
                                "progress": False, "batch_size": 16, "warmup_steps": 0, **(train_extra or {})}})


@pytest.fixture(scope="module")
def sasrec_ckpt(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sasrec")
    return train(cfg_for(out, model="sasrec", train_extra={"max_steps": 3, "eval_every": 3}), dataset=data).best


@pytest.mark.parametrize("init,tie", [("random", False), ("text", False), ("text", True), ("ials", False),
                                      ("sasrec", False), ("sasrec", True)])
def test_every_init_builds_and_trains_one_step(data, tmp_path, sasrec_ckpt, init, tie):
    extra = {"init_from": str(sasrec_ckpt)} if init == "sasrec" else {}
    cfg = cfg_for(tmp_path, init=init, tie_items=tie, item_dropout=0.1, hidden_dropout=0.1, **extra)
    res = train(cfg, dataset=data)
    assert res.step == 1
    model, _, _ = load_checkpoint(res.out / "last")
    assert model.item_vectors().shape == (data.n_items, model.backbone.config.hidden_size)
    if init == "sasrec":  # the table started as the SASRec's item embeddings (up to one scale), then took one step
        sas, _, _ = load_checkpoint(sasrec_ckpt)
        e = sas.item_vectors().detach()
        corr = np.corrcoef(e.flatten().numpy(), model.items.id_emb.weight.detach().flatten().numpy())[0, 1]
        assert corr > 0.9


def test_init_vectors_reach_table_and_output_side(data, sasrec_ckpt):
    cfg = cfg_for("unused", init="sasrec", init_from=str(sasrec_ckpt))
    model = build_model(cfg, data.items)
    init_items(model, cfg, data)
    e = load_checkpoint(sasrec_ckpt)[0].item_vectors().detach()
    e = e - e.mean(0)
    w = model.items.id_emb.weight.detach()
    assert torch.allclose(w * e.std(), e, atol=1e-5)  # the same (centred) vectors, rescaled
    assert w.std().item() == pytest.approx(1.0, rel=1e-4)
    out = model.head.item_out.detach()
    assert out.std().item() == pytest.approx(0.02, rel=1e-3)  # the random head's logit scale
    proj = model.items.proj(model.items.id_emb.weight).detach()
    proj = proj - proj.mean(0)
    assert torch.allclose(out / out.norm(), proj / proj.norm(), atol=1e-5)  # output = projected inputs


def test_text_init_puts_same_title_items_together(data):
    for tie in (False, True):
        cfg = cfg_for("unused", init="text", tie_items=tie)
        model = build_model(cfg, data.items)
        init_items(model, cfg, data)
        for vec in (model.items.id_emb.weight, model.item_vectors()):
            d = torch.cdist(vec.detach()[:3], vec.detach()[:3])
            assert d[0, 1] < 1e-4 * d[0, 2] and d[0, 2] > 0  # same title: the same vector; other titles: apart


def test_tied_item_vectors_are_the_projected_inputs(data):
    model = build_model(cfg_for("unused", tie_items=True), data.items)
    assert model.head.item_out is None
    assert torch.equal(model.item_vectors(), model.items.proj(model.items.id_emb.weight) * model.items.tied_scale)
    assert model.items.tied_scale.requires_grad
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("head.item_out") for n in names)


def test_init_errors_name_the_problem(data, sasrec_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        cfg_for(tmp_path, init="sasrec")
    with pytest.raises(ConfigError, match="items.init"):
        cfg_for(tmp_path, init="word2vec")
    with pytest.raises(ConfigError, match="needs itemlm.head=full"):
        cfg_for(tmp_path, tie_items=True, head="two_level")
    cfg = cfg_for(tmp_path, init="sasrec", init_from=str(sasrec_ckpt), item_dim=8)
    with pytest.raises(ValueError, match="itemlm.item_dim=16"):
        init_items(build_model(cfg, data.items), cfg, data)
    cfg = cfg_for(tmp_path, init="sasrec", init_from=str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="init_from"):
        init_items(build_model(cfg, data.items), cfg, data)
    no_titles = SequenceDataset(data.name, ItemTable(data.items.ids, {}), data.users, data.sequences, data.source)
    cfg = cfg_for(tmp_path, init="text")
    with pytest.raises(Exception, match="item text"):
        init_items(build_model(cfg, no_titles.items), cfg, no_titles)


def test_collapse_metric_on_a_hand_made_ranking():
    top = np.array([[3, 1, 2], [3, 2, 0], [1, 3, 2], [3, 0, 1], [2, 1, 0]])  # item 3 is top-1 for 3 of 5 users
    d = diversity(top)
    assert d == {"top1_share": 0.6, "distinct_top3": 4, "collapsed": True}
    spread = diversity(np.arange(10)[:, None] + np.zeros((10, 2), dtype=int))
    assert spread == {"top1_share": 0.1, "distinct_top2": 10, "collapsed": False}
    with pytest.raises(ValueError):
        diversity(np.zeros((0, 10), dtype=int))


def test_evaluation_reports_a_popularity_model_as_collapsed(data):
    class Popular(torch.nn.Module):  # every history gets the same scores
        n_items = data.n_items
        default_decoder = "exact"

        def scores(self, histories):
            return torch.arange(self.n_items, dtype=torch.float32).expand(len(histories), -1)

    ex = data.examples("test")
    m = evaluate(Popular(), ex, max_history=6)
    assert m["collapsed"] and m["top1_share"] == 1.0 and m["distinct_top10"] == 10
    assert m["users"] == len(ex)


def test_ndcg_standard_error_known_answer():
    m = ranking_metrics([1, 1, 100, 100])  # per-user gains 1, 1, 0, 0: std 0.5
    assert m["ndcg@10_se"] == pytest.approx(0.5 / 2)


def test_epoch_budget_and_constant_schedule():
    t = TrainConfig(max_steps=1000, max_epochs=2.5, eval_every=7, eval_every_epochs=0.5)
    assert budget(t, 40) == (100, 20)  # 2.5 epochs of 40 batches end the run before 1,000 steps
    assert budget(TrainConfig(max_steps=50, max_epochs=3), 40) == (50, 200)  # steps end it first
    f = lr_lambda(10, 100, "constant")
    assert f(4) == pytest.approx(0.5) and f(10) == f(99) == 1.0
    assert lr_lambda(10, 100)(99) < 0.01
    with pytest.raises(ConfigError, match="lr_schedule"):
        from_dict({"train": {"lr_schedule": "linear"}})


def test_epoch_budget_stops_training(data, tmp_path):
    res = train(cfg_for(tmp_path, model="sasrec", train_extra={"max_steps": 10_000, "max_epochs": 2,
                                                               "eval_every_epochs": 1}), dataset=data)
    assert res.step == 2 * math.ceil(sum(len(s) >= 2 for s in data.split.train) / 16)


def test_random_backbone_has_the_same_shape_and_new_weights(data):
    pre = build_model(cfg_for("unused"), data.items)
    # the tiny test backbone is itself random, from seed 0: another seed tells the weights apart
    rnd = build_model(cfg_for("unused", pretrained=False, train_extra={"seed": 1}), data.items)
    a = {k: v for k, v in pre.state_dict().items() if k.startswith("backbone.")}
    b = {k: v for k, v in rnd.state_dict().items() if k.startswith("backbone.")}
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight") and a[k].ndim == 2)


def test_tied_items_with_a_text_encoder_use_the_summed_inputs(data, tmp_path):
    cfg = cfg_for(tmp_path, tie_items=True, item_encoder="text+id")
    model = build_model(cfg, data.items)
    ids = torch.arange(data.n_items)
    want = model.items.proj(model.items.id_emb(ids) + model.items.text_proj(model.items.text_features(ids))) * model.items.tied_scale
    assert torch.allclose(model.item_vectors(), want)
    assert train(cfg, dataset=data).step == 1
    # text-only inputs tie too: every output vector then comes from text
    model = build_model(cfg_for(tmp_path, tie_items=True, item_encoder="text"), data.items)
    want = model.items.proj(model.items.text_proj(model.items.text_features())) * model.items.tied_scale
    assert model.items.id_emb is None and torch.allclose(model.item_vectors(), want)


def test_a_fresh_run_in_a_used_folder_starts_its_logs_anew(data, tmp_path):
    cfg = cfg_for(tmp_path, model="sasrec", train_extra={"max_steps": 4, "eval_every": 2})
    train(cfg, dataset=data)
    train(cfg, dataset=data)  # not --resume: a new run, the same out folder
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_tied_item_vectors_are_cached_for_scoring_until_a_weight_changes(data, tmp_path):
    model = build_model(cfg_for(tmp_path, tie_items=True), data.items)
    fresh = lambda: model.items.proj(model.items.id_emb.weight) * model.items.tied_scale  # noqa: E731
    with torch.no_grad():
        first = model.item_vectors()
        assert model.item_vectors() is first  # kept, not recomputed
        assert torch.equal(first, fresh())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.loss(model.to_device(model.train_batch([s for s in data.split.train if len(s) >= 2][:8],
                                                 np.random.default_rng(0)))).backward()
    opt.step()  # in place: the cache must notice
    with torch.no_grad():
        after = model.item_vectors()
        assert after is not first and torch.equal(after, fresh()) and not torch.equal(after, first)
    with torch.inference_mode():
        assert torch.equal(model.item_vectors(), after)
    assert model.item_vectors().requires_grad  # training path: never the cached tensor


def test_tied_cache_is_refreshed_after_the_training_loops_optimizer_and_validation(data, tmp_path):
    """The training loop's fused AdamW updates weights in place without bumping tensor versions:
    the cache must still be dropped, or validation scores stale item vectors (a real bug)."""
    from itemgen.training.loop import make_optimizer

    cfg = cfg_for(tmp_path, tie_items=True)
    model = build_model(cfg, data.items)
    model.eval()
    with torch.no_grad():
        first = model.item_vectors().clone()
    model.train()
    opt = make_optimizer(model, cfg)
    model.loss(model.to_device(model.train_batch([s for s in data.split.train if len(s) >= 2][:8],
                                                 np.random.default_rng(0)))).backward()
    opt.step()
    model.eval()  # what validation does (evaluate.rank_and_top)
    with torch.no_grad():
        after = model.item_vectors()
        fresh = model.items.proj(model.items.id_emb.weight) * model.items.tied_scale
    assert not torch.equal(after, first) and torch.equal(after, fresh)


def test_validation_during_training_matches_the_saved_checkpoint(data, tmp_path):
    """What early stopping sees is what the checkpoints score when loaded."""
    cfg = cfg_for(tmp_path, train_extra={"max_steps": 6, "eval_every": 2, "eval_users": None, "lr": 0.05},
                  tie_items=True)
    res = train(cfg, dataset=data)
    logged = [json.loads(line)["valid"]["ndcg@10"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for ckpt, want in ((res.best, max(logged)), (res.out / "last", logged[-1])):
        model, mcfg, _ = load_checkpoint(ckpt)
        again = evaluate(model, data.examples("valid"), max_history=mcfg.data.max_history, progress=False)
        assert again["ndcg@10"] == pytest.approx(want, abs=1e-9)


def test_backbone_dropout_acts_in_training_only(data, tmp_path):
    torch.manual_seed(0)
    plain = build_model(cfg_for(tmp_path), data.items)
    torch.manual_seed(0)  # the same item table and projection
    dropped = build_model(cfg_for(tmp_path, backbone_dropout=0.3), data.items)
    attn = dropped.backbone.model.layers[0].self_attn
    assert attn.attention_dropout == 0.3 and plain.backbone.model.layers[0].self_attn.attention_dropout == 0.0
    batch = dropped.query_batch([s[:-1] for s in data.split.train[:6]])
    plain.eval(), dropped.eval()
    with torch.no_grad():  # same seeded tiny weights: evaluation is unchanged by the dropout
        assert torch.equal(plain.encode(batch), dropped.encode(batch))
        dropped.train()
        torch.manual_seed(0)
        a = dropped.encode(batch)
        torch.manual_seed(1)
        b = dropped.encode(batch)
        plain.train()
        assert not torch.equal(a, b) and torch.equal(plain.encode(batch), plain.encode(batch))
    with pytest.raises(ConfigError, match="backbone_dropout"):
        cfg_for(tmp_path, backbone_dropout=1.0)


def test_validation_can_rank_without_history_items(data, tmp_path):
    cfg = cfg_for(tmp_path, model="sasrec", train_extra={"max_steps": 2, "eval_every": 2, "eval_users": None,
                                                         "eval_exclude_history": True})
    res = train(cfg, dataset=data)
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["valid"]["ndcg@10"]
    model, mcfg, _ = load_checkpoint(res.out / "last")
    ex = data.examples("valid")
    masked = evaluate(model, ex, max_history=mcfg.data.max_history, exclude_history=True, progress=False)
    plain = evaluate(model, ex, max_history=mcfg.data.max_history, progress=False)
    assert logged == pytest.approx(masked["ndcg@10"], abs=1e-9) and masked["ndcg@10"] != plain["ndcg@10"]


def test_sasrec_start_reaches_both_levels_of_the_two_level_head(data, sasrec_ckpt, tmp_path):
    """Regression: the two-level head took the SASRec start in its item vectors only, its cluster
    centroids stayed random, so level 1 (which cluster) started with no geometry at all."""
    from itemgen.heads.clusters import Clusters, random_clusters

    path = Clusters(random_clusters(data.n_items, 5, seed=1), "random").save(tmp_path / "c.json")
    full_cfg = cfg_for("unused", init="sasrec", init_from=str(sasrec_ckpt))
    two_cfg = cfg_for("unused", init="sasrec", init_from=str(sasrec_ckpt), head="two_level", clusters=str(path))
    full, two = build_model(full_cfg, data.items), build_model(two_cfg, data.items)
    two.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("head.")}, strict=False)
    init_items(full, full_cfg, data)
    init_items(two, two_cfg, data)
    head = two.head
    # e_c(t) + e_t is the full head's start: the joint (ANN) score has the SASRec geometry
    assert torch.allclose(head.item_vectors(), full.head.item_out, atol=1e-6)
    for c in range(head.n_clusters):  # each centroid is its members' mean: level 1 has it too
        members = head.members(c)
        assert torch.allclose(head.centroids[c], full.head.item_out[members].mean(0), atol=1e-6)
        assert torch.allclose(head.item_out[members].mean(0), torch.zeros(head.item_out.shape[1]), atol=1e-6)
