"""A/B of the solver loops: this working tree's ``contdeq`` against a git revision's, in one run.

``python -m benchmarks.solver_ab --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

import contdeq

from .common import (
    CPU,
    contractive,
    machine_header,
    make_parser,
    synchronize,
    table,
)

REPO = Path(__file__).resolve().parents[1]
#: Row name -> ``(package, f, z0, tol) -> solve``.
CASES: dict[str, Callable[..., Callable[[], object]]] = {
    "steady_state ptc": lambda m, f, z0, tol: lambda: m.solvers.steady_state(
        lambda t, z: f(z) - z, z0, method="ptc", atol=tol, rtol=tol),
    "fixed_point picard": lambda m, f, z0, tol: lambda: m.solvers.fixed_point(
        f, z0, method="picard", atol=tol, rtol=tol),
    "fixed_point picard, not freezing": lambda m, f, z0, tol: lambda: m.solvers.fixed_point(
        f, z0, method="picard", atol=tol, rtol=tol, freeze_converged=False),
    "fixed_point anderson": lambda m, f, z0, tol: lambda: m.solvers.fixed_point(
        f, z0, method="anderson", atol=tol, rtol=tol),
    "fixed_point anderson, not freezing": lambda m, f, z0, tol: lambda: m.solvers.fixed_point(
        f, z0, method="anderson", atol=tol, rtol=tol, freeze_converged=False),
    "steady_state dopri5": lambda m, f, z0, tol: lambda: m.solvers.steady_state(
        lambda t, z: f(z) - z, z0, method="dopri5", atol=tol, rtol=tol),
}


def import_copy(package_dir: Path, name: str, workdir: Path) -> ModuleType:
    """Import the package in ``package_dir`` under the name ``name`` (a copy in ``workdir``;
    the package must import its own modules relatively)."""
    shutil.copytree(package_dir, workdir / name)
    spec = importlib.util.spec_from_file_location(
        name, workdir / name / "__init__.py", submodule_search_locations=[str(workdir / name)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        forget(name)
        raise
    return module


def import_revision(rev: str, name: str, workdir: Path) -> ModuleType:
    """Import ``contdeq`` as it is at git revision ``rev`` under the name ``name``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "contdeq"],
                             check=True, capture_output=True).stdout
    extracted = workdir / "archive"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(extracted, filter="data")
        else:  # pragma: no cover - older Pythons; the archive is our own repository's
            tar.extractall(extracted)
    return import_copy(extracted / "contdeq", name, workdir)


def forget(name: str) -> None:
    """Drop the package ``name`` and its modules from ``sys.modules``."""
    for key in [k for k in sys.modules if k == name or k.startswith(f"{name}.")]:
        del sys.modules[key]


def compare(base: ModuleType, batch: int, width: int, tol: float, rounds: int, calls: int,
            device: torch.device = CPU) -> list[dict[str, float | str]]:
    """Time every case of :data:`CASES` for ``base`` and this tree's ``contdeq`` in turn."""
    w, x = contractive(width, batch, device=device)
    z0 = torch.zeros(batch, width, device=device)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + x)

    solves = {(tag, case): make(pkg, f, z0, tol) for case, make in CASES.items()
              for tag, pkg in (("base", base), ("new", contdeq))}
    best = dict.fromkeys(solves, float("inf"))
    with torch.no_grad():
        for solve in solves.values():
            solve()  # warm-up
        for _ in range(rounds):
            for key, solve in solves.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(calls):
                    solve()
                synchronize(device)
                best[key] = min(best[key], (time.perf_counter() - start) / calls)
        rows = []
        for case in CASES:
            nfe = {tag: solves[(tag, case)]()[1].nfe for tag in ("base", "new")}
            rows.append({"case": case, "nfe_base": nfe["base"], "nfe_new": nfe["new"],
                         "base_ms": 1e3 * best[("base", case)],
                         "new_ms": 1e3 * best[("new", case)],
                         "speedup": best[("base", case)] / best[("new", case)]})
    return rows


def to_markdown(rows: list[dict[str, float | str]], header: str) -> str:
    return table("solve | NFE base / new | base ms | new ms | base / new",
                 ((r["case"], f"{r['nfe_base']} / {r['nfe_new']}", f"{r['base_ms']:.3f}",
                   f"{r['new_ms']:.3f}", f"{r['speedup']:.2f}") for r in rows), "llrrr",
                 [header, ""]).rstrip("\n")


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = make_parser(__doc__, out=False)
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tol", type=float, default=5e-3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base = import_revision(args.base, "contdeq_base", Path(tmp))
            rows = compare(base, args.batch, args.width, args.tol, args.rounds, args.calls,
                           args.device)
        finally:
            forget("contdeq_base")
    header = (f"Solver loops, `{args.base}` (base) against this tree (new): batch {args.batch}, "
              f"width {args.width}, tol {args.tol:g}, fastest of {args.rounds} x {args.calls} "
              f"solves ({machine_header()}, device {args.device})")
    if args.device.type == "cuda":
        header += f"; peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB"
    print(to_markdown(rows, header))
    return rows


if __name__ == "__main__":
    main()
