"""The item representation (models/item_repr.py, the ``items`` section): every input and output
view builds, trains a step and round-trips a checkpoint, on ItemLM and SASRec; items without
training interactions get exactly no ID part; id_dropout acts in training only; legacy configs
and checkpoints load into the new section."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from itemgen.core.config import ConfigError, ItemsConfig, from_dict, load_config
from itemgen.data.dataset import ItemTable, SequenceDataset
from itemgen.data.synthetic import make_dataset
from itemgen.heads.clusters import Clusters, random_clusters
from itemgen.models.checkpoint import load_checkpoint, save_checkpoint
from itemgen.models.registry import build_model
from itemgen.models.text_view import encode_items
from itemgen.training.item_init import init_items
from itemgen.training.loop import train

N_OLD, N_NEW = 30, 3  # the last N_NEW items never occur in training


@pytest.fixture(scope="module")
def data():
    """A synthetic catalog plus N_NEW titled items that no training sequence holds (one is a
    test target: the last item of user 0)."""
    ds = make_dataset(n_users=64, n_items=N_OLD, min_len=4, max_len=6, seed=3)
    ids = ds.items.ids + [f"N{i}" for i in range(N_NEW)]
    fields = {k: list(v) + [f"{v[i]} new" for i in range(N_NEW)] for k, v in ds.items.fields.items()}
    seqs = [np.append(s, N_OLD) if u == 0 else s for u, s in enumerate(ds.sequences)]
    return SequenceDataset(ds.name, ItemTable(ids, fields), ds.users, seqs, ds.source)


def cfg_for(out, model="itemlm", items=None, **itemlm):
    return from_dict({"model": model, "data": {"path": "x", "max_history": 6},
                      "itemlm": {"backbone": "tiny", "prompt": "compact", "item_dim": 16, **itemlm},
                      "items": {"text_encoder": "tiny", **(items or {})},
                      "sasrec": {"hidden": 16, "n_heads": 2},
                      "train": {"out": str(out), "max_steps": 1, "eval_every": 1, "eval_users": 10,
                                "progress": False, "batch_size": 16, "warmup_steps": 0}})


VIEWS = [("itemlm", "id", "untied"), ("itemlm", "id", "tied"), ("itemlm", "text", "tied"),
         ("itemlm", "text+id", "untied"), ("itemlm", "text+id", "text+id"), ("itemlm", "dual", "tied"),
         ("itemlm", "nullspace", "text+id"), ("itemlm", "text", "text+id"),
         ("sasrec", "id", "auto"), ("sasrec", "text+id", "tied"), ("sasrec", "dual", "text+id"),
         ("sasrec", "nullspace", "tied"), ("sasrec", "text", "auto")]


@pytest.mark.parametrize("model,inp,out", VIEWS)
def test_every_view_builds_trains_and_round_trips(data, tmp_path, model, inp, out):
    items = {"input": inp, "output": out, "null_dim": 4,
             "id_dropout": 0.3 if inp in ("text+id", "dual", "nullspace") else 0.0}
    cfg = cfg_for(tmp_path / "run", model=model, items=items)
    res = train(cfg, dataset=data)
    assert res.step == 1
    loaded, lcfg, _ = load_checkpoint(res.out / "last")
    assert lcfg.items == cfg.items
    width = 16 if model == "sasrec" else loaded.backbone.config.hidden_size
    assert loaded.item_vectors().shape == (data.n_items, width)
    sd = loaded.state_dict()
    if inp != "id" or out == "text+id":  # the text view is in the checkpoint, as the encoder gave it
        want, _ = encode_items(data.items, "tiny", cfg.items.text_fields)
        assert torch.allclose(sd["items.text_view"], want, atol=1e-5)
        assert sd["items.id_known"][N_OLD:].tolist() == [False] * N_NEW and sd["items.id_known"][:N_OLD].all()
    else:
        assert "items.text_view" not in sd
    hist = [s[:-1] for s in data.split.train[:4]]
    scores = loaded.scores(hist)
    assert scores.shape == (4, data.n_items) and torch.isfinite(scores).all()
    save_checkpoint(tmp_path / "again", loaded, lcfg, data.items)
    again, _, _ = load_checkpoint(tmp_path / "again")
    assert torch.equal(again.scores(hist), scores)


def test_the_two_level_head_keeps_its_own_vectors_with_text_inputs(data, tmp_path):
    path = Clusters(random_clusters(data.n_items, 4), "random").save(tmp_path / "clusters.json")
    cfg = cfg_for(tmp_path, items={"input": "text+id", "id_dropout": 0.2}, head="two_level", clusters=str(path))
    res = train(cfg, dataset=data)
    loaded, _, _ = load_checkpoint(res.out / "last")
    assert loaded.items.output_view == "untied" and "items.text_view" in loaded.state_dict()
    assert torch.isfinite(loaded.scores([s[:-1] for s in data.split.train[:2]])).all()


@pytest.mark.parametrize("model,inp,out", [("itemlm", "text+id", "text+id"), ("itemlm", "dual", "tied"),
                                           ("itemlm", "nullspace", "text+id"), ("sasrec", "text+id", "tied")])
def test_items_without_training_interactions_get_exactly_no_id_part(data, model, inp, out):
    cfg = cfg_for("unused", model=model, items={"input": inp, "output": out, "null_dim": 4})
    m = build_model(cfg, data.items)
    init_items(m, cfg, data)
    rep = m.items.eval()
    new = torch.arange(N_OLD, N_OLD + N_NEW)
    assert not rep.id_known[new].any() and rep.id_known[:N_OLD].all()
    with torch.no_grad():
        rep.id_emb.weight.normal_()  # every ID row nonzero, so a leak would show
        for p in (rep.id_out, rep.text_proj, rep.out_text, rep.dual_map):  # (the text parts start at zero)
            if isinstance(p, torch.nn.Linear):
                p.weight.normal_()
            elif p is not None:
                p.normal_()
        text = rep.text_features(new)
        if inp == "text+id":
            assert torch.equal(rep.raw_input(new), rep.text_proj(text))
        elif inp == "dual":
            assert torch.equal(rep.raw_input(new), rep.dual_map(torch.cat([torch.zeros(N_NEW, rep.dim),
                                                                            rep.text_proj(text)], -1)))
        else:  # nullspace: the frozen semantic coordinates alone
            assert torch.equal(rep.raw_input(new), text @ rep.null_basis)
        if out == "text+id":
            # against the same batched product (a product over fewer rows may round differently)
            assert torch.equal(rep.output_vectors()[new], rep.out_text(rep.text_features())[new])
        # a known item does have an ID part
        assert rep.raw_input(new).abs().sum() > 0
        old = torch.arange(3)
        assert not torch.allclose(rep.raw_input(old), cfg_free_text_input(rep, old))


def cfg_free_text_input(rep, items):
    """The input vectors ``items`` would have with no ID part."""
    known = rep.id_known.clone()
    rep.id_known[items] = False
    try:
        return rep.raw_input(items)
    finally:
        rep.id_known.copy_(known)


def test_id_dropout_only_in_training_mode(data):
    cfg = cfg_for("unused", items={"input": "text+id", "output": "text+id", "id_dropout": 0.5})
    m = build_model(cfg, data.items)
    init_items(m, cfg, data)
    rep = m.items
    with torch.no_grad():  # the text parts start at zero; any weights do here
        rep.text_proj.weight.normal_()
        rep.out_text.weight.normal_()
    torch.manual_seed(0)
    rep.train()
    rep.begin_step()
    gate = rep.id_gate()
    dropped = rep.id_known & ~gate
    assert 0.3 < dropped[:N_OLD].float().mean() < 0.7 and not gate[N_OLD:].any()
    i = int(torch.nonzero(dropped)[0])
    with torch.no_grad():
        assert torch.equal(rep.raw_input(torch.tensor([i])), rep.text_proj(rep.text_features(torch.tensor([i]))))
        # the same items lose their ID part on the output side in the same step
        assert torch.equal(rep.output_vectors()[i], rep.out_text(rep.text_features())[i])
    rep.begin_step()
    assert not torch.equal(rep.id_gate(), gate)  # drawn anew each step
    rep.eval()
    assert torch.equal(rep.id_gate(), rep.id_known)
    rep.begin_step()
    assert torch.equal(rep.id_gate(), rep.id_known)  # evaluation never drops


def test_sasrec_id_emb_starts_as_before_the_component(data):
    """The same seed gives the same SASRec item table as the code before the items section (the
    measured recipes keep their numbers)."""
    torch.manual_seed(7)
    m = build_model(cfg_for("unused", model="sasrec"), data.items)
    torch.manual_seed(7)
    old = nn.Embedding(data.n_items + 1, 16, padding_idx=0)
    nn.init.normal_(old.weight, std=0.02)
    with torch.no_grad():
        old.weight[0].zero_()
    assert torch.equal(m.items.id_emb.weight, old.weight)
    assert torch.equal(m.item_vectors(), old.weight[1:])


def test_legacy_itemlm_item_keys_load_into_the_items_section(tmp_path):
    old = {"model": "itemlm", "itemlm": {"backbone": "tiny", "item_encoder": "text+id", "tie_items": True,
                                         "tie_projection": "linear", "item_dropout": 0.2, "init": "sasrec",
                                         "init_from": "runs/sasrec/best", "freeze_items": True,
                                         "text_backbone": "smollm2-135m"}}
    cfg = from_dict(old)
    assert cfg.items == ItemsConfig(input="text+id", output="tied", tie_projection="linear", dropout=0.2,
                                    init="sasrec", init_from="runs/sasrec/best", freeze_id=True,
                                    text_encoder="smollm2-135m", text_fields=("title",))
    assert from_dict({"itemlm": {"item_encoder": "none", "tie_items": False}}).items == ItemsConfig(output="untied")
    assert from_dict({"itemlm": {"item_encoder": "text"}}).items.text_encoder == ""  # the model's own backbone
    # an old-style override on a new-style YAML: the override wins
    (tmp_path / "c.yaml").write_text("model: itemlm\nitems:\n  init: sasrec\n  init_from: runs/a\n")
    assert load_config(tmp_path / "c.yaml", ["itemlm.init_from=runs/b"]).items.init_from == "runs/b"
    assert "init_from" not in cfg.to_dict()["itemlm"] and cfg.to_dict()["items"]["input"] == "text+id"
    with pytest.raises(ConfigError, match="items.input: id|text"):
        from_dict({"itemlm": {"item_encoder": "bag"}})
    # another model's config.json held the itemlm section too, whose item keys never applied to it
    sas = from_dict({"model": "sasrec", "itemlm": {"tie_items": False, "init": "random", "item_encoder": "none"}})
    assert sas.items == ItemsConfig()


LEGACY_NAMES = {"items.id_emb.": "item_embed.", "items.text_view": "item_encoder.text_feat",
                "items.text_proj.": "item_encoder.text_proj.", "items.proj.": "item_proj.",
                "items.tied_scale": "tied_scale"}


def test_a_legacy_text_id_tied_checkpoint_loads_and_recommends_the_same(data, tmp_path):
    """A checkpoint in the layout before the items section (itemlm.item_encoder=text+id,
    tie_items, standardised title features under item_encoder.text_feat) loads into the component
    and scores as the model it was written from."""
    cfg = cfg_for(tmp_path, items={"input": "text+id", "output": "tied", "text_encoder": "", "text_fields": ["title"]})
    model = build_model(cfg, data.items)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, cfg, data.items)
    state = load_file(str(ckpt / "model.safetensors"))
    legacy = {}
    for key, value in state.items():
        if key == "items.text_view":
            value = model.items.text_features()  # stored standardised then
        if key in ("items.id_known", "items.text_center", "items.text_scale"):
            continue
        for new, old in LEGACY_NAMES.items():
            if key.startswith(new):
                key = old + key[len(new):]
                break
        legacy[key] = value.contiguous()
    save_file(legacy, str(ckpt / "model.safetensors"), metadata={"model": "itemlm"})
    (ckpt / "checksums.json").unlink(missing_ok=True)  # checkpoints of that layout recorded no checksums
    blob = json.loads((ckpt / "config.json").read_text())
    items = blob.pop("items")
    blob["itemlm"].update(item_encoder=items["input"], tie_items=True, tie_projection="input", text_backbone="",
                          init="random", init_from="", freeze_items=False, item_dropout=0.0)
    (ckpt / "config.json").write_text(json.dumps(blob))
    loaded, lcfg, _ = load_checkpoint(ckpt)
    assert lcfg.items.input == "text+id" and lcfg.items.output == "tied" and lcfg.items.text_fields == ("title",)
    hist = [s[:-1] for s in data.split.train[:4]]
    assert torch.allclose(loaded.scores(hist), model.eval().scores(hist), atol=1e-5)


def test_item_config_errors():
    with pytest.raises(ConfigError, match="items.input: id"):
        cfg_for("x", items={"input": "bag"})
    with pytest.raises(ConfigError, match="items.id_dropout needs"):
        cfg_for("x", items={"id_dropout": 0.2})
    with pytest.raises(ConfigError, match="needs itemlm.head=full"):
        cfg_for("x", items={"output": "tied"}, head="two_level")
    with pytest.raises(ConfigError, match="sasrec scores with its input vectors"):
        cfg_for("x", model="sasrec", items={"output": "untied"})
    with pytest.raises(ConfigError, match="sasrec has no backbone"):
        cfg_for("x", model="sasrec", items={"input": "text+id", "text_encoder": ""})
    with pytest.raises(ConfigError, match="needs an ID table"):
        cfg_for("x", items={"input": "text", "init": "ials"})
    with pytest.raises(ValueError, match="null_dim"):
        build_model(cfg_for("x", items={"input": "nullspace", "null_dim": 16}), ItemTable(["a", "b"], {"title": ["x", "y"]}))


@pytest.mark.parametrize("inp", ["text+id", "dual"])
def test_fused_views_start_from_their_id_part(data, inp):
    """text+id and dual inputs and the text+id output start as their ID part: a model whose ID
    vectors come from a trained SASRec (items.init=sasrec) starts where that SASRec left off, and
    training adds text."""
    cfg = cfg_for("unused", items={"input": inp, "output": "text+id", "init": "ials"})
    m = build_model(cfg, data.items)
    init_items(m, cfg, data)
    rep = m.items.eval()
    known = torch.arange(N_OLD)
    with torch.no_grad():
        assert torch.equal(rep.raw_input(known), rep.id_emb(known))
        assert torch.equal(rep.output_vectors()[:N_OLD], rep.id_out[:N_OLD])
        assert rep.id_out.std().item() == pytest.approx(0.02, rel=1e-3)  # the ID residual was initialised


@pytest.mark.parametrize("model,items", [("itemlm", {"input": "text+id", "output": "text+id"}),
                                         ("itemlm", {"input": "id", "output": "untied", "text_match": 2}),
                                         ("sasrec", {"input": "text+id"})])
def test_items_no_training_example_shows_are_left_out_of_the_training_softmax(data, model, items):
    """They do not exist yet when the model trains (as a new item will not): the training loss
    must not depend on them, else the text path learns that their text is never a target."""
    cfg = cfg_for("unused", model=model, items=items, text_vocab_in_softmax=False)
    m = build_model(cfg, data.items)
    init_items(m, cfg, data)
    rep = m.items
    with torch.no_grad():  # nonzero text maps, so the new items' text would reach their scores
        for p in (rep.text_proj, rep.out_text):
            if p is not None:
                p.weight.normal_()
    m.train()
    batch = m.train_batch([np.asarray(s) for s in data.split.train[:8]], np.random.default_rng(0))
    torch.manual_seed(0)  # the same dropout masks in both passes
    before = m.loss(batch)
    with torch.no_grad():
        rep.text_view[N_OLD:] = torch.randn(N_NEW, rep.text_view.shape[1])  # other text for the new items
    torch.manual_seed(0)
    assert torch.allclose(m.loss(batch), before)
    assert rep.unseen_in_training().tolist() == [False] * N_OLD + [True] * N_NEW
    m.eval()  # ranking still scores them (from their text)
    scores = m.scores([data.split.train[0][:3]])
    assert torch.isfinite(scores[0, N_OLD:]).all()
