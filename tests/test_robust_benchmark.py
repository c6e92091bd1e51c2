"""benchmarks/robust.py: the flat-state adapter, Square's mapping onto torchattacks' unit box,
the crediting rule and goal check, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import robust as bench
from benchmarks.common import MultiScaleConvCell


def test_flat_cell_is_f_on_the_split_two_scale_state() -> None:
    """FlatCell must split a flat state into the scales in order and flatten f's output back:
    catches a swapped split, a wrong reshape or a transposed flatten (the flat-state layers
    would then run a different f than the other rows)."""
    torch.manual_seed(0)
    f = MultiScaleConvCell(2, 2)
    shapes = ((2, 8, 8), (4, 4, 4))
    cell = bench.FlatCell(f, shapes)
    zs = (torch.randn(3, 2, 8, 8), torch.randn(3, 4, 4, 4))
    x = torch.randn(3, 2, 8, 8)
    flat = torch.cat([z.flatten(1) for z in zs], dim=1)
    unflat = cell.unflatten(flat)
    assert all(torch.equal(a, b) for a, b in zip(unflat, zs, strict=True))
    expected = torch.cat([t.flatten(1) for t in f(zs, x)], dim=1)
    torch.testing.assert_close(cell(flat, x), expected)


class SumThreshold(torch.nn.Module):
    """Class 1 iff the sum of the inputs exceeds ``t``: easy to fool near the threshold."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(dim=1) - self.t
        return torch.stack([-s, s], dim=1)


def test_square_on_spirals_stays_in_the_eps_ball_and_the_box() -> None:
    """Square runs on torchattacks' [0, 1] images; the benchmark maps the spirals' box onto
    them and scales eps by 1 / (hi - lo). A missing or doubled scaling moves points farther
    than eps (or much less far); a wrong reshape or offset moves them out of the box."""
    pytest.importorskip("torchattacks")
    task = bench.load_task("spirals", 8, n_train=64, n_test=16)
    lo, hi = bench.box(task)
    assert hi - lo > 2  # the spirals' box is not [0, 1]: the scaling is exercised
    eps = 0.1
    x = task.x_test
    model = SumThreshold(float(x.sum(dim=1).max()) + eps)  # every point is class 0
    attack = bench.square_attack(model, task, eps, queries=20, seed=0)
    x_adv = attack(x, torch.zeros(len(x), dtype=torch.long))
    delta = (x_adv - x).abs().amax(dim=1)
    assert float(delta.max()) <= eps + 1e-5
    fooled = model(x_adv).argmax(dim=1) == 1
    assert bool(fooled.any())  # Square returns only its successful perturbations
    assert float(delta[fooled].min()) >= 0.5 * eps  # at the scale of eps
    assert float(x_adv.min()) >= lo - 1e-6 and float(x_adv.max()) <= hi + 1e-6


def _row(task: str, model: str, clean: float, pgd: float, unrolled: float, square: float
         ) -> dict:
    row = {"task": task, "model": model, "clean": clean, "pgd_eps1": pgd,
           "pgd_unrolled_eps1": unrolled, "square_eps1": square}
    bench.credit(row)
    return row


def test_credit_takes_the_worst_attack_only_where_the_three_agree() -> None:
    """A defence is credited with the lowest of the three accuracies only where they agree
    within AGREE points: catches crediting the best attack or ignoring the spread."""
    agreeing = _row("t", "m", 90, 50, 48, 52)
    assert agreeing["credited"] and agreeing["worst_eps1"] == 48
    masked = _row("t", "m", 90, 70, 40, 45)  # the implicit gradient is masked
    assert not masked["credited"] and masked["spread_eps1"] == 30


def test_goal_check_needs_the_gain_under_every_attack_on_two_tasks() -> None:
    """The goal: >= 3 points over DEQ + AT under all three attacks, clean within 1 point, on
    two tasks. Catches a check that looks at the implicit PGD only, skips the clean-accuracy
    condition, or counts one task as enough."""
    rows = [
        _row("a", "DEQ + AT", 80, 40, 40, 45), _row("a", "DEQ + AT + RIS", 80.5, 44, 44, 49),
        _row("b", "DEQ + AT", 80, 40, 40, 45), _row("b", "DEQ + AT + RIS", 79.5, 45, 45, 50),
        # task c: the gain does not survive Square
        _row("c", "DEQ + AT", 80, 40, 40, 45), _row("c", "DEQ + AT + RIS", 80, 45, 45, 46),
        # task d: clean accuracy drops by 2 points
        _row("d", "DEQ + AT", 80, 40, 40, 45), _row("d", "DEQ + AT + RIS + ER", 78, 50, 50, 55),
    ]
    lines = bench.goal_check(rows)
    assert any("DEQ + AT + RIS: goal MET" in line and "a, b;" in line for line in lines)
    assert any(line.startswith("- c, DEQ + AT + RIS ") and line.endswith("missed")
               for line in lines)
    assert any("DEQ + AT + RIS + ER: goal NOT MET" in line for line in lines)
    only_a = bench.goal_check(rows[:2])
    assert any("DEQ + AT + RIS: goal NOT MET" in line for line in only_a)


def test_quick_run_writes_rows_for_every_model_and_attack(tmp_path: Path) -> None:
    """The tiny run must produce one row per requested model with every column in [0, 100]
    and the files the docs read; catches a row silently dropped, a column not filled, or an
    accuracy reported as a fraction."""
    pytest.importorskip("torchattacks")
    cfg = bench.Config(**bench.QUICK)
    cfg.tasks = ("spirals",)
    cfg.models = ("DEQ", "DEQ + AT", "DEQ + AT + RIS", "DEQ + AT + RIS + ER", "NeuralSDE")
    figure = tmp_path / "fig.png"
    bench.run(cfg, name="quick", out=tmp_path, figure=figure)
    rows = json.loads((tmp_path / "quick.json").read_text())
    assert [r["model"] for r in rows] == list(cfg.models)
    for r in rows:
        for key in ("clean", "pgd_eps1", "pgd_eps2", "pgd_unrolled_eps1", "square_eps1"):
            assert 0 <= r[key] <= 100
        assert r["infer_nfe"] >= 1
    assert any(r["clean"] > 1 for r in rows)  # percentages, not fractions
    assert "| spirals | NeuralSDE |" in (tmp_path / "quick.md").read_text()
    assert figure.stat().st_size > 1000
