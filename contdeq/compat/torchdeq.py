"""torchdeq 0.1.0's ``get_deq`` running on contdeq's solvers: a torchdeq script is ported by
changing its import to ``from contdeq.compat.torchdeq import get_deq``.

``deq = get_deq(f_solver="anderson", f_max_iter=30, ift=True)`` returns a :class:`TorchDEQ`,
called as torchdeq's module is: ``z_out, info = deq(func, z_init)`` with ``func(z) -> z``
(a closure over the input and the model's parameters) and ``z_init`` a ``(B, ...)`` tensor or
a list of them. The semantics are torchdeq's (docs/migration.md has the table):

* the forward runs ``f_solver`` (``"fixed_point_iter"`` and ``"simple_fixed_point_iter"`` are
  contdeq's ``"picard"``; ``"anderson"``, ``"broyden"``) for at most ``f_max_iter``
  evaluations of ``func`` (``eval_f_max_iter`` or ``f_max_iter * eval_factor`` in eval mode),
  stopping a sample when ``||func(z) - z|| < f_tol`` (``f_stop_mode="abs"``, the per-sample
  L2 norm) or ``||func(z) - z|| < f_tol * ||z||`` (``"rel"``);
* in training, the output carries torchdeq's gradient: by default the 1-step (Jacobian-free)
  gradient of ``tau * func(z*) + (1 - tau) * z*``; ``grad=k``: backpropagation through ``k``
  such damped steps (phantom gradient); ``ift=True`` (or ``hook_ift=True``): the implicit
  gradient, ``w = J^T w + dL/dz`` solved by ``b_solver`` from zero in at most ``b_max_iter``
  vector-Jacobian products to ``b_tol`` (``b_stop_mode``), ``J`` the Jacobian of ``func`` at
  ``func(z*)``, as torchdeq linearizes;
* ``info`` holds torchdeq's keys (``abs_lowest``, ``rel_lowest``, ``abs_trace``,
  ``rel_trace``, ``nstep``, ``sradius``) and ``"stats"``, contdeq's
  :class:`~contdeq.solvers.SolverStats` of the forward solve.

Differences: contdeq freezes each sample once it meets the tolerance (torchdeq iterates the
whole batch until its worst sample does), so samples stop sooner and the answer agrees to the
tolerance; a solve that stops unconverged warns (``on_nonconvergence``, contdeq's keyword;
torchdeq is silent); unknown keywords raise ``TypeError`` (torchdeq ignores them, its issue
#12), and the few torchdeq features without a counterpart here raise ``ValueError`` naming
what to use in contdeq.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..solvers import SolverStats, fixed_point
from ..solvers.validation import check_on_nonconvergence

__all__ = ["DEFAULTS", "SOLVERS", "TorchDEQ", "get_deq"]

#: torchdeq's solver names -> contdeq's ``fixed_point`` methods.
SOLVERS: dict[str, str] = {
    "fixed_point_iter": "picard",
    "simple_fixed_point_iter": "picard",
    "anderson": "anderson",
    "broyden": "broyden",
}

#: The keywords of torchdeq 0.1.0's ``get_deq`` (``DEQSliced``/``DEQIndexing``) with its defaults.
DEFAULTS: dict[str, Any] = {
    "core": "sliced",
    "f_solver": "fixed_point_iter",
    "b_solver": "fixed_point_iter",
    "no_stat": None,
    "f_max_iter": 40,
    "b_max_iter": 40,
    "f_tol": 1e-3,
    "b_tol": 1e-6,
    "f_stop_mode": "abs",
    "b_stop_mode": "abs",
    "eval_factor": 1.0,
    "eval_f_max_iter": 0,
    "ift": False,
    "hook_ift": False,
    "grad": 1,
    "tau": 1.0,
    "sup_gap": -1,
    "sup_loc": None,
    "n_states": 1,
    "indexing": None,
}

#: Keys of torchdeq's argument parser (``add_deq_args``) that its ``get_deq`` does not read,
#: with the contdeq counterpart. Passed to :func:`get_deq` as keywords they raise; inside an
#: ``args`` namespace (a whole training configuration) they are ignored, as torchdeq does.
NOT_GET_DEQ: dict[str, str] = {
    "norm_type": "contdeq.spectral_norm_cap(module, cap=...) or contdeq.weight_norm(module) on "
                 "the layers of f (torchdeq.norm.apply_norm)",
    "norm_no_scale": "contdeq.spectral_norm_cap / contdeq.weight_norm on the layers of f",
    "norm_clip": "contdeq.spectral_norm_cap(module, cap=...) (a hard cap on ||W||_2)",
    "norm_clip_value": "contdeq.spectral_norm_cap(module, cap=...)",
    "norm_target_norm": "contdeq.spectral_norm_cap(module, cap=...)",
    "sn_n_power_iters": "contdeq.spectral_norm_cap(module, n_power_iterations=...)",
    "gamma": "no fixed-point correction loss in contdeq: supervise the returned z (or pass "
             "n_states to get several states to supervise)",
    "jac_loss_weight": "contdeq.DEQ(f, jacobian_weight=...) with contdeq.aux_loss(model), or "
                       "contdeq.jacobian_frobenius(f, z, x)",
    "jac_loss_freq": "contdeq.DEQ(f, jacobian_weight=...) (applied at every training step)",
    "jac_incremental": "contdeq.DEQ(f, jacobian_weight=...)",
    "sradius_mode": "deq(func, z_init, sradius_mode=True) (a call keyword, as in torchdeq)",
}

_STOP_MODES = ("abs", "rel")
_CORES = ("sliced", "indexing")

State = Tensor | list[Tensor]


def get_deq(args: argparse.Namespace | Mapping[str, Any] | None = None, *,
            on_nonconvergence: str = "warn", **kwargs: Any) -> TorchDEQ:
    """torchdeq 0.1.0's ``get_deq``: a :class:`TorchDEQ` configured by torchdeq's keywords.

    Args:
        args: a torchdeq configuration (an ``argparse.Namespace`` or a dict) whose keys
            :data:`DEFAULTS` names are read; other keys are ignored (a training script's
            namespace holds its whole configuration), as torchdeq does.
        on_nonconvergence: contdeq's ``"ignore"``, ``"warn"`` (default) or ``"raise"`` for a
            forward or backward solve that stops unconverged.
        **kwargs: torchdeq's keywords (:data:`DEFAULTS`); they override ``args``. An unknown
            keyword raises ``TypeError``; a torchdeq feature without a contdeq counterpart
            raises ``ValueError`` naming what to use instead.

    Returns:
        The module; ``deq(func, z_init)`` returns ``(list of z, info)`` as torchdeq's does.

    Example: ``deq = get_deq(f_solver="anderson", f_max_iter=30, ift=True)``.
    """
    config: dict[str, Any] = {}
    if args is not None:
        source = vars(args) if isinstance(args, argparse.Namespace) else args
        if not isinstance(source, Mapping):
            raise TypeError(f"args must be an argparse.Namespace or a dict of torchdeq's "
                            f"keywords, got {type(args).__name__}")
        config.update({k: v for k, v in source.items() if k in DEFAULTS})
    for key, value in kwargs.items():
        if key in NOT_GET_DEQ:
            raise ValueError(f"{key}= is not a get_deq keyword (torchdeq ignores it there); "
                             f"in contdeq use {NOT_GET_DEQ[key]}")
        if key not in DEFAULTS:
            raise TypeError(f"get_deq() got an unknown keyword {key!r}; torchdeq 0.1.0's "
                            f"get_deq takes {sorted(DEFAULTS)} (docs/migration.md maps them "
                            f"to contdeq)")
        config[key] = value
    return TorchDEQ(**config, on_nonconvergence=on_nonconvergence)


def _solver(name: object, key: str) -> str:
    if name not in SOLVERS:
        raise ValueError(f"{key} must be one of torchdeq's solvers {sorted(SOLVERS)}, got "
                         f"{name!r} (contdeq's own methods: contdeq.DEQ(f, solver=...))")
    return SOLVERS[name]  # type: ignore[index]


def _positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1 or (
            int(value) != value):
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def _int_list(value: object, key: str) -> list[int]:
    if value is None:
        return []
    items = [value] if isinstance(value, int) else list(value)  # type: ignore[call-overload]
    for item in items:
        _positive_int(item, key)
    return [int(i) for i in items]


class TorchDEQ(nn.Module):
    """A DEQ module with torchdeq 0.1.0's call convention and semantics on contdeq's solvers
    (build it with :func:`get_deq`; the keywords and defaults are :data:`DEFAULTS`).

    ``forward(func, z_init)``: ``func(z) -> z`` on ``(B, ...)`` tensors (or lists of them,
    multi-scale), ``z_init`` the initial state; returns ``(z_out, info)``: ``z_out`` a list
    of states (in training one per supervised state, see ``n_states``/``grad``; in eval
    ``[z*]``) and torchdeq's ``info`` dict plus ``"stats"``.
    """

    def __init__(self, *, on_nonconvergence: str = "warn", **config: Any) -> None:
        super().__init__()
        c = {**DEFAULTS, **config}
        if c["core"] not in _CORES:
            raise ValueError(f"core must be one of {_CORES}, got {c['core']!r}")
        self.core = c["core"]
        self.f_method = _solver(c["f_solver"], "f_solver")
        self.b_method = _solver(c["b_solver"], "b_solver")
        self.f_max_iter = _positive_int(c["f_max_iter"], "f_max_iter")
        self.b_max_iter = _positive_int(c["b_max_iter"], "b_max_iter")
        for key in ("f_tol", "b_tol", "tau", "eval_factor"):
            value = c[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{key} must be a positive number, got {value!r}")
        self.f_tol, self.b_tol = float(c["f_tol"]), float(c["b_tol"])
        for key in ("f_stop_mode", "b_stop_mode"):
            if c[key] not in _STOP_MODES:
                raise ValueError(f"{key} must be 'abs' (||f(z) - z|| < tol) or 'rel' "
                                 f"(||f(z) - z|| < tol ||z||), got {c[key]!r}")
        self.f_stop_mode, self.b_stop_mode = c["f_stop_mode"], c["b_stop_mode"]
        self.tau = float(c["tau"])
        if self.tau > 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        eval_f_max_iter = c["eval_f_max_iter"] or 0
        self.eval_f_max_iter = (_positive_int(eval_f_max_iter, "eval_f_max_iter")
                                if eval_f_max_iter > 0
                                else max(1, int(self.f_max_iter * c["eval_factor"])))
        self.ift = bool(c["ift"] or c["hook_ift"])
        self.grad = _int_list(c["grad"], "grad")
        if len(self.grad) != 1:
            raise ValueError(f"grad must be one number of phantom-gradient steps, got "
                             f"{c['grad']!r} (per-state step counts have no contdeq "
                             f"counterpart; contdeq.Phantom(steps=k, damping=tau))")
        self.sup_gap = int(c["sup_gap"])
        self.sup_loc = _int_list(c["sup_loc"], "sup_loc")
        self.n_states = _positive_int(c["n_states"], "n_states")
        self.indexing = _int_list(c["indexing"], "indexing")
        if self.core == "indexing" and (self.n_states > 1 or self.indexing):
            raise ValueError("core='indexing' with n_states > 1 or indexing (states sampled "
                             "from one solve's trajectory) has no contdeq counterpart; "
                             "core='sliced' supervises states at the same iteration counts")
        self.on_nonconvergence = check_on_nonconvergence(on_nonconvergence)
        self.hook = None  # torchdeq's attribute (its hook_ift handle); unused here

    # -- the solves ----------------------------------------------------------------------
    def _slices(self, f_max_iter: int) -> list[int]:
        """Evaluations of ``func`` per solve: torchdeq's ``DEQSliced._compute_f_iter``."""
        if self.n_states > 1:
            return [max(1, f_max_iter // self.n_states)] * self.n_states
        bounds = [0, *self.indexing, f_max_iter]
        return [max(1, b - a) for a, b in itertools.pairwise(bounds)]

    def _solve(self, g: Callable[[Any], Any], z0: Tensor | tuple[Tensor, ...], max_iter: int,
               tol: float, stop_mode: str, method: str, start_zero: bool = False,
               ) -> tuple[Any, SolverStats]:
        """``z = g(z)`` from ``z0`` in at most ``max_iter`` calls of ``g``, per-sample L2 test
        ``||g(z) - z|| < tol`` (``"abs"``) or ``< tol ||z||`` (``"rel"``)."""
        if isinstance(z0, Tensor) and z0.ndim == 1:  # torchdeq: each entry is a sample
            z, stats = self._solve(lambda v: g(v.reshape(-1)).reshape(-1, 1), z0.reshape(-1, 1),
                                   max_iter, tol, stop_mode, method, start_zero)
            return z.reshape(-1), stats
        first = z0[0] if isinstance(z0, tuple) else z0
        parts = z0 if isinstance(z0, tuple) else (z0,)
        size = sum(p[0].numel() for p in parts) if first.ndim > 1 else 1
        # contdeq tests RMS norms: ||r||_2 < tol  <=>  rms(r) < tol / sqrt(D).
        atol, rtol = (tol / math.sqrt(size), 0.0) if stop_mode == "abs" else (0.0, tol)
        options: dict[str, Any] = {}
        if method == "anderson":
            options["memory"] = 6  # torchdeq's m
        elif method == "broyden":
            options["memory"] = max(1, max_iter)  # torchdeq keeps every update
        if start_zero:
            options["freeze_converged"] = False
        # contdeq's max_steps iterations follow one first evaluation: max_iter calls in all.
        return fixed_point(g, z0, method=method, atol=atol, rtol=rtol,
                           max_steps=max(1, max_iter - 1),
                           on_nonconvergence=self.on_nonconvergence, **options)

    def forward(self, func: Callable[[Any], Any], z_init: State,
                solver_kwargs: Mapping[str, Any] | None = None, sradius_mode: bool = False,
                backward_writer: Callable[[dict[str, Any]], None] | None = None,
                **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
        """torchdeq's ``deq(func, z_init)``: see the class docstring.

        Args:
            func: ``func(z) -> z``; a list of tensors in and out for a multi-scale state.
            z_init: ``(B, ...)`` initial state, or a list of per-scale ``(B, ...)`` states.
            solver_kwargs: per-call overrides; only ``f_max_iter`` is supported.
            sradius_mode: in eval mode, estimate the spectral radius of ``df/dz`` at ``z*``
                by 100 power iterations (``info["sradius"]``, per sample).
            backward_writer: called with the backward solve's ``info`` dict (``ift=True``).

        Returns:
            ``(z_out, info)`` as torchdeq's.
        """
        solver_kwargs = dict(solver_kwargs or {})
        unknown = sorted(set(solver_kwargs) - {"f_max_iter"})
        if unknown:
            raise TypeError(f"solver_kwargs {unknown} are not supported; only 'f_max_iter' "
                            f"(set the solver on get_deq: f_solver=...; Anderson's memory is "
                            f"torchdeq's m=6)")
        if kwargs:
            raise TypeError(f"unknown keyword(s) {sorted(kwargs)} for deq(func, z_init)")
        multi = isinstance(z_init, (list, tuple))
        z0 = tuple(t.detach() for t in z_init) if multi else z_init.detach()  # type: ignore[union-attr]
        g = (lambda zs: tuple(func(list(zs)))) if multi else func
        if self.training:
            z_out, info = self._train(g, z0, solver_kwargs, backward_writer)
        else:
            max_iter = _positive_int(solver_kwargs.get("f_max_iter", self.eval_f_max_iter),
                                     "f_max_iter")
            with torch.no_grad():
                z, stats = self._solve(g, z0, max_iter, self.f_tol, self.f_stop_mode,
                                       self.f_method)
            info = _info(stats, z)
            info["sradius"] = (_spectral_radius(g, z) if sradius_mode
                               else torch.zeros(1, device=_first(z).device))
            z_out = [z]
        return [list(z) if multi else z for z in z_out], info

    def _train(self, g: Callable[[Any], Any], z: Any, solver_kwargs: Mapping[str, Any],
               writer: Callable[[dict[str, Any]], None] | None) -> tuple[list[Any], dict]:
        f_max_iter = _positive_int(solver_kwargs.get("f_max_iter", self.f_max_iter),
                                   "f_max_iter")
        out: list[Any] = []
        slices = self._slices(f_max_iter)
        stats: SolverStats | None = None
        for k, max_iter in enumerate(slices):
            with torch.no_grad():
                z, stats = self._solve(g, _detach(z), max_iter, self.f_tol, self.f_stop_mode,
                                       self.f_method)
            last = k == len(slices) - 1
            out += (self._implicit(g, z, writer) if self.ift and last
                    else self._phantom(g, _detach(z)))
            z = out[-1]
        assert stats is not None
        return out, _info(stats, _detach(z))

    def _phantom(self, g: Callable[[Any], Any], z: Any) -> list[Any]:
        """torchdeq's phantom gradient: ``grad`` damped steps with autograd, the states at
        ``sup_gap``/``sup_loc`` supervised too."""
        steps, out = self.grad[0], []
        for i in range(steps):
            gz = g(z)
            z = gz if self.tau == 1.0 else _mix(self.tau, gz, z)
            if (self.sup_gap > 0 and (i + 1) % self.sup_gap == 0) or (
                    self.sup_gap <= 0 and self.sup_loc and i + 1 in self.sup_loc):
                out.append(z)
        if self.sup_gap <= 0:
            out.append(z)
        return out

    def _implicit(self, g: Callable[[Any], Any], z: Any,
                  writer: Callable[[dict[str, Any]], None] | None) -> list[Any]:
        """``func(z*)`` whose backward solves ``w = J^T w + v`` (torchdeq's ``IFTGrad``)."""
        gz = g(z)
        if isinstance(gz, tuple):
            raise ValueError("ift=True with a list state has no counterpart here; use "
                             "contdeq.MultiScaleDEQ(f, state_shapes=...) (implicit backward)")
        return [_ImplicitGradient.apply(gz, g, self, writer)]


class _ImplicitGradient(torch.autograd.Function):
    """Identity forward; backward replaces ``v`` by ``w = J^T w + v`` (``J`` at ``func(z*)``)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, g: Callable[[Tensor], Tensor], deq: TorchDEQ,  # type: ignore[override]
                writer: Callable[[dict[str, Any]], None] | None) -> Tensor:
        ctx.g, ctx.deq, ctx.writer = g, deq, writer
        ctx.save_for_backward(z.detach())
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        deq: TorchDEQ = ctx.deq
        h = z.clone().requires_grad_()
        with torch.enable_grad():
            gh = ctx.g(h)

        def step(w: Tensor) -> Tensor:
            return torch.autograd.grad(gh, h, w, retain_graph=True)[0] + v

        w, stats = deq._solve(step, torch.zeros_like(v), deq.b_max_iter, deq.b_tol,
                              deq.b_stop_mode, deq.b_method, start_zero=True)
        if ctx.writer is not None:
            ctx.writer(_info(stats, w))
        return w, None, None, None


def _first(z: Any) -> Tensor:
    return z[0] if isinstance(z, tuple) else z


def _detach(z: Any) -> Any:
    return tuple(t.detach() for t in z) if isinstance(z, tuple) else z.detach()


def _mix(tau: float, gz: Any, z: Any) -> Any:
    if isinstance(z, tuple):
        return tuple(tau * a + (1 - tau) * b for a, b in zip(gz, z, strict=True))
    return tau * gz + (1 - tau) * z


def _info(stats: SolverStats, z: Any) -> dict[str, Any]:
    """torchdeq's ``info`` keys from contdeq's stats (``residual`` is an RMS norm)."""
    parts = z if isinstance(z, tuple) else (z,)
    flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1) if parts[0].ndim > 1 \
        else parts[0].reshape(-1, 1)
    abs_lowest = stats.residual * math.sqrt(flat.shape[1])
    rel_lowest = abs_lowest / (flat.norm(dim=1) + 1e-9)
    nstep = torch.full_like(abs_lowest, float(stats.nfe))
    return {"abs_lowest": abs_lowest, "rel_lowest": rel_lowest,
            "abs_trace": abs_lowest[:, None], "rel_trace": rel_lowest[:, None],
            "nstep": nstep, "sradius": torch.zeros(1, device=abs_lowest.device),
            "stats": stats}


def _spectral_radius(g: Callable[[Any], Any], z: Any, iterations: int = 100) -> Tensor:
    """Per-sample ``|lambda_max|`` of ``dg/dz`` at ``z`` by power iteration on ``J^T``
    (torchdeq's ``power_method``)."""
    if isinstance(z, tuple):
        raise ValueError("sradius_mode with a list state has no counterpart here")
    h = z.detach().clone().requires_grad_()
    with torch.enable_grad():
        gh = g(h)
    v = torch.randn_like(h)
    value = torch.zeros(h.shape[0], device=h.device)
    for i in range(iterations):
        jv = torch.autograd.grad(gh, h, v, retain_graph=i < iterations - 1)[0]
        value = (jv * v).reshape(h.shape[0], -1).sum(1) / (v * v).reshape(h.shape[0], -1).sum(1)
        v = jv / jv.reshape(h.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (h.ndim - 1))
    return value.abs().detach()


