"""The recipes the quickstart and the quality benchmark use are the ones configs/*.yaml hold."""

from pathlib import Path

import pytest

from itemgen.cli.quickstart import winner_line
from itemgen.core.config import from_dict, load_yaml
from itemgen.core.recipes import ITEMLM_CPU, ITEMLM_GPU, ITEMLM_TEXT, SASREC, merge
from itemgen.models.item_repr import uses_text
from itemgen.models.new_items import addable_problem

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name,recipe", [("sasrec.yaml", SASREC), ("itemlm-cpu.yaml", ITEMLM_CPU),
                                         ("itemlm-gpu.yaml", ITEMLM_GPU), ("itemlm-text.yaml", ITEMLM_TEXT)])
def test_config_files_hold_the_measured_recipes(name, recipe):
    values = load_yaml((CONFIGS / name).read_text())
    values["train"].pop("out")
    fill = {"items": {"init_from": "runs/sasrec/best"}} if recipe["model"] == "itemlm" else {}
    assert from_dict(merge(values, fill)) == from_dict(merge(recipe, fill))


def test_recipes_are_valid_configs():
    for recipe in (SASREC, ITEMLM_CPU, ITEMLM_GPU, ITEMLM_TEXT):
        from_dict(merge(recipe, {"items": {"init_from": "runs/sasrec/best"}}) if recipe is not SASREC else recipe)


def test_text_recipe_is_the_cpu_recipe_with_a_text_view():
    """ITEMLM_TEXT differs from ITEMLM_CPU in the items section only, and the model it builds can
    take new items from their text (models/new_items.py), whatever fusion design wins."""
    text, cpu = from_dict(merge(ITEMLM_TEXT, {"items": {"init_from": "x"}})), from_dict(
        merge(ITEMLM_CPU, {"items": {"init_from": "x"}}))
    assert text.itemlm == cpu.itemlm and text.train == cpu.train and text.data == cpu.data
    assert addable_problem(text) is None and addable_problem(cpu) is not None
    assert uses_text(text.items) and text.items.text_encoder and text.items.text_fields


def test_winner_line():
    assert winner_line({"itemlm": {"ndcg@10": 0.5}, "sasrec": {"ndcg@10": 0.4}}) == \
        "ItemLM wins on NDCG@10: 0.5000 vs SASRec 0.4000 (+25.0%)"
    assert winner_line({"itemlm": {"ndcg@10": 0.2}, "sasrec": {"ndcg@10": 0.4}}) == \
        "SASRec wins on NDCG@10: 0.4000 vs ItemLM 0.2000 (+100.0%)"
    assert winner_line({"itemlm": {"ndcg@10": 0.3}, "sasrec": {"ndcg@10": 0.3}}).startswith("ItemLM and SASRec tie")
    # a paired difference within 2 standard errors is no win; beyond it, it is
    close = {"itemlm": {"ndcg@10": 0.9031}, "sasrec": {"ndcg@10": 0.9032}}
    assert winner_line(close, {"diff": -1e-4, "se": 1e-4}) == \
        "ItemLM and SASRec tie on NDCG@10 (0.9031 vs 0.9032; difference -0.0001 ± 0.0001 s.e. over the same users)"
    assert winner_line(close, {"diff": -1e-4, "se": 4e-5}).startswith("SASRec wins")


def test_the_text_benchmark_measures_the_text_recipe():
    """benchmarks/text.py's itemlm-match-drop-lex-floors row is recipes.ITEMLM_TEXT (the recipe a user runs is
    the recipe that was measured)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("text_bench", Path(__file__).parents[1] / "benchmarks" / "text.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, extra, _ = bench.VARIANTS["itemlm-match-drop-lex-floors"]
    measured = from_dict(merge(merge(ITEMLM_CPU, extra), {"items": {"init_from": "x"}}))
    assert model == "itemlm" and measured == from_dict(merge(ITEMLM_TEXT, {"items": {"init_from": "x"}}))
    assert "itemlm-match-drop-lex-floors" in bench.DEFAULT_VARIANTS
