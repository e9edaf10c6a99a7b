"""Single-step decoders against the brute-force reference: structure (exact, ties included), ANN
(exact when the normalisers are exact, high recall otherwise), and their errors."""

import types

import numpy as np
import pytest
import torch

from itemgen.heads.softmax import FullSoftmaxHead, TwoLevelHead
from itemgen.topk.ann import AnnIndex, AnnIndexError, AnnTopK, estimate_log_normalizers
from itemgen.topk.exact import ExactTopK
from itemgen.topk.factory import make_decoder
from itemgen.topk.structure import StructureTopK


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def two_level_model(n_items, n_clusters, hidden=8, n_text=0, seed=0, item_scale=1.0, duplicates=False,
                    correction=0):
    """``correction`` > 0: level 1 gains a ClusterCorrection of that width, with random weights."""
    g = torch.Generator().manual_seed(seed)
    assign = torch.cat([torch.arange(n_clusters),
                        torch.randint(0, n_clusters, (n_items - n_clusters,), generator=g)])
    assign = assign[torch.randperm(n_items, generator=g)]
    text = torch.randn(n_text, hidden, generator=g)
    head = TwoLevelHead(n_items, hidden, (lambda: text) if n_text else None, assign, correction=correction)
    with torch.no_grad():
        head.item_out.copy_(torch.randn(n_items, hidden, generator=g) * item_scale)
        head.centroids.copy_(torch.randn(n_clusters, hidden, generator=g) * 2)
        if correction:
            for p in head.correction.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        if duplicates:  # exact ties: repeat item vectors inside clusters, and whole clusters
            for c in range(n_clusters):
                m = torch.nonzero(assign == c)[:, 0]
                head.item_out[m[1::2]] = head.item_out[m[0]].clone()
            head.centroids[1::3] = head.centroids[0].clone()
    return model_of(head)


def model_of(head):
    return types.SimpleNamespace(head=head, n_items=head.n_items, name="test",
                                 score_items=head.item_log_probs, item_vectors=head.item_vectors,
                                 ranking_scores=lambda query, histories: head.item_log_probs(query))


def assert_valid_topk(scores, ids, reference, k, atol=1e-4):
    """``(scores, ids)`` is an exact top-k of ``reference`` (B, I): the k best scores, and ids that
    hold those scores (any order among exact ties), distinct per row."""
    want = torch.topk(reference, k, dim=1).values
    assert torch.allclose(scores, want, atol=atol), (scores - want).abs().max()
    assert torch.allclose(reference.gather(1, ids), scores, atol=atol)
    for row in ids:
        assert len(set(row.tolist())) == k


def test_structure_equals_brute_force_on_many_random_cases():
    rng = np.random.default_rng(0)
    opened_fraction = []
    for case in range(80):
        n_items = int(rng.integers(2, 250))
        n_clusters = int(rng.integers(1, min(n_items, 25) + 1))
        model = two_level_model(n_items, n_clusters, n_text=int(rng.integers(0, 12)), seed=case,
                                item_scale=float(rng.uniform(0.1, 3.0)), duplicates=case % 3 == 0,
                                correction=4 if case % 5 in (1, 2) else 0)  # level 1 with g(h) too
        if case % 5 == 2:  # and its M highest clusters refined (exact log Z_c), 1 to C of them
            model.head.refine = int(rng.integers(1, n_clusters + 1))
        h = torch.randn(int(rng.integers(1, 9)), 8, generator=torch.Generator().manual_seed(case)) * 1.5
        k = int(rng.integers(1, n_items + 1)) if case % 4 else min(10, n_items)
        dec = StructureTopK(model, normalized=True)
        scores, ids = dec.topk(h, k)
        ref = model.head.item_log_probs(h)
        assert_valid_topk(scores, ids, ref, k)
        if case % 3:  # no planted ties: the very same ids in the same order as brute force
            assert torch.equal(ids, torch.topk(ref, k, dim=1).indices), case
        assert int(dec.last_opened.max()) <= n_clusters and int(dec.last_opened.min()) >= 1
        opened_fraction.append(dec.stats()["clusters_opened_mean"] / n_clusters)
    assert np.mean(opened_fraction) < 0.9  # it does stop early


def test_structure_opens_few_clusters_when_one_dominates():
    model = two_level_model(400, 20, seed=1)
    h = model.head.centroids[3:4] * 4  # a query that points at cluster 3
    dec = StructureTopK(model, normalized=True)
    scores, ids = dec.topk(h, 5)
    assert_valid_topk(scores, ids, model.head.item_log_probs(h), 5)
    assert dec.stats() == {"clusters": 20, "queries": 1, "clusters_opened_mean": 1.0, "rounds": 1}


def test_structure_opens_more_clusters_a_round_for_a_lone_query():
    """A query that must open most clusters takes about log2 of that many rounds alone; in a large
    batch each query opens one cluster a round (the gather stays under max_slots)."""
    model = two_level_model(600, 30, seed=4, item_scale=0.2)
    h = torch.randn(1, 8, generator=torch.Generator().manual_seed(0)) * 0.1  # flat P(c | h): most clusters open
    dec = StructureTopK(model, normalized=True)
    scores, ids = dec.topk(h, 10)
    assert_valid_topk(scores, ids, model.head.item_log_probs(h), 10)
    opened = int(dec.last_opened[0])
    assert opened >= 16 and dec.stats()["rounds"] <= 6
    one_by_one = StructureTopK(model, normalized=True)
    one_by_one.max_slots = 0  # never widens: one cluster a round
    s1, i1 = one_by_one.topk(h, 10)
    assert torch.equal(i1, ids) and one_by_one.stats()["rounds"] == int(one_by_one.last_opened[0]) <= opened


@pytest.mark.parametrize("refine", [0, 3])
def test_structure_unnormalized_and_exclusions(refine):
    """Both with level 1 as trained and with its 3 highest clusters refined (scored before the
    best-first search, never opened twice: each query opens at most C clusters)."""
    model = two_level_model(120, 10, n_text=6, seed=2, correction=4 if refine else 0)
    model.head.refine = refine
    h = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    ref = model.head.item_log_probs(h)
    s, i = StructureTopK(model).topk(h, 7)  # default: log P + log Z_1, same ranking
    assert torch.equal(i, torch.topk(ref, 7, dim=1).indices)
    level1 = model.head.item_cluster_logits(h)  # (B, C) h . e_c + g_c(h)
    if refine:  # its 3 highest clusters at their exact mass
        level1 = model.head.refined(h, level1, model.head.cluster_log_normalizers(h))
    z1 = torch.logsumexp(torch.cat([h @ model.head._text_weight().T, level1], 1), 1)
    assert torch.allclose(s - z1[:, None], torch.topk(ref, 7, dim=1).values, atol=1e-4)
    exclude = [np.asarray(torch.topk(ref[b], 3).indices) for b in range(4)]
    s, i = StructureTopK(model, normalized=True).topk(h, 7, exclude=exclude)
    masked = ref.clone()
    for b, e in enumerate(exclude):
        masked[b, e] = float("-inf")
    assert torch.equal(i, torch.topk(masked, 7, dim=1).indices)
    dec = StructureTopK(model, normalized=True)
    s, i = dec.topk(h, 120, exclude=exclude)  # every item: every cluster opened once
    assert torch.equal(i[:, :117], torch.topk(masked, 117, dim=1).indices)
    assert (i[:, 117:] == -1).all() and torch.isinf(s[:, 117:]).all()
    assert dec.last_opened.tolist() == [10] * 4


def test_k_larger_than_catalog_and_wrong_heads_are_errors():
    model = two_level_model(30, 5)
    with pytest.raises(ValueError, match="k must be between 1 and the catalog size 30, got 31"):
        StructureTopK(model).topk(torch.randn(1, 8), 31)
    with pytest.raises(ValueError, match="k must be between 1 and the catalog size 30, got 0"):
        ExactTopK(model).topk(torch.randn(1, 8), 0)
    full = FullSoftmaxHead(30, 8, None)
    fmodel = types.SimpleNamespace(head=full, n_items=30, name="itemlm", item_vectors=full.item_vectors)
    with pytest.raises(ValueError, match="needs a two-level head"):
        make_decoder("structure", fmodel)
    with pytest.raises(ValueError, match="decoder 'nope' is not available"):
        make_decoder("nope", fmodel)
    with pytest.raises(ValueError, match="needs an index"):
        make_decoder("ann", fmodel)
    index = AnnIndex.build(fmodel, "flat")
    with pytest.raises(ValueError, match="catalog size 30, got 31"):
        AnnTopK(fmodel, index=index).topk(torch.randn(1, 8), 31)


def test_ann_full_softmax_flat_is_exact_mips():
    full = FullSoftmaxHead(300, 16, None)
    with torch.no_grad():
        full.item_out.normal_()
    model = types.SimpleNamespace(head=full, n_items=300, name="itemlm", item_vectors=full.item_vectors)
    h = torch.randn(5, 16)
    s, i = AnnTopK(model, index=AnnIndex.build(model, "flat")).topk(h, 10)
    ref = h @ full.item_out.detach().T
    assert torch.equal(i, torch.topk(ref, 10, dim=1).indices)
    assert torch.allclose(s, torch.topk(ref, 10, dim=1).values, atol=1e-4)
    ivf = AnnIndex.build(model, "ivf", nlist=10, nprobe=10)  # k-means lists; probing all = exact
    assert ivf.params["nlist"] == 10 and "lists" not in ivf.params
    assert torch.equal(AnnTopK(model, index=ivf).topk(h, 10)[1], torch.topk(ref, 10, dim=1).indices)


def test_ann_two_level_is_exact_when_log_normalizers_are_exact():
    """With b_c = log Z_c(h) of the query itself, the folded score is log P(t|h) + log Z_1(h)."""
    model = two_level_model(200, 14, n_text=5, seed=5)
    h = torch.randn(1, 8)
    log_zc = model.head.cluster_log_normalizers(h)[0].double().numpy()
    index = AnnIndex.build(model, "flat", log_norm=log_zc)
    s, i = AnnTopK(model, index=index).topk(h, 10)
    ref = model.head.item_log_probs(h)
    assert torch.equal(i, torch.topk(ref, 10, dim=1).indices)
    z1 = torch.logsumexp(torch.cat([h @ model.head._text_weight().T, h @ model.head.centroids.T], 1), 1)
    assert torch.allclose(s - z1, torch.topk(ref, 10, dim=1).values, atol=1e-4)


def test_log_normalizer_estimate_averages_true_values_where_clusters_compete():
    model = two_level_model(80, 6, seed=6)
    head = model.head
    states = torch.randn(50, 8)
    b = estimate_log_normalizers(head, states, top_m=2, batch_size=16)
    true = head.cluster_log_normalizers(states).double()  # (n, C)
    top = torch.topk(states @ head.centroids.T, 2, dim=1).indices  # (n, 2)
    for c in range(6):
        rows = (top == c).any(1)
        if rows.any():
            assert b[c] == pytest.approx(float(true[rows, c].mean()), abs=1e-5)
    one = estimate_log_normalizers(head, states[:1].expand(7, -1), top_m=2)
    picked = top[0].tolist()
    fallback = float(true[0, picked].mean())
    for c in range(6):
        assert one[c] == pytest.approx(float(true[0, c]) if c in picked else fallback, abs=1e-5)


def test_log_normalizer_estimate_with_level1_correction():
    """With g(h) in level 1, log P(t) = h . (e_c + e_t) + g_c(h) - log Z_c(h) - log Z_1(h): b_c is
    the mean of log Z_c - g_c where c competes (ranked by level 1's logits, g included), and the
    flat index then ranks exactly when that gap is the same for every state."""
    model = two_level_model(80, 6, seed=6, correction=5)
    head = model.head
    states = torch.randn(50, 8)
    b = estimate_log_normalizers(head, states, top_m=2, batch_size=16)
    gap = head.cluster_log_normalizers(states).double() - head.correction(states).double()  # (n, C)
    top = torch.topk(head.item_cluster_logits(states), 2, dim=1).indices
    assert not torch.equal(top, torch.topk(states @ head.centroids.T, 2, dim=1).indices)  # g moves the ranking
    for c in range(6):
        rows = (top == c).any(1)
        if rows.any():
            assert b[c] == pytest.approx(float(gap[rows, c].mean()), abs=1e-5)
    one = states[:1]
    b1 = estimate_log_normalizers(head, one, top_m=6)  # every cluster competes: b_c = the one state's gap
    index = AnnIndex.build(model, "flat", log_norm=b1)
    _, ids = index.search(model, one, 10)
    assert torch.equal(ids, torch.topk(head.item_log_probs(one), 10, dim=1).indices)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_ann_index_types_recall_and_round_trip(kind, tmp_path):
    """Clustered catalog, queries near their target: every index type finds the exact top-10."""
    g = torch.Generator().manual_seed(0)
    n_items, n_clusters, hidden = 2000, 40, 16
    assign = torch.arange(n_items) % n_clusters
    head = TwoLevelHead(n_items, hidden, None, assign)
    mu = torch.randn(n_clusters, hidden, generator=g) * 2
    with torch.no_grad():
        head.centroids.copy_(mu)
        head.item_out.copy_(torch.randn(n_items, hidden, generator=g))
    model = model_of(head)
    targets = torch.randint(0, n_items, (64,), generator=g)
    h = head.item_vectors().detach()[targets] + 0.3 * torch.randn(64, hidden, generator=g)
    train_states = head.item_vectors().detach()[torch.randint(0, n_items, (500,), generator=g)]
    index = AnnIndex.build(model, kind, train_states, nprobe=8)
    if kind == "ivf":  # two-level: the model's clusters are the lists
        assert index.params["nlist"] == n_clusters and index.params["lists"] == "model clusters"
    _, ids = AnnTopK(model, index=index).topk(h, 10)
    _, ref = torch.topk(head.item_log_probs(h), 10, dim=1)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, ref)])
    assert recall >= 0.9, recall
    index.save(tmp_path)
    loaded = AnnIndex.load(tmp_path, model)
    assert loaded.kind == kind and loaded.params == index.params
    _, ids2 = AnnTopK(model, index=loaded).topk(h, 10)
    assert torch.equal(ids, ids2)
    # another checkpoint's weights: refused, not a wrong answer
    with torch.no_grad():
        head.item_out[0] += 1.0
    with pytest.raises(AnnIndexError, match="built for other weights"):
        AnnIndex.load(tmp_path, model)
    with pytest.raises(AnnIndexError, match="has no ANN index"):
        AnnIndex.load(tmp_path / "elsewhere", model)


def test_ann_exclusions_return_k_valid_items():
    full = FullSoftmaxHead(50, 8, None)
    model = types.SimpleNamespace(head=full, n_items=50, name="itemlm", item_vectors=full.item_vectors)
    h = torch.randn(2, 8)
    dec = AnnTopK(model, index=AnnIndex.build(model, "flat"))
    _, top = dec.topk(h, 5)
    exclude = [top[0, :3].numpy(), np.zeros(0, dtype=np.int64)]
    s, i = dec.topk(h, 5, exclude=exclude)
    assert not set(i[0].tolist()) & set(exclude[0].tolist()) and torch.isfinite(s).all()
    assert torch.equal(i[1], top[1])
    assert torch.equal(i[0, :2], top[0, 3:5])


def test_mask_items_is_one_put_for_the_batch_not_in_place():
    """mask_items (the history mask of exact top-k and evaluation) sets each row's own items to
    -inf, whatever the rows hold (none, repeats, a list), and leaves the scores it was given alone."""
    from itemgen.topk.exact import mask_items

    scores = torch.randn(4, 12)
    before = scores.clone()
    exclude = [np.array([3, 3, 7]), np.array([], dtype=np.int64), [0, 11], np.array([5])]
    got = mask_items(scores, exclude)
    want = before.clone()
    for b, ex in enumerate(exclude):
        for i in ex:
            want[b, i] = float("-inf")
    assert torch.equal(got, want) and torch.equal(scores, before)
    assert mask_items(scores, [np.array([], dtype=np.int64)] * 4) is scores
    assert mask_items(scores, None) is scores
    one = scores[2:3].clone()  # a single row: its own path (a fill of its columns)
    assert torch.equal(mask_items(one, [[0, 11, 0]]), want[2:3]) and torch.equal(one, before[2:3])
    assert mask_items(one, [np.array([], dtype=np.int64)]) is one


@pytest.mark.parametrize("n_text", [0, 5])
def test_item_log_probs_are_the_logits_less_their_log_normaliser(n_text):
    """FullSoftmaxHead.item_log_probs (one log-softmax) = item logits - logsumexp over V u I."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(n_text, 6, generator=g)
    head = FullSoftmaxHead(9, 6, (lambda: text) if n_text else None)
    h = torch.randn(3, 6, generator=g)
    logits = head.logits(h)
    want = logits[:, n_text:] - torch.logsumexp(logits, dim=1, keepdim=True)
    torch.testing.assert_close(head.item_log_probs(h), want, atol=1e-6, rtol=1e-6)
