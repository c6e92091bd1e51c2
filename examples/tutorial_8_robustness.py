"""
Robustness of a DEQ: attacks, adversarial training along the dynamics
=====================================================================

A DEQ classifier's prediction is the steady state of ``dz/dt = f(z, x) - z``, so an adversarial
input is one that moves the steady state across a decision boundary. This tutorial trains a
small DEQ on scikit-learn's digits twice, with standard and with adversarial training, attacks
both three ways and adds an inference-time defence:

* :func:`contdeq.robust.pgd` through the layer's implicit gradient, the same attack through the
  unrolled solver (:func:`contdeq.robust.unrolled_gradients`) and torchattacks' gradient-free
  Square attack: a defence counts only where the three agree (gradient masking is the classic
  trap for implicit models);
* adversarial training whose loss is taken at *random intermediate states* of the solve
  (:func:`contdeq.robust.random_intermediate_states`, Yang et al. 2023);
* *entropy reduction* along the solve at inference
  (:func:`contdeq.robust.entropy_reduction`).

The benchmark ``benchmarks/robust.py`` runs these rows and more (LyapunovDEQ, NeuralODE, neural
SDE) on three tasks; see :doc:`/robustness`.
"""

# %%
# Settings
# --------
# ``CONTDEQ_TUTORIAL_QUICK=1`` shrinks the run, ``CONTDEQ_TUTORIAL_OUT`` is the figure folder,
# ``CONTDEQ_TUTORIAL_QUIET=1`` silences the progress lines.

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import contdeq
from contdeq.robust import (
    entropy_reduction,
    pgd,
    random_intermediate_states,
    robust_accuracy,
    unrolled_gradients,
)

QUICK = os.environ.get("CONTDEQ_TUTORIAL_QUICK") == "1"
OUT_DIR = Path(os.environ.get("CONTDEQ_TUTORIAL_OUT", "outputs/tutorials")) / "robustness"
PROGRESS = os.environ.get("CONTDEQ_TUTORIAL_QUIET") != "1"
OUT_DIR.mkdir(parents=True, exist_ok=True)

EPOCHS = 1 if QUICK else 6
TRAIN_SIZE = 128 if QUICK else None  # None: the whole training split (1,497 images)
TEST_SIZE = 32 if QUICK else 300
ATTACK_STEPS = 3 if QUICK else 20
SQUARE_QUERIES = 10 if QUICK else 300
EPS = 0.1  # L-inf radius on [0, 1] pixels
WIDTH = 32
torch.set_num_threads(1)


def log(message: str) -> None:
    """Print a progress line unless ``CONTDEQ_TUTORIAL_QUIET=1``."""
    if PROGRESS:
        print(message, flush=True)


# %%
# Data
# ----
# torchattacks' convention: images ``(N, 1, 8, 8)`` with pixels in ``[0, 1]``.

digits = load_digits()
images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
labels = torch.tensor(digits.target)
perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
x_train, y_train = images[perm[:-300]][:TRAIN_SIZE], labels[perm[:-300]][:TRAIN_SIZE]
x_test, y_test = images[perm[-300:]][:TEST_SIZE], labels[perm[-300:]][:TEST_SIZE]
log(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}")

# %%
# The model
# ---------
# ``flatten -> linear encoder -> DEQ -> linear head`` with ``f(z, x) = tanh(W z + x)``,
# ``||W||_2 <= 0.9``; Anderson acceleration forward, implicit backward. Both models start from
# the same weights.


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)``: ``z``, ``x`` ``(B, width)`` -> ``(B, width)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=0.9)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(z) + x)


def make_model() -> nn.Sequential:
    """``(B, 1, 8, 8)`` images -> ``(B, 10)`` logits."""
    torch.manual_seed(0)
    deq = contdeq.DEQ(TanhCell(WIDTH), solver="anderson", atol=1e-3, rtol=1e-3, max_steps=50)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, WIDTH), deq, nn.Linear(WIDTH, 10))


# %%
# Training, standard and adversarial
# ----------------------------------
# Adversarial training (Madry et al.) replaces each batch by a PGD attack on it (generated in
# eval mode, a short 3-step PGD to keep training cheap). With random intermediate states (the
# defaults of Yang et al.'s code) the training forward stops a Broyden solve at a random step
# ``k`` in 1..8 and takes one ``f`` step and five damped steps from there with autograd, so
# the loss is taken along the dynamics, not only at the equilibrium; evaluation mode is
# unchanged.


def train(model: nn.Module, adversarial: bool) -> float:
    """Train ``model``; returns the seconds taken."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        for idx in torch.randperm(len(y_train), generator=generator).split(64):
            xb, yb = x_train[idx], y_train[idx]
            if adversarial:
                model.eval()
                xb = pgd(model, xb, yb, EPS, steps=3)
                model.train()
                with random_intermediate_states(model, generator=generator):
                    loss = F.cross_entropy(model(xb), yb)
            else:
                model.train()
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        log(f"{'adversarial' if adversarial else 'standard'} training: epoch {epoch + 1}")
    model.eval()
    return time.perf_counter() - start


standard, defended = make_model(), make_model()
seconds = {"standard": train(standard, False), "AT + RIS": train(defended, True)}
log(f"training seconds: {seconds}")

# %%
# Three attacks
# -------------
# PGD-20 through the implicit gradient; the same PGD through the unrolled solver (an Anderson
# layer is solved by the ODE solver, with autograd through its steps, for the attack); Square,
# which only queries the model's outputs. ``entropy_reduction`` wraps the defended model at
# inference: every 2 solver steps through the whole solve, ten signed-gradient steps of
# ``EPS / 4`` on the raw pixels (``encoder=``, the module computing the layer's input) lower
# the prediction's entropy inside a ball of radius ``EPS`` around the image, then the solve
# continues on the re-encoded image. It is attacked adaptively (PGD through the defended
# model) and by transfer (PGD crafted on the same model without the defence).


def attacks(model: nn.Module) -> dict[str, tuple[object, bool]]:
    """Name -> (``attack(x, y)`` or ``None`` for the clean accuracy, through the unrolled
    solver?)."""
    def pgd20(x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, EPS, steps=ATTACK_STEPS)

    found: dict[str, tuple[object, bool]] = {
        "clean": (None, False), "PGD implicit": (pgd20, False), "PGD unrolled": (pgd20, True)}
    try:
        import torchattacks
    except ImportError:  # the optional extra ``robust``
        log("torchattacks is not installed: no Square attack")
    else:
        square = torchattacks.Square(model, eps=EPS, n_queries=SQUARE_QUERIES, seed=0)
        found["Square"] = (square, False)
    return found


def defence_of(model: nn.Sequential) -> object:
    """Entropy reduction on ``model``'s raw input (the context manager)."""
    return entropy_reduction(model, model[3], encoder=model[1], step_size=EPS / 4, eps=EPS)


def evaluate(model: nn.Sequential, defence: bool = False) -> dict[str, float]:
    """Accuracy under each attack, with entropy reduction at inference if ``defence``
    (adaptive attacks, and PGD transferred from the undefended model)."""
    results = {}
    for name, (attack, unrolled) in attacks(model).items():
        torch.manual_seed(0)
        gradients = unrolled_gradients(model) if unrolled else nullcontext()
        reduce_entropy = defence_of(model) if defence else nullcontext()
        with gradients, reduce_entropy:  # entropy reduction on the attack's solver
            results[name] = robust_accuracy(model, (x_test, y_test), attack)
    if defence:
        torch.manual_seed(0)
        results["PGD transfer"] = robust_accuracy(
            model, (x_test, y_test), lambda x, y: pgd(model, x, y, EPS, steps=ATTACK_STEPS),
            defence=lambda: defence_of(model))
    return results


results = {"standard": evaluate(standard), "AT + RIS": evaluate(defended),
           "AT + RIS + ER": evaluate(defended, defence=True)}
for model_name, row in results.items():
    log(f"{model_name:14s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))

# %%
# The picture
# -----------

fig, ax = plt.subplots(figsize=(8, 3.8))
names = list(results["AT + RIS + ER"])
width = 0.8 / len(results)
for i, (model_name, row) in enumerate(results.items()):
    ax.bar([j + i * width for j in range(len(names))], [row.get(n, 0.0) for n in names],
           width, label=model_name)
ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(names))], names)
ax.set_ylabel(f"accuracy (L-inf eps = {EPS})")
ax.set_ylim(0, 1)
ax.legend(fontsize=8)
ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
fig.savefig(OUT_DIR / "attacks.png", dpi=100)
log(f"saved {OUT_DIR / 'attacks.png'}")

# %%
# Reading the numbers
# -------------------
# A defence is credited with the *lowest* of its robust accuracies, and only where the
# implicit-gradient attack, the unrolled attack and Square agree within a few points: a much
# higher implicit-gradient number than unrolled or Square means the implicit gradient is
# masked, not that the model is robust. Entropy reduction is a change of the input the attack
# gradient does not see (the gradient passes straight through the input changes), so Square
# and the transfer attack are its decisive checks. The numbers below come from this run
# (quick settings say little).

for model_name, row in results.items():
    worst = min(v for k, v in row.items() if k != "clean")
    spread = max(v for k, v in row.items() if k != "clean") - worst
    print(f"{model_name:14s} clean {row['clean']:.3f}, worst attack {worst:.3f}, "
          f"spread of the attacks {spread:.3f}"
          f"{' (quick settings)' if QUICK else ''}")
