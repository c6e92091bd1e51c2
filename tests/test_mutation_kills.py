"""Narrow checks of the solver numerics that mutation testing found unguarded (issue 22).

Each test pins one behaviour of contdeq/solvers/rk.py, integrate.py (ptc), anderson.py,
termination.py or contdeq/regularizers.py against values worked out by hand or by an
independent NumPy computation; ``benchmarks/results/mutation.md`` lists the mutants they kill
and those that still survive (docs/testing.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contdeq.regularizers import jacobian_frobenius, skip_loss
from contdeq.solvers import fixed_point, steady_state
from contdeq.solvers.anderson import Anderson
from contdeq.solvers.picard import Picard
from contdeq.solvers.registry import TABLEAUX
from contdeq.solvers.rk import RungeKuttaStepper, _combine, error_ratio, initial_step
from contdeq.solvers.termination import SteadyStateCondition, sample_rms


def test_combine_skips_zero_coefficients_and_copies_the_base() -> None:
    """``_combine`` is ``base + scale * sum_j c_j k_j``; with every coefficient zero it returns
    a copy of the base (never the base itself, which the stepper's in-place adds would then
    overwrite) or zeros: catches a dropped scale, a wrong sign, or an aliased base."""
    base = torch.tensor([[1.0, 2.0]])
    ks = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 4.0]]), torch.tensor([[3.0, 3.0]])]
    torch.testing.assert_close(_combine(base, 0.5, [2.0, 0.0, -1.0], ks),
                               torch.tensor([[1.0 + 0.5 * (2 - 3), 2.0 + 0.5 * (0 - 3)]]))
    torch.testing.assert_close(_combine(None, 2.0, [0.0, 0.25, 1.0], ks),
                               torch.tensor([[6.0, 8.0]]))
    copy = _combine(base, 0.5, [0.0, 0.0], ks)
    assert torch.equal(copy, base) and copy.data_ptr() != base.data_ptr()
    assert torch.equal(_combine(None, 0.5, [0.0], ks), torch.zeros(1, 2))
    out = _combine(base, 1.0, [1.0], ks)
    assert torch.equal(base, torch.tensor([[1.0, 2.0]]))  # the base is not modified
    assert torch.equal(out, torch.tensor([[2.0, 2.0]]))


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_step_integrates_a_linear_forcing_exactly_at_the_stage_times(name: str) -> None:
    """dz/dt = t + 1 from t = 0.3 with h = 0.5: every pair of order >= 2 integrates it exactly
    (z1 = z0 + 0.8^2/2 - 0.3^2/2 + 0.5); the error estimate is zero when the embedded solution
    has order >= 2 too, and Euler's h^2/2 = 0.125 against Heun (adaptive_heun). Both need every
    stage evaluated at ``t + alpha_i h``: catches a wrong stage time or weight."""
    func = lambda t, z: torch.full_like(z, t + 1.0)  # noqa: E731
    stepper = RungeKuttaStepper(TABLEAUX[name])
    y0 = torch.zeros(1, 1, dtype=torch.float64)
    y1, f1, error = stepper.step(func, 0.3, y0, func(0.3, y0), 0.5, None)
    assert float(y1) == pytest.approx(0.8 ** 2 / 2 - 0.3 ** 2 / 2 + 0.5, abs=1e-14)
    assert float(f1) == pytest.approx(1.8, abs=1e-14)
    expected_error = 0.125 if TABLEAUX[name].order == 2 else 0.0
    assert float(error.abs().max()) == pytest.approx(expected_error, abs=1e-14)


@pytest.mark.parametrize("name", ["dopri5", "adaptive_heun"])  # FSAL and not
def test_step_keeps_frozen_samples_still(name: str) -> None:
    """With mask 0 a sample keeps its state and has zero derivative and error, while the
    unmasked evaluation is kept in last_evaluation and the moving sample takes the step it
    would take alone: catches a mask applied to the wrong tensor or not at all."""
    func = lambda t, z: 1.0 - z  # noqa: E731
    stepper = RungeKuttaStepper(TABLEAUX[name])
    y0 = torch.tensor([[0.0, 0.5], [0.25, 0.25]], dtype=torch.float64)
    mask = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    y1, f1, error = stepper.step(func, 0.0, y0, func(0.0, y0) * mask, 0.1, mask)
    alone, f_alone, err_alone = RungeKuttaStepper(TABLEAUX[name]).step(
        func, 0.0, y0[:1], func(0.0, y0[:1]), 0.1, None)
    torch.testing.assert_close(y1[0], alone[0])
    torch.testing.assert_close(f1[0], f_alone[0])
    torch.testing.assert_close(error[0], err_alone[0])
    assert torch.equal(y1[1], y0[1]) and not f1[1].any() and not error[1].any()
    torch.testing.assert_close(stepper.last_evaluation[1], 1.0 - y0[1])  # unmasked


def test_error_ratio_and_initial_step_edge_cases() -> None:
    """Edge cases worked out by hand: atol = 0 with exact zeros gives ratio 0 (not 0/0 = NaN);
    float16 errors are scaled in float32 (1e-3 / 1e-7 overflows float16's 65504); the first
    step with atol = 0 from z0 = 0 uses 1/rtol as the scale ratio. Catches a dropped floor, a
    half-precision overflow, or a wrong fallback."""
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    assert error_ratio(zeros, zeros, zeros, 0.0, 1e-3) == 0.0
    err = torch.full((1, 4), 1e-3, dtype=torch.float16)
    y = torch.zeros(1, 4, dtype=torch.float16)
    assert error_ratio(err, y, y, 1e-7, 1e-3) == pytest.approx(1e-3 / 1e-7, rel=1e-3)
    f0 = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    # atol = 0, z0 = 0: ||f0|| / scale = 1 / rtol = 1e4 -> 0.5 * 1e4^(-1/4) = 0.05.
    assert initial_step(f0, torch.zeros(1, 2, dtype=torch.float64), 0.0, 1e-4, 4) == (
        pytest.approx(0.05))
    half = initial_step(f0.half(), torch.ones(1, 2, dtype=torch.float16), 1e-6, 1e-4, 2)
    assert half == pytest.approx(0.5 * (2.0 / (1e-6 + 1e-4)) ** -0.5, rel=1e-3)


def test_sample_rms_accumulates_in_float64_and_tolerance_branches() -> None:
    """sample_rms of float32 entries of 1e20 (whose squares overflow float32) and 1e-25 (whose
    squares underflow) is exact, over every dimension but the first; the tolerance is atol
    alone when rtol = 0 and rtol rms(z) alone when atol = 0. Catches accumulation in float32,
    an RMS over the wrong dimensions, and a dropped or doubled term."""
    big = torch.full((2, 3, 4), 1e20)
    big[1] = 1e-25
    rms = sample_rms(big, 2.0)
    assert rms.dtype == torch.float32
    np.testing.assert_allclose(rms.numpy(), [2e20, 2e-25], rtol=1e-6)
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    rms_z = math.sqrt(12.5)
    assert SteadyStateCondition(0.5, 0.0).tolerance(z).tolist() == [0.5, 0.5]
    np.testing.assert_allclose(SteadyStateCondition(0.0, 0.1).tolerance(z).numpy(),
                               [0.1 * rms_z, 0.0])
    np.testing.assert_allclose(SteadyStateCondition(0.5, 0.1).tolerance(z).numpy(),
                               [0.5 + 0.1 * rms_z, 0.5])
    res, _, ok = SteadyStateCondition(0.5, 0.1).evaluate(z, torch.tensor(
        [[1.0, 1.0], [0.5, 0.5]], dtype=torch.float64))
    assert res.tolist() == [1.0, 0.5] and ok.tolist() == [False, True]  # 0.5 <= 0.5 passes


def test_anderson_falls_back_to_the_plain_step_on_a_singular_history() -> None:
    """Without a ridge, two identical residuals make the Gram matrix exactly singular: the
    sample takes the damped plain step from its newest iterate, the other sample (regular
    history) its mixed step, computed by hand: catches a crash, NaN, or the fallback applied
    to every sample or from the wrong iterate."""
    solver = Anderson(torch.zeros(2, 2, dtype=torch.float64), memory=3, damping=0.5,
                      regularization=0.0)
    z1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    g1 = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    solver.propose(z1, g1, g1 - z1)
    z2 = torch.tensor([[2.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    g2 = torch.tensor([[3.0, 3.0], [1.0, 3.0]], dtype=torch.float64)  # r: (1, 1) and (0, 2)
    out = solver.propose(z2, g2, g2 - z2)
    torch.testing.assert_close(out[0], z2[0] + 0.5 * (g2[0] - z2[0]))
    # Sample 1: r1 = (1, 0), r2 = (0, 2); alpha minimises ||a r1 + (1 - a) r2||: a = 0.8.
    mixed_g = 0.8 * g1[1] + 0.2 * g2[1]
    mixed_z = 0.8 * z1[1] + 0.2 * z2[1]
    torch.testing.assert_close(out[1], 0.5 * mixed_g + 0.5 * mixed_z)


def test_anderson_in_half_precision_matches_float64() -> None:
    """float16 histories are mixed in float32 (a float16 Gram matrix of residuals near 300
    overflows): the iterate matches the float64 computation to float16 accuracy. Catches the
    Gram matrix formed in the state's half precision."""
    def run(dtype: torch.dtype) -> torch.Tensor:
        solver = Anderson(torch.zeros(1, 3, dtype=dtype), memory=2)
        z = torch.zeros(1, 3, dtype=dtype)
        for k in range(3):
            gz = torch.tensor([[300.0, -200.0, 250.0]], dtype=dtype) / (k + 1) + 0.5 * z
            z = solver.propose(z, gz, gz - z)
        return z

    out = run(torch.float16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), run(torch.float64), rtol=2e-3, atol=0.5)


def _ptc_vector_reference(func, z0: np.ndarray, first_step: float, max_step: float,
                          atol: float, rtol: float, max_steps: int = 10_000) -> list[float]:
    """The documented ptc rule (see tests/test_references.py) for ``dz/dt = func(z)`` from
    ``z0`` with RMS norms; returns the pseudo-time after every step."""
    rms = lambda v: float(np.sqrt(np.mean(v ** 2)))  # noqa: E731
    z = z0.astype(np.float64)
    d = func(z)
    h, t, best, times = first_step, 0.0, rms(d), [0.0]
    while rms(d) > atol + rtol * rms(z) and len(times) <= max_steps:
        z_new = z + h * d
        d_new = func(z_new)
        res, res_new = rms(d), rms(d_new)
        if res_new < res:
            ok, factor = True, min(2.0, max(1.2, res / res_new if res_new else math.inf))
        else:
            change = rms(d_new - d) / (0.5 * res)
            ok = change <= 1.0 and res_new <= 10.0 * best
            growth = math.inf if change == 0 else 1 / change
            factor = min(2.0, max(1.0, growth)) if ok else min(0.5, max(0.1, 0.9 / change))
        if ok:
            t, z, d, best = t + h, z_new, d_new, min(best, res_new)
        times.append(t)
        h = min(factor * h, max_step)
    return times


def test_ptc_accepts_a_resolved_rise_of_a_non_normal_flow() -> None:
    """dz/dt = A z + b with a non-normal A (-1 on the diagonal, 6 above): the residual rises
    along the trajectory; ptc accepts the rising steps that resolve the flow (the derivative
    changes by <= half its norm, the residual stays within 10x the best) and grows h by
    ``clamp(1 / change, 1, 2)``, as the hand-written rule does: catches a wrong smoothness
    bound, growth cap or best-residual bound on the slow path."""
    a = np.array([[-1.0, 6.0], [0.0, -1.0]])
    b = np.array([0.0, 1.0])
    ref = _ptc_vector_reference(lambda z: a @ z + b, np.zeros(2), 0.02, 1.0, 1e-8, 1e-8)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    _, stats = steady_state(lambda t, z: z @ at.T + bt, torch.zeros(1, 2, dtype=torch.float64),
                            method="ptc", first_step=0.02, atol=1e-8, rtol=1e-8,
                            record_trajectory=True)
    hist = stats.residual_history[:, 0].numpy()
    assert (np.diff(hist) > 0).any()  # the case exercises accepted rises
    np.testing.assert_allclose(stats.time_history[:, 0].numpy(), ref, rtol=1e-9)


def test_skip_loss_and_jacobian_frobenius_refuse_bad_arguments() -> None:
    """The errors name the argument and what was expected: catches a dropped check (a shape
    mismatch would broadcast silently) or a message that no longer says what is wrong."""
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"skip_norm must be one of \('l2', 'l1'\), got 'l3'"):
        skip_loss(z, z, norm="l3")
    with pytest.raises(TypeError, match="skip_detach must be a bool, got int"):
        skip_loss(z, z, detach=1)
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(1, 3\)"):
        skip_loss(z, z[:1])
    for probes in (0, True, 1.5):
        with pytest.raises(ValueError, match=f"probes must be an int >= 1, got {probes!r}"):
            jacobian_frobenius(lambda z, x: z, z, z, probes=probes)


def test_ptc_samples_follow_their_own_rule_in_one_batch() -> None:
    """Two independent flows in one batch, from h = 2 (cap 50): dz/dt = -1.5 (z - 1)
    overshoots (1.5 h = 3: rejected and shrunk by 0.9 / change) while dz/dt = -0.3 (z - 1)
    descends with res / res_new = 2.5, so on that slow-path step its growth is clamped to 2.
    Each sample's pseudo-times equal its own hand-written sequence: catches a wrong clamp of
    the descent growth or of the shrink on the slow path, or samples sharing a step size."""
    from .test_references import _ptc_reference

    a = torch.tensor([[1.5], [0.3]], dtype=torch.float64)
    _, stats = steady_state(lambda t, z: -a * (z - 1.0), torch.zeros(2, 1, dtype=torch.float64),
                            method="ptc", atol=1e-9, rtol=1e-7, first_step=2.0, max_step=50.0,
                            record_trajectory=True)
    times = stats.time_history.numpy()
    for b, rate in enumerate((1.5, 0.3)):
        ref = _ptc_reference(rate, 0.0, 1e-9, 1e-7, 2.0, 50.0)["times"]
        np.testing.assert_allclose(times[: len(ref), b], ref, rtol=1e-9)
        np.testing.assert_allclose(times[len(ref):, b], ref[-1], rtol=1e-12)  # frozen
    assert stats.rejected >= 2


def test_ptc_returns_the_best_state_when_stopped_during_a_rise() -> None:
    """The non-normal flow of the test above, stopped by max_steps while its residual rises:
    the returned state is the one with the smallest residual seen, not the last: catches the
    best iterate not kept once ptc accepts rising steps."""
    a = torch.tensor([[-1.0, 6.0], [0.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    func = lambda t, z: z @ a.T + b  # noqa: E731
    z, stats = steady_state(func, torch.zeros(1, 2, dtype=torch.float64), method="ptc",
                            first_step=0.02, atol=1e-8, rtol=1e-8, max_steps=7,
                            record_trajectory=True, on_nonconvergence="ignore")
    hist = stats.residual_history[:, 0]
    assert float(hist[-1]) > float(hist.min())  # it stopped above its best
    assert float(stats.residual[0]) == float(hist.min())
    residual = func(0.0, z).pow(2).mean().sqrt()
    assert float(residual) == pytest.approx(float(hist.min()), rel=1e-12)


def test_jacobian_frobenius_default_is_one_probe() -> None:
    """With the default ``probes`` the estimate is the one-draw Hutchinson formula
    ``||eps^T J||^2 / (B D)`` for f(z, x) = 2 z + x (J = 2 I): catches a changed default or a
    check that refuses a single probe."""
    z = torch.zeros(2, 3, dtype=torch.float64)
    value = jacobian_frobenius(lambda z, x: 2 * z + x, z, z,
                               generator=torch.Generator().manual_seed(3))
    eps = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(value, (2 * eps).pow(2).sum() / 6)


@pytest.mark.parametrize(("damping", "rate"), [(1.0, 0.5), (0.5, 0.75)])
def test_picard_damping_sets_the_residual_contraction(damping: float, rate: float) -> None:
    """For g(z) = 0.5 z + 1 the damped step z + beta (g(z) - z) multiplies the residual by
    1 - beta / 2 each iteration (0.5 undamped, 0.75 at beta = 0.5), and one proposal is
    exactly that formula: catches damping ignored, applied when it is 1, or inverted."""
    z = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    _, stats = fixed_point(lambda z: 0.5 * z + 1.0, z, method="picard", damping=damping,
                           atol=1e-300, rtol=0.0, max_steps=6, freeze_converged=False,
                           record_trajectory=True, on_nonconvergence="ignore")
    hist = stats.residual_history[:, 0]
    torch.testing.assert_close(hist[1:] / hist[:-1], torch.full((6,), rate, dtype=torch.float64))
    gz = 0.5 * z + 1.0
    step = Picard(z, damping=damping).propose(z, gz, gz - z)
    torch.testing.assert_close(step, z + damping * (gz - z), rtol=0, atol=1e-15)


def test_ptc_on_a_hump_follows_the_rise_and_growth_cap_rules() -> None:
    """dz/dt = -sin(z) from pi - 0.05: the residual |sin z| must climb 20-fold (to 1 at pi/2)
    before it falls, and ptc accepts a rise only while it stays within 10x the best residual,
    so it stalls below the hump. Its pseudo-times for 60 steps equal the hand-written rule's:
    catches a wrong growth of an accepted rise (clamp 1..2 of 1 / change), a wrong shrink of
    a rejected smooth rise (clamp 0.1..0.5 of 0.9 / change), a cap against the current
    instead of the best residual, or a wrong smoothness bound."""
    ref = _ptc_vector_reference(lambda z: -np.sin(z), np.array([math.pi - 0.05]), 0.1, 1.0,
                                1e-9, 1e-9, max_steps=60)
    _, stats = steady_state(lambda t, z: -torch.sin(z),
                            torch.full((1, 1), math.pi - 0.05, dtype=torch.float64),
                            method="ptc", first_step=0.1, atol=1e-9, rtol=1e-9, max_steps=60,
                            record_trajectory=True, on_nonconvergence="ignore")
    hist = stats.residual_history[:, 0]
    assert float(hist.max()) > 5 * float(hist[0])  # it climbed part of the hump
    np.testing.assert_allclose(stats.time_history[:, 0].numpy(), ref, rtol=1e-9)


def test_ptc_rejection_shrinks_at_most_tenfold() -> None:
    """On dz/dt = -(z - 1) from 0 with a first step of 100, each trial overshoots (residual
    x99, then x9, both with a derivative change far above the smooth-flow bound), so ptc
    rejects and shrinks the step by the clamped factor 0.1 (not 0.9 / change): 100 -> 10 -> 1,
    which lands exactly on the steady state at t = 1. Catches a missing lower clamp of the
    rejection factor (mutant ptc_slow_path 70: the step would fall to 0.45 and the solve
    take more steps)."""
    times: list[float] = []
    z, stats = steady_state(
        lambda t, z: -(z - 1.0), torch.zeros(1, 1, dtype=torch.float64), method="ptc",
        first_step=100.0, max_step=100.0, atol=1e-10, rtol=0.0,
        callback=lambda info: times.append(float(info.t[0])))
    assert (stats.nfe, stats.accepted, stats.rejected) == (4, 1, 2)
    assert times == [0.0, 0.0, 1.0]
    assert float(z) == 1.0


def test_ptc_rule_boundaries() -> None:
    """The ptc step rule at its boundaries, one sample each (D = 1, so rms is |x|): a mild
    descent grows by the least factor; a change of the derivative of exactly PTC_SMOOTH_CHANGE
    and a residual of exactly PTC_GROWTH_CAP times the best still count as a resolved rise, a
    larger change does not; 0 / 0 is no resolved change; a residual plus tolerance that
    overflows is not finite. Catches a boundary or a clamp moved in ``ptc_rule``, which the
    eager loop's slow path and the compiled step share."""
    from contdeq.solvers.ptc import PTC_GROWTH_CAP, PTC_MIN_GROWTH, ptc_rule

    f32 = torch.float32
    res = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0], dtype=f32)
    d = torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.0], [1.0]], dtype=f32)
    d_new = torch.tensor([[0.95], [1.5], [1.75], [1.25], [0.0], [1.0]], dtype=f32)
    res_new = torch.tensor([0.95, 1.5, 1.75, PTC_GROWTH_CAP * 0.25, 0.0, 3e38], dtype=f32)
    tol_new = torch.tensor([1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 3e38], dtype=f32)
    best_res = torch.tensor([1.0, 1.0, 1.0, 0.25, 0.0, 1.0], dtype=f32)
    active = torch.ones(6, dtype=torch.bool)
    ok, factor, finite, rise = ptc_rule(res, d, res_new, d_new, tol_new, best_res, active)
    assert ok.tolist() == [True, True, False, True, False, False]
    assert rise.tolist() == [False, True, False, True, False, False]
    assert finite.tolist() == [True, True, True, True, True, False]
    expected = [PTC_MIN_GROWTH, 1.0, 0.5, 2.0, 0.1, 0.1]
    torch.testing.assert_close(factor, torch.tensor(expected, dtype=f32))


def test_ptc_freezes_a_sample_exactly_at_its_tolerance_on_a_rising_step() -> None:
    """``rms(r) <= tol`` is converged, also on a step where another sample's residual rose
    (ptc's slow path decides which samples stay active). Sample 1: ``g(z) = z / 2 + c`` with
    ``c = 1/8``; one Picard step from 0 leaves ``r = c / 2 = 1/16`` exactly ``atol``, so it
    freezes at ``z = 1/8``. Sample 0 is non-normal: its residual rises on that step."""
    a = torch.tensor([[0.5, 2.5], [0.0, 0.5]], dtype=torch.float64)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    c = torch.full((2,), 0.125, dtype=torch.float64)

    def func(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.stack((a @ z[0] + x, 0.5 * z[1] + c)) - z

    z, stats = steady_state(func, torch.zeros(2, 2, dtype=torch.float64), method="ptc",
                            atol=0.0625, rtol=0.0, max_steps=200)
    assert stats.all_converged and stats.steps > 1
    assert torch.equal(z[1], c)  # frozen where it first met the tolerance, not stepped on
    assert stats.residual[1] == 0.0625
