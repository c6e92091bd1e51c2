"""The models and tasks of the JIIO tutorial and benchmark, on scikit-learn's 8x8 digits.

* A generative DEQ decoder ``latent x (B, L) -> image (B, 64)`` with no encoder: trained with
  latent optimization (each batch's latents found by :func:`contdeq.jiio.joint_inference`, the
  decoder updated by :func:`contdeq.jiio.optimal_objective`), then used to reconstruct held-out
  images, denoise and inpaint them by optimizing latents.
* A DEQ classifier ``image (B, 64) -> logits (B, 10)``, adversarially trained with the inner
  maximization inside the augmented equilibrium (L∞ ball and [0, 1] box), or with PGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import contdeq
from contdeq.jiio import box, compose, joint_inference, linf_ball, nested_inference

Objective = Callable[[Tensor, Tensor], Tensor]
#: Tolerance of the solves inside training and attacks (which also have a step budget; the
#: decoder's training loop prints the fraction of samples that converged).
TOLERANCE = 1e-3


def digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits in ``[0, 1]``: ``(x_train (N, 64), x_test, y_train (N,), y_test)``."""
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels)
    return x_train, x_test, y_train, y_test


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + U x + b)`` with ``||W||_2 <= cap``: ``z`` ``(B, width)``, ``x``
    ``(B, inputs)``."""

    def __init__(self, inputs: int, width: int, cap: float = 0.8) -> None:
        super().__init__()
        self.state = contdeq.spectral_norm_cap(nn.Linear(width, width), cap=cap)
        self.inject = nn.Linear(inputs, width)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.state(z) + self.inject(x))


class Decoder(nn.Module):
    """Generative DEQ: latent ``x`` ``(B, latent)`` -> ``z* = f(z*, x)`` -> image ``(B, 64)``."""

    def __init__(self, latent: int = 10, width: int = 64) -> None:
        super().__init__()
        self.latent, self.width = latent, width
        self.cell = TanhCell(latent, width)
        self.readout = nn.Linear(width, 64)

    def render(self, z: Tensor) -> Tensor:
        """``(B, width)`` equilibrium -> ``(B, 64)`` image in ``(0, 1)``."""
        return torch.sigmoid(self.readout(z))

    def objective(self, target: Tensor, mask: Tensor | None = None, prior: float = 0.05
                  ) -> Objective:
        """``1/2 ||mask * (render(z) - target)||^2 + prior/2 ||x||^2`` per sample."""
        def objective(z: Tensor, x: Tensor) -> Tensor:
            r = self.render(z) - target
            if mask is not None:
                r = r * mask
            return 0.5 * (r**2).sum(1) + 0.5 * prior * (x**2).sum(1)
        return objective

    def starts(self, batch: int) -> tuple[Tensor, Tensor]:
        """Initial latents and states, zeros ``(B, latent)``, ``(B, width)``."""
        return torch.zeros(batch, self.latent), torch.zeros(batch, self.width)


#: Gradient step on the decoder's latents (JIIO and the nested loop use the same).
LATENT_STEP = 0.5


def fit_latents(decoder: Decoder, target: Tensor, mask: Tensor | None = None,
                max_steps: int = 300, atol: float = 1e-4, rtol: float = 1e-4,
                **options: object) -> tuple[Tensor, Tensor, object]:
    """Latents of ``target`` ``(B, 64)`` by JIIO: ``(z*, x*, stats)``; ``max_steps``, ``atol``,
    ``rtol`` and ``options`` go to :func:`~contdeq.jiio.joint_inference`."""
    x0, z0 = decoder.starts(target.shape[0])
    return joint_inference(decoder.cell, decoder.objective(target, mask), x0, z0,
                           step_sizes=LATENT_STEP, atol=atol, rtol=rtol, max_steps=max_steps,
                           on_nonconvergence="ignore", **options)


def train_decoder(decoder: Decoder, images: Tensor, epochs: int, batch_size: int = 128,
                  lr: float = 3e-3, log: Callable[[str], None] = print) -> list[float]:
    """Latent-optimization training; returns the mean objective per epoch."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        losses, converged = [], []
        for idx in torch.randperm(len(images)).split(batch_size):
            contdeq.update_normalization(decoder)
            target = images[idx]
            z, x, stats = fit_latents(decoder, target, max_steps=40, atol=TOLERANCE,
                                      rtol=TOLERANCE)
            loss = contdeq.jiio.optimal_objective(
                decoder.cell, decoder.objective(target), z, x, stats.adjoint).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            converged.append(float(stats.solver.converged.float().mean()))
        history.append(sum(losses) / len(losses))
        log(f"[decoder] epoch {epoch + 1}/{epochs}  objective {history[-1]:.3f}  "
            f"JIIO converged {sum(converged) / len(converged):.0%}")
    return history


def psnr(estimate: Tensor, clean: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in ``[0, 1]``, ``(B, 64)`` each."""
    return 10.0 * math.log10(1.0 / float(((estimate - clean) ** 2).mean()))


def corrupt(images: Tensor, task: str, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """``(observed (B, 64), mask (B, 64) or None)``: Gaussian noise (sigma 0.3) for
    ``"denoise"``; for ``"inpaint"`` a random 4x4 square hidden (mask 0 there)."""
    gen = torch.Generator().manual_seed(seed)
    if task == "denoise":
        return images + 0.3 * torch.randn(images.shape, generator=gen), None
    if task == "inpaint":
        mask = torch.ones(images.shape[0], 8, 8)
        corners = torch.randint(0, 5, (images.shape[0], 2), generator=gen)
        for i, (r, c) in enumerate(corners.tolist()):
            mask[i, r:r + 4, c:c + 4] = 0.0
        mask = mask.reshape(-1, 64)
        return images * mask, mask
    raise ValueError(f"task must be 'denoise' or 'inpaint', got {task!r}")


class Classifier(nn.Module):
    """DEQ classifier: image ``(B, 64)`` -> ``z* = f(z*, image)`` -> logits ``(B, 10)``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.cell = TanhCell(64, width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: Tensor) -> Tensor:
        z, _ = contdeq.equilibrium(
            self.cell, images, torch.zeros(images.shape[0], self.width),
            solver=contdeq.ForwardSolver("anderson", atol=TOLERANCE, rtol=TOLERANCE))
        return self.head(z)

    def attack_objective(self, labels: Tensor) -> Objective:
        """Minus the cross-entropy per sample (JIIO minimizes; the attack maximizes CE)."""
        def objective(z: Tensor, x: Tensor) -> Tensor:
            return -nn.functional.cross_entropy(self.head(z), labels, reduction="none")
        return objective


#: Gradient step of the JIIO attack (and the nested loop's, in the benchmark).
ATTACK_STEP = 8.0


def threat(images: Tensor, eps: float) -> Callable[[Tensor], Tensor]:
    """Projection onto the L∞ ball of radius ``eps`` around ``images`` and the box [0, 1]."""
    return compose(linf_ball(images, eps), box(0.0, 1.0))


#: Solver of the JIIO attack: the L∞ ball and box make the input block piecewise linear (the
#: solution sits in corners), where Anderson's extrapolation stalls and Picard converges
#: (74 against 300+ augmented steps in ``benchmarks/jiio.py``'s tuning runs).
ATTACK_SOLVER = "picard"


def jiio_attack(model: Classifier, images: Tensor, labels: Tensor, eps: float,
                max_steps: int = 30, **options: object) -> tuple[Tensor, Tensor, object]:
    """Adversarial images by JIIO: ``(z*, x_adv (B, 64), stats)``."""
    options = {"solver": ATTACK_SOLVER, **options}
    return joint_inference(model.cell, model.attack_objective(labels), images,
                           torch.zeros(images.shape[0], model.width), project=threat(images, eps),
                           step_sizes=ATTACK_STEP, atol=TOLERANCE, rtol=TOLERANCE,
                           max_steps=max_steps, on_nonconvergence="ignore", **options)


def pgd_attack(model: Classifier, images: Tensor, labels: Tensor, eps: float, steps: int = 10
               ) -> Tensor:
    """PGD: ``steps`` signed-gradient steps of ``eps / 4`` (each a DEQ solve and implicit
    backward), projected; returns ``x_adv`` ``(B, 64)``."""
    _, x, _ = nested_inference(
        model.cell, model.attack_objective(labels), images, torch.zeros(len(images), model.width),
        steps=steps, step_size=eps / 4, project=threat(images, eps), sign_gradient=True,
        solver=contdeq.ForwardSolver("anderson", atol=TOLERANCE, rtol=TOLERANCE))
    return x


def train_classifier(model: Classifier, images: Tensor, labels: Tensor, epochs: int,
                     adversary: str | None, eps: float, batch_size: int = 128, lr: float = 3e-3,
                     log: Callable[[str], None] = print) -> None:
    """Train on clean images (``adversary=None``), on JIIO's adversarial images (``"jiio"``:
    the loss is minus :func:`~contdeq.jiio.optimal_objective`, no extra DEQ solve) or on PGD's
    (``"pgd"``)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        losses = []
        for idx in torch.randperm(len(images)).split(batch_size):
            contdeq.update_normalization(model)
            x, y = images[idx], labels[idx]
            if adversary == "jiio":
                z, x_adv, stats = jiio_attack(model, x, y, eps)
                loss = -contdeq.jiio.optimal_objective(
                    model.cell, model.attack_objective(y), z, x_adv, stats.adjoint).mean()
            else:
                x_in = pgd_attack(model, x, y, eps) if adversary == "pgd" else x
                loss = nn.functional.cross_entropy(model(x_in), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        log(f"[{adversary or 'clean'}] epoch {epoch + 1}/{epochs}  loss "
            f"{sum(losses) / len(losses):.3f}")


def accuracy(model: Classifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` ``(B, 64)`` classified as ``labels`` ``(B,)``."""
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())
