"""The text-match path (items.text_match, models/text_match.py): score(i) = h . v_i + (M q) . t_i.

Known answer: with M = s * I and the ID part zeroed, a model's scores are s times text-kNN's.
Parity: the training-time query at a label equals encode's, encode_cached's and the session
path's for the same history. MIPS: exact top-k equals the ANN flat index's. A checkpoint round
trip keeps M and the text view; `items add` on a text_match model (even ID-only views) scores a
new item by its text at once. Config errors are one clear message.

The item-side gate (items.text_gate): score = h . v_i + g(b_i) (M q) . t_i + c(b_i), b_i the item's
training-count bucket or "ID closed"; every parity above holds with it; a fresh gate (g = 1, c = 0)
scores exactly as an ungated checkpoint; a new item added to a checkpoint scores as the model
scores a catalog item with the same text and its ID gate closed; and on a known-answer case the
closed bucket's weight learns what the text is worth."""

import json

import numpy as np
import pytest
import torch

from itemgen.api import Predictor
from itemgen.core.config import Config, ConfigError, TextKNNConfig, from_dict
from itemgen.data.dataset import ItemTable, SequenceDataset
from itemgen.data.synthetic import make_dataset
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.new_items import add_items
from itemgen.models.registry import build_model
from itemgen.models.text_knn import TextKNN
from itemgen.models.text_match import TextGate, TextMatch
from itemgen.serving.sessions import Session, session_query
from itemgen.topk.ann import AnnIndex, AnnTopK
from itemgen.topk.exact import ExactTopK
from itemgen.training.item_init import init_items
from itemgen.training.loop import train

N = 3  # items.text_match: the last 3 history items
SCALE = 6.0


@pytest.fixture(scope="module")
def data():
    return make_dataset(n_users=40, n_items=30, min_len=4, max_len=9, seed=5)


def cfg_for(model="itemlm", out="unused", items=None, itemlm=None, **train):
    return from_dict({"model": model, "data": {"path": "x", "max_history": 6},
                      "itemlm": {"backbone": "tiny", "prompt": "compact", "item_dim": 16, "supervise": "all",
                                 "id_only_share": 1.0, "text_vocab_in_softmax": False, **(itemlm or {})},
                      "items": {"text_encoder": "tiny", "text_match": N, "text_match_scale": SCALE, **(items or {})},
                      "sasrec": {"hidden": 16, "n_heads": 2, "dropout": 0.0},
                      "train": {"out": str(out), "max_steps": 1, "eval_every": 1, "eval_users": 10,
                                "progress": False, "batch_size": 16, "warmup_steps": 0, **train}})


def built(data, model="itemlm", **kw):
    cfg = cfg_for(model, **kw)
    torch.manual_seed(0)
    m = build_model(cfg, data.items)
    init_items(m, cfg, data)
    return m.eval(), cfg


def knn_scores(m, hist) -> torch.Tensor:
    """text-kNN (models/text_knn.py) over the model's own text view: the mean cosine with the last N items."""
    knn = TextKNN(m.n_items, TextKNNConfig(last_n=N), dense=m.items.text_view.clone())
    return knn.scores(hist)


def histories(data, n=8):
    return [np.asarray(s[:-1][-6:]) for s in data.split.train[:n]]


GATE = {"text_gate": [3, 6], "id_dropout": 0.3}  # buckets: closed, 1-2, 3-5, 6+ training interactions


@torch.no_grad()
def shake_gate(m) -> None:
    """A non-trivial gate: every bucket a different weight and bias, some items ID-less."""
    g = m.items.gate
    g.log_weight.copy_(torch.tensor([0.05, -0.03, 0.02, -0.01]))  # g = exp(20 a): 2.7, 0.55, 1.5, 0.8
    g.bias.copy_(torch.tensor([0.1, -0.05, 0.08, 0.0]))  # c = 20 b: 2, -1, 1.6, 0
    m.items.id_known[:3] = False


# ---- known answer: M = s I, no ID part -> s * text-kNN --------------------------------------
@pytest.mark.parametrize("model,inp,out", [("itemlm", "id", "untied"), ("itemlm", "text+id", "text+id"),
                                           ("sasrec", "id", "tied")])
def test_with_the_id_part_zeroed_scores_are_scale_times_text_knn(data, model, inp, out):
    m, _ = built(data, model, items={"input": inp, "output": out})
    with torch.no_grad():  # zero every item's ID part on the output side
        if out == "untied":
            m.head.item_out.zero_()
        elif out == "text+id":
            m.items.id_out.zero_(), m.items.out_text.weight.zero_(), m.items.out_text.bias.zero_()
        else:
            m.items.id_emb.weight.zero_()
    hist = histories(data)
    with torch.inference_mode():
        query = m.encode(m.to_device(m.query_batch(hist)))  # (B, H + F + 1)
        dot = query @ m.item_vectors().T  # (B, I)
        scores = m.score_items(query)
    # [h ; M q ; 1] . [v ; t ; prior]: the last column is the closed-item prior (0 here)
    assert query.shape[1] == m.item_vectors().shape[1] == (16 if model == "sasrec" else 64) + m.items.text_view.shape[1] + 1
    want = SCALE * knn_scores(m, hist)
    torch.testing.assert_close(dot, want, atol=1e-4, rtol=1e-4)
    # ItemLM's scores are log-probabilities: the same up to one constant per row
    torch.testing.assert_close(scores - scores.mean(1, keepdim=True), want - want.mean(1, keepdim=True),
                               atol=1e-4, rtol=1e-4)


def test_the_text_part_is_m_q_for_a_learned_m(data):
    """Not only the identity: a trained M maps the history mean before the dot product."""
    m, _ = built(data, "sasrec")
    with torch.no_grad():
        m.items.id_emb.weight.zero_()
        m.items.match.delta.normal_(std=0.1)
    hist = histories(data, 4)
    with torch.inference_mode():
        got = m.scores(hist)
    view = m.items.text_view
    q = torch.stack([view[torch.as_tensor(h[-N:])].mean(0) for h in hist])  # (B, F)
    torch.testing.assert_close(got, q @ m.items.match.matrix().T @ view.T, atol=1e-4, rtol=1e-4)


def test_slot_means_at_every_position_are_the_last_n_slots_before_it():
    view = torch.randn(10, 4)
    tm = TextMatch(4, last_n=2, scale=1.0)
    items = torch.tensor([[-1, 3, -1, 5, 7, -1, 2], [4, -1, -1, -1, -1, -1, -1]])  # (2, 7), -1: text
    at = torch.ones_like(items, dtype=torch.bool)
    got = tm.slot_means(view, items, at).view(2, 7, 4)
    for b in range(2):
        for p in range(7):
            seen = [int(i) for i in items[b, :p + 1] if i >= 0][-2:]
            want = view[seen].mean(0) if seen else torch.zeros(4)
            torch.testing.assert_close(got[b, p], want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tm.history_means(view, [np.array([3, 5, 7]), np.array([], dtype=np.int64)]),
                               torch.stack([view[[5, 7]].mean(0), torch.zeros(4)]))


# ---- parity: every path that makes a query makes the same one --------------------------------
@pytest.mark.parametrize("prompt,gate", [("compact", False), ("ids", False), ("compact", True)])
def test_itemlm_training_query_encode_encode_cached_and_sessions_agree(data, prompt, gate):
    m, _ = built(data, itemlm={"prompt": prompt}, items=GATE if gate else None)
    with torch.no_grad():
        m.items.match.delta.normal_(std=0.05)  # a non-identity M, so each path must apply it
    if gate:
        shake_gate(m)
    seqs = [np.asarray(s[-7:]) for s in data.split.train if len(s) >= 3][:6]  # >= 2 labels each
    hist = [s[:-1] for s in seqs]
    with torch.inference_mode():
        batch = m.train_batch(seqs, np.random.default_rng(0))  # supervise=all: every slot predicts
        sel = batch["labels"] >= 0
        train_q = m.with_text_match(m.hidden(batch)[sel], batch, sel)  # (N, D) the loss's queries
        # each row's last label is its target's: the query for the whole history
        last = torch.cumsum(sel.sum(1), 0) - 1
        enc = m.encode(m.query_batch(hist))
        cached = m.encode_cached(hist, m.prefix_cache())
        # every other label's text part is the query of that prefix of the sequence
        firsts = m.encode(m.query_batch([s[:2] for s in seqs]))
    H = m.backbone.config.hidden_size
    torch.testing.assert_close(train_q[last], enc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached, enc, atol=1e-4, rtol=1e-4)
    first = torch.cumsum(sel.sum(1), 0) - sel.sum(1) + 1  # each row's second label: history s[:2]
    torch.testing.assert_close(train_q[first][:, H:], firsts[:, H:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(enc[:, H:], torch.zeros_like(enc[:, H:]))
    if prompt == "compact":  # sessions need a question after the history
        with torch.inference_mode():
            for h, e in zip(hist[:3], enc[:3]):
                s = Session()
                for n in range(1, len(h) + 1):  # one event at a time, extending the cache
                    got = session_query(m, m.prefix_cache(), s, list(h[:n]), 0, 6)
                torch.testing.assert_close(got[0], e, atol=1e-4, rtol=1e-4)


def test_itemlm_label_scores_and_loss_use_the_text_part(data):
    m, _ = built(data)
    seqs = [np.asarray(s[-7:]) for s in data.split.train[:4]]
    batch = m.train_batch(seqs, np.random.default_rng(0))
    with torch.no_grad():
        m.head.item_out.zero_()  # no ID part: log-probabilities are s * text-kNN's softmax
        ls = m.label_scores(batch)
        loss = m.loss(batch)
    prefixes = [s[:j] for s in seqs for j in range(1, len(s))]  # every label's history, in label order
    want = torch.log_softmax(SCALE * knn_scores(m, prefixes), 1)
    torch.testing.assert_close(ls, want, atol=1e-4, rtol=1e-4)
    labels = torch.as_tensor(np.concatenate([s[1:] for s in seqs]))
    torch.testing.assert_close(loss, -want[torch.arange(len(labels)), labels].sum(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("gate", [False, True])
def test_sasrec_training_query_equals_encode(data, gate):
    m, _ = built(data, "sasrec", items={"input": "text+id", **(GATE if gate else {})})
    if gate:
        shake_gate(m)
    seqs = [np.asarray(s[-7:]) for s in data.split.train[:6]]
    with torch.inference_mode():
        batch = m.train_batch(seqs, np.random.default_rng(0))
        sel = batch["y"] >= 0
        q = m.queries(batch["x"], sel)
        enc = m.encode(m.query_batch([s[:-1] for s in seqs]))
        ls = m.label_scores(batch)
        scores = enc @ m.item_vectors().T
    last = torch.cumsum(sel.sum(1), 0) - 1
    torch.testing.assert_close(q[last], enc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ls[last], scores, atol=1e-4, rtol=1e-4)


# ---- MIPS: one dot product -----------------------------------------------------------------
@pytest.mark.parametrize("model,gate", [("itemlm", False), ("sasrec", False), ("itemlm", True), ("sasrec", True)])
def test_exact_top_k_equals_ann_flat_top_k(data, model, gate):
    pytest.importorskip("faiss")
    m, _ = built(data, model, items=GATE if gate else None)
    with torch.no_grad():
        m.items.match.delta.normal_(std=0.05)
    if gate:
        shake_gate(m)
    hist = histories(data)
    with torch.inference_mode():
        query = m.encode(m.query_batch(hist))
        exact_s, exact_i = ExactTopK(m).topk(query, 10, exclude=hist)
        ann_s, ann_i = AnnTopK(m, index=AnnIndex.build(m, "flat")).topk(query, 10, exclude=hist)
    assert torch.equal(exact_i, ann_i)
    if model == "sasrec":  # ItemLM's exact scores are log-probabilities, the index's dot products
        torch.testing.assert_close(exact_s, ann_s, atol=1e-4, rtol=1e-4)


# ---- the ID gate -----------------------------------------------------------------------------
def test_items_without_an_id_part_are_scored_by_text_alone(data):
    """An untied head keeps a vector per item; with the text-match path an item with no training
    interaction (or dropped by items.id_dropout in a training step) gets none of it."""
    m, _ = built(data, items={"id_dropout": 0.5})
    with torch.no_grad():
        m.head.item_out.normal_()
        m.items.id_known[:5] = False
    F_ = m.items.text_view.shape[1] + 1  # the text, then the closed-item prior's column
    v = m.item_vectors()
    assert torch.equal(v[:5, :-F_], torch.zeros_like(v[:5, :-F_])) and (v[5:, :-F_] != 0).any(1).all()
    assert torch.equal(v[:, -F_:-1], m.items.text_view) and not v[:, -1].any()  # prior 0
    m.train()
    m.items.begin_step()
    gate = m.items.id_gate()
    assert not gate[:5].any() and 0 < int(gate[5:].sum()) < 25  # dropped this step, at about half
    v = m.item_vectors()
    assert torch.equal((v[:, :-F_] != 0).any(1), gate)


# ---- checkpoints and new items ---------------------------------------------------------------
def test_checkpoint_round_trip_keeps_m_and_the_text_view(data, tmp_path):
    cfg = cfg_for(out=tmp_path / "run", items={"input": "id", "output": "untied"})
    res = train(cfg, dataset=data)
    loaded, lcfg, _ = load_checkpoint(res.out / "last")
    sd = loaded.state_dict()
    assert lcfg.items.text_match == N and sd["items.text_view"].shape[0] == data.n_items
    assert sd["items.match.delta"].abs().sum() > 0  # one training step moved M off s * I
    assert sd["items.match.scale"].item() != SCALE
    hist = histories(data)
    again, _, _ = load_checkpoint(res.out / "last")
    assert torch.equal(loaded.scores(hist), again.scores(hist))
    assert loaded.item_vectors().shape == (data.n_items, 64 + sd["items.text_view"].shape[1] + 1)  # + the prior


def test_an_itemlm_starts_from_a_text_match_sasrec_s_id_vectors(data, tmp_path):
    """items.init=sasrec reads the SASRec's ID side (I, d), not its [v ; t] scoring vectors."""
    sas = train(cfg_for("sasrec", tmp_path / "sas", items={"input": "id"}), dataset=data).out / "last"
    sas_model, _, _ = load_checkpoint(sas)
    cfg = cfg_for(items={"init": "sasrec", "init_from": str(sas)}, itemlm={"item_dim": 16})
    m = build_model(cfg, data.items)
    init_items(m, cfg, data)
    v = sas_model.items.output_vectors().detach()
    want = (v - v.mean(0)) / (v - v.mean(0)).std()  # centred, at the random table's std 1
    torch.testing.assert_close(m.items.id_emb.weight.detach(), want, atol=1e-5, rtol=1e-5)


_FAMILIES = [("red", "stapler", "Acme"), ("blue", "lamp", "Globex"), ("green", "notebook", "Initech"),
             ("steel", "chair", "Umbrella"), ("paper", "folder", "Hooli"), ("smart", "cable", "Stark")]


@pytest.fixture(scope="module")
def families():
    """6 families of 4 near-duplicate items; every user buys within one family."""
    ids, title, brand, category = [], [], [], []
    for f, (adj, noun, b) in enumerate(_FAMILIES):
        for k in range(4):
            ids.append(f"F{f}M{k}")
            title.append(f"{adj} {noun} model {k + 1}")
            brand.append(b)
            category.append(f"office {noun}s")
    rng = np.random.default_rng(0)
    seqs = [f * 4 + rng.permutation(4) for f in rng.integers(0, len(_FAMILIES), 200)]
    return SequenceDataset("families", ItemTable(ids, {"title": title, "brand": brand, "category": category}),
                           [f"U{u}" for u in range(len(seqs))], [np.asarray(s, dtype=np.int64) for s in seqs])


@pytest.mark.parametrize("model,inp,out,gate", [("itemlm", "id", "untied", False), ("sasrec", "id", "tied", False),
                                                ("itemlm", "id", "untied", True)])
def test_items_add_on_a_text_match_model_ranks_a_near_duplicate_new_item_first(families, tmp_path, model, inp, out,
                                                                               gate):
    """ID-only views, which `items add` refuses without the text-match path: the new item has no
    ID part and ranks first, by its text, for a history of its whole family (excluded)."""
    cfg = cfg_for(model, tmp_path / "run", items={"input": inp, "output": out, **(GATE if gate else {})},
                  max_steps=30, eval_every=30, lr=1e-2, batch_size=32, eval_users=50)
    ckpt = train(cfg, dataset=families).out / "last"
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "NEW-stapler", "title": "red stapler model 5", "brand": "Acme", "category": "office staplers"},
        {"id": "NEW-lamp", "title": "blue lamp model 5", "brand": "Globex", "category": "office lamps"}]))
    result = add_items(ckpt, new, tmp_path / "with-new")
    m, _, items = load_checkpoint(result.out)
    assert items.ids[-2:] == ["NEW-stapler", "NEW-lamp"] and not m.items.id_known[-2:].any()
    F_ = m.items.text_view.shape[1] + 1  # the bias column (the gate's, the closed-item prior) after the text
    assert torch.equal(m.item_vectors()[-2:, :-F_], torch.zeros(2, m.item_vectors().shape[1] - F_))
    pred = Predictor.load(result.out)
    for fam, new_id in ((0, "NEW-stapler"), (1, "NEW-lamp")):
        top = [r["id"] for r in pred.recommend([[f"F{fam}M{k}" for k in range(4)]], k=3)[0]]
        assert top[0] == new_id, top


# ---- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    ({"itemlm": {"text_vocab_in_softmax": True}}, "text_vocab_in_softmax=false"),
    ({"itemlm": {"head": "two_level"}}, "itemlm.head=full"),
    ({"items": {"text_encoder": ""}}, "named items.text_encoder"),
    ({"model": "gru4rec"}, "items.text_match: itemlm or sasrec"),
    ({"items": {"text_match": -1}}, "items.text_match must be >= 0"),
    ({"items": {"text_match_scale": 0}}, "text_match_scale must be > 0"),
    ({"items": {"text_match": 0, "text_gate": [5]}}, "items.text_gate needs items.text_match"),
    ({"items": {"text_gate": [5]}}, "items.text_gate needs items.id_dropout > 0"),
    ({"items": {"text_gate": [20, 5], "id_dropout": 0.2}}, "items.text_gate must be increasing"),
    ({"items": {"text_gate": [1], "id_dropout": 0.2}}, "items.text_gate must be increasing"),
    ({"items": {"id_min_count": 5, "id_dropout": 0.2}}, "items.id_min_count > 1 needs items.text_gate"),
    ({"items": {"id_min_count": 0}}, "items.id_min_count must be >= 1"),
])
def test_config_errors_name_what_is_wrong(change, match):
    base = {"model": "itemlm", "itemlm": {"text_vocab_in_softmax": False},
            "items": {"text_match": 3}}
    for key, value in change.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=match):
        from_dict(base)


def test_text_match_off_changes_nothing():
    assert Config().items.text_match == 0


# ---- the item-side gate (items.text_gate) ------------------------------------------------------
def test_gate_buckets_are_closed_then_training_counts():
    gate = TextGate((3, 6))
    assert gate.buckets(torch.tensor([0, 1, 2, 3, 5, 6, 100])).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert list(gate.weights()) == ["closed", "1-2", "3-5", "6+"]
    assert gate.weights()["closed"] == (1.0, 0.0)  # starts as no gate


@pytest.mark.parametrize("model", ["itemlm", "sasrec"])
def test_gated_scores_are_h_v_plus_g_times_text_plus_c(data, model):
    """Each item's text part is weighed by its bucket's g and shifted by its c; an item without
    an ID part (no training interaction, or dropped this training step) is in the closed bucket."""
    m, _ = built(data, model, items=GATE)
    shake_gate(m)
    with torch.no_grad():
        m.items.match.delta.normal_(std=0.05)
    counts = torch.as_tensor(np.bincount(np.concatenate(data.split.train), minlength=data.n_items))
    bucket = m.items.item_bucket.clone()
    assert torch.equal(bucket, m.items.gate.buckets(counts))  # init_items stored the training counts' buckets
    assert len(set(bucket.tolist())) >= 3
    hist = histories(data, 4)
    view = m.items.text_view
    g_all, c_all = (torch.exp(20 * m.items.gate.log_weight), 20 * m.items.gate.bias)
    q = torch.stack([view[torch.as_tensor(h[-N:])].mean(0) for h in hist]) @ m.items.match.matrix().T  # (B, F)

    def want(h, v, open_):
        b = torch.where(open_, bucket, torch.zeros_like(bucket))
        return h @ (v * open_[:, None]).T + g_all[b] * (q @ view.T) + c_all[b]

    with torch.inference_mode():
        query = m.encode(m.query_batch(hist))
        H = query.shape[1] - view.shape[1] - 1
        v = m.item_vectors()[:, :H]  # the ID part, gated
        got = query @ m.item_vectors().T
        open_ = m.items.id_known.clone()
        assert not open_[:3].any() and torch.equal(v[:3], torch.zeros_like(v[:3]))
        torch.testing.assert_close(got, want(query[:, :H], v, open_), atol=1e-4, rtol=1e-4)
    m.train()
    torch.manual_seed(1)
    with torch.no_grad():
        m.items.begin_step()
        step_open = m.items.id_gate().clone()  # this step's draw: some known items closed too
        assert (m.items.id_known & ~step_open).any()
        got = query @ m.item_vectors().T
    torch.testing.assert_close(got, want(query[:, :H], v, step_open), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["itemlm", "sasrec"])
def test_a_fresh_gate_scores_an_ungated_checkpoint_exactly(data, tmp_path, model):
    """g = 1, c = 0: an old (ungated) checkpoint's weights in a gated model give its scores and
    top-k; and the old checkpoint itself still loads with no gate."""
    res = train(cfg_for(model, tmp_path / "run", items={"id_dropout": 0.3}, max_steps=3), dataset=data)
    old, ocfg, _ = load_checkpoint(res.out / "last")
    assert ocfg.items.text_gate == () and old.items.gate is None
    cfg = cfg_for(model, items={"id_dropout": 0.3, **GATE})
    new = build_model(cfg, data.items)
    init_items(new, cfg, data)
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert sorted(missing) == ["items.gate.bias", "items.gate.log_weight", "items.item_bucket"] and not unexpected
    new.eval()
    hist = histories(data)
    with torch.inference_mode():
        a, b = old.scores(hist), new.scores(hist)
        ia, ib = ExactTopK(old).topk(old.encode(old.query_batch(hist)), 10, exclude=hist)[1], \
            ExactTopK(new).topk(new.encode(new.query_batch(hist)), 10, exclude=hist)[1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(ia, ib)


def test_a_new_item_scores_as_a_catalog_item_with_its_id_gate_closed(families, tmp_path):
    """`items add` puts a new item in the closed bucket: its scores equal those the model gives
    a catalog item with the same text once that item's ID part is closed."""
    cfg = cfg_for("itemlm", tmp_path / "run", items=GATE, max_steps=20, eval_every=20, lr=1e-2, batch_size=32,
                  eval_users=50)
    ckpt = train(cfg, dataset=families).out / "last"
    new = tmp_path / "new.jsonl"  # F2M1's text under a new id
    new.write_text(json.dumps({"id": "NEW", "title": "green notebook model 2", "brand": "Initech",
                               "category": "office notebooks"}) + "\n")
    m_new, _, items = load_checkpoint(add_items(ckpt, new, tmp_path / "with-new").out)
    m_old, _, _ = load_checkpoint(ckpt)
    assert m_new.items.gate.weights()["closed"] != (1.0, 0.0)  # trained: the closed bucket matters
    x = families.items.index["F2M1"]
    torch.testing.assert_close(m_new.items.text_view[-1], m_old.items.text_view[x])
    with torch.no_grad():
        m_old.items.id_known[x] = False
    hist = [np.array([8, 10, 11]), np.array([0, 1]), np.array([20, 21, 22])]
    with torch.inference_mode():  # dot products (ItemLM's scores are log-probabilities over the catalog)
        got = m_new.encode(m_new.query_batch(hist)) @ m_new.item_vectors()[-1]
        want = m_old.encode(m_old.query_batch(hist)) @ m_old.item_vectors()[x]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_closed_bucket_learns_what_text_is_worth(families, tmp_path):
    """Known answer: every user buys within one family of near-duplicate titles, so text predicts
    the next item; with a text part started far too weak (scale 0.3), items whose ID part is dropped
    can only be ranked by text, and the closed bucket's weight must grow. With the titles shuffled
    across items text predicts (nearly) nothing, and it must grow far less. A bucket no item falls
    in (60+) has nothing to learn from and stays at its start."""
    perm = np.random.default_rng(1).permutation(len(families.items))
    shuffled = SequenceDataset("shuffled", ItemTable(families.items.ids, {
        k: [v[p] for p in perm] for k, v in families.items.fields.items()}), families.users, families.sequences)
    closed = {}
    for name, ds in (("informative", families), ("shuffled", shuffled)):
        cfg = cfg_for("itemlm", tmp_path / name, items={"id_dropout": 0.5, "text_match_scale": 0.3, "text_gate": [60]},
                      max_steps=40, eval_every=40, lr=1e-2, batch_size=32, eval_users=50)
        m, _, _ = load_checkpoint(train(cfg, dataset=ds).out / "last")
        w = m.items.gate.weights()
        assert w["60+"] == (1.0, 0.0)
        closed[name] = w["closed"][0]
    assert closed["informative"] > 3.0 and closed["informative"] > 3 * closed["shuffled"], closed


def test_items_below_id_min_count_are_scored_as_closed_but_stay_in_training(data):
    """items.id_min_count: an item seen fewer times has no ID part (closed bucket, as a new item)
    in scoring and training, yet it is a training target like any other (unlike an unseen item)."""
    m, _ = built(data, items={**GATE, "id_min_count": 3})
    counts = torch.as_tensor(np.bincount(np.concatenate(data.split.train), minlength=data.n_items))
    few = (counts > 0) & (counts < 3)
    assert few.any() and (counts >= 3).any()
    assert torch.equal(m.items.id_known, counts >= 3)
    with torch.no_grad():
        m.items.gate.bias.fill_(0.1)
    F_ = m.items.text_view.shape[1] + 1
    v = m.item_vectors()
    assert torch.equal((v[:, :-F_] != 0).any(1), counts >= 3)
    g, c = m.items.gate(torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(v[few, -1], c.expand(int(few.sum())))  # the closed bucket's bias
    unseen = m.items.unseen_in_training()
    assert unseen is None or torch.equal(unseen, counts == 0)


def test_with_text_gate_open_false_only_the_closed_bucket_learns(data):
    m, _ = built(data, items={**GATE, "text_gate_open": False})
    m.train()
    seqs = [np.asarray(s[-7:]) for s in data.split.train[:8]]
    torch.manual_seed(0)
    m.loss(m.train_batch(seqs, np.random.default_rng(0))).backward()
    gate = m.items.gate
    assert gate.log_weight.grad[0] != 0 and gate.bias.grad[0] != 0
    assert not gate.log_weight.grad[1:].any() and not gate.bias.grad[1:].any()
    with torch.no_grad():
        gate.log_weight.fill_(0.1)  # whatever they hold, the open buckets weigh g = 1, c = 0
        gate.bias.fill_(0.1)
    assert list(gate.weights().values())[1:] == [(1.0, 0.0)] * 3
