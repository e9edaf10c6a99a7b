"""Semantic-ID baseline: codes unique per item (collisions separated), valid tokens, and a tiny
model whose constrained beam search only returns real items and learns a known rule."""

import numpy as np
import pytest
import torch

from itemgen.core.config import ConfigError, from_dict
from itemgen.data.synthetic import make_dataset
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.semantic_ids import ials_embeddings, residual_kmeans, with_collision_code
from itemgen.training.loop import train

RULE = dict(n_users=300, n_items=12, min_len=3, max_len=6, noise=0.0, seed=1)  # the last item decides the next


def test_residual_kmeans_codes_and_collision_code():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((200, 16)).astype(np.float32)
    emb[100:110] = emb[0]  # identical embeddings must collide on every level ...
    codes = residual_kmeans(emb, levels=2, codebook=8, seed=0)
    assert codes.shape == (200, 2) and codes.min() >= 0 and codes.max() < 8
    assert all((codes[i] == codes[0]).all() for i in range(100, 110))
    full = with_collision_code(codes)  # ... and the extra code separates them
    assert len({tuple(r) for r in full.tolist()}) == 200
    assert sorted(full[[0] + list(range(100, 110)), 2].tolist()) == list(range(11))
    # residual levels: the second level refines, it does not repeat the first
    assert (residual_kmeans(emb, 2, 8, seed=0) == codes).all()  # deterministic


def test_ials_embeddings_shape():
    seqs = [np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([3, 4])]
    emb = ials_embeddings(seqs, 5, dim=4)
    assert emb.shape == (5, 4) and np.isfinite(emb).all()


def test_bad_config():
    with pytest.raises(ConfigError, match="semantic_ids.embeddings"):
        from_dict({"model": "semantic_id", "semantic_ids": {"embeddings": "nope"}})


@pytest.fixture(scope="module")
def rule_data():
    return make_dataset(**RULE)


@pytest.fixture(scope="module")
def trained(rule_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sid")
    t = {"out": str(out), "eval_every": 200, "eval_users": 20, "warmup_steps": 10, "progress": False,
         "patience": 100, "lr": 1e-2, "batch_size": 32, "max_steps": 200}
    cfg = from_dict({"model": "semantic_id", "data": {"path": "synthetic-inline", "max_history": 1},
                     "semantic_ids": {"backbone": "tiny", "prompt": "compact", "levels": 2, "codebook_size": 3},
                     "train": t})
    return train(cfg, dataset=rule_data)


def test_codes_unique_and_tokens_in_the_code_range(trained, rule_data):
    model, _, _ = load_checkpoint(trained.best)
    assert model.codes.shape == (rule_data.n_items, 3)
    assert len({tuple(r) for r in model.codes.tolist()}) == rule_data.n_items
    flat = [t for seq in model.item_tokens for t in seq]
    assert min(flat) >= model.text_vocab and max(flat) < model.text_vocab + model.out_size
    assert model.backbone.get_input_embeddings().weight.shape[0] == model.text_vocab + model.out_size
    for i, lab in enumerate(model.label_tokens):
        assert model.trie.lookup(lab) == [i]


def test_decoding_returns_valid_distinct_items(trained, rule_data):
    model, cfg, _ = load_checkpoint(trained.best)
    test = rule_data.split.test[:100]
    hist = [e.history[-1:] for e in test]
    scores, ids = model.beam_topk(model.query_batch(hist), k=5)
    for row in ids.tolist():
        assert len(set(row)) == 5 and all(0 <= i < rule_data.n_items for i in row)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    top5 = np.mean([e.target in row for e, row in zip(test, ids.tolist())])
    assert top5 >= 0.6, top5  # learned something (5 of 12 items by chance: 0.42)
    # excluded items never come back
    long = [e.history[-3:] for e in test[:10]]
    _, ids_ex = model.beam_topk(model.query_batch(long), k=5, exclude=long)
    for row, h in zip(ids_ex.tolist(), long):
        assert len(set(row)) == 5 and not set(row) & set(h.tolist())


def test_scores_match_a_teacher_forced_forward_pass(trained, rule_data):
    """Beam scores are the summed log-probs of the item's codes under the model."""
    model, _, _ = load_checkpoint(trained.best)
    h = rule_data.split.test[0].history[-1:]
    scores, ids = model.beam_topk(model.query_batch([h]), k=3)
    for s, item in zip(scores[0].tolist(), ids[0].tolist()):
        enc = model.encode_prompt(h, item)
        from itemgen.data.prompts import collate

        b = collate([enc], model.pad_token)
        with torch.inference_mode():
            ref = -model.loss(b).item()
        assert abs(ref - s) < 1e-3, (ref, s)


def test_codes_reused_from_a_checkpoint(trained, rule_data, tmp_path):
    from itemgen.data.dataset import DataError
    from itemgen.models.semantic_ids import SemanticIDLM

    model, _, _ = load_checkpoint(trained.best)
    cfg = from_dict({"model": "semantic_id", "semantic_ids": {"backbone": "tiny", "codes": str(trained.best)}})
    again = SemanticIDLM.build(cfg, rule_data.items)
    assert (again.codes == model.codes).all() and again.codebook == model.codebook
    bad = tmp_path / "semantic_ids.json"
    bad.write_text('{"codes": [[0, 0]], "codebook": 3}')
    cfg = from_dict({"model": "semantic_id", "semantic_ids": {"backbone": "tiny", "codes": str(bad)}})
    with pytest.raises(DataError, match="shape"):
        SemanticIDLM.build(cfg, rule_data.items)


def test_ids_prompt_scores_match_a_teacher_forced_forward_pass(rule_data):
    """ids prompt: history items are one learned vector each; beam scores (prefill through
    inputs_embeds, then cached code steps) equal the loss of the same prompt with the answer."""
    from itemgen.data.prompts import collate
    from itemgen.models.registry import build_model

    cfg = from_dict({"model": "semantic_id", "data": {"path": "synthetic-inline", "max_history": 4},
                     "semantic_ids": {"backbone": "tiny", "prompt": "ids", "levels": 2, "codebook_size": 3,
                                      "embeddings": "text"}})
    model = build_model(cfg, rule_data.items).eval()
    h = np.array([2, 5, 5, 0])
    enc = model.encode_prompt(h)
    assert len(enc) == len(model.prefix) + 4 and enc.items[-4:].tolist() == h.tolist()
    scores, ids = model.beam_topk(model.query_batch([h, h[-1:]]), k=3)
    changed = model.beam_topk(model.query_batch([np.array([2, 5, 5, 1])]), k=3)[0]
    assert not torch.allclose(scores[0], changed[0])  # the last slot's item vector reaches the answer
    for s, item in zip(scores[0].tolist(), ids[0].tolist()):
        with torch.inference_mode():
            ref = -model.loss(collate([model.encode_prompt(h, item)], model.pad_token)).item()
        assert abs(ref - s) < 1e-3, (ref, s)
