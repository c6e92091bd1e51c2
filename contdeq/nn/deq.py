"""The equilibrium layer :class:`DEQ`, composed of small objects, with its default parts.

A layer is the cell ``f``, a forward solver (:class:`~contdeq.implicit.ForwardSolver`), a
backward mode (:class:`~contdeq.Implicit`, :class:`~contdeq.JFB`, ...), an initial-state
policy (:mod:`contdeq.nn.init`), a state structure (:mod:`contdeq.nn.structure`: one tensor or
one per scale) and dynamics modifiers (:mod:`contdeq.nn.modifiers`). The named layers
(``SkipDEQ``, ``MultiScaleDEQ``, ``LyapunovDEQ``, ...) only choose these objects.

The defaults a plain ``DEQ(f)(x)`` runs with live here, so its forward needs no other module
of the package's layers: the policy :class:`Zeros` (with the base :class:`InitialState` and
the registry :data:`INITIAL_STATES`, which ``init.py`` fills with the other policies), the
structure :class:`Single`, and :class:`PerThreadResults`, the base of every layer (``stats``
and auxiliary terms kept per thread).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .._warnings import warn
from ..implicit import BackwardMode, DEQStats, ForwardSolver, backward_mode, equilibrium
from ..implicit.diagnostics import from_autocast
from ..regularizers import jacobian_frobenius
from ..solvers import ConvergenceWarning, Registry, SolverStats
from ..solvers.validation import all_finite, check_positive_float, is_vmapped
from .checks import check_module, check_number
from .modifiers import Modifier, check_modifiers
from .names import renamed
from .normalization import fixed_normalization, update_normalization, warn_unstable_normalization
from .structure import Structure, check_state, resolve_state_shape

#: Forward solves in a row that stop unconverged before a layer hints at what to change.
HINT_AFTER = 3

__all__ = ["DEQ", "INITIAL_STATES", "InitialState", "PerThreadResults", "Single", "Zeros",
           "check_input", "check_layer_input", "check_state", "resolve_init",
           "resolve_state_shape", "zeros_or_state"]


def check_input(x: object, name: str = "x") -> Tensor:
    """``x`` is a finite floating-point tensor with a batch dimension first."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension first, got shape "
                         f"{tuple(x.shape)}")
    if not is_vmapped(x) and not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def check_layer_input(x: object, layer: str) -> Tensor:
    """:func:`check_input` of a layer's ``x`` ``(B, ...)``; a 1-D ``x`` (also the per-call
    ``x`` seen under ``torch.func.vmap``) warns ``DeprecationWarning`` at the user's line: it
    is read as ``B`` samples of one number, and a future release reads it as one unbatched
    sample (torch's convention). ``layer``: the layer's class name, for the message."""
    x = check_input(x)
    if x.ndim == 1:
        n = x.shape[0]
        warn(f"a 1-D x of shape ({n},) passed to {layer} is read as {n} samples of one number "
             f"each; a future release will read it as one unbatched sample, as torch.nn layers "
             f"and contdeq.solvers.steady_state do. Pass x[:, None] ({n} samples of one "
             f"number) or x[None] (one sample) to be explicit.", DeprecationWarning)
    return x


def zeros_or_state(x: Tensor, z0: object, shape: tuple[int, ...] | None) -> Tensor:
    """The initial state of a layer: ``z0`` checked against ``x`` (:func:`check_state`), or
    zeros ``(B, *shape)`` with ``x``'s dtype and device (``shape`` default: ``x``'s per-sample
    shape)."""
    if z0 is not None:
        return check_state(z0, x, shape, "z0")
    return x.new_zeros((x.shape[0], *(shape if shape is not None else x.shape[1:])))


class PerThreadResults(nn.Module):
    """Base of the contdeq layers: :attr:`stats` and the aux terms of the calling thread's
    last call (and, for :class:`DEQ`, the modifiers of the thread's :meth:`DEQ.using`
    blocks). None of them is pickled or deep-copied (a copy starts without them).

    A layer shared by several threads (a model served by a thread pool, Hogwild-style
    training) runs several calls at once; plain attributes would hold whichever call finished
    last, in any thread. The results are kept in a ``threading.local``, so ``layer.stats`` and
    ``contdeq.aux_loss(model)`` read the last call made *in the calling thread*."""

    def __init__(self) -> None:
        super().__init__()
        self._results = threading.local()

    @property
    def stats(self) -> DEQStats | None:
        """Statistics of the last call made in this thread (``None`` before one)."""
        return getattr(self._results, "stats", None)

    @stats.setter
    def stats(self, value: DEQStats | None) -> None:
        self._results.stats = value

    @property
    def _aux(self) -> dict[str, Tensor]:
        """Auxiliary loss terms of this thread's last training call, by name."""
        return getattr(self._results, "aux", {})

    @_aux.setter
    def _aux(self, value: dict[str, Tensor]) -> None:
        self._results.aux = value

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_results", None)  # a threading.local; its tensors hold graphs
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._results = threading.local()


#: Initial-state policies by name: ``DEQ(f, init="zeros")`` is ``DEQ(f, init=Zeros())``.
INITIAL_STATES: Registry[type[InitialState]] = Registry("initial-state policy", "init")


class InitialState:
    """Base of the initial-state policies: ``policy(layer, x) -> (z0, guess or None)``."""

    def modules(self) -> dict[str, nn.Module]:
        """Networks this policy needs, by the attribute name the layer registers them under."""
        return {}

    def __call__(self, layer: DEQ, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x`` ``(B, ...)`` -> ``(z0, guess)``: the flat start ``(B, *layer.state_shape)``
        and the prediction to train by :meth:`skip_term` (with its graph) or ``None``."""
        raise NotImplementedError

    def skip_term(self, guess: Tensor, z: Tensor) -> Tensor | None:
        """The auxiliary loss of a predicted start (``None``: none)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@INITIAL_STATES.register("zeros")
class Zeros(InitialState):
    """``z0 = 0`` of shape ``(B, *state_shape)``, ``x``'s dtype and device (the default)."""

    def __call__(self, layer: DEQ, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return layer.zeros(x), None


def resolve_init(init: InitialState | str | None) -> InitialState:
    """``init`` as a policy object: ``None`` is :class:`Zeros`, a name is looked up in
    :data:`INITIAL_STATES` (its class built with default arguments)."""
    if init is None:
        return Zeros()
    if isinstance(init, str):
        policy: Any = INITIAL_STATES[INITIAL_STATES.check(init)]
        return policy()
    if not isinstance(init, InitialState):
        raise TypeError(f"init must be an initial-state policy (contdeq.nn.init.Zeros(), "
                        f"Predictor(net), FZero(), Input()) or one of their names "
                        f"{tuple(INITIAL_STATES)}, got {type(init).__name__}")
    return init


class Single(Structure):
    """One tensor per sample, ``(B, *state_shape)`` (default ``state_shape``: ``x``'s)."""

    def __init__(self, state_shape: int | Sequence[int] | None = None) -> None:
        self.state_shape = resolve_state_shape(state_shape)

    def pack(self, z0: Any) -> Any:
        return z0

    def unpack(self, z: Tensor) -> Any:
        return z

    def prediction(self, guess: object, x: Tensor) -> Tensor:
        """``predictor(x)`` checked: a finite tensor of the state's shape and ``x``'s dtype
        (under ``torch.autocast`` also the autocast dtype, cast to ``x``'s)."""
        if not isinstance(guess, Tensor):
            raise TypeError(f"predictor must return a torch.Tensor, got {type(guess).__name__}")
        if guess.ndim == 0 or guess.shape[0] != x.shape[0] or (
            self.state_shape is not None and tuple(guess.shape[1:]) != self.state_shape
        ):
            expected = ("(B, ...) with B = " + str(x.shape[0]) if self.state_shape is None
                        else str((x.shape[0], *self.state_shape)))
            raise ValueError(f"predictor(x) must return the state's shape {expected}, got "
                             f"{tuple(guess.shape)}")
        guess = from_autocast(guess, x)
        if guess.dtype != x.dtype:
            raise TypeError(f"predictor(x) must return x's dtype {x.dtype}, got {guess.dtype}")
        if not bool(torch.isfinite(guess).all()):
            raise ValueError("predictor(x) returned NaN or Inf values")
        return guess

    def __repr__(self) -> str:
        return f"Single(state_shape={self.state_shape})"


class DEQ(PerThreadResults):
    """Deep equilibrium layer: returns ``z*`` with ``z* = f(z*, x)``.

    With ``solver="ode"`` (default) this is a *continuous* DEQ: ``z*`` is the steady state of
    ``dz/dt = f(z, x) - z`` (Pal, Edelman & Rackauckas 2022). Gradients come from the implicit
    function theorem (:mod:`contdeq.implicit`), so memory does not grow with solver steps.

    The layer is composed of small objects; the named layers only choose them, and any
    combination that makes sense works without a new class, e.g. a noisy multi-scale Skip DEQ:
    ``DEQ(cell, init=Predictor(net), structure=Scales(shapes), modifiers=(Noise(0.1),))``.

    Args:
        f: ``nn.Module`` called as ``f(z, x)``, returning a tensor shaped like ``z`` (with
            ``structure=Scales(...)``: ``f(zs, x)`` on tuples). It must be deterministic
            between calls (no dropout resampling, no batch-norm statistics updates); use
            :func:`contdeq.spectral_norm_cap` to keep it contractive.
        init: the initial-state policy (:mod:`contdeq.nn.init`): ``Zeros()`` (default),
            ``Predictor(net)`` (Skip DEQ), ``FZero()`` (Skip-Reg DEQ: ``f(0, x)``), ``Input()``
            (``z0 = x``), or a registered policy's name. A ``z0`` passed to ``forward`` wins.
        structure: the state structure (:mod:`contdeq.nn.structure`): ``Single(state_shape)``
            (default) or ``Scales(state_shapes)`` (multi-scale: tuples in and out).
        modifiers: dynamics modifiers (:mod:`contdeq.nn.modifiers`), applied in order:
            ``Noise(...)``, ``LyapunovProjection(...)``, ...
        solver: ``"ode"`` or a fixed-point method: ``"anderson"``, ``"broyden"``, ``"picard"``,
            ``"newton"`` (Newton-Krylov); or a configured solver object,
            ``ForwardSolver("anderson", atol=1e-6)`` (its options and
            ``on_nonconvergence`` are then its own: no ``**solver_options`` beside it).
        backward: how gradients are computed: a backward mode object,
            :class:`~contdeq.Implicit` (``Implicit("broyden", rtol=1e-6)``),
            :class:`~contdeq.JFB` or :class:`~contdeq.Unrolled`, or the name of a registered
            mode as a shorthand: ``"implicit"`` (default), ``"jfb"`` or ``"unrolled"``.
        state_shape: per-sample shape of ``z`` (without the batch dimension), a shorthand for
            ``structure=Single(state_shape)``. Default: the shape of ``x`` (as
            DeepEquilibriumNetworks.jl, whose default guess is ``zero(x)``).
        backward_method: shorthand for ``Implicit(method=...)``: ``"anderson"`` (default),
            ``"picard"``, ``"broyden"``, ``"newton"``, ``"ode"`` or ``"gmres"`` (fewest VJPs
            near the edge of contraction). The four ``backward_*`` keywords apply
            to ``backward="implicit"`` and ``"implicit_warm"`` (the names without a linear
            solve ignore them); with a backward mode object they raise ``TypeError`` (set them
            on the object).
        backward_rtol: ``Implicit(rtol=...)``, relative, scale-invariant tolerance of the
            backward linear solve (default ``1e-4``). ``backward_tol`` is its deprecated
            spelling.
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
        solver, eval_solver: the forward solvers of training and evaluation, with the
            modifiers' solver wrappers applied.
        init, structure, modifiers: the composition's objects.

    Shapes: ``x`` ``(B, ...)`` -> ``z*`` ``(B, *state_shape)`` (a tuple of per-scale tensors
    with ``Scales``). A layer reads the first dimension of ``x`` as the batch. A 1-D ``x`` of
    shape ``(B,)`` is still read as ``B`` samples of one number each, with a
    ``DeprecationWarning``: a future release will read it as one unbatched sample, as
    ``torch.nn`` layers and :func:`~contdeq.solvers.steady_state` do; pass ``x[:, None]``
    (``B`` samples of one number) or ``x[None]`` (one sample) to be explicit.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        init: InitialState | str | None = None,
        structure: Structure | None = None,
        modifiers: Sequence[Modifier] = (),
        solver: str | ForwardSolver = "ode",
        backward: str | BackwardMode = "implicit",
        state_shape: int | Sequence[int] | None = None,
        backward_method: str | None = None,
        backward_rtol: float | None = None,
        backward_max_steps: int | None = None,
        backward_options: Mapping[str, Any] | None = None,
        on_nonconvergence: str = "warn",
        eval_options: Mapping[str, Any] | None = None,
        jacobian_weight: float = 0.0,
        jacobian_probes: int = 1,
        backward_tol: float | None = None,
        **solver_options: Any,
    ) -> None:
        super().__init__()
        if structure is None:
            structure = Single(state_shape)
        elif not isinstance(structure, Structure):
            raise TypeError(f"structure must be contdeq.nn.Single(state_shape) or "
                            f"contdeq.nn.Scales(state_shapes), got {type(structure).__name__}")
        elif state_shape is not None:
            raise TypeError("pass the state's shape once: state_shape=... or structure=..., "
                            "not both")
        check_module(f, "f", structure.contract)
        self.structure = structure
        self.init = resolve_init(init)
        self.modifiers = check_modifiers(modifiers)
        self.f = structure.cell(f)
        for owner in (self.init, *self.modifiers):
            for name, module in owner.modules().items():
                self.add_module(name, module)
        backward_rtol = renamed(type(self).__name__, "backward_tol", backward_tol,
                                "backward_rtol", backward_rtol)
        if backward_rtol is not None:  # named as the caller spelled it
            spelled = "backward_tol" if backward_tol is not None else "backward_rtol"
            if isinstance(backward, BackwardMode):
                raise TypeError(f"backward={backward!r} is a backward mode object; set its "
                                f"options on the object (Implicit(rtol=...)), not with {spelled}")
            check_positive_float(backward_rtol, spelled)
        if isinstance(solver, ForwardSolver):
            if solver_options:
                raise TypeError(f"solver={solver!r} is a solver object; set its options on the "
                                f"object, not with {sorted(solver_options)}")
            base = solver
        else:
            if solver == "ode":  # the measured default (docs/performance.md)
                solver_options.setdefault("method", "ptc")
            base = ForwardSolver(solver, on_nonconvergence=on_nonconvergence, **solver_options)
        base_eval = base.with_options(**eval_options) if eval_options else base
        self.backward_mode = backward_mode(
            backward, backward_method, backward_rtol, backward_max_steps, backward_options,
            on_nonconvergence,
        )
        if self.backward_mode.differentiates_solver and not base.differentiable:
            raise ValueError(
                f"backward={self.backward_mode!r} (unrolled through the solver's steps) needs "
                f"solver='ode' or 'picard'; solver={base.solver!r} is not autograd-safe"
            )
        self.solver, self.eval_solver = base, base_eval
        self._eval_options = dict(eval_options or {})
        for modifier in self.modifiers:
            modifier.check(self)
            self.solver = modifier.solver(self.solver, True)
            self.eval_solver = modifier.solver(self.eval_solver, False)
        #: (z0, x) per-sample shape pairs a given z0 was found to fit (:meth:`_given_state`).
        self._fitting_shapes: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        self.jacobian_weight = float(check_number(jacobian_weight, "jacobian_weight", 0))
        self.jacobian_probes = int(check_number(jacobian_probes, "jacobian_probes", 1,
                                                integer=True))
        warn_unstable_normalization(self.f, type(self).__name__)

    @property
    def state_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of the flat state the solvers see (``None``: ``x``'s)."""
        return self.structure.state_shape

    # -- initial state -------------------------------------------------------------------
    def zeros(self, x: Tensor) -> Tensor:
        """Zeros ``(B, *state_shape)`` with ``x``'s dtype and device."""
        return zeros_or_state(x, None, self.state_shape)

    def initial_state(self, x: Tensor, z0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(z0 for the solver, explicit guess with its graph or None)``: a given flat ``z0``
        (checked; no guess), else the ``init`` policy's; then moved by the modifiers."""
        if z0 is not None:
            z, guess = self._given_state(z0, x), None
        else:
            z, guess = self.init(self, x)
        for modifier in self.modifiers:
            z = modifier.start(self, x, z)
        return z, guess

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

    # -- modifiers entered for a block ---------------------------------------------------
    @property
    def _entered(self) -> tuple[Modifier, ...]:
        """The modifiers of the blocks (:meth:`using`) the calling thread is inside."""
        return getattr(self._results, "entered", ())

    @_entered.setter
    def _entered(self, value: tuple[Modifier, ...]) -> None:
        self._results.entered = value

    @contextmanager
    def using(self, *modifiers: Modifier) -> Iterator[DEQ]:
        """Within the block, the layer's solves also pass through ``modifiers`` (after its
        own; their solver and backward hooks): how :mod:`contdeq.robust` installs a defence.
        Restored on exit, also after an exception.

        Per thread: the block applies to the calls the entering thread makes, not to another
        thread's concurrent calls on the same layer; a copy or pickle of the layer does not
        carry it.

        Yields:
            the layer.
        """
        entered = check_modifiers(modifiers)
        saved = self._entered
        self._entered = (*saved, *entered)
        try:
            yield self
        finally:
            self._entered = saved

    def solver_and_backward(self) -> tuple[ForwardSolver, BackwardMode]:
        """The forward solver and backward mode of a call in the current mode (training or
        evaluation), with the block's modifiers (:meth:`using`) applied."""
        solver = self.solver if self.training else self.eval_solver
        backward = self.backward_mode
        for modifier in (*self.modifiers, *self._entered):
            backward = modifier.backward(backward, self.training)
        for modifier in self._entered:
            solver = modifier.solver(solver, self.training)
        return solver, backward

    # -- forward -------------------------------------------------------------------------
    # Under a whole-model ``torch.compile(model)`` the layer is one graph break: the solver
    # loop's data-dependent stopping and host-side checks stay out of the traced graphs (no
    # recompiles), the modules around the layer are compiled, and ``compile=True`` compiles
    # the solver's steps themselves (see contdeq.solvers.compiled).
    @torch.compiler.disable
    def forward(self, x: Tensor, z0: Any = None) -> Any:
        """``x`` ``(B, ...)`` -> ``z*`` ``(B, *state_shape)`` (with ``Scales``: a tuple of
        per-scale tensors); ``z0`` an optional initial state (a tuple with ``Scales``)."""
        x = check_layer_input(x, type(self).__name__)
        z0 = self.structure.pack(z0)
        train = self.training and torch.is_grad_enabled()
        if self.training:
            update_normalization(self)  # f's, and a predictor's or V_0's
        solver, backward = self.solver_and_backward()
        aux: dict[str, Tensor] = {}
        self._aux = aux
        with fixed_normalization(self.f):
            with torch.set_grad_enabled(train):
                z_init, guess = self.initial_state(x, z0)
            z, stats = equilibrium(self.f, x, z_init.detach(), solver=solver, backward=backward)
            if train:
                if guess is not None:
                    term = self.init.skip_term(guess, z)
                    if term is not None:
                        aux["skip"] = term
                if self.jacobian_weight > 0:
                    aux["jacobian"] = self.jacobian_weight * jacobian_frobenius(
                        self.f, z, x, probes=self.jacobian_probes)
        self.stats = stats
        self._hint_if_failing(stats.forward, solver)
        return self.structure.unpack(z)
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
            method = options.get("method")  # None: steady_state's default (not ptc)
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
        if type(self) is DEQ and not isinstance(self.structure, Single):
            parts.append(f"structure={self.structure!r}")
        elif self.state_shape is not None:
            parts.append(f"state_shape={self.state_shape}")
        if self._eval_options:
            parts.append(f"eval_options={self.eval_solver.options!r}")
        if type(self.init).__name__ != "Zeros" and type(self) is DEQ:
            parts.append(f"init={self.init!r}")
        if self.modifiers and type(self) is DEQ:
            parts.append(f"modifiers={self.modifiers!r}")
        if self.jacobian_weight:
            parts.append(f"jacobian_weight={self.jacobian_weight:g}, "
                         f"jacobian_probes={self.jacobian_probes}")
        return ", ".join(parts)
