"""What one client does locally: apply its solver budget to a model, train it on its shard
and measure the report it sends with its update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._warnings import warn
from ..implicit import ForwardSolver
from ..nn.checks import check_labels, check_number
from ..nn.deq import DEQ
from ..nn.lyapunov import LyapunovSolver
from ..regularizers import aux_loss
from ..solvers import NonFiniteError
from .fusion import ClientReport

__all__ = ["LocalData", "SolverBudget", "apply_budget", "evaluate_classifier", "train_local"]


@dataclass(frozen=True, init=False)
class SolverBudget:
    """The forward-solver budget of one client: how much compute each equilibrium solve gets.

    ``None`` keeps the model's own setting. A weak device uses few steps and loose
    tolerances, a strong one the reverse; all run the same model (same parameters).

    Attributes:
        max_steps: solver step cap of every forward solve.
        atol: absolute tolerance of the steady-state test.
        rtol: relative tolerance of the steady-state test.
        method: Runge-Kutta method (``"dopri5"``, ``"bosh3"``, ...) of ``solver="ode"`` layers.

    ``tol`` (keyword, or second positional argument as before) is the deprecated spelling of
    ``atol`` and ``rtol`` together: it sets both, with a ``DeprecationWarning`` naming them;
    passing it with ``atol`` or ``rtol`` raises ``TypeError``; ``budget.tol`` reads them,
    warning likewise.

    Example: ``SolverBudget(max_steps=2, atol=0.1, rtol=0.1)``.
    """

    max_steps: int | None
    atol: float | None
    rtol: float | None
    method: str | None

    def __init__(self, max_steps: int | None = None, tol: float | None = None,
                 method: str | None = None, *, atol: float | None = None,
                 rtol: float | None = None) -> None:
        if tol is not None:
            if atol is not None or rtol is not None:
                raise TypeError("SolverBudget: pass atol=..., rtol=... only (tol is their "
                                "deprecated spelling)")
            warn("SolverBudget(tol=...) is deprecated and will be removed in the next release: "
                 "use atol=..., rtol=... (one word per concept: tolerances atol/rtol)",
                 DeprecationWarning)
            atol = rtol = tol
        if max_steps is not None:
            check_number(max_steps, "max_steps", 1, integer=True)
        for name, value in (("atol", atol), ("rtol", rtol)):
            if value is not None:
                check_number(value, name, 0, strict=True, finite=True)
        if method is not None and not isinstance(method, str):
            raise TypeError(f"method must be a str or None, got {type(method).__name__}")
        for name, value in (("max_steps", max_steps), ("atol", atol), ("rtol", rtol),
                            ("method", method)):
            object.__setattr__(self, name, value)

    @property
    def tol(self) -> float | None:
        """``atol`` (equal to ``rtol``) by its deprecated name (a ``DeprecationWarning`` names
        them); ``AttributeError`` when they differ."""
        warn("SolverBudget.tol is deprecated and will be removed in the next release: read "
             ".atol and .rtol (one word per concept: tolerances atol/rtol)", DeprecationWarning)
        if self.atol != self.rtol:
            raise AttributeError(f"SolverBudget.tol: atol={self.atol} and rtol={self.rtol} "
                                 "differ; read .atol and .rtol")
        return self.atol

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, also a budget pickled before ``tol`` became ``atol`` and ``rtol``."""
        if "tol" in state:
            state = {**state, "atol": state["tol"], "rtol": state["tol"]}
            del state["tol"]
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def options(self) -> dict[str, Any]:
        """The solver options this budget sets (keyword arguments of the forward solver)."""
        options: dict[str, Any] = {}
        for name in ("max_steps", "atol", "rtol", "method"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options


def equilibrium_layers(model: nn.Module) -> list[DEQ]:
    """Every :class:`~contdeq.DEQ` (and subclass) inside ``model``."""
    return [m for m in model.modules() if isinstance(m, DEQ)]


def apply_budget(model: nn.Module, budget: SolverBudget) -> nn.Module:
    """Give every equilibrium layer of ``model`` the forward-solver ``budget``, in training and
    evaluation mode, in place; returns ``model``.

    Non-convergence within the budget is expected on a weak device and not warned about
    (``on_nonconvergence="ignore"``); it is reported instead: the client's
    :class:`ClientReport` carries the mean residual and the converged fraction.
    Raises ``ValueError`` when ``budget.method`` is set and a layer's solver is not ``"ode"``.
    """
    if not isinstance(budget, SolverBudget):
        raise TypeError(f"budget must be a SolverBudget, got {type(budget).__name__}")
    options = budget.options()
    for layer in equilibrium_layers(model):
        if budget.method is not None and layer.solver.solver != "ode":
            raise ValueError(f"budget.method applies to solver='ode' layers; this layer uses "
                             f"solver={layer.solver.solver!r}")
        for attr in ("solver", "eval_solver"):
            old: ForwardSolver = getattr(layer, attr)
            new = ForwardSolver(old.solver, on_nonconvergence="ignore",
                                **{**old.options, **options})
            # A LyapunovDEQ's solver solves its projected field: keep it on that field.
            setattr(layer, attr, old.rebuild(new) if isinstance(old, LyapunovSolver) else new)
    return model


@dataclass(frozen=True)
class LocalData:
    """One client's shard: ``x_train`` ``(N, ...)``, ``y_train`` ``(N,)`` int64 class labels,
    ``x_val`` ``(M, ...)``, ``y_val`` ``(M,)``."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor

    def __post_init__(self) -> None:
        for x, y, part in ((self.x_train, self.y_train, "train"), (self.x_val, self.y_val, "val")):
            if len(x) == 0 or len(x) != len(y):
                raise ValueError(f"x_{part} and y_{part} must be non-empty with the same length, "
                                 f"got {len(x)} and {len(y)}")


def _solve_stats(model: nn.Module) -> tuple[list[Tensor], list[Tensor], int]:
    """Per-sample residuals ``(B,)``, converged flags ``(B,)`` and total NFE of the last forward
    of every equilibrium layer of ``model``."""
    stats = [layer.stats.forward for layer in equilibrium_layers(model) if layer.stats]
    return [s.residual for s in stats], [s.converged for s in stats], sum(s.nfe for s in stats)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: Tensor, y: Tensor,
                        batch_size: int = 512) -> tuple[float, float, float]:
    """Accuracy, mean forward residual and converged fraction of ``model`` on ``x`` ``(N, ...)``
    with labels ``y`` ``(N,)``, in evaluation mode (residual 0 and converged 1 for a model
    without equilibrium layers). Every module's mode is restored afterwards."""
    check_labels(y, len(x))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    correct, residuals, converged = 0, [], []
    try:
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size])
            correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
            batch_residuals, batch_converged, _ = _solve_stats(model)
            residuals += batch_residuals
            converged += batch_converged
    finally:
        for module, training in modes:
            module.training = training
    residual = float(torch.cat(residuals).mean()) if residuals else 0.0
    fraction = float(torch.cat(converged).float().mean()) if converged else 1.0
    return correct / len(x), residual, fraction


def train_local(model: nn.Module, data: LocalData, *, epochs: int = 1, lr: float = 1e-2,
                batch_size: int = 32, seed: int = 0) -> ClientReport:
    """Train ``model`` in place on ``data`` (cross-entropy + :func:`contdeq.aux_loss`, Adam,
    shuffled batches seeded by ``seed``) and measure its :class:`ClientReport` on the
    validation split. ``model`` maps ``(B, ...)`` inputs to ``(B, classes)`` logits.

    A NaN/Inf loss or solve (:class:`~contdeq.solvers.NonFiniteError`) stops training and
    returns a report with ``diverged=True``, which the fusion rule excludes.
    """
    check_number(epochs, "epochs", 1, integer=True)
    check_number(lr, "lr", 0, strict=True, finite=True)
    check_number(batch_size, "batch_size", 1, integer=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    nfe, batches = 0, 0
    n = len(data.x_train)
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                logits = model(data.x_train[index])
                loss = F.cross_entropy(logits, data.y_train[index]) + aux_loss(model)
                if not math.isfinite(float(loss.detach())):
                    raise NonFiniteError(f"local loss is {float(loss.detach())}", step=batches)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                nfe += _solve_stats(model)[2]
                batches += 1
        accuracy, residual, converged = evaluate_classifier(model, data.x_val, data.y_val)
    except NonFiniteError:
        return ClientReport(num_examples=n, accuracy=math.nan, residual=math.nan,
                            converged=0.0, nfe=nfe / max(batches, 1), diverged=True)
    return ClientReport(num_examples=n, accuracy=accuracy, residual=residual,
                        converged=converged, nfe=nfe / batches)
