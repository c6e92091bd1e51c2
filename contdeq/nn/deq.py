"""Equilibrium layers: :class:`DEQ`, :class:`SkipDEQ`, :class:`SkipRegDEQ`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._warnings import warn
from ..implicit import (
    BackwardConfig,
    BackwardMode,
    ForwardSolver,
    equilibrium,
    first_call,
)
from ..regularizers import SKIP_NORMS, jacobian_frobenius, skip_loss
from ..solvers import ConvergenceWarning, SolverStats
from ..solvers.validation import as_shape, is_vmapped
from .checks import check_number
from .normalization import fixed_normalization, update_normalization, warn_unstable_normalization
from .per_thread import PerThreadResults

#: Forward solves in a row that stop unconverged before a layer hints at what to change.
HINT_AFTER = 3

__all__ = ["DEQ", "SkipDEQ", "SkipRegDEQ", "check_input", "resolve_state_shape", "zeros_or_state"]


def check_input(x: object, name: str = "x") -> Tensor:
    """``x`` is a finite floating-point tensor with a batch dimension first."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension first, got shape "
                         f"{tuple(x.shape)}")
    if not is_vmapped(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def resolve_state_shape(state_shape: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """Normalise a per-sample state shape argument (``None``: inferred at the first call)."""
    if state_shape is None:
        return None
    shape = as_shape(state_shape)
    if shape is None:
        raise ValueError(f"state_shape must be a positive int or a tuple of them, got "
                         f"{state_shape!r}")
    return shape


def check_state(z0: object, x: Tensor, shape: tuple[int, ...] | None, name: str) -> Tensor:
    """``z0`` is a ``(B, *shape)`` tensor with ``x``'s batch size, dtype and device."""
    if not isinstance(z0, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z0).__name__}")
    if z0.ndim == 0 or z0.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have x's batch size {x.shape[0]} first, got shape "
                         f"{tuple(z0.shape)}")
    if shape is not None and tuple(z0.shape[1:]) != shape:
        raise ValueError(f"{name} must have shape (B, *state_shape) = "
                         f"{(x.shape[0], *shape)}, got {tuple(z0.shape)}")
    if z0.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {z0.dtype}: convert it "
                        f"with .to(x.dtype) (or convert x and the module to {z0.dtype})")
    if z0.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {z0.device}: move it "
                         f"with .to(x.device)")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return z0



def zeros_or_state(x: Tensor, z0: object, shape: tuple[int, ...] | None) -> Tensor:
    """The initial state of a layer: ``z0`` checked against ``x`` (:func:`check_state`), or
    zeros ``(B, *shape)`` with ``x``'s dtype and device (``shape`` default: ``x``'s per-sample
    shape)."""
    if z0 is not None:
        return check_state(z0, x, shape, "z0")
    return x.new_zeros((x.shape[0], *(shape if shape is not None else x.shape[1:])))

class DEQ(PerThreadResults):
    """Deep equilibrium layer: returns ``z*`` with ``z* = f(z*, x)``.

    With ``solver="ode"`` (default) this is a *continuous* DEQ: ``z*`` is the steady state of
    ``dz/dt = f(z, x) - z`` (Pal, Edelman & Rackauckas 2022). Gradients come from the implicit
    function theorem (:mod:`contdeq.implicit`), so memory does not grow with solver steps.

    Args:
        f: ``nn.Module`` called as ``f(z, x)``, returning a tensor shaped like ``z``. It must be
            deterministic between calls (no dropout resampling, no batch-norm statistics
            updates); use :func:`contdeq.spectral_norm_cap` to keep it contractive.
        solver: ``"ode"`` or a fixed-point method: ``"anderson"``, ``"broyden"``, ``"picard"``,
            ``"newton"`` (Newton-Krylov).
        backward: how gradients are computed: a backward mode object,
            :class:`~contdeq.Implicit` (``Implicit("broyden", tol=1e-6)``),
            :class:`~contdeq.JFB` or :class:`~contdeq.Unrolled`, or the name of a registered
            mode as a shorthand: ``"implicit"`` (default), ``"jfb"`` or ``"unrolled"``.
        state_shape: per-sample shape of ``z`` (without the batch dimension). Default: the
            shape of ``x`` (as DeepEquilibriumNetworks.jl, whose default guess is
            ``zero(x)``); the initial state is zeros of shape ``(B, *state_shape)`` with
            ``x``'s dtype and device.
        backward_method: shorthand for ``Implicit(method=...)``: ``"anderson"`` (default),
            ``"picard"``, ``"broyden"``, ``"newton"``, ``"ode"`` or ``"gmres"`` (fewest VJPs
            near the edge of contraction). The four ``backward_*`` keywords apply
            to ``backward="implicit"`` (other names ignore them); with a backward mode object
            they raise ``TypeError`` (set them on the object).
        backward_tol: ``Implicit(tol=...)``, relative, scale-invariant tolerance of the
            backward linear solve (default ``1e-4``).
        backward_max_steps: ``Implicit(max_steps=...)``, iteration cap of the backward linear
            solve (default 100).
        backward_options: ``Implicit(options=...)``, extra options of the backward solver
            (e.g. ``{"memory": 8}``).
        on_nonconvergence: ``"ignore"``, ``"warn"`` (default) or ``"raise"``, forward and
            backward (a backward mode object's own ``on_nonconvergence``, when set, wins).
        eval_options: solver options overriding ``solver_options`` in eval mode (e.g. looser
            ``atol``/``rtol`` for inference).
        jacobian_weight: weight of the Jacobian regularizer (0 = off, the default).
        jacobian_probes: Hutchinson probes of the Jacobian regularizer.
        **solver_options: options of the forward solver: for ``"ode"`` those of
            :func:`contdeq.solvers.steady_state` (``method``, default ``"ptc"`` for the
            layers, measured in ``docs/performance.md``; ``atol``, ``rtol``,
            ``max_steps``, ...), otherwise of :func:`contdeq.solvers.fixed_point`; among
            them ``callback``, a per-step callback that also sees and may change the layer's
            input (:mod:`contdeq.solvers.callback`; ``eval_options`` may set another one).

    Attributes:
        stats: :class:`~contdeq.implicit.DEQStats` of the last call made in the calling
            thread (``None`` before); ``stats.backward`` is filled in when the backward pass
            runs. Per thread, as the auxiliary terms: see ``docs/reliability.md``.
        backward_mode: the backward mode object in use (the shorthands resolved).

    Shapes: ``x`` ``(B, ...)`` -> ``z*`` ``(B, *state_shape)``.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: str = "ode",
        backward: str | BackwardMode = "implicit",
        state_shape: int | Sequence[int] | None = None,
        backward_method: str | None = None,
        backward_tol: float | None = None,
        backward_max_steps: int | None = None,
        backward_options: Mapping[str, Any] | None = None,
        on_nonconvergence: str = "warn",
        eval_options: Mapping[str, Any] | None = None,
        jacobian_weight: float = 0.0,
        jacobian_probes: int = 1,
        **solver_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"f must be an nn.Module called as f(z, x), got {type(f).__name__}")
        self.f = f
        if solver == "ode":  # the measured default (docs/performance.md)
            solver_options.setdefault("method", "ptc")
        self.solver = ForwardSolver(solver, on_nonconvergence=on_nonconvergence, **solver_options)
        self.eval_solver = (
            self.solver.with_options(**eval_options) if eval_options else self.solver
        )
        self.backward_mode = BackwardConfig(
            backward, backward_method, backward_tol, backward_max_steps, backward_options,
            on_nonconvergence,
        )
        if self.backward_mode.differentiates_solver and not self.solver.differentiable:
            raise ValueError(
                f"backward={self.backward_mode!r} (unrolled through the solver's steps) needs "
                f"solver='ode' or 'picard'; solver={solver!r} is not autograd-safe"
            )
        self.state_shape = resolve_state_shape(state_shape)
        #: (z0, x) per-sample shape pairs a given z0 was found to fit (:meth:`_given_state`).
        self._fitting_shapes: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        self.jacobian_weight = float(check_number(jacobian_weight, "jacobian_weight", 0))
        self.jacobian_probes = int(check_number(jacobian_probes, "jacobian_probes", 1,
                                                integer=True))
        warn_unstable_normalization(f, type(self).__name__)

    # -- initial state -------------------------------------------------------------------
    def _zeros(self, x: Tensor) -> Tensor:
        return zeros_or_state(x, None, self.state_shape)

    def initial_state(self, x: Tensor, z0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(z0 for the solver, explicit guess with its graph or None)``."""
        if z0 is not None:
            return self._given_state(z0, x), None
        return self._zeros(x), None

    def _given_state(self, z0: object, x: Tensor) -> Tensor:
        """A ``z0`` passed to :meth:`forward`, checked up front against ``x`` and the state
        shape: ``state_shape`` when set; otherwise, where ``z0`` is not shaped like ``x`` (the
        default state), one call ``f(z0, x)`` must accept it and return its shape (checked
        once per pair of shapes), so a mis-shaped ``z0`` is named here rather than inside
        the solve."""
        z0 = check_state(z0, x, self.state_shape, "z0")
        key = (tuple(z0.shape[1:]), tuple(x.shape[1:]))
        if self.state_shape is not None or key[0] == key[1] or key in self._fitting_shapes:
            return z0
        expected = (x.shape[0], *x.shape[1:])
        fix = (f"pass z0 of shape {expected} (the default state is shaped like x), or set "
               f"state_shape=... on the layer if f's state has another shape")
        try:
            with torch.no_grad():
                out = self.f(z0, x)
        except RuntimeError as exc:
            raise ValueError(f"z0 has shape {tuple(z0.shape)}, which f(z, x) does not accept "
                             f"with x of shape {tuple(x.shape)}: {fix}. The error was: "
                             f"{exc}") from exc
        if not isinstance(out, Tensor) or out.shape != z0.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"z0 has shape {tuple(z0.shape)} but f(z0, x) returns {got}: "
                             f"{fix}")
        self._fitting_shapes.add(key)
        return z0

    # -- forward -------------------------------------------------------------------------
    # Under a whole-model ``torch.compile(model)`` the layer is one graph break: the solver
    # loop's data-dependent stopping and host-side checks stay out of the traced graphs (no
    # recompiles), the modules around the layer are compiled, and ``compile=True`` compiles
    # the solver's steps themselves (see contdeq.solvers.compiled).
    @torch.compiler.disable
    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        """``x`` ``(B, ...)`` -> ``z*`` ``(B, *state_shape)``; ``z0`` optional initial state."""
        x = check_input(x)
        train = self.training and torch.is_grad_enabled()
        if self.training:
            update_normalization(self.f)
        solver = self.solver if self.training else self.eval_solver
        aux: dict[str, Tensor] = {}
        self._aux = aux
        with fixed_normalization(self.f):
            with torch.set_grad_enabled(train):
                z_init, guess = self.initial_state(x, z0)
            z, stats = equilibrium(self.f, x, z_init.detach(), solver=solver,
                                   backward=self.backward_mode)
            if train:
                if guess is not None:
                    term = self._skip_term(guess, z)
                    if term is not None:
                        aux["skip"] = term
                if self.jacobian_weight > 0:
                    aux["jacobian"] = self.jacobian_weight * jacobian_frobenius(
                        self.f, z, x, probes=self.jacobian_probes)
        self.stats = stats
        self._hint_if_failing(stats.forward, solver)
        return z

    def _hint_if_failing(self, forward: SolverStats, solver: ForwardSolver) -> None:
        """After :data:`HINT_AFTER` forward solves in a row that stopped unconverged (each
        already warned about), say once per layer what usually helps."""
        if forward.all_converged or solver.on_nonconvergence != "warn":
            self._failed_solves = 0
            return
        self._failed_solves = getattr(self, "_failed_solves", 0) + 1
        if self._failed_solves < HINT_AFTER or getattr(self, "_hinted", False):
            return
        self._hinted = True
        options = solver.options
        if solver.solver == "ode":
            method = options["method"]
            other = ("method='ptc' (one f call per step, steps aimed at the steady state)"
                     if method != "ptc" else "solver='anderson'")
            limit = options.get("max_steps", 1000)
        else:
            other = ("solver='ode', method='ptc'" if solver.solver != "picard"
                     else "solver='anderson'")
            limit = options.get("max_steps", 100)
        warn(
            f"{type(self).__name__}: {self._failed_solves} forward solves in a row stopped "
            f"unconverged (last: {forward.summary()}). What usually helps: keep f contractive "
            f"(contdeq.spectral_norm_cap(module, cap=...) on the layers acting on z, a cap "
            f"below 1, lower, e.g. 0.5, where a LayerNorm/GroupNorm follows them, as it "
            f"amplifies small inputs); another "
            f"method, {other}; a larger max_steps (now {limit}); or looser atol/rtol for the "
            f"forward solve. This hint is shown once per layer.",
            ConvergenceWarning,
        )

    def _skip_term(self, guess: Tensor, z: Tensor) -> Tensor | None:
        return None

    # -- auxiliary losses ----------------------------------------------------------------
    @property
    def aux_terms(self) -> dict[str, Tensor]:
        """Auxiliary loss terms of this thread's last training forward, by name (weights
        applied)."""
        return dict(self._aux)

    def last_aux_loss(self) -> Tensor | None:
        """Sum of :attr:`aux_terms` (``None`` when empty); collected by ``contdeq.aux_loss``."""
        terms = list(self._aux.values())
        if not terms:
            return None
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    # -- housekeeping --------------------------------------------------------------------
    def extra_repr(self) -> str:
        parts = [f"solver={self.solver.solver!r}"]
        parts += [f"{k}={v!r}" for k, v in self.solver.options.items()]
        parts.append(f"backward={self.backward_mode!r}")
        if self.state_shape is not None:
            parts.append(f"state_shape={self.state_shape}")
        if self.eval_solver is not self.solver:
            parts.append(f"eval_options={self.eval_solver.options!r}")
        if self.jacobian_weight:
            parts.append(f"jacobian_weight={self.jacobian_weight:g}, "
                         f"jacobian_probes={self.jacobian_probes}")
        return ", ".join(parts)


class _SkipBase(DEQ):
    """Shared skip-loss options of :class:`SkipDEQ` and :class:`SkipRegDEQ`."""

    def __init__(self, f: nn.Module, *, skip_weight: float = 1.0, skip_norm: str = "l2",
                 skip_detach: bool = True, **kwargs: Any) -> None:
        super().__init__(f, **kwargs)
        check_number(skip_weight, "skip_weight", 0)
        if skip_norm not in SKIP_NORMS:
            raise ValueError(f"skip_norm must be one of {SKIP_NORMS}, got {skip_norm!r}")
        if not isinstance(skip_detach, bool):
            raise TypeError(f"skip_detach must be a bool, got {type(skip_detach).__name__}")
        self.skip_weight = float(skip_weight)
        self.skip_norm = skip_norm
        self.skip_detach = skip_detach

    def _skip_term(self, guess: Tensor, z: Tensor) -> Tensor | None:
        if self.skip_weight == 0:
            return None
        return self.skip_weight * skip_loss(guess, z, self.skip_norm, self.skip_detach)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, skip_weight={self.skip_weight:g}, " \
               f"skip_norm={self.skip_norm!r}, skip_detach={self.skip_detach}"


class SkipDEQ(_SkipBase):
    """DEQ whose initial state is an explicit prediction: ``z0 = predictor(x)``.

    Training adds ``skip_weight * mean((predictor(x) - sg(z*))^2)`` (``skip_norm="l2"``) or
    ``skip_weight * mean(|predictor(x) - sg(z*)|)`` (``"l1"``) to :func:`contdeq.aux_loss`;
    ``sg`` is stop-gradient, so the term trains the predictor (and, through ``predictor(x)``,
    whatever computes ``x``, e.g. an encoder before the layer), and ``z*`` (independent of
    ``z0`` at convergence) gets no gradient from it: ``f`` is not trained by the term.
    ``skip_detach=False`` lets the gradient reach ``z*`` too, as in Pal et al. (2022) /
    DeepEquilibriumNetworks.jl (which use ``skip_norm="l1"`` and ``skip_weight`` 5 on MNIST):
    ``f`` is then also pulled toward equilibria the predictor reaches, which cuts solver steps
    at some cost in accuracy. See ``docs/layers.md`` for the sources.

    Args:
        f: as for :class:`DEQ`.
        predictor: ``nn.Module``, ``x -> (B, *state_shape)``; defines the state shape when
            ``state_shape`` is not given.
        skip_weight: the weight ``lambda`` of the skip term (default 1).
        skip_norm: ``"l2"`` (default) or ``"l1"``.
        skip_detach: stop the skip term's gradient at ``z*`` (default ``True``).
        **kwargs: the options of :class:`DEQ`.

    Shapes: ``x`` ``(B, ...)`` -> ``z*`` shaped like ``predictor(x)``.
    """

    def __init__(self, f: nn.Module, predictor: nn.Module, *, skip_weight: float = 1.0,
                 skip_norm: str = "l2", skip_detach: bool = True, **kwargs: Any) -> None:
        super().__init__(f, skip_weight=skip_weight, skip_norm=skip_norm,
                         skip_detach=skip_detach, **kwargs)
        if not isinstance(predictor, nn.Module):
            raise TypeError(f"predictor must be an nn.Module called as predictor(x), got "
                            f"{type(predictor).__name__}")
        self.predictor = predictor

    def initial_state(self, x: Tensor, z0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``z0 = predictor(x)`` (a given ``z0`` takes precedence and adds no skip term)."""
        if z0 is not None:
            return self._given_state(z0, x), None
        guess = self.predictor(x)
        if not isinstance(guess, Tensor):
            raise TypeError(f"predictor must return a torch.Tensor, got {type(guess).__name__}")
        if guess.ndim == 0 or guess.shape[0] != x.shape[0] or (
            self.state_shape is not None and tuple(guess.shape[1:]) != self.state_shape
        ):
            expected = ("(B, ...) with B = " + str(x.shape[0]) if self.state_shape is None
                        else str((x.shape[0], *self.state_shape)))
            raise ValueError(f"predictor(x) must return the state's shape {expected}, got "
                             f"{tuple(guess.shape)}")
        if guess.dtype != x.dtype:
            raise TypeError(f"predictor(x) must return x's dtype {x.dtype}, got {guess.dtype}")
        if not bool(torch.isfinite(guess).all()):
            raise ValueError("predictor(x) returned NaN or Inf values")
        return guess, guess if guess.requires_grad else None


class SkipRegDEQ(_SkipBase):
    """DEQ with the Skip-Reg initial state ``z0 = f(0, x)``: no extra network.

    Training adds ``skip_weight * mean((f(0, x) - sg(z*))^2)`` (or the ``"l1"`` mean absolute
    difference) to :func:`contdeq.aux_loss`; it trains ``f`` so that one application from zero
    already lands near the equilibrium (``skip_detach=False``: and the equilibrium near that
    first application, as in :class:`SkipDEQ`). DeepEquilibriumNetworks.jl builds this layer as
    ``DEQ(model, solver; init=nothing)``, whose initial condition is ``model((zero(x), x))``.

    Args:
        f: as for :class:`DEQ`.
        skip_weight: the weight ``lambda`` (default 1).
        skip_norm: ``"l2"`` (default) or ``"l1"``.
        skip_detach: stop the skip term's gradient at ``z*`` (default ``True``).
        **kwargs: the options of :class:`DEQ` (``state_shape`` sets the shape of the zero
            state passed to ``f``; default ``x``'s shape).

    Shapes: ``x`` ``(B, ...)`` -> ``z*`` ``(B, *state_shape)``.
    """

    def initial_state(self, x: Tensor, z0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``z0 = f(0, x)`` (a given ``z0`` takes precedence and adds no skip term)."""
        if z0 is not None:
            return self._given_state(z0, x), None
        guess = first_call(self.f, self._zeros(x), x)
        return guess, guess if guess.requires_grad else None
