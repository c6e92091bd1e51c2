"""A neural ODE baseline with the same ``f(z, x)`` signature as the equilibrium layers."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from ..implicit import DEQStats, first_call
from ..solvers import TABLEAUX, ConvergenceError, NonFiniteError, SolverStats, initial_step
from .checks import check_module, check_number
from .deq import PerThreadResults, Single, check_layer_input, zeros_or_state
from .names import renamed
from .normalization import (
    fixed_normalization,
    fixed_vectors,
    restored_normalization,
    update_normalization,
    warn_unstable_normalization,
)
from .structure import Structure

__all__ = ["NeuralODE"]

#: Adaptive torchdiffeq methods for which the steady-state solver's first-step rule is used.
_FIRST_STEP_METHODS = ("dopri5", "bosh3", "dopri8", "adaptive_heun")


def _rhs(f: nn.Module, z: Tensor, x: Tensor, residual: bool) -> Tensor:
    """``f(z, x) - z`` (or ``f(z, x)``)."""
    out = f(z, x)
    return out - z if residual else out


#: :func:`_rhs` compiled (``NeuralODE(compile=True)``): one graph per shape, dtype and ``f``.
_compiled_rhs = torch.compile(_rhs, dynamic=False)


class _Dynamics:
    """``func(t, z)`` for torchdiffeq: ``f(z, x) - z`` (or ``f(z, x)``), counting calls.

    One per forward call (it holds that call's ``x`` until the adjoint pass is done). The first
    call of a solve at ``(t0, z0)`` returns the derivative the layer already computed for the
    first-step rule, so that evaluation is counted once.
    """

    def __init__(self, f: nn.Module, residual: bool, x: Tensor, compiled: bool = False) -> None:
        self.f = f
        self.compiled = compiled
        self.residual = residual
        self.x = x
        self.calls = 0
        self.backward_calls = 0
        self.in_backward = False
        self.record: DEQStats | None = None
        #: The forward's spectral_norm_cap vectors (:func:`fixed_vectors`), for the adjoint.
        self.vectors: dict[int, tuple[Tensor, Tensor]] = {}
        self.last_output: Tensor | None = None  # checked for NaN/Inf only if the solve fails
        self._first: tuple[Tensor, Tensor] | None = None

    def rhs(self, z: Tensor) -> Tensor:
        if self.calls == 0:  # checked eagerly
            out = first_call(self.f, z, self.x)
            out = out - z if self.residual else out
        elif self.in_backward and self.vectors:  # the adjoint pass: f with its forward's
            # spectral_norm_cap vectors, eager (a compiled graph kept another pass's vectors)
            with restored_normalization(self.vectors):
                out = _rhs(self.f, z, self.x, self.residual)
        else:
            out = (_compiled_rhs if self.compiled else _rhs)(self.f, z, self.x, self.residual)
        self.calls += 1
        self.last_output = out
        if self.in_backward:
            self.backward_calls += 1
            if self.record is not None and self.record.backward is not None:
                self.record.backward.nfe += 1
        return out

    def __call__(self, t: Tensor, z: Tensor) -> Tensor:
        if self._first is not None:
            z0, d0 = self._first
            self._first = None
            if z is z0 or (z.shape == z0.shape and torch.equal(z, z0)):
                return d0
        return self.rhs(z)


class _BackwardStart(torch.autograd.Function):
    """Identity whose backward marks the start of the adjoint pass (to count its NFE)."""

    @staticmethod
    def forward(ctx: Any, dynamics: _Dynamics, z: Tensor) -> Tensor:  # type: ignore[override]
        ctx.dynamics = dynamics
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        dyn: _Dynamics = ctx.dynamics
        dyn.in_backward = True
        if dyn.record is not None:
            b = grad.shape[0]
            nan = grad.new_full((b,), math.nan)
            dyn.record.backward = SolverStats(
                method="adjoint", nfe=0, steps=0, residual=nan, tolerance=nan.clone(),
                converged=torch.ones(b, dtype=torch.bool, device=grad.device), wall_time=0.0,
                stop_reason="t_end",
            )
        return None, grad


class NeuralODE(PerThreadResults):
    """Neural ODE baseline: ``z(t_end)`` of ``dz/dt = f(z, x) - z`` from ``z(0) = z0``.

    It integrates the *same* vector field as a continuous :class:`~contdeq.DEQ` with the same
    ``f``, but to a fixed time instead of to steady state (``residual=False`` integrates
    ``dz/dt = f(z, x)`` instead). The step-size rule for the first step is the steady-state
    solver's (:func:`contdeq.solvers.initial_step`, from the derivative at ``z0``, which
    torchdiffeq then reuses as its first stage), so benchmarks compare like with like.

    Args:
        f: ``nn.Module`` called as ``f(z, x)``.
        t_end: integration time (> 0).
        method: torchdiffeq method (``"dopri5"`` default; also ``"bosh3"``, ``"dopri8"``,
            ``"adaptive_heun"``, fixed-grid ``"rk4"``, ...).
        adjoint: backpropagate with torchdiffeq's ``odeint_adjoint`` (memory independent of
            steps; the adjoint ODE is integrated backward over the whole trajectory) instead of
            through the solver's operations.
        rtol, atol: integrator tolerances (default 1e-5: the integrator tolerances a
            continuous DEQ uses with its default steady-state tolerance 1e-4).
        residual: integrate ``f - z`` (default) or ``f``.
        state_shape: per-sample state shape (default: ``x``'s); ``z0`` defaults to zeros.
        structure: the state structure, as for :class:`~contdeq.DEQ` (``Single``, default,
            or ``Scales(state_shapes)``: tuples in and out).
        options: extra torchdiffeq options (``step_size``, ...).
        adjoint_options: extra keyword arguments of ``odeint_adjoint`` (``adjoint_rtol``, ...).
        max_steps: step limit of the adaptive methods (torchdiffeq's own default is
            unlimited); a solve that hits it raises :class:`~contdeq.solvers.ConvergenceError`
            instead of running on. ``max_num_steps`` is its deprecated spelling.
        compile: evaluate ``f(z, x) - z`` compiled by ``torch.compile`` (each call after the
            first; its backward too; the adjoint pass of an ``f`` with
            :func:`~contdeq.spectral_norm_cap` evaluates it eagerly, with the forward's
            power-iteration vectors). torchdiffeq's stepping loop stays eager. The first
            solve of a shape compiles (seconds); later ones reuse the graph.

    Attributes:
        stats: :class:`~contdeq.implicit.DEQStats`: ``forward.nfe`` counts every ``f`` call
            (exactly, as the equilibrium layers do; ``steps`` is inferred from it for the
            Runge-Kutta pairs, residuals are NaN); ``backward`` counts the adjoint pass's
            ``f`` calls (``adjoint=True`` only). Of the calling thread's last call.

    Shapes: ``x`` ``(B, ...)`` -> ``(B, *state_shape)``.
    """

    def __init__(
        self,
        f: nn.Module,
        t_end: float = 1.0,
        *,
        method: str = "dopri5",
        adjoint: bool = False,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        residual: bool = True,
        state_shape: int | Sequence[int] | None = None,
        options: Mapping[str, Any] | None = None,
        adjoint_options: Mapping[str, Any] | None = None,
        max_steps: int = 10_000,
        compile: bool = False,
        structure: Structure | None = None,
        max_num_steps: int | None = None,
    ) -> None:
        super().__init__()
        if structure is None:
            structure = Single(state_shape)
        elif state_shape is not None:
            raise TypeError("pass the state's shape once: state_shape=... or structure=..., "
                            "not both")
        check_module(f, "f", structure.contract)
        max_steps = renamed("NeuralODE", "max_num_steps", max_num_steps, "max_steps", max_steps,
                            10_000)
        check_number(t_end, "t_end", 0, strict=True, finite=True)
        if method not in SOLVERS:
            raise ValueError(f"method must be one of {tuple(SOLVERS)}, got {method!r}")
        check_number(max_steps, "max_num_steps" if max_num_steps is not None else "max_steps",
                     1, integer=True)
        self._adaptive = issubclass(SOLVERS[method], RKAdaptiveStepsizeODESolver)
        self.max_steps = max_steps
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
        self.compile = compile
        check_number(rtol, "rtol", 0, strict=True)
        check_number(atol, "atol", 0, strict=True)
        self.structure = structure
        self.f = structure.cell(f)
        self.residual = bool(residual)
        self.t_end = float(t_end)
        self.method = method
        self.adjoint = bool(adjoint)
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.options = dict(options or {})
        self.adjoint_options = dict(adjoint_options or {})
        warn_unstable_normalization(self.f, "NeuralODE")

    @property
    def state_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of the flat state (``None``: ``x``'s)."""
        return self.structure.state_shape

    @property
    def max_num_steps(self) -> int:
        """Deprecated spelling of :attr:`max_steps`."""
        return self.max_steps

    # One graph break under a whole-model torch.compile, as for the DEQ layers.
    @torch.compiler.disable
    def forward(self, x: Tensor, z0: Any = None) -> Any:
        """``x`` ``(B, ...)`` -> ``z(t_end)`` ``(B, *state_shape)`` (with ``Scales``: a tuple
        of per-scale tensors, and ``z0`` a tuple)."""
        x = check_layer_input(x, type(self).__name__)
        z0 = zeros_or_state(x, self.structure.pack(z0), self.state_shape)
        if self.training:
            update_normalization(self.f)
        dyn = _Dynamics(self.f, self.residual, x, self.compile)
        t = torch.tensor([0.0, self.t_end], dtype=x.dtype, device=x.device)
        options = dict(self.options)
        grad = torch.is_grad_enabled()
        use_adjoint = self.adjoint and grad
        start = time.perf_counter()
        with fixed_normalization(self.f):
            dyn.vectors = fixed_vectors()
            if self.method in _FIRST_STEP_METHODS and "first_step" not in options:
                with torch.set_grad_enabled(grad and not use_adjoint):
                    d0 = dyn.rhs(z0)
                flat_d, flat_z = d0.reshape(d0.shape[0], -1), z0.reshape(z0.shape[0], -1)
                order = TABLEAUX[self.method].order
                options["first_step"] = initial_step(
                    flat_d.detach(), flat_z, self.atol, self.rtol, order, self.t_end)
                dyn._first = (z0, d0)
            if self._adaptive:
                options.setdefault("max_num_steps", self.max_steps)
            try:
                out = self._odeint(dyn, z0, t, options, x, use_adjoint)
            except AssertionError as exc:  # torchdiffeq's step limit or step-size underflow
                last = dyn.last_output
                if last is not None and not bool(torch.isfinite(last).all()):
                    raise NonFiniteError(
                        f"NeuralODE: f returned NaN or Inf at f call {dyn.calls} (torchdiffeq "
                        f"then reported: {exc})", dyn.calls) from exc
                nan = x.new_full((x.shape[0],), math.nan)
                stats = SolverStats(
                    method=self.method, nfe=dyn.calls, steps=0, residual=nan,
                    tolerance=nan.clone(), converged=torch.zeros_like(nan, dtype=torch.bool),
                    wall_time=time.perf_counter() - start, stop_reason="max_steps",
                )
                raise ConvergenceError(
                    f"NeuralODE did not reach t_end={self.t_end:g} ({exc}; {dyn.calls} f "
                    "calls): raise max_steps, loosen rtol/atol, or keep f "
                    "better conditioned", stats) from exc
        dyn._first = None
        z = out[-1]
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(
                f"NeuralODE: the state at t_end={self.t_end:g} contains NaN or Inf after "
                f"{dyn.calls} f calls (unstable step size or diverging dynamics)", dyn.calls)
        nfe = dyn.calls
        b = x.shape[0]
        nan = x.new_full((b,), math.nan)
        per_step = len(TABLEAUX[self.method].alpha) if self.method in TABLEAUX else 1
        record = DEQStats(SolverStats(
            method=self.method, nfe=nfe, steps=max(nfe - 1, 0) // per_step, residual=nan,
            tolerance=nan.clone(), converged=torch.ones(b, dtype=torch.bool, device=x.device),
            wall_time=time.perf_counter() - start, stop_reason="t_end",
            t_final=x.new_full((b,), self.t_end),
        ))
        self.stats = record
        if use_adjoint and z.requires_grad:
            dyn.record = record
            z = _BackwardStart.apply(dyn, z)
        return self.structure.unpack(z)

    def _odeint(self, dyn: _Dynamics, z0: Tensor, t: Tensor, options: dict[str, Any], x: Tensor,
                use_adjoint: bool) -> Tensor:
        """torchdiffeq's ``odeint`` (or ``odeint_adjoint``) on the layer's settings."""
        if use_adjoint:
            params = [p for p in self.f.parameters() if p.requires_grad]
            if x.requires_grad:
                params.append(x)
            return odeint_adjoint(dyn, z0, t, rtol=self.rtol, atol=self.atol,
                                  method=self.method, options=options,
                                  adjoint_params=tuple(params), **self.adjoint_options)
        return odeint(dyn, z0, t, rtol=self.rtol, atol=self.atol, method=self.method,
                      options=options)

    def extra_repr(self) -> str:
        kind = "f(z, x) - z" if self.residual else "f(z, x)"
        return (f"dz/dt = {kind}, t_end={self.t_end:g}, method={self.method!r}, "
                f"adjoint={self.adjoint}, rtol={self.rtol:g}, atol={self.atol:g}")
