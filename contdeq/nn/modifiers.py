"""Dynamics modifiers of the equilibrium layer: objects that wrap its solve (``DEQ(f,
modifiers=(...))``) instead of subclassing or patching the layer.

A modifier may act at three points of a forward, each a method returning its input unchanged
by default:

* :meth:`Modifier.start`: moves the initial state before the solve (noise along the
  dynamics, :class:`~contdeq.nn.noisy.Noise`);
* :meth:`Modifier.solver`: wraps the forward solver (the Lyapunov projection,
  :class:`~contdeq.nn.lyapunov.LyapunovProjection`; the defences of :mod:`contdeq.robust`);
* :meth:`Modifier.backward`: replaces the backward mode (attacks through the unrolled solve).

A layer applies its own ``modifiers`` in order, then those entered for a block with
:meth:`~contdeq.DEQ.using` (the defences of :mod:`contdeq.robust`). A modifier's networks
(:meth:`Modifier.modules`) are registered on the layer under their names (``lyapunov.*`` in
the ``state_dict``). A new modifier is one class and one registration::

    @MODIFIERS.register("clip")
    class Clip(Modifier): ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..implicit import BackwardMode, ForwardSolver
from ..solvers import Registry

if TYPE_CHECKING:
    from .deq import DEQ

__all__ = ["MODIFIERS", "Modifier", "check_modifiers"]

#: Dynamics modifiers by name (the classes; build them with their arguments).
MODIFIERS: Registry[type[Modifier]] = Registry("dynamics modifier", "modifiers")


class Modifier:
    """Base of the dynamics modifiers; every hook is the identity."""

    def modules(self) -> dict[str, nn.Module]:
        """Networks this modifier owns, by the attribute name the layer registers them under."""
        return {}

    def check(self, layer: DEQ) -> None:
        """Raise if this modifier cannot act on ``layer`` (called once, at construction)."""

    def start(self, layer: DEQ, x: Tensor, z0: Tensor) -> Tensor:
        """The state the solve starts from, given the policy's ``z0`` (flat, ``(B, ...)``)."""
        return z0

    def solver(self, base: ForwardSolver, training: bool) -> ForwardSolver:
        """The forward solver to use instead of ``base`` (training or evaluation)."""
        return base

    def backward(self, base: BackwardMode, training: bool) -> BackwardMode:
        """The backward mode to use instead of ``base``."""
        return base

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_modifiers(modifiers: object) -> tuple[Modifier, ...]:
    """``modifiers`` is a sequence of :class:`Modifier` objects; returns it as a tuple."""
    if isinstance(modifiers, Modifier):
        modifiers = (modifiers,)
    if not isinstance(modifiers, (tuple, list)) or not all(
            isinstance(m, Modifier) for m in modifiers):
        raise TypeError(f"modifiers must be a tuple of dynamics modifiers (e.g. "
                        f"(contdeq.nn.Noise(0.1),)), registered: {tuple(MODIFIERS)}; got "
                        f"{modifiers!r}")
    return tuple(modifiers)
