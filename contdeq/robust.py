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
of the solve, reached by a few unrolled steps) and :func:`entropy_reduction` (inference: the
input is moved, within an eps-ball, to lower the prediction's entropy along the solve); their
defaults are those of the original code. :func:`robust_accuracy` evaluates a defence against
adaptive attacks and against transfer attacks crafted on the undefended model.

Each context manager installs a dynamics modifier (:class:`~contdeq.nn.Modifier`) on the
equilibrium layers for the block (:meth:`contdeq.DEQ.using`): it wraps their solve (and, for
the attacks through the unrolled solve, their backward mode) without changing the layers'
attributes, and is removed on exit.

contdeq models are ordinary ``nn.Module`` s, so torchattacks' attacks run on them unchanged
(see ``docs/robustness.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .implicit import BackwardMode, ForwardSolver, Unrolled
from .nn.checks import check_labels, check_number
from .nn.deq import DEQ, check_input
from .nn.lyapunov import LyapunovSolver
from .nn.modifiers import Modifier
from .solvers import Restart, SolverStats, StepInfo, Stop
from .solvers.validation import check_choice

__all__ = ["AUTO", "NORMS", "entropy_reduction", "pgd", "random_intermediate_states",
           "robust_accuracy", "unrolled_gradients"]

#: Threat models of :func:`pgd`.
NORMS = ("linf", "l2")
#: Forward solvers :func:`unrolled_gradients` can substitute (autograd-safe ones).
_UNROLLED_SOLVERS = ("ode", "picard")
#: Solver options every forward solver shares, kept when a solver is substituted.
_SHARED_OPTIONS = ("atol", "rtol", "max_steps", "timeout")


def _per_sample_norm(t: Tensor) -> Tensor:
    """``(B, ...)`` -> ``(B, 1, ..., 1)`` Euclidean norms, broadcastable against ``t``."""
    return t.reshape(t.shape[0], -1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


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
        eps: radius of the threat model (>= 0; 0 returns ``x``).
        alpha: step size (default ``2.5 * eps / steps``, Madry et al.'s rule).
        steps: number of ascent steps (>= 1).
        norm: ``"linf"`` (signed-gradient steps) or ``"l2"`` (normalised-gradient steps).
        random_start: start from a random point of the ball (else from ``x``).
        loss: ``loss(model(x_adv), y) -> scalar`` to maximise (default cross-entropy).
        clamp: valid input range ``(low, high)`` (default ``(0, 1)``, images) or ``None``;
            ``x`` must lie inside it (else ``ValueError``: clamping could not keep the
            result in the ball).

    Returns:
        ``(B, ...)`` adversarial inputs, detached, ``||x_adv - x|| <= eps`` in ``norm`` and
        inside ``clamp``.
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
    if bounds is not None:
        low, high = float(x.min()), float(x.max())
        if low < bounds[0] or high > bounds[1]:
            raise ValueError(
                f"pgd: x must lie inside clamp={bounds} (its values span [{low:g}, {high:g}]); "
                f"clamping would move points outside the eps-ball around x. Pass the data's "
                f"valid range as clamp=(low, high), or clamp=None for an unbounded input")
    if eps == 0:
        return x
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


def _same_field(original: ForwardSolver, new: ForwardSolver) -> ForwardSolver:
    """``new`` solving what ``original`` solves: a :class:`LyapunovDEQ`'s solver solves its
    projected field, so a substitute is rebuilt on that field."""
    return original.rebuild(new) if isinstance(original, LyapunovSolver) else new


def _unrollable(solver: ForwardSolver, substitute: str) -> ForwardSolver:
    """``solver`` if autograd-safe, else ``substitute`` with the options both understand."""
    if solver.differentiable:
        return solver
    shared = {k: v for k, v in solver.options.items() if k in _SHARED_OPTIONS}
    return _same_field(solver, ForwardSolver(substitute, on_nonconvergence=solver.on_nonconvergence,
                                             **shared))


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
    with _installed(model, lambda layer: _UnrolledGradients(solver)):
        yield model


class _UnrolledGradients(Modifier):
    """Dynamics modifier of :func:`unrolled_gradients`: backward ``Unrolled()``, and a solver
    that is not autograd-safe replaced by ``substitute`` (training and evaluation)."""

    def __init__(self, substitute: str) -> None:
        self.substitute = substitute

    def solver(self, base: ForwardSolver, training: bool) -> ForwardSolver:
        return _unrollable(base, self.substitute)

    def backward(self, base: BackwardMode, training: bool) -> BackwardMode:
        return Unrolled()


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
    defence: Callable[[], AbstractContextManager[Any]] | None = None,
) -> float:
    """Fraction of samples classified correctly after ``attack``.

    Two evaluations of a defence that acts inside the model (e.g. :func:`entropy_reduction`):
    *adaptive*, the attack crafted on the defended model (enter the defence around the whole
    call), and *transfer*, the attack crafted on the undefended model and the predictions made
    with the defence (``defence=``: it is entered for the predictions only).

    Args:
        model: ``(B, ...) -> (B, C)`` logits; its mode is left as it is.
        data: a tuple ``(x, y)`` of tensors (``(N, ...)``, ``(N,)``), split into batches of
            ``batch_size``, or an iterable of ``(x, y)`` batches (a ``DataLoader``).
        attack: ``attack(x, y) -> x_adv`` (a torchattacks attack, or e.g.
            ``lambda x, y: pgd(model, x, y, eps)``); ``None`` gives the clean accuracy.
        batch_size: batch size for tensor data.
        defence: ``None``, or a function returning a fresh context manager (e.g.
            ``lambda: entropy_reduction(model, head)``) within which the adversarial inputs
            are classified, while ``attack`` runs outside it.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    check_number(batch_size, "batch_size", 1, integer=True)
    if attack is not None and not callable(attack):
        raise TypeError(f"attack must be callable as attack(x, y) -> x_adv or None, got "
                        f"{type(attack).__name__}")
    if defence is not None and not callable(defence):
        raise TypeError(f"defence must be None or a function returning a context manager, "
                        f"got {type(defence).__name__}")
    correct = total = 0
    for x, y in _batches(data, batch_size):
        inputs = x if attack is None else attack(x, y)
        with torch.no_grad(), (nullcontext() if defence is None else defence()):
            pred = model(inputs).argmax(dim=1)
        check_labels(y, pred.shape[0], "data: labels", "B")
        correct += int((pred == y).sum())
        total += int(y.shape[0])
    if total == 0:
        raise ValueError("data holds no samples")
    return correct / total


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


@contextmanager
def _installed(model: nn.Module, modifier: Callable[[DEQ], Modifier]) -> Iterator[nn.Module]:
    """Within the block, every equilibrium layer of ``model`` also applies
    ``modifier(layer)`` to its solves (:meth:`~contdeq.DEQ.using`); removed on exit (also on an
    exception). The layers' own attributes are not changed."""
    with ExitStack() as stack:
        for layer in list(_equilibrium_layers(model)):
            stack.enter_context(layer.using(modifier(layer)))
        yield model


class _RandomIntermediateSolver(ForwardSolver):
    """A solve stopped at a random step (``"ode"``: a random pseudo-time) with ``base``'s
    solver or with ``solver`` (sharing ``base``'s tolerances), then, recorded by autograd, one
    plain step ``z <- f(z, x)`` (``f_step``) and ``unrolled_steps`` damped steps
    ``z <- (1 - damping) z + damping f(z, x)``. Differentiable (the layer backpropagates
    through these steps only)."""

    def __init__(self, base: ForwardSolver, solver: str | None, max_steps: int, f_step: bool,
                 unrolled_steps: int, damping: float, generator: torch.Generator | None
                 ) -> None:
        if solver is None or solver == base.solver:
            options = {k: v for k, v in base.options.items() if k != "callback"}
            solver = base.solver
        else:
            options = {k: v for k, v in base.options.items() if k in _SHARED_OPTIONS}
        options["max_steps"] = max(max_steps, int(options.get("max_steps", 0)))
        super().__init__(solver, on_nonconvergence="ignore", **options)
        self.base = base
        self.max_steps, self.f_step = max_steps, f_step
        self.unrolled_steps, self.damping = unrolled_steps, damping
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
        stopped = _same_field(self.base, ForwardSolver(
            self.solver, on_nonconvergence="ignore", **{**self.options, "callback": self.draw()}))
        with torch.no_grad():
            z, stats = stopped(fx, z0)
        step = self.base.step_map(fx) if isinstance(self.base, LyapunovSolver) else fx
        if self.f_step:
            z = step(z)
        for _ in range(self.unrolled_steps):
            z = torch.lerp(z, step(z), self.damping)
        stats.nfe += self.unrolled_steps + int(self.f_step)
        return z, stats


#: Forward solvers :func:`random_intermediate_states` can stop early.
_RIS_SOLVERS = ("ode", "anderson", "broyden", "picard")


@contextmanager
def random_intermediate_states(
    model: nn.Module,
    *,
    max_steps: int = 8,
    solver: str | None = "broyden",
    f_step: bool = True,
    unrolled_steps: int = 5,
    damping: float = 0.5,
    generator: torch.Generator | None = None,
) -> Iterator[nn.Module]:
    """Within the block, every equilibrium layer of ``model`` in training mode returns a
    random intermediate state of its solve (Yang et al. 2023, "random intermediate states").

    Each training call of a layer solves with ``solver`` and stops at a random step
    ``k ~ U{1, ..., max_steps}`` (one draw per call; for ``solver="ode"`` at the first accepted
    step reaching a random pseudo-time ``T ~ U(0, max_steps]``: a pseudo-time of 1 is the time
    scale of one Picard step), through a step callback; then, with autograd, it takes one
    plain step ``z <- f(z, x)`` (``f_step``) and ``unrolled_steps`` damped steps
    ``z <- (1 - damping) z + damping f(z, x)``: the layer's output and gradient are those of
    these steps (a phantom gradient), so an adversarial loss is taken along the dynamics. The
    defaults are the original code's (minicheshire/DEQ-Regulating-Neural-Dynamics): Broyden
    stopped at a random step in 1-8, one ``f`` step, 5 steps damped by 0.5. A solve that
    converges before step ``k`` is not stopped. ``layer.stats.forward`` tells where it stopped
    (``stop_reason == "callback"``; ``nfe`` includes the steps with autograd); the stop is
    deliberate, so it is not reported as non-convergence. Evaluation mode is unchanged (same
    solver, same backward: an attack generated in eval mode inside the block sees the usual
    gradient; the original code also passes the eval output through the 1 + 5 steps, which
    moves a converged state by about the solver's tolerance), and the layers (solvers, backward
    modes, a layer's own ``callback``, suspended in training within the block) are restored on
    exit, also after an exception.

    Args:
        model: any module; its :class:`~contdeq.DEQ` layers (all variants) are switched.
        max_steps: largest step (or pseudo-time) at which a solve is stopped (``>= 1``).
        solver: the solver stopped early: ``"broyden"`` (default, the original's),
            ``"anderson"``, ``"picard"``, ``"ode"``, or ``None`` for each layer's own solver
            (with all its options; a named solver keeps only the layer's ``atol``, ``rtol``,
            ``max_steps`` and ``timeout``).
        f_step: take one plain step ``z <- f(z, x)`` before the damped ones (default True).
        unrolled_steps: damped steps taken with autograd (``>= 0``; ``f_step`` or at least one
            damped step is needed for a gradient).
        damping: weight of ``f`` in each damped step, in ``(0, 1]``.
        generator: random generator of the draws (default torch's global one).

    Yields:
        ``model``. Shapes are unchanged: ``x`` ``(B, ...)`` -> ``z`` ``(B, *state_shape)``.
    """
    _check_model(model)
    max_steps = int(check_number(max_steps, "max_steps", 1, integer=True))
    if solver is not None:
        check_choice(solver, "solver", _RIS_SOLVERS)
    if not isinstance(f_step, bool):
        raise TypeError(f"f_step must be a bool, got {type(f_step).__name__}")
    unrolled_steps = int(check_number(unrolled_steps, "unrolled_steps", 0, integer=True))
    if unrolled_steps == 0 and not f_step:
        raise ValueError("unrolled_steps must be >= 1 when f_step=False (no step would carry "
                         "a gradient), got 0")
    damping = float(check_number(damping, "damping", 0, strict=True, finite=True))
    if damping > 1:
        raise ValueError(f"damping must be a float in (0, 1], got {damping!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")

    def regulated(base: ForwardSolver) -> ForwardSolver:
        return _RandomIntermediateSolver(base, solver, max_steps, f_step, unrolled_steps,
                                         damping, generator)

    with _installed(model, lambda layer: _RandomIntermediateStates(regulated)):
        yield model


class _RandomIntermediateStates(Modifier):
    """Dynamics modifier of :func:`random_intermediate_states`: in training, the solve stopped
    at a random step and the steps after it unrolled (``regulated(base)``, backward
    ``Unrolled()``); evaluation unchanged."""

    def __init__(self, regulated: Callable[[ForwardSolver], ForwardSolver]) -> None:
        self.regulated = regulated

    def solver(self, base: ForwardSolver, training: bool) -> ForwardSolver:
        return self.regulated(base) if training else base

    def backward(self, base: BackwardMode, training: bool) -> BackwardMode:
        return Unrolled() if training else base


def _entropy(logits: Tensor) -> Tensor:
    """``(B, C)`` logits -> ``(B,)`` entropy of the softmax."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


class _RawInput:
    """The input of ``encoder``'s last call (a forward hook), and ``encoder`` itself."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.value: Tensor | None = None
        self.paused = False

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.paused and args and isinstance(args[0], Tensor):
            self.value = args[0].detach()

    def encode(self, raw: Tensor) -> Tensor:
        """``encoder(raw)`` without recording ``raw`` as the model's input."""
        self.paused = True
        try:
            return self.encoder(raw)
        finally:
            self.paused = False


class _EntropyReducingSolver(ForwardSolver):
    """``base``'s solve, with the input moved to lower the entropy of ``head(f(z, x))`` after
    every ``every`` accepted steps, at most ``rounds`` times (``None``: through the whole
    solve). The moved input is the layer's, or with ``raw`` the model's raw input (the layer
    then continues on ``encoder(raw input)``)."""

    def __init__(self, base: ForwardSolver, head: Callable[[Tensor], Tensor], every: int,
                 steps: int, step_size: float, eps: float, norm: str, rounds: int | None,
                 raw: _RawInput | None, clamp: tuple[float, float] | None) -> None:
        super().__init__(base.solver, on_nonconvergence=base.on_nonconvergence,
                         **{k: v for k, v in base.options.items() if k != "callback"})
        self.base = base
        self.head, self.every, self.steps, self.step_size = head, every, steps, step_size
        self.eps, self.norm, self.rounds, self.raw, self.clamp = eps, norm, rounds, raw, clamp

    def _start(self, layer_x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The moved input's start and the map from it to the layer's input."""
        if self.raw is None:
            return layer_x, lambda v: v
        raw = self.raw.value
        if raw is None:
            raise RuntimeError("entropy_reduction(encoder=...): the encoder was not called "
                               "before the equilibrium layer; pass the module that computes "
                               "the layer's input from the model's input")
        encoded = self.raw.encode(raw)
        if not isinstance(encoded, Tensor) or encoded.shape != layer_x.shape:
            got = tuple(encoded.shape) if isinstance(encoded, Tensor) else type(encoded).__name__
            raise ValueError(f"entropy_reduction(encoder=...): encoder(model input) has shape "
                             f"{got}, but the layer's input has {tuple(layer_x.shape)}; pass the "
                             f"module that computes the layer's input")
        return raw, self.raw.encode

    def __call__(self, fx: Callable[[Tensor], Tensor], z0: Tensor) -> tuple[Tensor, SolverStats]:
        # The layer's LayerInput (f bound to x): evaluate calls f under the forward's autocast.
        f = fx.evaluate  # type: ignore[attr-defined]
        origin, to_layer = self._start(fx.x)  # type: ignore[attr-defined]
        moved = [origin]
        accepted = [0]
        extra = [0]

        def reduce_entropy(info: StepInfo) -> Restart | None:
            accepted[0] += 1
            if accepted[0] % self.every or (
                    self.rounds is not None and accepted[0] > self.every * self.rounds):
                return None
            v = moved[0]
            z = info.z.detach()
            for _ in range(self.steps):
                with torch.enable_grad():
                    vg = v.detach().requires_grad_(True)
                    value = _entropy(self.head(f(z, to_layer(vg)))).sum()
                    (grad,) = torch.autograd.grad(value, vg)
                extra[0] += 1
                v = origin + _project(v - _ascent_step(grad, self.step_size, self.norm) - origin,
                                      self.eps, self.norm)
                if self.clamp is not None:
                    v = v.clamp(*self.clamp)
            moved[0] = v
            with torch.no_grad():
                return Restart(x=to_layer(v).to(fx.x.dtype))  # type: ignore[attr-defined]

        defended = _same_field(self.base, ForwardSolver(
            self.solver, on_nonconvergence=self.on_nonconvergence,
            **{**self.options, "callback": reduce_entropy}))
        z, stats = defended(fx, z0)
        stats.nfe += extra[0]
        return z, stats


#: ``clamp`` default of :func:`entropy_reduction`: ``(0, 1)`` on a raw input, none otherwise.
AUTO = "auto"


@contextmanager
def entropy_reduction(
    model: nn.Module,
    head: nn.Module,
    *,
    encoder: nn.Module | None = None,
    every: int = 2,
    steps: int = 10,
    step_size: float = 2 / 255,
    eps: float = 8 / 255,
    norm: str = "linf",
    rounds: int | None = 4,
    clamp: tuple[float, float] | str | None = AUTO,
) -> Iterator[nn.Module]:
    """Within the block, the equilibrium layer of ``model`` in eval mode moves the input along
    the solve to make the prediction more confident (Yang et al. 2023, "input entropy
    reduction", an inference-time defence).

    After every ``every`` accepted solver steps (fixed-point iterations), at most ``rounds``
    times (``None``: through the whole solve), ``steps`` signed-gradient (``"linf"``) or
    normalised-gradient (``"l2"``) steps of length ``step_size`` lower the entropy of
    ``head(f(z_k, x))`` (the prediction one step ahead of the current state ``z_k``;
    ``head(z_k)`` itself does not depend on the input), keeping the moved input within ``eps``
    of the given one in ``norm`` (and inside ``clamp``); the solve then continues on the
    changed input (a step callback's ``Restart(x=...)``: the state is kept, the solver's
    history restarts, where the original code updates Broyden's factors instead) and converges
    on the last one. With ``encoder`` (the module computing the layer's input from the model's
    input, e.g. ``model[0]``) the moved input is the model's *raw* input, as in the original
    code, and every step passes through the encoder; without it, the layer's input (feature
    space when an encoder comes first). Defaults are the original code's
    (minicheshire/DEQ-Regulating-Neural-Dynamics): 10 signed steps of 2/255 within 8/255 after
    every 2 solver steps, images clamped to ``[0, 1]``, 4 rounds (its solve is 8 Broyden steps
    in all, ``F_THRES: 8``, so the rounds span it; contdeq then lets the solve converge on the
    last input, where the original stops at step 8).

    Cost per round: ``steps`` evaluations of ``f`` and ``head`` (and ``encoder``) with one
    vector-Jacobian product each, plus one evaluation of ``f`` for the restart; the ``f``
    evaluations are counted in ``layer.stats.forward.nfe``. The gradient of the defended model
    (an adaptive attack's) is the implicit gradient at the final state and the final layer
    input, passed straight through the input changes to the given input (they are not
    differentiated); evaluate the defence also with a transfer attack (crafted on the
    undefended model: :func:`robust_accuracy`'s ``defence=``) and a gradient-free one.

    Args:
        model: a module with exactly one :class:`~contdeq.DEQ` layer (any variant).
        head: the modules mapping the layer's state ``(B, *state_shape)`` (a multi-scale
            layer's tuple of states) to logits ``(B, C)``.
        encoder: the module whose output is the layer's input, called once per model call
            before the layer (``None``: move the layer's input).
        every: accepted solver steps between rounds (``>= 1``).
        steps: gradient steps per round (``>= 1``).
        step_size: length of each step (``> 0``).
        eps: radius of the ball around the given input (``>= 0``).
        norm: ``"linf"`` or ``"l2"``.
        rounds: most rounds per solve (``>= 1``, default 4), or ``None``: every ``every``
            steps until the solve ends (an input whose entropy gradient keeps changing sign
            then keeps moving, and the solve may end unconverged, which is reported).
        clamp: valid range ``(low, high)`` of the moved input, ``None``, or ``"auto"``
            (default): ``(0, 1)`` with ``encoder`` (raw images), ``None`` without.

    Yields:
        ``model``. Training mode and the layer's configuration are restored on exit.
    """
    _check_model(model)
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module mapping the layer's state to logits, got "
                        f"{type(head).__name__}")
    if encoder is not None and not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be None or the nn.Module computing the layer's input, "
                        f"got {type(encoder).__name__}")
    every = int(check_number(every, "every", 1, integer=True))
    steps = int(check_number(steps, "steps", 1, integer=True))
    step_size = float(check_number(step_size, "step_size", 0, strict=True, finite=True))
    eps = float(check_number(eps, "eps", 0, finite=True))
    check_choice(norm, "norm", NORMS)
    if rounds is not None:
        rounds = int(check_number(rounds, "rounds", 1, integer=True))
    if isinstance(clamp, str):
        if clamp != AUTO:
            raise ValueError(f"clamp must be (low, high), None or {AUTO!r}, got {clamp!r}")
        bounds = (0.0, 1.0) if encoder is not None else None
    else:
        bounds = _check_clamp(clamp)
    layers = list(_equilibrium_layers(model))
    if len(layers) != 1:
        raise ValueError(f"entropy_reduction needs a model with exactly one equilibrium layer "
                         f"(head maps its state to logits), found {len(layers)}")
    raw = None if encoder is None else _RawInput(encoder)

    def defence(layer: DEQ) -> _EntropyReduction:
        return _EntropyReduction(lambda solver: _EntropyReducingSolver(
            solver, lambda flat: head(layer.structure.unpack(flat)), every, steps, step_size,
            eps, norm, rounds, raw, bounds))

    hook = None if raw is None else raw.encoder.register_forward_pre_hook(raw.record)
    try:
        with _installed(model, defence):
            yield model
    finally:
        if hook is not None:
            hook.remove()


class _EntropyReduction(Modifier):
    """Dynamics modifier of :func:`entropy_reduction`: in evaluation, the solve moves the
    input to lower the prediction's entropy (``defended(base)``); training unchanged."""

    def __init__(self, defended: Callable[[ForwardSolver], ForwardSolver]) -> None:
        self.defended = defended

    def solver(self, base: ForwardSolver, training: bool) -> ForwardSolver:
        return base if training else self.defended(base)
