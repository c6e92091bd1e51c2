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

Two defences regulate the layer's dynamics (Yang, Li, Pang & Liu, ICML 2023), both built on the
solvers' per-step callback (:mod:`contdeq.solvers.callback`):
:func:`random_intermediate_states` (training: the loss is taken at a random intermediate state
of the solve, reached by a few damped unrolled steps) and :func:`entropy_reduction`
(inference: the layer's input is moved, within an eps-ball, to lower the prediction's entropy
along the solve).

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

from .implicit import BackwardMode, ForwardSolver, Unrolled, equilibrium
from .nn.checks import check_number
from .nn.deq import DEQ, check_input
from .solvers import SolverStats
from .solvers.callback import Restart, StepInfo, Stop
from .solvers.validation import check_choice

__all__ = ["NORMS", "entropy_reduction", "pgd", "random_intermediate_states", "robust_accuracy",
           "unrolled_gradients"]

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
    _check_model(model)
    with _swapped_solvers(model, train=lambda base, layer: _unrollable(base, solver),
                          evaluation=lambda base, layer: _unrollable(base, solver),
                          unrolled=True):
        yield model


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



def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


Swap = Callable[[ForwardSolver, DEQ], ForwardSolver]


@contextmanager
def _swapped_solvers(model: nn.Module, *, train: Swap | None = None,
                     evaluation: Swap | None = None, unrolled: bool = False
                     ) -> Iterator[nn.Module]:
    """Within the block, every equilibrium layer of ``model`` solves with
    ``train(solver, layer)`` in training and ``evaluation(eval_solver, layer)`` in eval mode
    (``unrolled``: and its backward mode is ``Unrolled()``, set after the swaps); the exact
    objects are restored on exit (also on an exception)."""
    saved: list[tuple[DEQ, Any, ForwardSolver, ForwardSolver]] = []
    try:
        for layer in _equilibrium_layers(model):
            saved.append((layer, layer.backward_mode, layer.solver, layer.eval_solver))
            if train is not None:
                layer.solver = train(layer.solver, layer)
            if evaluation is not None:
                layer.eval_solver = evaluation(layer.eval_solver, layer)
            if unrolled:
                layer.backward_mode = Unrolled()
        yield model
    finally:
        for layer, mode, train_solver, eval_solver in saved:
            layer.backward_mode = mode
            layer.solver = train_solver
            layer.eval_solver = eval_solver


class _DelegatingSolver(ForwardSolver):
    """``base`` with the layer's own backward ``mode``, for a layer switched to
    ``Unrolled()``: it calls :func:`~contdeq.implicit.equilibrium` itself, so gradients are
    those the layer gives outside the block (implicit by default)."""

    def __init__(self, base: ForwardSolver, mode: BackwardMode) -> None:
        super().__init__(base.solver, on_nonconvergence=base.on_nonconvergence, **base.options)
        self.base, self.mode = base, mode

    @property
    def differentiable(self) -> bool:
        return True

    def __call__(self, fx: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        z, stats = equilibrium(fx.f, fx.x, z0, solver=self.base,  # type: ignore[attr-defined]
                               backward=self.mode)
        return z, stats.forward


class _RandomIntermediateSolver(ForwardSolver):
    """``base``'s solve stopped at a random step (``"ode"``: a random pseudo-time), then
    ``unrolled_steps`` damped steps ``z <- (1 - damping) z + damping f(z, x)`` recorded by
    autograd. Differentiable (the layer backpropagates through the unrolled steps only)."""

    def __init__(self, base: ForwardSolver, max_steps: int, unrolled_steps: int, damping: float,
                 generator: torch.Generator | None) -> None:
        super().__init__(base.solver, on_nonconvergence="ignore",
                         **{k: v for k, v in base.options.items() if k != "callback"})
        self.max_steps, self.unrolled_steps, self.damping = max_steps, unrolled_steps, damping
        self.generator = generator

    @property
    def differentiable(self) -> bool:
        return True

    def draw(self) -> Callable[[StepInfo], Stop | None]:
        """A callback stopping the solve at step ``k ~ U{1, ..., max_steps}``, or (``"ode"``)
        at the first accepted step reaching pseudo-time ``T ~ U(0, max_steps]``."""
        if self.solver == "ode":
            t_stop = self.max_steps * (1.0 - float(torch.rand((), generator=self.generator)))
            return lambda info: Stop() if info.t is not None and float(
                info.t.max()) >= t_stop else None
        k = int(torch.randint(1, self.max_steps + 1, (), generator=self.generator))
        calls = [0]

        def stop_at_k(info: StepInfo) -> Stop | None:
            calls[0] += 1
            return Stop() if calls[0] >= k else None

        return stop_at_k

    def __call__(self, fx: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        stopped = ForwardSolver(self.solver, on_nonconvergence="ignore",
                                **{**self.options, "callback": self.draw()})
        with torch.no_grad():
            z, stats = stopped(fx, z0)
        for _ in range(self.unrolled_steps):
            z = torch.lerp(z, fx(z), self.damping)
        stats.nfe += self.unrolled_steps
        return z, stats


@contextmanager
def random_intermediate_states(
    model: nn.Module,
    *,
    max_steps: int,
    unrolled_steps: int = 2,
    damping: float = 0.5,
    generator: torch.Generator | None = None,
) -> Iterator[nn.Module]:
    """Within the block, every equilibrium layer of ``model`` in training mode returns a
    random intermediate state of its solve (Yang et al. 2023, "random intermediate states").

    Each training call of a layer stops its forward solve at a random step
    ``k ~ U{1, ..., max_steps}`` (one draw per call; for ``solver="ode"`` at the first accepted
    step reaching a random pseudo-time ``T ~ U(0, max_steps]``: a pseudo-time of 1 is the time
    scale of one Picard step), through a step callback, and then takes ``unrolled_steps``
    damped steps ``z <- (1 - damping) z + damping f(z, x)`` with autograd: the layer's output
    and gradient are those of these steps (a phantom gradient), so an adversarial loss is taken
    along the dynamics, not only at the equilibrium. A solve that converges before step ``k``
    is not stopped. ``layer.stats.forward`` tells where it stopped (``stop_reason ==
    "callback"``; ``nfe`` includes the unrolled steps); the stop is deliberate, so it is not
    reported as non-convergence. Evaluation mode is unchanged (same solver, same backward:
    an attack generated in eval mode inside the block sees the usual gradient), and the layers
    (solvers, backward modes, a layer's own ``callback``, suspended in training within the
    block) are restored on exit, also after an exception.

    Args:
        model: any module; its :class:`~contdeq.DEQ` layers (all variants) are switched.
        max_steps: largest step (or pseudo-time) at which a solve is stopped (``>= 1``).
        unrolled_steps: damped steps taken with autograd from the stopped state (``>= 1``).
        damping: weight of ``f`` in each unrolled step, in ``(0, 1]``.
        generator: random generator of the draws (default torch's global one).

    Yields:
        ``model``. Shapes are unchanged: ``x`` ``(B, ...)`` -> ``z`` ``(B, *state_shape)``.
    """
    _check_model(model)
    max_steps = int(check_number(max_steps, "max_steps", 1, integer=True))
    unrolled_steps = int(check_number(unrolled_steps, "unrolled_steps", 1, integer=True))
    damping = float(check_number(damping, "damping", 0, strict=True, finite=True))
    if damping > 1:
        raise ValueError(f"damping must be a float in (0, 1], got {damping!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")

    def regulated(solver: ForwardSolver, layer: DEQ) -> ForwardSolver:
        return _RandomIntermediateSolver(solver, max_steps, unrolled_steps, damping, generator)

    def unchanged(solver: ForwardSolver, layer: DEQ) -> ForwardSolver:
        return _DelegatingSolver(solver, layer.backward_mode)

    with _swapped_solvers(model, train=regulated, evaluation=unchanged, unrolled=True):
        yield model


def _entropy(logits: Tensor) -> Tensor:
    """``(B, C)`` logits -> ``(B,)`` entropy of the softmax."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


class _EntropyReducingSolver(ForwardSolver):
    """``base``'s solve, with the layer's input moved to lower the entropy of
    ``head(f(z, x))`` after every ``every`` accepted steps, at most ``rounds`` times."""

    def __init__(self, base: ForwardSolver, head: nn.Module, every: int, steps: int,
                 step_size: float, eps: float, norm: str, rounds: int) -> None:
        super().__init__(base.solver, on_nonconvergence=base.on_nonconvergence,
                         **{k: v for k, v in base.options.items() if k != "callback"})
        self.head, self.every, self.steps, self.step_size = head, every, steps, step_size
        self.eps, self.norm, self.rounds = eps, norm, rounds

    def __call__(self, fx: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        f, x0 = fx.f, fx.x  # type: ignore[attr-defined]  # the layer's CheckedCall
        accepted = [0]
        extra = [0]

        def reduce_entropy(info: StepInfo) -> Restart | None:
            accepted[0] += 1
            if accepted[0] % self.every or accepted[0] > self.every * self.rounds:
                return None
            assert info.x is not None
            x = info.x
            z = info.z.detach()
            for _ in range(self.steps):
                with torch.enable_grad():
                    xv = x.detach().requires_grad_(True)
                    value = _entropy(self.head(f(z, xv))).sum()
                    (grad,) = torch.autograd.grad(value, xv)
                extra[0] += 1
                x = x0 + _project(x - _ascent_step(grad, self.step_size, self.norm) - x0,
                                  self.eps, self.norm)
            return Restart(x=x)

        defended = ForwardSolver(self.solver, on_nonconvergence=self.on_nonconvergence,
                                 **{**self.options, "callback": reduce_entropy})
        z, stats = defended(fx, z0)
        stats.nfe += extra[0]
        return z, stats


@contextmanager
def entropy_reduction(
    model: nn.Module,
    head: nn.Module,
    *,
    every: int,
    steps: int = 1,
    step_size: float,
    eps: float,
    norm: str = "linf",
    rounds: int = 3,
) -> Iterator[nn.Module]:
    """Within the block, the equilibrium layer of ``model`` in eval mode moves its input along
    the solve to make the prediction more confident (Yang et al. 2023, "input entropy
    reduction", an inference-time defence).

    After every ``every`` accepted solver steps (fixed-point iterations), at most ``rounds``
    times per solve, ``steps`` signed-gradient (``"linf"``) or normalised-gradient (``"l2"``)
    steps of length ``step_size`` lower the entropy of ``head(f(z_k, x))`` (the prediction one
    step ahead of the current state ``z_k``; ``head(z_k)`` itself does not depend on ``x``) with
    respect to the layer's input ``x``, kept within ``eps`` of the given input in ``norm``;
    the solve then continues on the changed input (a step callback's ``Restart(x=...)``: the
    state is kept, the solver's history restarts) and converges on the last one. The ball is
    around the *layer's* input: with an encoder before the layer it lives in feature space.

    Cost per round: ``steps`` evaluations of ``f`` and ``head`` with one vector-Jacobian
    product each, plus one evaluation of ``f`` for the restart; the ``f`` evaluations are
    counted in ``layer.stats.forward.nfe``. The gradient of the defended model (e.g. for an
    attack on it) is the layer's usual one taken at the original input: the input changes are
    not differentiated through (the implicit backward sees the original ``x``).

    Args:
        model: a module with exactly one :class:`~contdeq.DEQ` layer (any variant).
        head: the modules mapping the layer's state ``(B, *state_shape)`` to logits
            ``(B, C)``.
        every: accepted solver steps between rounds (``>= 1``).
        steps: gradient steps per round (``>= 1``).
        step_size: length of each step (``> 0``).
        eps: radius of the ball around the layer's input (``>= 0``).
        norm: ``"linf"`` or ``"l2"``.
        rounds: most rounds per solve (``>= 1``); then the solve converges undisturbed.

    Yields:
        ``model``. Training mode and the layer's configuration are restored on exit.
    """
    _check_model(model)
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module mapping the layer's state to logits, got "
                        f"{type(head).__name__}")
    every = int(check_number(every, "every", 1, integer=True))
    steps = int(check_number(steps, "steps", 1, integer=True))
    step_size = float(check_number(step_size, "step_size", 0, strict=True, finite=True))
    eps = float(check_number(eps, "eps", 0, finite=True))
    check_choice(norm, "norm", NORMS)
    rounds = int(check_number(rounds, "rounds", 1, integer=True))
    layers = list(_equilibrium_layers(model))
    if len(layers) != 1:
        raise ValueError(f"entropy_reduction needs a model with exactly one equilibrium layer "
                         f"(head maps its state to logits), found {len(layers)}")

    def defended(solver: ForwardSolver, layer: DEQ) -> ForwardSolver:
        return _EntropyReducingSolver(solver, head, every, steps, step_size, eps, norm, rounds)

    with _swapped_solvers(model, evaluation=defended):
        yield model
