"""The command line end to end on a tiny prepared dataset, and its errors."""

import json

import pytest
from typer.testing import CliRunner

from itemgen.cli import app
from itemgen.data.synthetic import make_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    make_dataset(n_users=300, n_items=30, noise=0.0, seed=2).save(data)
    cfg = root / "sasrec.yaml"
    cfg.write_text(f"model: sasrec\ndata:\n  path: {data}\n  max_history: 10\nsasrec:\n  dropout: 0.0\n"
                   f"train:\n  out: {root / 'run'}\n  max_steps: 60\n  eval_every: 30\n  lr: 0.005\n  progress: false\n")
    res = runner.invoke(app, ["train", str(cfg)])
    assert res.exit_code == 0, res.output
    return root, data, root / "run" / "best"


def test_train_evaluate_recommend(run):
    root, data, ckpt = run
    res = runner.invoke(app, ["evaluate", str(ckpt), "--split", "test"])
    assert res.exit_code == 0, res.output
    report = json.loads((ckpt / "eval_test.json").read_text())
    assert report["metrics"]["users"] == 300 and report["split"] == "test"
    assert report["git_commit"] is None or len(report["git_commit"]) == 40
    res = runner.invoke(app, ["recommend", str(ckpt), "--history", "I00001,I00002", "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    recs = json.loads(res.output)
    assert len(recs) == 3 and {"id", "score", "title"} <= recs[0].keys()


def test_evaluate_names_reports_by_protocol_and_reports_segments(run):
    """Issue 22, defect 17: --exclude-history wrote the same eval_test.json as the unmasked run."""
    root, data, ckpt = run
    for args in ([], ["--exclude-history"]):
        res = runner.invoke(app, ["evaluate", str(ckpt), *args])
        assert res.exit_code == 0, res.output
    kept = json.loads((ckpt / "eval_test.json").read_text())
    masked = json.loads((ckpt / "eval_test_history_masked.json").read_text())
    assert kept["exclude_history"] is False and masked["exclude_history"] is True
    assert "by segment" in res.output and "hist:short" in res.output
    seg = masked["metrics"]["segments"]
    assert {"head", "hist:short", "hist:long"} <= set(seg) and "cold" not in seg  # 30 items: no tail
    assert sum(v["users"] for k, v in seg.items() if k.startswith("pop:")) == masked["metrics"]["users"] == 300
    assert seg["head"]["users"] == 300 and {"ndcg@10", "recall@10", "mrr", "users"} <= set(seg["head"])
    assert masked["segment_rules"]["tail_max"] == 4


@pytest.mark.parametrize("args, message", [
    (["train", "model=sasrec", "train.lr=-1"], "train.lr must be > 0"),
    (["train", "model=sasrec", "train.bogus=1"], "unknown config key in train: bogus"),
    (["train", "model=sasrec", "data.path=/nonexistent/x"], "not a prepared dataset"),
    (["train", "model=sasrec"], "data.path is not set"),
])
def test_bad_train_input(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output


def test_bad_recommend_and_evaluate_input(run, tmp_path):
    root, data, ckpt = run
    res = runner.invoke(app, ["recommend", str(ckpt), "--history", "I00001,BOGUS1,BOGUS2"])
    assert res.exit_code == 2 and "unknown item ids: BOGUS1, BOGUS2" in res.output
    res = runner.invoke(app, ["recommend", str(ckpt), "--history", "I00001", "-k", "0"])
    assert res.exit_code == 2 and "k must be between 1 and the catalog size 30" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert res.exit_code == 2 and "not an itemgen checkpoint" in res.output
    res = runner.invoke(app, ["evaluate", str(ckpt), "--split", "train"])
    assert res.exit_code == 2 and "--split must be test or valid" in res.output
    other = tmp_path / "other"
    make_dataset(n_users=300, n_items=30, noise=0.0, seed=9).save(other)
    res = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(other)])
    assert res.exit_code == 2 and "item indices would not match" in res.output


def test_quiet_and_json_modes_silence_transformers_progress_bars():
    """Loading a text encoder drew transformers' "Loading weights" bar even under --quiet."""
    from transformers.utils import logging as hf_logging

    from itemgen.cli.common import reporting

    try:
        reporting(True, "text")
        assert not hf_logging.is_progress_bar_enabled()
        reporting(False, "json")
        assert not hf_logging.is_progress_bar_enabled()
        reporting(False, "text")
        assert hf_logging.is_progress_bar_enabled()
    finally:
        reporting(False, "text")
