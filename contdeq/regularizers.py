"""Auxiliary training losses of equilibrium layers, and :func:`aux_loss` to collect them.

* Jacobian regularization (Bai, Koltun & Kolter 2021, "Stabilizing Equilibrium Models by
  Jacobian Regularization"): a Hutchinson estimate of ``||df/dz||_F^2 / D`` at ``z*``.
* Skip loss (Pal, Edelman & Rackauckas 2022): pulls the explicit initial guess of a Skip or
  Skip-Reg DEQ toward the (stop-gradient) equilibrium; see :func:`skip_loss`.

Layers keep the terms of their last training forward, per thread; ``contdeq.aux_loss(model)``
sums those of the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["AuxLossProvider", "aux_loss", "jacobian_frobenius", "skip_loss"]

SKIP_NORMS = ("l2", "l1")


@runtime_checkable
class AuxLossProvider(Protocol):
    """A module that returns the auxiliary loss of its last forward (``None`` when none)."""

    def last_aux_loss(self) -> Tensor | None: ...


def jacobian_frobenius(
    f: Callable[[Tensor, Tensor], Tensor],
    z: Tensor,
    x: Tensor,
    *,
    probes: int = 1,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hutchinson estimate of ``mean_b ||J_b||_F^2 / D`` with ``J_b = df(z_b, x_b)/dz_b``.

    ``E[||eps^T J||^2] = ||J||_F^2`` for ``eps ~ N(0, I)``; the estimate averages ``probes``
    draws and divides by the state size ``D`` (per sample), as torchdeq's ``jac_reg`` does, so
    its value does not grow with the width. Costs one ``f`` call and ``probes`` VJPs.

    Args:
        f: ``f(z, x) -> (B, ...)`` shaped like ``z``.
        z: ``(B, ...)`` point (usually the equilibrium; it is detached here).
        x: ``(B, ...)`` input.
        probes: number of Gaussian probe vectors (>= 1).
        create_graph: keep the graph so the estimate can be differentiated (training).
        generator: random generator for the probes (default: torch's global one).

    Returns:
        A scalar tensor, differentiable w.r.t. ``f``'s parameters and ``x`` when
        ``create_graph``.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    with torch.enable_grad():
        zr = z.detach().requires_grad_()
        fz = f(zr, x)
        total = fz.new_zeros(())
        for i in range(probes):
            eps = torch.randn(fz.shape, dtype=fz.dtype, device=fz.device, generator=generator)
            (vj,) = torch.autograd.grad(
                fz, zr, eps, retain_graph=create_graph or i < probes - 1,
                create_graph=create_graph,
            )
            total = total + vj.pow(2).sum()
    return total / (probes * z.numel())


def skip_loss(z0: Tensor, z_star: Tensor, norm: str = "l2", detach: bool = True) -> Tensor:
    """``mean((z0 - sg(z*))^2)`` (``"l2"``) or ``mean(|z0 - sg(z*)|)`` (``"l1"``).

    With ``detach=True`` (default) the equilibrium is detached (stop-gradient): the term trains
    the initial guess ``z0`` to predict ``z*`` and never pulls ``z*`` (the task output) toward
    the guess. ``detach=False`` is the formulation of Pal et al. (2022) and
    DeepEquilibriumNetworks.jl: the gradient also reaches ``z*``, which regularizes ``f``
    toward equilibria the guess can reach (fewer solver steps, at some cost in accuracy).

    Args:
        z0: ``(B, ...)`` the explicit prediction, with its graph.
        z_star: ``(B, ...)`` the equilibrium.
        norm: ``"l2"`` (mean squared) or ``"l1"`` (mean absolute).
        detach: stop the gradient at ``z_star``.
    """
    if norm not in SKIP_NORMS:
        raise ValueError(f"skip_norm must be one of {SKIP_NORMS}, got {norm!r}")
    if not isinstance(detach, bool):
        raise TypeError(f"skip_detach must be a bool, got {type(detach).__name__}")
    if z0.shape != z_star.shape:  # broadcasting would silently compare the wrong pairs
        raise ValueError(f"z0 and z_star must have the same shape, got {tuple(z0.shape)} and "
                         f"{tuple(z_star.shape)}")
    diff = z0 - (z_star.detach() if detach else z_star)
    return diff.pow(2).mean() if norm == "l2" else diff.abs().mean()


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary losses (skip and Jacobian terms) of every contdeq layer in
    ``model``, from each layer's last forward in the calling thread.

    Layers contribute only after a forward in training mode with grad enabled. Returns a
    0-dim zero tensor (on the device and dtype of ``model``'s first floating-point parameter)
    when there is nothing to add, so ``loss + contdeq.aux_loss(model)`` always works.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    total: Tensor | None = None
    for module in model.modules():
        # Duck-typed as AuxLossProvider: a runtime Protocol isinstance check costs ~10 us per
        # module, and this runs every training step.
        last_aux_loss = getattr(module, "last_aux_loss", None)
        if callable(last_aux_loss):
            term = last_aux_loss()
            if term is not None:
                total = term if total is None else total + term
    if total is not None:
        return total
    for p in model.parameters():
        if p.is_floating_point():
            return torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.zeros(())
