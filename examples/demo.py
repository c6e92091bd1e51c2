"""The main demo: a steady-state solve from a script, compared across methods.

Run with ``make demo`` (sets up .venv first) or ``python examples/demo.py``.
"""

from __future__ import annotations

import torch

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


if __name__ == "__main__":
    solver_table()
