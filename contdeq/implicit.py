"""Gradients of an equilibrium ``z* = f(z*, x)`` without backpropagating through the solver.

By the implicit function theorem, for a loss ``L(z*)`` with ``v = dL/dz*``::

    w = (I - J)^-T v,   J = df/dz at (z*, x)      i.e.  w = J^T w + v
    dL/dtheta = w^T df/dtheta,   dL/dx = w^T df/dx

:class:`ImplicitFunction` is one ``torch.autograd.Function`` that wraps any forward solver
(:class:`ForwardSolver`): its forward runs the solver under ``no_grad`` and saves only ``z*``
(and references to ``x`` and ``f``'s parameters, which exist anyway); its backward rebuilds the
graph of one ``f(z*, x)`` call, solves ``w = J^T w + v`` with vector-Jacobian products
(:func:`solve_adjoint`), and takes one more VJP for the parameters and ``x``. Memory is
independent of the number of solver steps.

Backward modes (:class:`BackwardConfig`):

* ``"implicit"`` (default): the linear solve above, by ``"picard"`` (``w <- J^T w + v``),
  ``"anderson"``, ``"broyden"`` (via :func:`contdeq.solvers.fixed_point`) or ``"ode"`` (the
  continuous adjoint: steady state of ``dw/dt = J^T w + v - w`` via
  :func:`contdeq.solvers.steady_state`).
* ``"jfb"``: Jacobian-free backpropagation, ``w = v`` (one VJP; Fung et al. 2022).
* ``"unrolled"``: backpropagation through the solver's steps (the solver runs with grad
  enabled; memory grows with the steps). For testing and comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from .solvers import (
    FIXED_POINT_METHODS,
    STEADY_STATE_METHODS,
    NonFiniteError,
    SolverStats,
    fixed_point,
    sample_rms,
    steady_state,
)
from .solvers.errors import report_nonconvergence
from .solvers.gmres import gmres
from .solvers.validation import (
    check_choice,
    check_func_output,
    check_on_nonconvergence,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "BACKWARD_METHODS",
    "BACKWARD_MODES",
    "FORWARD_SOLVERS",
    "BackwardConfig",
    "DEQStats",
    "ForwardSolver",
    "ImplicitFunction",
    "equilibrium",
    "first_call",
    "solve_adjoint",
]

#: Forward solvers a layer accepts: ``"ode"`` (steady state of ``dz/dt = f(z, x) - z``) or a
#: discrete fixed-point method.
FORWARD_SOLVERS = ("ode", *FIXED_POINT_METHODS)
#: Ways to compute the gradient.
BACKWARD_MODES = ("implicit", "jfb", "unrolled")
#: Methods of the backward linear solve ``w = J^T w + v``.
BACKWARD_METHODS = ("picard", "anderson", "broyden", "ode", "gmres")
#: Forward solvers whose arithmetic is autograd-safe, so ``backward="unrolled"`` works.
#: (Anderson and Broyden update their history buffers in place.)
UNROLLABLE_SOLVERS = ("ode", "picard")
#: In the ``"ode"`` backward the right-hand side is scaled to a largest per-sample RMS of 1 and
#: the steady-state test gets this absolute floor times ``tol``: the integrator's elementwise
#: error scale ``atol + rtol * |w|`` must not be zero where ``w`` has exact zeros.
_ODE_ATOL_FLOOR = 1e-3


@dataclass
class DEQStats:
    """Solver statistics of a layer's last call.

    Attributes:
        forward: the forward solve (:class:`~contdeq.solvers.SolverStats`).
        backward: the backward linear solve, filled in when ``backward()`` has run through the
            layer; ``None`` before that, and for ``"jfb"`` and ``"unrolled"`` (no linear solve)
            or a :class:`~contdeq.nn.NeuralODE` without adjoint.
    """

    forward: SolverStats
    backward: SolverStats | None = None

    def summary(self) -> str:
        """Two short lines: forward and backward."""
        back = "not run" if self.backward is None else self.backward.summary()
        return f"forward: {self.forward.summary()}\nbackward: {back}"


class ForwardSolver:
    """A configured forward solver: ``solver(fx, z0) -> (z*, stats)`` with ``fx(z) = f(z, x)``.

    Args:
        solver: ``"ode"`` integrates ``dz/dt = fx(z) - z`` to steady state with
            :func:`~contdeq.solvers.steady_state`; ``"anderson"``, ``"broyden"``, ``"picard"``
            iterate ``z = fx(z)`` with :func:`~contdeq.solvers.fixed_point`.
        on_nonconvergence: ``"ignore"``, ``"warn"`` or ``"raise"``.
        **options: keyword arguments of that solver function (``method``, ``atol``, ``rtol``,
            ``max_steps``, ...; for the discrete solvers also ``memory``, ``damping``, ...).
            Unknown names raise ``TypeError`` here, not at the first call.
    """

    def __init__(self, solver: str = "ode", *, on_nonconvergence: str = "warn", **options: Any):
        self.solver = check_choice(solver, "solver", FORWARD_SOLVERS)
        self.on_nonconvergence = check_on_nonconvergence(on_nonconvergence)
        if "on_nonconvergence" in options:  # pragma: no cover - caught by the signature
            raise TypeError("pass on_nonconvergence once")
        _check_solver_options(solver, options)
        self.options = dict(options)

    @property
    def differentiable(self) -> bool:
        """Whether backpropagation through the steps works (``backward="unrolled"``)."""
        return self.solver in UNROLLABLE_SOLVERS

    def __call__(self, fx: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        """Solve from ``z0`` (``(B, ...)``); returns ``z*`` shaped like ``z0`` and the stats."""
        if self.solver == "ode":
            return steady_state(
                lambda t, z: fx(z) - z, z0, on_nonconvergence=self.on_nonconvergence,
                **self.options,
            )
        return fixed_point(
            fx, z0, method=self.solver, on_nonconvergence=self.on_nonconvergence, **self.options
        )

    def with_options(self, **options: Any) -> ForwardSolver:
        """A copy with ``options`` overriding this solver's options."""
        return ForwardSolver(
            self.solver, on_nonconvergence=self.on_nonconvergence, **{**self.options, **options}
        )

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"ForwardSolver({self.solver!r}{opts})"


_STEADY_STATE_KEYS = frozenset(
    {"method", "atol", "rtol", "ode_atol", "ode_rtol", "max_steps", "t_max", "first_step",
     "max_step", "backend", "record_trajectory", "timeout"}
)
_FIXED_POINT_KEYS = frozenset({"atol", "rtol", "max_steps", "record_trajectory", "timeout",
                               "freeze_converged"})


def _check_solver_options(solver: str, options: Mapping[str, Any]) -> None:
    """Reject unknown option names (torchdeq silently ignores them, its issue #12)."""
    if solver == "gmres":  # the backward's GMRES: only its restart length
        if set(options) - {"restart"}:
            raise TypeError(f"unknown option(s) {sorted(set(options) - {'restart'})} for "
                            "backward_method='gmres'; it accepts ['restart']")
        return
    if solver == "ode":
        unknown = sorted(set(options) - _STEADY_STATE_KEYS)
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown} for solver='ode'; steady_state accepts "
                f"{sorted(_STEADY_STATE_KEYS)}"
            )
        if "method" in options:
            check_choice(options["method"], "method", STEADY_STATE_METHODS)
        return
    method_options = {k: v for k, v in options.items() if k not in _FIXED_POINT_KEYS}
    try:  # the solver class validates its own option names and values
        FIXED_POINT_METHODS[solver](torch.zeros(1, 1), **method_options)
    except TypeError as exc:
        raise TypeError(f"solver={solver!r}: {exc}") from None


@dataclass(frozen=True)
class BackwardConfig:
    """How a layer computes gradients.

    Attributes:
        mode: ``"implicit"`` (default), ``"jfb"`` or ``"unrolled"``.
        method: linear solver of the implicit mode: ``"anderson"`` (default), ``"picard"``,
            ``"broyden"``, ``"ode"`` or ``"gmres"`` (Krylov; fewest VJPs when ``df/dz`` is
            near the edge of contraction).
        tol: relative tolerance of the linear solve. The test is scale-invariant:
            ``rms(J^T w + v - w)_b <= tol * rms(w_b)`` for each sample ``b`` (``atol = 0``), so
            the tiny right-hand sides of a batch-mean loss do not inflate iterations.
        max_steps: iteration cap of the linear solve.
        options: extra options of the linear solver (``memory``, ``damping``, ...; for
            ``"ode"`` the keywords of :func:`~contdeq.solvers.steady_state`, e.g. ``method``).
        on_nonconvergence: ``"ignore"``, ``"warn"`` or ``"raise"``.
    """

    mode: str = "implicit"
    method: str = "anderson"
    tol: float = 1e-4
    max_steps: int = 100
    options: Mapping[str, Any] = field(default_factory=dict)
    on_nonconvergence: str = "warn"

    def __post_init__(self) -> None:
        check_choice(self.mode, "backward", BACKWARD_MODES)
        check_choice(self.method, "backward_method", BACKWARD_METHODS)
        check_positive_float(self.tol, "backward_tol")
        check_positive_int(self.max_steps, "backward_max_steps")
        check_on_nonconvergence(self.on_nonconvergence)
        reserved = {"atol", "rtol", "max_steps", "on_nonconvergence"} & set(self.options)
        if reserved:
            raise TypeError(
                f"backward_options must not set {sorted(reserved)}; use backward_tol / "
                "backward_max_steps / on_nonconvergence"
            )
        _check_solver_options(self.method, self.options)
        object.__setattr__(self, "options", dict(self.options))


def solve_adjoint(
    vjp: Callable[[Tensor], Tensor],
    v: Tensor,
    *,
    method: str = "anderson",
    tol: float = 1e-4,
    max_steps: int = 100,
    on_nonconvergence: str = "warn",
    **options: Any,
) -> tuple[Tensor, SolverStats]:
    """Solve ``w = vjp(w) + v``, i.e. ``(I - J)^T w = v`` with ``vjp(w) = J^T w``.

    Args:
        vjp: ``w -> J^T w`` on ``(B, ...)`` tensors shaped like ``v``.
        v: ``(B, ...)`` right-hand side (the gradient of the loss w.r.t. ``z*``).
        method: ``"anderson"``, ``"picard"``, ``"broyden"``, ``"ode"`` (steady state of
            ``dw/dt = J^T w + v - w``, integrated by ``options.get("method", "dopri5")``) or
            ``"gmres"`` (restarted GMRES on ``(I - J^T) w = v``, option ``restart=60``; its
            test is relative to ``rms(v_b)``, stricter than ``rms(w_b)`` where ``|w| > |v|``).
        tol: per-sample relative tolerance ``rms(residual_b) <= tol * rms(w_b)``.
        max_steps: iteration cap.
        on_nonconvergence: ``"ignore"``, ``"warn"`` or ``"raise"``.
        **options: passed to :func:`~contdeq.solvers.fixed_point` or
            :func:`~contdeq.solvers.steady_state`.

    Returns:
        ``(w, stats)``: ``w`` shaped like ``v``; ``stats.nfe`` counts the VJPs.

    The solve starts from ``w0 = v`` (the Jacobian-free answer), and ``v`` is divided by its
    largest per-sample RMS first (the problem is linear, so ``w`` is scaled back exactly). The
    discrete methods iterate all samples together (``freeze_converged=False`` unless
    ``options`` says otherwise).
    """
    if not bool(torch.isfinite(v).all()):
        raise NonFiniteError(
            "the gradient arriving at the equilibrium layer's output contains NaN or Inf", 0
        )
    scale = float(sample_rms(v).max())
    if scale == 0.0:
        scale = 1.0
    vn = v / scale
    with torch.no_grad():
        if method == "gmres":
            w, stats = _solve_adjoint_gmres(vjp, vn, tol, max_steps, on_nonconvergence, **options)
        elif method == "ode":
            w, stats = steady_state(
                lambda t, w: vjp(w).add_(vn).sub_(w), vn,
                atol=_ODE_ATOL_FLOOR * tol, rtol=tol, max_steps=max_steps,
                on_nonconvergence=on_nonconvergence, **options,
            )
        else:
            # Linear and contractive where it converges: iterating a converged sample further
            # cannot hurt it, so all samples iterate together (half the bookkeeping).
            w, stats = fixed_point(
                lambda w: vjp(w).add_(vn), vn, method=method, atol=0.0, rtol=tol,
                max_steps=max_steps, on_nonconvergence=on_nonconvergence,
                **{"freeze_converged": False, **options},
            )
    return w.mul_(scale), stats


def _solve_adjoint_gmres(
    vjp: Callable[[Tensor], Tensor], v: Tensor, tol: float, max_steps: int,
    on_nonconvergence: str, restart: int = 60,
) -> tuple[Tensor, SolverStats]:
    """``(I - J^T) w = v`` by GMRES for :func:`solve_adjoint` (``v``: ``(B, ...)``, already
    scaled; ``max_steps`` caps the VJPs). Returns ``w`` shaped like ``v`` (unscaled) and stats
    with ``nfe`` = VJPs and ``linear_iterations`` = Arnoldi steps."""
    start = time.perf_counter()
    flat = v.reshape(v.shape[0], -1)

    def matvec(w: Tensor) -> Tensor:
        return w - vjp(w.reshape(v.shape)).reshape(flat.shape)

    out = gmres(matvec, flat, rtol=tol, restart=restart, max_iterations=max_steps)
    stats = SolverStats(
        method="gmres", nfe=out.matvecs, steps=out.steps, residual=out.residual,
        tolerance=tol * sample_rms(flat), converged=out.converged,
        wall_time=time.perf_counter() - start,
        stop_reason="converged" if bool(out.converged.all()) else "max_steps",
        linear_iterations=out.steps,
    )
    report_nonconvergence(stats, on_nonconvergence)  # type: ignore[arg-type]
    return out.solution.reshape(v.shape), stats


class _CheckedCall:
    """``fx(z) = f(z, x)`` whose first output is checked with a message naming ``f``."""

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor], x: Tensor, name: str = "f"):
        self.f = f
        self.x = x
        self.name = name
        self.checked = False

    def __call__(self, z: Tensor) -> Tensor:
        if self.checked:
            return self.f(z, self.x)
        out = first_call(self.f, z, self.x, self.name)
        self.checked = True
        return out


def first_call(f: Callable[[Tensor, Tensor], Tensor], z: Tensor, x: Tensor, name: str = "f"
               ) -> Tensor:
    """``f(z, x)``, with shape errors inside ``f`` and a badly shaped output explained in
    terms of the state shape (the usual cause: ``state_shape`` left to default to ``x``'s)."""
    try:
        out = f(z, x)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{name}(z, x) failed with the state z of shape {tuple(z.shape)} and x of shape "
            f"{tuple(x.shape)}; if f's state is not shaped like x, set state_shape=... on the "
            f"layer or pass z0.{_dtype_device_hint(f, z, x)} The error was: {exc}"
        ) from exc
    return check_output(out, z, name)


def _dtype_device_hint(f: object, z: Tensor, x: Tensor) -> str:
    """Where ``z``, ``x`` and ``f``'s parameters disagree in dtype or device, say so."""
    params = [p for p in f.parameters() if p.is_floating_point()] if isinstance(
        f, nn.Module) else []
    kinds = {(t.dtype, t.device) for t in (z, x, *params)}
    if len(kinds) == 1:
        return ""
    held = f", f's parameters {params[0].dtype} on {params[0].device}" if params else ""
    return (f" Dtypes/devices differ: z {z.dtype} on {z.device}, x {x.dtype} on {x.device}"
            f"{held} (convert the module or the input).")


def check_output(out: object, z: Tensor, name: str = "f") -> Tensor:
    """``out`` must be a tensor shaped, typed and placed like the state ``z`` (the solvers'
    check, with hints on how a layer chooses its state)."""
    return check_func_output(
        out, z, f"{name}(z, x)", state="the state z",
        shape_hint=" (set state_shape=... on the layer, or pass z0, if the state is not shaped "
                   "like x)",
        dtype_hint=" (the state takes x's dtype: convert the module or the input)",
    )


@dataclass
class _Problem:
    """What the autograd function needs besides tensors (not saved as tensors)."""

    f: nn.Module
    solver: ForwardSolver
    config: BackwardConfig
    z0: Tensor
    names: tuple[str, ...]
    buffers: dict[str, Tensor]
    record: DEQStats | None = None
    forward_stats: SolverStats | None = None


class ImplicitFunction(torch.autograd.Function):
    """``z* = solve(f(., x), z0)`` with implicit-function-theorem (or JFB) gradients.

    Called as ``ImplicitFunction.apply(problem, x, *params)`` by :func:`equilibrium`; the
    gradients of ``x`` and of ``params`` (``f``'s parameters, by name in ``problem.names``)
    come from one vector-Jacobian product of ``f`` at ``z*``.
    """

    @staticmethod
    def forward(ctx: Any, problem: _Problem, x: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        fx = _CheckedCall(problem.f, x)
        z, stats = problem.solver(fx, problem.z0)
        problem.forward_stats = stats
        ctx.problem = problem
        ctx.save_for_backward(z, x, *params)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        problem: _Problem = ctx.problem
        z, x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        config = problem.config
        with torch.enable_grad():
            zr = z.detach().requires_grad_(config.mode == "implicit")
            xr = x.detach().requires_grad_(needs[0])
            pr = [p.detach().requires_grad_(n) for p, n in zip(params, needs[1:], strict=True)]
            tensors = {**problem.buffers, **dict(zip(problem.names, pr, strict=True))}
            fz = functional_call(problem.f, tensors, (zr, xr))
        if not fz.requires_grad:  # f depends on neither z, x nor the parameters
            return (None, None, *(None for _ in params))
        if config.mode == "implicit":
            def vjp(w: Tensor) -> Tensor:
                (g,) = torch.autograd.grad(fz, zr, w, retain_graph=True, allow_unused=True)
                return torch.zeros_like(w) if g is None else g

            start = time.perf_counter()
            w, stats = solve_adjoint(
                vjp, grad_z, method=config.method, tol=config.tol, max_steps=config.max_steps,
                on_nonconvergence="ignore", **config.options,
            )
            stats.wall_time = time.perf_counter() - start
            if problem.record is not None:
                problem.record.backward = stats
            _report(stats, config.on_nonconvergence, "backward linear solve")
        else:  # jfb
            w = grad_z
        inputs = [t for t in (xr, *pr) if t.requires_grad]
        grads = iter(torch.autograd.grad(fz, inputs, w, allow_unused=True)) if inputs else iter(())
        out: list[Tensor | None] = [None]
        for t in (xr, *pr):
            if t.requires_grad:
                g = next(grads)
                out.append(torch.zeros_like(t) if g is None else g)
            else:
                out.append(None)
        return tuple(out)


def _report(stats: SolverStats, on_nonconvergence: str, what: str) -> None:
    """Warn or raise for an unconverged solve, naming it."""
    if on_nonconvergence == "ignore" or stats.all_converged:
        return
    stats_named = SolverStats(**{**stats.__dict__, "method": f"{what} ({stats.method})"})
    report_nonconvergence(stats_named, on_nonconvergence)  # type: ignore[arg-type]


def trainable_parameters(f: nn.Module) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """Names and tensors of ``f``'s parameters that require grad (shared ones once)."""
    names, params = [], []
    for name, p in f.named_parameters():
        if p.requires_grad:
            names.append(name)
            params.append(p)
    return tuple(names), tuple(params)


def equilibrium(
    f: nn.Module,
    x: Tensor,
    z0: Tensor,
    *,
    solver: ForwardSolver,
    backward: BackwardConfig | None = None,
) -> tuple[Tensor, DEQStats]:
    """The equilibrium ``z* = f(z*, x)`` found from ``z0``, differentiable in ``x`` and ``f``.

    Args:
        f: module called as ``f(z, x)``, returning a tensor shaped like ``z``.
        x: ``(B, ...)`` input (any shape; passed to ``f`` unchanged).
        z0: ``(B, ...)`` initial state (not differentiated: ``z*`` does not depend on it).
        solver: the forward solver.
        backward: gradient configuration (default :class:`BackwardConfig()`).

    Returns:
        ``(z*, stats)``: ``z*`` shaped like ``z0``; ``stats.backward`` is filled in by the
        backward pass (implicit mode). When grad is disabled, or nothing requires grad, the
        solve runs under ``no_grad`` and no autograd node is created.
    """
    _check_equilibrium_arguments(f, x, z0, solver, backward)
    config = BackwardConfig() if backward is None else backward
    names, params = trainable_parameters(f)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or len(params) > 0)
    if not need_grad:
        with torch.no_grad():
            z, stats = solver(_CheckedCall(f, x), z0)
        return z, DEQStats(stats)
    if config.mode == "unrolled":
        if not solver.differentiable:
            raise ValueError(
                f"backward='unrolled' needs an autograd-safe forward solver {UNROLLABLE_SOLVERS}; "
                f"solver={solver.solver!r} updates its history in place"
            )
        z, stats = solver(_CheckedCall(f, x), z0)
        return z, DEQStats(stats)
    record = DEQStats.__new__(DEQStats)
    problem = _Problem(f, solver, config, z0.detach(), names, dict(f.named_buffers()), record)
    z = ImplicitFunction.apply(problem, x, *params)
    assert problem.forward_stats is not None
    record.forward = problem.forward_stats
    record.backward = None
    return z, record


def _check_equilibrium_arguments(f: object, x: object, z0: object, solver: object,
                                 backward: object) -> None:
    """Types of :func:`equilibrium`'s arguments, and ``z0`` against ``x`` (batch, dtype,
    device); each message names the argument, what was expected and what was received."""
    if not isinstance(f, nn.Module):
        raise TypeError(f"f must be an nn.Module called as f(z, x), got {type(f).__name__}")
    for name, value in (("x", x), ("z0", z0)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    assert isinstance(x, Tensor) and isinstance(z0, Tensor)
    if not isinstance(solver, ForwardSolver):
        raise TypeError(f"solver must be a contdeq.ForwardSolver, got {type(solver).__name__}")
    if backward is not None and not isinstance(backward, BackwardConfig):
        raise TypeError(f"backward must be a contdeq.BackwardConfig or None, got "
                        f"{type(backward).__name__}")
    if z0.ndim == 0 or x.ndim == 0 or z0.shape[0] != x.shape[0]:
        raise ValueError(f"z0 must have x's batch size first: x has shape {tuple(x.shape)}, "
                         f"z0 has shape {tuple(z0.shape)}")
    if z0.dtype != x.dtype or z0.device != x.device:
        raise TypeError(f"z0 must have x's dtype and device ({x.dtype}, {x.device}), got "
                        f"({z0.dtype}, {z0.device})")
