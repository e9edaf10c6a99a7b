"""Progress reporting (core/progress.py) and what users see of a run: plain lines off a terminal,
time budgets as totals, JSON events, history.jsonl and its plot, --version and every --help."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from itemgen.cli import app
from itemgen.core import progress
from itemgen.core.progress import Progress, clock_text
from itemgen.data.synthetic import make_dataset
from itemgen.training.loop import trim_history

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(autouse=True)
def default_settings():
    progress.reset()
    yield
    progress.reset()


def test_a_time_budget_is_the_total_and_the_eta_when_it_ends_first():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("train x", 100_000, time_budget_s=180, every=10, every_s=None, stream=out, clock=clock)
    assert (p.bound, p.total, p.total_unit, p.remaining()) == ("time", 180, "s", 180)
    for _ in range(30):
        clock.t += 1.0  # a step a second: 100k steps would take 28 hours, the budget ends in 3 minutes
        p.update(1, loss=3.25)
    assert (p.bound, p.total, p.remaining()) == ("time", 180, 150)
    assert p.fraction() == pytest.approx(30 / 180)
    text = out.getvalue()
    assert "step 30 (17% of the 3:00 time budget)" in text and "remaining 2:30" in text
    assert "100,000" not in text and "27:4" not in text  # no fictitious step count, no 28-hour ETA


def test_steps_bound_the_task_when_they_end_first():
    clock = FakeClock()
    p = Progress("train x", 100, time_budget_s=180, every_s=None, stream=io.StringIO(), clock=clock)
    for _ in range(20):
        clock.t += 0.5
        p.update(1)
    assert (p.bound, p.total, p.total_unit) == ("steps", 100, "step")
    assert p.remaining() == pytest.approx(40.0)  # 80 steps at 2/s; the budget has 170 s left
    assert p.fraction() == pytest.approx(0.2)


def test_a_resumed_task_counts_its_earlier_steps_and_seconds():
    clock = FakeClock()
    p = Progress("train x", 100, initial=50, elapsed_s=100.0, time_budget_s=150, every_s=None,
                 stream=io.StringIO(), clock=clock)
    clock.t += 10
    p.update(10)  # 1 step/s in this session: 40 steps need 40 s, the budget has 40 s left
    assert p.elapsed() == 110 and p.rate() == 1.0 and p.remaining() == 40.0


def test_lines_mode_writes_plain_lines_every_n_steps_and_at_each_log():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("evaluate", 1000, unit="user", every=100, every_s=None, stream=out, clock=clock)
    for _ in range(10):
        clock.t += 0.1
        p.update(50)
    p.log("valid ndcg@10 0.1234")
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split("  ")[1] for line in lines[:5]] == [f"user {n}/1,000 ({n // 10}%)" for n in (100, 200, 300, 400, 500)]
    assert lines[5].endswith("valid ndcg@10 0.1234") and lines[6] == "evaluate  done  user 500/1,000 (50%)  elapsed 0:01"
    assert "500.0 users/s" in lines[0] and "elapsed 0:00" in lines[0] and "remaining 0:02" in lines[0]


def test_short_tasks_stay_silent_quiet_is_silent_and_json_is_one_object_per_event():
    out = io.StringIO()
    with Progress("quick", 10, stream=out) as p:  # under every_s (10 s): nothing to say
        p.update(10)
    assert out.getvalue() == ""
    progress.configure(quiet=True)
    with Progress("quiet", 10, every=1, stream=out) as p:
        p.update(5)
        p.log("an evaluation")
    progress.event("quiet", "a message")
    assert out.getvalue() == ""
    progress.configure(quiet=False, format="json")
    clock = FakeClock()
    with Progress("train x", 4, every=2, every_s=None, stream=out, clock=clock) as p:
        for _ in range(4):
            clock.t += 1
            p.update(1, loss=2.0)
        p.log("valid", valid={"ndcg@10": 0.5})
    progress.event("index", "built", seconds=1.5, stream=out)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["start", "progress", "progress", "log", "end", "message"]
    assert events[2]["step"] == 4 and events[2]["total"] == 4 and events[2]["loss"] == 2.0
    assert events[3]["valid"] == {"ndcg@10": 0.5} and events[5]["seconds"] == 1.5
    with pytest.raises(ValueError, match="log format 'xml'"):
        progress.configure(format="xml")


def test_phases_speak_only_when_they_take_a_while():
    import time

    out = io.StringIO()
    progress.configure(stream=out)
    with progress.phase("clusters", "quick"):
        pass
    assert out.getvalue() == ""
    with progress.phase("clusters", "k-means into 8 clusters", after_s=0.05):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "clusters: k-means into 8 clusters ..."
    assert lines[1].startswith("clusters: k-means into 8 clusters done  seconds 0.")


def test_clock_text():
    assert [clock_text(x) for x in (0, 59.6, 61, 3600 * 2 + 5, None)] == ["0:00", "1:00", "1:01", "2:00:05", "?"]


def test_trim_history_keeps_rows_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (10, 20, 30)) + '{"step": 4')
    trim_history(path, 20)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [10, 20]


# ---- a real run, as a scheduler or CI sees it ----------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    make_dataset(n_users=200, n_items=30, noise=0.0, seed=3).save(root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def logged_run(data_dir):
    """A short training run through the command line with its output sent to a file (not a TTY)."""
    out = data_dir.parent / "run"
    log = data_dir.parent / "train.log"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "200"}
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "itemgen.cli", "train", "model=sasrec", f"data.path={data_dir}",
                               f"train.out={out}", "train.max_steps=40", "train.eval_every=20", "train.log_every=5",
                               "train.batch_size=16", "train.warmup_steps=2", "sasrec.hidden=16"],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    return out, text


def test_non_tty_training_output_is_periodic_plain_lines(logged_run):
    _, text = logged_run
    assert "\r" not in text and "\x1b[" not in text  # no bar fragments, no terminal escapes
    lines = text.splitlines()
    periodic = [x for x in lines if x.startswith("train sasrec  step ")]
    plain = [x.split("  ")[1].split(" ")[1] for x in periodic if "valid" not in x]
    assert plain == [f"{n}/40" for n in range(5, 41, 5) if n % 20]  # validations write their own line
    for word in ("epoch ", "loss ", "examples/s", "elapsed ", "remaining "):
        assert all(word in x for x in periodic), word
    evals = [x for x in periodic if "valid ndcg@10" in x]
    assert len(evals) == 2 and "step 20/40" in evals[0] and "step 40/40" in evals[1]
    assert lines[-2].startswith("train sasrec  stopped: max_steps  step 40/40 (100%)  elapsed ")
    assert lines[-1].startswith("trained sasrec: 40 steps") and len(lines) == 10  # not one a step


def test_history_jsonl_and_the_plot(logged_run, tmp_path):
    out, _ = logged_run
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[0] == 5 and steps[-1] == 40  # strictly increasing
    assert all({"loss", "lr", "epoch", "examples_per_s", "seconds", "time"} <= r.keys() for r in rows)
    assert all(isinstance(r["lr"], list) and r["lr"] for r in rows)
    valid = [r for r in rows if "valid" in r]
    assert [r["step"] for r in valid] == [20, 40] and "ndcg@10" in valid[0]["valid"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # kept as it was
    png = tmp_path / "curves.png"
    r = runner.invoke(app, ["plot", str(out), "--out", str(png)])
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary file was renamed
    r = runner.invoke(app, ["plot", str(out)])
    assert r.exit_code == 0 and (out / "history.png").stat().st_size > 0


def test_plot_errors_are_one_line(logged_run, tmp_path, monkeypatch):
    out, _ = logged_run
    r = runner.invoke(app, ["plot", str(tmp_path)])
    assert r.exit_code == 2 and "has no history.jsonl or log.jsonl" in r.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plot extra is not installed
    r = runner.invoke(app, ["plot", str(out), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "pip install 'itemgen[plot]'" in r.output


def test_json_mode_evaluate_prints_only_json(logged_run):
    out, _ = logged_run
    r = runner.invoke(app, ["evaluate", str(out / "best"), "--log-format", "json"])
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.output.splitlines()]
    assert events[-1]["event"] == "result" and events[-1]["metrics"]["users"] == 200
    assert events[0]["event"] == "start" and events[0]["task"] == "evaluate" and events[0]["total"] == 200


def test_json_console_turns_prints_into_events(capsys):
    from rich.table import Table

    from itemgen.cli.common import JsonConsole

    progress.configure(format="json")
    table = Table(title="test split")
    table.add_column("model")
    table.add_column("ndcg@10")
    table.add_row("sasrec", "0.1234")
    JsonConsole().print("[bold]training sasrec[/bold] (3 min budget)")
    JsonConsole().print(table)
    captured = capsys.readouterr()
    assert json.loads(captured.err)["message"] == "training sasrec (3 min budget)"
    assert json.loads(captured.out) == {"event": "result", "table": "test split",
                                        "rows": [{"model": "sasrec", "ndcg@10": "0.1234"}]}


def test_a_time_budgeted_run_reports_the_budget_as_its_total(data_dir, tmp_path):
    budget_s = 0.05 * 60
    r = runner.invoke(app, ["train", "model=sasrec", f"data.path={data_dir}", f"train.out={tmp_path / 'run'}",
                            "train.max_steps=100000", "train.max_minutes=0.05", "train.eval_every=100000",
                            "train.log_every=5", "train.batch_size=16", "sasrec.hidden=16", "--log-format", "json"])
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.output.splitlines()]  # every line is one JSON object
    steps = [e for e in events if e["event"] in ("start", "progress", "log", "end")]
    assert len(steps) >= 3
    assert all(e["total"] == budget_s and e["unit"] == "s" and e["bound"] == "time" for e in steps)
    assert all(0 <= e["remaining_s"] <= budget_s for e in steps)
    result = events[-1]
    assert result["event"] == "result" and result["stopped"] == "time_limit" and result["steps"] < 100000


def test_quiet_training_prints_only_the_result(data_dir, tmp_path):
    r = runner.invoke(app, ["train", "model=sasrec", f"data.path={data_dir}", f"train.out={tmp_path / 'run'}",
                            "train.max_steps=10", "train.eval_every=5", "train.log_every=1", "train.batch_size=16",
                            "sasrec.hidden=16", "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("trained sasrec: 10 steps") and "step 5" not in r.output  # the result alone


def test_json_errors_and_bad_flags():
    r = runner.invoke(app, ["train", "model=sasrec", "train.lr=-1", "--log-format", "json"])
    assert r.exit_code == 2 and json.loads(r.output.strip()) == {"event": "error", "error": "train.lr must be > 0"}
    r = runner.invoke(app, ["train", "model=sasrec", "--log-format", "xml"])
    assert r.exit_code == 2 and "--log-format must be one of text, json" in r.output


# ---- --version and every command's --help ---------------------------------------------------------
def test_version():
    from itemgen import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"itemgen {__version__}"


def _commands(cmd, path):
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, path + [name])


def test_every_help_ends_with_a_runnable_example():
    import typer

    paths = list(_commands(typer.main.get_command(app), []))
    assert ["train"] in paths and ["data", "prepare"] in paths and ["plot"] in paths and len(paths) >= 15
    for path in paths:
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        lines = [x.strip() for x in r.output.splitlines() if x.strip()]
        assert lines[-2] == "Example:", (path, lines[-3:])
        assert lines[-1].startswith(" ".join(["itemgen", *path]) + (" " if path else "")), (path, lines[-1])


def test_long_commands_take_quiet_and_log_format():
    for path in (["train"], ["tune"], ["evaluate"], ["quickstart"], ["data", "prepare"], ["data", "download"],
                 ["clusters", "build"], ["index", "build"], ["report"]):
        text = runner.invoke(app, [*path, "--help"]).output
        assert "--quiet" in text and "--log-format" in text, path
