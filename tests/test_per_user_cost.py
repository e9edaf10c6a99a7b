"""benchmarks/per_user_cost.py end to end on tiny checkpoints: it writes its entry under
``per_user_cost`` and leaves the file's other keys alone, checks the packed path's top-k against
the reference for every user, and latency_report renders the entry as its own section (not as a
dataset's latency table)."""

import importlib.util
import json
from pathlib import Path

import pytest

from itemgen.core.config import from_dict
from itemgen.data.synthetic import make_dataset
from itemgen.training.loop import train

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    data = make_dataset(n_users=30, n_items=20, min_len=3, max_len=9, seed=2)
    data.save(root / "data")
    common = {"data": {"path": str(root / "data"), "max_history": 8},
              "train": {"max_steps": 1, "eval_users": 5, "progress": False, "batch_size": 8, "warmup_steps": 0}}
    ckpt = {}
    for model, extra in (("itemlm", {"itemlm": {"backbone": "tiny", "prompt": "ids", "item_dim": 16}}),
                         ("sasrec", {"sasrec": {"hidden": 16, "n_heads": 2}})):
        cfg = from_dict({"model": model, **extra, **common, "train": {**common["train"], "out": str(root / model)}})
        ckpt[model] = train(cfg, dataset=data).out / "last"
    out = root / "latency.json"
    out.write_text(json.dumps({"Office": {"tag": "kept", "profile": {"x": 1}}}))
    rc = _script("per_user_cost").main(["--data", str(root / "data"), "--itemlm", str(ckpt["itemlm"]),
                                        "--sasrec", str(ckpt["sasrec"]), "--users", "10", "--batch", "4",
                                        "--repeats", "2", "--out", str(out)])
    return rc, json.loads(out.read_text()), ckpt, root


def test_it_writes_its_key_and_keeps_the_others(run):
    rc, res, _, _ = run
    assert rc == 0
    assert res["Office"] == {"tag": "kept", "profile": {"x": 1}}
    r = res["per_user_cost"]
    assert r["profile"]["users"] == 10 and r["profile"]["max_history"] == {"itemlm": 8, "sasrec": 8}
    assert r["parity"] == {"users": 10, "users_with_identical_top_k": 10,
                           "max_abs_score_difference": r["parity"]["max_abs_score_difference"]}
    assert r["parity"]["max_abs_score_difference"] < 1e-4
    for key in ("batch1_p50_ms_per_user", "batch4_ms_per_user"):
        for m in ("itemlm", "itemlm_reference", "sasrec"):
            fig = r[key][m]
            assert len(fig["per_repeat_ms"]) == 2 and fig["median_ms"] > 0 and fig["cpu_median_ms"] >= 0
        assert r[key]["itemlm"]["ratio_to_sasrec"] > 0
    # the packed path skips padding and the last layer's earlier positions: fewer FLOPs than before
    assert 0 < r["flops_per_user"]["itemlm"] < r["flops_per_user"]["itemlm_reference"]
    assert r["targets"]["batch64_met"] is False  # measured at batch 4, not 64: not a claim about 64


def test_the_report_renders_its_own_section(run):
    _, res, _, _ = run
    report = _script("latency_report")
    lines = report.per_user_cost_section(res["per_user_cost"])
    text = "\n".join(lines)
    assert lines[0] == "## Per-user cost against SASRec"
    assert "| ItemLM, `Predictor.topk_indices` (packed path) |" in text and "10 of 10 users" in text
    assert report.per_user_cost_section(None) == []


def test_a_second_run_keeps_the_first_in_brief(run):
    """Timing on shared cores is noisy: a new run keeps the earlier ones' ratios, and the report lists them."""
    _, res, ckpt, root = run
    out = root / "twice.json"
    out.write_text(json.dumps(res))
    first = res["per_user_cost"]
    assert first["earlier_runs"] == []
    rc = _script("per_user_cost").main(["--data", str(root / "data"), "--itemlm", str(ckpt["itemlm"]),
                                        "--sasrec", str(ckpt["sasrec"]), "--users", "6", "--batch", "4",
                                        "--repeats", "1", "--out", str(out)])
    assert rc == 0
    second = json.loads(out.read_text())["per_user_cost"]
    assert second["profile"]["users"] == 6 and len(second["earlier_runs"]) == 1
    e = second["earlier_runs"][0]
    assert e["date"] == first["date"] and e["batch1_ratio"] == first["batch1_p50_ms_per_user"]["itemlm"]["ratio_to_sasrec"]
    assert e["batch4_ratio"] == first["batch4_ms_per_user"]["itemlm"]["ratio_to_sasrec"]
    text = "\n".join(_script("latency_report").per_user_cost_section(second))
    assert "Earlier runs" in text and f"{e['batch1_ratio']:.2f}x" in text


def test_swapped_checkpoints_are_a_one_line_error(run, capsys):
    _, _, ckpt, root = run
    rc = _script("per_user_cost").main(["--data", str(root / "data"), "--itemlm", str(ckpt["sasrec"]),
                                        "--sasrec", str(ckpt["itemlm"]), "--out", str(root / "x.json")])
    assert rc == 2 and "error: " in capsys.readouterr().err
    assert not (root / "x.json").exists()
