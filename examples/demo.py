"""The main demo: a steady-state solve from a script, then a tiny DEQ training on digits.

Run with ``make demo`` (sets up .venv first) or ``python examples/demo.py``.
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import contdeq
from contdeq.solvers import fixed_point, steady_state


def solver_table() -> None:
    """Steady state of dz/dt = tanh(W z + U x) - z for a batch of 128, width 128."""
    torch.manual_seed(0)
    batch, width = 128, 128
    w = torch.randn(width, width)
    w = 0.9 * w / torch.linalg.matrix_norm(w, 2)
    ux = torch.randn(batch, width)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + ux)

    z0 = torch.zeros(batch, width)
    rows = []
    with torch.no_grad():
        for method in ("dopri5", "tsit5", "bosh3", "ptc"):
            _, stats = steady_state(lambda t, z: f(z) - z, z0, method=method)
            rows.append((f"steady_state {method}", stats))
        _, stats = steady_state(lambda t, z: f(z) - z, z0, backend="event",
                                on_nonconvergence="ignore")
        rows.append(("steady_state dopri5 (odeint_event)", stats))
        for method in ("picard", "anderson", "broyden"):
            _, stats = fixed_point(f, z0, method=method)
            rows.append((f"fixed_point {method}", stats))
    print("Steady state of dz/dt = tanh(Wz + Ux) - z, batch 128, width 128, atol = rtol = 1e-4")
    print(f"{'solver':38s} {'NFE':>5s} {'steps':>6s} {'converged':>10s} {'max residual':>13s}"
          f" {'time ms':>8s}")
    for name, s in rows:
        conv = f"{int(s.converged.sum())}/{s.converged.numel()}"
        print(f"{name:38s} {s.nfe:5d} {s.steps:6d} {conv:>10s} {s.max_residual:13.2e}"
              f" {s.wall_time * 1e3:8.1f}")


class Cell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` with ``||W||_2 <= 0.9`` (fixed during each solve)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=0.9)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + x)


def training_table(epochs: int = 3, width: int = 64, batch: int = 128) -> None:
    """Train DEQ / SkipDEQ / SkipRegDEQ / NeuralODE classifiers on digits; print a table."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1500], perm[1500:]
    layers = {
        "DEQ (ode, dopri5)": lambda f: contdeq.DEQ(f),
        "DEQ (ode, ptc)": lambda f: contdeq.DEQ(f, method="ptc"),
        "DEQ (anderson)": lambda f: contdeq.DEQ(f, solver="anderson"),
        "SkipDEQ (ode)": lambda f: contdeq.SkipDEQ(
            f, nn.Sequential(nn.Linear(width, width), nn.Tanh())),
        "SkipRegDEQ (ode)": lambda f: contdeq.SkipRegDEQ(f),
        "NeuralODE (dopri5)": lambda f: contdeq.NeuralODE(f),
    }
    print(f"\nTraining on digits: {epochs} epochs, batch {batch}, width {width}, Adam 3e-3")
    print(f"{'model':22s} {'test acc':>8s} {'fwd NFE':>8s} {'bwd it':>7s} {'s/epoch':>8s}")
    for name, make in layers.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, width), make(Cell(width)), nn.Linear(width, 10))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        nfe, back, batches, start = 0, 0, 0, time.perf_counter()
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train))].split(batch):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                (loss + contdeq.aux_loss(model)).backward()
                opt.step()
                stats = model[1].stats
                nfe += stats.forward.nfe
                back += 0 if stats.backward is None else stats.backward.nfe
                batches += 1
        per_epoch = (time.perf_counter() - start) / epochs
        model.eval()
        with torch.no_grad():
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        print(f"{name:22s} {acc:8.3f} {nfe / batches:8.1f} {back / batches:7.1f} "
              f"{per_epoch:8.2f}")


if __name__ == "__main__":
    solver_table()
    training_table()
