"""Jacobian-vector products of the user's function for the Newton-Krylov solvers, counted, and
the inexact-Newton forcing term of their linear solves.

Two ways to get ``J v`` (``J = dF/dz``), chosen by ``jvp=``:

* ``"reverse"`` (default): the double-VJP trick. ``F(z)`` is evaluated once with a graph, then
  ``u -> J^T u`` is built once with ``create_graph=True``; each ``J v`` is the gradient of
  ``<J^T u, v>`` with respect to ``u``: one backward pass through that graph. Works for every
  function reverse-mode autograd handles (custom ``autograd.Function``\\ s without a ``jvp``,
  in-place operations that ``torch.func`` rejects), and the graph's ``F(z)`` is the value the
  solver needed anyway, so no extra evaluation.
* ``"forward"``: forward-mode AD (``torch.autograd.forward_ad`` dual numbers). One product
  recomputes ``F(z)`` with dual numbers; no graph is kept.

Why reverse by default: on a 2-core CPU with torch 2.13 (shared, noisy; median of 3 runs of 20
products each, ``float64``), one product took 1.3 ms reverse vs 21 ms forward on scipy's 75x75
tutorial PDE (one evaluation: 0.4 ms), 0.8 vs 10.7 ms on a 100-point heat equation, and 1.6 vs
7.3 ms on ``tanh(W z + x) - z`` at width 256, batch 32: forward-mode AD in this build runs many
operations through Python decompositions. ``torch.func.jvp`` was slower still (its first call
also took about 9 s of set-up).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

#: Values of the ``jvp`` option of ``"implicit_ptc"`` and ``"newton"``.
JVP_MODES = ("reverse", "forward")
#: Eisenstat-Walker (1996) choice 2: ``eta_k = gamma (||F_k|| / ||F_{k-1}||)^2``, at most
#: ``_FORCING_MAX`` (their ``eta_max``), safeguarded by ``gamma eta_{k-1}^2`` when that
#: exceeds ``0.1``; the first solve asks for ``_FORCING_FIRST``. On scipy's 75x75 tutorial PDE
#: (implicit_ptc) first/max = 0.5/0.9 took 370 products against 442 with 0.1/0.5 (about 20 %
#: less time); on the 1-D heat and Bratu problems about 25 % more (178 vs 141, 184 vs 147).
_FORCING_GAMMA = 0.9
_FORCING_MAX = 0.9
_FORCING_FIRST = 0.5


class Linearization:
    """Evaluates a flat map ``F: (B, D) -> (B, D)`` and products with its Jacobian.

    Args:
        counted: ``F`` through the solver's counting wrapper (every call is an ``nfe``).
        raw: the same ``F`` uncounted (forward-mode products run it with dual numbers).
        jvp: ``"reverse"`` (default) or ``"forward"`` (see the module docstring).
    """

    def __init__(self, counted: Callable[[Tensor], Tensor], raw: Callable[[Tensor], Tensor],
                 jvp: str = "reverse") -> None:
        if jvp not in JVP_MODES:
            raise ValueError(f"jvp must be one of {JVP_MODES}, got {jvp!r}")
        self.counted = counted
        self.raw = raw
        self.mode = jvp
        self.jvps = 0
        # Reverse mode: the last point evaluated with a graph, and u -> J^T u built on it;
        # ``_primal`` is ``(z, F(z))`` of that graph (None where F does not depend on z).
        self._graph: tuple[Tensor, Tensor, Tensor] | None = None
        self._primal: tuple[Tensor, Tensor] | None = None

    def evaluate(self, z: Tensor) -> Tensor:
        """``F(z)``, ``(B, D)``: one counted call (in reverse mode with a graph, which a
        following :meth:`product_at` on the same ``z`` reuses)."""
        if self.mode != "reverse":
            return self.counted(z)
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            out = self.counted(zr)
            if out.requires_grad:
                u = torch.zeros_like(out, requires_grad=True)
                (jt_u,) = torch.autograd.grad(out, zr, u, create_graph=True)
                self._graph = (z, u, jt_u)
                self._primal = (zr, out)
            else:  # F does not depend on z: J = 0
                self._graph = (z, out, out)
                self._primal = None
        return out.detach()

    def forget(self) -> None:
        """``F`` changed: drop the kept graph, so the next product evaluates ``F`` afresh."""
        self._graph = self._primal = None

    def product_at(self, z: Tensor) -> Callable[[Tensor], Tensor]:
        """``v -> J(z) v`` on ``(B, D)`` tensors (reverse mode: one counted call of ``F``
        unless ``z`` equals the point :meth:`evaluate` saw last)."""
        if self.mode == "reverse":
            if self._graph is None or not (self._graph[0] is z or torch.equal(self._graph[0], z)):
                self.evaluate(z)
            assert self._graph is not None
            _, u, jt_u = self._graph

            def reverse(v: Tensor) -> Tensor:
                self.jvps += 1
                if not jt_u.requires_grad:  # J^T u does not depend on u: J = 0
                    return torch.zeros_like(v)
                (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
                return jv

            return reverse
        z = z.detach()

        def forward(v: Tensor) -> Tensor:
            self.jvps += 1
            with forward_ad.dual_level():
                return forward_ad.unpack_dual(self.raw(forward_ad.make_dual(z, v))).tangent

        return forward


def forcing_term(res: Tensor, res_prev: Tensor | None, eta_prev: Tensor | None,
                 tol: Tensor) -> Tensor:
    """``(B,)`` relative tolerance of the next linear solve (Eisenstat-Walker choice 2).

    ``res``/``res_prev``: ``(B,)`` residual norms now and before the last step; ``tol``:
    ``(B,)`` the nonlinear tolerance. The term never asks for more than reaching ``tol / 2``
    from ``res`` needs (no over-solving on the last step), and never less than ``1e-8``.
    """
    if res_prev is None or eta_prev is None:
        eta = torch.full_like(res, _FORCING_FIRST)
    else:
        # A sample whose previous residual was exactly 0 (nothing left to solve) must not
        # give 0/0 = NaN.
        eta = _FORCING_GAMMA * (res / res_prev.clamp_min(torch.finfo(res.dtype).tiny)) ** 2
        safeguard = _FORCING_GAMMA * eta_prev**2
        eta = torch.where(safeguard > 0.1, torch.maximum(eta, safeguard), eta)
    floor = 0.5 * tol / res.clamp_min(torch.finfo(res.dtype).tiny)
    return torch.maximum(eta.clamp(max=_FORCING_MAX), floor).clamp(1e-8, _FORCING_MAX)
