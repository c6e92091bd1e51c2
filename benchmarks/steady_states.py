"""Stiff steady states: implicit_ptc and newton against explicit methods and scipy.

``python -m benchmarks.steady_states --help``; benchmarks/README.md describes it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from contdeq.implicit import solve_adjoint
from contdeq.solvers import fixed_point, steady_state
from tests import stiff_problems

from .common import CPU, interleaved, machine_header, make_parser, synchronize, table, write_results

#: Step budget of the explicit methods (they are stability-limited on these problems).
EXPLICIT_BUDGET = 2000
#: scipy.optimize.root(method="hybr") builds a dense finite-difference Jacobian: skipped above
#: this many unknowns.
HYBR_MAX_UNKNOWNS = 1000
BACKWARD_METHODS = ("gmres", "anderson", "picard", "broyden")


def _ours(problem: stiff_problems.StiffProblem, method: str, device: torch.device = CPU
          ) -> Callable[[], dict]:
    z0 = problem.z0.to(device)

    def run() -> dict:
        def func(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return problem.rhs(z)

        if method == "newton":
            z, stats = fixed_point(lambda z: func(None, z) + z, z0, method="newton",
                                   on_nonconvergence="ignore")
        else:
            budget = {} if method == "implicit_ptc" else {"max_steps": EXPLICIT_BUDGET}
            z, stats = steady_state(func, z0, method=method, on_nonconvergence="ignore",
                                    **budget)
        synchronize(device)
        outcome = "converged" if stats.all_converged else f"not converged ({stats.stop_reason})"
        return {"outcome": outcome, "nfe": stats.nfe, "jvps": stats.jvps,
                "linear_iterations": stats.linear_iterations, "z": z.cpu()}

    return run


def _scipy(problem: stiff_problems.StiffProblem, method: str) -> Callable[[], dict]:
    from scipy.optimize import newton_krylov, root

    def run() -> dict:
        calls = [0]

        out = []
        for b in range(problem.z0.shape[0]):
            def residual(x: np.ndarray, b: int = b) -> np.ndarray:
                calls[0] += 1
                return problem.numpy_residual(x, b)

            x0 = problem.z0[b].numpy()
            if method == "scipy newton_krylov":
                out.append(newton_krylov(residual, x0, method="lgmres"))
            else:
                shape = x0.shape
                sol = root(lambda x, r=residual, s=shape: r(x.reshape(s)).ravel(),
                           x0.ravel(), method="hybr")
                if not sol.success:
                    raise RuntimeError(sol.message)
                out.append(sol.x.reshape(x0.shape))
        z = torch.from_numpy(np.stack(out))
        return {"outcome": "converged", "nfe": calls[0], "jvps": None, "linear_iterations": None,
                "z": z}

    return run


def _steady_rows(problem: stiff_problems.StiffProblem, repeats: int,
                 device: torch.device = CPU) -> list[dict]:
    methods: dict[str, Callable[[], dict]] = {
        m: _ours(problem, m, device) for m in ("implicit_ptc", "newton", "ptc", "dopri5")
    }
    methods["scipy newton_krylov"] = _scipy(problem, "scipy newton_krylov")
    unknowns = problem.z0[0].numel()
    if unknowns <= HYBR_MAX_UNKNOWNS:
        methods["scipy root (hybr)"] = _scipy(problem, "scipy root (hybr)")
    results, times = interleaved(methods, repeats, lambda exc: {**_raised(exc), "z": None})
    rows = []
    scale = float(problem.reference.abs().max())
    for name, out in results.items():
        z = out.pop("z")
        error = None if z is None else float((z - problem.reference).abs().max()) / scale
        rows.append({"problem": problem.name, "unknowns": unknowns,
                     "batch": problem.z0.shape[0], "method": name, **out,
                     "time_s": times[name], "runs": repeats,
                     "error": error})
    if unknowns > HYBR_MAX_UNKNOWNS:
        rows.append({"problem": problem.name, "unknowns": unknowns,
                     "batch": problem.z0.shape[0], "method": "scipy root (hybr)",
                     "outcome": f"skipped (dense Jacobian of {unknowns} unknowns)", "nfe": None,
                     "jvps": None, "linear_iterations": None, "time_s": None, "runs": 0,
                     "error": None})
    return rows


def _backward_rows(width: int, batch: int, repeats: int, device: torch.device = CPU
                   ) -> list[dict]:
    """The near-edge DEQ backward: VJPs to the default tolerance (1e-4, 100 steps) by each
    backward method, and the error of ``w`` against the dense implicit-function-theorem one."""
    cell, x, z_star = stiff_problems.near_edge_cell(width, batch)
    cell, x, z_star = cell.to(device), x.to(device), z_star.to(device)
    zr = z_star.clone().requires_grad_(True)
    fz = cell(zr, x)

    def vjp(w: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(fz, zr, w, retain_graph=True)[0]

    v = torch.randn(batch, width, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1)).to(device)
    jac = (1 - fz.detach() ** 2).unsqueeze(2) * cell.lin.weight.detach()
    radius = float(torch.linalg.eigvals(jac).abs().amax())
    eye = torch.eye(width, dtype=torch.float64, device=device)
    exact = torch.linalg.solve((eye - jac).transpose(1, 2), v)
    def run(method: str) -> dict:
        w, stats = solve_adjoint(vjp, v, method=method, on_nonconvergence="ignore")
        synchronize(device)
        outcome = "converged" if stats.all_converged else f"not converged ({stats.stop_reason})"
        return {"outcome": outcome, "nfe": stats.nfe, "jvps": None,
                "linear_iterations": stats.linear_iterations,
                "error": float(((w - exact).norm(dim=1) / exact.norm(dim=1)).max())}

    results, times = interleaved({m: lambda m=m: run(m) for m in BACKWARD_METHODS}, repeats,
                                 lambda exc: {**_raised(exc), "error": None})
    return [{"problem": f"near-edge backward (rho={radius:.3f})", "unknowns": width,
             "batch": batch, "method": f"backward {m}", **results[m],
             "time_s": times[m], "runs": repeats} for m in BACKWARD_METHODS]


def _raised(exc: Exception) -> dict:
    return {"outcome": f"raised {type(exc).__name__}: {str(exc)[:60]}", "nfe": None,
            "jvps": None, "linear_iterations": None}


def _cell(value: object, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def to_markdown(rows: list[dict], header: str) -> str:
    """One table, problem x method."""
    cells = ((f"{r['problem']} ({r['unknowns']}x{r['batch']})", r["method"], r["outcome"],
              _cell(r["nfe"]), _cell(r["jvps"]), _cell(r["linear_iterations"]),
              _cell(r["time_s"], "{:.3g}"), r["runs"], _cell(r["error"], "{:.1e}")) for r in rows)
    return table("problem | method | outcome | NFE | JVPs | linear it. | time (s, median) | runs "
                 "| error", cells, head=[f"# {header}", ""])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.quick:
        problems = [stiff_problems.heat(n=30), stiff_problems.bratu(n=30),
                    stiff_problems.scipy_tutorial_pde(20), stiff_problems.spd_linear(n=30)]
        repeats, edge = 1, (16, 2)
    else:
        problems = [stiff_problems.heat(), stiff_problems.bratu(),
                    stiff_problems.scipy_tutorial_pde(75), stiff_problems.spd_linear(),
                    stiff_problems.reaction_diffusion()]
        repeats, edge = args.repeats, (64, 4)
    _ours(stiff_problems.heat(n=10), "implicit_ptc", args.device)()  # warm-up: autograd's
    _ours(stiff_problems.heat(n=10), "newton", args.device)()  # first use
    rows = []
    for problem in problems:
        print(problem.name, flush=True)
        rows += _steady_rows(problem, repeats, args.device)
    print("near-edge backward", flush=True)
    rows += _backward_rows(*edge, repeats, args.device)
    header = (f"Stiff steady states (default tolerances; explicit methods capped at "
              f"{EXPLICIT_BUDGET} steps; error: max |z - z_ref| / max |z_ref|, backward: "
              f"relative error of w; {machine_header()}, device {args.device}; scipy on the CPU; "
              "shared machine, noisy)")
    write_results("steady_states_quick" if args.quick else "steady_states",
                  to_markdown(rows, header), rows, args.out)
    return rows


if __name__ == "__main__":
    main()
