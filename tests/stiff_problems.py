"""Stiff steady-state problems, batched ``(B, ...)`` torch flows ``dz/dt = F(z)``, with references.

A test fixture (``tests/test_stiff.py``), also solved by ``benchmarks/steady_states.py``.
Each ``F`` acts on each sample separately; each problem has a float64 reference solution
computed independently (a dense solve, or Newton's method with dense Jacobians).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F_
from torch import Tensor


@dataclass
class StiffProblem:
    """``dz/dt = rhs(z)`` on ``(B, ...)`` states from ``z0``, whose steady state is ``reference``.

    ``numpy_residual(x, b)`` is the same residual on sample ``b`` as a numpy array (scipy)."""

    name: str
    rhs: Callable[[Tensor], Tensor]
    z0: Tensor
    reference: Tensor
    numpy_residual: Callable[[np.ndarray, int], np.ndarray]


class PerDevice:
    """A problem's data tensor, copied once to each device and dtype a state asks for (the
    problems are built on the CPU; ``--device cuda`` runs pass CUDA states)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.copies = {(tensor.device, tensor.dtype): tensor}

    def like(self, z: Tensor) -> Tensor:
        """The data on ``z``'s device, in ``z``'s dtype (shape of the data)."""
        key = (z.device, z.dtype)
        if key not in self.copies:
            self.copies[key] = self.tensor.to(z)
        return self.copies[key]


def _second_difference(u: Tensor, left: float, right: float, h: float) -> Tensor:
    """``(u[i+1] - 2 u[i] + u[i-1]) / h^2`` along the last dimension with Dirichlet values."""
    padded = F_.pad(u, (1, 0), value=left)
    padded = F_.pad(padded, (0, 1), value=right)
    return (padded[..., 2:] - 2 * u + padded[..., :-2]) / h**2


def _numpy(rhs: Callable[[Tensor], Tensor], shape: tuple[int, ...], batch: int
           ) -> Callable[[np.ndarray, int], np.ndarray]:
    """``rhs`` on sample ``b`` alone: the sample is placed at index ``b`` of a zero batch (the
    problems' data are per sample)."""
    def residual(x: np.ndarray, b: int = 0) -> np.ndarray:
        z = torch.zeros(batch, *shape, dtype=torch.float64)
        z[b] = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(shape))
        return rhs(z)[b].reshape(np.shape(x)).numpy()

    return residual


def _dense_newton(rhs: Callable[[Tensor], Tensor], z0: Tensor, steps: int = 50) -> Tensor:
    """float64 Newton with dense Jacobians, per sample, to machine precision."""
    z = z0.double().reshape(z0.shape[0], -1).clone()
    shape = z0.shape[1:]
    for b in range(z.shape[0]):
        def flat(v: Tensor) -> Tensor:
            return rhs(v.reshape(1, *shape)).reshape(-1)

        for _ in range(steps):
            r = flat(z[b])
            if float(r.abs().max()) < 1e-12:
                break
            jac = torch.autograd.functional.jacobian(flat, z[b])
            z[b] = z[b] - torch.linalg.solve(jac, r)
    return z.reshape(z0.shape)


def heat(n: int = 100, batch: int = 2) -> StiffProblem:
    """1-D heat equation ``u_t = u_xx + s_b(x)``, ``u(0) = u(1) = 0``, ``n`` interior points:
    linear, Jacobian eigenvalues from about ``-pi^2`` to ``-4 (n + 1)^2``."""
    h = 1.0 / (n + 1)
    x = torch.linspace(h, 1 - h, n, dtype=torch.float64)
    source = PerDevice(torch.stack([torch.sin(torch.pi * x) * (b + 1) + 1.0
                                    for b in range(batch)]))

    def rhs(u: Tensor) -> Tensor:
        return _second_difference(u, 0.0, 0.0, h) + source.like(u)

    lap = (torch.diag(torch.full((n - 1,), 1.0, dtype=torch.float64), -1)
           + torch.diag(torch.full((n,), -2.0, dtype=torch.float64))
           + torch.diag(torch.full((n - 1,), 1.0, dtype=torch.float64), 1)) / h**2
    reference = torch.linalg.solve(lap, -source.tensor.T).T
    return StiffProblem("heat", rhs, torch.zeros(batch, n, dtype=torch.float64), reference,
                        _numpy(rhs, (n,), batch))


def bratu(n: int = 100, lam: float = 1.0, batch: int = 2) -> StiffProblem:
    """1-D Bratu flow ``u_t = u_xx + lam exp(u)``, ``u(0) = u(1) = 0`` (the stable lower
    branch for ``lam < 3.51``); samples start from scaled ``sin(pi x)`` guesses."""
    h = 1.0 / (n + 1)
    x = torch.linspace(h, 1 - h, n, dtype=torch.float64)

    def rhs(u: Tensor) -> Tensor:
        return _second_difference(u, 0.0, 0.0, h) + lam * torch.exp(u)

    z0 = torch.stack([0.1 * b * torch.sin(torch.pi * x) for b in range(batch)])
    return StiffProblem("bratu", rhs, z0, _dense_newton(rhs, torch.zeros(batch, n,
                                                                         dtype=torch.float64)),
                        _numpy(rhs, (n,), batch))


def scipy_tutorial_pde(n: int = 75, batch: int = 1, reference: Tensor | None = None
                       ) -> StiffProblem:
    """scipy's ``newton_krylov`` "large problem": ``P_xx + P_yy = 10 (mean cosh P)^2`` on an
    ``n x n`` grid, ``P = 1`` on the top edge and ``0`` on the others, as the flow
    ``P_t = P_xx + P_yy - 10 (mean cosh P)^2``. The reference is scipy's ``newton_krylov``
    at ``f_tol=1e-10`` from zero (no solution is found from zero for ``n <= 16``; ``n >= 20``
    works). ``reference``: pass a known solution to skip that solve."""
    h = 1.0 / (n - 1)

    def rhs(p: Tensor) -> Tensor:
        padded = F_.pad(p, (0, 1, 0, 0), value=1.0)  # top (last index of the second axis)
        padded = F_.pad(padded, (1, 0, 1, 1), value=0.0)  # bottom, left, right
        d2x = (padded[:, 2:, 1:-1] - 2 * p + padded[:, :-2, 1:-1]) / h**2
        d2y = (padded[:, 1:-1, 2:] - 2 * p + padded[:, 1:-1, :-2]) / h**2
        mean = torch.cosh(p).mean(dim=(1, 2), keepdim=True)
        return d2x + d2y - 10 * mean**2

    z0 = torch.zeros(batch, n, n, dtype=torch.float64)
    residual = _numpy(rhs, (n, n), batch)
    if reference is None:
        from scipy.optimize import newton_krylov

        solution = newton_krylov(residual, np.zeros((n, n)), method="lgmres", f_tol=1e-10)
        reference = torch.from_numpy(solution).reshape(1, n, n).expand(batch, n, n)
    return StiffProblem("scipy_pde", rhs, z0, reference, residual)


def spd_linear(n: int = 100, condition: float = 1e4, batch: int = 2, seed: int = 0
               ) -> StiffProblem:
    """``dz/dt = b - A z`` with ``A`` symmetric positive definite, eigenvalues log-spaced in
    ``[1, condition]``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0.0, float(np.log10(condition)), n, dtype=torch.float64)
    a = q @ torch.diag_embed(eig.expand(batch, n)) @ q.transpose(1, 2)
    b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    a_on, b_on = PerDevice(a), PerDevice(b)

    def rhs(z: Tensor) -> Tensor:
        # A broadcast product, not bmm: float64 bmm with two threads crawls on a loaded CPU.
        return b_on.like(z) - (a_on.like(z) * z.unsqueeze(1)).sum(2)

    return StiffProblem("spd_1e4", rhs, torch.zeros(batch, n, dtype=torch.float64),
                        torch.linalg.solve(a, b), _numpy(rhs, (n,), batch))


def near_edge_cell(width: int = 64, batch: int = 4, radius: float = 0.97, seed: int = 0
                   ) -> tuple[torch.nn.Module, Tensor, Tensor]:
    """A DEQ cell ``f(z, x) = tanh(W z + x)`` whose Jacobian ``df/dz`` at the fixed point has
    spectral radius ``radius`` (largest over the batch), float64.

    Returns ``(f, x, z*)``. ``W = c Q`` with ``Q`` orthogonal; ``c`` is tuned (fixed-point
    iteration on ``c``) until the radius at ``z*`` matches.
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
    x = 0.3 * torch.randn(batch, width, generator=gen, dtype=torch.float64)
    scale = radius
    for _ in range(20):
        w = scale * q
        z = torch.zeros(batch, width, dtype=torch.float64)
        for _ in range(3000):
            z = torch.tanh(z @ w.T + x)
        jac = (1 - torch.tanh(z @ w.T + x) ** 2).unsqueeze(2) * w
        rho = float(torch.linalg.eigvals(jac).abs().amax())
        scale *= radius / rho
    f = torch.nn.Linear(width, width, bias=False).double()
    with torch.no_grad():
        f.weight.copy_(scale * q)

    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = f

        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            return torch.tanh(self.lin(z) + x)

    return Cell(), x, z


def reaction_diffusion(n: int = 60, b: float = 1.9, rate: float = 30.0, batch: int = 2
                       ) -> StiffProblem:
    """Two-species reaction-diffusion (the Brusselator with a space-dependent feed), 1-D:
    ``u_t = u_xx + k (a(x) - (b + 1) u + u^2 v)``, ``v_t = 0.5 v_xx + k (b u - u^2 v)``,
    ``a(x) = 1 + 0.5 sin(pi x)``, rate ``k``, ``u = 1`` and ``v = b`` at both ends; state
    ``(B, 2, n)``.

    With ``b < 1 + a^2`` everywhere the reaction is below its Hopf point and the steady state
    is stable (``tests/test_stiff.py`` checks the eigenvalues of the Jacobian); diffusion
    makes it stiff (eigenvalues to about ``-4 (n + 1)^2``) and the reaction's Jacobian
    ``k [[b - 1, a^2], [-b, -a^2]]`` is far from normal: from the start states (the
    homogeneous ``u = a``, ``v = b / a`` with a bump of ``v``, and a sharper bump) the residual
    rises before it falls. The reference is the dense Newton solution from the homogeneous
    state; the test checks it against scipy's BDF integration of the flow."""
    h = 1.0 / (n + 1)
    x = torch.linspace(h, 1 - h, n, dtype=torch.float64)
    feed = 1.0 + 0.5 * torch.sin(torch.pi * x)

    def rhs(z: Tensor) -> Tensor:
        u, v = z[:, 0], z[:, 1]
        uuv = u * u * v
        du = _second_difference(u, 1.0, 1.0, h) + rate * (feed.to(z) - (b + 1.0) * u + uuv)
        dv = 0.5 * _second_difference(v, b, b, h) + rate * (b * u - uuv)
        return torch.stack([du, dv], dim=1)

    z0 = torch.stack([torch.stack([feed, b / feed + torch.sin((2 * k + 1) * torch.pi * x) / (
        k + 1)]) for k in range(batch)])
    guess = torch.stack([feed, b / feed]).expand(batch, 2, n)
    return StiffProblem("reaction_diffusion", rhs, z0, _dense_newton(rhs, guess),
                        _numpy(rhs, (2, n), batch))
