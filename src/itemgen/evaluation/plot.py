"""Training curves of a run: loss and validation NDCG@10 / Recall@10 against the step, as a PNG
(``itemgen plot RUN``), read from ``RUN/history.jsonl`` (training/loop.py writes it; runs from
before it have only ``RUN/log.jsonl``, one row per validation, which is read instead)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from itemgen.core.io import atomic_write_bytes

HISTORY, LOG = "history.jsonl", "log.jsonl"


def read_history(run: str | Path) -> list[dict]:
    """The rows of RUN/history.jsonl (or RUN/log.jsonl), in step order; lines that are not JSON
    objects (a line cut short by a crash) are skipped."""
    run = Path(run)
    path = run / HISTORY if (run / HISTORY).is_file() else run / LOG
    if not path.is_file():
        hint = " (give the run folder, not its best/ or last/ checkpoint)" if (run / "model.safetensors").is_file() else ""
        raise FileNotFoundError(f"{run} has no {HISTORY} or {LOG}: not a training run folder{hint}")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows yet (the first is written after train.log_every steps)")
    return sorted(rows, key=lambda r: r["step"])


def plot_history(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN's loss and validation curves; -> the PNG written (default RUN/history.png),
    atomically (a temporary file renamed over it)."""
    rows = read_history(run)
    try:
        import matplotlib  # the plot extra
    except ImportError:
        raise ImportError("itemgen plot needs matplotlib: pip install 'itemgen[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # the plot extra

    out = Path(out) if out is not None else Path(run) / "history.png"
    loss = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    valid = [(r["step"], r["valid"]) for r in rows if isinstance(r.get("valid"), dict)]
    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(11, 4.2))
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:blue", lw=1.5)
    ax_loss.set(title="training loss (moving average)", xlabel="step", ylabel="loss")
    for key, color in (("ndcg@10", "tab:green"), ("recall@10", "tab:orange")):
        pts = [(s, v[key]) for s, v in valid if isinstance(v.get(key), (int, float))]
        if pts:
            ax_valid.plot(*zip(*pts), marker="o", ms=3, color=color, label=f"valid {key}")
    if valid:
        ax_valid.legend(loc="lower right")
    ax_valid.set(title="validation", xlabel="step", ylabel="metric")
    for ax in (ax_loss, ax_valid):
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run).resolve().name)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
