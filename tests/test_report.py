"""itemgen report: tolerant readers over differently shaped result files; numbers a file does
not hold are written "not measured"; one latency-vs-NDCG plot per dataset with both figures."""

import json

import pytest
from typer.testing import CliRunner

from itemgen.evaluation.report import NOT_MEASURED, gather, write_report

FULL = {"recall@1": 0.0123, "recall@5": 0.03, "recall@10": 0.0456, "ndcg@10": 0.0289, "mrr": 0.0211, "users": 100}


def write(tmp_path, name, blob):
    (tmp_path / name).write_text(blob if isinstance(blob, str) else json.dumps(blob))


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    # quality.json: rows with their own command/commit and a config
    write(d, "quality.json", {"rows": [
        {"dataset": "scientific", "variant": "sasrec", "model": "sasrec", "test": FULL, "train_seconds": 12.5,
         "command": "benchmarks/quality.py --datasets scientific", "git_commit": "aaa111", "date": "2026-11-26",
         "hardware": {"cores": 2, "gpu": None}, "config": {"model": "sasrec", "train": {"max_steps": 2000}}},
        # the headline protocol (history masked) wins over the history-kept figure
        {"dataset": "scientific", "variant": "itemlm-masked", "test": FULL,
         "test_history_masked": {**FULL, "ndcg@10": 0.0333}}]})
    # frozen.json-like: file-level command, a profile dict, per-method dicts, MRR and train time absent
    write(d, "frozen.json", {"command": "benchmarks/frozen.py --data X", "git_commit": "bbb222",
                             "dataset": "Scientific",
                             "profile": {"device": "cpu", "backbone": "smollm2-135m", "n_layers": 2, "steps": 80},
                             "results": {"frozen": {"method": "itemlm-frozen", "latency_ms": 20.5,
                                                    "test": {"recall@1": 0.01, "recall@10": 0.05, "ndcg@10": 0.03}}}})
    # latency only, per dataset by key
    write(d, "latency.json", {"command": "benchmarks/latency.py", "git_commit": "ccc333",
                              "datasets": {"office": {"itemlm": {"latency": {"p50_ms": 7.25}}}}})
    # a dataset described by a dict, rows in a list under a generic key
    write(d, "sampled.json", {"command": "benchmarks/sampled.py", "git_commit": "ddd444",
                              "dataset": {"name": "Office", "path": "/x"},
                              "runs": [{"method": "warp/uniform", "test": {"ndcg@10": 0.02}}]})
    # unnamed list rows told apart by a setting; the dataset inside the profile; a *_ms key by pattern
    write(d, "serve.json", {"command": "benchmarks/serve_load.py", "git_commit": "eee555",
                            "profile": {"dataset": "Office"},
                            "levels": [{"clients": 1, "p50_ms": 5.5}, {"clients": 8, "p50_ms": 9.0}],
                            "decode": {"ann": {"batch1_query_ms": 0.75}}})
    write(d, "broken.json", "{not json")
    write(d, "empty.json", {"command": "x", "notes": ["nothing measured"]})
    return d


def table_row(text, method):
    rows = [line for line in text.splitlines() if line.startswith(f"| {method} |")]
    assert len(rows) == 1, (method, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_report_marks_missing_numbers_and_plots(results, tmp_path):
    info = write_report(results, tmp_path / "docs" / "results.md")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert info["datasets"] == ["office", "scientific"]
    assert table_row(text, "levels/clients=1")[7] == "5.50" and table_row(text, "levels/clients=8")[7] == "9.00"
    assert table_row(text, "decode/ann")[7] == "0.75"
    warp = table_row(text, "warp/uniform")
    assert warp[4] == "0.0200" and warp[2] == NOT_MEASURED
    # columns: method, file, R@1, R@10, NDCG@10, MRR, train s, latency, profile, src
    sas = table_row(text, "sasrec")
    assert sas[2:6] == ["0.0123", "0.0456", "0.0289", "0.0211"] and sas[6] == "12.5" and sas[7] == NOT_MEASURED
    assert "max_steps=2000" in sas[8] and "cpu x2" in sas[8]
    assert table_row(text, "itemlm-masked")[4] == "0.0333"
    fro = table_row(text, "itemlm-frozen")
    assert fro[2:5] == ["0.0100", "0.0500", "0.0300"] and fro[5] == NOT_MEASURED and fro[6] == NOT_MEASURED
    assert fro[7] == "20.50" and "backbone=smollm2-135m" in fro[8] and "n_layers=2" in fro[8]
    lat = table_row(text, "itemlm")
    assert lat[2:7] == [NOT_MEASURED] * 5 and lat[7] == "7.25" and lat[8] == NOT_MEASURED
    # every row points at its command and commit
    for cmd, commit in [("benchmarks/quality.py --datasets scientific", "aaa111"),
                        ("benchmarks/frozen.py --data X", "bbb222"), ("benchmarks/latency.py", "ccc333")]:
        assert f"`{cmd}` at commit `{commit}`" in text
    # a plot only where some method has both latency and NDCG@10
    assert (tmp_path / "docs" / "results_scientific.png").stat().st_size > 1000
    assert not (tmp_path / "docs" / "results_office.png").exists()
    assert "results_scientific.png" in text and "no plot" in text
    assert any("broken.json" in n and "not valid JSON" in n for n in info["notes"])
    assert any("empty.json" in n for n in info["notes"])


def test_explicit_rows_and_missing_folder(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    write(d, "l2d.json", {"command": "c", "git_commit": "g", "report_rows": [
        {"dataset": "office", "method": "title (l2d_global)", "recall@10": 0.2, "latency_ms": 3.0}]})
    rows, notes = gather(d)
    assert len(rows) == 1 and rows[0].metrics == {"recall@10": 0.2} and rows[0].latency_ms == 3.0
    assert rows[0].command == "c" and not notes
    with pytest.raises(FileNotFoundError, match="results folder not found"):
        gather(tmp_path / "nope")


def test_cli(results, tmp_path):
    from itemgen.cli import app

    out = tmp_path / "out" / "results.md"
    r = CliRunner().invoke(app, ["report", "--results", str(results), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "8 rows over 2 datasets" in r.output
    r = CliRunner().invoke(app, ["report", "--results", str(tmp_path / "missing"), "--out", str(out)])
    assert r.exit_code == 2 and "results folder not found" in r.output


def test_breakdowns_and_measurement_repeats_are_not_methods(tmp_path):
    """text.json's per-segment and history-kept rows, and serve_load's per-round repeats, would
    bury the methods (the report once grew to 700 lines): one row per method, all users, masked."""
    d = tmp_path / "results"
    d.mkdir()
    row = {"dataset": "office", "variant": "itemlm-text", "split": "standard", "segment": "all",
           "protocol": "masked", "ndcg@10": 0.066, "recall@10": 0.11}
    write(d, "text.json", {"rows": [row, {**row, "segment": "tail", "ndcg@10": 0.018},
                                    {**row, "protocol": "kept", "ndcg@10": 0.049},
                                    {**row, "split": "cold10", "ndcg@10": 0.057}]})
    write(d, "serve.json", {"profile": {"dataset": "Office"}, "levels": [{"clients": 8, "p50_ms": 9.0}],
                            "batching_rounds": [{"batched": {"p50_ms": 5.0}, "unbatched": {"p50_ms": 7.0}}]})
    rows, _ = gather(d)
    assert sorted((r.source, r.method, r.metrics.get("ndcg@10")) for r in rows) == [
        ("serve", "levels/clients=8", None),
        ("text", "itemlm-text", 0.066), ("text", "itemlm-text [cold10 split]", 0.057)]
