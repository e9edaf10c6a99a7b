"""The cold-start protocol (``itemgen data prepare ... --cold-items F --seed S``, dataset.make_cold)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from itemgen.cli import app
from itemgen.data.dataset import DataError, SequenceDataset, make_cold
from itemgen.data.synthetic import make_dataset
from itemgen.evaluation.segments import dataset_segments

runner = CliRunner()


def _check_invariants(ds: SequenceDataset, base: SequenceDataset) -> None:
    new = set(ds.cold_items.tolist())
    split = ds.split
    for seq in split.train:  # no new item in any training input or label
        assert not new & set(seq.tolist())
    for e in split.valid:  # nor in any validation input or target
        assert e.target not in new and not new & set(e.history.tolist())
    for e in split.test:  # test inputs are old items; only targets may be new
        assert not new & set(e.history.tolist())
    cold_targets = [e for e in split.test if e.target in new]
    assert cold_targets  # the cold segment exists
    assert ds.n_items == base.n_items and ds.items.ids == base.items.ids  # the catalog keeps every item
    m = ds.manifest()["cold_items"]
    assert m["count"] == len(new) == round(0.2 * base.n_items) and m["fraction"] == 0.2
    assert m["cold_test_users"] == len(cold_targets)
    assert m["ids"] == [base.items.ids[i] for i in m["indices"]]
    # every interaction of the base dataset is kept unless it is with a new item
    kept = sum(len(s) for s in ds.sequences)
    assert kept + m["removed_interactions"] == base.n_interactions
    segs = dataset_segments(ds, "test")
    assert segs["cold"].sum() == len(cold_targets) and (segs["cold"] ^ segs["warm"]).all()
    assert segs["pop:0"][segs["cold"]].all()  # new items have no training interaction


def test_cold_split_invariants_and_determinism():
    base = make_dataset(n_users=400, n_items=40, noise=0.1, seed=1)
    ds = make_cold(base, 0.2, seed=3)
    _check_invariants(ds, base)
    again = make_cold(base, 0.2, seed=3)
    assert again.cold_items.tolist() == ds.cold_items.tolist() and again.content_hash() == ds.content_hash()
    other = make_cold(base, 0.2, seed=4)
    assert other.cold_items.tolist() != ds.cold_items.tolist()


def test_cold_items_survive_save_and_load(tmp_path):
    base = make_dataset(n_users=200, n_items=30, noise=0.1, seed=0)
    ds = make_cold(base, 0.2, seed=0)
    ds.save(tmp_path / "d")
    back = SequenceDataset.load(tmp_path / "d")
    assert back.cold_items.tolist() == ds.cold_items.tolist()
    assert back.cold.seed == 0 and back.cold.fraction == 0.2
    assert SequenceDataset.load(tmp_path / "d").content_hash() != base.content_hash()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.001])
def test_bad_fraction(fraction):
    with pytest.raises(DataError, match="cold items"):
        make_cold(make_dataset(n_users=50, n_items=20, seed=0), fraction, 0)


def test_prepare_table_with_cold_items(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp"]
    for u in range(120):
        for t, i in enumerate(rng.choice(25, 6, replace=False)):
            rows.append(f"u{u},i{i},{t}")
    csv = tmp_path / "inter.csv"
    csv.write_text("\n".join(rows) + "\n")
    base_res = runner.invoke(app, ["data", "prepare", "table", str(csv), "--out", str(tmp_path / "base")])
    assert base_res.exit_code == 0, base_res.output
    res = runner.invoke(app, ["data", "prepare", "table", str(csv), "--out", str(tmp_path / "cold"),
                              "--cold-items", "0.2", "--seed", "0"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "cold" / "manifest.json").read_text())
    assert manifest["cold_items"]["count"] == 5 and manifest["cold_items"]["seed"] == 0
    base = SequenceDataset.load(tmp_path / "base")
    ds = SequenceDataset.load(tmp_path / "cold")
    _check_invariants(ds, base)
    res = runner.invoke(app, ["data", "prepare", "table", str(csv), "--out", str(tmp_path / "bad"),
                              "--cold-items", "1.5"])
    assert res.exit_code == 2 and "error: cold items: the fraction must be in (0, 1)" in res.output


def test_a_dataset_with_a_new_item_in_training_is_refused(tmp_path):
    ds = make_cold(make_dataset(n_users=100, n_items=20, noise=0.1, seed=0), 0.2, seed=0)
    new = int(ds.cold_items[0])
    ds.sequences[0] = np.concatenate([[new], ds.sequences[0]])
    with pytest.raises(DataError, match="new \\(cold\\) item before its test target"):
        ds.validate()
