"""ItemLM's packed inference path (models/packed_decoder.py, ItemLM.encode_histories) against the
reference, encode(query_batch(...)): the HF forward on a left-padded batch.

Parity: query states and Predictor's top-k (indices and scores) equal the reference's at batch 1
and on a mixed-length batch (an empty history included), for every prompt template, with the
text-match path, the two-level head, and Llama and Qwen2 layers (attention biases). Cache: what
the path keeps (projected item inputs, prefix keys/values, transposed weights) follows weight
changes, train()/eval() and new items. Cost: it computes on no padding and on no position of
the last layer but each row's last (counted FLOPs). Unsupported layers keep the reference."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from itemgen.api import Predictor
from itemgen.core.config import from_dict
from itemgen.data.synthetic import make_dataset
from itemgen.models import packed_decoder
from itemgen.heads.clusters import Clusters
from itemgen.models.backbones import byte_tokenizer, load_backbone
from itemgen.models.itemlm import ItemLM
from itemgen.models.registry import build_model
from itemgen.topk.exact import ExactTopK
from itemgen.training.item_init import init_items

MAX_H = 8


@pytest.fixture(scope="module")
def data():
    return make_dataset(n_users=40, n_items=30, min_len=3, max_len=12, seed=3)


def cfg_for(itemlm=None, items=None):
    return from_dict({"model": "itemlm", "data": {"path": "x", "max_history": MAX_H},
                      "itemlm": {"backbone": "tiny", "prompt": "ids", "item_dim": 16, "text_vocab_in_softmax": False,
                                 **(itemlm or {})},
                      "items": items or {}})


def perturbed(m):
    """Weights away from their initial values (random init has many zeros/ones: norms, biases)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def built(data, itemlm=None, items=None):
    cfg = cfg_for(itemlm, items)
    torch.manual_seed(0)
    m = build_model(cfg, data.items)
    init_items(m, cfg, data)
    return perturbed(m), cfg


def mixed_histories(data):
    """Lengths 0 .. MAX_H, unsorted: one empty history, one of a single item, several long ones."""
    seqs = [np.asarray(s) for s in data.split.train]
    hist = [seqs[i][:n] for i, n in enumerate([5, 1, MAX_H, 0, 3, MAX_H, 2, 7, 4])]
    return [h[-MAX_H:] for h in hist]


def reference(m, hist):
    with torch.inference_mode():
        return m.encode(m.to_device(m.query_batch(hist)))


def assert_same_queries(m, hist):
    with torch.inference_mode():
        fast = m.encode_histories(hist)
        ones = torch.cat([m.encode_histories([h]) for h in hist])
    ref = reference(m, hist)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ones, ref, atol=1e-5, rtol=1e-5)


def assert_same_top_k(m, cfg, data, hist, k=10):
    pred = Predictor(m, cfg, data.items, "unused")
    for batch in [hist, *[[h] for h in hist]]:
        scores, ids = pred.topk_indices(batch, k)
        with torch.inference_mode():
            rs, ri = ExactTopK(m).topk(reference(m, batch), k, exclude=batch)
        np.testing.assert_array_equal(ids, ri.numpy())
        np.testing.assert_allclose(scores, rs.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt", ["ids", "compact", "default"])
def test_queries_and_top_k_equal_the_reference(data, prompt):
    m, cfg = built(data, itemlm={"prompt": prompt})
    assert packed_decoder.supported(m.decoder) and m.packs_histories is True
    hist = mixed_histories(data)
    assert_same_queries(m, hist)
    assert_same_top_k(m, cfg, data, hist)


def test_with_the_text_match_path(data):
    m, cfg = built(data, items={"text_encoder": "tiny", "text_match": 3, "text_match_scale": 4.0})
    assert m.items.match is not None
    hist = mixed_histories(data)
    assert_same_queries(m, hist)
    assert_same_top_k(m, cfg, data, hist)


def test_with_the_two_level_head(data):
    cfg = cfg_for(itemlm={"head": "two_level"})
    backbone, tok = load_backbone("tiny")
    torch.manual_seed(0)
    m = perturbed(ItemLM(backbone, tok, data.items, cfg.itemlm, cfg.items,
                         clusters=Clusters(np.arange(data.n_items) % 5, "random")))
    assert_same_queries(m, mixed_histories(data))


def _with_backbone(data, backbone):
    cfg = cfg_for()
    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    return perturbed(ItemLM(backbone.eval(), tok, data.items, cfg.itemlm, cfg.items)), cfg


def test_qwen2_layers_with_attention_biases(data):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(byte_tokenizer()), hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    m, cfg = _with_backbone(data, qwen)
    assert packed_decoder.supported(m.decoder) and m.decoder.layers[0].self_attn.q_proj.bias is not None
    hist = mixed_histories(data)
    assert_same_queries(m, hist)
    assert_same_top_k(m, cfg, data, hist)


def test_unsupported_layers_keep_the_reference(data):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(byte_tokenizer()), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8))
    m, _ = _with_backbone(data, qwen3)
    assert not packed_decoder.supported(m.decoder)  # q/k norms: not the layers the packed forward computes
    assert m.packs_histories is False  # a server keeps its own prefix cache for it (serving/engine.py)
    assert_same_queries(m, mixed_histories(data))
    assert m._packed.decoder is None


def test_what_it_keeps_follows_the_weights(data):
    m, _ = built(data, items={"text_encoder": "tiny", "text_match": 3, "input": "text+id", "output": "untied"})
    hist = mixed_histories(data)
    assert_same_queries(m, hist)
    with torch.no_grad():  # an in-place update (an optimizer step, load_state_dict) bumps versions
        m.decoder.layers[0].mlp.down_proj.weight.mul_(1.5)
        m.items.id_emb.weight.add_(0.3)
    assert_same_queries(m, hist)
    m.train()
    assert m._packed is None
    m.eval()
    assert_same_queries(m, hist)
    scaled = {k: v * 0.9 if v.is_floating_point() else v for k, v in m.state_dict().items()}
    state = m.load_state_dict(scaled, assign=True)  # new tensors, not copied into the old ones
    assert not state.missing_keys and m._packed is None
    assert_same_queries(m, hist)
    m.append_items(torch.randn(2, m.items.text_view.shape[1]))  # new items (models/new_items.py)
    assert m._packed is None
    new = [np.asarray([m.n_items - 1, 0, m.n_items - 2])]
    assert_same_queries(m, hist + new)


def test_no_flops_on_padding_or_on_the_last_layer_s_earlier_positions(data):
    """One long history among short ones: the reference pads every row to the longest and runs
    every position through every layer; the packed path's matmuls cover each row's own tokens
    (the last layer: keys/values only, but for each row's last token)."""
    m, cfg = built(data)
    hist = [np.asarray(data.split.train[0][:1])] * 7 + [np.asarray(data.split.train[1][:MAX_H])]
    pred = Predictor(m, cfg, data.items, "unused")

    def flops(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    fast = flops(lambda: pred.topk_indices(hist, 5))  # the first call also fills the cache: count the second
    fast = flops(lambda: pred.topk_indices(hist, 5))
    ref = flops(lambda: ExactTopK(m).topk(reference(m, hist), 5))
    c = m.backbone.config
    H, inter, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = 2 * (2 * H * H + 2 * H * kv + 3 * H * inter)  # FLOPs of one position through one layer's matmuls
    P = len(m.prompts.prefix)
    tokens = sum(len(h) for h in hist)  # ids prompt: one token per item after the prefix
    bound = (c.num_hidden_layers - 1) * tokens * layer + tokens * 2 * 2 * H * kv + len(hist) * layer
    assert fast <= 1.2 * bound + 2 * len(hist) * H * m.n_items * 2, (fast, bound)
    assert fast < 0.4 * ref, (fast, ref)
    assert P > 0


def test_positions_past_the_first_rope_table(data):
    """The RoPE table grows when a longer prompt comes after short ones (64 positions at first)."""
    m, _ = built(data)
    short = [np.asarray([1, 2, 3])]
    assert_same_queries(m, short)
    long = [np.arange(150) % data.n_items, np.asarray([4, 5])]
    assert_same_queries(m, long)
    assert m._packed.decoder._rot[0].shape[0] >= 150


@pytest.mark.parametrize("n_layers", [1, 2])
def test_first_layer_projections_from_the_item_table(data, monkeypatch, n_layers):
    """ids prompt: the first layer's q|k|v of every item come from a table computed once per
    weights; the queries equal the reference with and without it (over the budget: per request),
    and the table saves exactly that matmul per token (counted FLOPs)."""
    import itemgen.models.itemlm as itemlm_module

    m, cfg = built(data, itemlm={"n_layers": n_layers})
    assert len(m.decoder.layers) == n_layers
    hist = mixed_histories(data)
    assert_same_queries(m, hist)
    assert m._packed.item_first is not None and m._packed.item_first.shape[0] == m.n_items
    pred = Predictor(m, cfg, data.items, "unused")

    def flops():
        with FlopCounterMode(display=False) as fc:
            pred.topk_indices(hist, 5)
        return fc.get_total_flops()

    with_table = flops()
    monkeypatch.setattr(itemlm_module, "FIRST_LAYER_TABLE_BYTES", 0)
    m._packed = None
    assert_same_queries(m, hist)
    assert m._packed.item_first is None
    without = flops()
    c = m.backbone.config
    head = c.hidden_size // c.num_attention_heads
    q, kv2 = c.num_attention_heads * head, 2 * c.num_key_value_heads * head
    tokens, rows = sum(len(h) for h in hist), sum(1 for h in hist if len(h))
    # one layer: it is also the last, whose queries are computed at each row's last token only
    saved = tokens * (q + kv2) if n_layers > 1 else tokens * kv2 + rows * q
    assert without - with_table == 2 * c.hidden_size * saved


# ---- the batch-1 overhead cuts (issue 21, deliverable 5): plans, the ids prompt, the head's top-k ----

def test_plans_beyond_the_cache_and_lengths_seen_again(data, monkeypatch):
    """A plan (RoPE rows, masks, last-token slices) per batch of row lengths, kept up to
    PackedDecoder.PLANS: more lengths than that empty the cache and compute again, and a plan
    reused for the same lengths gives the same queries (batch 1 and padded batches)."""
    monkeypatch.setattr(packed_decoder.PackedDecoder, "PLANS", 3)
    m, _ = built(data)
    seqs = [np.asarray(s) for s in data.split.train]
    singles = [[s[:n]] for s, n in zip(seqs, range(1, MAX_H + 1))]  # 8 lengths: past the cache of 3
    for hist in [*singles, mixed_histories(data), *singles[:2], mixed_histories(data)]:
        assert_same_queries(m, hist)
        assert len(m._packed.decoder._plans) <= 3


@pytest.mark.parametrize("exclude_history", [True, False])
def test_top_k_with_the_repeat_bias_masked_and_kept(data, exclude_history):
    """With a repeat bias: Predictor's top-k (packed path, one index_put for the mask, the
    log-softmax in one op) equals the reference's (HF forward, the bias added from the histories,
    the history masked row by row) with the history masked and kept."""
    cfg = from_dict({**cfg_for().to_dict(), "repeat": {"bias": "recency"}})
    torch.manual_seed(0)
    m = perturbed(build_model(cfg, data.items))
    with torch.no_grad():
        m.repeat.raw.copy_(torch.linspace(-0.3, 0.4, len(m.repeat.raw)))  # both signs, every bucket
    hist = mixed_histories(data)
    pred = Predictor(m, cfg, data.items, "unused")
    for batch in [hist, *[[h] for h in hist]]:
        scores, ids = pred.topk_indices(batch, 10, exclude_history=exclude_history)
        with torch.inference_mode():
            q = reference(m, batch)
            full = m.history_scores(m.score_items(q), None if exclude_history else batch)
            if exclude_history:
                full = full.clone()
                for b, h in enumerate(batch):
                    full[b, torch.as_tensor(h, dtype=torch.long)] = float("-inf")
            rs, ri = torch.topk(full, 10, dim=1)
        np.testing.assert_array_equal(ids, ri.numpy())
        np.testing.assert_allclose(scores, rs.numpy(), atol=1e-5, rtol=1e-5)


def test_layers_with_biases_everywhere_and_float64(data):
    """Llama layers with attention and MLP biases (the residual added after the bias) and a
    float64 model (the norms step by step, the plans in that dtype) equal the reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(byte_tokenizer()), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         attention_bias=True, mlp_bias=True))
    m, cfg = _with_backbone(data, llama)
    assert m.decoder.layers[0].mlp.down_proj.bias is not None and m.decoder.layers[0].self_attn.o_proj.bias is not None
    hist = mixed_histories(data)
    assert_same_queries(m, hist)
    assert_same_top_k(m, cfg, data, hist)
    m.double()
    with torch.inference_mode():
        fast = m.encode_histories(hist)
    assert fast.dtype == torch.float64 and m._packed.decoder._plans
    assert all(key[1] == torch.float64 for key in m._packed.decoder._plans)
    torch.testing.assert_close(fast, reference(m, hist), atol=1e-10, rtol=1e-10)


def test_the_ids_prompt_is_the_prefix_then_the_history():
    """What encode_histories relies on to skip building the ids prompt: after the prefix, one
    item slot per history item and nothing else; the other styles are not slots only."""
    from itemgen.data.prompts import PromptBuilder

    tok = byte_tokenizer()
    for style in ("ids", "compact", "default"):
        pb = PromptBuilder(tok, style=style)
        assert pb.slots_only == (style == "ids")
        if style == "ids":
            for h in ([], [4], [7, 2, 7, 9]):
                e = pb.inference_prompt(np.asarray(h, dtype=np.int64))
                P = len(pb.prefix)
                assert e.items[P:].tolist() == h and (e.tokens[P:] == -1).all() and (e.items[:P] == -1).all()


@pytest.mark.parametrize("complex_form", [True, False])
def test_rope_on_side_by_side_pairs_is_hf_rope(complex_form):
    """The packed path keeps each head's RoPE pairs (i, i + d/2) side by side (_pairs) and rotates
    them as complex numbers (float32/64) or in the real form (half dtypes): the same as HF's
    x * cos + rotate_half(x) * sin, read through the same reordering."""
    from transformers.models.llama.modeling_llama import rotate_half

    g = torch.Generator().manual_seed(0)
    T, heads, d = 5, 3, 8
    x = torch.randn(T, heads, d, generator=g)
    angle = torch.rand(T, d // 2, generator=g) * 6
    c, s = angle.cos(), angle.sin()
    if not complex_form:  # the real form, as a bfloat16 model gets it (applied in float32 here)
        c, s = c.bfloat16(), s.bfloat16()
    rot = packed_decoder._rotations(c, s)
    assert isinstance(rot, tuple) != complex_form
    if not complex_form:
        rot, c, s = tuple(t.float() for t in rot), c.float(), s.float()
    cos, sin = torch.cat([c, c], -1), torch.cat([s, s], -1)  # (T, d): HF's layout
    want = x * cos[:, None] + rotate_half(x) * sin[:, None]
    perm = packed_decoder._pairs(heads * d, d)

    def paired(t):
        return t.reshape(T, heads * d)[:, perm].view(T, heads, d)

    torch.testing.assert_close(packed_decoder._rope(paired(x), rot), paired(want), atol=1e-6, rtol=1e-6)
