"""The autograd function around a forward solver, and :func:`equilibrium`, which builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from ..solvers import SolverStats
from .backward import BackwardConfig, BackwardMode
from .diagnostics import CheckedCall
from .options import UNROLLABLE_SOLVERS, ForwardSolver
from .stats import DEQStats

__all__ = ["ImplicitFunction", "equilibrium", "trainable_parameters"]


@dataclass
class _Problem:
    """What the autograd function needs besides tensors (not saved as tensors)."""

    f: nn.Module
    solver: ForwardSolver
    backward: BackwardMode
    z0: Tensor
    names: tuple[str, ...]
    buffers: dict[str, Tensor]
    record: DEQStats | None = None
    forward_stats: SolverStats | None = None


class ImplicitFunction(torch.autograd.Function):
    """``z* = solve(f(., x), z0)`` with gradients ``w^T df/d(x, params)`` at ``z*``, the
    weights ``w`` given by the backward mode (implicit function theorem, JFB, ...).

    Called as ``ImplicitFunction.apply(problem, x, *params)`` by :func:`equilibrium`; the
    gradients of ``x`` (``(B, ...)``) and of ``params`` (``f``'s parameters, by name in
    ``problem.names``) come from one vector-Jacobian product of ``f`` at ``z*``.
    """

    @staticmethod
    def forward(ctx: Any, problem: _Problem, x: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        fx = CheckedCall(problem.f, x)
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
        mode = problem.backward
        with torch.enable_grad():
            zr = z.detach().requires_grad_(mode.uses_jacobian)
            xr = x.detach().requires_grad_(needs[0])
            pr = [p.detach().requires_grad_(n) for p, n in zip(params, needs[1:], strict=True)]
            tensors = {**problem.buffers, **dict(zip(problem.names, pr, strict=True))}
            fz = functional_call(problem.f, tensors, (zr, xr))
        if not fz.requires_grad:  # f depends on neither z, x nor the parameters
            return (None, None, *(None for _ in params))

        def vjp(w: Tensor) -> Tensor:
            (g,) = torch.autograd.grad(fz, zr, w, retain_graph=True, allow_unused=True)
            return torch.zeros_like(w) if g is None else g

        w = mode.gradient_weights(vjp, grad_z, problem.record)
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
    backward: BackwardMode | str | None = None,
) -> tuple[Tensor, DEQStats]:
    """The equilibrium ``z* = f(z*, x)`` found from ``z0``, differentiable in ``x`` and ``f``.

    Args:
        f: module called as ``f(z, x)``, returning a tensor shaped like ``z``.
        x: ``(B, ...)`` input (any shape; passed to ``f`` unchanged).
        z0: ``(B, ...)`` initial state (not differentiated: ``z*`` does not depend on it).
        solver: the forward solver.
        backward: a backward mode object (:class:`Implicit`, :class:`JFB`, :class:`Unrolled`,
            ...) or its registered name; default ``Implicit()``.

    Returns:
        ``(z*, stats)``: ``z*`` shaped like ``z0``; ``stats.backward`` is filled in by the
        backward pass (implicit mode). When grad is disabled, or nothing requires grad, the
        solve runs under ``no_grad`` and no autograd node is created.
    """
    _check_equilibrium_arguments(f, x, z0, solver)
    mode = BackwardConfig("implicit" if backward is None else backward)
    names, params = trainable_parameters(f)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or len(params) > 0)
    if not need_grad:
        with torch.no_grad():
            z, stats = solver(CheckedCall(f, x), z0)
        return z, DEQStats(stats)
    if mode.differentiates_solver:
        if not solver.differentiable:
            raise ValueError(
                f"backward={mode!r} needs an autograd-safe forward solver {UNROLLABLE_SOLVERS}; "
                f"solver={solver.solver!r} updates its history in place"
            )
        z, stats = solver(CheckedCall(f, x), z0)
        return z, DEQStats(stats)
    record = DEQStats.__new__(DEQStats)
    problem = _Problem(f, solver, mode, z0.detach(), names, dict(f.named_buffers()), record)
    z = ImplicitFunction.apply(problem, x, *params)
    assert problem.forward_stats is not None
    record.forward = problem.forward_stats
    record.backward = None
    return z, record


def _check_equilibrium_arguments(f: object, x: object, z0: object, solver: object) -> None:
    """Types of :func:`equilibrium`'s arguments, and ``z0`` against ``x`` (batch, dtype,
    device); each message names the argument, what was expected and what was received (the
    backward mode is checked by :func:`BackwardConfig`)."""
    if not isinstance(f, nn.Module):
        raise TypeError(f"f must be an nn.Module called as f(z, x), got {type(f).__name__}")
    for name, value in (("x", x), ("z0", z0)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    assert isinstance(x, Tensor) and isinstance(z0, Tensor)
    if not isinstance(solver, ForwardSolver):
        raise TypeError(f"solver must be a contdeq.ForwardSolver, got {type(solver).__name__}")
    if z0.ndim == 0 or x.ndim == 0 or z0.shape[0] != x.shape[0]:
        raise ValueError(f"z0 must have x's batch size first: x has shape {tuple(x.shape)}, "
                         f"z0 has shape {tuple(z0.shape)}")
    if z0.dtype != x.dtype or z0.device != x.device:
        raise TypeError(f"z0 must have x's dtype and device ({x.dtype}, {x.device}), got "
                        f"({z0.dtype}, {z0.device})")
