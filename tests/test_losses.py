"""Sampled ranking losses (losses.py): the corrected rank estimate is unbiased, logQ sampled
softmax converges to the full softmax, every loss equals its full-catalog reference when the
"sample" is the whole catalog, and every option trains SASRec on the known-rule data."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itemgen.core.config import ConfigError, LossConfig, from_dict
from itemgen.training.losses import (PopularitySampler, SampledLoss, UniformSampler, attach_loss, estimated_rank,
                                     full_catalog_negatives, item_counts, lambdarank, make_sampler, ranking_loss,
                                     sampled_softmax, warp)


def catalog(I=60, D=8, M=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, D, generator=g), torch.randn(I, D, generator=g), torch.randint(I, (M,), generator=g)


def skewed_counts(I, seed=0):
    """Zipf-like popularity, unrelated to the scores."""
    return np.random.default_rng(seed).permutation((1000 / np.arange(1, I + 1)).astype(int))


# ---- the rank estimate ---------------------------------------------------------------------
@pytest.mark.parametrize("sampler_kind", ["uniform", "popularity"])
def test_rank_estimate_is_unbiased(sampler_kind):
    I, N, draws = 200, 10, 40000
    scores = torch.randn(I, generator=torch.Generator().manual_seed(3))
    pos = int(torch.argsort(scores, descending=True)[30])  # 30 items outscore the positive
    true = int((scores > scores[pos]).sum())
    assert true == 30
    counts = skewed_counts(I)
    sampler = make_sampler(sampler_kind, I, counts)
    torch.manual_seed(0)
    neg, q = sampler.sample(draws * N, "cpu")
    neg, q = neg.view(draws, N), q.view(draws, N)  # one independent sample of N per row
    valid = neg != pos
    s_pos = scores[pos].expand(draws)
    est = estimated_rank(s_pos, scores[neg], 1.0 / (N * q), valid)  # (draws,)
    se = est.std() / math.sqrt(draws)
    assert abs(est.mean() - true) < 4 * se, (est.mean(), true, se)
    # the plain count within the sample is biased low (by about N / I under uniform sampling)
    plain = estimated_rank(s_pos, scores[neg], torch.ones_like(q), valid)
    assert plain.mean() < true / 5
    if sampler_kind == "uniform":
        assert abs(plain.mean() - true * N / I) < 0.1
    if sampler_kind == "popularity":
        # scaling to the catalog without importance weights is biased under non-uniform sampling
        scaled = plain * I / N
        assert abs(scaled.mean() - true) > 10 * se, (scaled.mean(), true)


def test_harmonic_and_warp_weight():
    from itemgen.training.losses import harmonic

    r = torch.tensor([0.0, 1.0, 2.0, 5.0])
    assert torch.allclose(harmonic(r), torch.tensor([0.0, 1.0, 1.5, 1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5]), atol=1e-5)


# ---- full-catalog references ----------------------------------------------------------------
def reference_losses(h, W, t, margin):
    """Plain loops over the catalog, straight from the definitions."""
    s = h @ W.T  # (M, I)
    out = {"sampled_softmax": F.cross_entropy(s, t, reduction="sum"), "warp": 0.0, "lambdarank": 0.0}
    for m in range(len(t)):
        p = int(t[m])
        others = [i for i in range(W.shape[0]) if i != p]
        viol = [i for i in others if s[m, i] + margin > s[m, p]]
        if viol:
            L = sum(1 / j for j in range(1, len(viol) + 1))
            out["warp"] = out["warp"] + L * sum(margin + s[m, i] - s[m, p] for i in viol) / len(viol)
        rank_p = 1 + sum(1 for i in others if s[m, i] > s[m, p])
        for i in others:
            rank_i = 1 + sum(1 for k in others if k != i and s[m, k] > s[m, i]) + int(s[m, p] > s[m, i])
            delta = abs(1 / math.log2(1 + rank_p) - 1 / math.log2(1 + rank_i))
            out["lambdarank"] = out["lambdarank"] + delta * F.softplus(s[m, i] - s[m, p])
    return out


@pytest.mark.parametrize("kind", ["sampled_softmax", "warp", "lambdarank"])
def test_whole_catalog_sample_equals_the_full_loss(kind):
    h, W, t = catalog(I=15, M=5)
    h = h * 0.5  # scores of order 1, so WARP's margin leaves some items unviolated
    ref = reference_losses(h, W, t, margin=0.5)[kind]
    loss = SampledLoss(LossConfig(kind=kind, margin=0.5), 15)
    got = loss(h, t, W, negatives=full_catalog_negatives(15))
    assert torch.allclose(got, torch.as_tensor(ref, dtype=got.dtype), rtol=1e-5), (got, ref)
    exact = SampledLoss(LossConfig(kind=kind, margin=0.5, sampler="all", correction=False), 15)  # w = 1 anyway
    assert torch.allclose(exact(h, t, W), got)


# ---- logQ sampled softmax converges to the full softmax ---------------------------------
def test_logq_sampled_softmax_approaches_full_softmax():
    I = 2000
    h, W, t = catalog(I=I, D=16, M=8, seed=1)
    h, W = h.requires_grad_(), W.requires_grad_()
    full = F.cross_entropy(h @ W.T, t, reduction="sum")
    g_full = torch.autograd.grad(full, h)[0]
    counts = skewed_counts(I, seed=1)
    torch.manual_seed(0)
    err, err_plain, cos = {}, {}, {}
    for N in (16, 256, 16384):
        for correction, store in ((True, err), (False, err_plain)):
            loss = SampledLoss(LossConfig(kind="sampled_softmax", negatives=N, sampler="popularity",
                                          correction=correction), I, counts)
            vals, grads = [], []
            for _ in range(8):
                v = loss(h, t, W)
                vals.append(v.item())
                grads.append(torch.autograd.grad(v, h)[0])
            store[N] = abs(np.mean(vals) - full.item()) / full.item()
            if correction:
                g = torch.stack(grads).mean(0).flatten()
                cos[N] = F.cosine_similarity(g, g_full.flatten(), dim=0).item()
    assert err[16384] < err[256] < err[16] and err[16384] < 0.01, err
    assert cos[16384] > cos[256] > cos[16] and cos[16384] > 0.99, cos
    assert err_plain[16384] > 5 * err[16384], (err_plain, err)  # without logQ it converges elsewhere


# ---- the model-facing path ----------------------------------------------------------------
def test_sampled_path_reads_only_target_and_negative_rows():
    I = 5000
    h, W, t = catalog(I=I, D=8, M=6)
    W.requires_grad_()
    torch.manual_seed(0)
    for kind in ("sampled_softmax", "warp", "lambdarank"):
        neg, q = UniformSampler(I).sample(32, "cpu")
        loss = SampledLoss(LossConfig(kind=kind, negatives=32, margin=10.0), I)(h, t, W, negatives=(neg, q))
        (g,) = torch.autograd.grad(loss, W)
        touched = set(g.abs().sum(1).nonzero().flatten().tolist())
        assert touched and touched <= set(t.tolist()) | set(neg.tolist()), kind


def test_uncorrected_softmax_is_not_the_corrected_one():
    h, W, t = catalog(I=100)
    neg, q = PopularitySampler(skewed_counts(100)).sample(20, "cpu")
    valid = neg[None] != t[:, None]
    s_pos, s_neg = (h * W[t]).sum(-1), h @ W[neg].T
    a = sampled_softmax(s_pos, s_neg, q, valid, correction=True)
    b = sampled_softmax(s_pos, s_neg, q, valid, correction=False)
    assert not torch.allclose(a, b)
    for fn in (warp, lambdarank):
        assert torch.isfinite(fn(s_pos, s_neg, q, valid, True)) and torch.isfinite(fn(s_pos, s_neg, q, valid, False))


def test_item_counts_and_sampler_errors():
    assert item_counts([np.array([0, 2, 2]), np.array([], dtype=np.int64), np.array([3])], 5).tolist() == [1, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="needs item counts"):
        make_sampler("popularity", 10)
    with pytest.raises(ValueError, match="cover 3 items, the catalog has 10"):
        make_sampler("popularity", 10, np.ones(3))
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("zipf", 10)
    with pytest.raises(ValueError, match="unknown sampled loss"):
        ranking_loss("bpr", None, None, None, None)
    q = PopularitySampler(np.array([0, 0, 8])).probs(torch.arange(3))
    assert torch.allclose(q, torch.tensor([1 / 11, 1 / 11, 9 / 11]))  # counts + 1: no item has q = 0


def test_loss_config_errors():
    for key, value, msg in [("kind", "bpr", "loss.kind"), ("sampler", "zipf", "loss.sampler"),
                            ("negatives", 0, "loss.negatives"), ("correction", "yes", "loss.correction")]:
        with pytest.raises(ConfigError, match=msg):
            from_dict({"model": "sasrec", "loss": {key: value}})


def test_attach_loss_to_every_model():
    from itemgen.data.synthetic import make_dataset
    from itemgen.models.registry import build_model

    ds = make_dataset(n_users=50, n_items=30, min_len=4, max_len=8, seed=2)
    seqs = ds.split.train[:8]
    for name in ("sasrec", "bert4rec", "gru4rec", "itemlm"):
        cfg = from_dict({"model": name, "loss": {"kind": "warp", "negatives": 8, "sampler": "popularity"},
                         "itemlm": {"backbone": "tiny", "prompt": "compact", "item_dim": 16}})
        model = build_model(cfg, ds.items)
        batch = model.train_batch(seqs, np.random.default_rng(0))
        torch.manual_seed(0)
        full = model.loss(batch)
        attach_loss(model, cfg.loss, item_counts(ds.split.train, ds.n_items))
        torch.manual_seed(0)
        sampled = model.loss(batch)
        assert torch.isfinite(sampled) and not torch.allclose(sampled, full), name
        sampled.backward()
        attach_loss(model, LossConfig(kind="full"), None)
        assert model.sampled_loss is None


# ---- every option trains SASRec on the rule data ----------------------------------------------
OPTIONS = [("sampled_softmax", True, "popularity"), ("sampled_softmax", False, "uniform"),
           ("warp", True, "uniform"), ("warp", False, "popularity"),
           ("lambdarank", True, "popularity"), ("lambdarank", False, "uniform")]


@pytest.mark.parametrize("kind,correction,sampler", OPTIONS)
def test_each_loss_trains_sasrec_on_the_rule(kind, correction, sampler, tmp_path):
    from itemgen.data.synthetic import make_dataset
    from itemgen.evaluation.evaluate import evaluate
    from itemgen.models.checkpoint import load_checkpoint
    from itemgen.training.loop import train

    ds = make_dataset(n_users=600, n_items=40, min_len=4, max_len=8, noise=0.0, seed=1)
    cfg = from_dict({"model": "sasrec", "sasrec": {"hidden": 32, "dropout": 0.0},
                     "data": {"path": "synthetic-inline", "max_history": 10},
                     "loss": {"kind": kind, "negatives": 8, "sampler": sampler, "correction": correction},
                     "train": {"out": str(tmp_path), "lr": 5e-3, "batch_size": 64, "max_steps": 80, "eval_every": 80,
                               "eval_users": None, "warmup_steps": 10, "progress": False}})
    result = train(cfg, dataset=ds)
    model, _, _ = load_checkpoint(result.best)
    m = evaluate(model, ds.split.test, max_history=10)
    assert m["recall@1"] >= 0.8, (kind, correction, sampler, m)  # chance is 1/40


# ---- loss.exclude_history ----------------------------------------------------------------------
def test_earlier_items_pairs_each_label_with_what_came_before_it():
    from itemgen.data.dataset import earlier_items

    pairs = earlier_items([np.array([4, 7, 9]), np.array([1, 2, 1, 3])])
    # sequence 0: labels 0 (7 after [4]) and 1 (9 after [4, 7]); sequence 1: labels 2, 3, 4
    # label 3 predicts 1 after [1, 2]: a repeat, so its own item stays in its softmax
    assert pairs.tolist() == [[0, 4], [1, 4], [1, 7], [2, 1], [3, 2], [4, 1], [4, 2], [4, 1]]
    assert earlier_items([np.array([4, 7, 9])], last_only=True).tolist() == [[0, 4], [0, 7]]


@pytest.mark.parametrize("model", ["sasrec", "itemlm"])
def test_excluded_history_leaves_the_softmax(model, tmp_path):
    """The loss with exclude_history equals a cross-entropy computed by hand over the items that
    did not come before each label; without it, over all items."""
    from itemgen.core.config import from_dict
    from itemgen.data.synthetic import make_dataset
    from itemgen.models.registry import build_model

    ds = make_dataset(n_users=20, n_items=15, min_len=4, max_len=6, seed=2)
    cfg = from_dict({"model": model, "data": {"path": "x", "max_history": 6},
                     "itemlm": {"backbone": "tiny", "prompt": "ids", "item_dim": 8, "text_vocab_in_softmax": False},
                     "sasrec": {"hidden": 16, "n_heads": 2}, "loss": {"exclude_history": True}})
    m = build_model(cfg, ds.items).eval()
    seqs = [s for s in ds.split.train if len(s) >= 3][:4]
    m.exclude_history = True
    batch = m.train_batch(seqs, np.random.default_rng(0))
    with torch.no_grad():
        got = m.loss(batch).item()
        scores = m.label_scores(batch)  # (N, I) in label order
        want, n = 0.0, 0
        for s in seqs:
            for j in range(len(s) - 1):
                keep = torch.ones(ds.n_items, dtype=torch.bool)
                keep[torch.as_tensor(s[:j + 1])] = False
                keep[s[j + 1]] = True
                row = scores[n][keep]
                want += float(torch.logsumexp(row, 0) - scores[n][s[j + 1]])
                n += 1
        m.exclude_history = False
        full = m.loss({k: v for k, v in batch.items() if k != "exclude"}).item()
    assert got == pytest.approx(want, rel=1e-4) and full > got


def test_exclude_history_config_is_checked():
    from itemgen.core.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="loss.exclude_history needs loss.kind=full"):
        from_dict({"model": "sasrec", "loss": {"exclude_history": True, "kind": "warp"}})
    with pytest.raises(ConfigError, match="next-item labels"):
        from_dict({"model": "bert4rec", "loss": {"exclude_history": True}})
    with pytest.raises(ConfigError, match="head=full"):
        from_dict({"model": "itemlm", "itemlm": {"head": "two_level"}, "loss": {"exclude_history": True}})
