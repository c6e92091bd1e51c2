"""Initial-state policies of the equilibrium layer: where the solve starts (``DEQ(f, init=...)``).

A policy is called as ``policy(layer, x)`` and returns ``(z0, guess)``: the flat start of the
solve ``(B, *layer.state_shape)`` and, where the start is a prediction trained by a skip term,
that prediction with its graph (else ``None``). Policies are small objects, not modules: a
network a policy needs (the predictor of :class:`Predictor`) is registered on the layer under
the name :meth:`InitialState.modules` gives, so ``state_dict`` keys are the layer's
(``predictor.*``). A ``z0`` passed to the layer's forward takes precedence over every policy.

A new policy is one class (subclass :class:`InitialState`) and one registration::

    @INITIAL_STATES.register("mean")
    class Mean(InitialState): ...

after which ``DEQ(f, init="mean")`` and ``DEQ(f, init=Mean())`` both work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..implicit import first_call
from ..regularizers import SKIP_NORMS, skip_loss
from .checks import check_module, check_number
from .deq import INITIAL_STATES, InitialState, Zeros, resolve_init
from .structure import check_state

if TYPE_CHECKING:
    from .deq import DEQ

__all__ = ["INITIAL_STATES", "FZero", "InitialState", "Input", "Predictor", "Zeros",
           "resolve_init"]

@INITIAL_STATES.register("input")
class Input(InitialState):
    """``z0 = x``: the solve starts at the input features (LyaDEQ's start; ``x`` must be
    ``(B, *state_shape)``)."""

    def __call__(self, layer: DEQ, x: Tensor) -> tuple[Tensor, Tensor | None]:
        name = f"x (the initial state of {type(layer).__name__})"
        return check_state(x, x, layer.state_shape, name), None


class _Skip(InitialState):
    """A predicted start trained by the skip term ``weight * mean(|guess - sg(z*)|^p)``.

    Args:
        weight: the weight ``lambda`` of the skip term (>= 0; 0 switches it off).
        norm: ``"l2"`` (default) or ``"l1"``.
        detach: stop the term's gradient at ``z*`` (default ``True``).
    """

    def __init__(self, *, weight: float = 1.0, norm: str = "l2", detach: bool = True) -> None:
        check_number(weight, "skip_weight", 0)
        if norm not in SKIP_NORMS:
            raise ValueError(f"skip_norm must be one of {SKIP_NORMS}, got {norm!r}")
        if not isinstance(detach, bool):
            raise TypeError(f"skip_detach must be a bool, got {type(detach).__name__}")
        self.weight = float(weight)
        self.norm = norm
        self.detach = detach

    def trained(self, guess: Tensor) -> Tensor | None:
        """``guess`` where the skip term trains something: the prediction's graph, or, with
        ``detach=False``, ``f`` through ``z*`` (also for a frozen predictor)."""
        return guess if guess.requires_grad or not self.detach else None

    def skip_term(self, guess: Tensor, z: Tensor) -> Tensor | None:
        if self.weight == 0:
            return None
        return self.weight * skip_loss(guess, z, self.norm, self.detach)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(weight={self.weight:g}, norm={self.norm!r}, "
                f"detach={self.detach})")


@INITIAL_STATES.register("predictor")
class Predictor(_Skip):
    """``z0 = predictor(x)``, an explicit network (Skip DEQ), trained by the skip term.

    The network is registered on the layer as ``layer.predictor`` (``state_dict`` keys
    ``predictor.*``). On a multi-scale layer it returns one tensor per scale.

    Args:
        predictor: ``nn.Module``, ``x -> (B, *state_shape)`` (a tuple of per-scale tensors
            on a multi-scale layer).
        weight, norm, detach: the skip term (see :class:`~contdeq.SkipDEQ`).
    """

    def __init__(self, predictor: nn.Module, *, weight: float = 1.0, norm: str = "l2",
                 detach: bool = True) -> None:
        super().__init__(weight=weight, norm=norm, detach=detach)
        self._predictor = check_module(predictor, "predictor", "predictor(x)")

    def modules(self) -> dict[str, nn.Module]:
        return {"predictor": self._predictor}

    def __call__(self, layer: DEQ, x: Tensor) -> tuple[Tensor, Tensor | None]:
        guess = layer.structure.prediction(layer.predictor(x), x)
        return guess, self.trained(guess)


@INITIAL_STATES.register("f0")
class FZero(_Skip):
    """``z0 = f(0, x)`` ``(B, *state_shape)`` (Skip-Reg DEQ: no extra network), trained by the
    skip term; ``0`` is the zero state (a tuple of zeros on a multi-scale layer).

    Args:
        weight, norm, detach: the skip term (see :class:`~contdeq.SkipRegDEQ`).
    """

    def __call__(self, layer: DEQ, x: Tensor) -> tuple[Tensor, Tensor | None]:
        guess = first_call(layer.f, layer.zeros(x), x)
        return guess, self.trained(guess)
