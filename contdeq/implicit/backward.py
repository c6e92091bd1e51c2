"""Backward modes: how an equilibrium layer turns ``v = dL/dz*`` into gradients.

By the implicit function theorem the gradients of ``x`` and of ``f``'s parameters are
``w^T df/d(x, theta)`` at ``z*`` with ``w = (I - J)^-T v``, ``J = df/dz``. A
:class:`BackwardMode` either supplies the weights ``w`` (:meth:`BackwardMode.gradient_weights`:
:class:`Implicit` solves for them, :class:`JFB` takes ``w = v``) or has autograd differentiate
the solver's steps (:class:`Unrolled`). Each mode is registered by name in ``BACKWARD_MODES``,
so a layer's ``backward="name"`` shorthand finds it; a new mode is one class here (or in the
user's code) and one ``@BACKWARD_MODES.register("name")``; :func:`backward_mode` turns the
layers' keyword form into a mode object.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from .._warnings import renamed, warn
from ..solvers import (
    CONTINUOUS,
    FIXED_POINT_METHODS,
    NonFiniteError,
    Registry,
    SolverStats,
    default_tolerance,
    gmres,
    report_nonconvergence,
    sample_rms,
    solve,
    steady_state,
)
from ..solvers.validation import (
    check_on_nonconvergence,
    check_positive_float,
    check_positive_int,
)
from .options import check_solver_options
from .stats import DEQStats

__all__ = [
    "BACKWARD_METHODS",
    "BACKWARD_MODES",
    "JFB",
    "BackwardConfig",
    "BackwardMode",
    "Implicit",
    "Unrolled",
    "backward_mode",
    "solve_adjoint",
]

_Mode = TypeVar("_Mode", bound=type)

#: Backward modes by name: the layers' ``backward="implicit"|"jfb"|"unrolled"`` shorthands.
BACKWARD_MODES: Registry[type[BackwardMode]] = Registry("backward mode", "backward")
#: Methods of the implicit backward's linear solve ``w = J^T w + v``: every fixed-point
#: method and ``"ode"`` (the continuous adjoint).
BACKWARD_METHODS: Registry[Any] = Registry("backward method", "backward_method",
                                           includes=(FIXED_POINT_METHODS,))
BACKWARD_METHODS.register(CONTINUOUS, steady_state)
BACKWARD_METHODS.register("gmres", gmres)
#: In the ``"ode"`` backward the right-hand side is scaled to a largest per-sample RMS of 1 and
#: the steady-state test gets this absolute floor times ``rtol``: the integrator's elementwise
#: error scale ``atol + rtol * |w|`` must not be zero where ``w`` has exact zeros.
_ODE_ATOL_FLOOR = 1e-3


class BackwardMode:
    """The contract of a backward mode (subclass it, frozen dataclasses preferred).

    A mode with ``differentiates_solver = True`` has autograd record the forward solver's
    steps (no implicit-function node). Any other mode implements :meth:`gradient_weights`;
    ``uses_jacobian = False`` tells the backward that it never calls ``vjp`` (the graph of
    ``f(z*, x)`` then does not track ``z``); ``remembers_between_calls = True`` that it keeps
    something from one backward pass for the next (``equilibrium`` warns when such a mode is
    given by name, built anew on every call).
    """

    #: Autograd records the forward solver's steps instead of calling gradient_weights.
    differentiates_solver: ClassVar[bool] = False
    #: gradient_weights calls vjp (products with ``J^T``).
    uses_jacobian: ClassVar[bool] = True
    #: The mode keeps something from one backward pass for the next (a warm start): built
    #: anew for every call, it would never use it.
    remembers_between_calls: ClassVar[bool] = False

    def gradient_weights(self, vjp: Callable[[Tensor], Tensor], v: Tensor,
                         record: DEQStats | None) -> Tensor:
        """The weights ``w`` ``(B, ...)`` (shaped like ``v``) of the final VJP
        ``w^T df/d(x, theta)``.

        Args:
            vjp: ``w -> J^T w`` at ``z*`` on ``(B, ...)`` tensors shaped like ``v``.
            v: ``(B, ...)`` the gradient of the loss with respect to ``z*``.
            record: the layer's stats of this call, where a mode records its solve
                (``record.backward``); ``None`` outside a layer.
        """
        raise TypeError(f"{type(self).__name__} differentiates the solver's steps; it has no "
                        "gradient weights")


def accepts_tol(cls: _Mode) -> _Mode:
    """Let ``cls(...)`` (an :class:`Implicit` dataclass) take ``tol=``, the deprecated spelling
    of ``rtol``: a ``DeprecationWarning`` names ``rtol``; passing both raises ``TypeError``.
    Applied above ``@dataclass``, it keeps the generated ``__init__``'s signature."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, tol: float | None = None, **kwargs: Any) -> None:
        if tol is not None:
            positional = len(args) > 1  # (method, rtol, ...)
            given = args[1] if positional else kwargs.get("rtol")
            rtol = renamed(type(self).__name__, "tol", tol, "rtol", given)
            if positional:
                args = (args[0], rtol, *args[2:])
            else:
                kwargs["rtol"] = rtol
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


@BACKWARD_MODES.register("implicit")
@accepts_tol
@dataclass(frozen=True)
class Implicit(BackwardMode):
    """Implicit-function-theorem gradients: solve ``w = J^T w + v`` (the default mode).

    Args:
        method: the linear solver, a name in ``BACKWARD_METHODS``: ``"anderson"`` (default),
            ``"picard"``, ``"broyden"`` or ``"ode"`` (steady state of ``dw/dt = J^T w + v - w``).
        rtol: relative tolerance of the linear solve. The test is scale-invariant:
            ``rms(J^T w + v - w)_b <= rtol * rms(w_b)`` for each sample ``b`` (``atol = 0``), so
            the tiny right-hand sides of a batch-mean loss do not inflate iterations. Default
            (``None``): ``1e-4``, or ``2 * eps`` of a half-precision gradient or autocast dtype
            (:func:`~contdeq.solvers.validation.default_tolerance`).
        max_steps: iteration cap of the linear solve.
        options: extra options of the linear solver (``memory``, ``damping``, ...; for
            ``"ode"`` the keywords of :func:`~contdeq.solvers.steady_state`, e.g. ``method``).
        on_nonconvergence: ``"ignore"``, ``"warn"`` or ``"raise"``; ``None`` (default): the
            layer's ``on_nonconvergence`` (``"warn"`` outside a layer).
        tol: deprecated spelling of ``rtol`` (keyword only; a ``DeprecationWarning`` names
            ``rtol``; passing both raises ``TypeError``); ``mode.tol`` reads ``rtol``, warning
            likewise.

    A capped solve is a *truncated adjoint* (DeepEquilibriumNetworks.jl caps its adjoint at
    ``max_steps=10``, ``rtol=1e-3``): where the cap stops it, ``layer.stats.backward`` says so
    (``converged`` False, ``stop_reason="max_steps"``) and ``on_nonconvergence`` applies; pass
    ``on_nonconvergence="ignore"`` to train with it on purpose.

    Example: ``DEQ(f, backward=Implicit("broyden", rtol=1e-6))``.
    """

    method: str = "anderson"
    rtol: float | None = None
    max_steps: int = 100
    options: Mapping[str, Any] = field(default_factory=dict)
    on_nonconvergence: str | None = None

    def __post_init__(self) -> None:
        _check_implicit(self.method, self.rtol, self.max_steps, self.options,
                        self.on_nonconvergence, prefix="")
        object.__setattr__(self, "options", dict(self.options))

    @property
    def tol(self) -> float | None:
        """``rtol`` by its deprecated name (a ``DeprecationWarning`` names ``rtol``)."""
        warn(f"{type(self).__name__}.tol is deprecated and will be removed in the next "
             "release: read .rtol (one word per concept: tolerances atol/rtol)",
             DeprecationWarning)
        return self.rtol

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, also a mode pickled before ``tol`` was renamed ``rtol``."""
        if "tol" in state:
            state = {("rtol" if name == "tol" else name): value for name, value in state.items()}
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def gradient_weights(self, vjp: Callable[[Tensor], Tensor], v: Tensor,
                         record: DEQStats | None) -> Tensor:
        """``w`` ``(B, ...)`` solving ``w = J^T w + v`` by :func:`solve_adjoint`; its stats go
        to ``record.backward``, and an unconverged solve warns or raises as configured."""
        return self._solve(vjp, v, record, None)

    def _solve(self, vjp: Callable[[Tensor], Tensor], v: Tensor, record: DEQStats | None,
               w0: Tensor | None) -> Tensor:
        """:meth:`gradient_weights` started from ``w0`` (``(B, ...)`` like ``v``; ``None``:
        from ``v``)."""
        start = time.perf_counter()
        w, stats = solve_adjoint(
            vjp, v, method=self.method, rtol=self.rtol, max_steps=self.max_steps,
            on_nonconvergence="ignore", w0=w0, options=self.options,
        )
        stats.wall_time = time.perf_counter() - start
        if record is not None:
            record.backward = stats
        _report(stats, self.on_nonconvergence or "warn", "backward linear solve")
        return w


@BACKWARD_MODES.register("jfb")
@dataclass(frozen=True)
class JFB(BackwardMode):
    """Jacobian-free backpropagation (Fung et al. 2022): ``w = v``, one VJP of ``f`` at ``z*``;
    no linear solve. An approximate gradient that trains well when ``f`` is contractive."""

    uses_jacobian: ClassVar[bool] = False

    def gradient_weights(self, vjp: Callable[[Tensor], Tensor], v: Tensor,
                         record: DEQStats | None) -> Tensor:
        """``w = v`` (``(B, ...)``)."""
        return v


@BACKWARD_MODES.register("unrolled")
@dataclass(frozen=True)
class Unrolled(BackwardMode):
    """Backpropagation through the forward solver's steps (the solver runs with grad enabled;
    memory grows with the steps): the gradients of ``x`` ``(B, ...)`` and of ``f``'s
    parameters are those of the unrolled computation. Needs an autograd-safe solver
    (``"ode"`` or ``"picard"``). For testing and comparison."""

    differentiates_solver: ClassVar[bool] = True


def _check_implicit(method: object, rtol: object, max_steps: object,
                    options: Mapping[str, Any], on_nonconvergence: object, prefix: str) -> None:
    """Validate :class:`Implicit`'s fields; messages name them with ``prefix`` (the layers'
    keywords are ``backward_method``, ``backward_rtol``, ...)."""
    BACKWARD_METHODS.check(method, f"{prefix}method")
    if rtol is not None:
        check_positive_float(rtol, f"{prefix}rtol")
    check_positive_int(max_steps, f"{prefix}max_steps")
    if on_nonconvergence is not None:
        check_on_nonconvergence(on_nonconvergence)
    if not isinstance(options, Mapping):
        raise TypeError(f"{prefix}options must be a mapping of option names to values, got "
                        f"{type(options).__name__}")
    reserved = {"atol", "rtol", "max_steps", "on_nonconvergence"} & set(options)
    if reserved:
        raise TypeError(
            f"{prefix}options must not set {sorted(reserved)}; use {prefix}rtol / "
            f"{prefix}max_steps / on_nonconvergence"
        )
    check_solver_options(method, options)  # type: ignore[arg-type]


def backward_mode(
    mode: str | BackwardMode = "implicit",
    method: str | None = None,
    rtol: float | None = None,
    max_steps: int | None = None,
    options: Mapping[str, Any] | None = None,
    on_nonconvergence: str | None = None,
) -> BackwardMode:
    """The backward mode object for the layers' keyword form of the backward arguments.

    ``mode`` is a name in ``BACKWARD_MODES`` or a :class:`BackwardMode` object. For a name of
    an :class:`Implicit` mode (``"implicit"``, ``"implicit_warm"``),
    ``method``/``rtol``/``max_steps``/``options`` (the layers' ``backward_method``,
    ``backward_rtol``, ...) fill its fields (unset ones keep its defaults); other names (no
    linear solve: ``"jfb"``, ``"unrolled"``, ``"phantom"``) are constructed with their defaults
    and ignore them.
    ``on_nonconvergence`` fills an ``on_nonconvergence`` field left at ``None``.

    Raises:
        TypeError: ``mode`` is an object and one of the keywords is also given (set it on the
            object), or ``mode`` is neither a name nor a :class:`BackwardMode`.
        ValueError: an unknown name or a bad value (the message names the keyword).
    """
    keywords = {name: value for name, value in (("method", method), ("rtol", rtol),
                                                ("max_steps", max_steps), ("options", options))
                if value is not None}
    if isinstance(mode, BackwardMode):
        if keywords:
            given = ", ".join(f"backward_{name}" for name in keywords)
            raise TypeError(f"backward={mode!r} is a backward mode object; set its options on "
                            f"the object, not with {given}")
        resolved = mode
    elif isinstance(mode, str):
        BACKWARD_MODES.check(mode, "backward")
        kind = BACKWARD_MODES[mode]
        if issubclass(kind, Implicit):  # "implicit", "implicit_warm": a linear solve
            _check_implicit(keywords.get("method", "anderson"), keywords.get("rtol"),
                            keywords.get("max_steps", 100), keywords.get("options", {}),
                            on_nonconvergence, prefix="backward_")
            resolved = kind(**keywords)
        else:
            resolved = kind()
    else:
        raise TypeError(f"backward must be a backward mode name {tuple(BACKWARD_MODES)} or a "
                        f"contdeq.BackwardMode object, got {type(mode).__name__}")
    if on_nonconvergence is not None and getattr(resolved, "on_nonconvergence", "") is None:
        resolved = dataclasses.replace(resolved, on_nonconvergence=on_nonconvergence)
    return resolved


def BackwardConfig(
    mode: str | BackwardMode = "implicit",
    method: str | None = None,
    tol: float | None = None,
    max_steps: int | None = None,
    options: Mapping[str, Any] | None = None,
    on_nonconvergence: str | None = None,
) -> BackwardMode:
    """Deprecated spelling of :func:`backward_mode` (a function, named like one), whose
    ``rtol`` is this ``tol``; it warns ``DeprecationWarning`` and returns the same object."""
    warn("contdeq.BackwardConfig(..., tol=...) is deprecated and will be removed in the next "
         "release: use contdeq.backward_mode(..., rtol=...) (it returns the same mode object)",
         DeprecationWarning)
    return backward_mode(mode, method, tol, max_steps, options, on_nonconvergence)


def solve_adjoint(
    vjp: Callable[[Tensor], Tensor],
    v: Tensor,
    *,
    method: str = "anderson",
    rtol: float | None = None,
    max_steps: int = 100,
    on_nonconvergence: str = "warn",
    w0: Tensor | None = None,
    options: Mapping[str, Any] | None = None,
    tol: float | None = None,
    **keywords: Any,
) -> tuple[Tensor, SolverStats]:
    """Solve ``w = vjp(w) + v``, i.e. ``(I - J)^T w = v`` with ``vjp(w) = J^T w``.

    Args:
        vjp: ``w -> J^T w`` on ``(B, ...)`` tensors shaped like ``v``.
        v: ``(B, ...)`` right-hand side (the gradient of the loss w.r.t. ``z*``).
        method: ``"anderson"``, ``"picard"``, ``"broyden"``, ``"newton"``, ``"ode"`` (steady
            state of ``dw/dt = J^T w + v - w``, integrated by ``options.get("method",
            "dopri5")``) or ``"gmres"`` (restarted GMRES on ``(I - J^T) w = v``, option
            ``restart=60``; its test is relative to ``rms(v_b)``, stricter than ``rms(w_b)``
            where ``|w| > |v|``).
        rtol: per-sample relative tolerance ``rms(residual_b) <= rtol * rms(w_b)``; default
            :func:`~contdeq.solvers.validation.default_tolerance` of ``v``'s dtype (``1e-4``).
        max_steps: iteration cap.
        on_nonconvergence: ``"ignore"``, ``"warn"`` or ``"raise"``.
        w0: ``(B, ...)`` initial guess shaped like ``v`` (a warm start); default ``v``. It
            changes the iterations needed, not the answer's tolerance (a sample whose ``v``
            is zero starts, and ends, at zero).
        options: the linear solver's own options (:class:`Implicit`'s ``options``), passed
            to :func:`~contdeq.solvers.fixed_point` or :func:`~contdeq.solvers.steady_state`
            (for ``"ode"``, ``{"method": "bosh3"}`` picks the integrator), or ``restart`` of
            ``"gmres"``.
        tol: deprecated spelling of ``rtol`` (a ``DeprecationWarning`` names ``rtol``);
            passing both raises ``TypeError``.
        **keywords: deprecated spelling of ``options`` (it cannot carry ``"ode"``'s
            ``method``); a ``DeprecationWarning`` names ``options=``.

    Returns:
        ``(w, stats)``: ``w`` shaped like ``v``; ``stats.nfe`` counts the VJPs.

    The solve starts from ``w0`` (default ``v``, the Jacobian-free answer), and ``v`` is divided
    by its largest per-sample RMS first (the problem is linear, so ``w`` is scaled back
    exactly). The discrete methods iterate all samples together (``freeze_converged=False``
    unless ``options`` says otherwise).
    """
    if keywords:
        warnings.warn(f"solve_adjoint's option keywords {sorted(keywords)} are deprecated; pass "
                      f"options={keywords!r}", DeprecationWarning, stacklevel=2)
    options = {**keywords, **(options or {})}
    rtol = renamed("solve_adjoint", "tol", tol, "rtol", rtol)
    if v.ndim == 1:  # one scalar per sample; the solvers take a 1-D state as one unbatched
        w, stats = solve_adjoint(
            lambda w: vjp(w.squeeze(1)).unsqueeze(1), v.unsqueeze(1), method=method, rtol=rtol,
            max_steps=max_steps, on_nonconvergence=on_nonconvergence,
            w0=None if w0 is None else w0.unsqueeze(1), options=options,
        )
        return w.squeeze(1), stats
    if rtol is None:
        rtol = default_tolerance(v.dtype, v.device.type)
    if not bool(torch.isfinite(v).all()):
        raise NonFiniteError(
            "the gradient arriving at the equilibrium layer's output contains NaN or Inf", 0
        )
    scale = float(sample_rms(v).max())
    if scale == 0.0:
        scale = 1.0
    vn = v / scale
    if w0 is not None and (not isinstance(w0, Tensor) or w0.shape != v.shape
                           or w0.dtype != v.dtype or w0.device != v.device):
        raise ValueError(f"w0 must be a tensor shaped like v {tuple(v.shape)} with its dtype and "
                         f"device, got {w0!r:.80}")
    start_w = vn
    if w0 is not None:  # a sample whose v is zero has w = 0 exactly: its guess is dropped
        zero_v = (sample_rms(v) == 0).reshape(-1, *([1] * (v.ndim - 1)))
        start_w = torch.where(zero_v, 0.0, w0 / scale)
    with torch.no_grad():
        if method == "gmres":
            # GMRES starts from zero unless warm-started (from v it would cost a product).
            w, stats = _solve_adjoint_gmres(vjp, vn, None if w0 is None else start_w, rtol,
                                            max_steps, on_nonconvergence, **options)
        else:
            # The fixed-point methods: linear and contractive where it converges, so iterating
            # a converged sample further cannot hurt it: all samples iterate together (half
            # the bookkeeping).
            tolerances = ({"atol": _ODE_ATOL_FLOOR * rtol, "rtol": rtol} if method == CONTINUOUS
                          else {"atol": 0.0, "rtol": rtol, "freeze_converged": False})
            w, stats = solve(method, lambda w: vjp(w).add_(vn), start_w, max_steps=max_steps,
                             on_nonconvergence=on_nonconvergence, **{**tolerances, **options})
    return w.mul_(scale), stats


def _solve_adjoint_gmres(
    vjp: Callable[[Tensor], Tensor], v: Tensor, w0: Tensor | None, rtol: float, max_steps: int,
    on_nonconvergence: str, restart: int = 60,
) -> tuple[Tensor, SolverStats]:
    """``(I - J^T) w = v`` by GMRES for :func:`solve_adjoint` (``v``, ``w0``: ``(B, ...)``,
    already scaled; ``max_steps`` caps the VJPs). Returns ``w`` shaped like ``v`` (unscaled) and
    stats with ``nfe`` = VJPs and ``linear_iterations`` = Arnoldi steps."""
    start = time.perf_counter()
    flat = v.reshape(v.shape[0], -1)

    def matvec(w: Tensor) -> Tensor:
        return w - vjp(w.reshape(v.shape)).reshape(flat.shape)

    out = gmres(matvec, flat, None if w0 is None else w0.reshape(flat.shape), rtol=rtol,
                restart=restart, max_iterations=max_steps)
    stats = SolverStats(
        method="gmres", nfe=out.matvecs, steps=out.steps, residual=out.residual,
        tolerance=rtol * sample_rms(flat), converged=out.converged,
        wall_time=time.perf_counter() - start,
        stop_reason="converged" if bool(out.converged.all()) else "max_steps",
        linear_iterations=out.steps,
    )
    report_nonconvergence(stats, on_nonconvergence)  # type: ignore[arg-type]
    return out.solution.reshape(v.shape), stats


def _report(stats: SolverStats, on_nonconvergence: str, what: str) -> None:
    """Warn or raise for an unconverged solve, naming it."""
    if on_nonconvergence == "ignore" or stats.all_converged:
        return
    stats_named = SolverStats(**{**stats.__dict__, "method": f"{what} ({stats.method})"})
    report_nonconvergence(stats_named, on_nonconvergence)  # type: ignore[arg-type]
