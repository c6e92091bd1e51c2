"""Newton-Krylov iteration on the residual ``r(z) = g(z) - z``, with a per-sample backtracking
(Armijo) line search; inner solves by GMRES with Jacobian-vector products of ``g``."""

from __future__ import annotations

import torch
from torch import Tensor

from .counting import CountedMap
from .gmres import gmres
from .linearize import Linearization, forcing_term
from .registry import FIXED_POINT_METHODS
from .termination import sample_rms
from .validation import check_positive_int

#: Armijo constant: a step ``lambda delta`` is accepted when the residual's norm falls to at most
#: ``(1 - _ARMIJO * lambda)`` times its value (Kelley 2003, "Solving nonlinear equations with
#: Newton's method", section 1.6).
_ARMIJO = 1e-4


@FIXED_POINT_METHODS.register("newton")
class Newton:
    """Inexact Newton's method on flat ``(B, D)`` states, one line search per sample.

    Each iteration solves ``(I - J_g) delta = r`` (``J_g = dg/dz`` at ``z``, ``r = g(z) - z``)
    by GMRES to the Eisenstat-Walker relative tolerance, then tries ``z + lambda delta`` with
    ``lambda = 1, 1/2, 1/4, ...`` until the sample's residual falls by the Armijo factor (at
    most ``line_search_steps`` halvings; the last trial is taken). Every trial evaluates ``g``
    on the whole batch through the counted map. The accepted point's ``g`` is kept and handed
    back by :meth:`map` when the loop asks for it, so an iteration whose full step is accepted
    costs one evaluation of ``g`` plus the Jacobian products (counted in ``jvps``).

    Samples the loop did not move to the last proposal are frozen (converged) and get a zero
    step, so the loop's state equals the proposal and the kept ``g`` applies.

    Args:
        g: the counted map (``fixed_point`` passes it; construction without it only validates
            the options).
        jvp: Jacobian products by ``"reverse"`` (double VJP, default) or ``"forward"`` mode.
        restart: GMRES restart length.
        max_linear_iterations: GMRES iteration cap per Newton step.
        line_search_steps: most halvings of the step per iteration.
    """

    needs_map = True

    def __init__(
        self, like: Tensor, *, g: CountedMap | None = None, jvp: str = "reverse",
        restart: int = 60, max_linear_iterations: int = 200, line_search_steps: int = 10,
    ) -> None:
        self.restart = check_positive_int(restart, "restart")
        self.max_linear_iterations = check_positive_int(max_linear_iterations,
                                                        "max_linear_iterations")
        self.line_search_steps = check_positive_int(line_search_steps, "line_search_steps")
        self.g = g
        self.lin = Linearization(g if g is not None else _unset, self._raw, jvp)
        self.linear_iterations = 0
        self._proposal: Tensor | None = None
        self._kept: tuple[Tensor, Tensor] | None = None  # (z, g(z)) of the last proposal
        self._res_prev: Tensor | None = None
        self._eta: Tensor | None = None

    @property
    def jvps(self) -> int:
        """Batched Jacobian-vector products so far."""
        return self.lin.jvps

    def map(self, z: Tensor) -> Tensor:
        """``g(z)`` on ``(B, D)``: the kept value when ``z`` is the last proposal, else one
        counted call."""
        if self._kept is not None and torch.equal(z, self._kept[0]):
            return self._kept[1]
        assert self.g is not None
        return self.g(z)

    def _raw(self, z: Tensor) -> Tensor:
        assert self.g is not None
        return self.g.g(z.reshape(self.g.shape)).reshape(self.g.flat_shape)

    def reset(self) -> None:
        """Forget the kept ``g`` value and graph, and the forcing-term history."""
        self.lin.forget()
        self._proposal = self._kept = self._res_prev = self._eta = None

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        """Next iterate from ``z``, ``g(z)`` and ``residual = g(z) - z`` (all ``(B, D)``)."""
        moving = (torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
                  if self._proposal is None else (z == self._proposal).all(dim=1))
        res = sample_rms(residual)
        self._eta = forcing_term(res, self._res_prev, self._eta, torch.zeros_like(res))
        product = self.lin.product_at(z)
        solve = gmres(lambda v: v - product(v), residual * moving.unsqueeze(1), rtol=self._eta,
                      restart=self.restart, max_iterations=self.max_linear_iterations)
        self.linear_iterations += solve.steps
        delta = solve.solution
        step = torch.ones_like(res)
        accepted = ~moving
        z_new, g_new = z, gz
        for _ in range(self.line_search_steps + 1):
            trial = torch.where(accepted.unsqueeze(1), z_new, z + step.unsqueeze(1) * delta)
            g_trial = self.lin.evaluate(trial)
            res_trial = sample_rms(g_trial - trial)
            ok = (res_trial <= (1 - _ARMIJO * step) * res) & ~accepted
            z_new, g_new = trial, torch.where(accepted.unsqueeze(1), g_new, g_trial)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, 0.5 * step)
        self._res_prev = res
        self._proposal = z_new
        self._kept = (z_new, g_new)
        return z_new


def _unset(z: Tensor) -> Tensor:
    raise RuntimeError("Newton was constructed without g; fixed_point passes it")
