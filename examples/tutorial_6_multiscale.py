"""
Multi-scale DEQs for images
===========================

An image model sees fine detail at high resolution and whole objects at low resolution. A
multi-scale DEQ (MDEQ, Bai, Koltun & Kolter 2020) keeps one state per resolution and solves for
all of them at once: its state is a *tuple* ``(z_0, z_1, ...)`` with ``z_s`` of shape
``(B, C_s, H / 2^s, W / 2^s)``, and ``f(zs, x)`` returns such a tuple.

* :class:`contdeq.MultiScaleDEQ`, :class:`contdeq.MultiScaleSkipDEQ`,
  :class:`contdeq.MultiScaleSkipRegDEQ` and :class:`contdeq.MultiScaleNeuralODE` take
  ``state_shapes=[(C_0, H, W), (C_1, H/2, W/2), ...]`` and return tuples; everything else
  (solvers, backward modes, ``stats``, ``aux_loss``) is as for the single-scale layers. A
  sample has converged when its residual over all scales together meets the tolerance.
* :class:`contdeq.MultiScaleCell` is a ready-made ``f``: a residual block per scale, then a
  fusion that exchanges information between scales.

We train a continuous MDEQ, a Skip MDEQ and a multi-scale neural ODE with the same cell on
:func:`contdeq.procedural_images` (shapes and textures; no download) and compare accuracy,
NFE and time.
"""

# %%
# Settings
# --------
# ``CONTDEQ_TUTORIAL_QUICK=1`` shrinks the run, ``CONTDEQ_TUTORIAL_OUT`` is the figure folder,
# ``CONTDEQ_TUTORIAL_QUIET=1`` silences the per-epoch progress lines.

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

import contdeq

QUICK = os.environ.get("CONTDEQ_TUTORIAL_QUICK") == "1"
OUT_DIR = Path(os.environ.get("CONTDEQ_TUTORIAL_OUT", "outputs/tutorials")) / "multiscale"
PROGRESS = os.environ.get("CONTDEQ_TUTORIAL_QUIET") != "1"
OUT_DIR.mkdir(parents=True, exist_ok=True)

EPOCHS = 1 if QUICK else 6
TRAIN_SIZE = 64 if QUICK else 1000
TEST_SIZE = 64 if QUICK else 500
CHANNELS = [4, 8] if QUICK else [8, 16]  # channels per scale, finest first
BATCH_SIZE = 32
torch.manual_seed(0)


def log(message: str) -> None:
    """Print a progress line unless ``CONTDEQ_TUTORIAL_QUIET=1``."""
    if PROGRESS:
        print(message, flush=True)


# %%
# Data
# ----
# Eight classes of 16x16 grey images: disk, ring, bar, cross, square, checkerboard, stripes and
# dots, each at a random position, size, orientation and contrast, on a shaded, noisy
# background. Textures (checkerboard, stripes) differ from plain shapes in fine detail, rings
# from dots in their overall layout: both resolutions matter. Train and test sets come from
# different seeds.

x_train, y_train = contdeq.procedural_images(TRAIN_SIZE, seed=0)
x_test, y_test = contdeq.procedural_images(TEST_SIZE, seed=1)

fig, axes = plt.subplots(1, 8, figsize=(10, 1.6))
for k, ax in enumerate(axes):
    ax.imshow(x_train[y_train == k][0, 0].numpy(), cmap="gray")
    ax.set_title(contdeq.PROCEDURAL_CLASSES[k], fontsize=8)
    ax.axis("off")
fig.tight_layout()

# %%
# Models
# ------
# ``stem -> multi-scale layer -> head``: a 3x3 convolution lifts the image to ``CHANNELS[0]``
# channels; the layer solves for one state per scale; the head maps each scale through a 1x1
# convolution and a ReLU, takes the maximum over space (is the pattern anywhere?) and
# classifies the concatenation.
# :meth:`contdeq.MultiScaleCell.state_shapes` gives the per-sample shapes the layer needs.
#
# ``normalization="spectral"`` caps every convolution of the cell that acts on the state
# (operator norm <= 0.9). With the cell's GroupNorms (``norm_eps=1``) this keeps ``f`` well
# conditioned while it trains: the forward NFE stays in the tens. With MDEQ's weight
# normalization instead (``normalization="weight"``), the weights' scale is free, and in our
# runs single samples hit a 100-step solver limit (600 ``f`` calls) within two epochs.
#
# The Skip MDEQ's predictor guesses every scale's state from ``x`` with one (strided)
# convolution and a GroupNorm per scale: it returns a tuple, like ``f``. The neural ODE
# integrates the same ``dzs/dt = f(zs, x) - zs`` to ``t = 4`` instead of to steady state.

SOLVER_OPTIONS = {"atol": 1e-2, "rtol": 1e-2, "backward_rtol": 1e-3}


class Predictor(nn.Module):
    """``x`` ``(B, C_0, H, W)`` -> tuple of ``(B, C_s, H / 2^s, W / 2^s)``."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[0], c, 3, stride=2**s, padding=1),
                          nn.GroupNorm(4, c, eps=1.0))
            for s, c in enumerate(channels)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(head(x) for head in self.heads)


class Classifier(nn.Module):
    """``(B, 1, 16, 16)`` images -> ``(B, 8)`` logits through a multi-scale layer."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        cell = contdeq.MultiScaleCell(CHANNELS, CHANNELS[0], normalization="spectral")
        shapes = cell.state_shapes(16, 16)
        self.stem = nn.Conv2d(1, CHANNELS[0], 3, padding=1)
        if kind == "MDEQ":
            self.layer: nn.Module = contdeq.MultiScaleDEQ(cell, state_shapes=shapes,
                                                          **SOLVER_OPTIONS)
        elif kind == "Skip MDEQ":
            self.layer = contdeq.MultiScaleSkipDEQ(cell, Predictor(CHANNELS),
                                                   state_shapes=shapes, **SOLVER_OPTIONS)
        else:
            self.layer = contdeq.MultiScaleNeuralODE(cell, t_end=4.0, state_shapes=shapes,
                                                     rtol=1e-3, atol=1e-3)
        self.pools = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 32, 1), nn.ReLU())
                                   for c in CHANNELS)
        self.head = nn.Linear(32 * len(CHANNELS), 8)

    def forward(self, x: Tensor) -> Tensor:
        zs = self.layer(self.stem(x))
        features = [pool(z).amax(dim=(2, 3)) for pool, z in zip(self.pools, zs, strict=True)]
        return self.head(torch.cat(features, dim=1))


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` ``(N, 1, 16, 16)`` classified as ``y`` ``(N,)``."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


# %%
# Training
# --------
# The loss is cross-entropy plus :func:`contdeq.aux_loss` (the Skip MDEQ's skip term). We record
# the test accuracy, the mean forward and backward NFE per batch and the time of each epoch.


def train(kind: str) -> dict[str, list[float]]:
    """Train one model; its per-epoch history."""
    torch.manual_seed(0)
    model = Classifier(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history: dict[str, list[float]] = {"accuracy": [], "nfe": [], "backward_nfe": [],
                                       "seconds": []}
    for epoch in range(EPOCHS):
        model.train()
        start = time.perf_counter()
        nfe, backward_nfe = [], []
        for idx in torch.randperm(len(x_train)).split(BATCH_SIZE):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            (loss + contdeq.aux_loss(model)).backward()
            optimizer.step()
            stats = model.layer.stats
            nfe.append(stats.forward.nfe)
            backward_nfe.append(stats.backward.nfe if stats.backward is not None else 0)
        history["seconds"].append(time.perf_counter() - start)
        history["accuracy"].append(accuracy(model, x_test, y_test))
        history["nfe"].append(sum(nfe) / len(nfe))
        history["backward_nfe"].append(sum(backward_nfe) / len(backward_nfe))
        log(f"[{kind:10s}] epoch {epoch + 1}/{EPOCHS}  test acc {history['accuracy'][-1]:.3f}  "
            f"NFE {history['nfe'][-1]:5.1f} (backward {history['backward_nfe'][-1]:4.1f})  "
            f"{history['seconds'][-1]:.1f} s")
    return history


histories = {kind: train(kind) for kind in ("MDEQ", "Skip MDEQ", "Neural ODE")}

# %%
# Accuracy, NFE and time
# ----------------------
# The forward NFE counts every call of ``f`` (all scales at once). The neural ODE has no
# backward NFE: it backpropagates through its solver's steps, which costs memory instead.

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
epochs = range(1, EPOCHS + 1)
for color, (kind, hist) in enumerate(histories.items()):
    style = {"marker": "o", "color": f"C{color}", "label": kind}
    axes[0].plot(epochs, hist["accuracy"], **style)
    axes[1].plot(epochs, hist["nfe"], **style)
    axes[2].plot(epochs, hist["seconds"], **style)
axes[0].set_ylabel("test accuracy")
axes[1].set_ylabel("mean forward NFE per batch")
axes[2].set_ylabel("seconds per epoch")
for ax in axes:
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT_DIR / "comparison.png", dpi=100)
log(f"saved {OUT_DIR / 'comparison.png'}")

# %%
# Summary
# -------
# The last epoch of each model and its total training time, computed from this run (at quick
# settings the models are barely trained). The neural ODE's ``t = 4`` is close to the steady
# state of this contractive cell, so its forward NFE should be near the MDEQ's; but it
# backpropagates through every solver stage, while the equilibrium models' backward is one
# linear solve at ``z*``: compare the times. The Skip MDEQ's predictor aims to save ``f`` calls
# per forward solve.

first = next(iter(histories))
for kind, hist in histories.items():
    slower = sum(hist["seconds"]) / sum(histories[first]["seconds"])
    print(f"{kind:10s} accuracy {hist['accuracy'][-1]:.3f}  forward NFE {hist['nfe'][-1]:5.1f}  "
          f"backward NFE {hist['backward_nfe'][-1]:4.1f}  {sum(hist['seconds']):5.1f} s "
          f"({slower:.2f}x {first})")

# %%
# Real images
# -----------
# CIFAR-10 works the same way with three input channels and 32x32 images: read it with the
# numpy loaders of ``examples/real_data.py`` (see :doc:`/auto_examples/tutorial_5_real_data`;
# torchvision only to download) and build the cell for that size::
#
#     from real_data import load_cifar10
#
#     images, labels = load_cifar10("~/data")               # uint8 (N, 3, 32, 32), (N,)
#     x = torch.from_numpy(images).float() / 255
#     y = torch.from_numpy(labels)
#     cell = contdeq.MultiScaleCell([32, 64, 128], 32, normalization="spectral")
#     layer = contdeq.MultiScaleDEQ(cell, state_shapes=cell.state_shapes(32, 32))
#     # stem: nn.Conv2d(3, 32, 3, padding=1); head as above with 10 classes
