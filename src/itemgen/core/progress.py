"""Progress of long tasks, for a terminal and for log files alike.

    p = Progress("train sasrec", total=1000, unit="step", time_budget_s=180, every=50)
    for ...:
        p.update(1, loss=..., examples_per_s=...)   # a bar on a TTY; elsewhere a line every 50 steps
    p.log("valid ndcg@10 0.1234", valid={...})      # a line now (an evaluation), in every mode but quiet
    p.close()

Four modes, chosen once per task: ``quiet`` (nothing; errors and final results are the command's
business), ``json`` (one JSON object a line per event, for schedulers), ``bar`` (tqdm, when the
stream is a terminal) and ``lines`` (plain lines every ``every`` steps or ``every_s`` seconds:
what a log file, CI or a batch scheduler gets; never carriage returns).

The total is a step count, a time budget in seconds, or both: the task ends with whichever comes
first, so the fraction done is the larger of the two and the time remaining the smaller. A run
bounded by its time budget shows the budget, never a step count it will not reach.

Commands set the defaults once (``configure(quiet=..., format=...)``: their ``--quiet`` and
``--log-format``); library code creates tasks and events without knowing where they go.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

FORMATS = ("text", "json")


@dataclass(frozen=True)
class Settings:
    quiet: bool = False
    format: str = "text"  # text | json
    every_s: float = 10.0  # plain lines at most this often (tasks without a step interval)
    stream: Any = None  # None: sys.stderr when a task starts


_settings = Settings()


def configure(*, quiet: bool | None = None, format: str | None = None, every_s: float | None = None,
              stream: Any = None) -> Settings:
    """Set the defaults of every later task and event; -> the previous settings."""
    global _settings
    if format is not None and format not in FORMATS:
        raise ValueError(f"log format {format!r} is not one of {', '.join(FORMATS)}")
    before = _settings
    changes = {k: v for k, v in dict(quiet=quiet, format=format, every_s=every_s, stream=stream).items()
               if v is not None}
    _settings = replace(_settings, **changes)
    return before


def reset() -> None:
    """Back to the defaults (each command starts from them)."""
    global _settings
    _settings = Settings()


def settings() -> Settings:
    return _settings


def _stream(stream=None):
    return stream if stream is not None else (_settings.stream if _settings.stream is not None else sys.stderr)


def _mode(quiet: bool | None, format: str | None, stream) -> str:
    if _settings.quiet if quiet is None else quiet:
        return "quiet"
    if (format or _settings.format) == "json":
        return "json"
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        tty = False
    return "bar" if tty else "lines"


def clock_text(seconds: float | None) -> str:
    """1:02:03 / 2:03 (h:mm:ss or m:ss)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _value_text(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _field_text(key: str, v) -> str:
    if key.endswith("_per_s"):  # examples_per_s=612.3 -> "612 examples/s"
        return f"{v:,.1f} {key[:-6].replace('_', ' ')}/s" if isinstance(v, (int, float)) else f"{v} {key}"
    return f"{key.replace('_', ' ')} {_value_text(v)}"


def _json_line(stream, record: dict) -> None:
    stream.write(json.dumps(record, default=str) + "\n")
    stream.flush()


def _text_line(stream, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def event(task: str, message: str = "", *, quiet: bool | None = None, format: str | None = None,
          stream=None, **fields) -> None:
    """One log event outside a task's steps (a phase started, a file written): a plain line
    ``task: message  key value ...`` or a JSON object ``{"event": "message", "task", "message", ...}``."""
    out = _stream(stream)
    mode = _mode(quiet, format, out)
    if mode == "quiet":
        return
    if mode == "json":
        _json_line(out, {"event": "message", "task": task, "message": message, "time": round(time.time(), 3),
                         **fields})
        return
    extra = "  ".join(_field_text(k, v) for k, v in fields.items())
    _text_line(out, f"{task}: {message}" + (f"  {extra}" if extra else ""))


@contextmanager
def phase(task: str, what: str, *, after_s: float = 2.0, **fields) -> Iterator[None]:
    """A step of a task that reports no progress of its own (a FAISS k-means, reading a file).
    Once it has run ``after_s`` seconds, a line says what is running; when such a step ends, a
    line gives its duration. Quicker steps stay silent."""
    t0 = time.perf_counter()
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        event(task, f"{what} ...", **fields)

    timer = threading.Timer(after_s, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if announced.is_set():
        event(task, f"{what} done", seconds=round(time.perf_counter() - t0, 2))


class Progress:
    """See the module docstring. ``initial`` and ``elapsed_s`` continue a resumed task (steps and
    seconds done before); ``every``: a line every this many steps (lines and json modes), and
    ``every_s``: at least this often (default: the configured 10 s; None: steps only)."""

    _UNSET = object()

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "step", initial: int = 0,
                 time_budget_s: float | None = None, elapsed_s: float = 0.0, every: int | None = None,
                 every_s: float | None | object = _UNSET, quiet: bool | None = None, format: str | None = None,
                 stream=None, clock: Callable[[], float] = time.perf_counter):
        self.desc, self.steps_total, self.unit = desc, total, unit
        self.n = self.initial = initial
        self.time_budget_s, self.elapsed0 = time_budget_s, elapsed_s
        self.every = every
        self.every_s = _settings.every_s if every_s is Progress._UNSET else every_s
        self.clock = clock
        self.stream = _stream(stream)
        self.mode = _mode(quiet, format, self.stream)
        self.fields: dict = {}
        self.t0 = clock()
        self._last_line = self.t0
        self._lines = 0  # lines written (lines mode): a task that wrote none ends silently
        self._last_refresh = -math.inf
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, file=self.stream, desc=desc, dynamic_ncols=True, leave=True,
                             bar_format="{desc}")  # _refresh sets the real format
            self._refresh(force=True)
        elif self.mode == "json":
            self._emit("start")

    # ---- where the task stands --------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds of the whole task (including ``elapsed_s`` done before a resume)."""
        return self.elapsed0 + self.clock() - self.t0

    def rate(self) -> float | None:
        """Steps per second in this session (None before the first step)."""
        dt = self.clock() - self.t0
        done = self.n - self.initial
        return done / dt if done > 0 and dt > 0 else None

    def _steps_left_s(self) -> float | None:
        if self.steps_total is None:
            return None
        r = self.rate()
        return max(self.steps_total - self.n, 0) / r if r else None

    def _time_left_s(self) -> float | None:
        return None if self.time_budget_s is None else max(self.time_budget_s - self.elapsed(), 0.0)

    @property
    def bound(self) -> str | None:
        """What ends the task first, as far as one can tell now: "time", "steps" or None."""
        by_time, by_steps = self._time_left_s(), self._steps_left_s()
        if by_time is not None and (by_steps is None or by_time <= by_steps):
            return "time"
        return "steps" if self.steps_total is not None else None

    @property
    def total(self) -> float | None:
        """The total of the bound that ends the task: the time budget (seconds) or the steps."""
        return self.time_budget_s if self.bound == "time" else self.steps_total

    @property
    def total_unit(self) -> str:
        return "s" if self.bound == "time" else self.unit

    def remaining(self) -> float | None:
        """Seconds left: the smaller of the steps' ETA and the time budget left."""
        left = [x for x in (self._time_left_s(), self._steps_left_s()) if x is not None]
        return min(left) if left else None

    def fraction(self) -> float | None:
        parts = []
        if self.steps_total:
            parts.append(self.n / self.steps_total)
        if self.time_budget_s:
            parts.append(self.elapsed() / self.time_budget_s)
        return min(max(parts), 1.0) if parts else None

    def state(self) -> dict:
        """The figures of a progress event (the JSON object, and the words of a line)."""
        out = {"task": self.desc, self.unit: self.n, "total": self.total, "unit": self.total_unit,
               "bound": self.bound, "elapsed_s": round(self.elapsed(), 2)}
        rem = self.remaining()
        out["remaining_s"] = None if rem is None else round(rem, 2)
        return {**out, **self.fields}

    def _position_text(self) -> str:
        if self.bound == "time":
            frac = self.fraction()
            return f"{self.unit} {self.n:,} ({frac:.0%} of the {clock_text(self.time_budget_s)} time budget)"
        if self.steps_total:
            return f"{self.unit} {self.n:,}/{self.steps_total:,} ({self.n / self.steps_total:.0%})"
        return f"{self.unit} {self.n:,}"

    def line(self) -> str:
        """``desc  step 100/1000 (10%)  loss 3.4567  612.0 examples/s  elapsed 0:12  remaining 1:48``"""
        parts = [self.desc, self._position_text(), *(_field_text(k, v) for k, v in self.fields.items())]
        if not any(k.endswith("_per_s") for k in self.fields):
            r = self.rate()
            if r is not None:
                parts.append(_field_text(f"{self.unit}s_per_s", r))
        parts.append(f"elapsed {clock_text(self.elapsed())}")
        rem = self.remaining()
        if rem is not None:
            parts.append(f"remaining {clock_text(rem)}")
        return "  ".join(parts)

    # ---- reporting --------------------------------------------------------------------------
    def _emit(self, kind: str, message: str = "", **extra) -> None:
        record = {"event": kind, **self.state(), **extra}
        if message:
            record["message"] = message
        _json_line(self.stream, record)

    def _refresh(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_refresh < 0.2:
            return
        self._last_refresh = now
        bar = self._bar
        total = self.total
        if self.bound == "time":  # the bar fills with the budget's seconds
            bar.total, bar.n = total, min(self.elapsed(), total)
        else:
            bar.total, bar.n = total, self.n
        # our own figures after the bar (tqdm's rate and ETA would count seconds as steps)
        text = self.line().removeprefix(self.desc).strip().replace("{", "{{").replace("}", "}}")
        bar.bar_format = ("{desc} {percentage:3.0f}%|{bar}| " if total else "{desc} ") + text
        bar.refresh()

    def update(self, n: int = 1, *, line: bool = True, **fields) -> None:
        """``n`` more steps done; ``fields`` (loss=..., epoch=...) replace the shown figures.
        ``line=False``: no periodic line now (a ``log`` for this step follows)."""
        self.n += n
        self.fields.update(fields)
        if self.mode == "quiet":
            return
        if self.mode == "bar":
            self._refresh()
            return
        now = self.clock()
        due = line and ((self.every is not None and self.n % self.every == 0) or
                        (self.every_s is not None and now - self._last_line >= self.every_s))
        if due:
            self._last_line = now
            if self.mode == "json":
                self._emit("progress")
            else:
                self._lines += 1
                _text_line(self.stream, self.line())

    def log(self, message: str, **fields) -> None:
        """A line now, whatever the interval (an evaluation): the progress line and ``message``;
        in json mode an ``{"event": "log", ...}`` object with ``fields`` (e.g. valid metrics)."""
        if self.mode == "quiet":
            return
        self._last_line = self.clock()
        if self.mode == "json":
            self._emit("log", message, **fields)
        elif self.mode == "bar":
            self._bar.write(f"{self.line()}  {message}", file=self.stream)
            self._refresh(force=True)
        else:
            self._lines += 1
            _text_line(self.stream, f"{self.line()}  {message}")

    def close(self, message: str = "") -> None:
        """The end of the task: the bar stays on screen; json gets an end event, lines a last
        line if the task wrote any before (a short task stays silent) or ``message`` says why it ended."""
        if self.mode == "bar":
            self._refresh(force=True)
            self._bar.close()
        elif self.mode == "json":
            self._emit("end", message)
        elif self.mode == "lines" and (message or self._lines):
            _text_line(self.stream, f"{self.desc}  {message or 'done'}  {self._position_text()}  "
                                    f"elapsed {clock_text(self.elapsed())}")
        self.mode = "quiet"  # closing twice (an exception path, then a finally) writes nothing more

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

