"""Where a training step's time goes: forward solve, backward linear solve, and the rest.

``python -m benchmarks.step_profile --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import statistics
from typing import Any

import torch

import contdeq

from .common import (
    MODELS,
    PARTS,
    TOL,
    Config,
    build_model,
    epoch_order,
    fmt,
    load_task,
    machine_header,
    make_parser,
    ratio,
    table,
    threads,
    timed_step,
    write_results,
)

DEFAULT_MODELS = ("NeuralODE", "DEQ(ode, ptc)", "DEQ(ode, ptc) jfb", "SkipDEQ(ode, ptc)",
                  "SkipRegDEQ(ode, ptc)", "SkipRegDEQ(ode, ptc) paper loss", "DEQ(ode, dopri5)",
                  "SkipRegDEQ(ode, dopri5) paper loss")


def profile_task(task_name: str, models: list[str], cfg: Config, epochs: int, seed: int,
                 device: str = "cpu") -> list[dict[str, Any]]:
    """Train ``models`` on the task for ``epochs`` epochs, steps interleaved; one row per model
    with the medians of the last epoch's step parts (milliseconds)."""
    task = load_task(task_name, cfg.width[task_name], cfg.n_train, cfg.n_test, device)
    nets = {name: build_model(name, task, seed) for name in models}
    opts = {name: torch.optim.Adam(net.parameters(), lr=cfg.lr) for name, net in nets.items()}
    for net in nets.values():
        net.train()
    records: dict[str, list[dict[str, float]]] = {}  # the steps of the latest epoch
    for epoch in range(epochs):
        perm = epoch_order(len(task.x_train), seed, epoch, task.x_train.device)
        records = {name: [] for name in models}
        for i in range(0, len(perm), cfg.batch):
            idx = perm[i:i + cfg.batch]
            for name in models:
                records[name].append(timed_step(nets[name], opts[name], task.x_train[idx],
                                                task.y_train[idx]))
    rows = []
    for name in models:
        row: dict[str, Any] = {"task": task_name, "model": name}
        for key in (*PARTS, "forward_nfe", "backward_iterations"):
            values = [r[key] for r in records[name]]
            row[key] = statistics.median(values) * (1e3 if key in PARTS else 1)
        nfe = row["forward_nfe"]
        if isinstance(nets[name].layer, contdeq.DEQ) and nfe >= 1:
            row["perfect_guess"] = row["step"] - row["forward_solve"] * (1 - 1 / nfe)
            row["bound"] = row["step"] / row["perfect_guess"]
        else:  # a NeuralODE integrates to t_end: an initial guess does not shorten it
            row["perfect_guess"] = row["bound"] = None
        rows.append(row)
    base = next((r for r in rows if r["model"] == "DEQ(ode, ptc)"), None)
    for row in rows:
        row["step_vs_deq"] = ratio(base and base["step"], row["step"])
    return rows


def to_markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The rows as a Markdown table under ``header``."""
    cells = ((r["task"], r["model"], f"{r['step']:.2f}",
              f"{r['forward_solve']:.2f} ({r['forward_nfe']:.0f})", f"{r['forward_rest']:.2f}",
              f"{r['backward_solve']:.2f} ({r['backward_iterations']:.0f})",
              f"{r['backward_rest']:.2f}", f"{r['optimizer']:.2f}", fmt(r["step_vs_deq"]),
              "- | -" if r["bound"] is None else f"{r['perfect_guess']:.2f} | {r['bound']:.2f}×")
             for r in rows)
    return table("task | model | step ms | fwd solve ms (NFE) | fwd rest ms | bwd solve ms (iters) "
                 "| bwd rest ms | optimizer ms | DEQ(ode, ptc) step ÷ this | perfect guess ms | "
                 "bound", cells, "llrrrrrrrrr", [header, ""])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", default=["digits-mlp", "spirals", "digits-conv"],
                        choices=["digits-mlp", "spirals", "digits-conv"])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=10,
                        help="epochs trained; the last one is profiled (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=None, help="truncate the training set")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    cfg = Config(n_train=args.n_train)
    with threads(args.threads):
        rows = [row for task in args.tasks
                for row in profile_task(task, args.models, cfg, args.epochs, args.seed,
                                        args.device)]
        header = (f"## Training-step profile ({machine_header()}, device {args.device}; "
                  f"epoch {args.epochs} of training, seed {args.seed}, batch {cfg.batch}, "
                  f"medians over its steps; forward tol {TOL['tol']:g}, backward tol "
                  f"{TOL['backward_rtol']:g})")
        write_results("step_profile", to_markdown(rows, header), rows, out=args.out)
    return rows


if __name__ == "__main__":
    main()
