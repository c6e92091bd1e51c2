"""Adversarial attacks through equilibrium layers, and robust accuracy.

:func:`pgd` is projected gradient descent on the input (Madry et al. 2018). It differentiates
the model with plain autograd, so through an equilibrium layer it uses that layer's backward:
the implicit-function-theorem gradient by default (``backward="implicit"``), or whatever the
layer is configured with. An attack that only ever sees the implicit gradient can be weakened
by *gradient masking* (an inexact backward solve, a Jacobian-free backward, a solver that
stops early), the classic trap when evaluating implicit models; :func:`unrolled_gradients`
switches every equilibrium layer of a model to backpropagation through its solver's steps for
the attack's duration, so the attack can be run both ways and the weaker robust accuracy
reported. A gradient-free attack (torchattacks' ``Square``) is the other cross-check.

contdeq models are ordinary ``nn.Module`` s, so torchattacks' attacks run on them unchanged
(see ``docs/robustness.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .implicit import ForwardSolver, Unrolled
from .nn.checks import check_number
from .nn.deq import DEQ, check_input
from .solvers.validation import check_choice

__all__ = ["NORMS", "pgd", "robust_accuracy", "unrolled_gradients"]

#: Threat models of :func:`pgd`.
NORMS = ("linf", "l2")
#: Forward solvers :func:`unrolled_gradients` can substitute (autograd-safe ones).
_UNROLLED_SOLVERS = ("ode", "picard")
#: Solver options every forward solver shares, kept when a solver is substituted.
_SHARED_OPTIONS = ("atol", "rtol", "max_steps", "timeout")


def _per_sample_norm(t: Tensor) -> Tensor:
    """``(B, ...)`` -> ``(B, 1, ..., 1)`` Euclidean norms, broadcastable against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``delta`` (``(B, ...)``) onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _ascent_step(grad: Tensor, alpha: float, norm: str) -> Tensor:
    """The steepest-ascent step of length ``alpha`` in ``norm`` for ``grad`` (``(B, ...)``)."""
    if norm == "linf":
        return alpha * grad.sign()
    return alpha * grad / _per_sample_norm(grad).clamp_min(1e-12)


def _random_start(x: Tensor, eps: float, norm: str) -> Tensor:
    """A uniform point of the ``linf`` ball, or a point of the ``l2`` ball (uniform direction,
    radius uniform in ``[0, eps]``), shaped like ``x``."""
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    direction = torch.randn_like(x)
    radius = torch.rand(x.shape[0], dtype=x.dtype, device=x.device) * eps
    return direction / _per_sample_norm(direction).clamp_min(1e-12) * radius.view(
        -1, *([1] * (x.ndim - 1)))


def _check_clamp(clamp: object) -> tuple[float, float] | None:
    if clamp is None:
        return None
    if (not isinstance(clamp, tuple) or len(clamp) != 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in clamp)
            or not clamp[0] < clamp[1]):
        raise ValueError(f"clamp must be None or a tuple (low, high) of numbers with low < high, "
                         f"got {clamp!r}")
    return float(clamp[0]), float(clamp[1])


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    alpha: float | None = None,
    steps: int = 20,
    norm: str = "linf",
    random_start: bool = True,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
) -> Tensor:
    """Projected gradient descent: inputs within ``eps`` of ``x`` that maximise the loss.

    The gradient is plain autograd through ``model``; an equilibrium layer contributes its
    configured backward (implicit by default). Wrap the call in :func:`unrolled_gradients` to
    attack through the unrolled solver instead. The model's mode is left as it is (call
    ``model.eval()`` first to attack the inference model); its parameters get no gradient.

    Args:
        model: ``(B, ...) -> (B, C)`` logits (or whatever ``loss`` takes).
        x: ``(B, ...)`` clean inputs.
        y: ``(B,)`` labels (or any target ``loss`` takes).
        eps: radius of the threat model (>= 0; 0 returns ``x``, clamped).
        alpha: step size (default ``2.5 * eps / steps``, Madry et al.'s rule).
        steps: number of ascent steps (>= 1).
        norm: ``"linf"`` (signed-gradient steps) or ``"l2"`` (normalised-gradient steps).
        random_start: start from a random point of the ball (else from ``x``).
        loss: ``loss(model(x_adv), y) -> scalar`` to maximise (default cross-entropy).
        clamp: valid input range ``(low, high)`` (default ``(0, 1)``, images) or ``None``.

    Returns:
        ``(B, ...)`` adversarial inputs, detached, ``||x_adv - x|| <= eps`` in ``norm``.
    """
    x = check_input(x)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(y, Tensor) or y.ndim == 0 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be a tensor with x's batch size {x.shape[0]} first, got "
                         f"{shape}")
    eps = float(check_number(eps, "eps", 0, finite=True))
    steps = int(check_number(steps, "steps", 1, integer=True))
    check_choice(norm, "norm", NORMS)
    if alpha is None:
        alpha = 2.5 * eps / steps
    alpha = float(check_number(alpha, "alpha", 0, finite=True))
    bounds = _check_clamp(clamp)
    loss_fn = F.cross_entropy if loss is None else loss

    def valid(t: Tensor) -> Tensor:
        return t if bounds is None else t.clamp(*bounds)

    x = x.detach()
    if eps == 0:
        return valid(x)
    delta = _random_start(x, eps, norm) if random_start else torch.zeros_like(x)
    x_adv = valid(x + delta)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            value = loss_fn(model(x_adv), y)
            (grad,) = torch.autograd.grad(value, x_adv)
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(
                "pgd: the loss gradient with respect to the input contains NaN or Inf")
        with torch.no_grad():
            delta = _project(x_adv + _ascent_step(grad, alpha, norm) - x, eps, norm)
            x_adv = valid(x + delta)
    return x_adv.detach()


def _equilibrium_layers(model: nn.Module) -> Iterator[DEQ]:
    return (m for m in model.modules() if isinstance(m, DEQ))


def _unrollable(solver: ForwardSolver, substitute: str) -> ForwardSolver:
    """``solver`` if autograd-safe, else ``substitute`` with the options both understand."""
    if solver.differentiable:
        return solver
    shared = {k: v for k, v in solver.options.items() if k in _SHARED_OPTIONS}
    return ForwardSolver(substitute, on_nonconvergence=solver.on_nonconvergence, **shared)


@contextmanager
def unrolled_gradients(model: nn.Module, solver: str = "ode") -> Iterator[nn.Module]:
    """Within the block, every equilibrium layer of ``model`` backpropagates through its
    solver's steps (``backward="unrolled"``); the layers are restored on exit.

    Layers whose forward solver is not autograd-safe (``"anderson"``, ``"broyden"``) solve
    with ``solver`` instead during the block (keeping their ``atol``, ``rtol``, ``max_steps``
    and ``timeout``). The attack then differentiates the computation the solver actually
    performed, which exposes gradient masking by an inexact or Jacobian-free implicit
    backward. Memory grows with the number of solver steps.

    Args:
        model: any module; its :class:`~contdeq.DEQ` layers (including the multi-scale and
            skip variants) are switched.
        solver: ``"ode"`` (default) or ``"picard"``, for layers that need a substitute.

    Yields:
        ``model``.
    """
    check_choice(solver, "solver", _UNROLLED_SOLVERS)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    saved: list[tuple[DEQ, Any, ForwardSolver, ForwardSolver]] = []
    try:
        for layer in _equilibrium_layers(model):
            saved.append((layer, layer.backward_mode, layer.solver, layer.eval_solver))
            layer.backward_mode = Unrolled()
            layer.solver = _unrollable(layer.solver, solver)
            layer.eval_solver = _unrollable(layer.eval_solver, solver)
        yield model
    finally:
        for layer, mode, train_solver, eval_solver in saved:
            layer.backward_mode = mode
            layer.solver = train_solver
            layer.eval_solver = eval_solver


def _batches(data: tuple[Tensor, Tensor] | Iterable[Any], batch_size: int
             ) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: x and y must have the same number of samples, got "
                             f"{x.shape[0]} and {y.shape[0]}")
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    for item in data:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise TypeError("data must be a tuple (x, y) of tensors or an iterable of (x, y) "
                            f"batches (a DataLoader), got an item of type {type(item).__name__}")
        yield item[0], item[1]


def robust_accuracy(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable[Any],
    attack: Callable[[Tensor, Tensor], Tensor] | None,
    *,
    batch_size: int = 256,
) -> float:
    """Fraction of samples classified correctly after ``attack``.

    Args:
        model: ``(B, ...) -> (B, C)`` logits; its mode is left as it is.
        data: a tuple ``(x, y)`` of tensors (``(N, ...)``, ``(N,)``), split into batches of
            ``batch_size``, or an iterable of ``(x, y)`` batches (a ``DataLoader``).
        attack: ``attack(x, y) -> x_adv`` (a torchattacks attack, or e.g.
            ``lambda x, y: pgd(model, x, y, eps)``); ``None`` gives the clean accuracy.
        batch_size: batch size for tensor data.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    check_number(batch_size, "batch_size", 1, integer=True)
    if attack is not None and not callable(attack):
        raise TypeError(f"attack must be callable as attack(x, y) -> x_adv or None, got "
                        f"{type(attack).__name__}")
    correct = total = 0
    for x, y in _batches(data, batch_size):
        inputs = x if attack is None else attack(x, y)
        with torch.no_grad():
            pred = model(inputs).argmax(dim=1)
        correct += int((pred == y).sum())
        total += int(y.shape[0])
    if total == 0:
        raise ValueError("data holds no samples")
    return correct / total

