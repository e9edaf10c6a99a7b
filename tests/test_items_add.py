"""``itemgen items add``: new items vectorised from their text, without retraining, become
recommendable at once; every bad input is refused with a clear message and changes nothing."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from itemgen.api import Predictor
from itemgen.cli import app
from itemgen.core.config import from_dict
from itemgen.data.dataset import DataError, ItemTable, SequenceDataset
from itemgen.models.checkpoint import CheckpointError, load_checkpoint
from itemgen.models.new_items import add_items
from itemgen.training.loop import train

_FAMILIES = [("red", "stapler", "Acme"), ("blue", "lamp", "Globex"), ("green", "notebook", "Initech"),
             ("steel", "chair", "Umbrella"), ("paper", "folder", "Hooli"), ("smart", "cable", "Stark"),
             ("mini", "desk", "Wayne"), ("eco", "marker", "Acme"), ("classic", "clip", "Globex"),
             ("pro", "pen", "Initech")]
MEMBERS = 4


@pytest.fixture(scope="module")
def families():
    """10 families of 4 near-duplicate items ("red stapler model 1".."4", one brand and category
    each); every user buys within one family, in a random order."""
    ids, title, brand, category = [], [], [], []
    for f, (adj, noun, b) in enumerate(_FAMILIES):
        for k in range(MEMBERS):
            ids.append(f"F{f}M{k}")
            title.append(f"{adj} {noun} model {k + 1}")
            brand.append(b)
            category.append(f"office {noun}s")
    rng = np.random.default_rng(0)
    seqs = [f * MEMBERS + rng.permutation(MEMBERS) for f in rng.integers(0, len(_FAMILIES), 300)]
    return SequenceDataset("families", ItemTable(ids, {"title": title, "brand": brand, "category": category}),
                           [f"U{u}" for u in range(len(seqs))], [np.asarray(s, dtype=np.int64) for s in seqs])


def cfg_for(out, model, items, steps):
    return from_dict({"model": model, "data": {"path": "x", "max_history": 6},
                      "itemlm": {"backbone": "tiny", "prompt": "ids", "item_dim": 16, "id_only_share": 1.0},
                      "items": {"text_encoder": "tiny", **items},
                      "sasrec": {"hidden": 32, "n_heads": 2, "dropout": 0.1},
                      "train": {"out": str(out), "max_steps": steps, "eval_every": steps, "eval_users": 50,
                                "progress": False, "batch_size": 32, "warmup_steps": 0, "lr": 1e-2}})


@pytest.fixture(scope="module")
def sasrec_text(families, tmp_path_factory):
    out = tmp_path_factory.mktemp("sasrec_text")
    cfg = cfg_for(out, "sasrec", {"input": "text+id", "output": "tied", "id_dropout": 0.3}, steps=60)
    return train(cfg, dataset=families).out / "last"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_new_item_ranks_among_the_top_for_a_history_of_its_near_duplicates(sasrec_text, tmp_path):
    new = write_jsonl(tmp_path / "new.jsonl", [
        {"id": "NEW-stapler", "title": "red stapler model 5", "brand": "Acme", "category": "office staplers"},
        {"id": "NEW-lamp", "title": "blue lamp model 5", "brand": "Globex", "category": "office lamps"}])
    result = add_items(sasrec_text, new, tmp_path / "with-new")
    assert result.added == ["NEW-stapler", "NEW-lamp"] and result.n_items == len(_FAMILIES) * MEMBERS + 2
    model, _, items = load_checkpoint(result.out)
    assert items.ids[-2:] == ["NEW-stapler", "NEW-lamp"] and items.title(len(items) - 1) == "blue lamp model 5"
    assert not model.items.id_known[-2:].any() and model.items.id_known[:-2].all()
    assert torch.equal(model.items.id_emb.weight[-2:], torch.zeros(2, 32))  # no ID part
    pred = Predictor.load(result.out)
    for history, new_id, other in ((["F0M0", "F0M1", "F0M2"], "NEW-stapler", "NEW-lamp"),
                                   (["F1M3", "F1M0", "F1M1"], "NEW-lamp", "NEW-stapler")):
        top = [r["id"] for r in pred.recommend([history], k=3)[0]]
        assert new_id in top and other not in top, (history, top)  # by its text, not by being new
    # the trained catalog is untouched, and its old items score as before
    old, _, old_items = load_checkpoint(sasrec_text)
    assert len(old_items) == len(_FAMILIES) * MEMBERS
    hist = [np.array([0, 1, 2])]
    assert torch.allclose(model.scores(hist)[:, :-2], old.scores(hist), atol=1e-5)


def test_items_add_on_itemlm_with_text_outputs(families, tmp_path):
    cfg = cfg_for(tmp_path / "run", "itemlm", {"input": "text+id", "output": "text+id", "id_dropout": 0.3}, steps=2)
    ckpt = train(cfg, dataset=families).out / "last"
    new = tmp_path / "new.csv"
    new.write_text("id,title,brand,categories\nNEW1,red stapler model 5,Acme,office staplers\n")
    add_items(ckpt, new, tmp_path / "out")
    model, _, items = load_checkpoint(tmp_path / "out")
    assert items.ids[-1] == "NEW1" and model.item_vectors().shape[0] == len(families.items) + 1
    assert torch.equal(model.items.id_out[-1], torch.zeros(model.items.width))
    text = model.items.text_features(torch.tensor([len(items) - 1]))
    assert torch.allclose(model.item_vectors()[-1], model.items.out_text(text)[0])
    assert torch.isfinite(model.scores([np.array([0, 1])])).all()


def snapshot(ckpt):
    return {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}


@pytest.mark.parametrize("case", ["duplicate", "in_catalog", "no_text", "empty", "too_many", "no_id", "blank_id"])
def test_bad_input_is_refused_and_changes_nothing(sasrec_text, tmp_path, case):
    rows = {"duplicate": [{"id": "A", "title": "x"}, {"id": "B", "title": "y"}, {"id": "A", "title": "z"}],
            "in_catalog": [{"id": "A", "title": "x"}, {"id": "F3M1", "title": "steel chair"}],
            "no_text": [{"id": "A", "title": "x"}, {"id": "B", "title": "  ", "description": "not a text field here"}],
            "too_many": [{"id": f"A{i}", "title": "x"} for i in range(4)],
            "no_id": [{"title": "x"}], "blank_id": [{"id": " ", "title": "x"}]}
    path = tmp_path / "new.jsonl"
    if case == "empty":
        path.write_text("")
    else:
        write_jsonl(path, rows[case])
    want = {"duplicate": "id 'A' repeats row 1", "in_catalog": "already in the catalog.*F3M1",
            "no_text": "has no text in title, brand, category.*: B", "empty": "empty file",
            "too_many": "more than 3 items, over the limit of 3", "no_id": "row 1: empty or missing 'id'",
            "blank_id": "row 1: empty or missing 'id'"}[case]
    before = snapshot(sasrec_text)
    with pytest.raises(DataError, match=want):
        add_items(sasrec_text, path, tmp_path / "out", max_items=3)
    assert not (tmp_path / "out").exists() and snapshot(sasrec_text) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind


def test_a_table_without_an_id_column_and_a_table_over_the_limit(sasrec_text, tmp_path):
    path = tmp_path / "new.tsv"
    path.write_text("item\ttitle\nA\tx\n")
    with pytest.raises(DataError, match="missing column 'id'"):
        add_items(sasrec_text, path, tmp_path / "out")
    path.write_text("id\ttitle\n" + "".join(f"A{i}\tx\n" for i in range(5)))
    with pytest.raises(DataError, match="5 items, over the limit of 4"):
        add_items(sasrec_text, path, tmp_path / "out", max_items=4)


def test_checkpoints_that_cannot_vectorise_from_text_are_refused(families, tmp_path):
    ids_only = train(cfg_for(tmp_path / "ids", "sasrec", {}, steps=1), dataset=families).out / "last"
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "A", "title": "x"}])
    with pytest.raises(CheckpointError, match="has no item text view"):
        add_items(ids_only, new, tmp_path / "out")
    untied = train(cfg_for(tmp_path / "untied", "itemlm", {"input": "text+id"}, steps=1), dataset=families).out / "last"
    with pytest.raises(CheckpointError, match="items.output=untied"):
        add_items(untied, new, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_needs_overwrite(sasrec_text, tmp_path):
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "NEW", "title": "green notebook model 9"}])
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        add_items(sasrec_text, new, tmp_path / "out")
    assert add_items(sasrec_text, new, tmp_path / "out", overwrite=True).n_items == len(_FAMILIES) * MEMBERS + 1


def test_cli_items_add(sasrec_text, tmp_path):
    runner = CliRunner()
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "NEW", "title": "green notebook model 9"}])
    res = runner.invoke(app, ["items", "add", str(sasrec_text), str(new), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "added 1 items" in res.output and Predictor.load(tmp_path / "out").items.ids[-1] == "NEW"
    res = runner.invoke(app, ["items", "add", str(sasrec_text), str(new), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "error:" in res.output and "--overwrite" in res.output
    res = runner.invoke(app, ["items", "add", str(sasrec_text), str(tmp_path / "nope.jsonl"), "--out",
                              str(tmp_path / "out2")])
    assert res.exit_code == 2 and "no such file" in res.output
