"""The step profile (``common.timed_step``, ``paper.py --profile``): a training step split into
forward / backward solve and rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import paper
from benchmarks.common import PARTS, build_model, load_task, timed_step


def test_parts_add_up_to_the_step() -> None:
    task = load_task("digits-mlp", 4, 32, 8)
    for name, solves_backward in (("DEQ(ode, ptc)", True), ("DEQ(ode, ptc) jfb", False),
                                  ("NeuralODE", False)):
        model = build_model(name, task, 0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        record = timed_step(model, opt, task.x_train[:8], task.y_train[:8])
        parts = sum(record[k] for k in PARTS if k != "step")
        assert parts == pytest.approx(record["step"], rel=1e-9)
        assert record["forward_solve"] > 0 and record["forward_nfe"] >= 1
        assert (record["backward_solve"] > 0) == solves_backward
        assert ((record["backward_iterations"] or 0) > 0) == solves_backward


def test_profile_table_bounds_the_deq_rows(tmp_path: Path) -> None:
    """``--profile`` adds the table: a row per model, DEQ(ode, ptc) as the step reference, a
    perfect guess no slower than the step for the DEQ rows and no bound for the NeuralODE."""
    models = ["NeuralODE", "DEQ(ode, ptc)", "SkipDEQ(ode, ptc)"]
    rows = paper.main(["--smoke", "--profile", "--tasks", "digits-mlp", "--models", *models,
                       "--name", "profile", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == models
    for r in rows:
        last = r["history"][-1]
        assert last["step_ms"] > 0 and last["median_forward_nfe"] >= 1
    md = (tmp_path / "profile.md").read_text()
    table = md[md.index("### Step profile"):]
    lines = {line.split(" | ")[1]: line for line in table.splitlines() if "| digits-mlp |" in line}
    assert list(lines) == models
    assert lines["NeuralODE"].endswith("| - | - |")
    assert "| 1.00 |" in lines["DEQ(ode, ptc)"]
    for name in ("DEQ(ode, ptc)", "SkipDEQ(ode, ptc)"):
        guess, bound = lines[name].rstrip(" |").split(" | ")[-2:]
        assert float(guess) <= rows[models.index(name)]["history"][-1]["step_ms"]
        assert float(bound.rstrip("×")) >= 1.0
