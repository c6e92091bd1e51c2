"""The 23 nonlinear test problems of SciML's NonlinearProblemLibrary.jl: contdeq's ``root``
solvers beside ``scipy.optimize.root`` (hybr, lm, krylov).

``python -m benchmarks.nonlinear --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from contdeq.solvers import NonFiniteError, root
from tests.nonlinear_problems import PROBLEMS, Problem, solved

from .common import CPU, interleaved, machine_header, make_parser, table, write_results

#: contdeq configurations: (label, root's solver, its options).
CONTDEQ = (
    ("contdeq auto (newton, then ptc)", "auto", {}),
    ("contdeq newton", "newton", {}),
    ("contdeq trust_region", "trust_region", {}),
    ("contdeq ptc", "ptc", {}),
    ("contdeq ptc (first_step=10)", "ptc", {"first_step": 10.0}),
    ("contdeq anderson", "anderson", {}),
    ("contdeq broyden", "broyden", {}),
)
SCIPY = ("hybr", "lm", "krylov")
TOL = 1e-8


def _run_contdeq(problem: Problem, solver: str, options: dict,
                 device: torch.device = CPU) -> dict:
    calls = [0]

    def func(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return problem.func(x)

    try:
        x, stats = root(func, problem.x0().to(device), solver=solver, atol=TOL, rtol=0.0,
                        on_nonconvergence="ignore", **options)
    except NonFiniteError as exc:
        return {"claimed": False, "solved": False, "nfe": calls[0], "jvps": None,
                "outcome": f"NonFiniteError: {str(exc)[:50]}"}
    return {"claimed": stats.all_converged, "solved": solved(problem, x.cpu()), "nfe": stats.nfe,
            "jvps": stats.jvps, "outcome": str(stats.stop_reason)}


def _run_scipy(problem: Problem, method: str) -> dict:
    from scipy.optimize import root as scipy_root

    calls = [0]

    def func(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return problem.func(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()

    x0 = np.asarray(problem.start, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if method == "krylov":
                sol = scipy_root(func, x0, method="krylov", options={"fatol": TOL})
            else:
                sol = scipy_root(func, x0, method=method, tol=TOL)
        except Exception as exc:  # an outcome to record
            return {"claimed": False, "solved": False, "nfe": calls[0], "jvps": None,
                    "outcome": f"raised {type(exc).__name__}"}
    return {"claimed": bool(sol.success), "solved": solved(problem, torch.from_numpy(sol.x)),
            "nfe": calls[0], "jvps": None, "outcome": "success" if sol.success else "failure"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = make_parser(__doc__)  # --device: contdeq's solves; scipy's run on the CPU
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runners = {label: (lambda p, s=solver, o=options: _run_contdeq(p, s, o, args.device))
               for label, solver, options in CONTDEQ}
    runners.update({f"scipy {m}": (lambda p, m=m: _run_scipy(p, m)) for m in SCIPY})

    def solve_all(run: Callable[[Problem], dict]) -> dict[int, dict]:
        out = {}
        for problem in PROBLEMS:
            start = time.perf_counter()
            out[problem.number] = {**run(problem), "time_s": time.perf_counter() - start}
        return out

    results, totals = interleaved({name: lambda r=run: solve_all(r) for name, run in
                                   runners.items()}, args.repeats, failed=_reraise)
    rows = []
    for name, per_problem in results.items():
        for number, out in per_problem.items():
            rows.append({"solver": name, "problem": number, **out, "runs": args.repeats})
    write_results("nonlinear", _markdown(results, totals, args.repeats), rows, args.out)
    return rows


def _reraise(exc: Exception) -> dict:
    """The runners record the failures they expect; anything else stops the benchmark."""
    raise exc


def _markdown(results: dict[str, dict[int, dict]], totals: dict[str, float],
              repeats: int) -> str:
    def summary(name: str, outs: list[dict]) -> tuple[object, ...]:
        jvps = sum(o["jvps"] or 0 for o in outs) if any(o["jvps"] for o in outs) else "–"
        return (name, sum(o["solved"] for o in outs),
                sum(o["claimed"] and not o["solved"] for o in outs),
                sum(str(o["outcome"]).startswith("NonFiniteError") for o in outs),
                sum(o["nfe"] or 0 for o in outs), jvps, f"{totals[name]:.3g}",
                f"{totals[name] / totals['scipy lm']:.2f}")

    head = ["# The 23 problems of NonlinearProblemLibrary.jl (atol=1e-8, rtol=0; success: "
            f"||F(x)||_inf <= 1e-6 checked afresh; {machine_header()}, shared machine, noisy; "
            f"times: median of {repeats} interleaved runs of the whole set)", "",
            "Regenerate with `python -m benchmarks.nonlinear` (problems: "
            "`tests/nonlinear_problems.py`).", ""]
    grid = ((f"{p.number} {p.title}", *("✓" if r[p.number]["solved"]
                                        else f"✗ {r[p.number]['outcome']}"[:28]
                                        for r in results.values())) for p in PROBLEMS)
    return table("solver | solved of 23 | false claims | NonFiniteError | NFE (total) | JVPs "
                 "(total) | time (s, total) | time / scipy lm",
                 (summary(name, list(r.values())) for name, r in results.items()),
                 head=head) + table("problem | " + " | ".join(results), grid, head=[
                     "", "Per problem (✓ solved, ✗ not; the stop reason or scipy's outcome "
                     "when not):", ""])


if __name__ == "__main__":
    main()
