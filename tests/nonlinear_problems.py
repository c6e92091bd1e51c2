"""The 23 nonlinear test problems of SciML's NonlinearProblemLibrary.jl, ported to PyTorch.

Source: ``lib/NonlinearProblemLibrary/src/NonlinearProblemLibrary.jl`` of the repository
SciML/DiffEqProblemLibrary.jl (read at commit ``055ed25b4f7480a7ad6215a879235343981e6511``),
itself an implementation of John Burkardt's ``test_nonlin`` collection, which gathers the
systems of Moré, Garbow & Hillstrom, "Testing unconstrained optimization software", ACM TOMS 7
(1981), and of MINPACK's ``vecfcn``; SciMLBenchmarks' "Nonlinear Solver 23 Test Problems" runs
them with exactly these dimensions and start points. Each problem is ported faithfully from the
Julia code, including SciML's own choices: Watson's function (6) with ``n = 2`` and the
coefficient ``j`` where MINPACK has ``j - 1``, Chebyquad (7) on ``[-1, 1]`` (no ``2 x - 1``
shift), Chandrasekhar's H-equation (23) with ``c = 0.9``. The one reading the Julia code leaves
open, the initial content of Watson's output buffer (it accumulates into ``out``), is taken as
zero, as in MINPACK.

Every ``F`` acts on the last dimension, so ``F(x)`` works on a ``(n,)`` system and on a
``(B, n)`` batch alike; ``F`` must be evaluated in float64 (the tests and the benchmark do).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Problem:
    """One test problem.

    Attributes:
        number: its number in NonlinearProblemLibrary.jl (1-23).
        title: its title there.
        start: the start point, a tuple of ``n`` floats.
        solution: a known root (the library's ``sol``), or ``None`` where it gives none.
        func: ``F(x)``, ``(..., n) -> (..., n)``.
    """

    number: int
    title: str
    start: tuple[float, ...]
    solution: tuple[float, ...] | None
    func: Callable[[Tensor], Tensor]

    @property
    def n(self) -> int:
        """Dimension of the system."""
        return len(self.start)

    def x0(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The start point, ``(n,)``."""
        return torch.tensor(self.start, dtype=dtype)


def _cols(x: Tensor) -> list[Tensor]:
    return list(x.unbind(-1))


def _stack(parts: list[Tensor]) -> Tensor:
    return torch.stack(parts, dim=-1)


def p1_generalized_rosenbrock(x: Tensor) -> Tensor:
    """Problem 1: ``F_1 = 1 - x_1``, ``F_k = 10 (x_k - x_{k-1}^2)``."""
    return torch.cat([1.0 - x[..., :1], 10.0 * (x[..., 1:] - x[..., :-1] ** 2)], dim=-1)


def p2_powell_singular(x: Tensor) -> Tensor:
    """Problem 2 (MGH 13)."""
    x1, x2, x3, x4 = _cols(x)
    return _stack([x1 + 10.0 * x2, math.sqrt(5.0) * (x3 - x4), (x2 - 2.0 * x3) ** 2,
                   math.sqrt(10.0) * (x1 - x4) * (x1 - x4)])


def p3_powell_badly_scaled(x: Tensor) -> Tensor:
    """Problem 3 (MGH 3)."""
    x1, x2 = _cols(x)
    return _stack([10000.0 * x1 * x2 - 1.0, torch.exp(-x1) + torch.exp(-x2) - 1.0001])


def p4_wood(x: Tensor) -> Tensor:
    """Problem 4 (MGH 14, the gradient of Wood's function)."""
    x1, x2, x3, x4 = _cols(x)
    t1, t2 = x2 - x1 * x1, x4 - x3 * x3
    return _stack([-200.0 * x1 * t1 - (1.0 - x1),
                   200.0 * t1 + 20.2 * (x2 - 1.0) + 19.8 * (x4 - 1.0),
                   -180.0 * x3 * t2 - (1.0 - x3),
                   180.0 * t2 + 20.2 * (x4 - 1.0) + 19.8 * (x2 - 1.0)])


def p5_helical_valley(x: Tensor) -> Tensor:
    """Problem 5 (MGH 7), with the library's branches for ``x_1 > 0``, ``< 0``, ``= 0``."""
    x1, x2, x3 = _cols(x)
    safe = torch.where(x1 == 0, torch.ones_like(x1), x1)
    base = torch.atan(x2 / safe) / (2.0 * math.pi)
    temp = torch.where(x1 > 0, base, torch.where(x1 < 0, base + 0.5, 0.25 * torch.sign(x2)))
    return _stack([10.0 * (x3 - 10.0 * temp), 10.0 * (torch.sqrt(x1 * x1 + x2 * x2) - 1.0), x3])


def p6_watson(x: Tensor) -> Tensor:
    """Problem 6 (Watson, as patched in the library: ``n = 2``, coefficient ``j``)."""
    n = x.shape[-1]
    t = torch.arange(1, 30, dtype=x.dtype, device=x.device).unsqueeze(1) / 29.0  # (29, 1)
    j = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)  # 1-based index, (n,)
    powers = t ** (j - 1)  # t_i^(j-1), (29, n)
    sum1 = (x[..., None, 1:] * (j[1:] * powers[:, :-1])).sum(-1)  # sum_j j t^(j-2) x_j
    sum2 = (x.unsqueeze(-2) * powers).sum(-1)  # (..., 29)
    common = (sum1 - sum2 * sum2 - 1.0).unsqueeze(-1)  # (..., 29, 1)
    # sum over i of t_i^(k-2) * common_i * (k - 2 t_i sum2_i), for k = 1..n
    terms = (powers / t) * common * (j - 2.0 * t * sum2.unsqueeze(-1))
    out = terms.sum(-2)
    x1, x2 = x[..., 0], x[..., 1]
    extra = torch.zeros_like(x)
    extra[..., 0] = 3.0 * x1 - 2.0 * x1 * x1 + 2.0 * x1**3
    extra[..., 1] = x2 - x2**2 - 1.0
    return out + extra


def _watson_loops(x: Tensor) -> Tensor:
    """Problem 6 written as the library's loops (the test checks the vectorized form by it)."""
    n = x.shape[-1]
    out = torch.zeros_like(x)
    for i in range(1, 30):
        ti = i / 29.0
        sum1 = sum(j * ti ** (j - 2) * x[..., j - 1] for j in range(2, n + 1))
        sum2 = sum(ti ** (j - 1) * x[..., j - 1] for j in range(1, n + 1))
        common = sum1 - sum2 * sum2 - 1.0
        out = out + _stack([ti ** (k - 2) * common * (k - 2.0 * ti * sum2)
                            for k in range(1, n + 1)])
    x1, x2 = x[..., 0], x[..., 1]
    out[..., 0] += 3.0 * x1 - 2.0 * x1 * x1 + 2.0 * x1**3
    out[..., 1] += x2 - x2**2 - 1.0
    return out


def p7_chebyquad(x: Tensor) -> Tensor:
    """Problem 7 (MGH 35, Chebyquad on ``[-1, 1]``): ``F_i = mean_j T_i(x_j)`` plus
    ``1 / (i^2 - 1)`` for even ``i``."""
    n = x.shape[-1]
    t_prev, t = torch.ones_like(x), x
    rows = []
    for i in range(1, n + 1):
        row = t.mean(-1)
        if i % 2 == 0:
            row = row + 1.0 / (i * i - 1)
        rows.append(row)
        t_prev, t = t, 2.0 * x * t - t_prev
    return _stack(rows)


def p8_brown_almost_linear(x: Tensor) -> Tensor:
    """Problem 8 (MGH 27)."""
    n = x.shape[-1]
    head = x[..., :-1] + x.sum(-1, keepdim=True) - (n + 1)
    return torch.cat([head, x.prod(-1, keepdim=True) - 1.0], dim=-1)


def p9_discrete_boundary_value(x: Tensor) -> Tensor:
    """Problem 9 (MGH 28)."""
    n = x.shape[-1]
    h = 1.0 / (n + 1)
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    out = 2.0 * x + 0.5 * h**2 * (x + k * h + 1.0) ** 3
    left = torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], dim=-1)
    right = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)
    return out - left - right


def p10_discrete_integral_equation(x: Tensor) -> Tensor:
    """Problem 10 (MGH 29)."""
    n = x.shape[-1]
    h = 1.0 / (n + 1)
    t = torch.arange(1, n + 1, dtype=x.dtype, device=x.device) * h
    cube = (x + t + 1.0) ** 3
    lower = torch.cumsum(t * cube, dim=-1)  # sum over j <= k
    upper = torch.flip(torch.cumsum(torch.flip((1.0 - t) * cube, [-1]), dim=-1), [-1])  # j >= k
    return x + h * ((1.0 - t) * lower + t * upper) / 2.0


def p11_trigonometric(x: Tensor) -> Tensor:
    """Problem 11 (MGH 26)."""
    n = x.shape[-1]
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    return n - torch.cos(x).sum(-1, keepdim=True) + k * (1.0 - torch.cos(x)) - torch.sin(x)


def p12_variably_dimensioned(x: Tensor) -> Tensor:
    """Problem 12 (MGH 25)."""
    n = x.shape[-1]
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    s = (k * (x - 1.0)).sum(-1, keepdim=True)
    return x - 1.0 + k * s * (1.0 + 2.0 * s * s)


def p13_broyden_tridiagonal(x: Tensor) -> Tensor:
    """Problem 13 (MGH 30)."""
    left = torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], dim=-1)
    right = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)
    return (3.0 - 2.0 * x) * x + 1.0 - left - 2.0 * right


def p14_broyden_banded(x: Tensor) -> Tensor:
    """Problem 14 (MGH 31; lower bandwidth 5, upper 1)."""
    n = x.shape[-1]
    q = x * (1.0 + x)
    rows = []
    for k in range(n):
        band = [j for j in range(max(0, k - 5), min(n - 1, k + 1) + 1) if j != k]
        rows.append(sum((q[..., j] for j in band), torch.zeros_like(x[..., 0])))
    return x * (2.0 + 5.0 * x * x) + 1.0 - _stack(rows)


def p15_hammarling_2x2(x: Tensor) -> Tensor:
    """Problem 15: the square root of a 2x2 matrix."""
    x1, x2, x3, x4 = _cols(x)
    return _stack([x1 * x1 + x2 * x3 - 0.0001, x1 * x2 + x2 * x4 - 1.0,
                   x3 * x1 + x4 * x3, x3 * x2 + x4 * x4 - 0.0001])


def p16_hammarling_3x3(x: Tensor) -> Tensor:
    """Problem 16: the square root of a 3x3 matrix."""
    x1, x2, x3, x4, x5, x6, x7, x8, x9 = _cols(x)
    return _stack([
        x1 * x1 + x2 * x4 + x3 * x7 - 0.0001, x1 * x2 + x2 * x5 + x3 * x8 - 1.0,
        x1 * x3 + x2 * x6 + x3 * x9, x4 * x1 + x5 * x4 + x6 * x7,
        x4 * x2 + x5 * x5 + x6 * x8 - 0.0001, x4 * x3 + x5 * x6 + x6 * x9,
        x7 * x1 + x8 * x4 + x9 * x7, x7 * x2 + x8 * x5 + x9 * x8,
        x7 * x3 + x8 * x6 + x9 * x9 - 0.0001,
    ])


def p17_dennis_schnabel(x: Tensor) -> Tensor:
    """Problem 17: Dennis & Schnabel's 2x2 example."""
    x1, x2 = _cols(x)
    return _stack([x1 + x2 - 3.0, x1**2 + x2**2 - 9.0])


def p18_sample_18(x: Tensor) -> Tensor:
    """Problem 18, with the library's value 0 where a denominator is 0."""
    x1, x2 = _cols(x)
    s1 = torch.where(x1 == 0, torch.ones_like(x1), x1)
    s2 = torch.where(x2 == 0, torch.ones_like(x2), x2)
    f1 = torch.where(x1 == 0, torch.zeros_like(x1), x2**2 * (1.0 - torch.exp(-x1 * x1)) / s1)
    f2 = torch.where(x2 == 0, torch.zeros_like(x2), x1 * (1.0 - torch.exp(-x2 * x2)) / s2)
    return _stack([f1, f2])


def p19_sample_19(x: Tensor) -> Tensor:
    """Problem 19 (a triple root at 0)."""
    x1, x2 = _cols(x)
    r = x1**2 + x2**2
    return _stack([x1 * r, x2 * r])


def p20_scalar(x: Tensor) -> Tensor:
    """Problem 20: ``x (x - 5)^2``."""
    return x * (x - 5.0) ** 2


def p21_freudenstein_roth(x: Tensor) -> Tensor:
    """Problem 21 (MGH 2); a local minimum of ``||F||`` (``||F||_inf = 4.949``) attracts Newton."""
    x1, x2 = _cols(x)
    return _stack([x1 - x2**3 + 5.0 * x2**2 - 2.0 * x2 - 13.0,
                   x1 + x2**3 + x2**2 - 14.0 * x2 - 29.0])


def p22_boggs(x: Tensor) -> Tensor:
    """Problem 22: Boggs' function."""
    x1, x2 = _cols(x)
    return _stack([x1 * x1 - x2 + 1.0, x1 - torch.cos(0.5 * math.pi * x2)])


def p23_chandrasekhar(x: Tensor) -> Tensor:
    """Problem 23: Chandrasekhar's H-equation, ``c = 0.9``, ``mu_i = i / n``."""
    n = x.shape[-1]
    c = 0.9
    mu = torch.arange(1, n + 1, dtype=x.dtype, device=x.device) / n
    kernel = mu.unsqueeze(1) / (mu.unsqueeze(1) + mu.unsqueeze(0))  # (n, n): mu_i / (mu_i + mu_j)
    s = x @ kernel.T
    return x - 1.0 / (1.0 - c * s / (2 * n))


def _chebyquad_start(n: int) -> tuple[float, ...]:
    return tuple((2 * i - n) / (n + 1) for i in range(1, n + 1))


def _grid_start(n: int) -> tuple[float, ...]:
    return tuple(i * (i - n - 1) / (n + 1) ** 2 for i in range(1, n + 1))


PROBLEMS: tuple[Problem, ...] = (
    Problem(1, "Generalized Rosenbrock function", (-1.2,) + (1.0,) * 9, (1.0,) * 10,
            p1_generalized_rosenbrock),
    Problem(2, "Powell singular function", (3.0, -1.0, 0.0, 1.0), (0.0,) * 4,
            p2_powell_singular),
    Problem(3, "Powell badly scaled function", (0.0, 1.0), (1.098159e-05, 9.106146),
            p3_powell_badly_scaled),
    Problem(4, "Wood function", (-3.0, -1.0, -3.0, -1.0), (1.0,) * 4, p4_wood),
    Problem(5, "Helical valley function", (-1.0, 0.0, 0.0), (1.0, 0.0, 0.0),
            p5_helical_valley),
    Problem(6, "Watson function", (0.0, 0.0), None, p6_watson),
    Problem(7, "Chebyquad function", _chebyquad_start(2),
            (2 * 0.2113248654051871 - 1.0, 2 * 0.7886751345948129 - 1.0), p7_chebyquad),
    Problem(8, "Brown almost linear function", (0.5,) * 10, (1.0,) * 10,
            p8_brown_almost_linear),
    Problem(9, "Discrete boundary value function", _grid_start(10), None,
            p9_discrete_boundary_value),
    Problem(10, "Discrete integral equation function", _grid_start(10), None,
            p10_discrete_integral_equation),
    Problem(11, "Trigonometric function", (0.1,) * 10, None, p11_trigonometric),
    Problem(12, "Variably dimensioned function", tuple(1.0 - i / 10 for i in range(1, 11)),
            (1.0,) * 10, p12_variably_dimensioned),
    Problem(13, "Broyden tridiagonal function", (-1.0,) * 10, None, p13_broyden_tridiagonal),
    Problem(14, "Broyden banded function", (-1.0,) * 10, None, p14_broyden_banded),
    Problem(15, "Hammarling 2 by 2 matrix square root problem", (1.0, 0.0, 0.0, 1.0),
            (0.01, 50.0, 0.0, 0.01), p15_hammarling_2x2),
    Problem(16, "Hammarling 3 by 3 matrix square root problem",
            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            (0.01, 50.0, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0, 0.01), p16_hammarling_3x3),
    Problem(17, "Dennis and Schnabel 2 by 2 example", (1.0, 5.0), (0.0, 3.0),
            p17_dennis_schnabel),
    Problem(18, "Sample problem 18", (2.0, 2.0), (0.0, 0.0), p18_sample_18),
    Problem(19, "Sample problem 19", (3.0, 3.0), (0.0, 0.0), p19_sample_19),
    Problem(20, "Scalar problem f(x) = x(x - 5)^2", (1.0,), (5.0,), p20_scalar),
    Problem(21, "Freudenstein-Roth function", (0.5, -2.0), (5.0, 4.0), p21_freudenstein_roth),
    Problem(22, "Boggs function", (1.0, 0.0), (0.0, 1.0), p22_boggs),
    Problem(23, "Chandrasekhar function", (1.0,) * 10, None, p23_chandrasekhar),
)

#: The independent success test of SciMLBenchmarks: ``||F(x)||_inf <= 1e-6``.
SUCCESS_INF_NORM = 1e-6


def solved(problem: Problem, x: Tensor) -> bool:
    """Whether ``x`` (``(n,)``) passes the independent check ``||F(x)||_inf <= 1e-6``,
    evaluated afresh in float64 (``False`` for a non-finite ``x``)."""
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return False
    value = problem.func(x)
    return bool(torch.isfinite(value).all()) and float(value.abs().max()) <= SUCCESS_INF_NORM
