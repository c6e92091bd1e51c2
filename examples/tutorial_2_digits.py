"""
Training a DEQ classifier on digits
===================================

A continuous DEQ and a neural ODE built on the *same* cell ``f(z, x)`` are trained on
scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn, so no download). The DEQ
returns the steady state of ``dz/dt = f(z, x) - z``; the neural ODE returns ``z(1)`` of the
same ODE. We record test accuracy and the number of ``f`` evaluations (NFE) per epoch, forward
and backward.
"""

# %%
# Settings
# --------
# ``CONTDEQ_TUTORIAL_QUICK=1`` shrinks the run (tests, ``make docs-quick``),
# ``CONTDEQ_TUTORIAL_OUT`` is the figure folder, ``CONTDEQ_TUTORIAL_QUIET=1`` silences the
# per-epoch progress lines.

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import contdeq

QUICK = os.environ.get("CONTDEQ_TUTORIAL_QUICK") == "1"
OUT_DIR = Path(os.environ.get("CONTDEQ_TUTORIAL_OUT", "outputs/tutorials")) / "digits"
PROGRESS = os.environ.get("CONTDEQ_TUTORIAL_QUIET") != "1"
OUT_DIR.mkdir(parents=True, exist_ok=True)

EPOCHS = 2 if QUICK else 10
WIDTH = 16 if QUICK else 64
TRAIN_SIZE = 128 if QUICK else None  # None: the whole training split (1,437 images)
BATCH_SIZE = 128
torch.manual_seed(0)


def log(message: str) -> None:
    """Print a progress line unless ``CONTDEQ_TUTORIAL_QUIET=1``."""
    if PROGRESS:
        print(message, flush=True)


# %%
# Data
# ----
# Pixels are scaled to ``[0, 1]``; ``x`` is ``(N, 64)``, labels ``(N,)``.

digits = load_digits()
images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
labels = torch.tensor(digits.target)
x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=0.2, random_state=0, stratify=labels
)
if TRAIN_SIZE is not None:
    x_train, y_train = x_train[:TRAIN_SIZE], y_train[:TRAIN_SIZE]
log(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}")

# %%
# The cell and the two models
# ---------------------------
# ``f(z, x) = tanh(W z + x)`` with ``||W||_2 <= 0.9`` (:func:`contdeq.spectral_norm_cap`), so
# ``f`` is a contraction in ``z`` and the equilibrium exists and is unique. The input is
# embedded once, outside the cell; both models share the architecture
# ``embed -> layer -> head``.


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)``: ``z``, ``x`` ``(B, width)`` -> ``(B, width)``."""

    def __init__(self, width: int, cap: float = 0.9) -> None:
        super().__init__()
        self.linear = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=cap)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(z) + x)


def make_model(kind: str) -> nn.Sequential:
    """``embed -> DEQ or NeuralODE -> head``, ``(B, 64) -> (B, 10)`` logits."""
    cell = TanhCell(WIDTH)
    if kind == "DEQ":
        # ODE forward (dopri5) to rms(dz/dt) <= 1e-3 + 1e-3 rms(z), implicit backward.
        layer: nn.Module = contdeq.DEQ(cell, method="dopri5", atol=1e-3, rtol=1e-3)
    else:
        # The same integrator tolerances as the DEQ's (10x tighter than its steady-state
        # test); backpropagation through the solver's steps.
        layer = contdeq.NeuralODE(cell, t_end=1.0, atol=1e-4, rtol=1e-4)
    return nn.Sequential(nn.Linear(64, WIDTH), layer, nn.Linear(WIDTH, 10))


# %%
# Training loop
# -------------
# After every ``backward()`` the layer's ``stats`` hold the forward solve and (for the DEQ's
# implicit backward) the linear solve of the backward pass.


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` ``(N, 64)`` classified as ``y`` ``(N,)``."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(kind: str) -> dict[str, list[float]]:
    """Train one model; per-epoch test accuracy, mean forward/backward NFE and time."""
    torch.manual_seed(0)
    model = make_model(kind)
    layer = model[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history: dict[str, list[float]] = {"accuracy": [], "nfe_forward": [], "nfe_backward": [],
                                       "seconds": []}
    for epoch in range(EPOCHS):
        model.train()
        start = time.perf_counter()
        forward_nfe, backward_nfe = [], []
        for idx in torch.randperm(len(x_train)).split(BATCH_SIZE):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            forward_nfe.append(layer.stats.forward.nfe)
            if layer.stats.backward is not None:
                backward_nfe.append(layer.stats.backward.nfe)
        history["seconds"].append(time.perf_counter() - start)
        history["accuracy"].append(accuracy(model, x_test, y_test))
        history["nfe_forward"].append(sum(forward_nfe) / len(forward_nfe))
        history["nfe_backward"].append(
            sum(backward_nfe) / len(backward_nfe) if backward_nfe else 0.0
        )
        log(f"[{kind:9s}] epoch {epoch + 1}/{EPOCHS}  test acc {history['accuracy'][-1]:.3f}  "
            f"NFE fwd {history['nfe_forward'][-1]:5.1f} bwd {history['nfe_backward'][-1]:5.1f}  "
            f"{history['seconds'][-1]:.1f} s")
    return history


histories = {kind: train(kind) for kind in ("DEQ", "NeuralODE")}

# %%
# Accuracy and NFE per epoch
# --------------------------
# The neural ODE's backward pass differentiates through every solver step, so its backward
# "NFE" is not a separate solve (it is shown as 0); its cost shows in the time per epoch. The
# DEQ's backward is one linear solve at ``z*`` whose iterations are counted as VJPs of ``f``.

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
epochs = range(1, EPOCHS + 1)
for kind, hist in histories.items():
    axes[0].plot(epochs, hist["accuracy"], "o-", label=kind)
    axes[1].plot(epochs, hist["nfe_forward"], "o-", label=f"{kind} forward")
    if any(hist["nfe_backward"]):
        axes[1].plot(epochs, hist["nfe_backward"], "s--", label=f"{kind} backward (VJPs)")
    axes[2].plot(epochs, hist["seconds"], "o-", label=kind)
axes[0].set_ylabel("test accuracy")
axes[1].set_ylabel("mean NFE per batch")
axes[2].set_ylabel("seconds per epoch")
for ax in axes:
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT_DIR / "deq_vs_node.png", dpi=100)
log(f"saved {OUT_DIR / 'deq_vs_node.png'}")

# %%
# Reading the numbers
# -------------------
# The neural ODE stops at ``t = 1``, so its forward spends a fixed pseudo-time; the DEQ
# integrates until the residual vanishes, which can take longer. In exchange the DEQ's output
# is a fixed point, independent of the solver's path: its backward is one linear solve at
# ``z*`` (the backward VJPs above) with memory independent of the number of steps, while the
# neural ODE keeps (and backpropagates through) every step. The comparison below is computed
# from this run (at quick settings, ``CONTDEQ_TUTORIAL_QUICK=1``, the models are barely
# trained and the figures say little). :doc:`/auto_examples/tutorial_3_skip_deq` shows how an
# explicit initial guess cuts the DEQ's forward NFE.

final = {kind: hist["accuracy"][-1] for kind, hist in histories.items()}
gap = final["DEQ"] - final["NeuralODE"]
verdict = ("similar accuracy" if abs(gap) < 0.02 else
           f"the {'DEQ' if gap > 0 else 'neural ODE'} ahead by {abs(gap):.3f}")
print(f"final test accuracy: DEQ {final['DEQ']:.3f}, NeuralODE {final['NeuralODE']:.3f} "
      f"({verdict}; {EPOCHS} epochs{', quick settings' if QUICK else ''})")
for kind, hist in histories.items():
    print(f"{kind:10s} last epoch: forward NFE {hist['nfe_forward'][-1]:5.1f}, backward "
          f"{hist['nfe_backward'][-1]:5.1f}, {hist['seconds'][-1]:.1f} s")
