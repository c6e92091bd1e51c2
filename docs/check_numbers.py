"""Recompute the numbers that README.md and the docs state about the solvers, and check the
benchmark figures the README quotes against the committed result tables.

Run ``python docs/check_numbers.py`` (prints each claim, its value and OK / WRONG; exit status
1 if any is wrong); ``tests/test_doc_numbers.py`` runs the same checks. A claim that nothing
here recomputes must either come from a committed benchmark table (checked by transcription
below) or be removed from the docs.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from contdeq.solvers import steady_state  # noqa: E402
from contdeq.solvers.rk import initial_step  # noqa: E402

#: docs/solvers.md, "evaluations per step" column.
EVALUATIONS_PER_STEP = {"dopri5": 6, "tsit5": 6, "dopri8": 13, "bosh3": 3, "adaptive_heun": 2,
                        "ptc": 1}


def readme_problem() -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The README's first example: ``f(z) = tanh(W z + x)``, ``||W||_2 = 0.9``, batch 256,
    width 64, ``z0 = 0``."""
    torch.manual_seed(0)
    w = 0.9 * torch.linalg.qr(torch.randn(64, 64))[0]
    x = torch.randn(256, 64)
    return (lambda z: torch.tanh(z @ w.T + x)), torch.zeros(256, 64)


def evaluations_per_step() -> dict[str, float]:
    """``(NFE - 1) / steps`` of a steady-state solve per method (the 1 is the derivative at
    ``z0``; ``steps`` counts accepted and rejected steps)."""
    f, z0 = readme_problem()
    out = {}
    for method in EVALUATIONS_PER_STEP:
        _, stats = steady_state(lambda t, z: f(z) - z, z0, method=method)
        out[method] = (stats.nfe - 1) / stats.steps
    return out


def first_steps() -> tuple[float, float]:
    """First step of torchdiffeq's rule (Hairer's, as ``odeint`` runs it) and of contdeq's
    ``initial_step``, dopri5 at the integrator tolerances of the default steady-state
    tolerance 1e-4 (1e-5), on the README problem from ``z0 = 0``."""
    from torchdiffeq._impl.misc import _rms_norm, _select_initial_step

    f, z0 = readme_problem()
    func = lambda t, z: f(z) - z  # noqa: E731
    t0 = torch.tensor(0.0)
    theirs = float(_select_initial_step(func, t0, z0, 4, 1e-5, 1e-5, _rms_norm))
    ours = initial_step(func(t0, z0), z0, 1e-5, 1e-5, 5)
    return theirs, ours


def readme_quotes(table_heading: str, results: list[Path]) -> list[str]:
    """Numbers of the README table after ``table_heading`` that no value of the ``results``
    files (Markdown tables, JSON) gives, as printed or as its reciprocal (speed-ups quoted
    from ``x DEQ`` ratios), at the README's precision."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(table_heading)
    rows = re.search(r"((?:^\|.*\n)+)", readme[start:], flags=re.M)
    assert rows is not None, table_heading
    values = [float(v) for path in results
              for v in re.findall(r"(?<![\w.])\d+\.\d+(?:e-?\d+)?", path.read_text())]
    missing = []
    for quoted in sorted(set(re.findall(r"\d+\.\d+", rows.group(1)))):
        digits = len(quoted.split(".")[1])
        if not any(f"{v:.{digits}f}" == quoted or (v and f"{1 / v:.{digits}f}" == quoted)
                   for v in values):
            missing.append(quoted)
    return missing


def claims() -> list[tuple[str, str, bool]]:
    """``(claim, measured value, holds)`` for every checked claim."""
    out = []
    for method, value in evaluations_per_step().items():
        expected = EVALUATIONS_PER_STEP[method]
        out.append((f"{method}: {expected} evaluations per step (docs/solvers.md)",
                    f"{value:g}", value == expected))
    theirs, ours = first_steps()
    out.append(("torchdiffeq's first step from z0 = 0 is about 1e-4 (README)", f"{theirs:.2e}",
                3e-5 <= theirs <= 3e-4))
    out.append(("contdeq's first step is larger than torchdiffeq's (README, rk.py)",
                f"{ours:.2e} vs {theirs:.2e}", ours > 10 * theirs))
    results = ROOT / "benchmarks" / "results"
    for heading, name in (("| steady state, atol = rtol = 1e-4", "solvers"),
                          ("| task | DEQ(ode, ptc) vs NeuralODE", "paper")):
        missing = readme_quotes(heading, [results / f"{name}.md", results / f"{name}.json"])
        out.append((f"README table '{heading[2:30]}...' quotes benchmarks/results/{name}.*",
                    f"not found there: {missing}" if missing else "all found", not missing))
    return out


def main() -> int:
    wrong = 0
    for claim, value, holds in claims():
        wrong += not holds
        print(f"{'OK   ' if holds else 'WRONG'} {claim}: {value}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
