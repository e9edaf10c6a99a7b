"""Title baseline: the prefix trie, the beam search it constrains (against brute force), and a
tiny title model that learns a known rule and only ever recommends real catalog items."""

import numpy as np
import pytest
import torch

from itemgen.api import Predictor
from itemgen.core.config import from_dict
from itemgen.data.dataset import DataError, ItemTable
from itemgen.data.synthetic import make_dataset
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.trie import Trie, beam_search
from itemgen.training.loop import train

RULE = dict(n_users=300, n_items=12, min_len=3, max_len=6, noise=0.0, seed=1)  # the last item decides the next


# ---- trie ----------------------------------------------------------------------------------
def test_trie_lookup_allowed_and_duplicates():
    t = Trie([[1, 2, 9], [1, 3, 9], [4, 9], [1, 2, 9]])
    assert sorted(t.allowed([])) == [1, 4] and sorted(t.allowed([1])) == [2, 3]
    assert t.allowed([1, 2, 9]) == [] and t.allowed([7]) == []
    assert t.lookup([1, 2, 9]) == [0, 3]  # identical sequences share a leaf, index order
    assert t.lookup([1, 2]) == [] and t.depth == 3


def test_trie_rejects_prefix_sequences():
    with pytest.raises(ValueError, match="prefix"):
        Trie([[1, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match="prefix"):
        Trie([[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match="empty"):
        Trie([[1], []])


# ---- beam search against brute force, with a fake LM ----------------------------------------
T = 6  # output tokens; 5 is the end token


def markov_lm(seed: int):
    """Next-token log-probs depend on the last token only: a (T + 1, T) table (row T = start)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(torch.randn(T + 1, T, generator=g) * 2, dim=1)
    return table


def run(table, trie, B, k, num_beams=None, exclude=None, record=None):
    last = {"tok": torch.full((B,), T)}
    prefixes = {"p": [[] for _ in range(B)]}

    def step(parents, tokens):
        if record is not None:
            p = [prefixes["p"][int(r)] + [int(t)] for r, t in zip(parents, tokens)]
            prefixes["p"] = p
            record.extend(p)
        last["tok"] = tokens
        return table[tokens]

    return beam_search(table[last["tok"]], step, trie, k, num_beams, exclude)


def catalog(seed=0, n=30):
    rng = np.random.default_rng(seed)
    seqs = set()
    while len(seqs) < n:
        seqs.add(tuple(rng.integers(0, 5, rng.integers(1, 4)).tolist()) + (5,))
    return [list(s) for s in sorted(seqs)]


def brute_force(table, seqs, k, exclude=()):
    def lp(seq):
        prev, s = T, 0.0
        for t in seq:
            s += float(table[prev, t])
            prev = t
        return s
    scored = sorted(((lp(s), i) for i, s in enumerate(seqs) if i not in exclude), key=lambda x: (-x[0], x[1]))
    return scored[:k]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_brute_force(seed):
    table, seqs = markov_lm(seed), catalog(seed)
    trie = Trie(seqs)
    scores, ids = run(table, trie, B=2, k=5, num_beams=len(trie))
    want = brute_force(table, seqs, 5)
    for b in range(2):  # both queries are identical here
        assert ids[b].tolist() == [i for _, i in want]
        assert torch.allclose(scores[b].double(), torch.tensor([s for s, _ in want], dtype=torch.float64), atol=1e-5)


def test_beam_returns_k_distinct_real_items_and_respects_exclusion():
    table, seqs = markov_lm(3), catalog(3)
    trie = Trie(seqs)
    scores, ids = run(table, trie, B=3, k=8, num_beams=8, exclude=[np.array([]), np.array([0, 1, 2]), np.array([5])])
    for b, ex in enumerate([set(), {0, 1, 2}, {5}]):
        row = ids[b].tolist()
        assert len(set(row)) == 8 and all(0 <= i < len(seqs) for i in row) and not set(row) & ex
        assert all(s1 >= s2 for s1, s2 in zip(scores[b], scores[b][1:]))
    # a catalog smaller than k pads with -1 / -inf
    s, i = run(table, Trie(seqs[:3]), B=1, k=5)
    assert sorted(i[0, :3].tolist()) == [0, 1, 2] and i[0, 3:].tolist() == [-1, -1]
    assert torch.isinf(s[0, 3:]).all()


def test_constrained_decoding_never_emits_an_invalid_prefix():
    """The fake LM prefers tokens the trie does not allow; every fed prefix must still be valid."""
    seqs = [[0, 1, 5], [0, 2, 5], [3, 5], [0, 1, 1, 5]]
    trie = Trie(seqs)
    table = torch.full((T + 1, T), -1.0)
    table[:, 4] = 0.0  # token 4 is nowhere in the catalog and always the model's favourite
    record: list[list[int]] = []
    _, ids = run(table, trie, B=2, k=4, num_beams=4, record=record)
    assert record and all(trie.walk(p) is not None for p in record)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]


def test_beam_search_bad_k():
    with pytest.raises(ValueError, match="num_beams >= k"):
        run(markov_lm(0), Trie(catalog(0)), B=1, k=0)
    with pytest.raises(ValueError, match="num_beams >= k"):
        run(markov_lm(0), Trie(catalog(0)), B=1, k=5, num_beams=3)


# ---- a tiny title model ---------------------------------------------------------------------
def title_config(out, prompt="compact", **kw):
    t = {"out": str(out), "eval_every": 120, "eval_users": 20, "warmup_steps": 10, "progress": False,
         "patience": 100, "lr": 1e-2, "batch_size": 32, "max_steps": 120, **kw}
    return from_dict({"model": "title", "title": {"backbone": "tiny", "prompt": prompt, "max_title_tokens": 24,
                                                  "max_field_tokens": 2},
                      "data": {"path": "synthetic-inline", "max_history": 1}, "train": t})


@pytest.fixture(scope="module")
def rule_data():
    return make_dataset(**RULE)


@pytest.fixture(scope="module")
def trained(rule_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("title")
    return train(title_config(out), dataset=rule_data)


def test_title_model_learns_the_rule_with_real_distinct_items(trained, rule_data):
    model, cfg, _ = load_checkpoint(trained.best)
    test = rule_data.split.test[:100]
    hist = [e.history[-cfg.data.max_history:] for e in test]
    scores, ids = model.beam_topk(model.query_batch(hist), k=5)
    for row in ids.tolist():
        assert len(set(row)) == 5 and all(0 <= i < rule_data.n_items for i in row)
    top1 = (ids[:, 0].numpy() == np.array([e.target for e in test])).mean()
    assert top1 >= 0.9, top1
    # every generated title is a real one: beam output == the label tokens of a catalog item
    titles = rule_data.items.fields["title"]
    assert model.trie.lookup(model.label_tokens[int(ids[0, 0])]) == [int(ids[0, 0])]
    assert len(set(titles)) == len(titles)


def test_title_model_evaluation_and_serving_choose_beam(trained, rule_data):
    model, _, _ = load_checkpoint(trained.best)
    with pytest.raises(NotImplementedError, match="decode='beam'"):
        model.scores([rule_data.split.test[0].history])
    from itemgen.evaluation.evaluate import evaluate

    m = evaluate(model, rule_data.split.test[:60], max_history=1)
    assert m["mrr_cutoff"] == min(20, rule_data.n_items) and m["recall@1"] >= 0.9
    pred = Predictor.load(trained.best)
    ex = rule_data.split.test[0]
    recs = pred.recommend([[rule_data.items.ids[i] for i in ex.history]], k=3, exclude_history=True)[0]
    assert len(recs) == 3 and recs[0]["id"] == rule_data.items.ids[ex.target]
    assert recs[0]["title"] == rule_data.items.fields["title"][ex.target]


def test_checkpoint_keeps_item_text_and_decodes_identically(trained, rule_data):
    a, _, _ = load_checkpoint(trained.best)
    b, _, _ = load_checkpoint(trained.best)
    hist = [e.history[-4:] for e in rule_data.split.test[:8]]
    sa, ia = a.beam_topk(a.query_batch(hist), k=4)
    sb, ib = b.beam_topk(b.query_batch(hist), k=4)
    assert torch.equal(ia, ib) and torch.equal(sa, sb)
    assert a.item_tokens == b.item_tokens  # brand/category text came back from the checkpoint


def test_dataset_without_titles_is_refused(tmp_path):
    from itemgen.models.registry import build_model

    cfg = title_config(tmp_path)
    with pytest.raises(DataError, match="needs item titles"):
        build_model(cfg, ItemTable([f"I{i}" for i in range(5)]))


def test_beam_decoder_refuses_single_token_models():
    from itemgen.models.registry import build_model
    from itemgen.topk.factory import make_decoder

    cfg = from_dict({"model": "sasrec"})
    with pytest.raises(ValueError, match="generates items token by token"):
        make_decoder("beam", build_model(cfg, ItemTable(["a", "b"])))


# ---- the ids prompt: ItemLM's recipe template, one learned token per history item ---------------
def test_ids_prompt_writes_one_slot_per_history_item_and_learns_the_rule(rule_data, tmp_path):
    res = train(title_config(tmp_path, prompt="ids"), dataset=rule_data)
    model, _, _ = load_checkpoint(res.best)
    hist = np.array([3, 7, 1])
    enc = model.encode_prompt(hist)
    assert len(enc) == len(model.prefix) + 3  # as ItemLM's ids prompt: "History:" then the items
    assert enc.items[-3:].tolist() == [3, 7, 1] and (enc.items[:-3] == -1).all()
    assert model.item_in.weight.shape == (rule_data.n_items, model.backbone.config.hidden_size)
    test = rule_data.split.test[:100]
    _, ids = model.beam_topk(model.query_batch([e.history[-1:] for e in test]), k=5)
    top1 = (ids[:, 0].numpy() == np.array([e.target for e in test])).mean()
    assert top1 >= 0.9, top1  # the item vectors are trained and reloaded with the checkpoint
