"""The README's first command: it trains both models, names the winner and where things are."""

import io
import json

import pytest
from rich.console import Console

from itemgen.cli.quickstart import run
from itemgen.core.recipes import ITEMLM_TEXT
from itemgen.data.dataset import ItemTable, SequenceDataset
from itemgen.data.synthetic import make_dataset


def quickstart(tmp_path, backbone, minutes):
    buf = io.StringIO()
    results = run(data=None, out=tmp_path, backbone=backbone, n_layers=2, minutes=minutes,
                  console=Console(file=buf, width=200))
    return results, buf.getvalue()


def test_quickstart_prints_the_winner_new_items_paths_and_next_commands(tmp_path):
    results, out = quickstart(tmp_path, "tiny", 0.05)
    assert set(results) == {"sasrec", "itemlm", "itemlm_minus_sasrec", "itemlm_minus_sasrec_by_segment",
                            "added_item"}
    assert "wins on NDCG@10" in out or "tie on NDCG@10" in out
    for what in ("checkpoints:", "reports:", "itemgen plot", "itemgen train configs/sasrec.yaml",
                 "itemgen train configs/itemlm-text.yaml", "itemgen evaluate", "itemgen serve"):
        assert what in out
    assert (tmp_path / "itemlm" / "best" / "model.safetensors").is_file()
    # every test user of the synthetic catalog (less the few whose history was all new items)
    test_users = len(SequenceDataset.load(tmp_path / "data").examples("test"))
    assert 2900 < test_users <= 3000
    assert json.loads((tmp_path / "quickstart.json").read_text())["sasrec"]["users"] == test_users
    # ItemLM with the text recipe, started from the SASRec the quickstart trained first
    cfg = json.loads((tmp_path / "itemlm" / "best" / "config.json").read_text())
    assert cfg["items"]["init"] == "sasrec" and cfg["items"]["init_from"] == str(tmp_path / "sasrec" / "best")
    for key in ("input", "output", "text_encoder"):
        assert cfg["items"][key] == ITEMLM_TEXT["items"][key]
    # the new-item story: 10% of the synthetic items are new (test targets only), said plainly;
    # the table has all / warm / new-item rows for both models; a new item is added to the trained
    # checkpoint and ranked
    assert "made-up data" in out and "30 of its items (10%) are new: they appear only at test time" in out
    for row in ("SASRec, all", "SASRec, warm", "SASRec, new items", "ItemLM + text, all", "ItemLM + text, warm",
                "ItemLM + text, new items"):
        assert row in out
    assert "ndcg@10" in out and "recall@10" in out
    for model in ("sasrec", "itemlm"):
        seg = results[model]["segments"]
        assert seg["cold"]["users"] + seg["warm"]["users"] == results[model]["users"]
        assert 0 < seg["cold"]["users"] < results[model]["users"]
    assert results["itemlm_minus_sasrec_by_segment"]["cold"]["users"] == results["sasrec"]["segments"]["cold"]["users"]
    # the added item: a file of one titled item, the commands, and its rank in the new checkpoint
    added = results["added_item"]
    line = json.loads((tmp_path / "new_items.jsonl").read_text())
    assert line["id"] == "I00300" and line["title"] == added["item"]["title"]
    assert added["n_items"] == 301 and 1 <= added["rank"] <= 301
    # ranked after a history the synthetic rule says it follows: the last item's category names
    # the group that the new item's title adjective names (item 300: group 0, "red")
    ds = SequenceDataset.load(tmp_path / "data")
    assert ds.items.fields["category"][ds.items.index[added["history"][-1]]] == "group 0"
    assert line["title"].startswith("red ")
    assert f"itemgen items add {tmp_path / 'itemlm' / 'best'} {tmp_path / 'new_items.jsonl'}" in out
    assert f"itemgen recommend {tmp_path / 'itemlm' / 'with-new'} --history {','.join(added['history'])}" in out
    items = json.loads((tmp_path / "itemlm" / "with-new" / "items.json").read_text())
    assert "I00300" in json.dumps(items)


@pytest.fixture(scope="module")
def real_quickstart(tmp_path_factory):
    """The real quickstart (SmolLM2-135M's shape, 2 layers, the default 2-minute budgets), once."""
    return quickstart(tmp_path_factory.mktemp("quickstart"), "smollm2-135m", 2.0)


@pytest.mark.slow
def test_quickstart_itemlm_reaches_its_sasrec(real_quickstart):
    """ItemLM with text is not below SASRec beyond the noise of the paired difference over all test
    users (both sit at the synthetic catalog's ceiling on warm targets, where one user in 3,000
    can decide the fourth digit), and the winner line says no more than that."""
    results, out = real_quickstart
    paired = results["itemlm_minus_sasrec"]
    assert paired["diff"] >= -2 * paired["se"], out
    assert "SASRec wins" not in out
    warm = results["itemlm_minus_sasrec_by_segment"]["warm"]
    assert warm["diff"] >= -2 * warm["se"], out


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met by recipes.ITEMLM_TEXT yet (measured: NDCG@10 0.0000 on the "
                                       "300 new-item targets, as SASRec): its text part stays small beside the "
                                       "SASRec-started ID part within the 2-minute budget; strict, so a recipe "
                                       "that meets it makes this test fail until the mark is removed")
def test_quickstart_text_model_ranks_new_items(real_quickstart):
    """On new items, which SASRec cannot know (untrained vectors), ItemLM with text is above it
    beyond the noise: the synthetic text says which group comes next."""
    results, out = real_quickstart
    cold = results["itemlm_minus_sasrec_by_segment"]["cold"]
    assert cold["diff"] > 2 * cold["se"], out


def test_quiet_quickstart_prints_the_table_and_the_winner_only(tmp_path):
    buf = io.StringIO()
    run(data=None, out=tmp_path, backbone="tiny", n_layers=2, minutes=0.02, console=Console(file=buf, width=200),
        quiet=True)
    out = buf.getvalue()
    assert "on NDCG@10" in out and "ndcg@10" in out
    assert "training" not in out and "next:" not in out and "synthetic catalog" not in out


def test_quickstart_on_a_dataset_without_text_trains_the_id_recipe(tmp_path):
    """A prepared dataset whose items have no text: ItemLM falls back to the ID-only recipe, the
    table has no new-item rows (no --cold-items) and no item is added."""
    ds = make_dataset(n_users=300, n_items=40, seed=1, name="bare")
    bare = SequenceDataset("bare", ItemTable(ds.items.ids, {}), ds.users, ds.sequences, ds.source)
    bare.save(tmp_path / "bare")
    buf = io.StringIO()
    results = run(data=tmp_path / "bare", out=tmp_path / "run", backbone="tiny", n_layers=2, minutes=0.02,
                  console=Console(file=buf, width=200))
    out = buf.getvalue()
    cfg = json.loads((tmp_path / "run" / "itemlm" / "best" / "config.json").read_text())
    assert cfg["items"]["input"] == "id"
    assert "SASRec, all" in out and "ItemLM, all" in out and "new items" not in out
    assert "added_item" not in results and results["itemlm_minus_sasrec_by_segment"] == {}
    assert "itemgen train configs/itemlm-cpu.yaml" in out
