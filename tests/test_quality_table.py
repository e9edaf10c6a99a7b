"""docs/quality.md's generator (benchmarks/quality.py): both protocols labelled side by side, the
published comparisons on the history-kept figures (RecBole and MACRec rank with the history
kept), and a render-only path that rewrites the table from the results file without training."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def metrics(ndcg: float, recall: float) -> dict:
    return {"ndcg@10": ndcg, "ndcg@10_se": 0.002, "recall@10": recall, "mrr": ndcg * 0.9, "top1_share": 0.03}


def row(dataset, variant, kept, masked, *, valid_masked=True, dropout=0.3, **extra):
    return {"dataset": dataset, "variant": variant, "model": variant.split("-")[0], "profile": "cpu",
            "test": metrics(*kept), "test_history_masked": metrics(*masked), "test_by_decoder": {},
            "best_valid": {"ndcg@10": 0.07}, "valid_history_masked": valid_masked, "epochs": 20.0,
            "train_seconds": 10.0, "grid": {"key": "sasrec.dropout", "chosen": dropout,
                                            "runs": [{"value": dropout, "train_seconds": 10.0}]},
            "config": {"sasrec": {"dropout": dropout}}, **extra}


@pytest.fixture
def results():
    return {"rows": [
        # office: the masked-validation SASRec is under the bar (0.0445 / 0.0474 = 0.94x), the
        # kept-validation one above it; kept and masked figures differ so a swap shows
        row("office", "sasrec", (0.0445, 0.0905), (0.0561, 0.0991)),
        row("office", "sasrec-kept", (0.0470, 0.0930), (0.0550, 0.0980), valid_masked=False, dropout=0.5),
        row("office", "itemlm", (0.0474, 0.0938), (0.0578, 0.1015),
            vs_sasrec_paired={"diff": 0.0017, "se": 0.0015}),
        row("instruments", "sasrec", (0.0829, 0.1224), (0.1003, 0.1315)),
        row("instruments", "itemlm", (0.0906, 0.1244), (0.1024, 0.1322)),
    ]}


def cells(text: str, first: str, second: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {first} | {second} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_both_protocols_labelled_in_their_own_columns(quality, results, tmp_path):
    out = tmp_path / "q.md"
    quality.write_table(results, out)
    text = out.read_text()
    header = [c.strip() for c in text.splitlines()[text.splitlines().index("## Headline") + 2].strip("|").split("|")]
    c = cells(text, "office", "itemlm")
    kept, masked = header.index("NDCG@10, published protocol (history kept) (± s.e.)"), \
        header.index("NDCG@10, as served (history masked) (± s.e.)")
    assert c[kept].startswith("0.0474") and c[masked].startswith("0.0578")
    assert c[header.index("Recall@10 (kept)")] == "0.0938" and c[header.index("Recall@10 (masked)")] == "0.1015"
    assert c[header.index("vs SASRec (kept)")] == f"{0.0474 / 0.0445:.2f}x"
    assert c[header.index("valid NDCG@10 (ranked)")] == "0.0700 (masked)"
    assert "RecBole masks" not in text and "is_sequential" in text


def test_sasrec_judged_against_recbole_on_history_kept(quality, results, tmp_path):
    out = tmp_path / "q.md"
    quality.write_table(results, out)
    text = out.read_text()
    office = cells(text, "office", "0.0474")  # the RecBole bar table: dataset, published NDCG@10, ...
    assert office[2:5] == ["dropout 0.3", "0.0445", f"{0.0445 / 0.0474:.3f}x"]
    assert office[5:9] == ["`sasrec-kept`: dropout 0.5", "0.0700", "0.0470", f"{0.0470 / 0.0474:.3f}x"]
    assert office[9] == "met (`sasrec-kept`)"  # 0.99x: judged on the row validated under the reported protocol
    results["rows"] = [r for r in results["rows"] if r["variant"] != "sasrec-kept"]
    quality.write_table(results, out)
    office = cells(out.read_text(), "office", "0.0474")
    assert office[5] == "not run" and office[9] == "NOT met (`sasrec`)"


def test_kept_validation_chooses_among_grids_by_validation_not_test(quality, results, tmp_path):
    # a second grid (batch 64) with the better validation but the worse test: validation decides
    results["rows"].append(row("office", "sasrec-kept-batch64", (0.0440, 0.0900), (0.0540, 0.0970),
                               valid_masked=False, dropout=0.2, best_valid={"ndcg@10": 0.0710}))
    out = tmp_path / "q.md"
    quality.write_table(results, out)
    text = out.read_text()
    office = cells(text, "office", "0.0474")
    assert office[5:8] == ["`sasrec-kept-batch64`: dropout 0.2", "0.0710", "0.0440"]
    assert office[9] == "NOT met (`sasrec-kept-batch64`)"
    assert "| office | sasrec-kept-batch64 |" in text  # its full row beside the other kept-validation rows


def test_published_field_beside_our_history_kept_rows(quality, results, tmp_path):
    out = tmp_path / "q.md"
    quality.write_table(results, out)
    text = out.read_text()
    assert "arXiv 2511.15122" in text and "zhangfw123/MACRec" in text
    assert cells(text, "MACRec", "published (MACRec, Table 2)")[2:5] == ["0.1046", "0.1363", "1.000x"]
    assert cells(text, "TIGER", "published (MACRec, Table 2)")[2:4] == ["0.0950", "0.1221"]
    ours = cells(text, "`itemlm`", "ours, seed 0")
    assert ours[2:5] == ["0.0906", "0.1244", f"{0.0906 / 0.1046:.3f}x"]  # history kept, not the masked 0.1024
    section = text[text.index("## Published field"):]
    assert "office" not in section.split("| method |")[1]  # instruments rows only


def test_render_only_rewrites_the_table_without_training(quality, results, tmp_path, monkeypatch):
    res = tmp_path / "quality.json"
    res.write_text(json.dumps(results))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--render-only", "--results", str(res),
                                      "--data-root", str(tmp_path / "no-datasets-needed")])
    quality.main()
    assert "| office | sasrec-kept |" in (tmp_path / "quality.md").read_text()
    monkeypatch.setattr(sys, "argv", ["quality.py", "--render-only", "--results", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="no results file"):
        quality.main()


def test_repeat_rows_get_their_section_and_the_macrec_target_is_judged(quality, results, tmp_path):
    results["rows"] += [row("instruments", "sasrec-repeat", (0.1001, 0.1310), (0.1004, 0.1315), valid_masked=False),
                        row("instruments", "itemlm-repeat", (0.1050, 0.1370), (0.1052, 0.1372), valid_masked=False,
                            best_valid={"ndcg@10": 0.125}),
                        row("instruments", "itemlm-repeat-x", (0.1100, 0.1300), (0.1101, 0.1301), valid_masked=False,
                            best_valid={"ndcg@10": 0.120})]
    out = tmp_path / "q.md"
    quality.write_table(results, out)
    text = out.read_text()
    section = text[text.index("## A learned awareness of repeats"):text.index("## Published field")]
    assert "| instruments | itemlm-repeat |" in section and "| instruments | sasrec-repeat |" in section
    assert "Earlier rows" not in text  # not filed with the old rows
    field = text[text.index("## Published field"):]
    # validation picks itemlm-repeat (0.125 > 0.120), though itemlm-repeat-x has the higher test NDCG
    assert "- `itemlm-repeat` (validation's choice, history kept) (ours, seed 0): NDCG@10 0.1050" in field
    assert "target met, 1.05x goal not met" in field
    assert "- `itemlm-repeat-x` (ours, seed 0): NDCG@10 0.1100 (1.052x), Recall@10 0.1300 (0.954x): target NOT met" in field
    assert "- `itemlm` (ours, seed 0): NDCG@10 0.0906" in field and "target NOT met" in field


def test_two_level_rows_judged_against_the_recipe_under_both_protocols(quality, results, tmp_path):
    """Tables 4-5: each clustering's exact, Structure and ANN cells against the full-softmax
    `itemlm` row of the same dataset, with met / NOT met per target."""
    def agree(kept, masked, beyond=0):
        return {p: {"users": 4905, "users_differ": n, "users_differ_as_sets": n, "users_differ_in_scores": beyond,
                    "mean_overlap": 1.0} for p, n in (("history_kept", kept), ("history_masked", masked))}

    two = row("office", "two-level-kmeans", (0.0465, 0.09), (0.0570, 0.10),  # 0.981x kept, 0.986x masked
              test_by_decoder={"structure": metrics(0.0465, 0.09), "ann": metrics(0.0440, 0.09)},  # ANN 0.928x
              test_by_decoder_history_masked={"structure": metrics(0.0570, 0.10), "ann": metrics(0.0560, 0.10)},
              topk_vs_exact={"structure": agree(0, 0), "ann": agree(900, 800, 700)}, clusters={"clusters": 51},
              decode_latency={"exact": {"decode_ms_batch1_p50": 0.5, "decode_ms_per_user_batch64": 0.01}})
    rnd = row("office", "two-level-random", (0.0450, 0.09), (0.0570, 0.10),  # 0.949x kept
              test_by_decoder={"structure": metrics(0.0450, 0.09)},
              test_by_decoder_history_masked={"structure": metrics(0.0570, 0.10)},
              topk_vs_exact={"structure": agree(2, 0, 1)})
    results["rows"] += [two, rnd]
    path = tmp_path / "quality.md"
    quality.write_table(results, path)
    text = path.read_text()
    section = text[text.index("## Two-level softmax"):]
    assert "two-level" not in text[:text.index("## Two-level softmax")]  # not among the earlier rows
    line = next(x for x in section.splitlines() if x.startswith("| office | kmeans (51) | exact |"))
    assert "0.981x" in line and ">= 0.97x: kept met, masked met" in line and "| 0.50 | 0.010 |" in line
    line = next(x for x in section.splitlines() if x.startswith("| office | kmeans (51) | ann |"))
    assert ">= 0.95x: kept NOT met, masked met" in line and "900 / 800 of 4905; beyond ties 700 / 800" not in line
    assert "900 / 800 of 4905; beyond ties 700 / 700" in line
    assert "top-10 = exact: met" in next(x for x in section.splitlines() if x.startswith("| office | kmeans (51) | structure |"))
    line = next(x for x in section.splitlines() if x.startswith("| office | random | structure |"))
    assert "2 / 0 of 4905; beyond ties 1 / 1" in line and "top-10 = exact: NOT met" in line
    assert "kept NOT met" in next(x for x in section.splitlines() if x.startswith("| office | random | exact |"))
    assert section.count("| office | none (full softmax, `itemlm`) | exact | 0.0474 |") == 1


def test_rows_from_before_the_repeat_bias_compare_with_their_own_recipe(quality, results, tmp_path):
    """The recipes gained the repeat bias: rows without it (the recipe before it, the abl-* rows)
    compare with the SASRec without it; the two-level rows, which carry it, with the recipe; the recipe
    rows with it compare with each other; the RecBole bar's kept-validation choice includes the
    SASRec with the bias (validation decides between them)."""
    bias = {"repeat": {"bias": "recency"}, "sasrec": {"dropout": 0.3}}
    results["rows"] = [r for r in results["rows"] if r["dataset"] == "office" and r["variant"] != "itemlm"]
    results["rows"][0]["variant"] = "sasrec-no-repeat-bias"  # 0.0445 kept
    results["rows"] += [
        row("office", "sasrec", (0.0570, 0.0990), (0.0575, 0.0995), config=bias),
        row("office", "itemlm", (0.0600, 0.1040), (0.0603, 0.1045), config=bias),
        row("office", "itemlm-no-repeat-bias", (0.0474, 0.0938), (0.0578, 0.1015)),
        row("office", "sasrec-repeat", (0.0577, 0.0991), (0.0577, 0.0991), valid_masked=False, config=bias,
            best_valid={"ndcg@10": 0.0731}),
        row("office", "two-level-kmeans", (0.0465, 0.09), (0.0570, 0.10), clusters={"clusters": 51}, config=bias),
        row("office", "two-level-kmeans-no-repeat-bias", (0.0410, 0.08), (0.0510, 0.09), clusters={"clusters": 51})]
    out = tmp_path / "q.md"
    quality.write_table(results, out)
    text = out.read_text()
    lines = text.splitlines()
    head = [c.strip() for c in lines[lines.index("## Headline") + 2].strip("|").split("|")]
    vs = head.index("vs SASRec (kept)")
    assert cells(text, "office", "itemlm")[vs] == f"{0.0600 / 0.0570:.2f}x"
    assert cells(text, "office", "itemlm-no-repeat-bias")[vs] == f"{0.0474 / 0.0445:.2f}x"
    section = text[text.index("## Two-level softmax"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    # the two-level rows carry the bias (in level 2): the recipe with it is their reference
    assert "| office | none (full softmax, `itemlm`) | exact | 0.0600 |" in section
    assert f"| office | kmeans (51) | exact | 0.0465 | 0.0900 | 0.0418 | {0.0465 / 0.0600:.3f}x |" in section
    assert "0.0410" not in section  # the row from before the bias is not in the paper's table
    office = cells(text, "office", "0.0474")  # RecBole: validation picks sasrec-repeat (0.0731 > 0.0700)
    assert office[5:8] == ["`sasrec-repeat`: dropout 0.3", "0.0731", "0.0577"] and office[9] == "met (`sasrec-repeat`)"


def test_teacher_rows_resolve_to_their_checkpoints(quality, tmp_path):
    """distill.teacher names rows: a row's best checkpoint, a tuned row's chosen one; paths pass."""
    (tmp_path / "itemlm-seed1" / "best").mkdir(parents=True)
    (tmp_path / "sasrec").mkdir()
    chosen = tmp_path / "sasrec" / "sasrec.dropout=0.5" / "best"
    (tmp_path / "sasrec" / "selected.json").write_text(json.dumps({"value": 0.5, "checkpoint": str(chosen)}))
    assert quality.row_checkpoint(tmp_path, "itemlm-seed1", "office", "x") == str(tmp_path / "itemlm-seed1" / "best")
    assert quality.row_checkpoint(tmp_path, "sasrec", "office", "x") == str(chosen)
    assert quality.row_checkpoint(tmp_path, "/ckpts/teacher", "office", "x") == "/ckpts/teacher"
    with pytest.raises(SystemExit, match="itemlm-seed2, which has not run here.*--variants itemlm --seed 2"):
        quality.row_checkpoint(tmp_path, "itemlm-seed2", "office", "x")
    assert quality.recipe_of("itemlm", "itemlm-ensemble") == "itemlm"
    assert quality.recipe_of("sasrec", "sasrec-ensemble-seed2") == "sasrec-seed2"
    model, extra = quality.VARIANTS["itemlm-ensemble"]
    assert model == "itemlm" and extra["distill"]["teacher"].split(",") == ["itemlm", "itemlm-seed1", "itemlm-seed2"]


def test_ensemble_rows_get_their_section_with_the_paired_difference_from_the_recipe(quality, results, tmp_path):
    results["rows"].append(row("instruments", "itemlm-ensemble-w0.9", (0.1070, 0.1390), (0.1072, 0.1393),
                               vs_recipe_paired={"diff": 0.0011, "se": 0.0006}))
    out = tmp_path / "q.md"
    quality.write_table(results, out)
    text = out.read_text()
    section = text.split("## The recipe distilled from its three seeds")[1].split("\n## ")[0]
    assert cells(section, "instruments", "itemlm-ensemble-w0.9")[-1] == "+0.0011 ± 0.0006"
    assert "Earlier rows" not in text
    field = text.split("## Published field")[1].split("\n## ")[0]
    assert "`itemlm-ensemble-w0.9`" in field and "0.1070" in field


def test_two_level_rows_over_seeds_judged_on_the_ratio_of_means(quality, results, tmp_path):
    """Each seed against the recipe of its own seed, and the bar judged on the means: a cell can be
    met on the mean while a seed misses it, and a ratio just below the bar shows its 4th decimal."""
    results["rows"] += [
        row("office", "itemlm-seed1", (0.0500, 0.09), (0.0500, 0.09)),
        row("office", "two-level-random-level1-refine", (0.0460, 0.09), (0.0460, 0.09)),  # 0.970x of 0.0474
        row("office", "two-level-random-level1-refine-seed1", (0.0490, 0.09), (0.0490, 0.09)),  # 0.980x
        row("office", "two-level-frequency", (0.0400, 0.09), (0.0400, 0.09)),  # no other seed: no line
        row("office", "two-level-frequency-seed1", (0.0480, 0.09), (0.0480, 0.09)),  # 0.960x
        row("office", "two-level-kmeans-seed2", (0.0480, 0.09), (0.0480, 0.09)),  # seed 2 has no itemlm
    ]
    path = tmp_path / "quality.md"
    quality.write_table(results, path)
    text = path.read_text()
    refine = cells(text, "office", "two-level-random-level1-refine")
    assert refine[2:] == ["2", "0: 0.970x, 1: 0.980x", "2 of 2", "0.0475", "0.0487", "0.975x", "met"]
    freq = cells(text, "office", "two-level-frequency")
    # (0.0400 + 0.0480) / (0.0474 + 0.0500) = 0.9035x: NOT met though seed 1 alone is 0.960x
    assert freq[2:] == ["2", "0: 0.844x, 1: 0.960x", "0 of 2", "0.0440", "0.0487", "0.903x", "NOT met"]
    assert "| office | two-level-kmeans |" not in text
    assert quality.bar_ratio(0.96995) == "0.9699x" and quality.bar_ratio(0.9701) == "0.970x"


def test_each_seed_takes_its_own_validation_choice_of_a_cell(quality, results, tmp_path):
    """Per seed, the two-level row of a clustering that validates best among the rows run at that
    seed; the bar on the ratio of the chosen rows' means to the same seeds' recipe."""
    def two(variant, kept, valid):
        return row("office", variant, (kept, 0.09), (kept, 0.09), best_valid={"ndcg@10": valid})

    results["rows"] += [
        row("office", "itemlm-seed1", (0.0500, 0.09), (0.0500, 0.09)),
        two("two-level-random", 0.0300, 0.060),
        two("two-level-random-level1-refine", 0.0460, 0.075),  # seed 0 chooses it
        two("two-level-random-distill", 0.0470, 0.070),  # better on test, not on validation
        two("two-level-random-seed1", 0.0490, 0.074),  # seed 1 chooses it
        two("two-level-random-level1-refine-seed1", 0.0400, 0.073),
        two("two-level-kmeans-seed1", 0.0490, 0.074),  # another clustering: its own cell
    ]
    path = tmp_path / "quality.md"
    quality.write_table(results, path)
    text = path.read_text()
    c = cells(text[text.index("Each cell at validation's choice on each seed:"):], "office", "random")
    assert c[2:] == ["2", "0: `two-level-random-level1-refine` 0.970x, 1: `two-level-random` 0.980x",
                     "0.0475", "0.0487", "0.975x", "met"]
    assert "| office | kmeans |" not in text  # one seed only: no line


def test_paper_setting_cell_takes_its_validation_choice_among_training_choices_only(quality, results, tmp_path):
    """Issue 21's headline: per cell, the paper's-setting row (no lever) that validates best, judged
    against the recipe, with the full softmax at the chosen row's backbone lr beside it."""
    def two(variant, kept, valid, **extra):
        return row("office", variant, (kept, 0.09), (kept, 0.09), best_valid={"ndcg@10": valid}, **extra)

    same = {"history_kept": {"users_differ_in_scores": 0}, "history_masked": {"users_differ_in_scores": 0}}
    results["rows"] += [  # office itemlm: 0.0474 kept, 0.0578 masked
        two("two-level-kmeans", 0.0465, 0.070),  # better on test, not on validation
        two("two-level-kmeans-backbone-lr-3e-4", 0.0455, 0.072, topk_vs_exact={"structure": same},
            test_by_decoder={"ann": metrics(0.0460, 0.09)}),  # validation's choice: 0.960x
        two("two-level-kmeans-level1-refine", 0.0474, 0.090),  # a lever: not the paper's setting
        two("itemlm-backbone-lr-3e-4", 0.0460, 0.075),  # the full softmax at that lr
        two("two-level-random", 0.0470, 0.060),  # the only row of its cell: 0.992x, met
    ]
    path = tmp_path / "quality.md"
    quality.write_table(results, path)
    text = path.read_text()
    section = text[text.index("### The paper's setting at validation's choice"):]
    c = cells(section, "office", "kmeans")
    assert c[3:] == ["`two-level-kmeans-backbone-lr-3e-4`", "0.0455", "0.960x / 0.787x",
                     "0.989x (valid 0.0750, test 0.0460)", "all users", "0.970x", "NOT met"]
    assert "level1" not in c[2] and "`two-level-kmeans` 0.0700" in c[2]
    c = cells(section, "office", "random")
    assert c[3] == "`two-level-random`" and c[5:7] == ["0.992x / 0.813x", "- (the recipe's lr)"]
    assert c[-1] == "met" and "**1 of 2 cells**" in section
    assert "itemlm-backbone-lr-3e-4" not in text[:text.index("## Two-level softmax")]  # a control, not a row of its own
