"""Choosing a config value by validation (itemgen tune, training/tune.py)."""

import json

import pytest
from typer.testing import CliRunner

from itemgen.cli import app
from itemgen.core.config import ConfigError, from_dict, with_values
from itemgen.data.synthetic import make_dataset
from itemgen.training.tune import grid_search, read_selected

runner = CliRunner()


@pytest.fixture(scope="module")
def data():
    return make_dataset(n_users=120, n_items=20, noise=0.0, seed=4)


def sasrec_cfg(out, **train):
    return from_dict({"model": "sasrec", "data": {"path": "x", "max_history": 8}, "sasrec": {"hidden": 16},
                      "train": {"out": str(out), "max_steps": 30, "eval_every": 15, "eval_users": None,
                                "lr": 0.01, "warmup_steps": 0, "progress": False, **train}})


def test_grid_search_keeps_the_best_validation_run(data, tmp_path):
    # lr 1e-6 barely moves from random: the trained value must win whatever the order
    res = grid_search(sasrec_cfg(tmp_path), "train.lr", [1e-6, 0.01], dataset=data)
    scores = [r["best_valid"]["ndcg@10"] for r in res.runs]
    assert res.value == 0.01 and scores[1] == max(scores) and scores[1] > scores[0]
    assert [r["out"] for r in res.runs] == [str(tmp_path / "train.lr=1e-06"), str(tmp_path / "train.lr=0.01")]
    sel = read_selected(tmp_path)
    assert sel["value"] == 0.01 and sel["checkpoint"] == str(tmp_path / "train.lr=0.01" / "best")
    assert (tmp_path / "train.lr=0.01" / "best" / "model.safetensors").is_file()


def test_bad_values_fail_before_any_training(data, tmp_path):
    with pytest.raises(ConfigError, match="sasrec.dropout"):
        grid_search(sasrec_cfg(tmp_path), "sasrec.dropout", [0.1, "lots"], dataset=data)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="unknown config key"):
        with_values(sasrec_cfg(tmp_path), {"sasrec.dropuot": 0.1})
    with pytest.raises(FileNotFoundError, match="itemgen tune"):
        read_selected(tmp_path)


def test_cli(tmp_path):
    data = tmp_path / "data"
    make_dataset(n_users=100, n_items=20, noise=0.0, seed=2).save(data)
    cfg = tmp_path / "sasrec.yaml"
    cfg.write_text(f"model: sasrec\ndata:\n  path: {data}\nsasrec:\n  hidden: 16\n"
                   f"train:\n  max_steps: 10\n  eval_every: 10\n  progress: false\n")
    res = runner.invoke(app, ["tune", str(cfg), "sasrec.dropout=0.0,0.3", f"train.out={tmp_path / 'run'}",
                              "--log-format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["key"] == "sasrec.dropout" and out["value"] in (0.0, 0.3) and len(out["runs"]) == 2
    assert json.loads((tmp_path / "run" / "selected.json").read_text())["value"] == out["value"]
    res = runner.invoke(app, ["tune", str(cfg), "sasrec.dropout"])
    assert res.exit_code == 2 and "section.key=v1,v2" in res.output
