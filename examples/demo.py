"""The main demo: a steady-state solve from a script, then a tiny DEQ training on digits.

Run with ``make demo`` (sets up .venv first) or ``python examples/demo.py``.
"""

from __future__ import annotations

import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import contdeq
from contdeq.solvers import fixed_point, steady_state


def solver_table(repeats: int = 5) -> None:
    """Steady state of dz/dt = tanh(W z + U x) - z for a batch of 128, width 128; each solve
    timed as the median of ``repeats`` runs after a warm-up run."""
    torch.manual_seed(0)
    batch, width = 128, 128
    w = torch.randn(width, width)
    w = 0.9 * w / torch.linalg.matrix_norm(w, 2)
    ux = torch.randn(batch, width)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + ux)

    z0 = torch.zeros(batch, width)
    solves = {
        f"steady_state {method}": lambda method=method: steady_state(
            lambda t, z: f(z) - z, z0, method=method)
        for method in ("dopri5", "tsit5", "bosh3", "ptc")
    }
    solves["steady_state dopri5 (odeint_event)"] = lambda: steady_state(
        lambda t, z: f(z) - z, z0, backend="event", on_nonconvergence="ignore")
    for method in ("picard", "anderson", "broyden"):
        solves[f"fixed_point {method}"] = lambda method=method: fixed_point(f, z0, method=method)
    rows = []
    with torch.no_grad():
        for name, solve in solves.items():
            solve()  # warm-up, not timed
            runs = [solve()[1] for _ in range(repeats)]
            rows.append((name, runs[0], statistics.median(s.wall_time for s in runs)))
    print("Steady state of dz/dt = tanh(Wz + Ux) - z, batch 128, width 128, atol = rtol = 1e-4")
    print(f"time: median of {repeats} solves after one warm-up solve")
    print(f"{'solver':38s} {'NFE':>5s} {'steps':>6s} {'converged':>10s} {'max residual':>13s}"
          f" {'time ms':>8s}")
    for name, s, seconds in rows:
        conv = f"{int(s.converged.sum())}/{s.converged.numel()}"
        print(f"{name:38s} {s.nfe:5d} {s.steps:6d} {conv:>10s} {s.max_residual:13.2e}"
              f" {seconds * 1e3:8.1f}")


class Cell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` with ``||W||_2 <= 0.9`` (fixed during each solve)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=0.9)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + x)


def training_table(epochs: int = 3, width: int = 64, batch: int = 128) -> None:
    """Train DEQ / SkipDEQ / SkipRegDEQ / NeuralODE classifiers on digits; print a table.

    The time per epoch is the median over epochs 2 to ``epochs``: the first epoch (warm-up:
    allocations, first calls) is not timed. The machine's load moves these times; the NFE
    columns are exact."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = min(1500, len(y) * 5 // 6)  # 1500 of the 1797 digits
    train, test = perm[:n_train], perm[n_train:]
    layers = {
        "DEQ (ode, dopri5)": lambda f: contdeq.DEQ(f, method="dopri5"),
        "DEQ (ode, ptc)": lambda f: contdeq.DEQ(f, method="ptc"),
        "DEQ (anderson)": lambda f: contdeq.DEQ(f, solver="anderson"),
        "SkipDEQ (ode)": lambda f: contdeq.SkipDEQ(
            f, nn.Sequential(nn.Linear(width, width), nn.Tanh())),
        "SkipRegDEQ (ode)": lambda f: contdeq.SkipRegDEQ(f),
        "NeuralODE (dopri5)": lambda f: contdeq.NeuralODE(f),
    }
    print(f"\nTraining on digits: {epochs} epochs, batch {batch}, width {width}, Adam 3e-3")
    print(f"s/epoch: median of epochs 2-{epochs} (epoch 1 is the warm-up)")
    print(f"{'model':22s} {'test acc':>8s} {'fwd NFE':>8s} {'bwd it':>7s} {'s/epoch':>8s}")
    for name, make in layers.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, width), make(Cell(width)), nn.Linear(width, 10))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        nfe, back, batches, epoch_times = 0, 0, 0, []
        for _ in range(epochs):
            start = time.perf_counter()
            for idx in train[torch.randperm(len(train))].split(batch):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                (loss + contdeq.aux_loss(model)).backward()
                opt.step()
                stats = model[1].stats
                nfe += stats.forward.nfe
                back += 0 if stats.backward is None else stats.backward.nfe
                batches += 1
            epoch_times.append(time.perf_counter() - start)
        per_epoch = statistics.median(epoch_times[1:] or epoch_times)
        model.eval()
        with torch.no_grad():
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"{name:22s} {acc:8.3f} {nfe / batches:8.1f} {back / batches:7.1f} "
              f"{per_epoch:8.2f}")


if __name__ == "__main__":
    solver_table()
    training_table()
