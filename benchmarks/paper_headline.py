"""The paper benchmark's headline: the issue's goals, read off the rows of one run.

Per task, from the rows :func:`paper.summarize` produced (or ``<name>.json``):

* DEQ(ode) (ptc and dopri5 with the implicit gradient; ptc with JFB) against the NeuralODE:
  time to target accuracy, as a speed-up (goal >= 3x);
* the best skip row against the DEQ(ode) row of its ODE method (goal >= 2x), and the lowest
  inference-NFE ratio of a SkipDEQ row that reached the target accuracy (goal <= 1/3; a row
  that fails the task does not count);
* like for like against torchdeq: DEQ(picard) jfb against torchdeq's default (fixed-point
  iteration + 1-step gradient) and DEQ(picard) against torchdeq IFT (fixed-point forward,
  implicit backward), per epoch and to target; contdeq's best model against torchdeq's best
  configuration, to target (goal >= 1.2x).

Speed-ups are ``reference time / model time`` (> 1: the model is faster); ``-`` where a time
is missing (a model that never reached the target).

Usage: ``python benchmarks/paper_headline.py benchmarks/results/paper.json`` writes
``paper_headline.md`` beside it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["headline", "main", "ratio"]

Row = dict[str, Any]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; ``None`` where either is missing or NaN, or ``b <= 0``. A speed-up is
    ``ratio(reference time, model time)``."""
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
        return None
    return a / b


def _to_target(reference: Row, row: Row) -> float | None:
    """Speed-up of ``row`` over ``reference`` in time to the target accuracy."""
    return ratio(reference["time_to_target_s"], row["time_to_target_s"])


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def _best(rows: list[Row], key: str = "time_to_target_s") -> Row | None:
    timed = [r for r in rows if r.get(key) is not None]
    return min(timed, key=lambda r: r[key]) if timed else None


def _pair(by: dict[str, Row], ours: str, theirs: str) -> str:
    """``epoch a× / target b×`` speed-up of ``ours`` over ``theirs``."""
    a, b = by.get(ours), by.get(theirs)
    if a is None or b is None:
        return "-"
    return f"{_x(ratio(b['s_per_epoch'], a['s_per_epoch']))} / {_x(_to_target(b, a))}"


def task_headline(rows: list[Row]) -> dict[str, str]:
    """The headline cells of one task's rows."""
    by = {r["model"]: r for r in rows}
    ms = "MS " if any(m.startswith("MS ") for m in by) else ""
    node = by.get(f"{ms}NeuralODE")
    node_t = node and node["time_to_target_s"]
    deq = {label: ratio(node_t, by[f"{ms}{m}"]["time_to_target_s"])
           for label, m in (("ptc", "DEQ(ode, ptc)"), ("dopri5", "DEQ(ode, dopri5)"),
                            ("ptc jfb", "DEQ(ode, ptc) jfb")) if f"{ms}{m}" in by}
    skips = [r for r in rows if r.get("ratio_deq_target") is not None]
    best_skip = min(skips, key=lambda r: r["ratio_deq_target"]) if skips else None
    skip_nfe = [r for r in rows if r["model"].startswith(f"{ms}SkipDEQ")
                and r.get("ratio_deq_infer_nfe") is not None
                and r.get("time_to_target_s") is not None]
    best_nfe = min(skip_nfe, key=lambda r: r["ratio_deq_infer_nfe"]) if skip_nfe else None
    tdeq = [r for r in rows if r["model"].startswith("torchdeq")]
    ours = [r for r in rows if not r["model"].startswith(("torchdeq", "NeuralODE", "MS Neural"))]
    best_ours, best_tdeq = _best(ours), _best(tdeq)
    return {
        "task": rows[0]["task"],
        "DEQ(ode) vs NODE": ", ".join(f"{label} {_x(v)}" for label, v in deq.items()) or "-",
        "best skip vs DEQ(ode)": (f"{best_skip['model'].removeprefix(ms)} "
                                  f"{_x(1 / best_skip['ratio_deq_target'])}" if best_skip
                                  else "-"),
        "SkipDEQ infer NFE ×DEQ(ode)": (
            f"{best_nfe['ratio_deq_infer_nfe']:.2f} {best_nfe['model'].removeprefix(ms)}"
            if best_nfe else "-"),
        "picard jfb vs torchdeq default (epoch / target)": _pair(by, "DEQ(picard) jfb",
                                                                 "torchdeq default"),
        "picard IFT vs torchdeq IFT (epoch / target)": _pair(by, "DEQ(picard)", "torchdeq IFT"),
        "contdeq best vs torchdeq best": (
            f"{best_ours['model']} {_x(_to_target(best_tdeq, best_ours))}"
            if best_ours and best_tdeq else "-"),
    }


def headline(rows: list[Row]) -> str:
    """Markdown table, one line per task."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = [task_headline([r for r in rows if r["task"] == t]) for t in tasks]
    if not cells:
        return ""
    keys = list(cells[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(c[k] for k in keys) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python benchmarks/paper_headline.py RESULTS.json")
    path = Path(args[0])
    out = path.with_name(f"{path.stem}_headline.md")
    out.write_text(headline(json.loads(path.read_text())))
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
