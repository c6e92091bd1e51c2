"""Tasks of the paper benchmark: data, the shared ``f`` and the layers around it.

Three tasks, each a :class:`Task`:

* ``digits-mlp``: scikit-learn's digits (64 features), ``Linear(64, W) -> layer -> Linear(W,
  10)`` with ``f(z, x) = tanh(W_z z + x)``.
* ``spirals``: a procedurally generated dense task (:func:`make_spirals`): 3 interleaved
  spiral arms of one turn in a random 2-D plane of ``R^16``, with noise. Separating the arms
  needs a strongly nonlinear map, so the vector field has to grow during training (with the
  capped ``f`` this shows in the DEQs' NFE; the NeuralODE's ``t_end = 1`` solve stays cheap).
* ``digits-conv``: the digits as ``1x8x8`` images, ``Conv2d(1, C) -> layer -> Linear(64C,
  10)`` with ``f(z, x) = tanh(conv(z) + x)``.
* ``images-multiscale``: :func:`contdeq.data.procedural_images` (4 classes, 16x16), a
  two-scale state ``(C x 16 x 16, 2C x 8 x 8)`` with :class:`MultiScaleConvCell` and the
  multi-scale layers (``MS ...`` models), pooled per scale into a linear head.

Every ``f`` caps its ``z``-weight at spectral norm 0.9 (:func:`contdeq.spectral_norm_cap`; for
the conv, the operator norm: see :class:`ConvCell`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import contdeq
from contdeq.data import procedural_images

__all__ = ["TASKS", "ConvCell", "MultiScaleConvCell", "PoolHead", "ScalePredictor", "TanhCell",
           "Task", "load_task", "make_spirals"]

CAP = 0.9


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` with ``||W||_2 <= 0.9``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=CAP)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(z) + x)


class ConvCell(nn.Module):
    """``f(z, x) = tanh(conv(z) + x)`` with the 3x3 conv's operator norm ``<= 0.9``.

    :func:`contdeq.spectral_norm_cap` caps the norm of the kernel reshaped to ``(C_out,
    C_in * 9)``; the convolution's operator norm can be up to 3 times (``sqrt(3 * 3)``) that,
    so the reshaped kernel is capped at ``0.9 / 3``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = contdeq.spectral_norm_cap(
            nn.Conv2d(channels, channels, 3, padding=1), cap=CAP / 3)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(z) + x)


class MultiScaleConvCell(nn.Module):
    """Two-scale ``f((z0, z1), x)``, a contraction of the joint state (Lipschitz ``<= 0.9``).

    ``z0' = tanh(conv(z0) + up(z1) + inj0(x))``, ``z1' = tanh(conv(z1) + down(z0) + inj1(x))``
    with ``up`` a 1x1 conv, nearest upsampling by 2 and a factor 1/2 (upsampling alone has
    operator norm 2) and ``down`` a strided 3x3 conv. Each of the four state-to-state maps is
    capped at operator norm ``0.45`` (reshaped kernels at ``0.45 / 3`` for the 3x3 convs,
    ``0.45 / 2`` for the strided one: each input pixel meets at most 4 of its windows), so the
    2x2 block operator has norm ``<= 0.9``. contdeq's :class:`~contdeq.MultiScaleCell` (MDEQ's
    GroupNorm block) is not a contraction; the ODE solves of this benchmark need one.
    """

    def __init__(self, channels: int, injection_channels: int) -> None:
        super().__init__()
        c0, c1 = channels, 2 * channels
        part = CAP / 2

        def capped(conv: nn.Conv2d, factor: float) -> nn.Conv2d:
            return contdeq.spectral_norm_cap(conv, cap=part / factor)

        self.same0 = capped(nn.Conv2d(c0, c0, 3, padding=1), 3)
        self.same1 = capped(nn.Conv2d(c1, c1, 3, padding=1), 3)
        self.down = capped(nn.Conv2d(c0, c1, 3, stride=2, padding=1), 2)
        self.up = capped(nn.Conv2d(c1, c0, 1), 1)
        self.inject0 = nn.Conv2d(injection_channels, c0, 3, padding=1)
        self.inject1 = nn.Conv2d(injection_channels, c1, 3, stride=2, padding=1)

    def state_shapes(self, size: int) -> tuple[tuple[int, int, int], ...]:
        """Per-sample shapes of the two scales for ``size x size`` inputs."""
        return ((self.same0.in_channels, size, size),
                (self.same1.in_channels, size // 2, size // 2))

    def forward(self, zs: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        z0, z1 = zs
        up = 0.5 * F.interpolate(self.up(z1), scale_factor=2, mode="nearest")
        return (torch.tanh(self.same0(z0) + up + self.inject0(x)),
                torch.tanh(self.same1(z1) + self.down(z0) + self.inject1(x)))


class PoolHead(nn.Module):
    """Global average pool of each scale, concatenated, then a linear classifier."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * channels, classes)

    def forward(self, zs: tuple[Tensor, ...]) -> Tensor:
        return self.linear(torch.cat([z.mean(dim=(2, 3)) for z in zs], dim=1))


class ScalePredictor(nn.Module):
    """SkipDEQ predictor of the two-scale state: ``(tanh(conv(x)), tanh(strided conv(x)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fine = nn.Conv2d(channels, channels, 3, padding=1)
        self.coarse = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(self.fine(x)), torch.tanh(self.coarse(x))


@dataclass
class Task:
    """A data set and the modules around the equilibrium layer.

    ``encoder``, ``f``, ``head`` and ``predictor`` are factories of fresh modules; the caller
    seeds torch before calling them so every model of a task starts from the same weights.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    encoder: Callable[[], nn.Module]
    f: Callable[[], nn.Module]
    head: Callable[[], nn.Module]
    predictor: Callable[[], nn.Module]
    description: str
    #: Per-sample shapes of a multi-scale state (``None``: a single tensor state).
    state_shapes: tuple[tuple[int, ...], ...] | None = None
    #: The model whose final accuracy sets the target.
    reference: str = "NeuralODE"


def make_spirals(n: int, arms: int = 3, turns: float = 1.0, dim: int = 16, scale: float = 4.0,
                 noise: float = 0.04, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` points of ``arms`` interleaved spirals in a random plane of ``R^dim``.

    Radius grows linearly along each arm from ``0.15 * scale`` to ``scale``; Gaussian noise of
    std ``noise`` is added in all ``dim`` directions. Labels are the arm indices.
    Deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(arms, (n,), generator=g)
    t = torch.rand(n, generator=g)
    radius = 0.15 + 0.85 * t
    angle = 2 * math.pi * (turns * t + label / arms)
    plane = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    basis = torch.linalg.qr(torch.randn(dim, 2, generator=g))[0]
    x = scale * plane @ basis.T + noise * torch.randn(n, dim, generator=g)
    return x, label


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def load_task(name: str, width: int, n_train: int | None = None, n_test: int | None = None,
              device: torch.device | str = "cpu") -> Task:
    """Build task ``name`` (``TASKS``) with layer width ``width`` (channels for the conv task).

    ``n_train`` / ``n_test`` truncate the splits (reduced runs).
    """
    if name in ("digits-mlp", "digits-conv"):
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        if name == "digits-conv":
            x = x.reshape(-1, 1, 8, 8)
        xtr, ytr, xte, yte = _split(x, y, 0.3, seed=0)
    elif name == "spirals":
        x, y = make_spirals(3000)
        xtr, ytr, xte, yte = _split(x, y, 0.3, seed=0)
    elif name == "images-multiscale":
        x, y = procedural_images(3000, 16, classes=4, seed=0)
        xtr, ytr, xte, yte = _split(x, y, 0.3, seed=0)
    else:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    xtr, ytr = xtr[:n_train], ytr[:n_train]
    xte, yte = xte[:n_test], yte[:n_test]
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    w = width
    if name == "images-multiscale":
        return Task(
            name, xtr, ytr, xte, yte,
            encoder=lambda: nn.Conv2d(1, w, 3, padding=1),
            f=lambda: MultiScaleConvCell(w, w),
            head=lambda: PoolHead(w, 4),
            predictor=lambda: ScalePredictor(w),
            description=f"procedural 16x16 images, 4 classes, two scales ({w}x16x16, "
                        f"{2 * w}x8x8)",
            state_shapes=((w, 16, 16), (2 * w, 8, 8)),
            reference="MS NeuralODE",
        )
    if name == "digits-conv":
        return Task(
            name, xtr, ytr, xte, yte,
            encoder=lambda: nn.Conv2d(1, w, 3, padding=1),
            f=lambda: ConvCell(w),
            head=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64 * w, 10)),
            predictor=lambda: nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.Tanh()),
            description=f"digits as 1x8x8 images, conv f with {w} channels",
        )
    n_in = x.shape[1]
    n_out = int(y.max()) + 1
    desc = ("digits, MLP" if name == "digits-mlp"
            else f"{n_out}-arm spirals in R^{n_in} (procedural)") + f", width {w}"
    return Task(
        name, xtr, ytr, xte, yte,
        encoder=lambda: nn.Linear(n_in, w),
        f=lambda: TanhCell(w),
        head=lambda: nn.Linear(w, n_out),
        predictor=lambda: nn.Sequential(nn.Linear(w, w), nn.Tanh()),
        description=desc,
    )


TASKS = ("digits-mlp", "spirals", "digits-conv", "images-multiscale")
