"""Backward variants: DEQ(ode, ptc) and a skip DEQ trained with each backward mode, time to target.

``python -m benchmarks.backward_variants --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import contdeq

from .common import (
    RESULTS,
    TASKS,
    TOL,
    Cell,
    Config,
    Task,
    aggregate,
    fmt,
    load_task,
    machine_header,
    make_parser,
    ratio,
    table,
    threads,
    time_to_target,
    train_cells,
    write_results,
)

#: Backward variant name -> mode factory (read :data:`TOL` when called).
#: Unconverged (capped) solves are counted in the table, not warned about at every step.
VARIANTS: dict[str, Callable[[], contdeq.BackwardMode]] = {
    "implicit": lambda: contdeq.Implicit(rtol=TOL["backward_rtol"],
                                         max_steps=TOL["backward_max_steps"],
                                         on_nonconvergence="ignore"),
    "phantom 5/0.5": lambda: contdeq.Phantom(steps=5, damping=0.5),
    "phantom 3/1": lambda: contdeq.Phantom(steps=3, damping=1.0),
    "truncated 10 1e-3": lambda: contdeq.Implicit(rtol=1e-3, max_steps=10,
                                                  on_nonconvergence="ignore"),
    "truncated 3": lambda: contdeq.Implicit(rtol=TOL["backward_rtol"], max_steps=3,
                                            on_nonconvergence="ignore"),
    "warm": lambda: contdeq.WarmImplicit(rtol=TOL["backward_rtol"],
                                         max_steps=TOL["backward_max_steps"],
                                         on_nonconvergence="ignore", start="scaled"),
    "warm previous": lambda: contdeq.WarmImplicit(rtol=TOL["backward_rtol"],
                                                  max_steps=TOL["backward_max_steps"],
                                                  on_nonconvergence="ignore", start="previous"),
    "jfb": contdeq.JFB,
}
DEFAULT_VARIANTS = ("implicit", "phantom 5/0.5", "phantom 3/1", "truncated 10 1e-3", "warm",
                    "jfb")
#: The multi-scale task's variants by default (one of its epochs costs ~10 of the others').
MULTISCALE_VARIANTS = ("implicit", "phantom 5/0.5", "jfb")
#: The base models (``common.MODELS``); ``MS`` versions on the multi-scale task.
MODELS = ("DEQ(ode, ptc)", "SkipRegDEQ(ode, ptc)", "SkipDEQ(ode, ptc)",
          "SkipRegDEQ(ode, ptc) paper loss")
DEFAULT_MODELS = MODELS[:2]
BASELINE = ("DEQ(ode, ptc)", "implicit")
PAPER_JSON = RESULTS / "paper.json"


def paper_targets(path: Path = PAPER_JSON) -> dict[str, float]:
    """The paper benchmark's target accuracy (%) per task, from its published JSON."""
    rows = json.loads(path.read_text())
    return {r["task"]: r["target_acc"] for r in rows if r.get("target_acc") is not None}


class BackwardTally:
    """Counts, at each training forward of a layer, whether the previous step's backward met
    its tolerance (a forward pre-hook: the stats are still the previous step's)."""

    def __init__(self) -> None:
        self.tested = 0
        self.converged = 0

    def __call__(self, layer: torch.nn.Module, args: Any) -> None:
        stats = layer.stats
        if not layer.training or stats is None or stats.backward is None:
            return
        if stats.backward.stop_reason != "depth":  # phantom: no convergence test
            self.tested += 1
            self.converged += int(stats.backward.all_converged)

    def take(self) -> float:
        """The fraction of tested backward solves that converged since the last call (nan
        when none was tested)."""
        fraction = self.converged / self.tested if self.tested else math.nan
        self.tested = self.converged = 0
        return fraction


def variant_cell(task: Task, base: str, variant: str, cfg: Config, seed: int
                 ) -> tuple[Cell, BackwardTally]:
    """A :class:`common.Cell` of model ``base`` (its ``MS`` version on a multi-scale task) whose
    layer uses backward ``variant``, named ``"<base> <variant>"``, and the tally of its
    backward solves."""
    cell = Cell(task, base, cfg, seed)
    cell.model.layer.backward_mode = VARIANTS[variant]()
    cell.name = f"{base} {variant}"
    tally = BackwardTally()
    cell.model.layer.register_forward_pre_hook(tally)
    return cell, tally


def train_variants(task: Task, pairs: list[tuple[str, str]], cfg: Config, seed: int,
                   notes: list[str]) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Train the ``(model, variant)`` cells interleaved epoch by epoch (:func:`train_cells`).
    Each epoch's record gains ``backward_converged``: the fraction of its steps whose backward
    met its tolerance (``nan`` without a tested solve)."""
    cells, tallies = {}, {}
    for pair in pairs:
        cells[pair], tallies[pair] = variant_cell(task, *pair, cfg, seed)

    def tally(pair: tuple[str, str]) -> None:
        cells[pair].history[-1]["backward_converged"] = tallies[pair].take()
    return train_cells(task, dict(cells), cfg.epochs, seed, notes, tally)


def summarize(task: Task, histories: dict[tuple[str, str], list[dict[str, float]]],
              target: float | None) -> list[dict[str, Any]]:
    """One row per cell: time to target, accuracy, NFE, backward iterations, ratios."""
    rows = []
    for (base, variant), hist in histories.items():
        ttt = time_to_target(hist, target)
        conv = [r["backward_converged"] for r in hist if not math.isnan(r["backward_converged"])]
        rows.append({
            "task": task.name, "model": base, "variant": variant, "target_acc": target,
            "s_per_epoch": sum(r["train_s"] for r in hist) / len(hist),
            "time_to_target_s": ttt, "final_acc": hist[-1]["test_acc"],
            "best_acc": max(r["test_acc"] for r in hist),
            "forward_nfe": sum(r["forward_nfe"] for r in hist) / len(hist),
            "backward_iterations": sum(r["backward_iterations"] for r in hist) / len(hist),
            "backward_converged": sum(conv) / len(conv) if conv else None,
            "history": hist,
        })
    base = next((r for r in rows if (r["model"], r["variant"]) == BASELINE), None)
    same_model = {(r["model"]): r for r in rows if r["variant"] == "implicit"}
    for r in rows:
        r["speedup_vs_deq_implicit"] = ratio(base and base["time_to_target_s"],
                                             r["time_to_target_s"])
        own = same_model.get(r["model"])
        r["speedup_vs_own_implicit"] = ratio(own and own["time_to_target_s"],
                                             r["time_to_target_s"])
        r["epoch_speedup_vs_deq_implicit"] = ratio(base and base["s_per_epoch"],
                                                   r["s_per_epoch"])
    return rows


def to_markdown(rows: list[dict[str, Any]], header: str, notes: list[str]) -> str:
    """A table per task and the goal line (skip variant >= 1.5x faster to target)."""
    lines = [header, ""] + [f"* {n}" for n in notes] + [""]
    for tname in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == tname]
        cells = ((r["model"], r["variant"], f"{r['s_per_epoch']:.3f}", fmt(r["time_to_target_s"]),
                  f"{r['final_acc']:.1f}", f"{r['best_acc']:.1f}", f"{r['forward_nfe']:.1f}",
                  fmt(r["backward_iterations"], ".1f"), fmt(r["backward_converged"]),
                  fmt(r["speedup_vs_deq_implicit"]), fmt(r["speedup_vs_own_implicit"]),
                  fmt(r["epoch_speedup_vs_deq_implicit"])) for r in trows)
        lines.append(table(
            "model | backward | s/epoch | time to target s | final acc % | best acc % | fwd NFE | "
            "bwd iters | bwd converged | ×DEQ(ode, ptc) implicit (target) | ×own implicit "
            "(target) | ×DEQ(ode, ptc) implicit (epoch)", cells, "ll" + "r" * 10,
            [f"### {tname} (target {fmt(trows[0]['target_acc'], '.1f')}%)", ""]))
    lines += ["### Goal: a skip variant >= 1.5x faster to target than DEQ(ode, ptc) implicit", ""]
    for tname in dict.fromkeys(r["task"] for r in rows):
        skip = [r for r in rows if r["task"] == tname and r["model"].startswith("Skip")
                and r["speedup_vs_deq_implicit"] is not None]
        best = max(skip, key=lambda r: r["speedup_vs_deq_implicit"], default=None)
        lines.append(f"* {tname}: " + ("no skip variant reached the target" if best is None else
                     f"best {best['model']} {best['variant']} "
                     f"{best['speedup_vs_deq_implicit']:.2f}× "
                     f"({'met' if best['speedup_vs_deq_implicit'] >= 1.5 else 'not met'})"))
    return "\n".join(lines) + "\n"


def run(cfg: Config, models: tuple[str, ...], variants: dict[str, tuple[str, ...]],
        epochs: dict[str, int], out: Path, device: str = "cpu") -> list[dict[str, Any]]:
    """Train every ``(model, variant)`` (``variants`` by task) on each task of ``cfg``; write
    Markdown and JSON."""
    with threads(cfg.threads or 1):
        header = (f"## Backward variants ({machine_header()}, device {device}; means over "
                  f"seeds {list(cfg.seeds)})")
        targets = paper_targets()
        notes: list[str] = []
        rows: list[dict[str, Any]] = []
        start = time.perf_counter()
        for tname in cfg.tasks:
            task = load_task(tname, cfg.width[tname], cfg.n_train, cfg.n_test, device)
            tcfg = replace(cfg, epochs=epochs.get(tname, cfg.epochs))
            pairs = [(m, v) for m in models for v in variants[tname]]
            per_seed = [train_variants(task, pairs, tcfg, seed, notes) for seed in cfg.seeds]
            histories = {p: aggregate([runs[p] for runs in per_seed]) for p in pairs
                         if all(p in runs for runs in per_seed)}
            rows += summarize(task, histories, targets.get(tname))
        wall = time.perf_counter() - start
    notes += [
        "Settings: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                                 if k not in ("name", "models", "tasks", "epochs")) +
        f"; epochs per task {epochs}; variants per task {variants}; shared forward "
        f"tolerance {TOL['tol']:g} (ODE integrator {TOL['ode_tol']:g}).",
        "Target = the paper benchmark's (results/paper.json: its NeuralODE's final accuracy "
        "- 0.5 point); time to target = cumulative training time (evaluation excluded) at the "
        "first epoch reaching it; '-' = not reached within the epochs run.",
        "bwd iters: VJPs per step of the backward (phantom k: k - 1; jfb: 0). bwd converged: "
        "fraction of training steps whose backward solve met its tolerance ('-': no tested "
        "solve: phantom, jfb).",
        "×...: speed-up (reference time ÷ this time) against DEQ(ode, ptc) with the implicit "
        "backward, and against the same model with the implicit backward, both in this run.",
        f"Cells of a task train interleaved epoch by epoch; one process, {wall / 60:.1f} min "
        "wall; the machine was shared with other jobs (timings noisy).",
    ]
    write_results(cfg.name, to_markdown(rows, header, notes), rows, out=out)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=list(DEFAULT_VARIANTS))
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for every task (default 15, images-multiscale 14)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    cfg = replace(Config(), name="backward_variants", seeds=tuple(args.seeds),
                  tasks=tuple(args.tasks), threads=1)
    epochs = {t: 15 for t in TASKS} | {"images-multiscale": 14}
    variants = {t: tuple(args.variants) for t in TASKS} | {
        "images-multiscale": MULTISCALE_VARIANTS}
    if args.smoke:
        cfg = replace(cfg, name="backward_variants_smoke", batch=32, n_train=64, n_test=32,
                      width={t: 2 if "conv" in t or "multiscale" in t else 8 for t in TASKS})
        epochs = {t: 2 for t in TASKS}
    if args.epochs is not None:
        epochs = {t: args.epochs for t in TASKS}
    return run(cfg, tuple(args.models), variants, epochs, args.out, str(args.device))


if __name__ == "__main__":
    warnings.filterwarnings("once")
    main()
