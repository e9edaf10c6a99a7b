import numpy as np

from itemgen.data.dataset import ItemTable, SequenceDataset, leave_one_out


def test_leave_one_out():
    seqs = [np.array([0, 1, 2, 3]), np.array([4, 5]), np.array([1, 2, 3])]
    s = leave_one_out(seqs)
    assert [x.tolist() for x in s.train] == [[0, 1], [4, 5], [1]]
    assert [(e.user, e.history.tolist(), e.target) for e in s.valid] == [(0, [0, 1], 2), (2, [1], 2)]
    assert [(e.user, e.history.tolist(), e.target) for e in s.test] == [(0, [0, 1, 2], 3), (2, [1, 2], 3)]
    assert s.n_train_only_users == 1
    # the target never appears in its own prompt position: history ends right before it
    for e in s.test:
        assert seqs[e.user][len(e.history)] == e.target


def test_save_load_round_trip_and_hash(tmp_path):
    items = ItemTable(["a", "b", "c"], {"title": ["A", None, "C"]})
    ds = SequenceDataset("t", items, ["u1", "u2"], [np.array([0, 1, 2]), np.array([2, 1])])
    ds.save(tmp_path / "d")
    back = SequenceDataset.load(tmp_path / "d")
    assert back.items.ids == ["a", "b", "c"] and back.items.fields["title"] == ["A", None, "C"]
    assert back.content_hash() == ds.content_hash()
    assert back.manifest()["eval_users"] == 1 and back.manifest()["train_only_users"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
