"""Attacks through equilibrium layers: contdeq.robust and torchattacks on contdeq models."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import contdeq
from contdeq.robust import (
    NORMS,
    entropy_reduction,
    pgd,
    random_intermediate_states,
    robust_accuracy,
    unrolled_gradients,
)
from tests.layer_models import TanhCell

WIDTH, FEATURES, CLASSES = 6, 5, 3


def classifier(solver: str = "anderson", backward: str = "implicit",
               dtype: torch.dtype = torch.float64, tol: float = 1e-5,
               features: int = FEATURES) -> nn.Sequential:
    """``(B, ...) -> (B, CLASSES)`` logits through one DEQ layer, in eval mode (inputs are
    flattened to ``features``)."""
    deq = contdeq.DEQ(TanhCell(WIDTH, features, lipschitz=0.7, dtype=dtype), solver=solver,
                      backward=backward, state_shape=WIDTH, atol=tol, rtol=tol,
                      backward_rtol=tol, backward_max_steps=200)
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
        for training in (True, False):
            deq.train(training)
            solver, backward = deq.solver_and_backward()
            assert isinstance(backward, contdeq.Unrolled)
            assert solver.solver == "picard"
            assert solver.options["atol"] == 1e-9  # the tolerances are kept
        # a modifier wraps the solve: the layer's own objects are not patched
        assert deq.backward_mode is mode
        assert deq.solver is train_solver and deq.eval_solver is eval_solver
        raise RuntimeError("boom")
    deq.train(True)
    assert deq.solver_and_backward() == (train_solver, mode)
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


def test_pgd_refuses_inputs_outside_clamp() -> None:
    """Inputs outside ``clamp`` raise a ValueError naming clamp and the inputs' range (the
    old behaviour clamped them, returning points outside the eps-ball): catches a silent
    violation of ||x_adv - x|| <= eps."""
    model = classifier()
    x, y = inputs()
    with pytest.raises(ValueError, match=r"x must lie inside clamp=\(0.0, 1.0\)"):
        pgd(model, 3 * x - 1, y, 0.1)
    with pytest.raises(ValueError, match="clamp=None"):
        pgd(model, x + 2, y, 0.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball_for_random_models_and_boxes(norm: str) -> None:
    """20 random (model, input box, eps) draws, data anywhere inside its box (including on
    its faces): every result is within eps of x in ``norm`` and inside the box: the
    docstring's promise."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        model = nn.Sequential(nn.Linear(FEATURES, 8, dtype=torch.float64), nn.Tanh(),
                              nn.Linear(8, CLASSES, dtype=torch.float64))
        low = float(torch.randn((), generator=gen, dtype=torch.float64))
        high = low + 0.1 + float(torch.rand((), generator=gen, dtype=torch.float64)) * 3
        x = low + (high - low) * torch.rand(16, FEATURES, generator=gen, dtype=torch.float64)
        x[:4, 0], x[4:8, 1] = low, high
        y = torch.randint(0, CLASSES, (16,), generator=gen)
        eps = float(torch.rand((), generator=gen)) * (high - low)
        x_adv = pgd(model, x, y, eps, norm=norm, steps=3, clamp=(low, high))
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert bool((size <= eps * (1 + 1e-12) + 1e-12).all())
        assert low <= float(x_adv.min()) and float(x_adv.max()) <= high


def test_pgd_single_step_is_fgsm_on_a_linear_model() -> None:
    """One linf step of size eps from x is x + eps * sign(grad) for a linear model (FGSM);
    catches a wrong step or projection formula."""
    model = nn.Linear(FEATURES, CLASSES, dtype=torch.float64)
    x, y = inputs()
    grad = input_gradient(model, x, y)
    x_adv = pgd(model, x, y, 0.05, steps=1, alpha=0.05, random_start=False, clamp=None)
    torch.testing.assert_close(x_adv, x + 0.05 * grad.sign())


class ScalarFeature(nn.Module):
    """``(B,)`` inputs, one number per sample, to ``(B, CLASSES)`` logits."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, None] * torch.tensor([1.0, -2.0, 0.5], dtype=v.dtype)


def test_pgd_on_one_number_per_sample_is_the_same_in_both_norms() -> None:
    """Catches the L2 step failing on a ``(B,)`` input (B samples of one number, the layers'
    convention) with "Dimension out of range": per sample, the L2 ball and step are the
    L-inf ones, so both attacks must agree and the random starts stay in the ball."""
    x, y = torch.rand(6, dtype=torch.float64), torch.randint(0, CLASSES, (6,))
    attacks = [pgd(ScalarFeature(), x, y, 0.1, steps=4, norm=norm, random_start=False)
               for norm in NORMS]
    torch.testing.assert_close(attacks[0], attacks[1])
    started = pgd(ScalarFeature(), x, y, 0.1, steps=1, alpha=0.0, norm="l2")
    assert bool(((started - x).abs() <= 0.1 + 1e-12).all())


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


def test_robust_accuracy_refuses_labels_not_shaped_b() -> None:
    """Catches labels of another shape broadcast against the ``(B,)`` predictions: a column
    ``(N, 1)`` gave an "accuracy" of up to N, one-hot labels a count of unrelated matches."""
    model = classifier()
    x, y = inputs(3)
    for labels in (y[:, None], F.one_hot(y, CLASSES)):
        with pytest.raises(ValueError, match=r"labels .* shape \(B,\) = \(3,\)"):
            robust_accuracy(model, (x, labels), None)


class RecordingCell(TanhCell):
    """A :class:`TanhCell` recording the input of its last call and its calls with grad."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.last_x: torch.Tensor | None = None
        self.grad_calls = 0

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.last_x = x.detach().clone()
        self.grad_calls += int(torch.is_grad_enabled() and x.requires_grad)
        return super().forward(z, x)


def rin_model(solver: str, lipschitz: float = 0.7, tol: float = 1e-9
              ) -> tuple[nn.Sequential, contdeq.DEQ]:
    """A DEQ of a :class:`RecordingCell` and a linear head, float64."""
    torch.manual_seed(0)
    options = {"method": "dopri5"} if solver == "ode" else {}  # continuous pseudo-times
    deq = contdeq.DEQ(RecordingCell(WIDTH, FEATURES, lipschitz=lipschitz), solver=solver,
                      state_shape=WIDTH, atol=tol, rtol=tol, max_steps=200, **options)
    return nn.Sequential(deq, nn.Linear(WIDTH, CLASSES, dtype=torch.float64)), deq


def test_random_intermediate_state_is_k_picard_steps_then_damped_unrolled_steps() -> None:
    """The variant on the layer's own solver (``solver=None``, Picard) without the plain f
    step: the training output is ``k`` plain steps from zero (k drawn from the generator)
    followed by two damped steps, and the input gradient flows through the damped steps
    only: catches a wrong stopping step, damping, or a gradient through the solve (or an
    implicit one)."""
    model, deq = rin_model("picard")
    f = deq.f
    x = torch.rand(5, FEATURES, dtype=torch.float64, requires_grad=True)
    k = int(torch.randint(1, 4 + 1, (), generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        z = torch.zeros(5, WIDTH, dtype=torch.float64)
        for _ in range(k):
            z = f(z, x)
    expected = z
    for _ in range(2):
        expected = 0.7 * f(expected, x) + 0.3 * expected
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    model.train()
    with random_intermediate_states(model, max_steps=4, damping=0.7, solver=None, f_step=False,
                                    unrolled_steps=2,
                                    generator=torch.Generator().manual_seed(3)):
        out = deq(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert deq.stats.forward.steps == k and deq.stats.forward.stop_reason == "callback"
    assert deq.stats.forward.nfe == k + 1 + 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-10, atol=1e-12)


def test_random_intermediate_state_defaults_are_the_original_code() -> None:
    """Defaults: Broyden stopped at a random step k in 1..8 (whatever the layer's solver),
    then one f step and 5 steps damped by 0.5, all with autograd; the input gradient is
    that of the 6 steps: catches defaults that drift from the paper's code."""
    model, deq = rin_model("picard")
    f = deq.f
    x = torch.rand(5, FEATURES, dtype=torch.float64, requires_grad=True)
    k = int(torch.randint(1, 8 + 1, (), generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        z, _ = contdeq.solvers.fixed_point(lambda s: f(s, x), torch.zeros(5, WIDTH,
                                           dtype=torch.float64), method="broyden",
                                           max_steps=k, atol=1e-9, rtol=1e-9,
                                           on_nonconvergence="ignore")
    expected = f(z, x)
    for _ in range(5):
        expected = 0.5 * f(expected, x) + 0.5 * expected
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    model.train()
    with random_intermediate_states(model, generator=torch.Generator().manual_seed(5)):
        out = deq(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    stats = deq.stats.forward
    assert stats.method == "broyden" and stats.steps == k
    assert stats.nfe == k + 1 + 1 + 5  # Broyden's start, k steps, the f step, 5 damped
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["anderson", "ode"])
def test_random_intermediate_states_draw_every_step(solver: str) -> None:
    """Over repeated training calls the stop lands on every step 1..K (``"ode"``: pseudo-times
    spread over (0, K]), never beyond, and the stop is not reported as non-convergence:
    catches a fixed or out-of-range draw, or warnings for a deliberate stop."""
    model, deq = rin_model(solver)
    x = torch.rand(4, FEATURES, dtype=torch.float64)
    model.train()
    stops = []
    with random_intermediate_states(model, max_steps=3, solver=None,
                                    generator=torch.Generator().manual_seed(0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(16):
                model(x)
                stats = deq.stats.forward
                assert stats.stop_reason == "callback"
                stops.append(stats.steps if solver != "ode" else float(stats.t_final.max()))
    if solver == "ode":
        assert 0 < min(stops) < 1 and 2 < max(stops) < 3 + 1.5
    else:
        assert sorted(set(stops)) == [1, 2, 3]


@pytest.mark.parametrize("solver", ["anderson", "ode"])
def test_random_intermediate_states_leave_eval_mode_and_restore(solver: str) -> None:
    """Inside the block an eval-mode call gives the layer's usual output and implicit input
    gradient, and the layer's objects are restored on exit, also after an exception:
    catches a block that leaks into inference or attacks generated in eval mode."""
    model, deq = rin_model(solver)
    model.eval()
    x, y = inputs(6)
    reference = input_gradient(model, x, y)
    saved = (deq.solver, deq.eval_solver, deq.backward_mode)
    with pytest.raises(RuntimeError, match="boom"), random_intermediate_states(model,
                                                                                max_steps=3):
        torch.testing.assert_close(input_gradient(model, x, y), reference, rtol=1e-7,
                                   atol=1e-10)
        raise RuntimeError("boom")
    assert (deq.solver, deq.eval_solver, deq.backward_mode) == saved
    assert all(a is b for a, b in zip((deq.solver, deq.eval_solver, deq.backward_mode), saved,
                                      strict=True))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_steps": 0}, "max_steps must be"),
    ({"unrolled_steps": -1}, "unrolled_steps must be"),
    ({"unrolled_steps": 0, "f_step": False}, "unrolled_steps must be"),
    ({"f_step": 1}, "f_step must be a bool"),
    ({"solver": "newton"}, "solver must be one of"),
    ({"damping": 1.5}, "damping must be"),
    ({"damping": 0.0}, "damping must be"),
    ({"generator": 3}, "generator must be"),
])
def test_random_intermediate_states_reject_bad_arguments(kwargs: dict, message: str) -> None:
    """Each bad argument raises naming it: catches silently accepted settings."""
    model, _ = rin_model("anderson")
    with pytest.raises((ValueError, TypeError), match=message), random_intermediate_states(
            model, **{"max_steps": 3, **kwargs}):
        pass


@pytest.mark.parametrize("solver", ["anderson", "ode", "broyden"])
def test_entropy_reduction_lowers_entropy_within_the_ball(solver: str) -> None:
    """In eval mode the layer converges on a changed input within eps of x (linf) whose
    prediction is more confident on average, after exactly rounds * steps input-gradient
    steps; with eps = 0 the output is the plain one; train mode is untouched. Catches steps
    that raise the entropy, leave the ball, ignore the schedule or leave the solve on a stale
    input."""
    model, deq = rin_model(solver, lipschitz=0.5, tol=1e-7)
    head = model[1]
    model.eval()
    x = torch.rand(16, FEATURES, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
    eps = 0.2
    cell = deq.f
    with entropy_reduction(model, head, every=2, steps=3, step_size=0.05, eps=eps,
                           rounds=2), torch.no_grad():
        cell.grad_calls = 0
        defended = model(x)
        assert cell.grad_calls == 2 * 3
        x_final = cell.last_x
        z = deq(x)
    assert x_final is not None
    assert float((x_final - x).abs().max()) <= eps + 1e-12
    assert float((x_final - x).abs().max()) > eps / 2
    with torch.no_grad():
        torch.testing.assert_close(cell(z, x_final), z, rtol=0, atol=1e-6)

    def entropy(logits: torch.Tensor) -> torch.Tensor:
        return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    assert float(entropy(defended).mean()) < float(entropy(plain).mean()) - 1e-3
    with entropy_reduction(model, head, every=2, step_size=0.05, eps=0.0), torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-6)
        model.train()
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-6)


def test_entropy_reduction_gradient_is_taken_at_the_final_input() -> None:
    """Under the defence, the input gradient of the layer's output is the plain implicit
    gradient at the input the solve ended with (straight through the changes), computed here
    by an undefended call on that input: catches a backward that linearizes f at the
    original input while the forward converged on another one."""
    model, deq = rin_model("anderson", lipschitz=0.5, tol=1e-9)
    head = model[1]
    model.eval()
    x = torch.rand(8, FEATURES, dtype=torch.float64)
    weights = torch.randn(8, CLASSES, dtype=torch.float64)
    cell = deq.f
    with entropy_reduction(model, head, every=2, steps=2, step_size=0.05, eps=0.2, rounds=1):
        xd = x.clone().requires_grad_(True)
        (model(xd) * weights).sum().backward()
        x_final = cell.last_x.detach().clone()
    assert float((x_final - x).abs().max()) > 0.01
    xr = x_final.clone().requires_grad_(True)
    (model(xr) * weights).sum().backward()
    torch.testing.assert_close(xd.grad, xr.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rounds", [4, None])
def test_entropy_reduction_defaults_act_on_the_raw_input(rounds: int | None) -> None:
    """With ``encoder`` and the defaults: 10 signed steps of 2/255 on the model's raw input
    after every 2 accepted solver steps, 4 times (``rounds=None``: until the solve ends), the
    raw input kept within 8/255 and in [0, 1], and the layer converging on encoder(moved raw
    input): catches ER acting in feature space, a wrong schedule, or the paper's step sizes
    changed."""
    torch.manual_seed(0)
    encoder = nn.Linear(FEATURES, FEATURES, dtype=torch.float64)
    cell = RecordingCell(WIDTH, FEATURES, lipschitz=0.5)
    deq = contdeq.DEQ(cell, solver="anderson", state_shape=WIDTH, atol=1e-8, rtol=1e-8,
                      max_steps=200)
    head = nn.Linear(WIDTH, CLASSES, dtype=torch.float64)
    model = nn.Sequential(encoder, deq, head).eval()
    x = torch.rand(16, FEATURES, dtype=torch.float64)
    x[:, 0] = 1.0  # on the box's face: the clamp is exercised
    seen: list[torch.Tensor] = []
    hook = encoder.register_forward_hook(lambda m, a, out: seen.append(a[0].detach()))
    with torch.no_grad():
        plain = model(x)
    options = {} if rounds == 4 else {"rounds": rounds}
    with entropy_reduction(model, head, encoder=encoder, **options), torch.no_grad():
        cell.grad_calls = 0
        seen.clear()
        defended = model(x)
        grad_calls = cell.grad_calls
    hook.remove()
    done = deq.stats.forward.steps // 2 if rounds is None else 4
    assert deq.stats.forward.steps >= 10 and grad_calls == 10 * done
    raws = torch.stack(seen[2:])  # the model's call, the shape check, then the steps
    assert float((raws - x).abs().max()) <= 8 / 255 + 1e-12
    assert float((raws - x).abs().max()) > 4 / 255
    assert 0.0 <= float(raws.min()) and float(raws.max()) <= 1.0
    moved = seen[-1]
    with torch.no_grad():
        torch.testing.assert_close(cell.last_x, encoder(moved), rtol=0, atol=1e-12)

    def entropy(logits: torch.Tensor) -> torch.Tensor:
        return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)

    assert float(entropy(defended).mean()) < float(entropy(plain).mean())


def test_robust_accuracy_transfer_attack_is_crafted_outside_the_defence() -> None:
    """``defence=``: the attack runs outside the defence and the predictions inside it, and
    the result equals a hand-made transfer evaluation: catches a defence entered while
    crafting (an adaptive attack labelled transfer)."""
    model = classifier()
    x, y = inputs(10)
    active = [False]
    log: list[tuple[str, bool]] = []

    @contextlib.contextmanager
    def defence() -> Iterator[None]:
        active[0] = True
        try:
            yield
        finally:
            active[0] = False

    def attack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        log.append(("attack", active[0]))
        return pgd(model, a, b, 0.2, steps=3)

    torch.manual_seed(1)
    acc = robust_accuracy(model, (x, y), attack, batch_size=4, defence=defence)
    assert log == [("attack", False)] * 3
    torch.manual_seed(1)
    x_adv = torch.cat([pgd(model, x[i:i + 4], y[i:i + 4], 0.2, steps=3) for i in (0, 4, 8)])
    with torch.no_grad():
        expected = float((model(x_adv).argmax(1) == y).double().mean())
    assert acc == pytest.approx(expected)
    with pytest.raises(TypeError, match="defence must be"):
        robust_accuracy(model, (x, y), None, defence=3)  # type: ignore[arg-type]


class TupleHead(nn.Module):
    """Logits from a 2-scale state ``((B, 2, 4, 4), (B, 2, 2, 2))``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * 16 + 2 * 4, CLASSES, dtype=torch.float64)

    def forward(self, zs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.linear(torch.cat([z.flatten(1) for z in zs], dim=1))


def test_entropy_reduction_on_a_multi_scale_layer() -> None:
    """A multi-scale layer's head gets the tuple of states, and the defence lowers the
    entropy there too: catches a head called on the flat state."""
    from tests.test_multiscale import make_layer, x_batch

    torch.manual_seed(0)
    deq = make_layer("DEQ", atol=1e-5, rtol=1e-5)
    head = TupleHead()
    model = nn.Sequential(deq, head).eval()
    x = x_batch(3)
    with torch.no_grad():
        plain = model(x)
        with entropy_reduction(model, head, every=2, step_size=0.2, eps=0.5, rounds=2):
            defended = model(x)

    def entropy(logits: torch.Tensor) -> torch.Tensor:
        return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)

    assert float(entropy(defended).mean()) < float(entropy(plain).mean()) - 1e-4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every": 0}, "every must be"),
    ({"steps": 0}, "steps must be"),
    ({"step_size": 0.0}, "step_size must be"),
    ({"eps": -1.0}, "eps must be"),
    ({"norm": "inf"}, "norm must be one of"),
    ({"rounds": 0}, "rounds must be"),
    ({"head": "linear"}, "head must be an nn.Module"),
    ({"model": nn.Linear(2, 2)}, "exactly one equilibrium layer"),
    ({"encoder": "linear"}, "encoder must be None or the nn.Module"),
    ({"clamp": "yes"}, "clamp must be"),
])
def test_entropy_reduction_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    """Each bad argument raises naming it (and a model without exactly one DEQ layer is
    refused): catches silently accepted settings."""
    model, _ = rin_model("anderson")
    args = {"model": model, "head": model[1], "every": 2, "step_size": 0.1, "eps": 0.1,
            **kwargs}
    with pytest.raises((ValueError, TypeError), match=message), entropy_reduction(**args):
        pass


torchattacks = pytest.importorskip(
    "torchattacks",
    reason="torchattacks is not installed (pip install --no-deps torchattacks==3.5.1)")


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
