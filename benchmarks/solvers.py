"""Solver benchmark: NFE, wall time, residual and overhead of every solver, in one run.

``python -m benchmarks.solvers --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from contdeq.solvers import SolverStats, fixed_point, steady_state

from .common import (
    CPU,
    machine_header,
    make_parser,
    synchronize,
    table,
    time_min,
    write_results,
)

TOL = 1e-4
SOLVERS: list[tuple[str, str, str]] = [
    ("steady_state", "dopri5", "lean"),
    ("steady_state", "dopri5", "torchdiffeq"),
    ("steady_state", "dopri5", "event"),
    ("steady_state", "tsit5", "lean"),
    ("steady_state", "bosh3", "lean"),
    ("steady_state", "bosh3", "torchdiffeq"),
    ("steady_state", "bosh3", "event"),
    ("steady_state", "dopri8", "lean"),
    ("steady_state", "adaptive_heun", "lean"),
    ("steady_state", "ptc", "lean"),
    ("fixed_point", "picard", ""),
    ("fixed_point", "anderson", ""),
    ("fixed_point", "broyden", ""),
]
SLOW = {"adaptive_heun", "dopri8"}  # skipped at the largest sizes to bound the run time


@dataclass
class Problem:
    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    z0: torch.Tensor


def dense_problem(batch: int, width: int, seed: int = 0,
                  device: torch.device = CPU) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=gen)
    w = 0.9 * w / torch.linalg.matrix_norm(w, 2)
    u = torch.randn(width, width, generator=gen) / width**0.5
    ux = (torch.randn(batch, width, generator=gen) @ u.T).to(device)
    w = w.to(device)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.addmm(ux, z, w.T))

    return Problem(f"dense B={batch} D={width}", f, torch.zeros(batch, width, device=device))


def conv_problem(batch: int, channels: int, size: int, seed: int = 0,
                 device: torch.device = CPU) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        v = torch.randn(1, channels, size, size, generator=gen)
        for _ in range(50):  # power iteration on the convolution operator
            v = torch.nn.functional.conv_transpose2d(conv(v), conv.weight, padding=1)
            v = v / v.norm()
        sigma = conv(v).norm()
        conv.weight.mul_(0.9 / sigma)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device)
    conv.to(device)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(conv(z) + x)

    return Problem(f"conv B={batch} C={channels} {size}x{size}", f,
                   torch.zeros(batch, channels, size, size, device=device))


def run_solver(problem: Problem, kind: str, method: str, backend: str) -> SolverStats:
    if kind == "fixed_point":
        return fixed_point(problem.f, problem.z0, method=method, atol=TOL, rtol=TOL,
                           max_steps=500)[1]
    return steady_state(lambda t, z: problem.f(z) - z, problem.z0, method=method,
                        backend=backend, atol=TOL, rtol=TOL, max_steps=5000,
                        on_nonconvergence="ignore")[1]


def benchmark(problem: Problem, repeats: int, skip_slow: bool) -> list[dict]:
    rows = []
    func = lambda: problem.f(problem.z0) - problem.z0  # noqa: E731  what steady_state calls
    for kind, method, backend in SOLVERS:
        if skip_slow and method in SLOW:
            continue
        f_call = func if kind == "steady_state" else (lambda: problem.f(problem.z0))
        stats = run_solver(problem, kind, method, backend)  # warm-up
        f_time, wall = float("inf"), float("inf")
        for _ in range(repeats):  # alternate f and solve timings so drift hits both alike
            f_time = min(f_time, time_min(f_call, 5))
            synchronize(problem.z0.device)
            start = time.perf_counter()
            stats = run_solver(problem, kind, method, backend)
            synchronize(problem.z0.device)
            wall = min(wall, time.perf_counter() - start)
        label = f"{kind} {method}" + (f" [{backend}]" if backend else "")
        rows.append({
            "problem": problem.name, "solver": label, "nfe": stats.nfe, "steps": stats.steps,
            "converged": f"{int(stats.converged.sum())}/{stats.converged.numel()}",
            "max_residual": stats.max_residual, "max_tolerance": float(stats.tolerance.max()),
            "wall_ms": wall * 1e3, "f_call_ms": f_time * 1e3,
            "overhead": wall / (stats.nfe * f_time),
        })
        print(f"  {label:38s} nfe={stats.nfe:5d} wall={wall * 1e3:9.1f} ms "
              f"overhead={rows[-1]['overhead']:5.2f}", flush=True)
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    cells = ((r["problem"], r["solver"], r["nfe"], r["steps"], r["converged"],
              f"{r['max_residual']:.2e}", f"{r['wall_ms']:.1f}", f"{r['f_call_ms']:.3f}",
              f"{r['overhead']:.2f}") for r in rows)
    return table("problem | solver | NFE | steps | converged | max residual | wall ms | f call ms "
                 "| overhead", cells, "llrrrrrrr", [header, ""])


def ratios(rows: list[dict]) -> list[str]:
    """The comparisons the solver goals are stated in."""
    out = []
    by = {(r["problem"], r["solver"]): r for r in rows}
    for problem in dict.fromkeys(r["problem"] for r in rows):
        lean = by.get((problem, "steady_state dopri5 [lean]"))
        tdq = by.get((problem, "steady_state dopri5 [torchdiffeq]"))
        event = by.get((problem, "steady_state dopri5 [event]"))
        ptc = by.get((problem, "steady_state ptc [lean]"))
        if lean and tdq and event:
            out.append(
                f"- {problem}: dopri5 NFE FSAL terminator {lean['nfe']} vs odeint_event "
                f"{event['nfe']}; overhead lean {lean['overhead']:.2f} vs torchdiffeq loop "
                f"{tdq['overhead']:.2f} (lean loop {tdq['wall_ms'] / lean['wall_ms']:.2f}x "
                f"faster); ptc NFE {ptc['nfe']} vs dopri5 {lean['nfe']} "
                f"(residual {ptc['max_residual']:.2e} vs {lean['max_residual']:.2e})")
    return out


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = args.device
    if args.quick:
        problems = [(dense_problem(256, 64, device=dev), 1, False),
                    (dense_problem(128, 128, device=dev), 1, False)]
    else:
        problems = [
            (dense_problem(256, 64, device=dev), 3, False),
            (dense_problem(128, 128, device=dev), 3, False),
            (dense_problem(256, 512, device=dev), 3, False),
            (dense_problem(256, 2048, device=dev), 1, True),
            (conv_problem(64, 16, 16, device=dev), 1, False),
        ]
    rows = []
    with torch.no_grad():
        for problem, repeats, skip_slow in problems:
            print(problem.name, flush=True)
            rows += benchmark(problem, repeats, skip_slow)
    header = f"Solver benchmark (atol = rtol = {TOL}; {machine_header()}, device {dev})"
    md = to_markdown(rows, header) + "\n" + "\n".join(ratios(rows)) + "\n"
    write_results("solvers_quick" if args.quick else "solvers", md, rows, args.out)


if __name__ == "__main__":
    main()
