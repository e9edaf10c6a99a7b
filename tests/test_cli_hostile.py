"""The CLI against hostile input: bad files, bad arguments, corrupt checkpoints, and the cases
that used to lose data (issue 22). Every case must end in one ``error: ...`` line naming what is
wrong, exit status 2, no traceback, and the user's files as they were. Fast: no training except
one run of a few steps for --resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from itemgen.api import Predictor
from itemgen.cli import app
from itemgen.core.config import load_config
from itemgen.data.synthetic import make_dataset
from itemgen.models.checkpoint import (CHECKSUMS, CheckpointError, load_checkpoint, load_trainer_state,
                                       save_checkpoint, sha256_file, verify_checkpoint)
from itemgen.models.registry import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "old_checkpoints"


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(res, *words: str) -> str:
    """The result is exit 2 with exactly one non-blank line, ``error: ...`` holding ``words``."""
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in res.output
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under path (relative name -> bytes), hidden ones included."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


INTERACTIONS = "user_id,item_id,timestamp\n" + "".join(
    f"u{u},i{(u + j) % 7},{100 * u + j}\n" for u in range(12) for j in range(5))


@pytest.fixture()
def csv(tmp_path) -> Path:
    path = tmp_path / "inter.csv"
    path.write_text(INTERACTIONS)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained SASRec checkpoint (weights are random but finite: enough to load and rank)."""
    root = tmp_path_factory.mktemp("hostile")
    ds = make_dataset(n_users=40, n_items=12, seed=1)
    cfg = load_config(None, ["model=sasrec", "sasrec.hidden=8", "sasrec.n_layers=1", "data.max_history=5"])
    return save_checkpoint(root / "ckpt", build_model(cfg, ds.items), cfg, ds.items, dataset=ds.manifest())


@pytest.fixture()
def broken(ckpt, tmp_path) -> Path:
    """A copy of the checkpoint for a test to damage."""
    return Path(shutil.copytree(ckpt, tmp_path / "broken"))


# ---- defect 4: `data prepare --out` never destroys the user's files -----------------------------

def test_prepare_refuses_a_folder_of_other_files_unless_overwrite(csv, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("a")
    before = tree(out)
    one_error(invoke(["data", "prepare", "table", csv, "--out", out]), str(out), "not a prepared dataset",
              "--overwrite")
    assert tree(out) == before
    res = invoke(["data", "prepare", "table", csv, "--out", out, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").is_file() and not (out / "thesis.tex").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no hidden leftovers


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_prepare_never_replaces_its_input(csv, tmp_path, overwrite):
    before = csv.read_bytes()
    one_error(invoke(["data", "prepare", "table", csv, "--out", csv, *overwrite]), "is the input", "delete")
    assert csv.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["inter.csv"]
    # a folder holding the input (here its own folder) is refused too, with or without --overwrite
    one_error(invoke(["data", "prepare", "table", csv, "--out", tmp_path, *overwrite]), "holds the input")
    assert csv.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["inter.csv"]


def test_prepare_never_replaces_an_input_the_loader_found(tmp_path):
    """lcrec takes a folder and reads X.inter.json inside it: --out naming that file is refused."""
    src = tmp_path / "lc"
    src.mkdir()
    (src / "x.inter.json").write_text(json.dumps({"u1": [0, 1, 2], "u2": [1, 2, 0]}))
    (src / "x.item2id").write_text("A\t0\nB\t1\nC\t2\n")
    before = tree(src)
    one_error(invoke(["data", "prepare", "lcrec", src, "--out", src / "x.inter.json"]), "is a file")
    one_error(invoke(["data", "prepare", "lcrec", src, "--out", src / "x.inter.json", "--overwrite"]),
              "is the input")
    assert tree(src) == before


def test_prepare_replaces_a_prepared_dataset_or_an_empty_folder(csv, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    assert invoke(["data", "prepare", "table", csv, "--out", out]).exit_code == 0  # empty folder
    (out / "clusters").mkdir()  # built from the dataset by the two-level head: replaced with it
    (out / "clusters" / "kmeans.json").write_text("{}")
    res = invoke(["data", "prepare", "table", csv, "--out", out, "--kcore", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["source"]["options"]["kcore"] == 2
    # a prepared dataset that also holds a user's file is not ours alone to delete
    (out / "README.md").write_text("mine")
    one_error(invoke(["data", "prepare", "table", csv, "--out", out]), "also holds README.md", "--overwrite")
    assert (out / "README.md").read_text() == "mine"


def test_prepare_refuses_a_file_as_output_unless_overwrite(csv, tmp_path):
    out = tmp_path / "report.pdf"
    out.write_bytes(b"%PDF")
    one_error(invoke(["data", "prepare", "table", csv, "--out", out]), "is a file", "--overwrite")
    assert out.read_bytes() == b"%PDF"
    assert invoke(["data", "prepare", "table", csv, "--out", out, "--overwrite"]).exit_code == 0
    assert (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no .report.pdf.old


# ---- defect 6: weights checked at load; recommend never prints an empty table ----------------------

def test_checkpoint_records_the_sha256_of_every_weight_file(ckpt):
    record = json.loads((ckpt / CHECKSUMS).read_text())["sha256"]
    assert record == {"model.safetensors": sha256_file(ckpt / "model.safetensors")}


def _overwrite_middle(path: Path, n: int = 4096, byte: int = 0xFF) -> None:
    """Overwrite up to n bytes in the middle of a safetensors file's tensor data (its header,
    the first 8 + length bytes, stays valid): 0xFF bytes read as NaN."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    n = min(n, (len(data) - start) // 2)
    mid = (start + len(data)) // 2
    data[mid - n // 2: mid + n // 2] = bytes([byte]) * (n // 2 * 2)
    path.write_bytes(bytes(data))


def test_weights_damaged_behind_a_valid_header_are_refused(broken):
    """The probe's reproduction: 4 KiB of 0xFF in the middle of model.safetensors used to load,
    and recommend printed an empty table with exit 0."""
    _overwrite_middle(broken / "model.safetensors")
    for check in (load_checkpoint, verify_checkpoint):  # verify_checkpoint: what `itemgen serve` runs first
        with pytest.raises(CheckpointError, match="model.safetensors does not match the sha256"):
            check(broken)
    one_error(invoke(["recommend", broken, "--history", "I00001"]), "model.safetensors", "sha256")


def test_non_finite_weights_are_refused_naming_the_file(broken):
    """A checkpoint without checksums.json (as written before it existed) is not hash-checked,
    but its NaN weights are still refused."""
    (broken / CHECKSUMS).unlink(missing_ok=True)
    _overwrite_middle(broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor \S+ holds non-finite values"):
        Predictor.load(broken)
    one_error(invoke(["recommend", broken, "--history", "I00001"]), "model.safetensors", "non-finite")


def test_corrupt_checksums_file_is_refused(broken):
    (broken / CHECKSUMS).write_bytes(b"\xff\xfe")
    one_error(invoke(["recommend", broken, "--history", "I00001"]), "checksums.json is corrupt")


def test_recommend_never_prints_an_empty_table(ckpt, tmp_path):
    # every catalog item in the history, all excluded: nothing is left, and it says so
    every = ",".join(f"I{i:05d}" for i in range(12))
    one_error(invoke(["recommend", ckpt, "--history", every]), "every one of the catalog's 12 items")
    assert invoke(["recommend", ckpt, "--history", every, "--no-exclude-history"]).exit_code == 0
    # weights that are finite (and match their checksum) but overflow in the forward pass score
    # every item NaN, which the top-k list drops: an error, not an empty table with exit 0
    model, cfg, items = load_checkpoint(ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3e38)
    huge = save_checkpoint(tmp_path / "huge", model, cfg, items)
    assert Predictor.load(huge).recommend([["I00001"]], k=5) == [[]]
    for extra in ([], ["--json"]):
        one_error(invoke(["recommend", huge, "--history", "I00001", *extra]), "no item with a finite score")


# ---- defect 10: tracebacks become one-line errors ----------------------------------------------

def test_train_out_pointing_at_a_file(tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    one_error(invoke(["train", "model=sasrec", "data.path=synthetic", f"train.out={out}"]), str(out),
              "is a file")
    one_error(invoke(["train", "model=sasrec", "data.path=synthetic", f"train.out={out / 'run'}"]),
              f"is under {out}, which is a file")
    assert out.read_text() == "keep me"


def test_csv_timestamp_too_large_for_int64(tmp_path):
    path = tmp_path / "inter.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,99999999999999999999999\n")
    one_error(invoke(["data", "prepare", "table", path, "--out", tmp_path / "out"]), str(path), "row 2",
              "too large")


def test_parquet_and_amazon_timestamps_too_large(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, ts in (("float.parquet", pa.array([1.0, 1e22])), ("uint.parquet", pa.array([1, 2**64 - 1], pa.uint64()))):
        path = tmp_path / name
        pq.write_table(pa.table({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "timestamp": ts}), path)
        one_error(invoke(["data", "prepare", "table", path, "--out", tmp_path / "out"]), str(path), "row 2",
                  "too large")
    reviews = tmp_path / "Pets_5.json.gz"
    with gzip.open(reviews, "wt") as f:
        f.write('{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\n'
                '{"reviewerID": "u", "asin": "b", "unixReviewTime": 99999999999999999999999}\n')
    one_error(invoke(["data", "prepare", "amazon2018", reviews, "--out", tmp_path / "out"]), str(reviews),
              "line 2", "too large")


# ---- defect 11: messages that name the file and quote no raw bytes ---------------------------------

def test_binary_yaml_config_names_the_file(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    one_error(invoke(["train", cfg]), str(cfg), "not a YAML text file")
    cfg.write_bytes(b"model: sasrec\x00\x1b[31m\n")  # UTF-8, but control characters
    line = one_error(invoke(["train", cfg]), str(cfg), "not valid YAML")
    assert line.isprintable()


def test_binary_config_json_in_a_checkpoint_names_the_file(broken):
    (broken / "config.json").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    one_error(invoke(["recommend", broken, "--history", "I00001"]), str(broken / "config.json"), "not UTF-8")


def test_itemlm_checkpoint_without_backbone_names_it(tmp_path):
    ckpt = Path(shutil.copytree(FIXTURES / "itemlm", tmp_path / "itemlm"))
    shutil.rmtree(ckpt / "backbone")
    line = one_error(invoke(["recommend", ckpt, "--history", "I00001"]), str(ckpt), "backbone/")
    assert "Repo id" not in line


def test_titles_length_mismatch_names_items_json(broken):
    blob = json.loads((broken / "items.json").read_text())
    blob["titles"] = blob["titles"][:-1]
    (broken / "items.json").write_text(json.dumps(blob))
    one_error(invoke(["recommend", broken, "--history", "I00001"]), str(broken / "items.json"),
              "11 values for 12 items")


def test_binary_csv_message_holds_no_control_bytes(tmp_path):
    path = tmp_path / "inter.csv"
    path.write_bytes(b"user_id,item_id,timestamp\n\x00\x01\x1b[2J\x07,\x08\n\x1b]0;owned\x07,a,b,c\n")
    line = one_error(invoke(["data", "prepare", "table", path, "--out", tmp_path / "out"]), str(path))
    assert line.isprintable(), repr(line)


# ---- defect 12: corrupt items.json is refused ------------------------------------------------------

@pytest.mark.parametrize("ids, words", [
    (list(range(12)), "is a int, not a string"),
    (["I00001"] * 12, "repeats item 0's"),
    ([], "holds no items"),
    ("I00001", "must be a list"),
])
def test_corrupt_item_ids_are_refused(broken, ids, words):
    blob = json.loads((broken / "items.json").read_text())
    blob["ids"] = ids
    blob["titles"] = None
    (broken / "items.json").write_text(json.dumps(blob))
    one_error(invoke(["recommend", broken, "--history", "I00001"]), str(broken / "items.json"), words)
    with pytest.raises(CheckpointError, match="items.json is corrupt"):
        load_checkpoint(broken)


# ---- defect 15: hidden temporary folders of a killed save are cleared ---------------------------

def test_save_clears_what_a_killed_save_left(ckpt, tmp_path):
    model, cfg, items = load_checkpoint(ckpt)
    run = tmp_path / "run"
    stale = [run / ".last.k3x_9qa0", run / ".last.old", run / ".last.old.ab12cd34"]
    for d in stale:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    keep = [run / ".last.notes", run / ".lastly.k3x_9qa0", run / ".best.k3x_9qa0"]  # not temps of last/
    for d in keep:
        d.mkdir(parents=True)
    save_checkpoint(run / "last", model, cfg, items)
    assert sorted(p.name for p in run.iterdir()) == sorted(["last", *(d.name for d in keep)])


def test_resume_clears_what_a_killed_save_left(tmp_path):
    out = tmp_path / "run"
    args = ["train", "model=sasrec", "data.path=synthetic", "data.synthetic_users=60", "data.synthetic_items=10",
            "sasrec.hidden=8", "sasrec.n_layers=1", f"train.out={out}", "train.max_steps=4", "train.eval_every=2",
            "train.progress=false"]
    assert invoke([*args, "train.stop_at=2"]).exit_code == 0
    left = out / ".last.z8y7x6w5"  # as a SIGKILL during the next save would leave it
    shutil.copytree(out / "last", left)
    res = invoke([*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert not left.exists() and (out / "last" / CHECKSUMS).is_file()
    assert "trainer/state.safetensors" in json.loads((out / "last" / CHECKSUMS).read_text())["sha256"]
    # the optimizer state --resume reads is checked too
    _overwrite_middle(out / "last" / "trainer" / "state.safetensors", n=64)
    with pytest.raises(CheckpointError, match="state.safetensors does not match the sha256"):
        load_trainer_state(out / "last", None)


# ---- defect 16: duplicate YAML keys, NUL bytes in item ids --------------------------------------

def test_duplicate_yaml_keys_are_refused(tmp_path):
    cfg = tmp_path / "sasrec.yaml"
    cfg.write_text("model: sasrec\ntrain:\n  lr: 0.01\n  max_steps: 5\n  lr: 0.1\n")
    one_error(invoke(["train", cfg]), str(cfg), "line 5", "'lr' appears twice")
    cfg.write_text("model: sasrec\ntrain: {lr: 0.01}\nmodel: itemlm\n")
    one_error(invoke(["train", cfg]), str(cfg), "'model' appears twice")


def test_merge_keys_may_still_override(tmp_path):
    """A key merged in with << and set again beside it is an override, not a duplicate."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: sasrec\nsasrec: &s {hidden: 16, n_layers: 1}\nbert4rec:\n  <<: *s\n  hidden: 32\n")
    got = load_config(cfg)
    assert (got.sasrec.hidden, got.bert4rec.hidden, got.bert4rec.n_layers) == (16, 32, 1)


def test_nul_bytes_in_item_ids_are_refused(tmp_path, broken):
    path = tmp_path / "inter.csv"
    path.write_bytes(b"user_id,item_id,timestamp\nu1,a,1\nu1,b\x00c,2\nu2,a,3\n")
    one_error(invoke(["data", "prepare", "table", path, "--out", tmp_path / "out"]), str(path), "row 2",
              "NUL byte")
    assert not (tmp_path / "out").exists()
    lc = tmp_path / "lc"
    lc.mkdir()
    (lc / "x.inter.json").write_text(json.dumps({"u1": [0, 1, 0]}))
    (lc / "x.item2id").write_bytes(b"A\t0\nB\x00\t1\n")
    one_error(invoke(["data", "prepare", "lcrec", lc, "--out", tmp_path / "out"]), "x.item2id", "line 2", "NUL byte")
    reviews = tmp_path / "Pets_5.json"
    reviews.write_text('{"reviewerID": "u", "asin": "a\\u0000b", "unixReviewTime": 1}\n')
    one_error(invoke(["data", "prepare", "amazon2018", reviews, "--out", tmp_path / "out"]), str(reviews),
              "line 1", "NUL byte")
    blob = json.loads((broken / "items.json").read_text())
    blob["ids"][3] = "I00003\x00evil"
    (broken / "items.json").write_text(json.dumps(blob))
    one_error(invoke(["recommend", broken, "--history", "I00001"]), "items.json", "item 3", "NUL byte")


# ---- more hostile arguments: each one line, exit 2 ----------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["data", "prepare", "table", "/nonexistent/x.csv", "--out", "{tmp}/o"], ["/nonexistent/x.csv"]),
    (["data", "prepare", "bogus", "{tmp}", "--out", "{tmp}/o"], ["unknown dataset kind 'bogus'"]),
    (["data", "prepare", "table", "{tmp}/empty.csv", "--out", "{tmp}/o"], ["empty.csv", "empty file"]),
    (["data", "info", "{tmp}"], ["not a prepared dataset"]),
    (["recommend", "{tmp}", "--history", "a"], ["not an itemgen checkpoint"]),
    (["train", "{tmp}/missing.yaml"], ["config file not found"]),
])
def test_hostile_arguments(tmp_path, args, words):
    (tmp_path / "empty.csv").write_text("")
    one_error(invoke([a.replace("{tmp}", str(tmp_path)) for a in args]), *words)


def test_old_checkpoints_without_checksums_still_load():
    for name in ("sasrec", "itemlm"):
        assert not (FIXTURES / name / CHECKSUMS).exists()
        load_checkpoint(FIXTURES / name)
