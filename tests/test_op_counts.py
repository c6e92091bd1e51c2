"""benchmarks/op_counts.py: aten ops per solver step and per training step, counted."""

from __future__ import annotations

from benchmarks import op_counts
from contdeq.solvers import FIXED_POINT_METHODS, STEADY_STATE_METHODS


def test_every_registered_method_is_counted_and_f_is_attributed():
    rows = op_counts.solver_rows(batch=3, width=4, tol=1e-2)
    labels = [r["solve"] for r in rows]
    assert labels[:len(STEADY_STATE_METHODS)] == [f"steady_state {m}" for m in STEADY_STATE_METHODS]
    assert len(labels) == len(STEADY_STATE_METHODS) + 2 * len(FIXED_POINT_METHODS)
    for row in rows:
        # f(z) = tanh(z W^T + x): t, mm, add, tanh; the ODE form adds one sub. Newton's
        # Jacobian-vector products also run inside the user's function, so at least that.
        per_call = 5 if row["solve"].startswith("steady_state") else 4
        assert row["f_ops"] >= per_call * row["nfe"], row
        if "newton" not in row["solve"] and "implicit_ptc" not in row["solve"]:
            assert row["f_ops"] == per_call * row["nfe"], row
        assert row["ops"] > row["f_ops"] and row["marginal"] > 0, row
        # a no-op callback dispatches no tensor op; it costs Python calls (StepInfo, the call)
        assert row["callback_ops"] == 0 and row["callback_calls"] >= 0, row
    picard = next(r for r in rows if r["solve"] == "fixed_point picard")
    assert picard["callback_calls"] >= 2, picard


def test_counts_are_deterministic_and_the_training_step_splits():
    first = op_counts.training_row(batch=3, width=4, tol=1e-2)
    assert first == op_counts.training_row(batch=3, width=4, tol=1e-2)
    assert first["total"] == first["f"] + first["model"] + first["rest"]
    assert first["f"] > 4 * first["forward_nfe"] and first["rest"] > 0
    table = op_counts.to_markdown(op_counts.solver_rows(2, 3, 1e-2)[:1], first, "header")
    assert table.startswith("header") and "| aten ops | f (evaluations + VJPs)" in table
