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

Every ``f`` caps its ``z``-weight at spectral norm 0.9 (:func:`contdeq.spectral_norm_cap`; for
the conv, the operator norm: see :class:`ConvCell`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

import contdeq

__all__ = ["TASKS", "ConvCell", "TanhCell", "Task", "load_task", "make_spirals"]

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
    else:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    xtr, ytr = xtr[:n_train], ytr[:n_train]
    xte, yte = xte[:n_test], yte[:n_test]
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    w = width
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


TASKS = ("digits-mlp", "spirals", "digits-conv")
