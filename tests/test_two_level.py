"""Two-level softmax: probabilities against brute force, loss, clusters, a tiny ItemLM that learns
a known rule with it, checkpoints that carry their clusters, and the CLI around them."""

import json
import math
import shutil
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from itemgen.cli import app
from itemgen.core.config import ConfigError, from_dict
from itemgen.data.dataset import ItemTable, SequenceDataset
from itemgen.data.synthetic import make_dataset
from itemgen.heads.clusters import (ClusterError, Clusters, build_clusters, cluster_path, default_n_clusters,
                                    kmeans_clusters)
from itemgen.heads.softmax import ClusterCorrection, TwoLevelHead
from itemgen.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from itemgen.training.loop import train

runner = CliRunner()


def random_head(n_items, n_clusters, hidden=8, n_text=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    assign = torch.cat([torch.arange(n_clusters), torch.randint(0, n_clusters, (n_items - n_clusters,), generator=g)])
    assign = assign[torch.randperm(n_items, generator=g)]
    text = torch.randn(n_text, hidden, generator=g)
    head = TwoLevelHead(n_items, hidden, (lambda: text) if n_text else None, assign)
    with torch.no_grad():
        head.item_out.copy_(torch.randn(n_items, hidden, generator=g) * scale)
        head.centroids.copy_(torch.randn(n_clusters, hidden, generator=g) * scale)
    return head, text, assign


def brute_force_probs(head, text, assign, h):
    """P over V u I from the definition, one item at a time (float64)."""
    h = h.double()
    level1 = torch.cat([h @ text.double().T, h @ head.centroids.double().T], dim=1)
    p_cluster = torch.softmax(level1, dim=1)  # (B, V + C)
    V = text.shape[0]
    out = torch.zeros(h.shape[0], V + head.n_items, dtype=torch.float64)
    out[:, :V] = p_cluster[:, :V]
    for t in range(head.n_items):
        c = int(assign[t])
        members = torch.nonzero(assign == c)[:, 0]
        within = torch.softmax(h @ head.item_out.double()[members].T, dim=1)
        out[:, V + t] = p_cluster[:, V + c] * within[:, int(torch.nonzero(members == t)[0, 0])]
    return out


@pytest.mark.parametrize("n_items, n_clusters, n_text", [(30, 5, 7), (17, 1, 0), (12, 12, 3), (40, 6, 0)])
def test_probabilities_sum_to_one_and_match_brute_force(n_items, n_clusters, n_text):
    head, text, assign = random_head(n_items, n_clusters, n_text=n_text, seed=n_items)
    h = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        lp = head.log_probs(h)  # (B, V + I)
        ref = brute_force_probs(head, text, assign, h)
        assert lp.shape == (6, n_text + n_items)
        assert torch.allclose(lp.exp().sum(1), torch.ones(6, dtype=lp.dtype), atol=1e-5)
        assert torch.allclose(lp.exp().double(), ref, atol=1e-6)
        assert torch.allclose(head.item_log_probs(h), lp[:, n_text:])
        # the loss is -log of the brute-force probability of each target
        targets = torch.tensor([0, 3, n_items - 1, 5, 5, 2])
        want = -torch.log(ref[torch.arange(6), n_text + targets]).sum()
        assert torch.allclose(head.loss(h, targets).double(), want, rtol=1e-5)
        # a refined level 1 (exact log Z_c at its top clusters) still sums to 1 with the text tokens
        head.correction = ClusterCorrection(8, n_clusters, 4)
        head.correction.outer.weight.normal_(generator=torch.Generator().manual_seed(2))
        head.refine = min(2, n_clusters)
        lp = head.log_probs(h)
        assert torch.allclose(lp.exp().sum(1), torch.ones(6, dtype=lp.dtype), atol=1e-5)
        assert torch.allclose(head.item_log_probs(h), lp[:, n_text:])


def brute_force_biased_probs(head, text, assign, h, bias):
    """P over V u I with bias[b, t] added to item t's level-2 logit for row b (float64)."""
    h = h.double()
    level1 = torch.cat([h @ text.double().T, h @ head.centroids.double().T], dim=1) if text is not None \
        else h @ head.centroids.double().T
    p_cluster = torch.softmax(level1, dim=1)  # (B, V + C)
    V = 0 if text is None else text.shape[0]
    out = torch.zeros(h.shape[0], V + head.n_items, dtype=torch.float64)
    out[:, :V] = p_cluster[:, :V]
    for t in range(head.n_items):
        c = int(assign[t])
        members = torch.nonzero(assign == c)[:, 0]
        within = torch.softmax(h @ head.item_out.double()[members].T + bias[:, members], dim=1)
        out[:, V + t] = p_cluster[:, V + c] * within[:, int(torch.nonzero(members == t)[0, 0])]
    return out


def test_item_bias_enters_the_level2_softmax_as_brute_force():
    """The repeat bias on a two-level head: with_item_bias (from log-probabilities alone) and the
    loss's level-2 term both equal the definition, P(c | h) * softmax over c of (h . e_u + b_u)."""
    head, text, assign = random_head(30, 5, n_text=4, seed=7)
    h = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([0, 0, 0, 1, 3, 3])
    items = torch.tensor([2, 9, 17, 2, 0, 29])
    values = torch.tensor([-3.0, 1.5, -30.0, 2.0, 0.7, -1.0])
    dense = torch.zeros(4, 30, dtype=torch.float64)
    dense[rows, items] = values.double()
    ref = brute_force_biased_probs(head, text, assign, h, dense)  # (B, V + I)
    assert torch.allclose(ref.sum(1), torch.ones(4, dtype=torch.float64))
    with torch.no_grad():
        got = head.with_item_bias(head.item_log_probs(h), (rows, items, values))  # (B, I)
        assert torch.allclose(got.double(), torch.log(ref[:, 4:]), atol=1e-5)
        # untouched rows and untouched clusters are bit-identical
        assert torch.equal(got[2], head.item_log_probs(h)[2])
        untouched = ~torch.isin(assign, assign[items[rows == 1]])
        assert torch.equal(got[1, untouched], head.item_log_probs(h)[1, untouched])
        targets = torch.tensor([9, 2, 5, 29])  # 9 and 2: biased items of their own label; 5: none
        want = -torch.log(ref[torch.arange(4), 4 + targets]).sum()
        assert torch.allclose(head.loss(h, targets, (rows, items, values)).double(), want, rtol=1e-5)


def test_level1_correction_probabilities_and_loss_from_the_definition():
    """With a ClusterCorrection g, P(c | h) = softmax over V u C of [h . text ; h . e_c + g_c(h)]:
    probabilities sum to one and equal brute force; a fresh g (last layer zero) changes nothing."""
    head, text, assign = random_head(40, 9, n_text=4, seed=5)
    fresh = TwoLevelHead(40, 8, lambda: text, assign, correction=6)
    fresh.load_state_dict({**fresh.state_dict(), "item_out": head.item_out, "centroids": head.centroids})
    h = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fresh.log_probs(h), head.log_probs(h))
        for p in fresh.correction.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        g = fresh.correction(h).double()  # (B, C)
        p = torch.softmax(torch.cat([h.double() @ text.double().T, h.double() @ head.centroids.double().T + g], 1), 1)
        il = h.double() @ head.item_out.double().T  # (B, I)
        ref = torch.cat([p[:, :4], torch.stack([p[:, 4 + int(assign[t])] * torch.softmax(
            il[:, assign == assign[t]], 1)[:, int((torch.nonzero(assign == assign[t])[:, 0] == t).nonzero())]
            for t in range(40)], 1)], 1)
        got = fresh.log_probs(h).double().exp()
        assert torch.allclose(got.sum(1), torch.ones(6, dtype=torch.float64))
        assert torch.allclose(got, ref, atol=1e-6)
    # the loss is the likelihood of that model, and g is not trained with it (fitted afterwards)
    targets = torch.tensor([0, 5, 5, 11, 39, 20])
    assert torch.allclose(fresh.loss(h, targets).double(), -torch.log(ref[torch.arange(6), 4 + targets]).sum(),
                          rtol=1e-5)
    assert not any(p.requires_grad for p in fresh.correction.parameters())
    with pytest.raises(ConfigError, match="cluster_correction"):
        from_dict({"model": "itemlm", "itemlm": {"head": "two_level", "cluster_correction": -2}})


def test_loss_gradient_touches_only_the_labels_clusters():
    head, _, assign = random_head(60, 8, seed=3)
    head.sparse_grad = True
    targets = torch.tensor([1, 7, 7])
    h = torch.randn(3, 8, requires_grad=True)
    head.loss(h, targets).backward()
    g = head.item_out.grad.coalesce()
    touched = set(g.indices()[0].tolist())
    allowed = set(torch.nonzero(torch.isin(assign, assign[targets]))[:, 0].tolist())
    assert touched <= allowed and touched  # sparse rows: members of the labels' clusters only
    dense = TwoLevelHead(60, 8, None, assign)
    dense.load_state_dict(head.state_dict())
    dense.loss(h.detach(), targets).backward()
    assert torch.allclose(dense.item_out.grad, g.to_dense(), atol=1e-6)


def test_head_rejects_bad_assignments():
    with pytest.raises(ValueError, match="covers"):
        TwoLevelHead(10, 4, None, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="empty cluster"):
        TwoLevelHead(3, 4, None, torch.tensor([0, 2, 2]))


# ---- clusters ---------------------------------------------------------------------------

def two_communities(n_users=400, seed=0):
    """Items 0..19 and 20..39 are never used by the same user: collaborative clusters are known."""
    rng = np.random.default_rng(seed)
    seqs = []
    for u in range(n_users):
        base = 0 if u % 2 == 0 else 20
        seqs.append(base + rng.integers(0, 20, size=int(rng.integers(4, 9))))
    ids = [f"I{i}" for i in range(40)]
    return SequenceDataset("communities", ItemTable(ids, {}), [f"U{u}" for u in range(n_users)], seqs)


def test_kmeans_on_als_embeddings_recovers_communities():
    ds = two_communities()
    c = build_clusters(ds, "kmeans", n_clusters=2, seed=0)
    assert c.n_clusters == 2 and c.n_items == 40
    assert len(set(c.assign[:20])) == 1 and len(set(c.assign[20:])) == 1
    assert c.assign[0] != c.assign[20]
    assert c.dataset == ds.content_hash()


def test_kmeans_splits_oversized_clusters():
    x = np.zeros((50, 4), dtype=np.float32)
    x[:45, 0], x[45:, 1] = 1.0, 1.0  # one huge group, one small one
    assign, info = kmeans_clusters(x, n_clusters=5, seed=0, max_size_factor=2.0)
    sizes = np.bincount(assign)
    assert sizes.max() <= info["size_cap"] == 20 and info["split_clusters"] >= 1
    assert len(set(assign[:45]) & set(assign[45:])) == 0


def test_frequency_and_random_clusters():
    ds = make_dataset(n_users=300, n_items=50, noise=0.5, seed=4)
    f = build_clusters(ds, "frequency", n_clusters=5)
    counts = np.bincount(np.concatenate(ds.split.train), minlength=50)
    sizes = f.sizes()
    assert sizes.max() - sizes.min() <= 1
    # cluster 0 holds the most frequent items, cluster 4 the rarest
    for a, b in zip(range(4), range(1, 5)):
        assert counts[f.assign == a].min() >= counts[f.assign == b].max()
    r1 = build_clusters(ds, "random", seed=7)
    r2 = build_clusters(ds, "random", seed=7)
    r3 = build_clusters(ds, "random", seed=8)
    assert r1.n_clusters == default_n_clusters(50) == 7
    assert np.array_equal(r1.assign, r2.assign) and not np.array_equal(r1.assign, r3.assign)
    assert r1.sizes().max() - r1.sizes().min() <= 1


def test_clusters_use_the_training_split_only():
    """An item seen only as a valid/test target has no training count: frequency puts it last."""
    seqs = [np.array([0, 1, 2, 3, 4, 9, 9, 9])] + [np.array([0, 1, 2, 3]) for _ in range(5)]
    ds = SequenceDataset("leak", ItemTable([f"I{i}" for i in range(10)], {}), [f"U{u}" for u in range(6)], seqs)
    f = build_clusters(ds, "frequency", n_clusters=10)
    assert f.assign[9] >= 5  # 9 appears in the training part once (the valid/test 9s are not counted)
    assert f.assign[0] < f.assign[9]


def test_cluster_file_errors(tmp_path):
    ds = make_dataset(n_users=50, n_items=20, seed=0)
    with pytest.raises(ClusterError, match="not one of kmeans, frequency, random"):
        build_clusters(ds, "spectral")
    with pytest.raises(ClusterError, match="between 1 and the catalog size 20"):
        build_clusters(ds, "random", n_clusters=21)
    c = build_clusters(ds, "random")
    c.save(tmp_path / "c.json")
    assert np.array_equal(Clusters.load(tmp_path / "c.json", 20).assign, c.assign)
    with pytest.raises(ClusterError, match="assign 20 items but the item table has 25"):
        Clusters.load(tmp_path / "c.json", 25)
    with pytest.raises(ClusterError, match="cluster file not found"):
        Clusters.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"assign": [0, 2]}')
    with pytest.raises(ClusterError, match="not a valid cluster file|empty"):
        Clusters.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="itemlm.head: full|two_level"):
        from_dict({"itemlm": {"head": "three_level"}})
    with pytest.raises(ConfigError, match="itemlm.cluster_method"):
        from_dict({"itemlm": {"cluster_method": "spectral"}})


def test_cli_clusters_build_prints_stats(tmp_path):
    data = tmp_path / "data"
    make_dataset(n_users=200, n_items=36, seed=1).save(data)
    res = runner.invoke(app, ["clusters", "build", str(data), "--method", "frequency"])
    assert res.exit_code == 0, res.output
    assert "clusters" in res.output and "max" in res.output and "median" in res.output
    c = Clusters.load(cluster_path(data, "frequency"), 36)
    assert c.n_clusters == 6 and c.method == "frequency"
    res = runner.invoke(app, ["clusters", "build", str(data), "--method", "nope"])
    assert res.exit_code == 2 and "not one of kmeans, frequency, random" in res.output
    res = runner.invoke(app, ["clusters", "build", str(tmp_path / "none")])
    assert res.exit_code == 2 and "not a prepared dataset" in res.output


# ---- a two-level ItemLM end to end ------------------------------------------------------

RULE = dict(n_users=600, n_items=40, min_len=4, max_len=8, noise=0.0, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_level")
    ds = make_dataset(**RULE)
    data = root / "data"
    ds.save(data)
    cfg = from_dict({
        "model": "itemlm", "data": {"path": str(data), "max_history": 10},
        "itemlm": {"backbone": "tiny", "prompt": "compact", "item_dim": 32, "id_only_share": 0.5,
                   "head": "two_level", "cluster_method": "random"},
        "train": {"out": str(root / "run"), "lr": 3e-3, "batch_size": 32, "max_steps": 150, "eval_every": 50,
                  "eval_users": None, "warmup_steps": 10, "progress": False, "patience": 100}})
    result = train(cfg, dataset=ds)
    return ds, data, cfg, result


def test_two_level_itemlm_learns_the_rule(trained):
    ds, data, cfg, result = trained
    from itemgen.evaluation.evaluate import evaluate

    model, _, _ = load_checkpoint(result.best)
    assert isinstance(model.head, TwoLevelHead) and model.head.n_clusters == 6
    m = evaluate(model, ds.split.test, max_history=10)
    assert m["recall@1"] >= 0.9, m
    # the clusters were built with the dataset and copied into the checkpoint
    stored = Clusters.load(cluster_path(data, "random"), 40)
    assert np.array_equal(Clusters.load(result.best / "clusters.json", 40).assign, stored.assign)


def test_checkpoint_with_foreign_clusters_is_an_error(trained, tmp_path):
    ds, data, cfg, result = trained
    broken = tmp_path / "ckpt"
    shutil.copytree(result.best, broken)
    blob = json.loads((broken / "clusters.json").read_text())
    blob["assign"] = blob["assign"][:-1]
    blob["n_items"] = 39
    (broken / "clusters.json").write_text(json.dumps(blob))
    with pytest.raises(ClusterError, match="assign 39 items but the item table has 40"):
        load_checkpoint(broken)
    blob = json.loads((result.best / "clusters.json").read_text())
    blob["assign"] = [i % 5 for i in range(40)]  # right items, another cluster count
    blob["n_clusters"] = 5
    (broken / "clusters.json").write_text(json.dumps(blob))
    with pytest.raises(CheckpointError, match="does not fit.*clusters.json.*head.centroids"):
        load_checkpoint(broken)
    (broken / "clusters.json").unlink()
    with pytest.raises(ClusterError, match="cluster file not found"):
        load_checkpoint(broken)


def test_evaluate_with_every_decoder(trained):
    ds, data, cfg, result = trained
    from itemgen.api import evaluate_checkpoint

    exact = evaluate_checkpoint(result.best, decode="exact")["metrics"]
    structure = evaluate_checkpoint(result.best, decode="structure")["metrics"]
    for key in ("recall@1", "recall@10", "ndcg@10"):
        assert structure[key] == pytest.approx(exact[key], abs=1e-9), key
    assert 1 <= structure["decoder"]["clusters_opened_mean"] <= 6
    res = runner.invoke(app, ["evaluate", str(result.best), "--decode", "ann"])
    assert res.exit_code == 2 and "no ANN index" in res.output and "itemgen index build" in res.output
    res = runner.invoke(app, ["index", "build", str(result.best), "--type", "flat", "--states", "256"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", str(result.best), "--decode", "ann"])
    assert res.exit_code == 0, res.output
    ann = json.loads((result.best / "eval_test_ann.json").read_text())["metrics"]
    assert ann["recall@10"] >= exact["recall@10"] - 0.05 and ann["recall@1"] >= 0.85
    res = runner.invoke(app, ["index", "build", str(result.best), "--type", "annoy"])
    assert res.exit_code == 2 and "not one of flat, ivf, hnsw" in res.output


@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_gather_dot_matches_plain_autograd(sparse):
    """The memory-lean within-cluster logits give autograd's gradients (h and item vectors)."""
    from itemgen.heads.softmax import _GatherDot

    g = torch.Generator().manual_seed(0)
    W = torch.randn(50, 6, generator=g, requires_grad=True)
    h = torch.randn(11, 6, generator=g, requires_grad=True)  # 11 labels: chunks of 8 and 3
    idx = torch.randint(0, 50, (11, 7), generator=g)
    weights = torch.randn(11, 7, generator=g)
    (_GatherDot.apply(h, W, idx, sparse) * weights).sum().backward()
    gh, gw = h.grad.clone(), W.grad.to_dense() if sparse else W.grad.clone()
    h.grad = W.grad = None
    (torch.einsum("nh,nsh->ns", h, W[idx]) * weights).sum().backward()
    assert torch.allclose(gh, h.grad, atol=1e-5) and torch.allclose(gw, W.grad, atol=1e-5)


def test_quality_benchmark_counts_users_whose_structure_top10_differs(trained, monkeypatch):
    """benchmarks/quality.py's check of Tables 4-5's exactness claim: none differ when Structure
    is exact, and a Structure that stops too early is caught."""
    import importlib.util
    from pathlib import Path

    from itemgen.topk.structure import StructureTopK

    spec = importlib.util.spec_from_file_location(
        "quality_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    ds, data, cfg, result = trained
    from itemgen.api import evaluate_checkpoint

    figures = quality.decoder_figures(result.best, data, ["structure"])  # one LM pass for every cell
    for split, masked in (("test_by_decoder", False), ("test_by_decoder_history_masked", True)):
        ref = evaluate_checkpoint(result.best, decode="structure", exclude_history=masked,
                                  out=result.best / "unused.json")["metrics"]
        for key in ("recall@10", "ndcg@10", "mrr"):
            assert figures[split]["structure"][key] == pytest.approx(ref[key], abs=1e-12), (split, key)
    counts = figures["topk_vs_exact"]["structure"]
    for proto in ("history_kept", "history_masked"):
        c = counts[proto]
        assert c["users"] == len(ds.examples("test")) and c["mean_overlap"] == 1.0, c
        assert c["users_differ"] == c["users_differ_as_sets"] == c["users_differ_in_scores"] == 0, c
    monkeypatch.setattr(StructureTopK, "margin", -1e9)  # stops as soon as it holds 10 items
    broken = quality.topk_vs_exact(result.best, data, ["structure"])["structure"]["history_kept"]
    assert broken["users_differ_in_scores"] > 0 and broken["mean_overlap"] < 1.0


def test_level1_fit_after_training(trained, tmp_path, monkeypatch):
    """itemlm.cluster_correction: training is the same as without it (same weights, bit for bit),
    then g is fitted to log Z_c at training states, kept only if validation gains; the checkpoint
    then reproduces its validation figure, Structure stays exact, and g moved level 1."""
    from itemgen.evaluation.evaluate import evaluate
    from itemgen.training import level1_fit

    monkeypatch.setattr(level1_fit, "STATES", 512)
    monkeypatch.setattr(level1_fit, "STEPS", 300)
    ds, data, cfg, plain = trained
    values = json.loads(cfg.to_json())
    values["itemlm"]["cluster_correction"] = 16
    values["train"]["out"] = str(tmp_path / "run")
    result = train(from_dict(values), dataset=ds)
    rows = [json.loads(line) for line in (result.out / "history.jsonl").read_text().splitlines()]
    fit = [r["level1_fit"] for r in rows if "level1_fit" in r]
    assert len(fit) == 1 and fit[0]["states"] == 512 and fit[0]["steps"] == 300
    assert fit[0]["mse"] < fit[0]["mse_at_cluster_mean"] < fit[0]["mse_at_zero"]
    model, _, _ = load_checkpoint(result.best)
    base, _, _ = load_checkpoint(plain.best)
    assert torch.equal(model.head.item_out, base.head.item_out)  # the likelihood trained the same weights
    assert torch.equal(model.head.centroids, base.head.centroids)
    m = evaluate(model, ds.split.valid, max_history=10, exclude_history=cfg.train.eval_exclude_history)
    if fit[0]["kept"]:
        assert result.metrics["level1_fit"]["kept"] and m["ndcg@10"] == pytest.approx(fit[0]["valid_ndcg@10"])
        assert model.head.correction.outer.weight.abs().sum() > 0
    else:  # the checkpoint is the one training validated, g = 0
        assert model.head.correction.outer.weight.abs().sum() == 0
        assert m["ndcg@10"] == pytest.approx(fit[0]["valid_ndcg@10_before"])
    # the same fit applied to the checkpoint trained without the option: the same g, the same figure
    fitted = level1_fit.fit_checkpoint(plain.best, tmp_path / "fitted", 16)
    again, _, _ = load_checkpoint(tmp_path / "fitted")
    x = torch.randn(7, model.head.item_out.shape[1])
    with torch.no_grad():  # (a dropped g is zero whatever its first layer holds)
        assert torch.equal(again.head.correction(x), model.head.correction(x))
    assert fitted["valid_ndcg@10"] == pytest.approx(fit[0]["valid_ndcg@10"]) and fitted["kept"] == fit[0]["kept"]
    with pytest.raises(ValueError, match="already has a correction"):
        level1_fit.fit_checkpoint(result.best, tmp_path / "twice", 16)
    # the CLI: the same fit, its figures as JSON; never over its own input
    res = runner.invoke(app, ["clusters", "fit-level1", str(plain.best), "--out", str(tmp_path / "cli"),
                              "--width", "16", "--log-format", "json"])
    assert res.exit_code == 0, res.output
    shown = next(json.loads(line) for line in res.output.splitlines() if '"event": "result"' in line)
    assert shown["valid_ndcg@10"] == pytest.approx(fit[0]["valid_ndcg@10"]) and shown["kept"] == fit[0]["kept"]
    res = runner.invoke(app, ["clusters", "fit-level1", str(plain.best), "--out", str(plain.best)])
    assert res.exit_code == 2 and "is the checkpoint itself" in res.output
    assert (plain.best / "model.safetensors").is_file()
    res = runner.invoke(app, ["clusters", "fit-level1", str(result.best), "--out", str(tmp_path / "again")])
    assert res.exit_code == 2 and "already has a correction" in res.output
    h = torch.randn(5, model.head.item_out.shape[1])
    from itemgen.topk.structure import StructureTopK

    with torch.no_grad():
        _, ids = StructureTopK(model).topk(h, 5)
        assert torch.equal(ids, torch.topk(model.head.item_log_probs(h), 5, dim=1).indices)
    # the fit's other objective, named in its record; an unknown one refused before any work
    res = runner.invoke(app, ["clusters", "fit-level1", str(plain.best), "--out", str(tmp_path / "kl"),
                              "--width", "16", "--objective", "kl", "--log-format", "json"])
    assert res.exit_code == 0, res.output
    assert next(json.loads(line) for line in res.output.splitlines() if '"event": "result"' in line)["objective"] == "kl"
    res = runner.invoke(app, ["clusters", "fit-level1", str(plain.best), "--out", str(tmp_path / "mae"), "--objective", "mae"])
    assert res.exit_code == 2 and "objective must be mse or kl" in res.output and not (tmp_path / "mae").exists()


def test_level1_targets_carry_the_repeat_bias():
    """log Z_c targets are those of the level-2 logits the model ranks with: h . e_t plus the repeat
    bias at the prefix's own items (brute force, cluster by cluster)."""
    from itemgen.models.repeat_bias import RepeatBias
    from itemgen.training.level1_fit import log_normalizers

    head, _, assign = random_head(30, 4, n_text=0, seed=2)
    repeat = RepeatBias("recency", 5)
    with torch.no_grad():
        repeat.raw.copy_(torch.tensor([-0.5, -0.2, 0.1, 0.3]))
    model = types.SimpleNamespace(head=head, repeat=repeat)
    prefixes = [np.array([3, 7]), np.array([0]), np.array([5, 5, 9, 2, 28, 14])]
    h = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    got = log_normalizers(model, h, prefixes, chunk=2)
    for n, p in enumerate(prefixes):
        logits = (h[n] @ head.item_out.T).double()
        for back, item in enumerate(reversed(np.asarray(p)[-5:].tolist())):
            if (np.asarray(p)[-5:][len(p[-5:]) - back:] == item).any():
                continue  # each item once, at its most recent position
            logits[item] += float(repeat.bias(torch.tensor([back]))[0].detach())
        for c in range(4):
            assert float(got[n, c]) == pytest.approx(float(torch.logsumexp(logits[assign == c], 0)), abs=1e-5)
    plain = log_normalizers(types.SimpleNamespace(head=head, repeat=None), h, prefixes)
    assert torch.allclose(plain, head.cluster_log_normalizers(h))


def test_fit_prefixes_are_every_distinct_training_prefix_once():
    """The fit's states: each prefix s[:k], 1 <= k < len(s), of the training sequences once, cut to
    max_history (never a sequence whole: its next item is the validation target); a cap takes a
    seeded sample without repeats."""
    from itemgen.training.level1_fit import fit_prefixes

    ds = types.SimpleNamespace(split=types.SimpleNamespace(train=[np.array([4, 5, 6]), np.array([7]), np.array([1, 2])]))
    got = [p.tolist() for p in fit_prefixes(ds, max_history=5, n=100)]
    assert got == [[4], [4, 5], [1]]
    assert [p.tolist() for p in fit_prefixes(ds, max_history=1, n=100)] == [[4], [5], [1]]
    some = [p.tolist() for p in fit_prefixes(ds, max_history=5, n=2, seed=3)]
    assert len(some) == 2 and all(p in got for p in some) and some[0] != some[1]
    assert some == [p.tolist() for p in fit_prefixes(ds, max_history=5, n=2, seed=3)]
    with pytest.raises(ValueError, match="at least 2 items"):
        fit_prefixes(types.SimpleNamespace(split=types.SimpleNamespace(train=[np.array([1])])), 5, 10)


def test_fit_to_targets_objectives():
    """g fitted to exact log Z_c targets: mse lowers the squared error from the start at each
    cluster's mean; kl lowers the cross-entropy of level 1's cluster distribution against the joint
    scores' (its objective) below the mse fit's. Deterministic for a seed; an unknown objective is refused by name."""
    from itemgen.training.level1_fit import fit_to_targets

    head, _, _ = random_head(60, 5, n_text=0, seed=3)
    head.correction = ClusterCorrection(8, 5, 16).requires_grad_(False)
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        target = head.cluster_log_normalizers(x)  # (n, C)
        linear = x @ head.centroids.T
        joint = torch.softmax(linear + target, 1)

    def cross_entropy() -> float:
        with torch.no_grad():
            return float(-(joint * torch.log_softmax(linear + head.correction(x), 1)).sum(1).mean())

    fit = fit_to_targets(head, x, target, steps=300, seed=0)
    assert fit["objective"] == "mse" and fit["mse"] < fit["mse_at_cluster_mean"] < fit["mse_at_zero"]
    mse_g, mse_ce = head.correction(x).detach().clone(), cross_entropy()
    fit_to_targets(head, x, target, steps=300, seed=0)
    assert torch.equal(head.correction(x).detach(), mse_g)
    with torch.no_grad():
        head.correction.outer.weight.zero_()
        head.correction.outer.bias.zero_()
    at_zero = cross_entropy()
    kl = fit_to_targets(head, x, target, steps=300, seed=0, objective="kl")
    # each objective wins on its own measure (level 1's softmax ignores a shift shared by a row, so
    # kl leaves g's level free and its squared error is higher)
    assert kl["objective"] == "kl" and cross_entropy() < min(at_zero, mse_ce)
    assert kl["mse"] > fit["mse"]
    with pytest.raises(ValueError, match="objective must be mse or kl"):
        fit_to_targets(head, x, target, steps=1, objective="mae")


def test_second_stage_after_the_fit(trained, tmp_path, monkeypatch):
    """fit_checkpoint(stage_epochs=E): the fit, then E epochs of the likelihood with g frozen (every
    other weight trains; deterministic for a seed), both kept only if validation gains over the
    source, else the source's weights with g = 0; the stage and its figures are recorded; Structure
    stays exact; bad stage settings are refused, by the CLI too."""
    from itemgen.evaluation.evaluate import evaluate
    from itemgen.training import level1_fit

    monkeypatch.setattr(level1_fit, "STATES", 256)
    monkeypatch.setattr(level1_fit, "STEPS", 100)
    ds, data, cfg, plain = trained
    # the stage alone: g does not move, the rest does, the same way twice
    runs = []
    for _ in range(2):
        model, mcfg, _ = load_checkpoint(plain.best)
        model.head.correction = ClusterCorrection.frozen(model.head.item_out.shape[1], model.head.n_clusters, 8)
        with torch.no_grad():
            model.head.correction.outer.weight.normal_(generator=torch.Generator().manual_seed(0))
        g0 = {k: v.clone() for k, v in model.head.correction.state_dict().items()}
        level1_fit.second_stage(model, ds, mcfg, epochs=0.5, lr=1e-3)
        assert all(torch.equal(v, model.head.correction.state_dict()[k]) for k, v in g0.items())
        assert not any(p.requires_grad for p in model.head.correction.parameters())
        runs.append(model.head.item_out.detach().clone())
    base, _, _ = load_checkpoint(plain.best)
    assert not torch.equal(runs[0], base.head.item_out) and torch.equal(runs[0], runs[1])
    # the row: fit + stage, kept or not as validation says
    fit = level1_fit.fit_checkpoint(plain.best, tmp_path / "staged", 8, stage_epochs=0.5, stage_lr=1e-3)
    assert fit["stage"]["epochs"] == 0.5 and fit["stage"]["lr"] == 1e-3 and fit["stage"]["seconds"] >= 0
    model, _, _ = load_checkpoint(tmp_path / "staged")
    m = evaluate(model, ds.split.valid, max_history=10, exclude_history=cfg.train.eval_exclude_history)
    if fit["kept"]:
        assert fit["valid_ndcg@10"] > fit["valid_ndcg@10_before"]
        assert not torch.equal(model.head.item_out, base.head.item_out)
        assert model.head.correction.outer.weight.abs().sum() > 0
        assert m["ndcg@10"] == pytest.approx(fit["valid_ndcg@10"])
    else:
        assert torch.equal(model.head.item_out, base.head.item_out)
        assert model.head.correction.outer.weight.abs().sum() == 0
        assert m["ndcg@10"] == pytest.approx(fit["valid_ndcg@10_before"])
    from itemgen.topk.structure import StructureTopK

    h = torch.randn(5, model.head.item_out.shape[1])
    with torch.no_grad():
        _, ids = StructureTopK(model).topk(h, 5)
        assert torch.equal(ids, torch.topk(model.head.item_log_probs(h), 5, dim=1).indices)
    # a stage that wrecks the model is undone with the fit: the source's weights, g = 0
    def wreck(model, *args, **kwargs) -> float:
        with torch.no_grad():
            model.head.item_out.normal_(generator=torch.Generator().manual_seed(1))
        return 0.0

    monkeypatch.setattr(level1_fit, "second_stage", wreck)
    undone = level1_fit.fit_checkpoint(plain.best, tmp_path / "undone", 8, stage_epochs=0.5)
    assert not undone["kept"] and undone["valid_ndcg@10"] < undone["valid_ndcg@10_before"]
    model, _, _ = load_checkpoint(tmp_path / "undone")
    assert torch.equal(model.head.item_out, base.head.item_out) and torch.equal(model.head.centroids, base.head.centroids)
    assert model.head.correction.outer.weight.abs().sum() == 0
    for epochs, lr in ((-1.0, 1e-4), (float("nan"), 1e-4), (1.0, 0.0)):
        with pytest.raises(ValueError, match="stage epochs must be >= 0"):
            level1_fit.fit_checkpoint(plain.best, tmp_path / "bad", 8, stage_epochs=epochs, stage_lr=lr)
    res = runner.invoke(app, ["clusters", "fit-level1", str(plain.best), "--out", str(tmp_path / "cli"),
                              "--stage-epochs", "-1"])
    assert res.exit_code == 2 and "stage-epochs" in res.output


def test_refine_checkpoint_chooses_by_validation(trained, tmp_path, monkeypatch):
    """refine_checkpoint: each value of the grid scored on the validation users training used,
    the best kept (ties: the smaller), written with itemlm.cluster_refine set, and the checkpoint
    reproduces that figure; a checkpoint without a fitted level 1, a bad grid and --out = the input
    are refused, by the CLI too."""
    from itemgen.evaluation.evaluate import evaluate
    from itemgen.training import level1_fit

    monkeypatch.setattr(level1_fit, "STATES", 256)
    monkeypatch.setattr(level1_fit, "STEPS", 100)
    ds, data, cfg, plain = trained
    # a g fitted and kept whatever validation says, so that there is one to refine
    model, mcfg, _ = load_checkpoint(plain.best)
    model.head.correction = ClusterCorrection.frozen(model.head.item_out.shape[1], model.head.n_clusters, 8)
    level1_fit.fit_cluster_correction(model, ds, 10, seed=0)
    mcfg = replace(mcfg, itemlm=replace(mcfg.itemlm, cluster_correction=8))
    save_checkpoint(tmp_path / "fitted", model, mcfg, ds.items, dataset=ds.manifest())
    C = model.head.n_clusters
    assert level1_fit.refine_grid(C) == list(range(math.ceil(math.sqrt(C)) + 1))
    choice = level1_fit.refine_checkpoint(tmp_path / "fitted", tmp_path / "refined", grid=[2, 0, C])
    assert choice["grid"] == [0, 2, C] and set(choice["valid_ndcg@10"]) == {0, 2, C}
    best = max(choice["valid_ndcg@10"].values())
    assert choice["chosen"] == min(m for m, v in choice["valid_ndcg@10"].items() if v == best)
    refined, rcfg, _ = load_checkpoint(tmp_path / "refined")
    assert rcfg.itemlm.cluster_refine == choice["chosen"] == refined.head.refine
    assert json.loads((tmp_path / "refined" / "metrics.json").read_text())["valid"]["level1_refine"]["chosen"] == choice["chosen"]
    m = evaluate(refined, ds.split.valid, max_history=10, exclude_history=cfg.train.eval_exclude_history)
    assert m["ndcg@10"] == pytest.approx(best)
    for grid, msg in (([-1], "between 0 and"), ([C + 1], "between 0 and"), ([], "between 0 and")):
        with pytest.raises(ValueError, match=msg):
            level1_fit.refine_checkpoint(tmp_path / "fitted", tmp_path / "bad", grid=grid)
    with pytest.raises(ValueError, match="needs a two-level checkpoint whose level 1 has a correction"):
        level1_fit.refine_checkpoint(plain.best, tmp_path / "bad")
    # a g fitted with the kl objective is no estimate of log Z_c itself (only up to a shift a query)
    save_checkpoint(tmp_path / "kl", model, mcfg, ds.items, dataset=ds.manifest(),
                    metrics={"valid": {"level1_fit": {"objective": "kl"}}})
    with pytest.raises(ValueError, match="objective mse"):
        level1_fit.refine_checkpoint(tmp_path / "kl", tmp_path / "bad")
    res = runner.invoke(app, ["clusters", "refine-level1", str(tmp_path / "fitted"), "--out", str(tmp_path / "cli"),
                              "--grid", "0,1", "--log-format", "json"])
    assert res.exit_code == 0, res.output
    shown = next(json.loads(line) for line in res.output.splitlines() if '"event": "result"' in line)
    assert shown["chosen"] in (0, 1) and (tmp_path / "cli" / "model.safetensors").is_file()
    for args, msg in ((["--grid", "a,b"], "integers separated by commas"),
                      (["--out", str(tmp_path / "fitted")], "is the checkpoint itself")):
        res = runner.invoke(app, ["clusters", "refine-level1", str(tmp_path / "fitted"), "--out", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and msg in res.output, res.output
    assert (tmp_path / "fitted" / "model.safetensors").is_file()
