"""Implicit pseudo-transient continuation (Kelley & Keyes 1998): backward Euler steps in
pseudo-time, each a matrix-free Newton-Krylov solve, for stiff steady states.

Each step solves ``(I / h_b - J) delta = F(z)`` per sample (``J = dF/dz``) by GMRES with
Jacobian-vector products and sets ``z <- z + delta``. A small step ``h`` is a damped, stable
move along the flow (no stability limit, unlike forward Euler); as the residual falls the step
grows by switched evolution relaxation and the iteration becomes Newton's method, converging
quadratically.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .callback import StepHook
from .counting import CountedODEFunc
from .gmres import gmres
from .linearize import Linearization, forcing_term
from .progress import Progress
from .registry import STEADY_STATE_METHODS
from .stats import LoopResult
from .termination import sample_rms
from .validation import raise_nonfinite

#: The first pseudo-time step when ``first_step`` is not given: the time scale of a DEQ flow
#: ``dz/dt = f(z) - z``; a stiff problem's fast modes are damped at any step.
DEFAULT_FIRST_STEP = 1.0
#: Largest growth of a sample's step after an accepted step (switched evolution relaxation
#: grows it by the residual's shrink ratio, which is large once Newton converges quadratically).
_MAX_GROWTH = 10.0
#: Smallest growth after an accepted step: a step that barely shrinks the residual (slow modes
#: much slower than ``h``) still grows, so the solve cannot stall at a tiny step.
_MIN_GROWTH = 1.5
#: A rejected step (residual not smaller, or not finite) is retried with the step times this.
_SHRINK = 0.25
#: GMRES restart length and iteration cap of each linear solve. Restarting every 30 steps
#: stalled on the Laplacians of the stiff benchmark (4-5x the products of restarting every 60).
GMRES_RESTART = 60
GMRES_MAX_ITERATIONS = 200


@STEADY_STATE_METHODS.register("implicit_ptc")
def run_implicit_ptc(
    counted: CountedODEFunc,
    z: Tensor,
    d: Tensor,
    progress: Progress,
    first_step: float | None,
    max_step: float,
    t_max: float,
    hook: StepHook | None = None,
) -> tuple[LoopResult, int, int]:
    """Backward-Euler pseudo-transient continuation on flat ``(B, D)`` states.

    ``d`` is ``F(z)`` at the initial ``z``. A step that lowers a sample's residual is
    accepted and its ``h`` grows by the shrink ratio (in ``[1.5, 10]``, at most ``max_step``);
    one that does not, or that is not finite, is rejected and ``h`` shrinks 4x. The GMRES
    tolerance of each step is the Eisenstat-Walker forcing term.

    Returns ``(LoopResult(z, stop_reason, accepted, rejected), jvps, linear_iterations)``;
    accepted and rejected are counted over (sample, step) pairs.
    """
    t0 = torch.zeros((), dtype=z.dtype, device=z.device)
    shape, flat = counted.shape, counted.flat_shape

    def raw(v: Tensor) -> Tensor:
        return counted.func(t0, v.reshape(shape)).reshape(flat)

    lin = Linearization(lambda v: counted(0.0, v), raw)
    first = DEFAULT_FIRST_STEP if first_step is None else first_step
    h = torch.full_like(progress.res, min(first, max_step))
    accepted = torch.zeros_like(progress.res, dtype=torch.long)
    attempted = torch.zeros_like(accepted)
    linear_iterations = 0
    res_prev: Tensor | None = None
    eta: Tensor | None = None
    assert progress.t is not None
    nonfinite_last = False  # whether the last trial step was NaN/Inf for an active sample
    while (reason := progress.stop_reason(t_max)) is None:
        active, res = progress.active, progress.res
        dt = torch.minimum(h.to(progress.t.dtype), t_max - progress.t) if t_max < math.inf else h
        inv_dt = (1.0 / dt).to(z.dtype).unsqueeze(1)
        product = lin.product_at(z)
        eta = forcing_term(res, res_prev, eta, progress.tol)
        solve = gmres(lambda v, product=product, inv_dt=inv_dt: v * inv_dt - product(v),
                      d * active.unsqueeze(1), rtol=eta, restart=GMRES_RESTART,
                      max_iterations=GMRES_MAX_ITERATIONS)
        linear_iterations += solve.steps
        z_new = z + solve.solution
        d_new = lin.evaluate(z_new)
        progress.steps += 1
        res_new = sample_rms(d_new)
        tol_new = progress.condition.tolerance(z_new)
        finite = torch.isfinite(res_new + tol_new)
        ok = (res_new < res).logical_and_(finite).logical_and_(active)
        nonfinite_last = not bool(finite[active].all())
        if nonfinite_last and bool((h[active & ~finite] < 1e-8 * first).any()):
            raise_nonfinite(counted.name, progress.steps)
        accepted += ok
        attempted += active
        res_prev = torch.where(ok, res, res_prev if res_prev is not None else res)
        factor = torch.where(ok, (res / res_new).clamp(_MIN_GROWTH, _MAX_GROWTH), _SHRINK)
        h = torch.where(active, factor * h, h).clamp_(max=max_step)
        if bool(torch.equal(ok, active)):
            z, d = z_new, d_new  # the same tensor: reverse-mode products reuse its graph
        else:
            keep = ok.unsqueeze(1)
            z, d = torch.where(keep, z_new, z), torch.where(keep, d_new, d)
        progress.accept(ok, res_new, tol_new, dt * ok)
        if hook is not None and (restart := hook(progress, z)) is not None:
            z, d = restart, lin.evaluate(restart)
            progress.restart(z, sample_rms(d))
            res_prev = eta = None
    if nonfinite_last and reason != "converged":  # NaN never passes as mere non-convergence
        raise_nonfinite(counted.name, progress.steps,
                        f"the solve stopped ({reason}) right after a trial step rejected for "
                        "NaN/Inf, before a finite step was found")
    n_accepted = int(accepted.sum())
    return (LoopResult(z, reason, n_accepted, int(attempted.sum()) - n_accepted), lin.jvps,
            linear_iterations)
