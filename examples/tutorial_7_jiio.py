"""
Optimizing a DEQ's inputs: joint inference (JIIO)
=================================================

Many uses of a DEQ optimize over its *inputs*: the latent code of a generative model that
should reproduce an image, the clean image behind a noisy or partly hidden one, an adversarial
perturbation. Done naively, every gradient step on the input costs a full DEQ solve and a full
implicit backward. :func:`contdeq.jiio.joint_inference` (JIIO, Gurumurthy et al. 2021) instead
solves for the DEQ's state ``z``, its adjoint ``mu`` and the input ``x`` together, as one
augmented equilibrium::

    z  = f(z, x)
    mu = dL/dz + (df/dz)^T mu
    x  = P(x - alpha (dL/dx + (df/dx)^T mu))

iterated by Anderson, or integrated to its steady state (``solver="ode"``). We use it three
ways on scikit-learn's digits: to train a generative DEQ decoder *without an encoder* and
reconstruct held-out images, to denoise and inpaint with that decoder, and to train a DEQ
classifier adversarially. The models live in ``examples/jiio_tasks.py``; the benchmark
``benchmarks/jiio.py`` times JIIO against the nested loop (see :doc:`/jiio`).
"""

# %%
# Settings
# --------
# ``CONTDEQ_TUTORIAL_QUICK=1`` shrinks the run, ``CONTDEQ_TUTORIAL_OUT`` is the figure folder,
# ``CONTDEQ_TUTORIAL_QUIET=1`` silences the progress lines.

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from jiio_tasks import (
    LATENT_STEP,
    Classifier,
    Decoder,
    accuracy,
    corrupt,
    digits_split,
    fit_latents,
    jiio_attack,
    pgd_attack,
    psnr,
    train_classifier,
    train_decoder,
)

import contdeq
from contdeq.jiio import nested_inference

QUICK = os.environ.get("CONTDEQ_TUTORIAL_QUICK") == "1"
OUT_DIR = Path(os.environ.get("CONTDEQ_TUTORIAL_OUT", "outputs/tutorials")) / "jiio"
PROGRESS = os.environ.get("CONTDEQ_TUTORIAL_QUIET") != "1"
OUT_DIR.mkdir(parents=True, exist_ok=True)

TRAIN_SIZE = 128 if QUICK else None  # None: the whole training split (1,437 images)
TEST_SIZE = 16 if QUICK else 120
DECODER_EPOCHS = 1 if QUICK else 8
CLASSIFIER_EPOCHS = 1 if QUICK else 6
EPS = 0.1  # L∞ radius of the attacks, pixels in [0, 1]
torch.manual_seed(0)


def log(message: str) -> None:
    """Print a progress line unless ``CONTDEQ_TUTORIAL_QUIET=1``."""
    if PROGRESS:
        print(message, flush=True)


x_train, x_test, y_train, y_test = digits_split()
if TRAIN_SIZE is not None:
    x_train, y_train = x_train[:TRAIN_SIZE], y_train[:TRAIN_SIZE]
x_test, y_test = x_test[:TEST_SIZE], y_test[:TEST_SIZE]

# %%
# A generative DEQ trained by latent optimization
# -----------------------------------------------
# The decoder maps a latent ``x`` (10 numbers) to ``z* = f(z*, x)`` with
# ``f(z, x) = tanh(W z + U x + b)`` and renders ``sigmoid(V z* + c)``. There is no encoder:
# each training batch's latents are found by JIIO (40 steps at most), minimizing
# ``L = 1/2 ||image - render(z)||^2 + 0.05/2 ||x||^2``, and the decoder is then updated with
# :func:`contdeq.jiio.optimal_objective`. Its gradient is ``dL/dtheta + mu*^T df/dtheta`` at
# the joint solution: by the envelope theorem that is the gradient of the optimal value
# ``min_x L``, and the adjoint ``mu*`` came out of the joint solve, so training needs no
# backward linear solve at all.

decoder = Decoder()
start = time.perf_counter()
train_decoder(decoder, x_train, DECODER_EPOCHS, log=log)
log(f"decoder trained in {time.perf_counter() - start:.1f} s")

# %%
# Reconstructing held-out images is the same joint solve on test images. ``stats`` counts the
# calls of ``f`` and the VJPs, and reports the residual of each block.

z, latents, stats = fit_latents(decoder, x_test)
with torch.no_grad():
    reconstruction = decoder.render(z)
log(stats.summary())
log(f"held-out reconstruction MSE {float(((reconstruction - x_test) ** 2).mean()):.4f}")

# %%
# The naive alternative takes plain gradient steps on the latents with the same step size,
# each one a DEQ solve plus an implicit backward. It needs many more evaluations of ``f`` to
# come close to JIIO's objective:

x0, z0 = decoder.starts(len(x_test))
naive_steps = 5 if QUICK else 40
_, _, naive = nested_inference(
    decoder.cell, decoder.objective(x_test), x0, z0, steps=naive_steps, step_size=LATENT_STEP,
    solver=contdeq.ForwardSolver("anderson", atol=1e-3, rtol=1e-3))
log(f"JIIO: objective {float(stats.objective.mean()):.4f} with {stats.f_calls} f calls + "
    f"{stats.vjps} VJPs; nested loop ({naive_steps} steps): objective "
    f"{float(naive.objective.mean()):.4f} with {naive.f_calls} f calls + {naive.vjps} VJPs")

# %%
# Inverse problems: denoising and inpainting
# ------------------------------------------
# With the trained decoder, a corrupted image is restored by finding the latent whose rendering
# explains what was observed: for denoising the objective compares with the noisy image, for
# inpainting only the visible pixels count (``mask``). The decoder fills in the rest.

restored = {}
for task in ("denoise", "inpaint"):
    observed, mask = corrupt(x_test, task)
    z, _, task_stats = fit_latents(decoder, observed, mask)
    with torch.no_grad():
        restored[task] = (observed, decoder.render(z))
    log(f"{task}: PSNR observed {psnr(observed.clamp(0, 1), x_test):.2f} dB -> restored "
        f"{psnr(restored[task][1], x_test):.2f} dB ({task_stats.f_calls} f calls)")

# %%
# Adversarial training inside the augmented equilibrium
# -----------------------------------------------------
# For a DEQ classifier the input is the image; the attack maximizes the cross-entropy (JIIO
# minimizes its negative) over the L∞ ball of radius ``EPS`` around the image, intersected with
# the box ``[0, 1]``: ``project=compose(linf_ball(images, EPS), box(0, 1))``. Training on the
# attack's solution with minus :func:`~contdeq.jiio.optimal_objective` as the loss follows
# Danskin's theorem (the gradient of the max is the gradient at the maximizer). We compare
# with PGD adversarial training (10 signed-gradient steps, each a DEQ solve and backward) and
# with clean training, and evaluate every model under PGD and under the JIIO attack.

results = {}
for adversary in (None, "pgd", "jiio"):
    torch.manual_seed(0)
    model = Classifier()
    start = time.perf_counter()
    train_classifier(model, x_train, y_train, CLASSIFIER_EPOCHS, adversary, EPS, log=log)
    seconds = time.perf_counter() - start
    pgd_images = pgd_attack(model, x_test, y_test, EPS)
    _, jiio_images, _ = jiio_attack(model, x_test, y_test, EPS)
    results[adversary or "clean"] = {
        "clean": accuracy(model, x_test, y_test),
        "PGD": accuracy(model, pgd_images, y_test),
        "JIIO attack": accuracy(model, jiio_images, y_test),
        "seconds": seconds,
    }
    log(f"{adversary or 'clean'} training: " + ", ".join(
        f"{k} {v:.3f}" for k, v in results[adversary or "clean"].items()))

# %%
# Figures
# -------
# Top rows: held-out digits and their reconstructions; noisy, denoised; masked, inpainted.
# Right: accuracy of each classifier on clean and attacked test images.

fig = plt.figure(figsize=(13, 5))
rows = [("held-out", x_test), ("reconstructed", reconstruction),
        ("noisy", restored["denoise"][0]), ("denoised", restored["denoise"][1]),
        ("masked", restored["inpaint"][0]), ("inpainted", restored["inpaint"][1])]
columns = min(8, len(x_test))
for r, (label, images) in enumerate(rows):
    for c in range(columns):
        ax = fig.add_subplot(len(rows), columns + 6, r * (columns + 6) + c + 1)
        ax.imshow(images[c].reshape(8, 8).clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
            ax.set_ylabel(label, fontsize=7, rotation=0, ha="right")
bars = fig.add_axes((0.62, 0.15, 0.36, 0.75))
kinds = ["clean", "PGD", "JIIO attack"]
width = 0.25
for i, (name, res) in enumerate(results.items()):
    bars.bar([k + (i - 1) * width for k in range(len(kinds))], [res[k] for k in kinds], width,
             label=f"{name} training ({res['seconds']:.0f} s)")
bars.set_xticks(range(len(kinds)), [f"{k} test" for k in kinds])
bars.set_ylabel("accuracy")
bars.legend(fontsize=8)
fig.savefig(OUT_DIR / "applications.png", dpi=100)
log(f"saved {OUT_DIR / 'applications.png'}")

# %%
# Reading the numbers
# -------------------
# The joint solve never solves the DEQ to convergence for an input it is about to change, so
# it reaches the nested loop's objective with a fraction of its evaluations of ``f`` (compare
# the two counts printed above; ``benchmarks/jiio.py`` measures time and calls side by side,
# see :doc:`/jiio`). The decoder, trained with no encoder, restores noisy and masked digits:
# compare the PSNR of the corrupted and the restored images. The latent solves during
# training have a 40-step budget, and the printed fraction of converged samples falls as the
# decoder sharpens: the training gradient is then the envelope gradient at an approximate
# optimum. Adversarial training through the augmented equilibrium needs one joint solve per
# batch where PGD needs ten DEQ solves and backwards; compare the training times and the
# accuracies under both attacks in the figure.
