"""A small robustness check: a plain DEQ and a LyapunovDEQ with the same f and seed, trained
briefly on scikit-learn's digits, attacked three ways.

``python -m benchmarks.robust_check --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import contdeq
from contdeq.robust import pgd, robust_accuracy, unrolled_gradients
from contdeq.solvers import ConvergenceWarning

from .common import (
    TanhCell,
    implicit_backward,
    machine_header,
    make_parser,
    synchronize,
    write_results,
)

WIDTH = 32
SOLVER = {"solver": "anderson", "atol": 1e-4, "rtol": 1e-4, "max_steps": 50}


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as ``(N, 1, 8, 8)`` images in ``[0, 1]`` (torchattacks' convention): train and
    test splits of a seeded permutation (test: the last 300)."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:-300], y[:-300], x[-300:], y[-300:]


def build(kind: str, seed: int) -> nn.Sequential:
    """``flatten -> linear encoder -> equilibrium layer -> linear head``; the encoder, ``f``
    and head are drawn first from the same seed, so both kinds share them at initialisation.
    """
    torch.manual_seed(seed)
    encoder = nn.Linear(64, WIDTH)
    f = TanhCell(WIDTH)
    head = nn.Linear(WIDTH, 10)
    if kind == "DEQ":
        layer: nn.Module = contdeq.DEQ(f, state_shape=WIDTH, **SOLVER)
    else:  # the implicit gradient of f at its equilibrium (docs/robustness.md)
        layer = contdeq.LyapunovDEQ(f, WIDTH, hidden=(32,), **SOLVER)
    return nn.Sequential(nn.Flatten(), encoder, layer, head)


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> dict[str, Any]:
    """Clean and robust accuracies, and the convergence warnings each attack raised."""
    import torchattacks

    row: dict[str, Any] = {}

    def run(name: str, attack: Any) -> None:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            row[name] = robust_accuracy(model, (x, y), attack, batch_size=100)
        row[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        row[f"{name}_warnings"] = sum(issubclass(w.category, ConvergenceWarning)
                                      for w in caught)

    def pgd_implicit(a: Tensor, b: Tensor) -> Tensor:
        with implicit_backward(model):
            return pgd(model, a, b, eps, steps=20)

    def pgd_unrolled(a: Tensor, b: Tensor) -> Tensor:
        with unrolled_gradients(model):
            return pgd(model, a, b, eps, steps=20)

    run("clean", None)
    run("pgd20_implicit", pgd_implicit)
    run("pgd20_unrolled", pgd_unrolled)
    run("square", torchattacks.Square(model, eps=eps, n_queries=300, seed=0))
    return row


def to_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "# Robustness check: DEQ vs LyapunovDEQ on digits",
        "",
        f"{machine_header()}; measured once (one run, seed {args.seed}); the machine was "
        "shared with other jobs, so the times are indicative only.",
        f"Training: {args.epochs} epochs of Adam (lr 3e-3, batch 64) on {args.n_train} digits; "
        f"evaluation on {args.n_test} test digits; L-inf eps = {args.eps} on [0, 1] pixels; "
        f"total run time {seconds / 60:.1f} min.",
        f"Model: flatten -> Linear(64, {WIDTH}) -> layer -> Linear({WIDTH}, 10), "
        f"f(z, x) = tanh(W z + x) with ||W||_2 <= 0.9, solver {SOLVER}.",
        "PGD-20: step 2.5 eps / 20, random start. Square: torchattacks, 300 queries.",
        "",
        "| model | train backward | clean | PGD-20 implicit | PGD-20 unrolled | Square | "
        "warnings (implicit / unrolled) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['train_backward']} | {r['clean']:.3f} | "
            f"{r['pgd20_implicit']:.3f} | {r['pgd20_unrolled']:.3f} | {r['square']:.3f} | "
            f"{r['pgd20_implicit_warnings']} / {r['pgd20_unrolled_warnings']} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=1497)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="robust_check", help="results name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits(args.seed)
    x_train, y_train = x_train[:args.n_train].to(args.device), y_train[:args.n_train].to(
        args.device)
    x_test, y_test = x_test[:args.n_test].to(args.device), y_test[:args.n_test].to(args.device)
    start = time.perf_counter()
    rows = []
    for kind in ("DEQ", "LyapunovDEQ"):
        model = build(kind, args.seed).to(args.device)
        t0 = time.perf_counter()
        train(model, x_train, y_train, args.epochs, args.seed)
        synchronize(args.device)
        row = {"model": kind, "train_backward": "implicit",
               "train_seconds": round(time.perf_counter() - t0, 1)}
        row.update(evaluate(model, x_test, y_test, args.eps))
        print(row, flush=True)
        rows.append(row)
    markdown = to_markdown(rows, args, time.perf_counter() - start)
    write_results(args.name, markdown, rows, args.out)


if __name__ == "__main__":
    main()
