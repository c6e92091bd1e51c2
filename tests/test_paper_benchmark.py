"""Smoke test of benchmarks/paper.py: tiny setting, outputs written, ratios consistent."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import common, paper

MODELS = ["NeuralODE", "NeuralODE adjoint", "DEQ(ode, ptc)", "DEQ(anderson)",
          "DEQ(picard) jfb", "SkipDEQ(ode, dopri5)", "SkipRegDEQ(ode, ptc)", "torchdeq default",
          "torchdeq IFT"]


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9)


def _check_ratios(rows: list[dict]) -> None:
    for task in {r["task"] for r in rows}:
        trows = {r["model"]: r for r in rows if r["task"] == task}
        node = trows["NeuralODE"]
        assert node["target_acc"] == pytest.approx(node["final_acc"] - 0.5)
        assert node["ratio_node_epoch"] == pytest.approx(1.0)
        best = trows.get(node["torchdeq_best"]) if node["torchdeq_best"] else None
        for r in trows.values():
            assert _close(r["ratio_node_epoch"], r["s_per_epoch"] / node["s_per_epoch"])
            if r["time_to_target_s"] is not None and node["time_to_target_s"] is not None:
                assert _close(r["ratio_node_target"],
                              r["time_to_target_s"] / node["time_to_target_s"])
            else:
                assert r["ratio_node_target"] is None
            if best is None:
                assert r["ratio_torchdeq_epoch"] is None
            else:
                assert _close(r["ratio_torchdeq_epoch"], r["s_per_epoch"] / best["s_per_epoch"])
            assert r["forward_nfe"] > 0
            assert len(r["history"]) == 2
            assert all(0 <= h["test_acc"] <= 100 for h in r["history"])


def test_paper_smoke_writes_outputs(tmp_path: Path) -> None:
    rows = paper.main(["--smoke", "--out", str(tmp_path), "--tasks", "digits-mlp", "spirals",
                       "--models", *MODELS, "--tol", "1e-4"])
    md = (tmp_path / "paper_smoke.md").read_text()
    data = json.loads((tmp_path / "paper_smoke.json").read_text())
    assert (tmp_path / "paper_smoke_accuracy.png").stat().st_size > 0
    assert (tmp_path / "paper_smoke_nfe.png").stat().st_size > 0
    assert (tmp_path / "paper_smoke_key.png").stat().st_size > 0
    assert len(data) == len(rows)
    contdeq_models = [m for m in MODELS if not m.startswith("torchdeq")]
    for task in ("digits-mlp", "spirals"):
        names = [r["model"] for r in rows if r["task"] == task]
        assert names[:len(contdeq_models)] == contdeq_models
    for name in contdeq_models:
        assert f"| {name} |" in md
    assert "atol = rtol = 0.0001" in md
    _check_ratios(data)
    by = {(r["task"], r["model"]): r for r in rows}
    assert by["digits-mlp", "NeuralODE"]["backward_iterations"] is None
    assert by["digits-mlp", "NeuralODE adjoint"]["backward_iterations"] > 0
    assert by["digits-mlp", "DEQ(anderson)"]["backward_iterations"] > 0
    assert by["digits-mlp", "DEQ(picard) jfb"]["backward_iterations"] == 0
    for task in ("digits-mlp", "spirals"):
        skip, base = by[task, "SkipRegDEQ(ode, ptc)"], by[task, "DEQ(ode, ptc)"]
        assert _close(skip["ratio_deq_infer_nfe"], skip["infer_nfe"] / base["infer_nfe"])
        assert by[task, "SkipDEQ(ode, dopri5)"]["ratio_deq_infer_nfe"] is None  # no base row
        assert base["ratio_deq_target"] is None and base["ratio_deq_infer_nfe"] is None
    assert common.TOL["tol"] == 5e-3  # --tol applies to its run only
    assert "### Headline" in md


def _row(model: str, epoch: float, target: float | None, **extra: float) -> dict:
    return {"task": "t", "model": model, "s_per_epoch": epoch, "time_to_target_s": target,
            **extra}


def test_headline_speedups() -> None:
    rows = [_row("NeuralODE", 1.0, 6.0), _row("DEQ(ode, ptc)", 0.5, 2.0),
            _row("DEQ(ode, ptc) jfb", 0.25, 1.5),
            _row("SkipRegDEQ(ode, ptc)", 0.4, 1.0, ratio_deq_target=0.5),
            _row("SkipDEQ(ode, ptc)", 0.4, 3.0, ratio_deq_infer_nfe=0.25),
            _row("SkipDEQ(ode, ptc) paper loss", 0.3, None, ratio_deq_infer_nfe=0.1),
            _row("DEQ(picard) jfb", 0.2, 0.8), _row("DEQ(picard)", 0.5, 3.0),
            _row("torchdeq default", 0.4, 1.6), _row("torchdeq IFT", 1.0, 2.0)]
    cells = paper.task_headline(rows)
    assert cells["DEQ(ode) vs NODE"] == "ptc 3.00×, ptc jfb 4.00×"
    assert cells["best skip vs DEQ(ode)"] == "SkipRegDEQ(ode, ptc) 2.00×"
    # the paper-loss row has fewer NFE but never reached the target: it does not count
    assert cells["SkipDEQ infer NFE ×DEQ(ode)"] == "0.25 SkipDEQ(ode, ptc)"
    assert cells["picard jfb vs torchdeq default (epoch / target)"] == "2.00× / 2.00×"
    assert cells["picard IFT vs torchdeq IFT (epoch / target)"] == "2.00× / 0.67×"
    assert cells["contdeq best vs torchdeq best"] == "DEQ(picard) jfb 2.00×"
    assert paper.headline(rows).count("\n") == 3


def test_tolerance_reaches_every_model() -> None:
    """set_tolerance changes the tolerances of models built afterwards (every kind)."""
    task = common.load_task("digits-mlp", 4, 16, 8)
    saved = dict(common.TOL)
    try:
        common.set_tolerance(1e-3)
        deq = common.build_model("SkipRegDEQ(ode, ptc) paper loss", task, 0).layer
        node = common.build_model("NeuralODE", task, 0).layer
    finally:
        common.TOL.update(saved)
    assert deq.solver.options["atol"] == deq.solver.options["rtol"] == 1e-3
    assert deq.backward_mode.rtol == 1e-3
    assert (deq.skip_weight, deq.skip_norm, deq.skip_detach) == (5.0, "l1", False)
    assert node.rtol == node.atol == pytest.approx(1e-4)


def test_skip_baseline_names() -> None:
    assert common.skip_baseline("MS SkipRegDEQ(ode, ptc) paper loss") == "MS DEQ(ode, ptc)"
    assert common.skip_baseline("SkipDEQ(ode, dopri5)") == "DEQ(ode, dopri5)"
    assert common.skip_baseline("DEQ(ode, ptc)") is None


def test_paper_without_torchdeq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paper, "has_torchdeq", lambda: False)
    rows = paper.main(["--smoke", "--out", str(tmp_path), "--tasks", "digits-mlp",
                       "--models", "NeuralODE", "DEQ(anderson)", "torchdeq default"])
    assert [r["model"] for r in rows] == ["NeuralODE", "DEQ(anderson)"]
    assert "torchdeq rows skipped" in (tmp_path / "paper_smoke.md").read_text()
    assert all(r["ratio_torchdeq_epoch"] is None for r in rows)


def test_paper_resume(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    args = ["--smoke", "--out", str(tmp_path), "--tasks", "digits-mlp", "--models",
            "NeuralODE", "DEQ(anderson)", "--checkpoint-dir", str(ckpt)]
    first = paper.main([*args, "--epochs", "1"])
    assert (ckpt / "digits-mlp" / "DEQ_anderson_s0.pt").is_file()
    resumed = paper.main([*args, "--epochs", "2", "--resume"])
    for a, b in zip(first, resumed, strict=True):
        assert len(b["history"]) == 2
        assert b["history"][0] == a["history"][0]  # the first epoch was loaded, not re-run


def test_paper_multiscale_task(tmp_path: Path) -> None:
    names = ["MS NeuralODE", "MS DEQ(ode, ptc)", "MS SkipDEQ(ode, ptc)", "DEQ(anderson)"]
    rows = paper.main(["--smoke", "--out", str(tmp_path), "--tasks", "images-multiscale",
                       "--models", *names])
    assert [r["model"] for r in rows] == names[:3]  # single-scale models do not apply
    node = rows[0]
    assert node["target_acc"] == pytest.approx(node["final_acc"] - 0.5)
    for r in rows:
        assert _close(r["ratio_node_epoch"], r["s_per_epoch"] / node["s_per_epoch"])
        assert r["forward_nfe"] > 0 and r["ratio_torchdeq_epoch"] is None
    assert rows[1]["backward_iterations"] > 0


def _accuracies(histories: dict[str, list[dict]]) -> dict[str, list[float]]:
    return {name: [h["test_acc"] for h in hist] for name, hist in histories.items()}


def test_interleaved_training_matches_training_alone() -> None:
    """Epoch-by-epoch interleaving shares nothing between models: each learns as it would
    alone; a model that fails is noted and dropped while the others finish."""
    cfg = replace(common.Config(), **common.PRESETS["smoke"])
    task = common.load_task("digits-mlp", cfg.width["digits-mlp"], cfg.n_train, cfg.n_test)
    names = ["NeuralODE", "DEQ(ode, ptc)", "SkipDEQ(ode, ptc)"]
    together = common.train_interleaved(task, names, cfg, 0, None, False, [])
    alone = {}
    for name in names:
        alone.update(common.train_interleaved(task, [name], cfg, 0, None, False, []))
    assert _accuracies(together) == _accuracies(alone)
    assert all(len(h) == cfg.epochs for h in together.values())

    def broken(self: common.Cell) -> None:
        raise FloatingPointError("diverged")

    notes: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        original = common.Cell.train_epoch
        mp.setattr(common.Cell, "train_epoch",
                   lambda self: broken(self) if self.name == "DEQ(ode, ptc)" else original(self))
        survived = common.train_interleaved(task, names, cfg, 0, None, False, notes)
    assert list(survived) == ["NeuralODE", "SkipDEQ(ode, ptc)"]
    assert _accuracies(survived) == {n: _accuracies(alone)[n] for n in survived}
    assert notes == ["FAILED digits-mlp / DEQ(ode, ptc): FloatingPointError: diverged"]
