"""Weight-tied unrolled layers: the same ``f`` applied ``depth`` times, trained by backpropagation.

The explicit counterpart of an equilibrium layer (Song, Majumder & Lin 2023, "Revisiting
Implicit Models: Sparsity Trade-offs Capability in Weight-tied Model for Vision Tasks"): no
solver and no implicit gradient, just ``z_{k+1} = f(z_k, x)`` for ``k = 0 .. depth - 1`` with
autograd recording every application. With ``masks="distinct"`` application ``k`` uses its own
fixed random binary mask ``M_k`` on every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` weight of ``f``
(``W -> W * M_k``), the paper's distinct sparse masks: the iterations share one set of weights
but each uses a different sparse subset of it. ``masks="shared"`` is the control: one mask
``M`` at every application (a sparser weight-tied model, nothing distinct).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..implicit import DEQStats, first_call
from ..solvers import NonFiniteError, SolverStats, sample_rms
from .checks import check_module, check_number
from .deq import PerThreadResults, Single, check_layer_input, zeros_or_state
from .normalization import fixed_normalization, update_normalization
from .structure import MultiScaleRepr, Structure, scales

__all__ = ["MASKABLE_MODULES", "MultiScaleWeightTied", "WeightTied"]

#: Module types whose ``weight`` the distinct masks apply to (after any parametrization, e.g.
#: :func:`~contdeq.spectral_norm_cap`). Biases and normalization layers are never masked.
MASKABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_MASK_KINDS = ("distinct", "shared")


class _Masks(nn.Module):
    """Holds the masks as bool buffers ``(depth, *weight.shape)``, one per masked weight, named
    by the weight's path in ``f`` with dots as underscores (``conv.weight`` -> ``conv_weight``)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {tuple(b.shape)}" for n, b in self.named_buffers())


def _draw_mask(shape: torch.Size, depth: int, sparsity: float, generator: torch.Generator
               ) -> Tensor:
    """``(depth, *shape)`` bool masks, each keeping exactly ``round((1 - sparsity) * n)``
    (at least one) of the ``n`` entries, at positions drawn uniformly without replacement."""
    n = math.prod(shape)
    keep = max(1, round((1.0 - sparsity) * n))
    masks = torch.zeros(depth, n, dtype=torch.bool)
    for k in range(depth):
        masks[k, torch.randperm(n, generator=generator)[:keep]] = True
    return masks.reshape(depth, *shape)


def _forward_with(module: nn.Module, weight: Tensor) -> Callable[[Tensor], Tensor]:
    """``module``'s forward with ``weight`` in place of its own (a :data:`MASKABLE_MODULES`)."""
    if isinstance(module, nn.Linear):
        return lambda inp: F.linear(inp, weight, module.bias)
    return lambda inp: module._conv_forward(inp, weight, module.bias)  # type: ignore[operator]


#: Per thread: the weight each module computes with inside :func:`_weights_replaced`, by id.
_REPLACED = threading.local()
#: Guards the shadowing forwards: how many threads are inside a block for each module, by id.
_SHADOWING = threading.Lock()
_SHADOWED: dict[int, int] = {}


def _shadow(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``module``'s forward with the calling thread's replacement weight (its class's forward
    where the thread has none: another thread's calls of a shared module)."""

    def forward(inp: Tensor) -> Tensor:
        weight = getattr(_REPLACED, "weights", {}).get(id(module))
        if weight is None:
            return type(module).forward(module, inp)
        return _forward_with(module, weight)(inp)

    return forward


@contextmanager
def _weights_replaced(replacements: list[tuple[nn.Module, Tensor]]) -> Iterator[None]:
    """Within the block each module computes with the given weight in the calling thread (its
    forward is shadowed by an instance attribute while any thread is inside such a block,
    removed when the last leaves; other threads' calls keep their own weights)."""
    outer = getattr(_REPLACED, "weights", {})
    _REPLACED.weights = {**outer, **{id(module): weight for module, weight in replacements}}
    with _SHADOWING:
        for module, _ in replacements:
            if not _SHADOWED.get(id(module)):
                module.forward = _shadow(module)  # type: ignore[method-assign]
            _SHADOWED[id(module)] = _SHADOWED.get(id(module), 0) + 1
    try:
        yield
    finally:
        with _SHADOWING:
            for module, _ in replacements:
                _SHADOWED[id(module)] -= 1
                if not _SHADOWED[id(module)]:
                    del _SHADOWED[id(module)]
                    del module.forward
        _REPLACED.weights = outer


class WeightTied(PerThreadResults):
    """Weight-tied unrolled layer: ``z_depth`` of ``z_{k+1} = f(z_k, x)``, ``z_0 = 0``.

    The explicit baseline of the equilibrium layers (Song, Majumder & Lin 2023): the same
    ``f(z, x)`` contract, state shape and initial state as :class:`~contdeq.DEQ`, but a fixed
    number of applications and gradients by backpropagation through all of them (memory grows
    linearly with ``depth``; no solver, no tolerance, nothing to converge).

    With ``masks="distinct"``, application ``k`` multiplies the weight of every
    ``nn.Linear`` / ``nn.Conv{1,2,3}d`` in ``f`` (its effective weight, after e.g.
    :func:`~contdeq.spectral_norm_cap`) by its own fixed random binary mask ``M_k`` that zeroes
    the fraction ``sparsity`` of the entries (exactly ``round(sparsity * n)``, positions drawn
    uniformly, independently per application and weight). The masks are drawn once from
    ``seed`` and stored as buffers (``masks.<weight path>``, bool ``(depth, *weight.shape)``),
    so they are saved in and restored from the ``state_dict``. A forward computes the ``depth``
    masked weights with one product per weight (``W * M``, ``(depth, *weight.shape)``, kept by
    the graph for the backward) and runs the dense ``nn.functional`` operation on them: 1.1 to
    1.3 times the unmasked step's time, where sparse kernels on the kept entries took 6 to 15
    times (measured in ``docs/weight_tied.md``).

    Args:
        f: ``nn.Module`` called as ``f(z, x)``, returning a tensor shaped like ``z``.
        depth: number of applications of ``f`` (>= 1).
        masks: ``None`` (default: every application uses the full weights), ``"distinct"``
            or ``"shared"`` (one mask drawn once, used by every application: the control that
            removes as many weights without making the applications differ).
        sparsity: fraction of each weight's entries a mask zeroes, in ``(0, 1)`` with
            masks; must be 0 without masks.
        seed: seed of the masks' random generator (the same seed draws the same masks).
        state_shape: per-sample shape of ``z`` (default: the shape of ``x``); the initial state
            is zeros of shape ``(B, *state_shape)`` with ``x``'s dtype and device.
        structure: the state structure, as for :class:`~contdeq.DEQ` (``Single``, default,
            or ``Scales(state_shapes)``: tuples in and out).

    Attributes:
        stats: :class:`~contdeq.implicit.DEQStats` of the calling thread's last call (``None``
            before; per thread, see ``docs/reliability.md``):
            ``forward.nfe == forward.steps == depth``; ``forward.residual`` ``(B,)`` is the RMS
            of the last update, ``rms(z_depth - z_{depth-1})`` (the fixed-point residual at
            ``z_{depth-1}``; a weight-tied model need not approach a fixed point);
            ``converged`` is all ``True`` and ``tolerance`` NaN; ``backward`` stays ``None``
            (plain backpropagation).
        masked_weights: paths in ``f`` of the masked weights (empty without masks).

    Shapes: ``x`` ``(B, ...)`` -> ``z_depth`` ``(B, *state_shape)``.
    """

    def __init__(self, f: nn.Module, depth: int, *, masks: str | None = None,
                 sparsity: float = 0.0, seed: int = 0,
                 state_shape: int | Sequence[int] | None = None,
                 structure: Structure | None = None) -> None:
        super().__init__()
        if structure is None:
            structure = Single(state_shape)
        elif state_shape is not None:
            raise TypeError("pass the state's shape once: state_shape=... or structure=..., "
                            "not both")
        check_module(f, "f", structure.contract)
        self.depth = int(check_number(depth, "depth", 1, integer=True))
        if masks is not None and masks not in _MASK_KINDS:
            raise ValueError(f"masks must be None, 'distinct' or 'shared', got {masks!r}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
                0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
        if masks is None and sparsity != 0:
            raise ValueError(f"sparsity={sparsity!r} needs masks='distinct' or 'shared' "
                             "(without masks every application uses the full weights)")
        if masks is not None and sparsity == 0:
            raise ValueError(f"masks={masks!r} needs sparsity > 0 (with sparsity 0 every mask "
                             "keeps every weight)")
        self.seed = int(check_number(seed, "seed", 0, integer=True))
        self.structure = structure
        self.f = structure.cell(f)
        self.mask_kind = masks
        self.sparsity = float(sparsity)
        self.masks = _Masks()
        self._masked: dict[str, nn.Module] = {}  # buffer name -> module whose weight it masks
        self.masked_weights: tuple[str, ...] = ()
        if masks is not None:
            self._draw_masks()

    @property
    def state_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of the flat state (``None``: ``x``'s)."""
        return self.structure.state_shape

    def _draw_masks(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        paths: dict[str, str] = {}  # mask name -> weight path
        for path, module in self.f.named_modules():
            if not isinstance(module, MASKABLE_MODULES):
                continue
            weight_path = f"{path}.weight" if path else "weight"
            name = weight_path.replace(".", "_")
            if name in self._masked:
                raise ValueError(f"f's weights {weight_path!r} and {paths[name]!r} map to the same "
                                 f"mask name {name!r}; rename a submodule")
            weight = module.weight
            if self.mask_kind == "shared":  # one mask, the same at every application
                mask = _draw_mask(weight.shape, 1, self.sparsity, generator).repeat(
                    self.depth, *([1] * weight.ndim))
            else:
                mask = _draw_mask(weight.shape, self.depth, self.sparsity, generator)
            self.masks.register_buffer(name, mask.to(weight.device))
            self._masked[name] = module
            paths[name] = weight_path
        if not paths:
            raise ValueError(f"masks={self.mask_kind!r} found no weight to mask: f has no "
                             "nn.Linear or nn.Conv1d/2d/3d submodule")
        self.masked_weights = tuple(paths.values())

    def active_parameters(self) -> float:
        """Mean number of ``f``'s parameter entries one application uses: all of them without
        masks; with masks, minus the entries each mask zeroes (averaged over applications)."""
        total = sum(p.numel() for p in self.f.parameters())
        dropped = sum(int((~m).sum()) for m in self.masks.buffers()) / self.depth
        return total - dropped

    def forward(self, x: Tensor, z0: Any = None) -> Any:
        """``x`` ``(B, ...)`` -> ``z_depth`` ``(B, *state_shape)``; ``z0`` an optional initial
        state ``(B, *state_shape)`` (default zeros; gradients reach it). With ``Scales``: tuples
        in and out."""
        x = check_layer_input(x, type(self).__name__)
        z = zeros_or_state(x, self.structure.pack(z0), self.state_shape)
        if self.training:
            update_normalization(self.f)
        start = time.perf_counter()
        prev = z
        with fixed_normalization(self.f):
            # One product per weight gives the masked weights of all applications: (depth, ...).
            masked = [(module, module.weight * getattr(self.masks, name))
                      for name, module in self._masked.items()]
            for k in range(self.depth):
                prev = z
                with _weights_replaced([(module, w[k]) for module, w in masked]):
                    z = first_call(self.f, z, x) if k == 0 else self.f(z, x)
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(
                f"WeightTied: the state after {self.depth} applications of f contains NaN or "
                "Inf (diverging iteration: bound f's gain, e.g. with contdeq.spectral_norm_cap, "
                "or lower the learning rate)", self.depth)
        with torch.no_grad():
            residual = sample_rms(z - prev)
        b = x.shape[0]
        self.stats = DEQStats(SolverStats(
            method="weight-tied", nfe=self.depth, steps=self.depth, residual=residual,
            tolerance=residual.new_full((b,), math.nan),
            converged=torch.ones(b, dtype=torch.bool, device=x.device),
            wall_time=time.perf_counter() - start, stop_reason="depth",
        ))
        return self.structure.unpack(z)

    def extra_repr(self) -> str:
        parts = [f"depth={self.depth}"]
        if self.mask_kind is not None:
            parts.append(f"masks={self.mask_kind!r}, sparsity={self.sparsity:g}, "
                         f"seed={self.seed}")
        if self.state_shape is not None:
            parts.append(f"state_shape={self.state_shape}")
        return ", ".join(parts)


class MultiScaleWeightTied(MultiScaleRepr, WeightTied):
    """:class:`WeightTied` whose state is a tuple of tensors, one per scale.

    ``f`` is called as ``f(zs, x)`` with ``zs`` a tuple of tensors ``(B, *state_shapes[s])``
    and returns such a tuple (e.g. :class:`~contdeq.MultiScaleCell`); it goes through the same
    adapter as :class:`~contdeq.MultiScaleDEQ` (``layer.f`` the adapter, ``layer.f.f`` ``f``),
    so masks are named ``masks.f_<path>_weight``.

    Args:
        f: ``nn.Module``, ``f(zs, x) -> tuple`` shaped like ``zs``.
        depth: number of applications of ``f`` (>= 1).
        state_shapes: per-sample shape of each scale, e.g. ``[(16, 8, 8), (32, 4, 4)]``.
        masks: ``None``, ``"distinct"`` or ``"shared"`` (as for :class:`WeightTied`).
        sparsity: fraction of each weight a mask zeroes (as for :class:`WeightTied`).
        seed: seed of the masks.

    Shapes: ``x`` ``(B, ...)`` -> tuple of ``(B, *state_shapes[s])``, ``s = 0 .. S-1``.
    """

    def __init__(self, f: nn.Module, depth: int, *, state_shapes: Sequence[Sequence[int]],
                 masks: str | None = None, sparsity: float = 0.0, seed: int = 0) -> None:
        super().__init__(f, depth, structure=scales(state_shapes, {}), masks=masks,
                         sparsity=sparsity, seed=seed)
