"""benchmarks/step_profile.py: a training step split into forward / backward solve and rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import step_profile
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
        assert (record["backward_iterations"] > 0) == solves_backward


def test_main_writes_the_table(tmp_path: Path) -> None:
    models = ["NeuralODE", "DEQ(ode, ptc)", "SkipDEQ(ode, ptc)"]
    rows = step_profile.main(["--tasks", "digits-mlp", "--models", *models, "--epochs", "1",
                              "--n-train", "64", "--out", str(tmp_path)])
    by_model = {r["model"]: r for r in rows}
    assert list(by_model) == models
    assert by_model["DEQ(ode, ptc)"]["step_vs_deq"] == pytest.approx(1.0)
    assert by_model["NeuralODE"]["bound"] is None
    for name in ("DEQ(ode, ptc)", "SkipDEQ(ode, ptc)"):
        row = by_model[name]
        assert row["perfect_guess"] <= row["step"] and row["bound"] >= 1.0
    md = (tmp_path / "step_profile.md").read_text()
    assert md.count("| digits-mlp |") == len(models)
    assert (tmp_path / "step_profile.json").is_file()
    with pytest.raises(SystemExit):
        step_profile.main(["--epochs", "0"])
