"""States solved as one sample: a 1-D ``z0``, or a whole batch with ``per_sample=False``.

The solvers judge convergence per sample along the first dimension. A state without a batch
dimension (a 1-D ``z0``, as torchdiffeq users write it), or a batch whose samples are coupled
by the function (a batch statistic), must instead be tested, stepped and frozen as one whole:
:func:`solve_as_one_sample` gives such a ``z0`` a batch dimension of size 1, hands the user's
function the state without it, and returns ``z`` shaped like ``z0`` with ``(1,)`` statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .counting import Residual
from .structure import solver_arguments
from .validation import check_func_output


def solve_as_one_sample(solve: Callable[..., tuple[Tensor, Any]], arguments: dict[str, Any]
                        ) -> tuple[Tensor, Any]:
    """Run ``solve(fn, z0, ...)`` with all of ``z0`` (any shape) as one sample.

    ``arguments`` are ``solve``'s own arguments by name (its ``locals()`` on entry); ``fn``'s
    last argument is the state. The solve runs on ``z0[None]`` with ``per_sample=True``;
    ``(z, stats)`` comes back with ``z`` shaped like ``z0`` and every per-sample statistic of
    shape ``(1,)``.
    """
    kwargs, fn_name, state_name = solver_arguments(solve, arguments)
    z0 = kwargs[state_name]
    if callable(kwargs[fn_name]):
        kwargs[fn_name] = _OneSampleFunction(kwargs[fn_name], fn_name)
    kwargs[state_name] = z0.unsqueeze(0)
    kwargs["per_sample"] = True
    z, stats = solve(**kwargs)
    return z.squeeze(0), stats


class _OneSampleFunction:
    """The user's function on ``(1, *shape)`` states: called on ``z[0]``, its output given
    the batch dimension back (a wrongly shaped output is reported in the user's shapes)."""

    def __init__(self, fn: Callable[..., Tensor], name: str) -> None:
        self.fn = fn
        self.name = name

    @property
    def x(self) -> Tensor | None:
        """The input the user's function is bound to (a layer's ``f(., x)``), if any."""
        fn = self.fn.fx if isinstance(self.fn, Residual) else self.fn
        return getattr(fn, "x", None)

    def with_input(self, x: Tensor) -> _OneSampleFunction:
        """The same function bound to the input ``x`` (a step callback's ``Restart(x=...)``)."""
        if not hasattr(self.fn, "with_input"):
            raise ValueError(f"a step callback returned Restart(x=...), but {self.name} "
                             f"({type(self.fn).__name__}) cannot be bound to another input")
        return _OneSampleFunction(self.fn.with_input(x), self.name)

    def __call__(self, *args: Any) -> Tensor:
        *rest, z = args
        out = self.fn(*rest, z[0])
        if isinstance(out, Tensor) and out.shape == z.shape[1:]:
            return out.unsqueeze(0)
        check_func_output(out, z[0], self.name)  # raises: not a tensor, or shaped wrongly
        return out  # pragma: no cover - check_func_output raised
