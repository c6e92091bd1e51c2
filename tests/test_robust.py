"""Attacks through equilibrium layers: contdeq.robust and torchattacks on contdeq models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import contdeq
from contdeq.robust import pgd, robust_accuracy, unrolled_gradients
from tests.layer_models import TanhCell

WIDTH, FEATURES, CLASSES = 6, 5, 3


def classifier(solver: str = "anderson", backward: str = "implicit",
               dtype: torch.dtype = torch.float64, tol: float = 1e-5,
               features: int = FEATURES) -> nn.Sequential:
    """``(B, ...) -> (B, CLASSES)`` logits through one DEQ layer, in eval mode (inputs are
    flattened to ``features``)."""
    deq = contdeq.DEQ(TanhCell(WIDTH, features, lipschitz=0.7, dtype=dtype), solver=solver,
                      backward=backward, state_shape=WIDTH, atol=tol, rtol=tol,
                      backward_tol=tol, backward_max_steps=200)
    head = nn.Linear(WIDTH, CLASSES, dtype=dtype)
    return nn.Sequential(nn.Flatten(), deq, head).eval()


def inputs(n: int = 8, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, FEATURES, dtype=dtype), torch.randint(0, CLASSES, (n,))


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return g


@pytest.mark.parametrize("solver", ["anderson", "ode"])
def test_eval_mode_input_gradient_matches_unrolled(solver: str) -> None:
    """An eval-mode DEQ gives the input gradient of the unrolled solver (implicit backward):
    catches an eval path that detaches x or drops the implicit backward."""
    model = classifier(solver, tol=1e-10)
    x, y = inputs()
    implicit = input_gradient(model, x, y)
    with unrolled_gradients(model):
        unrolled = input_gradient(model, x, y)
    assert implicit.abs().max() > 1e-3
    torch.testing.assert_close(implicit, unrolled, rtol=1e-5, atol=1e-7)


def test_unrolled_gradients_switches_and_restores_layers() -> None:
    """The context manager makes every DEQ layer unrolled with an autograd-safe solver and
    restores the exact configuration afterwards, also after an exception: catches a leak
    of the attack's settings into the model."""
    model = classifier("anderson", tol=1e-9)
    deq = model[1]
    mode, train_solver, eval_solver = deq.backward_mode, deq.solver, deq.eval_solver
    with pytest.raises(RuntimeError, match="boom"), unrolled_gradients(model, solver="picard"):
        assert isinstance(deq.backward_mode, contdeq.Unrolled)
        assert deq.solver.solver == deq.eval_solver.solver == "picard"
        assert deq.solver.options["atol"] == 1e-9  # the tolerances are kept
        raise RuntimeError("boom")
    assert deq.backward_mode is mode
    assert deq.solver is train_solver and deq.eval_solver is eval_solver


def test_jfb_gradient_differs_from_unrolled() -> None:
    """A Jacobian-free backward gives a different input gradient than the computation the
    solver performed (the gradient-masking risk that the unrolled attack checks); catches an
    unrolled_gradients that leaves the layer's backward in place."""
    model = classifier("ode", backward="jfb")
    x, y = inputs()
    jfb = input_gradient(model, x, y)
    with unrolled_gradients(model):
        unrolled = input_gradient(model, x, y)
    assert (jfb - unrolled).abs().max() > 1e-3 * unrolled.abs().max()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_beats_random_noise(norm: str) -> None:
    """PGD stays within eps of x and inside the clamp range, and raises the loss more than
    random noise of the same size: catches a wrong projection, a sign error, or an attack
    that never follows the gradient."""
    model = classifier()
    x, y = inputs(12)
    eps = 0.1 if norm == "linf" else 0.3
    x_adv = pgd(model, x, y, eps, norm=norm, steps=5)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps + 1e-9).all())
    assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
    noise = pgd(model, x, y, eps, norm=norm, steps=1, alpha=0.0)  # the random start only
    with torch.no_grad():
        clean, noisy, adv = (F.cross_entropy(model(t), y) for t in (x, noise, x_adv))
    assert adv > noisy + 1e-3 and adv > clean + 1e-3


def test_pgd_single_step_is_fgsm_on_a_linear_model() -> None:
    """One linf step of size eps from x is x + eps * sign(grad) for a linear model (FGSM);
    catches a wrong step or projection formula."""
    model = nn.Linear(FEATURES, CLASSES, dtype=torch.float64)
    x, y = inputs()
    grad = input_gradient(model, x, y)
    x_adv = pgd(model, x, y, 0.05, steps=1, alpha=0.05, random_start=False, clamp=None)
    torch.testing.assert_close(x_adv, x + 0.05 * grad.sign())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"eps": -0.1}, "eps must be"),
    ({"norm": "l_inf"}, "norm must be one of"),
    ({"steps": 0}, "steps must be"),
    ({"alpha": -1.0}, "alpha must be"),
    ({"clamp": (1, 0)}, "clamp must be"),
])
def test_pgd_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    """Each bad argument raises a ValueError naming it: catches silently accepted input."""
    model = classifier()
    x, y = inputs()
    args = {"eps": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        pgd(model, x, y, **args)


def test_robust_accuracy_counts_correct_predictions() -> None:
    """Clean accuracy equals a hand count, for tensors and for an iterable of batches, and an
    attack that flips inputs to another class's prototype lowers it to zero: catches wrong
    counting or batching."""
    model = classifier()
    x, y = inputs(10)
    with torch.no_grad():
        pred = model(x).argmax(1)
    expected = float((pred == y).double().mean())
    assert robust_accuracy(model, (x, y), None, batch_size=3) == pytest.approx(expected)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    assert robust_accuracy(model, batches, None) == pytest.approx(expected)
    wrong = (pred + 1) % CLASSES  # labels the model never predicts
    assert robust_accuracy(model, (x, wrong), lambda a, b: a) == 0.0
    with pytest.raises(ValueError, match="same number of samples"):
        robust_accuracy(model, (x, y[:3]), None)


torchattacks = pytest.importorskip(
    "torchattacks", reason="torchattacks is not installed (pip install contdeq[robust])")


@pytest.mark.parametrize("attack", ["PGD", "APGD", "Square"])
def test_torchattacks_run_on_a_contdeq_model(attack: str) -> None:
    """torchattacks' PGD, APGD and Square run unchanged on an nn.Sequential holding a DEQ,
    respect eps and do not lower the loss: catches a contdeq layer that breaks torchattacks'
    calling conventions (dtype, eval mode, input gradients). Inputs are images
    ``(B, 1, 3, 3)`` in ``[0, 1]``, as torchattacks expects."""
    model = classifier(dtype=torch.float32, tol=1e-4, features=9)
    x = torch.rand(8, 1, 3, 3)
    y = torch.randint(0, CLASSES, (8,))
    eps = 0.1
    atk = {
        "PGD": lambda: torchattacks.PGD(model, eps=eps, alpha=0.03, steps=5),
        "APGD": lambda: torchattacks.APGD(model, eps=eps, steps=5, n_restarts=1, seed=0),
        "Square": lambda: torchattacks.Square(model, eps=eps, n_queries=30, seed=0),
    }[attack]()
    x_adv = atk(x, y)
    x_adv = x_adv.detach()  # APGD returns a tensor that requires grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert bool((x_adv != x).any())
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert float(adv.sum()) >= float(clean.sum()) - 1e-5
    assert not model.training
