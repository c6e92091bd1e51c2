"""Aten operations per solver step and per training step, counted (deterministic).

``python -m benchmarks.op_counts --help``; benchmarks/README.md describes it."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import contdeq
from contdeq.solvers import FIXED_POINT_METHODS, STEADY_STATE_METHODS

from .common import RESULTS, contractive, make_parser, table

#: ``max_steps`` of the two solves whose difference gives the marginal cost of a step.
MARGINAL_STEPS = (4, 12)
#: Tolerance of those solves: below float32's resolution, so every step is a loop step.
MARGINAL_TOL = 1e-9


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active; those dispatched inside ``f`` (see
    :meth:`inside_f`) or while autograd runs a backward node recorded inside ``f`` are also
    counted in :attr:`f_ops`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.f_ops = 0
        self._depth = 0
        self._f_nodes: set[int] = set()
        self._keep: list[object] = []  # keeps the marked nodes alive, so ids stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if self._depth:
            self.f_ops += 1
        elif self._f_nodes:
            node = torch._C._current_autograd_node()
            if node is not None and id(node) in self._f_nodes:
                self.f_ops += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def inside_f(self) -> Iterator[None]:
        """Ops dispatched in this context are ``f``'s."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def mark_graph(self, out: Tensor, inputs: tuple[Tensor, ...]) -> None:
        """Mark the backward nodes ``out``'s graph gained in one call of ``f`` (from
        ``out.grad_fn`` back to the nodes of ``inputs`` or the leaves) as ``f``'s."""
        stop = {id(t.grad_fn) for t in inputs if t.grad_fn is not None}
        todo = [out.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or id(node) in stop or id(node) in self._f_nodes:
                continue
            if type(node).__name__ == "AccumulateGrad":
                continue
            self._f_nodes.add(id(node))
            self._keep.append(node)
            todo.extend(next_node for next_node, _ in node.next_functions)


def count_solve(solve: Callable[..., tuple[Tensor, object]], f: Callable[[Tensor], Tensor],
                ode: bool, callback: Callable[[object], None] | None = None
                ) -> dict[str, float | int | str]:
    """Run ``solve(user_function, callback)`` under an :class:`OpCounter` and a
    ``sys.setprofile`` count of Python calls; NFE, steps, op and call counts."""
    counter = OpCounter()
    calls = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    def user_ode(t: Tensor, z: Tensor) -> Tensor:
        with counter.inside_f():
            return f(z) - z

    def user_map(z: Tensor) -> Tensor:
        with counter.inside_f():
            return f(z)

    # The garbage collector would run finalizers of unrelated objects inside the count.
    gc.collect()
    gc.disable()
    with torch.no_grad(), counter:
        sys.setprofile(profile)
        try:
            _, stats = solve(user_ode if ode else user_map, callback)
        finally:
            sys.setprofile(None)
            gc.enable()
    steps = max(stats.steps, 1)
    return {"nfe": stats.nfe, "steps": stats.steps, "ops": counter.ops, "f_ops": counter.f_ops,
            "calls": calls, "non_f_per_step": (counter.ops - counter.f_ops) / steps,
            "stop": str(stats.stop_reason)}


def noop(info: object) -> None:
    """The step callback whose cost :func:`solver_rows` counts."""


def solver_rows(batch: int, width: int, tol: float, device: str | torch.device = "cpu"
                ) -> list[dict[str, float | int | str]]:
    """One row per registered steady-state and fixed-point method."""
    w, x = contractive(width, batch, device=device)
    z0 = torch.zeros_like(x)

    def f(z: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x)

    def steady(method: str) -> Callable[..., Callable]:
        return lambda t, n: lambda fn, cb: contdeq.solvers.steady_state(
            fn, z0, method=method, atol=t, rtol=t, max_steps=n, callback=cb,
            on_nonconvergence="ignore")

    def fixed(method: str, freeze: bool) -> Callable[..., Callable]:
        return lambda t, n: lambda fn, cb: contdeq.solvers.fixed_point(
            fn, z0, method=method, atol=t, rtol=t, max_steps=n, freeze_converged=freeze,
            callback=cb, on_nonconvergence="ignore")

    def per_step(make: Callable, ode: bool, callback: Callable | None) -> dict[str, float]:
        """Non-f ops and Python calls per extra loop step (difference of two capped solves)."""
        short, long = (count_solve(make(MARGINAL_TOL, n), f, ode, callback)
                       for n in MARGINAL_STEPS)
        steps = max(int(long["steps"]) - int(short["steps"]), 1)
        return {"ops": ((long["ops"] - long["f_ops"]) - (short["ops"] - short["f_ops"])) / steps,
                "calls": (long["calls"] - short["calls"]) / steps, "nfe": long["nfe"]}

    solves = [(f"steady_state {m}", steady(m), True) for m in STEADY_STATE_METHODS]
    solves += [(f"fixed_point {m}" + ("" if fr else ", not freezing"), fixed(m, fr), False)
               for m in FIXED_POINT_METHODS for fr in (True, False)]
    rows = []
    for label, make, ode in solves:
        row = count_solve(make(tol, 1000), f, ode)
        plain, hooked = per_step(make, ode, None), per_step(make, ode, noop)
        if count_solve(make(tol, 1000), f, ode, noop)["nfe"] != row["nfe"] or \
                hooked["nfe"] != plain["nfe"]:
            raise RuntimeError(f"{label}: a no-op callback changed the solve's NFE")
        row.update(marginal=plain["ops"], callback_ops=hooked["ops"] - plain["ops"],
                   callback_calls=hooked["calls"] - plain["calls"])
        rows.append({"solve": label, **row})
    return rows


class _F(nn.Module):
    """``f(z, x) = tanh(z W^T + x)`` whose calls (and their backward nodes) a counter marks."""

    def __init__(self, width: int, counter: OpCounter) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.counter = counter

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        with self.counter.inside_f():
            out = torch.tanh(self.linear(z) + x)
        if out.grad_fn is not None:
            self.counter.mark_graph(out, (z, x))
        return out


def training_step_ops(batch: int, width: int, tol: float, seed: int = 0,
                      layer: bool = True, device: str | torch.device = "cpu") -> dict[str, int]:
    """Aten ops of one training step (forward, backward, Adam step) of ``Linear -> DEQ(ode,
    ptc) -> Linear`` (``layer=False``: ``Linear -> Linear``), split into ``f``'s and the rest."""
    torch.manual_seed(seed)
    counter = OpCounter()
    n_classes = 10
    f = _F(width, counter)
    with torch.no_grad():  # contractive: ||W||_2 = 0.9
        f.linear.weight.mul_(0.9 / torch.linalg.matrix_norm(f.linear.weight, 2))
    middle: nn.Module = (contdeq.DEQ(f, solver="ode", method="ptc", atol=tol, rtol=tol,
                                     on_nonconvergence="ignore") if layer else nn.Identity())
    model = nn.Sequential(nn.Linear(width, width), middle, nn.Linear(width, n_classes))
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randint(0, n_classes, (batch,), generator=gen)
    x, y = x.to(device), y.to(device)

    def step() -> None:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()  # warm-up: Adam's state, lazy initialization
    with counter:
        step()
    nfe = None
    if layer:
        stats = middle.stats  # type: ignore[union-attr]
        nfe = stats.forward.nfe
    return {"ops": counter.ops, "f_ops": counter.f_ops, "forward_nfe": nfe}


def training_row(batch: int, width: int, tol: float, device: str | torch.device = "cpu"
                 ) -> dict[str, int]:
    """The training step's ops: total, ``f``'s, the model's without the layer, the rest."""
    with_layer = training_step_ops(batch, width, tol, device=device)
    without = training_step_ops(batch, width, tol, layer=False, device=device)
    return {"total": with_layer["ops"], "f": with_layer["f_ops"], "model": without["ops"],
            "rest": with_layer["ops"] - with_layer["f_ops"] - without["ops"],
            "forward_nfe": with_layer["forward_nfe"]}


def files_crossed(call: Callable[[], object]) -> list[str]:
    """The package's files whose code runs during ``call()`` (after one warm-up call), by a
    ``sys.setprofile`` trace of every Python call."""
    call()
    root = Path(contdeq.__file__).resolve().parent
    seen: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            seen.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return sorted(str(Path(f).resolve().relative_to(root.parent)) for f in seen
                  if Path(f).resolve().is_relative_to(root))


def files_row(batch: int, width: int, tol: float) -> dict[str, list[str]]:
    """Files a ``steady_state`` call (ptc) and a ``DEQ(ode, ptc)`` forward in training mode
    cross."""
    w, x = contractive(width, batch)
    z0 = torch.zeros(batch, width)
    layer = contdeq.DEQ(_F(width, OpCounter()), solver="ode", method="ptc", atol=tol, rtol=tol)
    xg = x.clone().requires_grad_(True)
    return {
        "steady_state": files_crossed(lambda: contdeq.solvers.steady_state(
            lambda t, z: torch.tanh(z @ w.T + x) - z, z0, method="ptc", atol=tol, rtol=tol)),
        "DEQ forward": files_crossed(lambda: layer(xg)),
    }


def to_markdown(rows: list[dict[str, float | int | str]], training: dict[str, int],
                header: str) -> str:
    solves = table(
        "solve | NFE | steps | stop | aten ops | in f | non-f ops / step | marginal | no-op "
        "callback: ops / step | no-op callback: Python calls / step",
        ((r["solve"], r["nfe"], r["steps"], r["stop"], r["ops"], r["f_ops"],
          f"{r['non_f_per_step']:.1f}", f"{r['marginal']:.1f}", f"{r['callback_ops']:+.1f}",
          f"{r['callback_calls']:+.1f}") for r in rows), "lrrlrrrrrr", [header, ""])
    step = table("aten ops | f (evaluations + VJPs) | model without the layer | rest",
                 [(training["total"], training["f"], training["model"], training["rest"])],
                 "rrrr", ["", "One training step of Linear -> DEQ(solver='ode', method='ptc') "
                          f"-> Linear with Adam (forward NFE {training['forward_nfe']}):", ""])
    return (solves + step).rstrip("\n")


def main(argv: list[str] | None = None) -> tuple[list[dict[str, float | int | str]],
                                                 dict[str, int]]:
    parser = make_parser(__doc__, out=False)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tol", type=float, default=5e-3)
    parser.add_argument("--write", action="store_true", help="write results/op_counts.md")
    args = parser.parse_args(argv)
    rows = solver_rows(args.batch, args.width, args.tol, args.device)
    training = training_row(args.batch, args.width, args.tol, args.device)
    header = (f"Aten ops (counted, deterministic): batch {args.batch}, width {args.width}, "
              f"tol {args.tol:g}, f(z) = tanh(z W^T + x)")
    markdown = to_markdown(rows, training, header)
    files = files_row(args.batch, args.width, args.tol)
    markdown += "\n\nPackage files whose code runs in one call (a sys.setprofile trace):\n\n"
    markdown += "\n".join(f"* {name}: {len(found)} ({', '.join(found)})"
                           for name, found in files.items())
    print(markdown)
    if args.write:
        (RESULTS / "op_counts.md").write_text(markdown + "\n")
    return rows, training


if __name__ == "__main__":
    main()
