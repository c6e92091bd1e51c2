"""The solvers' numbers against independent references written out here (issue 22).

Each reference is computed from its formula in plain Python/NumPy, never by calling the code
under test: the Dormand-Prince pair with its step-size controller on ``dz/dt = -z``, the
pseudo-transient step control on a linear scalar flow, Anderson mixing (Walker & Ni) solved as
its KKT system, the reported tolerance ``atol + rtol * rms(z)``, the skip loss and the
Hutchinson Jacobian term. ``tests/test_mutation_kills.py`` holds the narrower checks that
mutation testing showed were missing (docs/testing.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contdeq.regularizers import jacobian_frobenius, skip_loss
from contdeq.solvers import fixed_point, steady_state
from contdeq.solvers.anderson import Anderson
from contdeq.solvers.registry import FIXED_POINT_METHODS, STEADY_STATE_METHODS
from contdeq.solvers.rk import error_ratio, initial_step, next_step_size

# Dormand & Prince (1980), RK5(4)7M: the stage matrix and the fifth-order weights (the last
# stage row: FSAL), copied from the paper's table; the embedded fourth-order weights are
# Shampine's (1986, "Some practical Runge-Kutta formulas", the pair of MATLAB's ode45).
DP_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
DP_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
DP_B5 = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
DP_B4 = [1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60]


def _dopri5_reference(lam: float, z0: float, atol: float, rtol: float,
                      first_step: float | None) -> dict[str, object]:
    """Steady state of ``dz/dt = lam * z`` by the documented algorithm, by hand: dopri5 steps,
    error ratio ``|err| / (ode_atol + ode_rtol * max(|y0|, |y1|))``, the elementary controller
    ``h * clamp(0.9 * ratio^(-1/5), 0.2, 10)``, the first step
    ``0.5 * (|f0| / (ode_atol + ode_rtol * |z0|))^(-1/5)``, and the stop test
    ``|f1| <= atol + rtol * |z1|`` on each accepted step."""
    f = lambda z: lam * z  # noqa: E731
    oatol, ortol = 0.1 * atol, 0.1 * rtol  # the documented default integrator tolerances
    z, d, nfe = z0, f(z0), 1
    h = first_step or 0.5 * (abs(d) / (oatol + ortol * abs(z))) ** (-1 / 5)
    times, t, accepted, rejected = [0.0], 0.0, 0, 0
    while abs(d) > atol + rtol * abs(z):
        ks = [d]
        for i in range(1, 7):
            ks.append(f(z + h * sum(a * k for a, k in zip(DP_A[i], ks, strict=False))))
        nfe += 6
        y1 = z + h * sum(b * k for b, k in zip(DP_B5, ks, strict=True))
        err = h * sum((b5 - b4) * k for b5, b4, k in zip(DP_B5, DP_B4, ks, strict=True))
        ratio = abs(err) / (oatol + ortol * max(abs(z), abs(y1)))
        if ratio <= 1.0:
            accepted += 1
            t += h
            times.append(t)
            z, d = y1, ks[-1]
        else:
            rejected += 1
        h *= 10.0 if ratio == 0 else min(10.0, max(0.2, 0.9 * ratio ** (-1 / 5)))
    return {"z": z, "nfe": nfe, "accepted": accepted, "rejected": rejected, "times": times}


@pytest.mark.parametrize("first_step", [None, 6.0], ids=["initial_step_rule", "rejected_start"])
def test_dopri5_step_sequence_matches_the_hand_written_controller(
        first_step: float | None) -> None:
    """dopri5 on dz/dt = -0.7 z reproduces, step by step, a hand-written Dormand-Prince loop
    with the elementary controller: catches a wrong tableau entry, error weight, error norm,
    controller exponent/safety/clamp, first-step rule, or a step accepted/rejected wrongly
    (``first_step=6`` starts with rejections, exercising the shrink branch)."""
    atol, rtol = 1e-6, 1e-5
    ref = _dopri5_reference(-0.7, 2.0, atol, rtol, first_step)
    z, stats = steady_state(lambda t, z: -0.7 * z, torch.tensor([[2.0]], dtype=torch.float64),
                            atol=atol, rtol=rtol, first_step=first_step,
                            record_trajectory=True)
    assert (stats.nfe, stats.accepted, stats.rejected) == (
        ref["nfe"], ref["accepted"], ref["rejected"])
    if first_step is not None:
        assert ref["rejected"] >= 1  # the case exercises rejections
    np.testing.assert_allclose(stats.time_history[:, 0].numpy(), ref["times"], rtol=1e-12)
    np.testing.assert_allclose(float(z), ref["z"], rtol=1e-10)


def _ptc_reference(a: float, z0: float, atol: float, rtol: float, first_step: float,
                   max_step: float) -> dict[str, list[float]]:
    """``dz/dt = -a (z - 1)`` by explicit pseudo-transient continuation, by hand, as
    documented: forward Euler; a step that shrinks the residual is accepted and the next grows
    by ``clamp(res / res_new, 1.2, 2)``; otherwise, with ``change = |d_new - d| / (0.5 res)``,
    it is accepted (growth ``clamp(1 / change, 1, 2)``) when ``change <= 1`` and
    ``res_new <= 10 * best``, else rejected and shrunk by ``clamp(0.9 / change, 0.1, 0.5)``;
    steps capped at ``max_step``."""
    z, h, t = z0, first_step, 0.0
    d = -a * (z - 1.0)
    best = abs(d)
    times, residuals = [0.0], [abs(d)]
    while abs(d) > atol + rtol * abs(z):
        z_new = z + h * d
        d_new = -a * (z_new - 1.0)
        res, res_new = abs(d), abs(d_new)
        if res_new < res:
            ok, factor = True, min(2.0, max(1.2, res / res_new))
        else:
            change = abs(d_new - d) / (0.5 * res)
            ok = change <= 1.0 and res_new <= 10.0 * best
            factor = min(2.0, max(1.0, 1 / change)) if ok else min(0.5, max(0.1, 0.9 / change))
        if ok:
            t += h
            z, d = z_new, d_new
            best = min(best, res_new)
        times.append(t)
        residuals.append(abs(d))
        h = min(factor * h, max_step)
    return {"times": times, "residuals": residuals}


@pytest.mark.parametrize(("a", "max_step"), [(0.3, 1.0), (1.5, 1.5)],
                         ids=["growth_to_the_cap", "overshoot_rejected"])
def test_ptc_step_sequence_matches_the_hand_written_rule(a: float, max_step: float) -> None:
    """ptc on dz/dt = -a (z - 1) reproduces a hand-written switched-evolution-relaxation loop:
    catches a wrong growth clamp (1.2, 2), a wrong cap, a wrong acceptance of a step that
    raises the residual, or a wrong shrink factor (``a=1.5`` with ``max_step=1.5`` overshoots:
    ``|1 - a h| > 1`` is rejected and shrunk)."""
    atol, rtol = 1e-9, 1e-7
    ref = _ptc_reference(a, 0.0, atol, rtol, 0.05, max_step)
    _, stats = steady_state(lambda t, z: -a * (z - 1.0), torch.zeros(1, 1, dtype=torch.float64),
                            method="ptc", atol=atol, rtol=rtol, first_step=0.05,
                            max_step=max_step, record_trajectory=True)
    # The growth factor res / res_new loses digits as the residual vanishes: rtol 1e-9.
    np.testing.assert_allclose(stats.time_history[:, 0].numpy(), ref["times"], rtol=1e-9)
    np.testing.assert_allclose(stats.residual_history[:, 0].numpy(), ref["residuals"],
                               rtol=1e-9, atol=1e-15)
    assert stats.nfe == len(ref["times"])  # one evaluation per step, plus the first
    if a * max_step > 2.0:  # |1 - a h| > 1 at the cap: the case exercises rejections
        assert stats.rejected >= 1


def test_controller_functions_against_hand_values() -> None:
    """next_step_size, initial_step and error_ratio on inputs whose results are worked out by
    hand: catches a wrong exponent, safety factor, clamp bound, the ratio-0 branch, a norm
    other than the per-sample RMS maximum, or a scale other than ``atol + rtol max(|y0|,|y1|)``.
    """
    assert next_step_size(2.0, 0.0, 5) == 20.0
    assert next_step_size(2.0, 1e-12, 5) == 20.0  # clamped at 10x
    assert next_step_size(2.0, 1e9, 5) == pytest.approx(0.4)  # clamped at 0.2x
    assert next_step_size(2.0, 32.0, 5) == pytest.approx(2.0 * 0.9 / 2.0)
    assert next_step_size(1.0, 8.0, 3) == pytest.approx(0.45)
    assert next_step_size(1.0, 1.0, 4, safety=0.8, ifactor=5.0, dfactor=0.5) == 0.8
    # initial step: 0.5 * (max_b rms(f0_b) / (atol + rtol rms(z0_b)))^(-1/order), capped.
    f0 = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)  # rms 3.5355, 0.7071
    z0 = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)  # rms 1, 2
    d = max(math.sqrt(12.5) / (0.1 + 0.2 * 1.0), math.sqrt(0.5) / (0.1 + 0.2 * 2.0))
    assert initial_step(f0, z0, 0.1, 0.2, 4, cap=10.0) == pytest.approx(0.5 * d ** -0.25)
    assert initial_step(f0, z0, 0.1, 0.2, 4, cap=0.25) == 0.25
    assert initial_step(torch.zeros(2, 2), z0, 0.1, 0.2, 4, cap=7.0) == 7.0  # at rest
    # error ratio: max over samples of rms(err / (atol + rtol max(|y0|, |y1|))).
    err = torch.tensor([[0.2, 0.0], [0.1, 0.3]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, -4.0], [0.0, 0.0]], dtype=torch.float64)
    y1 = torch.tensor([[-3.0, 2.0], [1.0, 0.0]], dtype=torch.float64)
    scale = [[0.1 + 0.5 * 3.0, 0.1 + 0.5 * 4.0], [0.1 + 0.5 * 1.0, 0.1]]
    per_sample = [math.sqrt(sum((e / s) ** 2 for e, s in zip(er, sr, strict=True)) / 2)
                  for er, sr in zip(err.tolist(), scale, strict=True)]
    assert error_ratio(err, y0, y1, 0.1, 0.5) == pytest.approx(max(per_sample), rel=1e-12)


def _rms(x: np.ndarray) -> np.ndarray:
    """Per-sample root-mean-square over every dimension but the first."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    return np.sqrt((flat ** 2).mean(axis=1))


@pytest.mark.parametrize(("atol", "rtol"), [(1e-3, 1e-2), (0.0, 1e-3), (1e-4, 0.0)])
@pytest.mark.parametrize("solve", ["steady_state", "fixed_point"])
def test_reported_tolerance_and_residual_recomputed_independently(
        solve: str, atol: float, rtol: float) -> None:
    """stats.tolerance equals ``atol + rtol * rms(z)`` and stats.residual the RMS of the
    returned state's residual, both recomputed here in NumPy on a (B, 3, 5) float32 state:
    catches a wrong norm (L2, max, over the batch), a tolerance from the wrong state or with a
    dropped term, and a residual that is not the returned state's."""
    scale = torch.tensor([1.0, 4.0, 0.25]).view(3, 1, 1)
    target = scale * torch.linspace(-1.0, 2.0, 15).view(1, 3, 5)

    def g(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + 0.5 * target

    z0 = torch.zeros(3, 3, 5)
    if solve == "steady_state":
        z, stats = steady_state(lambda t, z: g(z) - z, z0, atol=atol, rtol=rtol)
    else:
        z, stats = fixed_point(g, z0, method="picard", atol=atol, rtol=rtol)
    zn = z.numpy()
    residual = _rms((0.5 * zn + 0.5 * target.numpy()) - zn)
    tolerance = atol + rtol * _rms(zn)
    np.testing.assert_allclose(stats.tolerance.numpy(), tolerance, rtol=1e-6)
    np.testing.assert_allclose(stats.residual.numpy(), residual, rtol=1e-4, atol=1e-9)
    assert stats.converged.tolist() == (residual <= tolerance * (1 + 1e-6)).tolist()
    assert stats.converged.all()


def _anderson_reference(g, z0: np.ndarray, steps: int, memory: int, damping: float,
                        regularization: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Anderson type II (Walker & Ni 2011) per sample, with weights from the KKT system of
    ``min ||sum_i alpha_i r_i||^2 + reg * ||alpha||^2 * max_i ||r_i||^2`` subject to
    ``sum_i alpha_i = 1``; the first step is the damped Picard step. Returns the iterates
    and the residuals ``g(z_k) - z_k``."""
    z = z0.copy()
    gs: list[np.ndarray] = []
    rs: list[np.ndarray] = []
    iterates, residuals = [z.copy()], []
    for _ in range(steps):
        gz = g(z)
        r = gz - z
        residuals.append(r)
        gs, rs = [*gs, gz][-memory:], [*rs, r][-memory:]
        nxt = np.empty_like(z)
        for b in range(z.shape[0]):
            n = len(rs)
            if n == 1:
                nxt[b] = z[b] + damping * r[b]
                continue
            R = np.stack([ri[b] for ri in rs])  # (n, D)
            G = R @ R.T
            G = G / max(G.diagonal().max(), np.finfo(float).tiny) + regularization * np.eye(n)
            kkt = np.zeros((n + 1, n + 1))
            kkt[:n, :n], kkt[:n, n], kkt[n, :n] = 2 * G, 1.0, 1.0
            alpha = np.linalg.solve(kkt, np.r_[np.zeros(n), 1.0])[:n]
            mixed_g = sum(a * gi[b] for a, gi in zip(alpha, gs, strict=True))
            mixed_z = sum(a * (gi[b] - ri[b]) for a, gi, ri in zip(alpha, gs, rs, strict=True))
            nxt[b] = damping * mixed_g + (1 - damping) * mixed_z
        z = nxt
        iterates.append(z.copy())
    return iterates, residuals


def _nearly_linear_map(width: int):
    """``g(z) = 0.6 z + c + 1e-7 sin(3 z)``: its residuals are collinear up to 1e-7, so the
    Anderson history is nearly singular and the ridge term decides the weights."""
    c = np.stack([np.cos(np.arange(width) * 0.37), 2 * np.sin(np.arange(width) * 0.11)])

    def g(z):
        return 0.6 * z + c + 1e-7 * np.sin(3 * z)

    return g


def _smooth_map(width: int):
    """A nonlinear contraction with full-rank residual histories."""
    i = np.arange(width)
    w = 0.5 * np.cos(np.outer(i, i) * 0.7 + 0.3) / math.sqrt(width)
    c = np.stack([np.sin(i * 0.5), np.cos(i * 0.2) - 0.5])

    def g(z):
        return np.tanh(z @ w.T + c)

    return g


@pytest.mark.parametrize(("make_g", "width", "memory", "damping", "regularization"), [
    (_smooth_map, 6, 3, 1.0, 1e-4),
    (_smooth_map, 6, 3, 0.6, 1e-4),
    (_nearly_linear_map, 6, 4, 0.7, 1e-4),
    (_nearly_linear_map, 6, 4, 1.0, 1e-2),
    (_smooth_map, 300, 2, 0.8, 1e-3),  # the batched-matmul mixing path (> 256 features)
], ids=["undamped", "damped", "nearly_singular_damped", "nearly_singular_ridge", "wide"])
def test_anderson_iterates_match_a_numpy_walker_ni_reference(
        make_g, width: int, memory: int, damping: float, regularization: float) -> None:
    """Anderson's iterates (class and fixed_point loop) equal a NumPy Walker-Ni reference for
    8 steps, past the memory's wrap-around: catches a wrong damping blend, a wrong or absolute
    ridge, a Gram matrix over the wrong axis, mixing across samples, or a ring buffer that
    drops the wrong iterate."""
    g = make_g(width)
    z0 = np.zeros((2, width))
    steps = 8
    ref_z, ref_r = _anderson_reference(g, z0, steps, memory, damping, regularization)
    solver = Anderson(torch.zeros(2, width, dtype=torch.float64), memory=memory,
                      damping=damping, regularization=regularization)
    z = torch.zeros(2, width, dtype=torch.float64)
    for k in range(steps):
        gz = torch.from_numpy(g(z.numpy()))
        z = solver.propose(z, gz, gz - z)
        np.testing.assert_allclose(z.numpy(), ref_z[k + 1], rtol=1e-9, atol=1e-12,
                                   err_msg=f"iterate {k + 1}")
    _, stats = fixed_point(lambda z: torch.from_numpy(g(z.numpy())),
                           torch.zeros(2, width, dtype=torch.float64), method="anderson",
                           atol=1e-300, rtol=0.0, max_steps=steps, memory=memory,
                           damping=damping, regularization=regularization,
                           freeze_converged=False, record_trajectory=True,
                           on_nonconvergence="ignore")
    expected = [_rms(r) for r in ref_r] + [_rms(g(ref_z[steps]) - ref_z[steps])]
    np.testing.assert_allclose(stats.residual_history.numpy(), np.stack(expected), rtol=1e-7,
                               atol=1e-15)


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("detach", [True, False])
def test_skip_loss_value_and_gradients_from_the_formula(norm: str, detach: bool) -> None:
    """skip_loss equals ``mean((z0 - z*)^2)`` or ``mean(|z0 - z*|)`` and its gradients are
    ``2 (z0 - z*) / N`` or ``sign(z0 - z*) / N`` for z0, and the negative for z* unless
    detached (then none): catches a wrong norm, mean, sign, a missing stop-gradient, or one
    applied when it should not be."""
    z0 = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]], requires_grad=True)
    z_star = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 0.5, 0.25]], requires_grad=True)
    diff = (z0 - z_star).detach()
    n = diff.numel()
    value = skip_loss(z0, z_star, norm=norm, detach=detach)
    expected = (diff ** 2).sum() / n if norm == "l2" else diff.abs().sum() / n
    torch.testing.assert_close(value, expected)
    value.backward()
    grad = 2 * diff / n if norm == "l2" else diff.sign() / n
    torch.testing.assert_close(z0.grad, grad)
    if detach:
        assert z_star.grad is None
    else:
        torch.testing.assert_close(z_star.grad, -grad)


def test_jacobian_frobenius_matches_the_hutchinson_formula() -> None:
    """For f(z, x) = tanh(z M^T + x), J_b = diag(1 - tanh^2(u_b)) M: the estimate equals
    ``sum_p sum_b ||eps_pb^T J_b||^2 / (P * B * D)`` with the same Gaussian draws, its
    gradient w.r.t. M equals the formula's, and with many probes it approaches the exact
    ``mean_b ||J_b||_F^2 / D``: catches a wrong normalisation (probes, batch or width), a
    transposed Jacobian, lost probes, probes drawn in another dtype or from the global
    generator, or a graph not kept for training."""
    torch.manual_seed(0)
    b, d, probes = 3, 4, 3
    m = (0.5 * torch.randn(d, d, dtype=torch.float64)).requires_grad_()
    z = torch.randn(b, d, dtype=torch.float64)
    x = torch.randn(b, d, dtype=torch.float64)

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ m.T + x)

    value = jacobian_frobenius(f, z, x, probes=probes,
                               generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    eps = [torch.randn(b, d, dtype=torch.float64, generator=gen) for _ in range(probes)]
    s = 1 - torch.tanh(z @ m.T + x) ** 2  # (B, D): J_b = diag(s_b) M
    expected = sum(((e * s) @ m).pow(2).sum() for e in eps) / (probes * b * d)
    # rtol 1e-12: draws made in float32 and cast would differ in the 8th digit.
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0.0)
    (grad,) = torch.autograd.grad(value, m)
    (grad_expected,) = torch.autograd.grad(expected, m)
    torch.testing.assert_close(grad, grad_expected)
    many = jacobian_frobenius(f, z, x, probes=4000, create_graph=False,
                              generator=torch.Generator().manual_seed(1))
    exact = sum((s[i, :, None] * m).pow(2).sum() for i in range(b)) / (b * d)
    assert float(many) == pytest.approx(float(exact.detach()), rel=0.05)


_NFE_WIDTH = 8


def _contraction(z: torch.Tensor) -> torch.Tensor:
    """``tanh(W z + x_b)`` with a fixed W (contraction factor about 0.9) and 3 fixed inputs,
    written from formulas so that no random generator or platform changes the problem."""
    i = torch.arange(_NFE_WIDTH, dtype=torch.float64)
    w = 0.9 * torch.cos(torch.outer(i, i) * 0.7 + 0.3) / math.sqrt(_NFE_WIDTH)
    x = torch.stack([torch.sin(i * 0.5), torch.cos(i * 0.2) - 0.5, 0.3 * torch.ones_like(i)])
    return torch.tanh(z @ w.T + x)


#: Evaluations (and Jacobian-vector products) each method needs on :func:`_contraction` from
#: zero, atol = rtol = 1e-4, float64, measured on torch 2.13 CPU. Margin: one step's
#: evaluations either way (Runge-Kutta: stages per step; dopri8: 12 new stages; the others:
#: 1), so that one accept/reject decision flipped by a platform's rounding does not fail,
#: while a slower controller, a wrong error norm or a wasted evaluation per step does.
NFE_PINNED = {
    "dopri5": (97, 6), "tsit5": (97, 6), "bosh3": (118, 3), "dopri8": (118, 12),
    "adaptive_heun": (779, 2), "ptc": (24, 1), "implicit_ptc": (8, 1),
    "anderson": (9, 1), "broyden": (10, 1), "newton": (8, 1), "picard": (24, 1),
}
JVPS_PINNED = {"implicit_ptc": (12, 2), "newton": (17, 2)}


def test_nfe_pinned_for_every_registered_method() -> None:
    """Every registered steady-state and fixed-point method solves one fixed problem with its
    pinned number of evaluations (and JVPs), within one step's evaluations: catches a slower
    step-size controller, a wrong error norm, a worse first step, a lost Anderson/Broyden
    history, a wasted evaluation per step, or a newly registered method nobody pinned."""
    assert set(NFE_PINNED) == set(STEADY_STATE_METHODS) | set(FIXED_POINT_METHODS)
    z0 = torch.zeros(3, _NFE_WIDTH, dtype=torch.float64)
    for method, (pinned, margin) in NFE_PINNED.items():
        if method in STEADY_STATE_METHODS:
            _, stats = steady_state(lambda t, z: _contraction(z) - z, z0, method=method,
                                    atol=1e-4, rtol=1e-4, max_steps=5000)
        else:
            _, stats = fixed_point(_contraction, z0, method=method, atol=1e-4, rtol=1e-4)
        assert stats.converged.all(), method
        assert abs(stats.nfe - pinned) <= margin, (method, stats.nfe, pinned)
        if method in JVPS_PINNED:
            pinned_jvps, margin_jvps = JVPS_PINNED[method]
            assert abs(stats.jvps - pinned_jvps) <= margin_jvps, (method, stats.jvps)
