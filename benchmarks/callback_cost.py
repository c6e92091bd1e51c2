"""What the per-step solver callback costs: a no-op ``callback`` against none.

``python -m benchmarks.callback_cost --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from contdeq.solvers import StepInfo, fixed_point, steady_state

from .common import contractive, machine_header, make_parser, write_results

METHODS = (("ode", "dopri5"), ("ode", "ptc"), ("map", "anderson"), ("map", "picard"),
           ("map", "broyden"))


def make_solve(kind: str, method: str, batch: int, width: int, steps: int,
               device: torch.device) -> Callable[[object], tuple[torch.Tensor, object]]:
    w, x = contractive(width, batch, device=device, norm=0.95)
    z0 = torch.zeros(batch, width, device=device)

    def g(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + x)

    def solve(callback: object) -> tuple[torch.Tensor, object]:
        options = {"atol": 1e-12, "rtol": 0.0, "max_steps": steps, "callback": callback,
                   "on_nonconvergence": "ignore"}
        if kind == "map":
            return fixed_point(g, z0, method=method, **options)
        return steady_state(lambda t, z: g(z) - z, z0, method=method, **options)

    return solve


def fastest(solve: Callable[[object], object], callback: object, inner: int) -> float:
    """Fastest of ``inner`` runs of ``solve(callback)``, in seconds."""
    best = float("inf")
    for _ in range(inner):
        start = time.perf_counter()
        solve(callback)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def noop(info: object) -> None:
        return None

    rows = []
    for kind, method in METHODS:
        solve = make_solve(kind, method, args.batch, args.width, args.steps, args.device)
        z_none, s_none = solve(None)
        z_noop, s_noop = solve(noop)
        if s_none.nfe != s_noop.nfe or not torch.equal(z_none, z_noop):
            raise SystemExit(f"{method}: the no-op callback changed the solve")
        ratios, overheads = [], []
        for _ in range(args.repeats):
            t_none = fastest(solve, None, args.inner)
            t_noop = fastest(solve, noop, args.inner)
            ratios.append(t_noop / t_none)
            overheads.append((t_noop - t_none) / s_none.steps * 1e6)
        rows.append({"method": method, "nfe": s_none.nfe, "steps": s_none.steps,
                     "ratio_median": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "overhead_us_per_step": statistics.median(overheads)})
        print(f"{method}: nfe {s_none.nfe}, ratio {rows[-1]['ratio_median']:.3f}", flush=True)
    z, res, active = torch.zeros(args.batch, args.width), torch.ones(args.batch), torch.ones(
        args.batch, dtype=torch.bool)
    shape = z.shape
    calls = 100_000
    start = time.perf_counter()
    for step in range(calls):
        noop(StepInfo(step, z if z.shape == shape else z.reshape(shape), res, active, None,
                      "picard"))
    per_call_us = (time.perf_counter() - start) / calls * 1e6
    lines = [
        "# Cost of a no-op step callback",
        "",
        machine_header(),
        "",
        f"Contractive tanh layer (||W|| = 0.95), float32, batch {args.batch}, width "
        f"{args.width}, {args.steps} steps per solve (unreachable tolerance), one thread. No "
        f"callback vs `callback=lambda info: None`, interleaved, {args.repeats} repeats (each "
        f"the fastest of {args.inner} runs); NFE and result identical in every case. The "
        "machine may be shared (noisy).",
        "",
        "| method | NFE | steps | time ratio (median) | range | overhead per step (us) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {r['steps']} | {r['ratio_median']:.3f} "
                     f"| {r['ratio_min']:.3f}-{r['ratio_max']:.3f} "
                     f"| {r['overhead_us_per_step']:.1f} |")
    lines += ["", f"The hook's own work per step (a `StepInfo` and the no-op call), timed alone: "
              f"{per_call_us:.2f} us per call ({calls} calls)."]
    rows.append({"method": "hook call alone", "overhead_us_per_step": per_call_us})
    write_results("callback_cost", "\n".join(lines) + "\n", rows, args.out)


if __name__ == "__main__":
    main()
