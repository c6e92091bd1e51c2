"""Random solver problems for the fuzz suite, and a report of their outcomes.

A :class:`Case` is drawn from a few integers and names (so hypothesis can shrink it); it builds
a map ``g(z)`` of one *family* (contractive, expansive, oscillating, near-singular Jacobian,
stiff, non-normal, overflowing ``sinh``, samples coupled by a batch mean, tiny- and huge-scale
solutions, NaN/Inf injected mid-solve), lays its state out as a batch, one 1-D state or one
batch-wide state (``per_sample=False``), solves ``z = g(z)`` with one solver (``steady_state``
on ``dz/dt = g(z) - z`` or ``fixed_point`` on ``g``) and checks the reliability contract:

* the solve ends within its bounds (``steps <= max_steps``, a bounded number of calls, a stop
  reason from the documented set, never past ``t_max``, wall time under the ``timeout``);
* the stats are consistent: ``converged == (residual <= tolerance)`` per sample, the stop
  reason is ``"converged"`` exactly when every sample converged, residuals are finite;
* nothing is silent: a returned state is finite, a converged sample really satisfies the
  tolerance when its residual and tolerance are recomputed in float64 (the same map, its
  parameters rounded to the case's dtype), non-convergence warns or raises as configured, and
  a NaN/Inf produced while samples are still iterating raises ``NonFiniteError``.

Run ``python -m tests.fuzz_cases --cases 2000`` for the outcome table quoted in
``docs/reliability.md``; ``tests/test_fuzz.py`` runs the same checks under hypothesis.
"""

from __future__ import annotations

import argparse
import math
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from contdeq.solvers import (
    FIXED_POINT_METHODS,
    STEADY_STATE_METHODS,
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    SolverStats,
    StopReason,
    fixed_point,
    steady_state,
)

FAMILIES = ("contractive", "expansive", "expansive_tanh", "oscillating", "near_singular",
            "stiff", "non_normal", "sinh", "coupled", "tiny_scale", "huge_scale", "nan_midway",
            "inf_midway")
#: How the state is laid out: a batch (per-sample test), one 1-D state, or the batch as one
#: state (``per_sample=False``). Maps coupling samples are never solved per sample.
LAYOUTS = ("batch", "1d", "batch_wide")
#: Scale of the solution of the tiny/huge families (solved with a relative-only test).
SCALES = {"tiny_scale": 1e-30, "huge_scale": 1e20}
ODE_SOLVERS = (*STEADY_STATE_METHODS, "dopri5[torchdiffeq]", "bosh3[event]")
MAP_SOLVERS = tuple(FIXED_POINT_METHODS)
SOLVERS = ODE_SOLVERS + MAP_SOLVERS
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
SHAPES = ((3,), (2, 5), (4, 1), (1, 16), (3, 2, 3), (2, 2, 2, 2))
POLICIES = ("ignore", "warn", "raise")
STOP_REASONS = {reason.value for reason in StopReason if reason is not StopReason.T_END}
#: Event-function calls ``odeint_event`` may add to ``steps`` while bisecting the crossing.
BISECTION_CALLS = 100
#: Function calls per solver step, at most (Runge-Kutta stages; 1 for the discrete solvers).
CALLS_PER_STEP = {"dopri5": 6, "tsit5": 6, "bosh3": 3, "adaptive_heun": 2, "dopri8": 13,
                  "ptc": 1,
                  # a trial evaluation plus the graph its Jacobian-vector products run on
                  "implicit_ptc": 2,
                  # up to line_search_steps (10) backtracking evaluations plus the full step
                  "newton": 11}
#: The generous "did not hang" bound given to every solve, in seconds.
TIMEOUT = 30.0
OUTCOMES = ("converged", "reported_nonconvergence", "raised_nonfinite")


@dataclass(frozen=True)
class Case:
    """One fuzz problem; every field is a plain value so hypothesis can draw and shrink it."""

    seed: int
    family: str
    solver: str
    shape: tuple[int, ...]
    dtype: str
    max_steps: int
    policy: str
    strength: float  # in [0, 1]: where in the family's range the map's parameter lies
    finite_t_max: bool
    layout: str = "batch"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tolerance(self) -> float:
        """Tolerance the dtype can meet: 1e-6 in float64, about ``100 * eps`` otherwise."""
        return max(1e-6, 100 * torch.finfo(self.torch_dtype).eps)

    @property
    def layout_used(self) -> str:
        """The layout solved: a coupled map is never solved per sample."""
        return "batch_wide" if self.family == "coupled" and self.layout == "batch" else (
            self.layout)

    @property
    def scale(self) -> float:
        """Scale of the solution (1, or tiny/huge in float32/float64)."""
        if self.dtype in ("float32", "float64"):
            return SCALES.get(self.family, 1.0)
        return 1.0

    @property
    def atol(self) -> float:
        """0 (relative-only) for the tiny/huge families, the tolerance otherwise."""
        return 0.0 if self.family in SCALES else self.tolerance


def _matrix(case: Case, dim: int, gen: torch.Generator) -> Tensor:
    """``(D, D)`` float64 matrix ``A`` of the case's family; the map is ``A z + c``."""
    s = case.strength
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    if case.family == "oscillating":  # rotations by ~90 degrees, radius 0.9 .. 1.3
        blocks = torch.zeros(dim, dim, dtype=torch.float64)
        theta = math.pi / 2 * (0.8 + 0.2 * s)
        rot = (0.9 + 0.4 * s) * torch.tensor(
            [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
            dtype=torch.float64)
        for i in range(0, dim - 1, 2):
            blocks[i:i + 2, i:i + 2] = rot
        if dim % 2:
            blocks[-1, -1] = 0.5
        return q @ blocks @ q.T
    if case.family == "near_singular":  # I - A nearly singular: top eigenvalue 1 - 10^-(2..4)
        eig = torch.rand(dim, generator=gen, dtype=torch.float64) * 0.9
        eig[0] = 1.0 - 10.0 ** (-2.0 - 2.0 * s)
    elif case.family == "stiff":  # dz/dt = c - M z, M's eigenvalues from 0.1 to 10^(2..5)
        m_eig = torch.logspace(-1.0, 2.0 + 3.0 * s, dim, dtype=torch.float64)
        eig = 1.0 - m_eig
    elif case.family == "non_normal":  # eigenvalues 0.5, a strong shear: ||A|| >> 1
        shear = torch.triu(torch.randn(dim, dim, generator=gen, dtype=torch.float64), 1)
        return 0.5 * torch.eye(dim, dtype=torch.float64) + (2.0 + 8.0 * s) * shear / dim ** 0.5
    elif case.family == "sinh":
        return torch.zeros(dim, dim, dtype=torch.float64)
    elif case.family == "coupled":  # contractive per sample; the batch mean couples them
        eig = (torch.rand(dim, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * 0.3
    elif case.family in ("expansive", "expansive_tanh"):  # top eigenvalue 1.2 .. 4
        eig = torch.rand(dim, generator=gen, dtype=torch.float64) * 2.0 - 1.0
        eig[0] = 1.2 + 2.8 * s
    else:  # contractive (NaN/Inf, tiny and huge families too): ||A||_2 <= 0.95
        eig = (torch.rand(dim, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * 0.95 * s
    return q @ torch.diag(eig) @ q.T


@dataclass(frozen=True)
class Map:
    """A case's map in its dtype (``g``) and in float64 with the same rounded parameters
    (``g64``, for re-checking claims), and the initial state ``z0``."""

    g: Callable[[Tensor], Tensor]
    g64: Callable[[Tensor], Tensor]
    a64: Tensor
    z0: Tensor


def build_map(case: Case) -> Map:
    """The clean map ``g`` (and its float64 twin) and the initial state ``z0`` (zeros)."""
    gen = torch.Generator().manual_seed(case.seed)
    batch, dim = case.shape[0], math.prod(case.shape[1:])
    a = _matrix(case, dim, gen).to(case.torch_dtype)
    c = (torch.randn(batch, dim, generator=gen, dtype=torch.float64) * case.scale).to(
        case.torch_dtype)
    nonlinear = case.family in ("contractive", "expansive_tanh", "nan_midway", "inf_midway",
                                "coupled")

    def make(a: Tensor, c: Tensor) -> Callable[[Tensor], Tensor]:
        def g(z: Tensor) -> Tensor:
            flat = z.reshape(batch, dim)
            out = flat @ a.T + c
            if case.family == "coupled":  # every sample sees the batch mean
                out = out + (0.5 + 1.5 * case.strength) * flat.mean(0, keepdim=True)
            if case.family == "sinh":  # dz/dt = -k sinh(z - c): overflows for large trial steps
                out = flat - (1.0 + 49.0 * case.strength) * torch.sinh(flat - c)
            return (torch.tanh(out) if nonlinear else out).reshape(z.shape)
        return g

    shape = (batch * dim,) if case.layout_used == "1d" else case.shape
    return Map(make(a, c), make(a.double(), c.double()), a.double(),
               torch.zeros(shape, dtype=case.torch_dtype))


class Poisoned:
    """``g`` that returns NaN (or Inf) in every entry from call ``at`` on; counts its calls."""

    def __init__(self, g: Callable[[Tensor], Tensor], at: int, value: float) -> None:
        self.g, self.at, self.value, self.calls = g, at, value, 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        out = self.g(z)
        # Out of place: g's own graph may be needed for Jacobian-vector products (newton).
        return torch.full_like(out, self.value) if self.calls >= self.at else out


def solve(case: Case, g: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
    """Run the case's solver on ``g`` from ``z0`` with its bounds, layout and policy."""
    common = {"atol": case.atol, "rtol": case.tolerance, "max_steps": case.max_steps,
              "on_nonconvergence": case.policy, "timeout": TIMEOUT,
              "per_sample": case.layout_used != "batch_wide"}
    if case.solver in MAP_SOLVERS:
        return fixed_point(g, z0, method=case.solver, **common)
    method, _, backend = case.solver.partition("[")
    return steady_state(lambda t, z: g(z) - z, z0, method=method,
                        backend=backend.rstrip("]") or "lean",
                        t_max=_t_max(case), **common)


def _t_max(case: Case) -> float:
    return 3.0 + 7.0 * case.strength if case.finite_t_max else math.inf


def run_case(case: Case) -> str:
    """Solve ``case`` and check the contract; returns one of :data:`OUTCOMES`.

    Raises ``AssertionError`` (with the case in the message) when the contract is broken.
    """
    problem = build_map(case)
    g, z0 = problem.g, problem.z0
    poison = case.family in ("nan_midway", "inf_midway")
    func = Poisoned(g, 2 + case.seed % 12, math.nan if case.family == "nan_midway" else math.inf)
    raised: NonFiniteError | ConvergenceError | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            z, stats = solve(case, func if poison else g, z0)
        except (NonFiniteError, ConvergenceError) as exc:
            raised = exc
    if isinstance(raised, NonFiniteError):
        assert raised.step >= 0, case
        return "raised_nonfinite"
    # A map poisoned while the solve still called it must have raised NonFiniteError.
    assert not (poison and func.calls >= func.at), f"NaN/Inf passed silently: {case}"
    if isinstance(raised, ConvergenceError):
        assert case.policy == "raise", case
        check_stats(case, raised.stats)
        assert not raised.stats.all_converged, case
        return "reported_nonconvergence"
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    check_stats(case, stats)
    check_state(case, z, z0, stats, problem)
    assert warned == (case.policy == "warn" and not stats.all_converged), (case, stats.summary())
    assert case.policy != "raise" or stats.all_converged, case
    return "converged" if stats.all_converged else "reported_nonconvergence"


def check_stats(case: Case, stats: SolverStats) -> None:
    """Bounds and internal consistency of ``stats``."""
    info = (case, stats.summary())
    assert stats.stop_reason in STOP_REASONS, info
    event = case.solver.endswith("[event]")
    assert 0 <= stats.steps <= case.max_steps + (BISECTION_CALLS if event else 0), info
    calls = CALLS_PER_STEP.get(case.solver.partition("[")[0], 1) * case.max_steps
    # +3: the evaluations at z0 (torchdiffeq makes its own) and at the event's final state;
    # the event backend adds one call per event-function evaluation.
    assert stats.nfe <= 3 + calls + (stats.steps if event else 0), info
    assert stats.wall_time < TIMEOUT + 30.0, info
    assert torch.equal(stats.converged, stats.residual <= stats.tolerance), info
    assert (stats.stop_reason == "converged") == stats.all_converged, info
    assert bool(torch.isfinite(stats.residual).all()), info
    assert bool(torch.isfinite(stats.tolerance).all()), info
    if stats.t_final is not None:
        eps = torch.finfo(stats.t_final.dtype).eps  # t_final is rounded to the state dtype
        assert float(stats.t_final.max()) <= _t_max(case) * (1 + 2 * eps), info


def check_state(case: Case, z: Tensor, z0: Tensor, stats: SolverStats, problem: Map) -> None:
    """The returned state is finite and shaped like ``z0``; every sample claimed converged
    meets its tolerance when residual and tolerance are recomputed in float64."""
    assert z.shape == z0.shape and z.dtype == z0.dtype, case
    assert bool(torch.isfinite(z).all()), f"silent non-finite state: {case}"
    # One row per sample; a 1-D state (shape (B,) too) or a batch-wide solve is one sample.
    rows = case.shape[0] if case.layout_used == "batch" and len(case.shape) > 1 else 1
    z64 = z.double()
    residual = problem.g64(z64) - z64

    def rms(x: Tensor) -> Tensor:
        return x.reshape(rows, -1).square().mean(dim=1).sqrt()

    tolerance = case.atol + case.tolerance * rms(z64)
    # Rounding of g in the case's dtype: a few ulps of the terms it adds up.
    terms = rms(z64) + rms(z64.reshape(case.shape[0], -1).abs() @ problem.a64.abs().T) + rms(
        problem.g64(z64))
    slack = tolerance * 1.01 + 4 * torch.finfo(z.dtype).eps * terms
    conv = stats.converged
    assert conv.shape == (rows,), (case, conv.shape)
    assert bool((rms(residual)[conv] <= slack[conv]).all()), (
        f"false convergence claim: {case}", rms(residual), tolerance)


def random_case(gen: torch.Generator) -> Case:
    """A case drawn from ``gen`` (the report's sampler; the tests use hypothesis)."""
    def pick(options: tuple) -> object:
        return options[int(torch.randint(len(options), (), generator=gen))]

    return Case(
        seed=int(torch.randint(2**31 - 1, (), generator=gen)),
        family=pick(FAMILIES), solver=pick(SOLVERS), shape=pick(SHAPES),
        dtype=pick(tuple(DTYPES)), max_steps=int(torch.randint(1, 150, (), generator=gen)),
        policy=pick(POLICIES), strength=float(torch.rand((), generator=gen)),
        finite_t_max=bool(torch.rand((), generator=gen) < 0.3), layout=pick(LAYOUTS),
    )


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang


def report(n_cases: int, seed: int, hang_after: float) -> Counter:
    """Run ``n_cases`` random cases; count outcomes, contract violations and hangs."""
    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    signal.signal(signal.SIGALRM, _alarm)
    for _ in range(n_cases):
        case = random_case(gen)
        signal.setitimer(signal.ITIMER_REAL, hang_after)
        try:
            outcome = run_case(case)
        except _Hang:
            outcome = "hang"
        except Exception as exc:
            outcome = "violation"
            print(f"VIOLATION {type(exc).__name__}: {exc} in {case}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        counts[outcome] += 1
        counts[(case.family, outcome)] += 1
        counts[(case.solver, outcome)] += 1
        counts[(case.dtype, outcome)] += 1
        counts[(case.layout_used, outcome)] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-after", type=float, default=120.0,
                        help="seconds after which a case counts as a hang")
    args = parser.parse_args()
    start = time.perf_counter()
    counts = report(args.cases, args.seed, args.hang_after)
    columns = (*OUTCOMES, "violation", "hang")
    print(f"{args.cases} cases in {time.perf_counter() - start:.1f} s (seed {args.seed})")
    for title, rows in (("family", FAMILIES), ("solver", SOLVERS), ("dtype", tuple(DTYPES)),
                        ("layout", LAYOUTS)):
        print(f"\n{title:20s}" + "".join(f"{c:>25s}" for c in columns))
        for row in rows:
            print(f"{row:20s}" + "".join(f"{counts[(row, c)]:25d}" for c in columns))
    print(f"{'total':20s}" + "".join(f"{counts[c]:25d}" for c in columns))


if __name__ == "__main__":
    main()
