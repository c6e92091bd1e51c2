"""Implicit pseudo-transient continuation, ΨTC (Kelley & Keyes 1998, "Convergence analysis of
pseudo-transient continuation", SIAM J. Numer. Anal. 35): backward-Euler steps in pseudo-time,
each a matrix-free Newton-Krylov solve, for stiff steady states.

Each step solves ``(I / h_b - J) delta = F(z)`` per sample (``J = dF/dz``; the flow is
``dz/dt = F(z)``) by GMRES with Jacobian-vector products and sets ``z <- z + delta``. A small
step ``h`` is a damped, stable move along the flow (no stability limit, unlike forward Euler);
as the residual falls the step grows by switched evolution relaxation (SER) and the iteration
becomes Newton's method, converging quadratically.

As in Kelley & Keyes, **every finite step is accepted**, also one that raises the residual (a
non-normal transient, a valley of ``||F||``): the residual need not fall monotonically along
the flow. Only a non-finite trial (NaN/Inf state or residual) or a blow-up of the residual by
more than :attr:`PTCOptions.blowup` is rejected and retried with a smaller step. SER sets the
next step to ``h * ||F_old|| / ||F_new||``, bounded: at least ``min_growth`` times ``h`` after a
step that lowered the residual, at most ``max_growth`` times, and at least ``rise_shrink``
times ``h`` after a rise. A sample whose smallest residual has not fallen by
``stall_decrease`` (relative) for ``stall_window`` steps has stalled: it stops, unconverged,
at its best iterate (``StopReason.STALLED`` when every unconverged sample did);
the caller's ``on_nonconvergence`` decides what happens.
:class:`~contdeq.solvers.errors.NonFiniteError` is raised only when the solve stopped right
after trials where ``F`` (or its Jacobian-vector products) returned NaN or Inf at finite states:
for finite products GMRES always returns a finite correction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .callback import StepHook
from .counting import CountedODEFunc
from .gmres import gmres
from .linearize import JVP_MODES, Linearization, forcing_term
from .loop import StepControl, Stepper, check_steps, run_loop
from .progress import Progress
from .registry import STEADY_STATE_METHODS
from .stats import LoopResult, StopReason
from .termination import sample_rms
from .validation import check_positive_float, check_positive_int, raise_nonfinite

__all__ = ["ImplicitPTC", "ImplicitPTCSteps", "PTCOptions", "Preconditioner"]

#: ``preconditioner(v, z, h) -> approx. (I / h - J(z))^{-1} v`` on flat ``(B, D)`` tensors
#: (``h``: ``(B,)``), linear in ``v`` per sample, a zero row giving a zero row.
Preconditioner = Callable[[Tensor, Tensor, Tensor], Tensor]

#: The first pseudo-time step when neither ``first_step`` nor the options give one: the time
#: scale of a DEQ flow ``dz/dt = f(z) - z``; a stiff problem's fast modes are damped at any step.
DEFAULT_FIRST_STEP = 1.0


@dataclass(frozen=True)
class PTCOptions:
    """Tunables of ``"implicit_ptc"`` (ΨTC), checked at construction.

    Attributes:
        first_step: the first pseudo-time step (``steady_state``'s ``first_step``, when given,
            takes precedence).
        min_growth: least growth of ``h`` after a step that lowered the residual (SER's ratio
            is used when larger; 1.0 is Kelley & Keyes' plain SER). Measured on the 23
            problems of ``benchmarks/nonlinear.py`` (``dz/dt = -F``): 20 solved with 1.0 and
            with 1.2, 19 with 1.5 (the former fixed value); 1.2 is the default because with
            1.0 a slowly falling residual keeps a small step small: the reaction-diffusion
            flow of ``tests/stiff_problems.py`` at rate 10 from ``first_step=1e-3``
            stalled from both starts tried with 1.0 (after 77 and 277 steps) and converged with
            1.2 (47 and 55 steps). The stiff table is unchanged.
        max_growth: most growth of ``h`` per step (SER grows it by the residual's shrink ratio,
            which is large once Newton converges quadratically).
        rise_shrink: after an accepted step that raised the residual, ``h`` is multiplied by
            SER's ratio ``||F_old|| / ||F_new||`` but by no less than this.
        rejection_shrink: ``h`` is multiplied by this after a rejected trial.
        blowup: a trial whose residual exceeds ``blowup`` times the current one is rejected
            (every other finite trial is accepted).
        stall_window: steps without a new smallest residual (by ``stall_decrease``) after which
            a sample has stalled.
        stall_decrease: relative decrease of the smallest residual that counts as progress.
        restart: GMRES restart length. Restarting every 30 steps stalled on the Laplacians of
            the stiff benchmark (4-5x the products of restarting every 60).
        max_linear_iterations: GMRES iteration cap per step.
        jvp: Jacobian-vector products by ``"reverse"`` (default) or ``"forward"`` mode
            (:mod:`contdeq.solvers.linearize`).
        preconditioner: optional right preconditioner (:data:`Preconditioner`); GMRES then
            solves ``(I / h - J) P u = F``, ``delta = P u``, and its residual is the true one.
    """

    first_step: float = DEFAULT_FIRST_STEP
    min_growth: float = 1.2
    max_growth: float = 10.0
    rise_shrink: float = 0.1
    rejection_shrink: float = 0.25
    blowup: float = 1e4
    stall_window: int = 50
    stall_decrease: float = 1e-3
    restart: int = 60
    max_linear_iterations: int = 200
    jvp: str = "reverse"
    preconditioner: Preconditioner | None = None

    def __post_init__(self) -> None:
        check_positive_float(self.first_step, "first_step")
        check_positive_float(self.min_growth, "min_growth")
        check_positive_float(self.max_growth, "max_growth")
        if not 1.0 <= self.min_growth <= self.max_growth:
            raise ValueError(f"PTCOptions needs 1 <= min_growth <= max_growth, got min_growth="
                             f"{self.min_growth}, max_growth={self.max_growth}")
        if not 0.0 < self.rise_shrink <= 1.0:
            raise ValueError(f"rise_shrink must be in (0, 1], got {self.rise_shrink}")
        if not 0.0 < self.rejection_shrink < 1.0:
            raise ValueError(f"rejection_shrink must be in (0, 1), got {self.rejection_shrink}")
        if not self.blowup > 1.0:
            raise ValueError(f"blowup must be > 1 (a trial whose residual grows more than this "
                             f"factor is rejected), got {self.blowup}")
        check_positive_int(self.stall_window, "stall_window")
        if not 0.0 <= self.stall_decrease < 1.0:
            raise ValueError(f"stall_decrease must be in [0, 1), got {self.stall_decrease}")
        check_positive_int(self.restart, "restart")
        check_positive_int(self.max_linear_iterations, "max_linear_iterations")
        if self.jvp not in JVP_MODES:
            raise ValueError(f"jvp must be one of {JVP_MODES}, got {self.jvp!r}")
        if self.preconditioner is not None and not callable(self.preconditioner):
            raise TypeError("preconditioner must be callable as preconditioner(v, z, h) -> "
                            f"(B, D) tensor, got {type(self.preconditioner).__name__}")


class ImplicitPTCSteps(Stepper):
    """ΨTC stepping one solve on flat ``(B, D)`` states, on the one loop (see the module
    docstring).

    Each sample has its own step ``h`` (at most ``max_step``); the GMRES tolerance of each step
    is the Eisenstat-Walker forcing term. Unconverged samples return their best iterate
    (smallest residual). :meth:`result` counts accepted and rejected steps over (sample, step)
    pairs and reports the Jacobian-vector products and GMRES iterations.

    Args:
        counted: the counted flow ``F`` (``func(t, z)``); ``d`` is ``F(z)`` at the initial
            ``z`` (``(B, D)``).
        progress: the solve's bookkeeping.
        first_step: first step (``None``: ``options.first_step``); ``max_step``, ``t_max``:
            limits.
        options: ΨTC's tunables (default ``PTCOptions()``).
    """

    def __init__(self, counted: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
                 first_step: float | None, max_step: float, t_max: float, *,
                 options: PTCOptions | None = None) -> None:
        assert progress.t is not None
        self.opts = opts = PTCOptions() if options is None else options
        t0 = torch.zeros((), dtype=z.dtype, device=z.device)
        shape, flat = counted.shape, counted.flat_shape

        def raw(v: Tensor) -> Tensor:
            return counted.func(t0, v.reshape(shape)).reshape(flat)

        self.name = counted.name
        self.lin = Linearization(lambda v: counted(0.0, v), raw, opts.jvp)
        self.d = d
        self.max_step, self.t_max = max_step, t_max
        first = opts.first_step if first_step is None else first_step
        self.h = torch.full_like(progress.res, min(first, max_step))
        self.accepted = torch.zeros_like(progress.res, dtype=torch.long)
        self.attempted = torch.zeros_like(self.accepted)
        self.linear_iterations = 0
        self.res_prev: Tensor | None = None
        self.eta: Tensor | None = None
        progress.keep_best(z)
        self.stall = Stall(progress.res, opts.stall_window, opts.stall_decrease)
        # The last trial was NaN/Inf: F's value at a finite trial state, or the trial state
        # itself (GMRES is finite for finite products, so a NaN/Inf Jacobian product of F at z).
        self.bad_value = torch.zeros_like(progress.active)
        # Residuals of the last evaluation, which saw every sample (frozen ones where they froze).
        self.last_res: Tensor | None = None
        self.active = progress.active

    def stop_reason(self, progress: Progress) -> StopReason | str | None:
        reason = progress.stop_reason(self.t_max)
        if reason is not None:
            return reason
        assert progress.t is not None
        active = progress.active & ~self.stall.stalled
        if self.t_max < math.inf:
            active &= progress.t < self.t_max
        if not bool(active.any()):
            return StopReason.STALLED if bool(self.stall.stalled.any()) else StopReason.T_MAX
        self.active = active
        return None

    def step(self, z: Tensor, progress: Progress) -> tuple[Tensor, bool]:
        assert progress.t is not None
        opts, lin, active, h, res = self.opts, self.lin, self.active, self.h, progress.res
        dt = (torch.minimum(h.to(progress.t.dtype), self.t_max - progress.t)
              if self.t_max < math.inf else h)
        delta, iterations = _step(lin, z, self.d * active.unsqueeze(1), dt, res, self.res_prev,
                                  self.eta, progress.tol, opts)
        self.eta = delta[1]
        self.linear_iterations += iterations
        z_new = z + delta[0]
        finite_z = torch.isfinite(z_new).all(dim=1)
        trial = z_new if bool(finite_z.all()) else torch.where(finite_z.unsqueeze(1), z_new, z)
        d_new = lin.evaluate(trial)
        res_new = self.last_res = sample_rms(d_new)
        tol_new = progress.condition.tolerance(trial)
        finite = torch.isfinite(res_new + tol_new) & finite_z
        self.bad_value = torch.where(active, ~finite, self.bad_value)
        ok = finite & active & (res_new <= opts.blowup * res)
        self.accepted += ok
        self.attempted += active
        self.res_prev = torch.where(ok, res, self.res_prev if self.res_prev is not None else res)
        self.h = torch.where(active, _next_step(h, ok, res, res_new, opts), h).clamp_(
            max=self.max_step)
        if bool(torch.equal(ok, active)):  # inactive samples had a zero correction
            z, self.d = trial, d_new  # the same tensor: reverse-mode products reuse its graph
        else:
            keep = ok.unsqueeze(1)
            z, self.d = torch.where(keep, trial, z), torch.where(keep, d_new, self.d)
        progress.accept(ok, res_new, tol_new, dt * ok, z)
        self.stall.update(progress.res, active)
        return z, True

    def restart(self, z: Tensor, progress: Progress) -> None:
        self.d = self.lin.evaluate(z)
        self.last_res = sample_rms(self.d)
        progress.restart(z, self.last_res)
        self.stall = Stall(progress.res, self.opts.stall_window, self.opts.stall_decrease)
        self.res_prev = self.eta = None

    def retest(self, z: Tensor, progress: Progress) -> bool:
        return self.last_res is not None and progress.reopen_stale(z, self.last_res)

    def result(self, z: Tensor, reason: StopReason | str, progress: Progress) -> LoopResult:
        final = progress.final_state(z)
        unconverged = progress.res > progress.tol
        if reason != StopReason.CONVERGED and bool((self.bad_value & unconverged).any()):
            raise_nonfinite(self.name, progress.steps,
                            f"the solve stopped ({reason}) right after trial steps where the "
                            "function or its Jacobian-vector products returned NaN/Inf, before "
                            "a finite step was found")
        n_accepted = self.accepted.sum().tolist()
        return LoopResult(final, reason, n_accepted, self.attempted.sum().tolist() - n_accepted,
                          self.lin.jvps, self.linear_iterations)


def _step(
    lin: Linearization, z: Tensor, rhs: Tensor, dt: Tensor, res: Tensor, res_prev: Tensor | None,
    eta: Tensor | None, tol: Tensor, opts: PTCOptions,
) -> tuple[tuple[Tensor, Tensor], int]:
    """``((delta, eta), gmres_steps)``: the backward-Euler correction ``(B, D)`` solving
    ``(I / dt - J) delta = rhs`` to the forcing term ``eta`` (``(B,)``)."""
    inv_dt = (1.0 / dt).to(z.dtype).unsqueeze(1)
    product = lin.product_at(z)
    eta = forcing_term(res, res_prev, eta, tol)
    precondition = opts.preconditioner

    def matvec(v: Tensor) -> Tensor:
        return v * inv_dt - product(v)

    if precondition is None:
        solve = gmres(matvec, rhs, rtol=eta, restart=opts.restart,
                      max_iterations=opts.max_linear_iterations)
        return (solve.solution, eta), solve.steps
    step = dt.to(z.dtype)
    solve = gmres(lambda u: matvec(precondition(u, z, step)), rhs, rtol=eta,
                  restart=opts.restart, max_iterations=opts.max_linear_iterations)
    return (precondition(solve.solution, z, step), eta), solve.steps


def _next_step(h: Tensor, ok: Tensor, res: Tensor, res_new: Tensor, opts: PTCOptions) -> Tensor:
    """``(B,)`` next steps: switched evolution relaxation with the options' bounds after an
    accepted trial, ``rejection_shrink`` times ``h`` after a rejected one."""
    ratio = res / res_new.clamp_min(torch.finfo(res.dtype).tiny)
    ratio = torch.where(torch.isfinite(ratio), ratio, opts.max_growth)
    fell = res_new < res
    growth = torch.where(fell, ratio.clamp(opts.min_growth, opts.max_growth),
                         ratio.clamp(min=opts.rise_shrink, max=1.0))
    return h * torch.where(ok, growth, opts.rejection_shrink)


class Stall:
    """The stall test of ΨTC and of :func:`~contdeq.solvers.root`: per sample, the smallest
    residual so far and the steps since it last fell by the relative ``decrease``; ``stalled``
    after ``window`` such steps.

    Args:
        res: ``(B,)`` residual norms at the start.
        window: steps without progress after which a sample has stalled.
        decrease: relative decrease of the smallest residual that counts as progress.
    """

    def __init__(self, res: Tensor, window: int, decrease: float) -> None:
        self.best = res.clone()
        self.since = torch.zeros_like(res, dtype=torch.long)
        self.window = window
        self.factor = 1.0 - decrease
        self.stalled = torch.zeros_like(res, dtype=torch.bool)

    def update(self, res: Tensor, stepped: Tensor) -> None:
        """Count a step of the samples in ``stepped`` (``(B,)`` bool) whose residual is
        ``res`` (``(B,)``) now."""
        improved = res < self.factor * self.best
        self.best = torch.where(improved & stepped, res, self.best)
        self.since = torch.where(improved, 0, self.since + stepped)
        self.stalled = self.since >= self.window


class ImplicitPTC:
    """Implicit (backward-Euler, Newton-Krylov) pseudo-transient continuation, Kelley & Keyes'
    ΨTC: :class:`ImplicitPTCSteps` on the one loop.

    Args:
        max_step: largest per-sample step when ``steady_state`` is given none (default ``inf``).
        first_step: initial step when ``steady_state`` is given none (default
            ``options.first_step``).
        options: ΨTC's tunables (step growth, stall test, GMRES restart and cap, JVP mode,
            preconditioner): a :class:`~contdeq.solvers.implicit_ptc.PTCOptions`.
    """

    name = "implicit_ptc"
    local_error_control = False
    compilable = False

    def __init__(self, *, max_step: float = math.inf, first_step: float | None = None,
                 options: PTCOptions | None = None) -> None:
        self.first_step, self.default_max_step = check_steps(first_step, max_step)
        if options is not None and not isinstance(options, PTCOptions):
            raise TypeError(f"options must be a PTCOptions, got {type(options).__name__}; "
                            "build one with contdeq.solvers.PTCOptions(...)")
        self.options = options

    def __repr__(self) -> str:
        return (f"ImplicitPTC(max_step={self.default_max_step!r}, "
                f"first_step={self.first_step!r}, options={self.options!r})")

    def run(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
            control: StepControl, hook: StepHook | None) -> LoopResult:
        """Iterate from ``z`` (``(B, D)``, derivative ``d``) to steady state; the result
        carries the Jacobian-vector products and GMRES iterations."""
        steps = ImplicitPTCSteps(func, z, d, progress, control.first_step, control.max_step,
                                 control.t_max, options=self.options)
        return run_loop(steps, z, progress, hook)


STEADY_STATE_METHODS.register("implicit_ptc", ImplicitPTC())
