"""Frozen-LLM item-encoder mode (ILM idea): training leaves the backbone bit-identical (so its
text generation is unchanged) while the item parts learn; LoRA adapters train on top of it."""

import pytest
import torch

from itemgen.core.config import ConfigError, ItemsConfig, from_dict
from itemgen.data.dataset import ItemTable, SequenceDataset
from itemgen.data.synthetic import make_dataset
from itemgen.models.checkpoint import load_checkpoint
from itemgen.models.item_encoder import adapters_disabled
from itemgen.models.item_repr import ItemRepr
from itemgen.models.text_view import TextEncoder, encode_items
from itemgen.models.registry import build_model
from itemgen.training.loop import make_optimizer, train


def config(out, **itemlm):
    m = {"backbone": "tiny", "prompt": "compact", "item_dim": 16, "freeze_backbone": True, **itemlm}
    return from_dict({"model": "itemlm", "itemlm": m, "data": {"path": "x", "max_history": 6},
                      "train": {"out": str(out), "max_steps": 4, "eval_every": 4, "eval_users": 20,
                                "progress": False, "lr": 1e-2, "batch_size": 16, "warmup_steps": 1}})


@pytest.fixture(scope="module")
def data():
    return make_dataset(n_users=64, n_items=30, min_len=4, max_len=6, seed=3)


def greedy(backbone, tokenizer, text="red stapler 3 by Acme"):
    ids = torch.as_tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        return backbone.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("encoder,lora_r", [("text+id", 0), ("text", 4)])
def test_frozen_training_leaves_backbone_bit_identical(data, tmp_path, encoder, lora_r):
    cfg = config(tmp_path, item_encoder=encoder, lora_r=lora_r)
    before = build_model(cfg, data.items)  # the tiny backbone is seeded: the same weights train() starts from
    gen_before = greedy(before.backbone, before.tokenizer)
    result = train(cfg, dataset=data)
    after, _, _ = load_checkpoint(result.out / "last")
    sd0, sd1 = before.state_dict(), after.state_dict()
    assert sd0.keys() == sd1.keys()
    base = [k for k in sd0 if k.startswith("backbone.") and "lora_" not in k]
    assert base and all(torch.equal(sd0[k], sd1[k]) for k in base)
    # the item parts learned (LoRA B starts at zero, so a change there means the adapters trained)
    learned = ["items.text_proj.weight", "items.proj.0.weight", "head.item_out"]
    learned += ["items.id_emb.weight"] if encoder == "text+id" else []
    learned += [k for k in sd0 if "lora_B" in k]
    for k in learned:
        assert not torch.equal(sd0[k], sd1[k]), k
    assert torch.equal(sd0["items.text_view"], sd1["items.text_view"])  # the fixed text view round-trips
    with adapters_disabled(after.backbone):
        assert torch.equal(greedy(after.backbone, after.tokenizer), gen_before)
    # only non-backbone parameters (and LoRA adapters) reach the optimizer
    n_opt = sum(p.numel() for g in make_optimizer(after, cfg).param_groups for p in g["params"])
    n_item = sum(p.numel() for n, p in after.named_parameters() if not n.startswith("backbone.") or "lora_" in n)
    assert n_opt == n_item < sum(p.numel() for p in after.parameters())


def test_full_finetuning_changes_the_backbone(data, tmp_path):
    """The control for the test above: without freezing, the same run moves backbone weights."""
    cfg = config(tmp_path, freeze_backbone=False)
    before = build_model(cfg, data.items)
    after, _, _ = load_checkpoint(train(cfg, dataset=data).out / "last")
    assert not torch.equal(before.state_dict()["backbone.model.layers.0.mlp.up_proj.weight"],
                           after.state_dict()["backbone.model.layers.0.mlp.up_proj.weight"])


def test_text_view_is_standardised_from_the_items_with_text():
    view = torch.randn(5, 12) * torch.linspace(0.1, 50, 12) + 3.0  # a few huge dimensions, as LM states
    view[1] = 0  # no text
    rep = ItemRepr(5, 4, 8, ItemsConfig(input="text"), model="itemlm", text_dim=12)
    rep.set_text(view)
    assert torch.equal(rep.text_view, view)  # stored as the encoder gave it
    kept = rep.text_features()[[0, 2, 3, 4]]
    assert torch.allclose(kept.mean(0), torch.zeros(12), atol=1e-4)
    # every dimension at the same scale, and rows at norm ~1 (variance 1 / F per dimension)
    assert torch.allclose(kept.std(0, unbiased=False), torch.full((12,), 12 ** -0.5), atol=1e-3)
    assert torch.allclose(kept.norm(dim=1).pow(2).mean(), torch.tensor(1.0), atol=1e-3)
    assert torch.equal(rep.text_features()[1], torch.zeros(12))
    with pytest.raises(ValueError, match="expected"):
        rep.set_text(torch.zeros(2, 12))


def test_config_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="items.input: id|text"):
        config(tmp_path, item_encoder="bag")
    with pytest.raises(ConfigError, match="needs itemlm.freeze_backbone=true"):
        config(tmp_path, freeze_backbone=False, lora_r=4)
    no_titles = SequenceDataset("bare", ItemTable([f"i{i}" for i in range(5)]), ["u"], [torch.arange(5).numpy()])
    with pytest.raises(ValueError, match="need item text"):
        build_model(config(tmp_path, item_encoder="text"), no_titles.items)


def test_titles_encoded_by_a_whole_text_backbone_of_another_width(data, tmp_path):
    """itemlm.text_backbone: the recommender cuts its backbone to 1 layer, titles are encoded by a
    separate, wider model whole; the checkpoint keeps those features and loads without it."""
    from itemgen.models.backbones import tiny_backbone

    wide, tok = tiny_backbone(hidden_size=96, n_layers=3, n_heads=4, seed=3)
    wide.save_pretrained(tmp_path / "wide")
    tok.save_pretrained(tmp_path / "wide")
    cfg = config(tmp_path / "run", item_encoder="text+id", n_layers=1, text_backbone=str(tmp_path / "wide"),
                 freeze_backbone=False)
    model = build_model(cfg, data.items)
    assert model.items.text_view.shape[1] == 96 and model.backbone.config.num_hidden_layers == 1
    want, _ = encode_items(data.items, TextEncoder("wide", wide.model, tok), ("title",))  # legacy: titles only
    assert torch.allclose(model.items.text_view, want, atol=1e-5)
    result = train(cfg, dataset=data)
    loaded, _, _ = load_checkpoint(result.out / "last")
    assert torch.equal(loaded.items.text_view, model.items.text_view)  # kept, not recomputed
    hist = [s[:-1] for s in data.split.train[:4]]
    assert loaded.scores(hist).shape == (4, data.n_items)
    # init=text reads the same encoder (its width, 96, not the recommender's 64)
    from itemgen.training.item_init import text_vectors

    cfg = config(tmp_path / "run2", init="text", text_backbone=str(tmp_path / "wide"), freeze_backbone=False)
    assert text_vectors(build_model(cfg, data.items), cfg, data).shape == (data.n_items, 96)
