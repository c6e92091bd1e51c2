"""The compiled pseudo-transient continuation loop (``steady_state(..., compile=True)``).

On small states a solver step costs its number of dispatched tensor operations (about 30 per ptc
step besides ``func``'s; ``benchmarks/op_counts.py`` counts them), and on a GPU each one is a
kernel launch. This loop hands one whole step (the call of ``func``, the Euler update, the RMS
norms, the per-sample test, the step-size control and the best-iterate bookkeeping) to
``torch.compile`` as one function of fixed-shape tensors, so Inductor fuses it into a few
kernels:

* samples are frozen by masking (``dt_b = 0``), never by compacting the batch, so every step has
  the same shapes and the compiled step is reused;
* pseudo-time, step sizes and per-sample counters are tensors, never Python numbers (a Python
  float that changes would be a new constant and a recompile each step);
* a step never synchronizes with the host: it returns a small status vector, read once per step
  by the Python loop, which applies the limits (``max_steps``, ``t_max``, ``timeout``), the
  NaN/Inf policy and the final re-test of frozen samples exactly as the eager loop does.

The step follows :func:`~contdeq.solvers.ptc.PseudoTransientSteps` with both of its paths
fused and branch-free: it runs the same step rule, :func:`~contdeq.solvers.ptc.ptc_rule`
(the eager loop's slow path), on every step (fused, its quantities cost almost nothing), and the
same NaN/Inf messages and stop test. One difference: the NaN/Inf trial count is kept per sample
(a sample's consecutive non-finite trials from its accepted state), where the eager loop keeps
one count for the batch. ``func`` is checked (output, in-place modification of its input)
eagerly on its first call at ``z0``, which :func:`steady_state` makes before the loop; inside
the compiled step no check runs.

**Several steps per call.** On small states a compiled call costs more in its Python wrapper
(Dynamo's guards, AOTAutograd's runtime wrapper: a few hundred microseconds on a CPU) than in
its kernels. ``PTC(steps_per_call=k)`` takes ``k`` steps in one compiled call with one host
read: the wrapper is paid once per ``k`` steps and the limits, the timeout and the NaN/Inf
bound are checked between calls. Samples that converge inside a call are frozen there (the
mask is inside the step), so the returned states are those of one step per call; but the solve
stops only at the end of a call, so it takes (and counts in ``stats.nfe`` and
``stats.steps``) up to ``k - 1`` evaluations more than the eager loop, and a recorded
trajectory has one entry per call.

Warm-up: the first solve of a given shape, dtype and ``func`` compiles the step (seconds to a
minute, depending on ``func``); later solves of the same shapes reuse it, whatever the values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .counting import CountedODEFunc
from .loop import (
    MAX_NONFINITE_TRIALS,
    StepControl,
    Stepper,
    check_stop_after_trials,
    raise_trials_exhausted,
)
from .progress import BestIterate, Progress
from .ptc import ptc_rule
from .stats import LoopResult, StopReason
from .termination import sample_rms

__all__ = ["CompiledPseudoTransientSteps", "compile_supported"]

#: Steady-state methods with a compiled loop.
COMPILED_METHODS = ("ptc",)


def compile_supported(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` has a compiled loop (``compile=True``)."""
    if method not in COMPILED_METHODS:
        raise ValueError(
            f"compile=True supports method in {list(COMPILED_METHODS)}, got method={method!r}; "
            "use method='ptc', or compile=False (or wrap your func in torch.compile yourself)"
        )


def _ptc_step(
    func: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    t0: Tensor,
    state: dict[str, Tensor],
    atol: float,
    rtol: float,
    max_step: float,
    t_max: float,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One masked ptc step of every sample; no host synchronization.

    ``state`` holds ``z``, ``d`` ``(B, D)`` (state, derivative), ``best_z`` ``(B, D)``, and
    ``(B,)`` vectors ``h`` (step sizes), ``res``/``tol`` (residual norm and tolerance at
    ``z``), ``best_res``/``best_tol``, ``t`` (float64 pseudo-time), ``active`` (bool),
    ``accepted``/``attempted``/``trials`` (long: accepted and attempted steps, consecutive
    NaN/Inf trials). Returns ``(new state, d_new, status)``: ``d_new`` ``(B, D)`` is this
    step's evaluation at every sample (the frozen ones at their frozen state), ``status`` a
    float64 ``(3,)`` vector: active samples, their most consecutive NaN/Inf trials, their
    smallest pseudo-time (``inf`` when none is active).
    """
    z, d, h, res, active = state["z"], state["d"], state["h"], state["res"], state["active"]
    t, best_res = state["t"], state["best_res"]
    step = torch.minimum(h.to(t.dtype), t_max - t) * active
    z_new = torch.addcmul(z, step.to(z.dtype).unsqueeze(1), d)
    d_new = func(t0, z_new.reshape(shape)).reshape(z.shape)
    res_new = sample_rms(d_new)
    tol_new = sample_rms(z_new, rtol) + atol
    ok, factor, finite, _ = ptc_rule(res, d, res_new, d_new, tol_new, best_res, active)
    keep = ok.unsqueeze(1)
    improved = ok & (res_new < best_res)
    new_res = torch.where(ok, res_new, res)
    new_tol = torch.where(ok, tol_new, state["tol"])
    new_active = new_res > new_tol
    trials = torch.where(active & ~finite, state["trials"] + 1, 0)
    new = {
        "z": torch.where(keep, z_new, z),
        "d": torch.where(keep, d_new, d),
        "h": (factor * h).clamp(max=max_step),
        "res": new_res,
        "tol": new_tol,
        "t": t + step * ok,
        "active": new_active,
        "best_z": torch.where(improved.unsqueeze(1), z_new, state["best_z"]),
        "best_res": torch.where(improved, res_new, best_res),
        "best_tol": torch.where(improved, tol_new, state["best_tol"]),
        "accepted": state["accepted"] + ok,
        "attempted": state["attempted"] + active,
        "trials": trials,
    }
    status = torch.stack((
        new_active.sum().to(torch.float64),
        (trials * active).amax().to(torch.float64),
        torch.where(new_active, new["t"].to(torch.float64), math.inf).amin(),
    ))
    return new, d_new, status


def _ptc_steps(
    func: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    t0: Tensor,
    state: dict[str, Tensor],
    atol: float,
    rtol: float,
    max_step: float,
    t_max: float,
    n: int,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """``n`` :func:`_ptc_step` in a row (one compiled call, one host read for all of them):
    the status, the state and ``d_new`` are those after the last."""
    state, d_new, status = _ptc_step(func, shape, t0, state, atol, rtol, max_step, t_max)
    for _ in range(n - 1):
        state, d_new, status = _ptc_step(func, shape, t0, state, atol, rtol, max_step, t_max)
    return state, d_new, status


#: The compiled steps, shared by every solve (Dynamo caches one graph per shape, dtype, func
#: code and number of steps per call; ``dynamic=False``: no symbolic shapes).
_compiled_ptc_steps = torch.compile(_ptc_steps, dynamic=False)


class CompiledPseudoTransientSteps(Stepper):
    """:class:`~contdeq.solvers.ptc.PseudoTransientSteps` with each step compiled, on the one
    loop.

    Args:
        func: the counted right-hand side (already called once at ``z``, which checked it).
        z: ``(B, D)`` initial state.
        d: ``(B, D)`` derivative at ``z``.
        progress: the solve's bookkeeping (its ``res``, ``tol``, ``active``, ``t``, ``best`` are
            updated from the compiled state once per step).
        control: ``max_step``, ``t_max`` and ``first_step`` (default ``max_step``).

    :meth:`result` counts steps over (sample, step) pairs; the returned state is each
    unconverged sample's best.
    """

    def __init__(self, func: CountedODEFunc, z: Tensor, d: Tensor, progress: Progress,
                 control: StepControl, steps_per_call: int = 1) -> None:
        assert progress.t is not None
        self.func = func
        self.steps_per_call = steps_per_call
        self.max_step, self.t_max = control.max_step, control.t_max
        first = min(control.first_step or self.max_step, self.max_step)
        counts = torch.zeros_like(progress.res, dtype=torch.long)
        self.state = {
            "z": z, "d": d, "h": torch.full_like(progress.res, first), "res": progress.res,
            "tol": progress.tol, "t": progress.t, "active": progress.active,
            **_best(BestIterate(z, progress.res, progress.tol)),
            # Distinct tensors: an aliasing pattern that changes after the first step recompiles.
            "accepted": counts, "attempted": counts.clone(), "trials": counts.clone(),
        }
        self.t0 = torch.zeros((), dtype=z.dtype, device=z.device)
        self.atol, self.rtol = progress.condition.atol, progress.condition.rtol
        self.n_active, self.trials, self.t_min = float(progress.active.sum()), 0.0, 0.0
        self.d_new: Tensor | None = None
        self.first_step = progress.steps + 1  # the loop counts a step before taking it
        self.last_n = steps_per_call  # steps of the last compiled call

    def stop_reason(self, progress: Progress) -> StopReason | str | None:
        return progress.stop_reason(self.t_max, any_active=self.n_active > 0, t_min=self.t_min)

    def step(self, z: Tensor, progress: Progress) -> tuple[Tensor, bool]:
        func = self.func
        # The loop counted one step; a call takes up to steps_per_call, within max_steps.
        n = min(self.steps_per_call, progress.max_steps - progress.steps + 1)
        # Guards are skipped only where nothing they check changed since the last call: a
        # call of fewer steps (the last one, cut by max_steps) is another graph, which the
        # unguarded call would not look for (it ran the graph of k steps instead).
        guarded = progress.steps == self.first_step or n != self.last_n
        self.last_n = n
        self.state, self.d_new, status = _run_step(
            guarded, func.func, tuple(func.shape), self.t0,
            self.state, self.atol, self.rtol, self.max_step, self.t_max, n)
        func.calls += n
        progress.steps += n - 1
        self.n_active, self.trials, self.t_min = status.tolist()  # the step's one sync
        if self.trials >= MAX_NONFINITE_TRIALS:
            raise_trials_exhausted(func.name, progress.steps, int(self.trials),
                                   "of a sample from its accepted state was NaN/Inf")
        state = self.state
        progress.load(state["res"], state["tol"], state["active"], state["t"])
        return state["z"], False

    def retest(self, z: Tensor, progress: Progress) -> bool:
        state = self.state
        progress.best = BestIterate(state["best_z"], state["best_res"], state["best_tol"])
        # The last call saw every sample at the final state (frozen ones did not move).
        return self.d_new is not None and progress.reopen_stale(z, sample_rms(self.d_new))

    def resume(self, z: Tensor, progress: Progress) -> None:
        assert self.d_new is not None and progress.best is not None
        self.state = {**self.state, "d": self.d_new, "res": progress.res, "tol": progress.tol,
                      "active": progress.active, **_best(progress.best)}
        self.n_active = float(progress.active.sum())

    def check_stop(self, reason: StopReason | str, progress: Progress) -> None:
        check_stop_after_trials(self.func.name, progress.steps, reason, int(self.trials))

    def result(self, z: Tensor, reason: StopReason | str, progress: Progress) -> LoopResult:
        state = self.state
        n_accepted = state["accepted"].sum().tolist()
        return LoopResult(progress.final_state(z), reason, n_accepted,
                          state["attempted"].sum().tolist() - n_accepted)


def _run_step(guarded: bool, *args: object) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The compiled steps on ``args``.

    Dynamo's guards (on func's module, its parameters, every input) cost more than the step on
    small states, and within a solve nothing they check changes but the number of steps of a
    call: they are evaluated on the first call of a solve and on a call of another number of
    steps (``guarded``) only; later calls pick among the cached graphs by the guards that
    differ between them (with one graph cached, none: an unguarded call runs it whatever its
    arguments). A later step that needs a graph not compiled yet (the second step's inputs can
    differ from the first's, e.g. in aliasing) is run again guarded, which compiles it.
    """
    if not guarded:
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return _compiled_ptc_steps(*args)
        except RuntimeError as exc:
            if "skip_guard_eval_unsafe" not in str(exc):
                raise
    return _compiled_ptc_steps(*args)


def _best(best: BestIterate) -> dict[str, Tensor]:
    """The compiled state's copy of ``best``: copies, so that no input of the compiled step
    aliases another (an aliasing pattern that changes is a recompile)."""
    return {"best_z": best.z.clone(), "best_res": best.res.clone(), "best_tol": best.tol.clone()}
