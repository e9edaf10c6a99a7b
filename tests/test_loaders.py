"""Dataset loaders (itemgen.data.loaders) and the `itemgen data` commands (itemgen.cli.data)."""

from __future__ import annotations

import gzip
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from itemgen.data.dataset import DataError, SequenceDataset
from itemgen.data.loaders import (
    amazon2018_urls,
    download_amazon2018,
    load_amazon2018,
    load_lcrec,
    load_table,
    prepare,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def seqs_by_id(ds: SequenceDataset) -> dict[str, list[str]]:
    return {u: [ds.items.ids[j] for j in s] for u, s in zip(ds.users, ds.sequences)}


# ---------------------------------------------------------------------------------------------
# fixtures written by the tests
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def lcrec_dir(tmp_path: Path) -> Path:
    d = tmp_path / "lc"
    d.mkdir()
    (d / "Toy.inter.json").write_text(json.dumps({"7": [0, 1, 2], "3": [2, 1], "5": [1, 0, 2, 1]}))
    (d / "Toy.item.json").write_text(json.dumps({
        "0": {"title": "AT&amp;T  Phone", "description": "", "brand": "AT&T",
              "categories": "Office Electronics, Telephones & Accessories, Corded Telephones"},
        "1": {"title": "Staples", "description": "Heavy <b>duty</b>", "brand": "",
              "categories": "Industrial & Scientific,Tapes, Adhesives & Sealants,Adhesive Tapes"},
        "2": {"title": "Glue", "description": "", "brand": "Elmer's", "categories": ""},
    }))
    return d


TABLE_ROWS = [  # user, item, time; ties must keep this order
    ("u1", "i3", 100),
    ("u1", "i1", 100),
    ("u2", "i2", 50),
    ("u1", "i2", 50),
    ("u2", "i1", 50),
    ("u1", "i4", 200),
]
TABLE_EXPECTED = {"u1": ["i2", "i3", "i1", "i4"], "u2": ["i2", "i1"]}


def write_table(path: Path, rows, header=("user_id", "item_id", "timestamp")) -> Path:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = list(zip(*rows))
        pq.write_table(pa.table({h: list(c) for h, c in zip(header, cols)}), path)
        return path
    sep = "\t" if path.suffix == ".tsv" else ","
    path.write_text("\n".join(sep.join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def write_jsonl_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture
def amazon_files(tmp_path: Path) -> tuple[Path, Path]:
    r = lambda u, a, t: json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0})  # noqa: E731
    reviews = write_jsonl_gz(tmp_path / "Toy_Category_5.json.gz", [
        r("A", "X1", 30), r("A", "X2", 10), r("B", "X2", 5), r("A", "X3", 30),
        r("A", "X2", 10),  # exact duplicate -> dropped
        r("B", "X1", 5),   # tie with B/X2: file order kept
        r("C", "X4", 1),
    ])
    meta = write_jsonl_gz(tmp_path / "meta_Toy_Category.json.gz", [
        json.dumps({"asin": "X1", "title": "AT&amp;T Phone", "brand": "AT&T", "price": "$12.99",
                    "category": ["Office Products", "Office Electronics", "Telephones"],
                    "description": ["Line one.", "Line <br>two."]}),
        # python-dict style line (as in some official 2018 meta files)
        str({"asin": "X2", "title": "Pen", "brand": "", "price": ".a-box-inner{background:#fff}",
             "category": [], "description": []}),
        json.dumps({"asin": "X2", "title": "Pen (second line, ignored)"}),
        json.dumps({"asin": "ZZ", "title": "never reviewed"}),
        json.dumps({"asin": "X3", "title": "", "price": "$3.50 - $4.00"}),
    ])
    return reviews, meta


# ---------------------------------------------------------------------------------------------
# LC-Rec
# ---------------------------------------------------------------------------------------------

def test_lcrec_basic(lcrec_dir: Path) -> None:
    ds = load_lcrec(lcrec_dir)
    assert ds.name == "Toy"
    assert ds.users == ["7", "3", "5"]
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2], [2, 1], [1, 0, 2, 1]]
    assert ds.items.ids == ["0", "1", "2"]
    f = ds.items.fields
    assert sorted(f) == ["brand", "category", "description", "title"]  # no price: none present
    assert f["title"] == ["AT&T Phone", "Staples", "Glue"]
    assert f["brand"] == ["AT&T", None, "Elmer's"]
    assert f["description"] == [None, "Heavy duty", None]
    assert f["category"] == ["Telephones & Accessories > Corded Telephones",
                             "Tapes, Adhesives & Sealants > Adhesive Tapes", None]
    assert ds.source["loader"] == "lcrec"
    assert load_lcrec(lcrec_dir / "Toy.inter.json", name="x", category_levels=0).items.fields["category"][0] \
        == "Office Electronics > Telephones & Accessories > Corded Telephones"


def test_lcrec_item2id_only(tmp_path: Path) -> None:
    (tmp_path / "I.inter.json").write_text(json.dumps({"0": [1, 0], "1": [0]}))
    (tmp_path / "I.item2id").write_text("ASIN_A\t0\nASIN_B\t1\n")
    ds = load_lcrec(tmp_path)
    assert ds.items.ids == ["ASIN_A", "ASIN_B"] and ds.items.fields == {}
    assert [s.tolist() for s in ds.sequences] == [[1, 0], [0]]


def test_lcrec_kcore(tmp_path: Path) -> None:
    (tmp_path / "K.inter.json").write_text(json.dumps({"a": [0, 1], "b": [0, 1], "c": [0, 2], "d": [3]}))
    (tmp_path / "K.item2id").write_text("W\t0\nX\t1\nY\t2\nZ\t3\n")
    ds = load_lcrec(tmp_path, kcore=2)
    assert seqs_by_id(ds) == {"a": ["W", "X"], "b": ["W", "X"]}


@pytest.mark.parametrize("case, message", [
    ("none", r"no \*\.inter\.json"),
    ("several", "several LC-Rec datasets"),
    ("no_catalog", "neither"),
    ("unknown_item", "user 'u9' names item 5"),
    ("not_dense", "not dense"),
    ("bad_json", "not valid JSON at line"),
    ("mismatch", "lists 2 items but"),
])
def test_lcrec_errors(tmp_path: Path, case: str, message: str) -> None:
    d = tmp_path / "in"
    d.mkdir()
    files = {
        "none": {"readme.txt": "x"},
        "several": {"A.inter.json": "{}", "B.inter.json": "{}"},
        "no_catalog": {"A.inter.json": '{"0": [0]}'},
        "unknown_item": {"A.inter.json": '{"u1": [0], "u9": [0, 5]}', "A.item2id": "P\t0\nQ\t1\n"},
        "not_dense": {"A.inter.json": '{"0": [0]}', "A.item.json": '{"0": {"title": "a"}, "2": {"title": "b"}}'},
        "bad_json": {"A.inter.json": '{"0": [0,\n ]', "A.item2id": "P\t0\n"},
        "mismatch": {"A.inter.json": '{"0": [0]}', "A.item2id": "P\t0\nQ\t1\n",
                     "A.item.json": '{"0": {"title": "a"}}'},
    }[case]
    for fname, text in files.items():
        (d / fname).write_text(text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as e:
        prepare("lcrec", [d], out)
    assert str(d) in str(e.value)
    if case == "unknown_item":
        assert "A.inter.json" in str(e.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [d]  # no temporary folder left either


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["tsv", "csv", "parquet"])
def test_table_stable_order(tmp_path: Path, ext: str) -> None:
    path = write_table(tmp_path / f"inter.{ext}", TABLE_ROWS)
    ds = load_table(path)
    assert seqs_by_id(ds) == TABLE_EXPECTED
    assert ds.users == ["u1", "u2"]
    assert ds.items.ids == ["i2", "i3", "i1", "i4"]  # first appearance walking users in order
    assert ds.items.fields == {}
    assert ds.source["loader"] == "table"


def test_table_with_item_table(tmp_path: Path) -> None:
    inter = write_table(tmp_path / "interactions.tsv", [(u, i[1:], t) for u, i, t in TABLE_ROWS])
    items = tmp_path / "items.tsv"
    items.write_text("item_id\tasin\ttext\n4\tB04\tFour thing\n1\tB01\tOne thing\n9\tB09\tunused\n"
                     "2\tB02\t\n3\tB03\tThree\n")
    ds = load_table(inter, items)
    assert ds.name == tmp_path.name  # generic stem "interactions" -> folder name
    assert ds.items.ids == ["B04", "B01", "B02", "B03"]  # item table order, unused dropped
    assert ds.items.fields == {"title": ["Four thing", "One thing", None, "Three"]}
    assert seqs_by_id(ds) == {"u1": ["B02", "B03", "B01", "B04"], "u2": ["B02", "B01"]}
    assert ds.source["filters"]["items_without_interactions_dropped"] == 1
    # without the asin column the item key is the external id
    items.write_text("item_id\ttitle\tprice\n1\tOne\t$1\n2\tTwo\t\n3\tThree\t\n4\tFour\t\n")
    ds = load_table(inter, items)
    assert ds.items.ids == ["1", "2", "3", "4"] and ds.items.fields["price"] == ["$1", None, None, None]


def test_table_custom_columns(tmp_path: Path) -> None:
    path = write_table(tmp_path / "log.txt", TABLE_ROWS, header=("uid", "sid", "ts"))
    ds = load_table(path, user_col="uid", item_col="sid", time_col="ts", sep=",")
    assert seqs_by_id(ds) == TABLE_EXPECTED


def test_table_kcore_known_answer(tmp_path: Path) -> None:
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "y", 2), ("c", "x", 1), ("c", "z", 2),
            ("d", "w", 1)]
    ds = load_table(write_table(tmp_path / "k.csv", rows), kcore=2)
    assert seqs_by_id(ds) == {"a": ["x", "y"], "b": ["x", "y"]}
    assert ds.source["filters"]["kcore"] == {"k": 2, "rounds": 2, "removed_users": 2, "removed_items": 2,
                                             "removed_interactions": 3}
    with pytest.raises(DataError, match="no interactions left after 3-core"):
        load_table(write_table(tmp_path / "k.csv", rows), kcore=3)


@pytest.mark.parametrize("text, message", [
    ("user_id\titem\ttimestamp\nu\ti\t1\n", "missing column 'item_id'; the file has columns 'user_id', 'item'"),
    ("", "empty file"),
    ("user_id\titem_id\ttimestamp\n", "no data rows"),
    ("user_id\titem_id\ttimestamp\nu\ti\t1\nu\tj\tabc\n", "row 2: 'timestamp' must be an integer"),
    ("user_id\titem_id\ttimestamp\nu\ti\t1.5\n", "row 1: 'timestamp' must be an integer"),
    ("user_id\titem_id\ttimestamp\nu\ti\t1\nu\tj\t2\nu\tk\t-3\n", "row 3: 'timestamp' is negative"),
    ("user_id\titem_id\ttimestamp\nu\ti\t\n", "row 1: 'timestamp' must be an integer"),
    ("user_id\titem_id\ttimestamp\nu\ti\t1\nu\tj\t1\nv\ti\t1\nu\ti\t1\n", "row 4 repeats row 1"),
    ("user_id\titem_id\ttimestamp\nu\ti\t1\nu\tj\n", "row 2: expected 3 fields, got 2"),
    ("user_id\titem_id\ttimestamp\nu\t\t1\n", "row 1: empty 'item_id'"),
])
def test_table_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as e:
        prepare("table", [path], out)
    assert str(path) in str(e.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv"]


def test_table_item_table_errors(tmp_path: Path) -> None:
    inter = write_table(tmp_path / "inter.tsv", [("u", "1", 1), ("u", "7", 2)])
    items = tmp_path / "items.tsv"
    items.write_text("item_id\ttitle\n1\ta\n2\tb\n")
    with pytest.raises(DataError, match=r"inter\.tsv: row 2: item '7' is not in the item table"):
        prepare("table", [inter, items], tmp_path / "out")
    items.write_text("item_id\ttitle\n1\ta\n7\tb\n1\tc\n")
    with pytest.raises(DataError, match=r"items\.tsv: row 3: item '1' already listed in row 1"):
        prepare("table", [inter], tmp_path / "out", items=items)
    items.write_text("id\ttitle\n1\ta\n")
    with pytest.raises(DataError, match=r"items\.tsv: missing column 'item_id'; the file has columns 'id', 'title'"):
        load_table(inter, items)
    assert not (tmp_path / "out").exists()


def test_table_parquet_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [1.0, 2.5]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: 'timestamp' must be an integer"):
        load_table(path)
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [5, 6], "timestamp": [3, None]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: missing 'timestamp'"):
        load_table(path)
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [5, 6], "timestamp": [3.0, 2.0]}), path)
    assert seqs_by_id(load_table(path)) == {"1": ["6", "5"]}


# ---------------------------------------------------------------------------------------------
# Amazon 2018 raw files
# ---------------------------------------------------------------------------------------------

def test_amazon2018(amazon_files) -> None:
    reviews, meta = amazon_files
    ds = load_amazon2018(reviews, meta, kcore=0)
    assert ds.name == "Toy_Category_5"
    assert seqs_by_id(ds) == {"A": ["X2", "X1", "X3"], "B": ["X2", "X1"], "C": ["X4"]}
    f = ds.items.fields
    assert ds.items.ids == ["X2", "X1", "X3", "X4"]
    assert f["title"] == ["Pen", "AT&T Phone", None, None]
    assert f["brand"] == [None, "AT&T", None, None]
    assert f["price"] == [None, "$12.99", "$3.50 - $4.00", None]
    assert f["category"] == [None, "Office Electronics > Telephones", None, None]
    assert f["description"] == [None, "Line one. Line two.", None, None]
    filters = ds.source["filters"]
    assert filters["duplicates_dropped"] == 1 and filters["reviews_read"] == 7
    assert filters["meta_repeated_asins_ignored"] == 1 and filters["items_without_metadata"] == 1
    assert filters["kept_items_without_title"] == 2

    ds2 = load_amazon2018(reviews, meta, kcore=2)
    assert seqs_by_id(ds2) == {"A": ["X2", "X1"], "B": ["X2", "X1"]}
    assert ds2.source["filters"]["kcore"]["removed_users"] == 1
    ds3 = load_amazon2018(reviews, meta, kcore=0, require_title=True)
    assert seqs_by_id(ds3) == {"A": ["X2", "X1"], "B": ["X2", "X1"]}
    assert load_amazon2018(reviews, kcore=0).items.fields == {}


def test_amazon2018_errors(tmp_path: Path, amazon_files) -> None:
    reviews, meta = amazon_files
    bad = write_jsonl_gz(tmp_path / "bad.json.gz", [json.dumps({"asin": "X1"}), "{not json at all"])
    with pytest.raises(DataError, match=r"bad\.json\.gz: line 2: neither JSON nor a Python literal"):
        prepare("amazon2018", [reviews, bad], tmp_path / "out", kcore=0)
    with pytest.raises(DataError, match=r"bad\.json\.gz: line 1: no 'reviewerID' field"):
        prepare("amazon2018", [bad], tmp_path / "out", kcore=0)
    with pytest.raises(DataError, match="no interactions left after 5-core"):
        prepare("amazon2018", [reviews, meta], tmp_path / "out")  # default kcore=5
    with pytest.raises(DataError, match="user_col does not apply to amazon2018"):
        prepare("amazon2018", [reviews], tmp_path / "out", user_col="u")
    with pytest.raises(DataError, match="unknown dataset kind"):
        prepare("csv", [reviews], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_download_offline(tmp_path: Path, monkeypatch) -> None:
    assert amazon2018_urls("scientific") == (
        "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/categoryFilesSmall/Industrial_and_Scientific_5.json.gz",
        "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2/metaFiles2/meta_Industrial_and_Scientific.json.gz")
    assert amazon2018_urls("Pet_Supplies", five_core=False)[0].endswith("/categoryFiles/Pet_Supplies.json.gz")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    dest = tmp_path / "raw"
    with pytest.raises(DataError, match="no network access") as e:
        download_amazon2018("Pet_Supplies", dest)
    assert "itemgen data prepare amazon2018 REVIEWS META" in str(e.value)
    assert "Pet_Supplies_5.json.gz" in str(e.value)
    assert not dest.exists() or list(dest.iterdir()) == []  # no partial file
    with pytest.raises(DataError, match="unknown Amazon 2018 category"):
        download_amazon2018("Nope", dest)


def test_download_writes_then_renames(tmp_path: Path, monkeypatch) -> None:
    import io

    payload = gzip.compress(b'{"reviewerID": "A", "asin": "X", "unixReviewTime": 1}\n')
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: io.BytesIO(payload))
    reviews, meta = download_amazon2018("office", tmp_path / "raw", meta=False)
    assert reviews.name == "Office_Products_5.json.gz" and meta is None
    assert reviews.read_bytes() == payload
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Office_Products_5.json.gz"]


# ---------------------------------------------------------------------------------------------
# prepare: output is replaced atomically, never left half-written
# ---------------------------------------------------------------------------------------------

def test_prepare_round_trip_and_failed_replace(tmp_path: Path, lcrec_dir: Path) -> None:
    out = tmp_path / "prepared"
    ds = prepare("lcrec", lcrec_dir, out)
    loaded = SequenceDataset.load(out)
    assert loaded.content_hash() == ds.content_hash()
    assert loaded.source == ds.source and loaded.items.fields == ds.items.fields
    bad = write_table(tmp_path / "bad.csv", [("u", "i", 1), ("u", "i", 1)])
    with pytest.raises(DataError):
        prepare("table", [bad], out)
    assert SequenceDataset.load(out).content_hash() == ds.content_hash()  # old dataset untouched


# ---------------------------------------------------------------------------------------------
# shared real datasets (skipped when ../shared/datasets is absent)
# ---------------------------------------------------------------------------------------------

SHARED_CASES = {
    "amazon2018-scientific": (("lcrec", ["amazon2018-scientific"]), 8317, 4344, 58492,
                              ["brand", "category", "description", "title"]),
    "amazon2014-office": (("lcrec", ["amazon2014-office"]), 4905, 2420, 53258,
                          ["brand", "category", "description", "title"]),
    "amazon2014-office-raw": (("table", ["amazon2014-office-raw/interactions.tsv",
                                         "amazon2014-office-raw/items.tsv"]), 4905, 2420, 53258, ["title"]),
    "amazon2018-instruments": (("lcrec", ["amazon2018-instruments"]), 17112, 6250, 136226, []),
}


@pytest.mark.parametrize("folder", list(SHARED_CASES))
def test_shared_dataset_counts(folder: str, tmp_path: Path) -> None:
    if not (SHARED / folder).is_dir():
        pytest.skip(f"{SHARED / folder} not present")
    (kind, inputs), users, items, interactions, fields = SHARED_CASES[folder]
    out = tmp_path / folder
    ds = prepare(kind, [SHARED / p for p in inputs], out)
    m = ds.manifest()
    assert (m["users"], m["items"], m["interactions"]) == (users, items, interactions)
    assert m["fields"] == fields
    lengths = np.array([len(s) for s in ds.sequences])
    assert m["eval_users"] == len(ds.split.test) == len(ds.split.valid) == int((lengths >= 3).sum())
    assert m["train_only_users"] == int((lengths < 3).sum())
    assert sum(len(t) for t in ds.split.train) == interactions - 2 * m["eval_users"]
    loaded = SequenceDataset.load(out)
    assert loaded.content_hash() == ds.content_hash() == json.loads((out / "manifest.json").read_text())["content_hash"]
    if kind == "lcrec":  # LC-Rec order and indices are kept as they are
        raw = json.loads(next((SHARED / inputs[0]).glob("*.inter.json")).read_text())
        assert ds.users == list(raw) and [s.tolist() for s in ds.sequences] == list(raw.values())
    if folder == "amazon2018-instruments":
        first = (SHARED / folder / "Instruments.item2id").read_text().splitlines()[0].split("\t")
        assert ds.items.ids[int(first[1])] == first[0]
    if folder == "amazon2014-office-raw":
        assert ds.items.ids[0].startswith("B") and all(t for t in ds.items.fields["title"])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def test_cli_prepare_info_and_errors(tmp_path: Path, lcrec_dir: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from itemgen.cli.data import app

    runner = CliRunner()
    out = tmp_path / "ds"
    res = runner.invoke(app, ["prepare", "lcrec", str(lcrec_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "users" in res.stdout and "interactions" in res.stdout and "9" in res.stdout
    assert SequenceDataset.load(out).n_interactions == 9

    res = runner.invoke(app, ["info", str(out), "--verify"])
    assert res.exit_code == 0, res.output
    assert "lcrec" in res.stdout and "verified" in res.stdout
    res = runner.invoke(app, ["info", str(out), "--json"])
    assert json.loads(res.stdout)["users"] == 3

    inter = write_table(tmp_path / "inter.csv", [("u", "i", 1), ("u", "j", "soon")])
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\ni,I\nj,J\n")
    res = runner.invoke(app, ["prepare", "table", str(inter), "--items", str(items), "--out", str(tmp_path / "t")])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and "inter.csv: row 2" in res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "t").exists()

    inter = write_table(tmp_path / "inter.csv", [("u", "i", 2), ("u", "j", 1)])
    res = runner.invoke(app, ["prepare", "table", str(inter), str(items), "--out", str(tmp_path / "t"),
                              "--kcore", "1"])
    assert res.exit_code == 0, res.output
    assert seqs_by_id(SequenceDataset.load(tmp_path / "t")) == {"u": ["j", "i"]}

    res = runner.invoke(app, ["prepare", "lcrec", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "no such directory" in res.stderr
    res = runner.invoke(app, ["prepare", "lcrec", str(lcrec_dir), "--out", str(tmp_path / "m"), "--user-col", "u"])
    assert res.exit_code == 2 and "user_col does not apply to lcrec" in res.stderr
    res = runner.invoke(app, ["info", str(tmp_path / "m")])
    assert res.exit_code == 2 and "not a prepared dataset" in res.stderr

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    res = runner.invoke(app, ["download", "amazon2018", "pets", "--dest", str(tmp_path / "raw")])
    assert res.exit_code == 2 and "no network access" in res.stderr
    res = runner.invoke(app, ["download", "amazon2014", "pets", "--dest", str(tmp_path / "raw")])
    assert res.exit_code == 2 and "only amazon2018" in res.stderr
