"""The autograd function around a forward solver, and :func:`equilibrium`, which builds it."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..solvers import SolverStats, function_precision
from .backward import BackwardMode, backward_mode
from .diagnostics import LayerInput
from .options import UNROLLABLE_SOLVERS, ForwardSolver
from .stats import DEQStats

__all__ = ["DoubleBackwardError", "ImplicitFunction", "equilibrium", "trainable_parameters"]


@dataclass
class _Problem:
    """What the autograd function needs besides tensors (not saved as tensors)."""

    f: nn.Module
    solver: ForwardSolver
    backward: BackwardMode
    names: tuple[str, ...]
    buffers: dict[str, Tensor]
    #: Filled in by the backward pass (``record.backward``), which the caller reads after
    #: ``backward()`` (the documented :attr:`DEQStats.backward`).
    record: DEQStats | None = None


class _WithParameters(nn.Module):
    """Runs ``run()`` while ``f``'s parameters are replaced (through ``functional_call``)."""

    def __init__(self, f: nn.Module, run: Callable[[], Any]) -> None:
        super().__init__()
        self.f = f
        self.run = run

    def forward(self) -> Any:
        return self.run()


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """``(device_type, enabled, dtype)`` of ``torch.autocast`` now, to be restored by
    ``torch.autocast(device_type, dtype, enabled)``."""
    return (device_type, torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type))


def _bound(f: nn.Module, x: Tensor) -> LayerInput:
    """``fx(z) = f(z, x)``, which the solve's one counted wrapper calls (counting, checks with
    the layer's hints, autocast). Under ``torch.autocast`` only ``f`` runs in autocast and its
    output is cast to the state's dtype: the solver's state, its arithmetic and its tests keep
    ``x``'s dtype (run the solve in :func:`_outside_autocast`)."""
    device_type, enabled, dtype = _autocast_state(x.device.type)
    return LayerInput(f, x, autocast=(device_type, dtype) if enabled else None)


@contextlib.contextmanager
def _outside_autocast(device_type: str) -> Iterator[None]:
    """A solver's own arithmetic outside ``torch.autocast`` (a bf16 Anderson Gram matrix
    cannot be solved on CPU, and the state would silently change dtype); its default
    tolerances follow the autocast dtype ``f`` computes in (:func:`function_precision`)."""
    _, enabled, dtype = _autocast_state(device_type)
    if not enabled:
        yield
        return
    with torch.autocast(device_type, enabled=False), function_precision(dtype):
        yield


def _solve(problem: _Problem, z0: Tensor, x: Tensor, params: tuple[Tensor, ...]
           ) -> tuple[Tensor, SolverStats]:
    """The forward solve of ``f(., x)`` from ``z0`` with the parameter tensors ``params``:
    ``(z*, stats)``, ``stats.final_input`` the input a layer step callback left the solve at
    (``Restart(x=...)``; ``None`` where none changed it).

    Outside torch.func these are ``f``'s own parameters and ``f`` is called as it is; inside a
    transform (``torch.func.grad``, ``vjp``, ``vmap``) they are the unwrapped tensors the
    transform passes to :meth:`ImplicitFunction.forward`, bound to ``f`` once for the whole
    solve, so that no solver step sees the transform's wrapped tensors.
    """
    own = dict(problem.f.named_parameters())
    fx = _bound(problem.f, x)
    with _outside_autocast(x.device.type):
        if all(own.get(name) is p for name, p in zip(problem.names, params, strict=True)):
            return problem.solver(fx, z0)
        tensors = {f"f.{name}": p for name, p in zip(problem.names, params, strict=True)}
        runner = _WithParameters(problem.f, lambda: problem.solver(fx, z0))
        return functional_call(runner, tensors, ())


class ImplicitFunction(torch.autograd.Function):
    """``z* = solve(f(., x), z0)`` with gradients ``w^T df/d(x, params)`` at ``z*``, the
    weights ``w`` given by the backward mode (implicit function theorem, JFB, ...).

    Called as ``z, stats = ImplicitFunction.apply(problem, z0, x, *params)`` by
    :func:`equilibrium` (``z0`` and ``x`` ``(B, ...)``; ``z0`` gets no gradient): it returns
    ``z*`` and the forward solve's :class:`~contdeq.solvers.SolverStats` (a non-tensor
    output, which transforms pass through). The gradients of ``x`` and of ``params`` (``f``'s
    parameters, by name in ``problem.names``) come from one vector-Jacobian product of ``f``
    at ``(z*, x)``, ``x`` the input the solve ended with (``stats.final_input`` where a layer
    step callback changed it, e.g. :func:`contdeq.robust.entropy_reduction`: the gradient
    passes straight through that change to ``x``).

    It composes with ``torch.func``: ``grad``, ``vjp`` and ``jacrev`` (``forward`` takes no
    ``ctx``, :meth:`setup_context` saves the tensors), and ``vmap`` by :meth:`vmap`, which
    folds the mapped dimension into the batch and solves once (the solver's per-sample
    convergence tests are data-dependent control flow, which ``vmap`` cannot trace). The
    backward is once differentiable: a second differentiation raises
    :class:`DoubleBackwardError` (``docs/solvers.md``, "Higher-order gradients").
    """

    @staticmethod
    def forward(problem: _Problem, z0: Tensor, x: Tensor, *params: Tensor  # type: ignore[override]
                ) -> tuple[Tensor, SolverStats]:
        z, stats = _solve(problem, z0, x, params)
        return z, stats

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, SolverStats]
                      ) -> None:
        problem, _, x, *params = inputs
        z, stats = output
        ctx.problem = problem
        ctx.autocast = _autocast_state(x.device.type)
        final_x = x if stats.final_input is None else stats.final_input
        ctx.save_for_backward(z, final_x, *params)

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        problem: _Problem = ctx.problem
        z, x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        device_type, enabled, dtype = ctx.autocast  # f as in the forward (torch's custom_bwd)
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            if _inside_transform():
                grads = _implicit_gradients_func(problem, grad_z, z, x, params, needs)
            else:
                grads = _implicit_gradients(problem, grad_z, z, x, params, needs)
        if torch.is_grad_enabled() or _inside_transform():  # a second derivative may follow
            anchors = (grad_z, z, x, *params)
            grads = tuple(None if g is None else _RefuseDoubleBackward.apply(g, *anchors)
                          for g in grads)
        return (None, None, *grads)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], problem: _Problem, z0: Tensor,
             x: Tensor, *params: Tensor
             ) -> tuple[tuple[Tensor, SolverStats], tuple[int, None]]:
        """``vmap`` over ``z0`` and ``x``: the mapped dimension ``N`` is folded into the batch,
        ``(N, B, ...) -> (N * B, ...)``, and solved at once (the samples of a batch are
        independent). Mapping over ``f``'s parameters is refused (each map index would be
        another ``f``)."""
        _refuse_mapped_parameters(in_dims[3:])
        size = info.batch_size
        z0 = _fold(z0, in_dims[1], size)
        x = _fold(x, in_dims[2], size)
        z, stats = ImplicitFunction.apply(problem, z0, x, *params)
        return (z.reshape(size, -1, *z.shape[1:]), stats), (0, None)


_DOUBLE_BACKWARD = (
    "double backward through an equilibrium layer's implicit backward is not supported "
    "(gradgradcheck, torch.func.hessian, gradient penalties: create_graph=True, then "
    "differentiating the gradient again): the backward's linear solve for w = (I - J)^-T v "
    "runs under no_grad. Use backward='unrolled' (solver='ode' or 'picard'), which "
    "differentiates the solver's steps to any order"
)


def _refuse_mapped_parameters(dims: tuple[int | None, ...]) -> None:
    """``vmap`` over ``f``'s parameters (``dims``: their mapped dimensions) is refused."""
    if any(d is not None for d in dims):
        raise NotImplementedError(
            "vmap over f's parameters is not supported through an equilibrium layer (each "
            "mapped index would be a different f, solved separately); map over x, or loop "
            "over the parameter sets"
        )


class DoubleBackwardError(RuntimeError):
    """A second derivative was requested through an equilibrium layer's implicit backward."""


class _NotDifferentiable(torch.autograd.Function):
    """Base of the functions of the implicit backward that cannot be differentiated again:
    nothing is saved, and their backward raises :class:`DoubleBackwardError`."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        raise DoubleBackwardError(_DOUBLE_BACKWARD)


class _RefuseDoubleBackward(_NotDifferentiable):
    """``g`` (any shape) as an output of ``anchors`` (the tensors a second derivative of ``g``
    would flow into), whose backward raises :class:`DoubleBackwardError`."""

    @staticmethod
    def forward(g: Tensor, *anchors: Tensor) -> Tensor:  # type: ignore[override]
        return g.clone()

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], g: Tensor, *anchors: Tensor
             ) -> tuple[Tensor, int | None]:
        return _RefuseDoubleBackward.apply(g, *anchors), in_dims[0]


def _fold(t: Tensor, dim: int | None, size: int) -> Tensor:
    """``t`` with its ``vmap`` dimension ``dim`` folded into the batch: ``(N * B, ...)``; an
    unmapped ``t`` is repeated ``N`` times."""
    if dim is None:
        return t.repeat(size, *(1 for _ in t.shape[1:]))
    t = t.movedim(dim, 0)
    return t.reshape(-1, *t.shape[2:])


def _inside_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``vmap``, ...) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _call_f(problem: _Problem, z: Tensor, x: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``f(z, x)`` ``(B, ...)`` with the parameter tensors ``params`` (and ``f``'s buffers), in
    ``z``'s dtype (under ``torch.autocast`` ``f`` computes in the autocast dtype)."""
    tensors = {**problem.buffers, **dict(zip(problem.names, params, strict=True))}
    return functional_call(problem.f, tensors, (z, x)).to(z.dtype)


def _implicit_gradients_func(problem: _Problem, grad_z: Tensor, z: Tensor, x: Tensor,
                             params: list[Tensor], needs: tuple[bool, ...]
                             ) -> tuple[Tensor | None, ...]:
    """:func:`_implicit_gradients` inside a ``torch.func`` transform, which forbids
    ``requires_grad_`` and, under ``vmap``, data-dependent control flow: the weights come from
    :class:`_AdjointWeights` (its own ``vmap`` rule), the final product ``w^T df/d(x, params)``
    from ``torch.func.vjp``."""
    if problem.backward.uses_jacobian:
        w = _AdjointWeights.apply(problem, grad_z.detach(), z, x, *params)
    else:
        w = problem.backward.gradient_weights(_no_jacobian, grad_z.detach(), problem.record)
    _, pull = torch.func.vjp(lambda x, *p: _call_f(problem, z, x, p), x, *params)
    return tuple(g if n else None for g, n in zip(pull(w), needs, strict=True))


def _state_vjp(fz: Tensor, zr: Tensor) -> Callable[[Tensor], Tensor]:
    """``w -> w^T df/dz`` at ``z*`` from the graph ``fz = f(zr, x)`` (kept for further calls);
    zeros where ``f`` does not depend on ``z``."""

    def vjp(w: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(fz, zr, w, retain_graph=True, allow_unused=True)
        return torch.zeros_like(w) if g is None else g

    return vjp


def _no_jacobian(w: Tensor) -> Tensor:
    """The ``vjp`` given to a mode with ``uses_jacobian = False`` (it never calls it)."""
    raise AssertionError("a backward mode with uses_jacobian = False called vjp")


class _AdjointWeights(_NotDifferentiable):
    """The backward mode's weights ``w`` ``(B, ...)`` for ``v`` ``(B, ...)`` at ``z*``, as a
    function of tensors, so that ``torch.func`` transforms can run the solve: called as
    ``_AdjointWeights.apply(problem, v, z, x, *params)``. Not differentiable (its backward
    raises :class:`DoubleBackwardError`)."""

    @staticmethod
    def forward(problem: _Problem, v: Tensor, z: Tensor, x: Tensor, *params: Tensor  # type: ignore[override]
                ) -> Tensor:
        with torch.enable_grad():
            zr = z.detach().requires_grad_()
            fz = _call_f(problem, zr, x.detach(), [p.detach() for p in params])
        with torch.no_grad(), _outside_autocast(z.device.type):
            return problem.backward.gradient_weights(_state_vjp(fz, zr), v, problem.record)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], problem: _Problem, v: Tensor,
             z: Tensor, x: Tensor, *params: Tensor) -> tuple[Tensor, int]:
        """The mapped dimension folded into the batch, one solve (as
        :meth:`ImplicitFunction.vmap`)."""
        _refuse_mapped_parameters(in_dims[4:])
        size = info.batch_size
        w = _AdjointWeights.apply(problem, _fold(v, in_dims[1], size), _fold(z, in_dims[2], size),
                                  _fold(x, in_dims[3], size), *params)
        return w.reshape(size, -1, *w.shape[1:]), 0


def _implicit_gradients(problem: _Problem, grad_z: Tensor, z: Tensor, x: Tensor,
                        params: list[Tensor], needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of ``x`` and of ``params`` (``None`` where ``needs`` is false) for
    ``v = grad_z`` ``(B, ...)``: the backward mode's weights ``w``, then ``w^T df/d(x, params)``
    at ``z*``, from one graph of ``f(z*, x)`` built on detached tensors."""
    mode = problem.backward
    with torch.enable_grad():
        zr = z.detach().requires_grad_(mode.uses_jacobian)
        xr = x.detach().requires_grad_(needs[0])
        pr = [p.detach().requires_grad_(n) for p, n in zip(params, needs[1:], strict=True)]
        fz = _call_f(problem, zr, xr, pr)
    if not fz.requires_grad:  # f depends on neither z, x nor the parameters
        return (None, *(None for _ in params))
    with torch.no_grad(), _outside_autocast(z.device.type):
        w = mode.gradient_weights(_state_vjp(fz, zr), grad_z.detach(), problem.record)
    inputs = [t for t in (xr, *pr) if t.requires_grad]
    grads = iter(torch.autograd.grad(fz, inputs, w, allow_unused=True)) if inputs else iter(())
    out: list[Tensor | None] = []
    for t in (xr, *pr):
        if t.requires_grad:
            g = next(grads)
            out.append(torch.zeros_like(t) if g is None else g)
        else:
            out.append(None)
    return tuple(out)


def trainable_parameters(f: nn.Module, only_requiring_grad: bool = True
                         ) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """Names and tensors of ``f``'s parameters that require grad (all of them with
    ``only_requiring_grad=False``; shared ones once)."""
    names, params = [], []
    for name, p in f.named_parameters():
        if p.requires_grad or not only_requiring_grad:
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
        solve runs under ``no_grad`` and no autograd node is created (except inside a
        ``torch.func`` transform).

    Under ``torch.autocast`` ``f`` computes in the autocast dtype, while the solver's state,
    arithmetic and convergence test stay in ``z0``'s dtype, float32 for a half-precision
    ``z0``; so ``z*`` is float32 then. Default tolerances follow the autocast dtype
    (:func:`~contdeq.solvers.validation.default_tolerance`); the backward runs ``f`` under
    the forward's autocast state.
    """
    _check_equilibrium_arguments(f, x, z0, solver)
    mode = backward if isinstance(backward, BackwardMode) else backward_mode(
        "implicit" if backward is None else backward)
    if isinstance(backward, str) and mode.remembers_between_calls:
        warnings.warn(f"backward={backward!r} builds a new {type(mode).__name__} on every call "
                      "of equilibrium, so it never carries anything from one backward pass to "
                      f"the next; build it once (mode = {type(mode).__name__}()) and pass "
                      "backward=mode to every call", UserWarning, stacklevel=2)
    transform = _inside_transform()
    # Under a transform every parameter goes to ImplicitFunction (vmap must see mapped ones,
    # which need not require grad); otherwise only those that require grad.
    names, params = trainable_parameters(f, only_requiring_grad=not transform)
    z0 = _state_under_autocast(z0)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or len(params) > 0)
    if not need_grad and not transform:  # vmap needs ImplicitFunction's rule
        fx = _bound(f, x)
        with torch.no_grad(), _outside_autocast(x.device.type):
            z, stats = solver(fx, z0)
        return z, DEQStats(stats)
    if mode.differentiates_solver:
        if not solver.differentiable:
            raise ValueError(
                f"backward={mode!r} needs an autograd-safe forward solver {UNROLLABLE_SOLVERS}; "
                f"solver={solver.solver!r} updates its history in place"
            )
        fx = _bound(f, x)
        with _outside_autocast(x.device.type):
            z, stats = solver(fx, z0)
        return z, DEQStats(stats)
    record = DEQStats.__new__(DEQStats)
    problem = _Problem(f, solver, mode, names, dict(f.named_buffers()), record)
    z, stats = ImplicitFunction.apply(problem, z0.detach(), x, *params)
    record.forward = stats
    record.backward = None
    return z, record


def _state_under_autocast(z0: Tensor) -> Tensor:
    """``z0`` in float32 when it is half precision under ``torch.autocast`` (an input computed
    under autocast is): a bf16 state stagnates where ``f(z)`` rounds to ``z`` (``f(z) - z``
    exactly 0 short of the fixed point). ``f`` still computes in the autocast dtype."""
    if z0.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
            z0.device.type):
        return z0.float()
    return z0


def _check_equilibrium_arguments(f: object, x: object, z0: object, solver: object) -> None:
    """Types of :func:`equilibrium`'s arguments, and ``z0`` against ``x`` (batch, dtype,
    device); each message names the argument, what was expected and what was received (the
    backward mode is checked by :func:`backward_mode`)."""
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
