"""Newton-Krylov iteration on the residual ``r(z) = g(z) - z``, globalized per sample by a
backtracking (Armijo) line search or by a dogleg trust region; inner solves by GMRES with
Jacobian-vector products of ``g``."""

from __future__ import annotations

import torch
from torch import Tensor

from .counting import CountedMap
from .gmres import gmres
from .linearize import Linearization, forcing_term
from .registry import FIXED_POINT_METHODS
from .termination import sample_rms
from .validation import check_choice, check_positive_float, check_positive_int

#: Armijo constant: a step ``lambda delta`` is accepted when the residual's norm falls to at most
#: ``(1 - _ARMIJO * lambda)`` times its value (Kelley 2003, "Solving nonlinear equations with
#: Newton's method", section 1.6).
_ARMIJO = 1e-4
#: Values of the ``globalization`` option.
GLOBALIZATIONS = ("line_search", "trust_region")
#: Trust-region constants (Nocedal & Wright, "Numerical Optimization", algorithm 4.1): a trial
#: is accepted when the actual decrease of ``||r||^2`` is at least ``_TR_ACCEPT`` times the
#: model's; the radius shrinks to a quarter of the step below ``_TR_SHRINK_BELOW`` and doubles
#: above ``_TR_GROW_ABOVE`` when the step reached the boundary.
_TR_ACCEPT = 1e-4
_TR_SHRINK_BELOW = 0.25
_TR_GROW_ABOVE = 0.75


@FIXED_POINT_METHODS.register("newton")
class Newton:
    """Inexact Newton's method on flat ``(B, D)`` states, globalized per sample.

    Each iteration solves ``(I - J_g) delta = r`` (``J_g = dg/dz`` at ``z``, ``r = g(z) - z``)
    by GMRES to the Eisenstat-Walker relative tolerance (or the fixed ``forcing``), then

    * ``globalization="line_search"`` (default): tries ``z + lambda delta`` with
      ``lambda = 1, 1/2, 1/4, ...`` until the sample's residual falls by the Armijo factor (at
      most ``line_search_steps`` halvings; the last trial is taken; ``0``: full Newton steps);
    * ``globalization="trust_region"``: Powell's dogleg between the Cauchy point of
      ``||r||^2`` (its gradient ``J_r^T r`` by one vector-Jacobian product) and the Newton step,
      cut at a per-sample radius; a trial whose actual decrease of ``||r||^2`` is below
      ``1e-4`` of the model's is rejected and retried with a smaller radius (at most
      ``line_search_steps`` retries, each one evaluation; the point stays put if all fail).
      The radius starts at ``trust_radius`` (default: the first Newton step's length).

    Every trial evaluates ``g`` on the whole batch through the counted map. The accepted
    point's ``g`` is kept and handed back by :meth:`map` when the loop asks for it, so an
    iteration whose first trial is accepted costs one evaluation of ``g`` plus the Jacobian
    products (counted in ``jvps``).

    Samples the loop did not move to the last proposal are frozen (converged) and get a zero
    step, so the loop's state equals the proposal and the kept ``g`` applies.

    Args:
        g: the counted map (``fixed_point`` passes it; construction without it only validates
            the options).
        jvp: Jacobian products by ``"reverse"`` (double VJP, default) or ``"forward"`` mode
            (the trust region needs ``"reverse"`` for its gradient).
        restart: GMRES restart length.
        max_linear_iterations: GMRES iteration cap per Newton step.
        line_search_steps: most halvings (line search) or radius reductions (trust region)
            per iteration; ``0`` with the line search takes full Newton steps.
        forcing: fixed relative tolerance of every linear solve (``None``, default: the
            Eisenstat-Walker forcing term, which saves products on large systems but makes
            steps inexact early; :func:`~contdeq.solvers.root` uses ``1e-6``).
        globalization: ``"line_search"`` (default) or ``"trust_region"``.
        trust_radius: initial trust-region radius (L2 norm of the step); default the first
            Newton step's length.
    """

    needs_map = True

    def __init__(
        self, like: Tensor, *, g: CountedMap | None = None, jvp: str = "reverse",
        restart: int = 60, max_linear_iterations: int = 200, line_search_steps: int = 10,
        forcing: float | None = None, globalization: str = "line_search",
        trust_radius: float | None = None,
    ) -> None:
        self.restart = check_positive_int(restart, "restart")
        self.max_linear_iterations = check_positive_int(max_linear_iterations,
                                                        "max_linear_iterations")
        if isinstance(line_search_steps, bool) or not isinstance(line_search_steps, int) or (
                line_search_steps < 0):
            raise ValueError(f"line_search_steps must be an int >= 0, got {line_search_steps!r}")
        self.line_search_steps = line_search_steps
        if forcing is not None and not (check_positive_float(forcing, "forcing") < 1.0):
            raise ValueError(f"forcing must be in (0, 1) or None, got {forcing}")
        self.forcing = forcing
        self.globalization = check_choice(globalization, "globalization", GLOBALIZATIONS)
        if trust_radius is not None:
            check_positive_float(trust_radius, "trust_radius")
        self.trust_radius = trust_radius
        if globalization == "trust_region" and jvp != "reverse":
            raise ValueError("globalization='trust_region' needs jvp='reverse' (its gradient is "
                             "a vector-Jacobian product)")
        self.g = g
        self.lin = _GradientLinearization(g if g is not None else _unset, self._raw, jvp)
        self.linear_iterations = 0
        self._proposal: Tensor | None = None
        self._kept: tuple[Tensor, Tensor] | None = None  # (z, g(z)) of the last proposal
        self._res_prev: Tensor | None = None
        self._eta: Tensor | None = None
        self._radius: Tensor | None = None

    @property
    def jvps(self) -> int:
        """Batched Jacobian-vector (and vector-Jacobian) products so far."""
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
        """Forget the kept ``g`` value and graph, the forcing-term history and the radius."""
        self.lin.forget()
        self._proposal = self._kept = self._res_prev = self._eta = self._radius = None

    def propose(self, z: Tensor, gz: Tensor, residual: Tensor) -> Tensor:
        """Next iterate from ``z``, ``g(z)`` and ``residual = g(z) - z`` (all ``(B, D)``)."""
        moving = (torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
                  if self._proposal is None else (z == self._proposal).all(dim=1))
        res = sample_rms(residual)
        self._eta = (forcing_term(res, self._res_prev, self._eta, torch.zeros_like(res))
                     if self.forcing is None else torch.full_like(res, self.forcing))
        product = self.lin.product_at(z)
        rhs = residual * moving.unsqueeze(1)
        solve = gmres(lambda v: v - product(v), rhs, rtol=self._eta,
                      restart=self.restart, max_iterations=self.max_linear_iterations)
        self.linear_iterations += solve.steps
        if self.globalization == "trust_region":
            z_new, g_new = self._dogleg(z, gz, rhs, solve.solution, product, moving)
        else:
            z_new, g_new = self._line_search(z, gz, res, solve.solution, moving)
        self._res_prev = res
        self._proposal = z_new
        self._kept = (z_new, g_new)
        return z_new

    def _line_search(self, z: Tensor, gz: Tensor, res: Tensor, delta: Tensor, moving: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """Armijo backtracking per sample; returns the accepted (or last) trial and its ``g``."""
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
        return z_new, g_new

    def _dogleg(self, z: Tensor, gz: Tensor, r: Tensor, newton: Tensor, product, moving: Tensor
                ) -> tuple[Tensor, Tensor]:
        """Powell's dogleg per sample on ``||r||^2`` (``r``: ``(B, D)`` the residual, zero for
        frozen samples; ``newton``: the Newton step); returns the accepted point (``z`` where
        every retry failed) and its ``g``."""
        # r(z) = g(z) - z, so J_r = J_g - I; its products cost one product of J_g each.
        grad = self.lin.vjp_at(z, r) - r  # J_r^T r: the gradient of ||r||^2 / 2
        j_grad = product(grad) - grad
        j_newton = product(newton) - newton
        norm = _norm
        grad_norm, newton_norm = norm(grad), norm(newton)
        tiny = torch.finfo(r.dtype).tiny
        cauchy_len = grad_norm.square() / norm(j_grad).square().clamp_min(tiny)  # alpha
        if self._radius is None:
            first = newton_norm if self.trust_radius is None else torch.full_like(
                newton_norm, self.trust_radius)
            self._radius = torch.where(first > 0, first, 1.0)
        radius = self._radius
        r2 = norm(r).square()
        accepted = ~moving
        z_new, g_new = z, gz
        for _ in range(self.line_search_steps + 1):
            step, j_step = _dogleg_step(radius, newton, j_newton, grad, j_grad, grad_norm,
                                        newton_norm, cauchy_len)
            trial = torch.where(accepted.unsqueeze(1), z_new, z + step)
            g_trial = self.lin.evaluate(trial)
            r_trial = g_trial - trial
            actual = r2 - norm(r_trial).square()
            predicted = r2 - norm(r + j_step).square()
            rho = actual / predicted.clamp_min(tiny)
            finite = torch.isfinite(r_trial).all(dim=1)
            ok = finite & (rho > _TR_ACCEPT) & (predicted > 0) & ~accepted
            step_norm = norm(step)
            shrink = ~finite | (rho < _TR_SHRINK_BELOW)
            grow = (rho > _TR_GROW_ABOVE) & (step_norm >= 0.99 * radius)
            new_radius = torch.where(shrink, 0.25 * step_norm.clamp_min(tiny),
                                     torch.where(grow, 2.0 * radius, radius))
            radius = torch.where(accepted, radius, new_radius)
            z_new = torch.where(ok.unsqueeze(1), trial, z_new)
            g_new = torch.where(ok.unsqueeze(1), g_trial, g_new)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
        self._radius = radius
        if not bool(torch.equal(z_new, z)):
            return z_new, g_new
        return z, gz


def _norm(v: Tensor) -> Tensor:
    """``(B,)`` L2 norms of the rows of ``v``."""
    return torch.linalg.vector_norm(v, dim=1)


def _dogleg_step(radius: Tensor, newton: Tensor, j_newton: Tensor, grad: Tensor, j_grad: Tensor,
                 grad_norm: Tensor, newton_norm: Tensor, cauchy_len: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """The dogleg step ``(B, D)`` inside ``radius`` (``(B,)``) and its image under ``J_r``:
    the Newton step when it fits, else the steepest-descent step cut at the radius when the
    Cauchy point lies outside, else the point where the segment from the Cauchy point to the
    Newton step leaves the region."""
    tiny = torch.finfo(radius.dtype).tiny
    cauchy, j_cauchy = -cauchy_len.unsqueeze(1) * grad, -cauchy_len.unsqueeze(1) * j_grad
    cauchy_norm = cauchy_len * grad_norm
    scale = (radius / grad_norm.clamp_min(tiny)).unsqueeze(1)
    # tau in [0, 1] with ||cauchy + tau (newton - cauchy)|| = radius
    diff = newton - cauchy
    a = _norm(diff).square()
    b = 2.0 * (cauchy * diff).sum(1)
    c = cauchy_norm.square() - radius.square()
    tau = ((-b + torch.sqrt((b * b - 4.0 * a * c).clamp_min(0.0))) / (2.0 * a).clamp_min(tiny)
           ).clamp(0.0, 1.0).unsqueeze(1)
    fits = (newton_norm <= radius).unsqueeze(1)
    outside = (cauchy_norm >= radius).unsqueeze(1)
    step = torch.where(fits, newton, torch.where(outside, -scale * grad, cauchy + tau * diff))
    j_step = torch.where(fits, j_newton, torch.where(
        outside, -scale * j_grad, j_cauchy + tau * (j_newton - j_cauchy)))
    return step, j_step


class _GradientLinearization(Linearization):
    """A :class:`Linearization` that also gives vector-Jacobian products ``J^T w`` at the
    point its last :meth:`evaluate` saw (reverse mode), from the same graph."""

    def vjp_at(self, z: Tensor, w: Tensor) -> Tensor:
        """``J(z)^T w`` (``(B, D)``), one backward pass (counted in ``jvps``)."""
        if self._graph is None or not (self._graph[0] is z or torch.equal(self._graph[0], z)):
            self.evaluate(z)
        self.jvps += 1
        primal = self._primal
        if primal is None:
            return torch.zeros_like(w)
        zr, out = primal
        (jt_w,) = torch.autograd.grad(out, zr, w, retain_graph=True)
        return jt_w


def _unset(z: Tensor) -> Tensor:
    raise RuntimeError("Newton was constructed without g; fixed_point passes it")
