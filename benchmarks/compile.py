"""Compiled against eager training steps, and whole-model ``torch.compile``, in one run.

``python -m benchmarks.compile --help``; benchmarks/README.md describes it."""

from __future__ import annotations

from statistics import median_high
from typing import Any

import torch
from torch._dynamo.utils import counters

from .common import (
    COMPILED_MODELS,
    CPU,
    Config,
    build_model,
    f_call_time,
    load_task,
    machine_header,
    make_parser,
    table,
    timed_step,
    warm_up,
    write_results,
)

PAIRS = (("DEQ(ode, ptc)", "DEQ(ode, ptc) compiled"),
         ("DEQ(ode, ptc)", "DEQ(ode, ptc) compiled, 4 steps per call"),
         ("NeuralODE", "NeuralODE compiled"))
WHOLE = ("DEQ(ode, ptc)", "DEQ(ode, ptc) compiled")
#: Rows with the bound on what compiling the forward solve can give (the eager DEQ's: its
#: step time over the same step less its forward solve, medians).
BOUNDED = ("DEQ(ode, ptc)",)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def compare_steps(task_name: str, steps: int, batch: int, lr: float,
                  device: torch.device = CPU) -> list[dict[str, Any]]:
    """Interleaved training steps of the eager and compiled rows of :data:`PAIRS`."""
    task = load_task(task_name, Config().width[task_name], device=device)
    t_f = f_call_time(task, batch, 0)
    names = list(dict.fromkeys(n for pair in PAIRS for n in pair))
    models = {n: build_model(n, task, 0) for n in names}
    warm = {}
    for n, m in models.items():
        before = _graphs()
        warm[n] = (warm_up(m, task, batch) if n in COMPILED_MODELS else 0.0,
                   _graphs() - before)
    opts = {n: torch.optim.Adam(m.parameters(), lr=lr) for n, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    calls: dict[str, list[float]] = {n: [] for n in names}
    loss: dict[str, float] = {}
    before = _graphs()
    for _ in range(steps):
        idx = torch.randperm(len(task.x_train), generator=gen)[:batch]
        xb, yb = task.x_train[idx], task.y_train[idx]
        for n, m in models.items():
            step = timed_step(m, opts[n], xb, yb)
            times[n].append((step["step"], step["cpu"], step["step"] - step["forward_solve"]))
            loss[n] = step["loss"]
            calls[n].append(step["forward_nfe"] + (step["backward_iterations"] or 0))
    recompiles = _graphs() - before
    rows = []
    for n in names:
        wall = median_high([w for w, _, _ in times[n]])
        cpu = median_high([c for _, c, _ in times[n]])
        # What compiling the forward solve can give at most: the step without its solve.
        without_solve = median_high([r for _, _, r in times[n]])
        rows.append({"task": task_name, "model": n, "step_ms": 1e3 * wall,
                     "step_cpu_ms": 1e3 * cpu, "calls": sum(calls[n]) / steps,
                     "overhead": wall / (sum(calls[n]) / steps * t_f),
                     "overhead_cpu": cpu / (sum(calls[n]) / steps * t_f),
                     "warmup_s": warm[n][0], "warmup_graphs": warm[n][1],
                     "final_loss": loss[n], "timed_recompiles": recompiles,
                     "f_call_ms": 1e3 * t_f, "bound": wall / without_solve})
    by = {r["model"]: r for r in rows}
    for eager, compiled in PAIRS:
        by[compiled]["speedup"] = by[eager]["step_ms"] / by[compiled]["step_ms"]
        by[compiled]["speedup_cpu"] = by[eager]["step_cpu_ms"] / by[compiled]["step_cpu_ms"]
    return rows


def whole_model(task_name: str, steps: int, batch: int, lr: float,
                device: torch.device = CPU) -> list[dict[str, Any]]:
    """``torch.compile(model)`` of the nets of :data:`WHOLE`: first call, recompiles, speed."""
    task = load_task(task_name, Config().width[task_name], device=device)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name in WHOLE:
        eager = build_model(name, task, 0)
        model = build_model(name, task, 0)
        whole = torch.compile(model)
        opts = {k: torch.optim.Adam(m.parameters(), lr=lr)
                for k, m in (("eager", eager), ("whole", model))}
        xb, yb = task.x_train[:batch], task.y_train[:batch]
        counters.clear()  # this model's graphs and breaks only
        before = _graphs()
        first = timed_step(model, opts["whole"], xb, yb, run=whole)["step"]
        timed_step(eager, opts["eager"], xb, yb)
        compiled_first = _graphs() - before
        breaks = sum(counters["graph_break"].values())
        before = _graphs()
        times: dict[str, list[float]] = {"eager": [], "whole": []}
        for _ in range(steps):
            idx = torch.randperm(len(task.x_train), generator=gen)[:batch]
            for key, m, run in (("eager", eager, None), ("whole", model, whole)):
                times[key].append(timed_step(m, opts[key], task.x_train[idx],
                                             task.y_train[idx], run)["cpu"])
        rows.append({"task": task_name, "model": f"torch.compile(Net with {name})",
                     "first_call_s": first, "graphs_first_call": compiled_first,
                     "graph_breaks_first_call": breaks, "recompiles": _graphs() - before,
                     "step_cpu_ms": 1e3 * median_high(times["whole"]),
                     "eager_step_cpu_ms": 1e3 * median_high(times["eager"])})
    return rows


def to_markdown(steps: list[dict[str, Any]], whole: list[dict[str, Any]], header: str) -> str:
    cells = ((r["task"], r["model"], f"{r['step_ms']:.1f}", f"{r['step_cpu_ms']:.1f}",
              f"{r['speedup']:.2f}, {r['speedup_cpu']:.2f}" if "speedup" in r else "-",
              f"{r['calls']:.1f}", f"{r['overhead']:.1f}, {r['overhead_cpu']:.1f}",
              f"{r['warmup_s']:.1f} ({r['warmup_graphs']})", f"{r['final_loss']:.4f}",
              r["timed_recompiles"],
              f"{r['bound']:.2f}" if r["model"] in BOUNDED else "-") for r in steps)
    whole_cells = ((r["task"], r["model"], f"{r['first_call_s']:.1f}", r["graphs_first_call"],
                    r["graph_breaks_first_call"], r["recompiles"],
                    f"{r['step_cpu_ms']:.1f} / {r['eager_step_cpu_ms']:.1f}") for r in whole)
    return table("task | model | step ms (wall) | step ms (CPU) | eager / compiled (wall, CPU) | "
                 "f calls per step | overhead (wall, CPU) | warm-up s (graphs) | final loss | "
                 "graphs compiled while timed | step ÷ step without its forward solve", cells,
                 "ll" + "r" * 9, [header, ""]) + table(
        "task | model | first call s | graphs at first call | graph breaks | recompiles after "
        "warm-up | step ms CPU (compiled / eager)", whole_cells, "ll" + "r" * 5,
        ["", "Whole-model compile (`torch.compile(model)`, training steps):", ""])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser(__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tasks", nargs="+", default=["digits-mlp", "digits-conv"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Every compiled solve shares one Dynamo cache (one graph per batch shape, task and grad
    # mode); the default limit of 8 graphs would send the last ones back to eager steps.
    torch._dynamo.config.recompile_limit = 64
    cfg = Config()
    steps = [r for t in args.tasks
             for r in compare_steps(t, args.steps, cfg.batch, cfg.lr, args.device)]
    whole = [r for t in args.tasks
             for r in whole_model(t, args.steps, cfg.batch, cfg.lr, args.device)]
    header = (f"Compiled vs eager training steps: batch {cfg.batch}, medians of {args.steps} "
              f"interleaved steps per model ({machine_header()}; the machine was shared with "
              "other jobs, so wall times are noisy; CPU time is this thread's)")
    write_results(args.name, to_markdown(steps, whole, header), steps + whole, args.out)
    return steps + whole


if __name__ == "__main__":
    main()
