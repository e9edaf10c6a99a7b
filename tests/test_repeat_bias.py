"""The repeat bias (models/repeat_bias.py, config ``repeat``): a learned bias on the scores of the
user's history items, in the training softmax and in every path that ranks the catalog."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itemgen.core.config import ConfigError, from_dict
from itemgen.data.dataset import history_pairs
from itemgen.data.synthetic import make_dataset
from itemgen.models.registry import build_model
from itemgen.models.repeat_bias import RepeatBias


def tiny_cfg(model: str, bias: str = "recency", **extra):
    return from_dict({"model": model, "data": {"path": "x", "max_history": 8},
                      "itemlm": {"backbone": "tiny", "prompt": "ids", "item_dim": 8, "text_vocab_in_softmax": False},
                      "sasrec": {"hidden": 16, "n_heads": 2, "dropout": 0.0}, "repeat": {"bias": bias}, **extra})


def test_history_pairs_list_each_distinct_earlier_item_at_its_latest_position():
    pairs = history_pairs([np.array([5, 7, 5, 9]), np.array([3, 4])])
    # labels 0..2 of the first sequence, label 3 of the second; (label, item, items back)
    assert pairs.tolist() == [[0, 5, 0],
                              [1, 5, 1], [1, 7, 0],
                              [2, 7, 1], [2, 5, 0],  # 5 again: its latest position only, 0 back
                              [3, 3, 0]]
    # the label's own item is listed when the user had it before: label 1 of [5, 7, 5] is 5 again
    assert [1, 5, 1] in history_pairs([np.array([5, 7, 5])]).tolist()
    assert history_pairs([np.array([5, 7, 5, 9])], last_only=True).tolist() == [[0, 7, 1], [0, 5, 0]]


def test_recency_buckets():
    rb = RepeatBias("recency", max_history=50)
    with torch.no_grad():
        rb.raw.copy_(torch.arange(len(rb.raw), dtype=torch.float))  # bucket b -> 10 * b
    back = torch.arange(50)
    want = torch.tensor([0 if r == 0 else math.floor(math.log2(r)) + 1 for r in range(50)], dtype=torch.float) * 10
    assert len(rb.raw) == 7 and torch.equal(rb.bias(back), want)
    assert torch.equal(RepeatBias("scalar", 50).bias(back), torch.zeros(50))


@pytest.mark.parametrize("model", ["sasrec", "itemlm"])
def test_a_forced_negative_bias_ranks_history_items_below_where_they_were(model):
    ds = make_dataset(n_users=30, n_items=20, min_len=4, max_len=6, seed=1)
    m = build_model(tiny_cfg(model), ds.items).eval()
    hist = [np.array([3, 8, 3, 11]), np.array([0])]
    base = m.score_items(m.encode(m.query_batch(hist)))  # (2, I) without the bias
    with torch.no_grad():
        m.repeat.raw.fill_(-0.5)  # -5 everywhere
        m.repeat.raw[0] = -1.0  # the last item: -10
    got = m.scores(hist)
    want = base.clone()
    want[0, 11] -= 10.0  # the last item, 0 back: bucket 0
    want[0, 3] -= 5.0  # 3's latest is 1 back (bucket 1): its earlier occurrence does not count again
    want[0, 8] -= 5.0  # 2 back: bucket 2
    want[1, 0] -= 10.0
    assert torch.allclose(got, want, atol=1e-5)
    for b, h in enumerate(hist):
        rank_before = (base[b] > base[b, h[-1]]).sum()
        rank_after = (got[b] > got[b, h[-1]]).sum()
        assert rank_after > rank_before or rank_before == m.n_items - 1


@pytest.mark.parametrize("model", ["sasrec", "itemlm"])
def test_the_training_softmax_adds_the_bias_at_each_labels_earlier_items(model):
    """The loss with the bias equals a cross-entropy by hand: scores without the bias, plus the
    bias of each earlier item by how far back it was (repeats included)."""
    ds = make_dataset(n_users=20, n_items=15, min_len=4, max_len=6, seed=2)
    m = build_model(tiny_cfg(model), ds.items).eval()
    seqs = [np.array([1, 2, 1, 3, 4]), np.array([5, 6, 7])]
    batch = m.train_batch(seqs, np.random.default_rng(0))
    with torch.no_grad():
        plain = m.label_scores(batch)  # raw is 0: no bias yet
        m.repeat.raw.copy_(torch.linspace(-0.3, 0.2, len(m.repeat.raw)))
        vals = m.repeat.values()
        got = m.loss(batch).item()
        want, n = 0.0, 0
        for s in seqs:
            for j in range(len(s) - 1):
                row = plain[n].clone()
                for p in range(j + 1):
                    if s[p] not in s[p + 1:j + 1]:  # its latest occurrence
                        back = j - p
                        row[s[p]] += vals[0 if back == 0 else math.floor(math.log2(back)) + 1]
                want += float(torch.logsumexp(row, 0) - row[s[j + 1]])
                n += 1
    assert got == pytest.approx(want, rel=1e-4)


def _sequences(rng, n_items: int, repeat: bool, n: int = 64, length: int = 8):
    out = []
    for _ in range(n):
        s = [int(rng.integers(n_items))]
        while len(s) < length:
            if repeat and rng.random() < 0.9:  # mostly an item the user already had
                s.append(int(rng.choice(s)))
            else:  # an item the user never had
                s.append(int(rng.choice([i for i in range(n_items) if i not in s])))
        out.append(np.array(s))
    return out


def two_level_cfg(tmp_path, n_items: int, bias: str = "recency", n_clusters: int = 4):
    """A tiny two-level ItemLM's config with a random cluster file of n_items items."""
    from itemgen.heads.clusters import Clusters, random_clusters

    path = Clusters(random_clusters(n_items, n_clusters, seed=0), "random").save(tmp_path / "clusters.json")
    return tiny_cfg("itemlm", bias, itemlm={"backbone": "tiny", "prompt": "ids", "item_dim": 8,
                                            "text_vocab_in_softmax": False, "head": "two_level",
                                            "clusters": str(path)})


@pytest.mark.parametrize("model", ["sasrec", "itemlm", "itemlm-two-level"])
@pytest.mark.parametrize("repeat", [False, True])
def test_training_learns_the_sign_of_the_data(model, repeat, tmp_path):
    """No user repeats: the bias goes negative; users mostly repeat: positive."""
    ds = make_dataset(n_users=30, n_items=20, min_len=4, max_len=6, seed=3)
    torch.manual_seed(0)
    cfg = two_level_cfg(tmp_path, 20, "scalar") if model == "itemlm-two-level" else tiny_cfg(model, bias="scalar")
    m = build_model(cfg, ds.items).train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)  # the bias moves about 10 x lr per step
    rng = np.random.default_rng(0)
    for _ in range(15):
        batch = m.train_batch(_sequences(rng, 20, repeat, n=8), rng)
        opt.zero_grad()
        m.loss(batch).backward()
        opt.step()
    b = float(m.repeat.values()[0].detach())
    assert (b > 1.0) if repeat else (b < -1.0), b


def _trained_pair(tmp_path):
    """A tiny SASRec with a nonzero repeat bias, saved and reloaded, and its data."""
    from itemgen.models.checkpoint import load_checkpoint, save_checkpoint

    ds = make_dataset(n_users=40, n_items=25, min_len=4, max_len=7, seed=4)
    cfg = tiny_cfg("sasrec")
    m = build_model(cfg, ds.items).eval()
    with torch.no_grad():
        m.repeat.raw.copy_(torch.linspace(-0.2, 0.3, len(m.repeat.raw)))  # both signs
    save_checkpoint(tmp_path / "ck", m, cfg, ds.items)
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.repeat.values(), m.repeat.values())
    return loaded, ds


def test_exact_decoder_and_evaluation_rank_alike_with_the_history_kept(tmp_path):
    from itemgen.evaluation.evaluate import rank_and_top
    from itemgen.topk.exact import ExactTopK

    m, ds = _trained_pair(tmp_path)
    examples = ds.split.test
    ranks, top = rank_and_top(m, examples, max_history=8, k=10)
    # evaluation's one batch (under 128 users), in its order: the same forward pass
    order = sorted(range(len(examples)), key=lambda i: min(len(examples[i].history), 8))
    hist = [examples[i].history[-8:] for i in order]
    query = m.encode(m.query_batch(hist))
    _, ids = ExactTopK(m).topk(query, 10, histories=hist)
    assert np.array_equal(ids.numpy(), top[order])
    assert not torch.equal(m.score_items(query).topk(10).indices, ids)  # the bias moved something


def test_ann_decoder_applies_the_bias_as_exact_does(tmp_path):
    pytest.importorskip("faiss")
    from itemgen.topk.ann import AnnIndex, AnnTopK
    from itemgen.topk.exact import ExactTopK

    m, ds = _trained_pair(tmp_path)
    hist = [e.history[-8:] for e in ds.split.test]
    query = m.encode(m.query_batch(hist))
    ann = AnnTopK(m, index=AnnIndex.build(m, "flat"))
    for exclude in (None, hist):
        want_s, want = ExactTopK(m).topk(query, 10, exclude=exclude, histories=hist)
        got_s, got = ann.topk(query, 10, exclude=exclude, histories=hist)
        assert np.array_equal(got.numpy(), want.numpy()), exclude is None


def test_checkpoints_without_the_bias_still_load(tmp_path):
    from itemgen.models.checkpoint import load_checkpoint, save_checkpoint

    ds = make_dataset(n_users=20, n_items=15, min_len=4, max_len=6, seed=2)
    cfg = from_dict({"model": "sasrec", "data": {"path": "x", "max_history": 8}, "sasrec": {"hidden": 16}})
    m = build_model(cfg, ds.items).eval()
    save_checkpoint(tmp_path / "old", m, cfg, ds.items)
    # a checkpoint from before the key existed: its config has no `repeat` section
    import json

    path = tmp_path / "old" / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("repeat")
    path.write_text(json.dumps(raw))
    loaded, cfg2, _ = load_checkpoint(tmp_path / "old")
    assert loaded.repeat is None and cfg2.repeat.bias == "none"
    h = [np.array([1, 2, 3])]
    assert torch.equal(loaded.scores(h), m.scores(h))


def test_repeat_config_is_checked():
    with pytest.raises(ConfigError, match="repeat.bias: none|scalar|recency"):
        from_dict({"model": "sasrec", "repeat": {"bias": "yes"}})
    with pytest.raises(ConfigError, match="repeat.bias needs loss.kind=full"):
        from_dict({"model": "sasrec", "repeat": {"bias": "scalar"}, "loss": {"kind": "warp"}})
    with pytest.raises(ConfigError, match="next-item labels"):
        from_dict({"model": "bert4rec", "repeat": {"bias": "scalar"}})
    # a two-level head carries it in its level-2 softmax (tests/test_two_level.py)
    assert from_dict({"model": "itemlm", "itemlm": {"head": "two_level"}, "repeat": {"bias": "scalar"}}).repeat.bias == "scalar"


def test_itemlm_started_from_a_sasrec_starts_from_its_repeat_bias(tmp_path):
    from itemgen.training.item_init import init_items

    sas, ds = _trained_pair(tmp_path)
    cfg = tiny_cfg("itemlm", items={"init": "sasrec", "init_from": str(tmp_path / "ck")},
                   itemlm={"backbone": "tiny", "prompt": "ids", "item_dim": 16, "text_vocab_in_softmax": False})
    m = build_model(cfg, ds.items)
    init_items(m, cfg, ds)
    assert torch.equal(m.repeat.values(), sas.repeat.values())
    other = build_model(tiny_cfg("itemlm", bias="scalar", items={"init": "sasrec", "init_from": str(tmp_path / "ck")},
                                 itemlm={"backbone": "tiny", "prompt": "ids", "item_dim": 16,
                                         "text_vocab_in_softmax": False}), ds.items)
    init_items(other, cfg, ds)  # another shape: stays at zero, learned from scratch
    assert torch.equal(other.repeat.values(), torch.zeros(1))


def test_two_level_itemlm_carries_the_bias_in_its_level2_softmax(tmp_path):
    """A two-level head's bias enters the softmax over the item's cluster: scores stay
    log-probabilities (they sum to 1), members of a cluster keep their logit differences plus the
    bias, clusters without a history item are untouched; training's loss is -log of the same
    probabilities, and Structure's top-k (exact by construction) equals the exact one."""
    from itemgen.topk.exact import ExactTopK
    from itemgen.topk.structure import StructureTopK

    ds = make_dataset(n_users=20, n_items=24, min_len=4, max_len=6, seed=5)
    m = build_model(two_level_cfg(tmp_path, 24), ds.items).eval()
    with torch.no_grad():
        m.repeat.raw.copy_(torch.linspace(-0.8, 0.4, len(m.repeat.raw)))  # -8 .. +4: both signs
    hist = [np.array([3, 8, 3, 11, 20]), np.array([0]), np.array([5, 6, 7, 8, 9, 10, 23])]
    with torch.no_grad():
        base = m.score_items(m.encode_histories(hist))  # (B, I) log P without the bias
        got = m.scores(hist)
        assert torch.allclose(got.exp().sum(1), torch.ones(3), atol=1e-5)
        assign = m.head.assign
        for b, h in enumerate(hist):
            bias = torch.zeros(24)
            pairs = m.repeat.pairs([h])
            bias[pairs[:, 1]] = m.repeat.bias(pairs[:, 2])
            for c in range(m.head.n_clusters):
                mem = torch.nonzero(assign == c)[:, 0]
                want = base[b, mem] + bias[mem]
                assert torch.allclose(got[b, mem] - got[b, mem[0]], want - want[0], atol=1e-5)
                if not torch.isin(mem, torch.as_tensor(h)).any():
                    assert torch.equal(got[b, mem], base[b, mem])
        q = m.encode_histories(hist)
        for kk in (1, 5, 24):
            ref = ExactTopK(m).topk(q, kk, histories=hist)
            s, i = StructureTopK(m, normalized=True).topk(q, kk, histories=hist)
            assert torch.equal(i, ref[1]) and torch.allclose(s, ref[0], atol=1e-5), kk
        # without the histories (served masked, or unknown) both decode the unbiased model
        assert torch.equal(StructureTopK(m).topk(q, 5)[1], torch.topk(base, 5, dim=1).indices)
        # the training loss is -log of the biased probabilities at each label
        seqs = [np.array([1, 2, 1, 3, 4]), np.array([5, 6, 7])]
        batch = m.train_batch(seqs, np.random.default_rng(0))
        lp = m.label_scores(batch)  # (N, I)
        labels = batch["labels"][batch["labels"] >= 0]
        assert m.loss(batch).item() == pytest.approx(-float(lp[torch.arange(len(labels)), labels].sum()), rel=1e-5)


def test_two_level_ann_scores_history_items_with_their_bias(tmp_path):
    """A flat two-level index: each history item's score is the index's own score plus its bias,
    so a strongly negative bias keeps every history item out of the top-k."""
    from itemgen.topk.ann import AnnIndex, AnnTopK

    ds = make_dataset(n_users=20, n_items=24, min_len=4, max_len=6, seed=5)
    m = build_model(two_level_cfg(tmp_path, 24), ds.items).eval()
    hist = [np.array([3, 8, 11, 20]), np.array([0, 1])]
    with torch.no_grad():
        q = m.encode_histories(hist)
        index = AnnIndex.build(m, "flat", log_norm=np.linspace(-1, 1, m.head.n_clusters))
        plain = AnnTopK(m, index=index).topk(q, 24)  # no histories: index scores of every item
        m.repeat.raw.fill_(0.5)  # +5 on every history item
        s, i = AnnTopK(m, index=index).topk(q, 24, histories=hist)
        for b, h in enumerate(hist):
            before = dict(zip(plain[1][b].tolist(), plain[0][b].tolist()))
            after = dict(zip(i[b].tolist(), s[b].tolist()))
            for t in range(24):
                assert after[t] == pytest.approx(before[t] + (5.0 if t in h else 0.0), abs=1e-4)
        m.repeat.raw.fill_(-3.0)  # -30
        s, i = AnnTopK(m, index=index).topk(q, 10, histories=hist)
        for b, h in enumerate(hist):
            assert not set(i[b].tolist()) & set(h.tolist())


def test_two_level_rankings_with_the_history_masked_keep_the_bias(tmp_path):
    """With the history masked, a two-level model still ranks by its biased probabilities (the
    bias renormalises the clusters of the history items): Structure, given the histories by
    Recommender.decode_histories, ranks every target exactly where the full-catalog scores do.
    A full-softmax model needs no histories there (its bias moves only masked items)."""
    from itemgen.evaluation.evaluate import decoder_ranks, rank_examples
    from itemgen.topk.structure import StructureTopK

    ds = make_dataset(n_users=40, n_items=24, min_len=4, max_len=8, seed=6)
    m = build_model(two_level_cfg(tmp_path, 24), ds.items).eval()
    with torch.no_grad():
        m.repeat.raw.fill_(-1.0)  # -10: the clusters of the history items are renormalised
    examples = ds.examples("test")
    hist = [e.history for e in examples[:3]]
    assert m.decode_histories(hist, True) is hist and m.decode_histories(hist, False) is hist
    full = build_model(tiny_cfg("itemlm"), ds.items)
    assert full.decode_histories(hist, True) is None and full.decode_histories(hist, False) is hist
    assert build_model(tiny_cfg("itemlm", bias="none"), ds.items).decode_histories(hist, False) is None
    for masked in (False, True):
        exact = rank_examples(m, examples, max_history=8, exclude_history=masked)
        structure = decoder_ranks(m, StructureTopK(m), examples, max_history=8, exclude_history=masked, cutoff=24)
        assert np.array_equal(structure, exact), masked


def test_refined_level1_is_exact_mass_at_its_top_clusters_and_structure_stays_exact(tmp_path):
    """itemlm.cluster_refine=M: level 1's M highest clusters (h . e_c + g_c(h)) take h . e_c + log Z_c(h),
    the repeat bias in Z_c; the others keep g. Checked against a brute-force computation, with M = 0
    equal to the bias applied after (with_item_bias), M = C the softmax of the joint scores
    h . (e_c + e_t) + bias; Structure's top-k (normalized) is the exact one for every M, both signs
    of the bias, and the training loss does not depend on M (inference only)."""
    import dataclasses

    from itemgen.heads.softmax import ClusterCorrection
    from itemgen.topk.exact import ExactTopK
    from itemgen.topk.structure import StructureTopK

    ds = make_dataset(n_users=20, n_items=24, min_len=4, max_len=6, seed=5)
    cfg = two_level_cfg(tmp_path, 24)
    cfg = dataclasses.replace(cfg, itemlm=dataclasses.replace(cfg.itemlm, cluster_correction=6))
    m = build_model(cfg, ds.items).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        m.repeat.raw.copy_(torch.linspace(-0.8, 0.4, len(m.repeat.raw)))  # -8 .. +4: both signs
        for p in m.head.correction.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))  # a g far from log Z_c: refining changes ranks
    assert isinstance(m.head.correction, ClusterCorrection)
    hist = [np.array([3, 8, 3, 11, 20]), np.array([0]), np.array([5, 6, 7, 8, 9, 10, 23])]
    head, C = m.head, m.head.n_clusters
    seqs = [np.array([1, 2, 1, 3, 4]), np.array([5, 6, 7])]
    batch = m.train_batch(seqs, np.random.default_rng(0))
    with torch.no_grad():
        q = m.encode_histories(hist)
        bias = torch.zeros(3, 24)
        for b, h in enumerate(hist):
            pairs = m.repeat.pairs([h])
            bias[b, pairs[:, 1]] = m.repeat.bias(pairs[:, 2])
        il = q @ head.item_out.T + bias  # (B, I) level-2 logits with the bias
        lz = torch.stack([torch.logsumexp(il[:, head.assign == c], 1) for c in range(C)], 1)  # (B, C)
        level1 = q @ head.centroids.T + head.correction(q)
        head.refine = 0
        assert torch.allclose(m.ranking_scores(q, hist), head.with_item_bias(head.item_log_probs(q), m.history_triples(hist)),
                              atol=1e-5)
        loss0, unrefined = m.loss(batch).item(), m.ranking_scores(q, hist)
        for M in range(C + 1):
            head.refine = M
            l1 = level1.clone()
            for b in range(3):
                top = torch.topk(level1[b], M).indices
                l1[b, top] = (q[b] @ head.centroids.T)[top] + lz[b, top]
            want = torch.log_softmax(l1, 1)[:, head.assign] - lz[:, head.assign] + il
            got = m.ranking_scores(q, hist)
            assert torch.allclose(got, want, atol=1e-5), M
            assert torch.allclose(m.scores(hist), want, atol=1e-5)
            if M == C:  # every cluster exact: the softmax of the joint scores
                assert torch.allclose(got, torch.log_softmax(q @ head.item_vectors().T + bias, 1), atol=1e-5)
            for kk in (1, 5, 24):
                ref = ExactTopK(m).topk(q, kk, histories=hist)
                s, i = StructureTopK(m, normalized=True).topk(q, kk, histories=hist)
                assert torch.equal(i, ref[1]) and torch.allclose(s, ref[0], atol=1e-5), (M, kk)
            assert m.loss(batch).item() == loss0  # the likelihood trains level 1 without it
        # this g is far from log Z_c: refining every cluster reorders the top 10
        assert not torch.equal(torch.topk(got, 10).indices, torch.topk(unrefined, 10).indices)
        head.refine = 2
        with pytest.raises(ValueError, match="item_log_probs"):
            head.with_item_bias(head.item_log_probs(q), m.history_triples(hist))


def test_cluster_refine_config_is_checked():
    with pytest.raises(ConfigError, match="cluster_refine needs"):
        from_dict({"model": "itemlm", "itemlm": {"head": "two_level", "cluster_refine": 2}})
    with pytest.raises(ConfigError, match="cluster_refine must be >= 0"):
        from_dict({"model": "itemlm", "itemlm": {"head": "two_level", "cluster_correction": 8, "cluster_refine": -1}})
    assert from_dict({"model": "itemlm", "itemlm": {"head": "two_level", "cluster_correction": 8,
                                                    "cluster_refine": 3}}).itemlm.cluster_refine == 3
