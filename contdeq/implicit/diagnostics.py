"""Checks of the user's ``f(z, x)``: its first call and its output, with hints on the usual
causes (a state not shaped like ``x``, dtypes or devices that differ)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..solvers import BoundInput
from ..solvers.validation import check_func_output

__all__ = ["LayerInput", "check_output", "first_call", "from_autocast"]


class LayerInput(BoundInput):
    """``fx(z) = f(z, x)``: a layer's ``f`` bound to its input, checked with the layer's hints.

    The solve's counted wrapper calls ``f(z, x)`` directly (counting, checks, autocast in one
    wrapper, :mod:`contdeq.solvers.counting`); the first call explains a failure inside
    ``f`` or a badly shaped output in terms of how the layer chooses its state
    (:func:`first_call`, :func:`check_output`).

    Args:
        f: called as ``f(z, x)``.
        x: ``(B, ...)`` the input passed to every call.
        name: ``f``'s name in messages.
        autocast: ``(device_type, dtype)`` of the ``torch.autocast`` ``f`` computes in (its
            output cast to the state's dtype), ``None`` outside autocast.
    """

    def __init__(self, f: Callable[[Tensor, Tensor], Tensor], x: Tensor, name: str = "f",
                 autocast: tuple[str, torch.dtype] | None = None) -> None:
        super().__init__(f, x, name, autocast)

    def first_call(self, z: Tensor, x: Tensor) -> Tensor:
        """``f(z, x)`` with the layer's hints on a failure or a badly shaped output."""
        out = first_call(self.evaluate, z, x, self.name, hint_module=self.f)
        self.checked = True
        return out

    def check(self, out: object, z: Tensor) -> Tensor:
        return check_output(out, z, self.name)


def from_autocast(out: object, like: Tensor) -> object:
    """``out`` computed under ``torch.autocast`` in its dtype, cast (differentiably) to
    ``like``'s dtype (the state's); anything else unchanged."""
    device = like.device.type
    if (isinstance(out, Tensor) and out.dtype != like.dtype and torch.is_autocast_enabled(device)
            and out.dtype == torch.get_autocast_dtype(device)):
        return out.to(like.dtype)
    return out


def first_call(f: Callable[[Tensor, Tensor], Tensor], z: Tensor, x: Tensor, name: str = "f",
               hint_module: object = None) -> Tensor:
    """``f(z, x)``, with shape errors inside ``f`` and a badly shaped output explained in
    terms of the state shape (the usual cause: ``state_shape`` left to default to ``x``'s);
    ``hint_module``: the module whose parameters the dtype/device hint names (default
    ``f``). An output in the ``torch.autocast`` dtype is cast to ``z``'s, as the solves
    do."""
    try:
        out = f(z, x)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{name}(z, x) failed with the state z of shape {tuple(z.shape)} and x of shape "
            f"{tuple(x.shape)}; if f's state is not shaped like x, set state_shape=... on the "
            f"layer or pass z0.{_dtype_device_hint(hint_module or f, z, x)} The error was: {exc}"
        ) from exc
    return check_output(from_autocast(out, z), z, name)


def _dtype_device_hint(f: object, z: Tensor, x: Tensor) -> str:
    """Where ``z``, ``x`` and ``f``'s parameters disagree in dtype or device, say so."""
    params = [p for p in f.parameters() if p.is_floating_point()] if isinstance(
        f, nn.Module) else []
    kinds = {(t.dtype, t.device) for t in (z, x, *params)}
    if len(kinds) == 1:
        return ""
    held = f", f's parameters {params[0].dtype} on {params[0].device}" if params else ""
    return (f" Dtypes/devices differ: z {z.dtype} on {z.device}, x {x.dtype} on {x.device}"
            f"{held} (convert the module or the input).")


def check_output(out: object, z: Tensor, name: str = "f") -> Tensor:
    """``out`` must be a tensor shaped, typed and placed like the state ``z`` (the solvers'
    check, with hints on how a layer chooses its state)."""
    return check_func_output(
        out, z, f"{name}(z, x)", state="the state z",
        shape_hint=" (set state_shape=... on the layer, or pass z0, if the state is not shaped "
                   "like x)",
        dtype_hint=" (the state takes x's dtype: convert the module or the input)",
    )
