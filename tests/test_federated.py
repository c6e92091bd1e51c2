"""contdeq.federated: the quality-weighted fusion rule, solver budgets, local training, the
Flower strategy's exclusions, and one small federated run on Flower's simulation engine."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import contdeq
from contdeq.federated import (
    ClientReport,
    LocalData,
    SolverBudget,
    apply_budget,
    dirichlet_split,
    evaluate_classifier,
    fuse_arrays,
    fusion_weights,
    train_local,
)

ROOT = Path(__file__).resolve().parent.parent


def report(n: int, accuracy: float, **kw: object) -> ClientReport:
    return ClientReport(num_examples=n, accuracy=accuracy, residual=kw.pop("residual", 1e-3),
                        converged=1.0, nfe=10.0, **kw)


class Cell(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.W = contdeq.spectral_norm_cap(nn.Linear(width, width, bias=False), cap=0.9)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + x)


def deq_model(tol: float = 1e-6, width: int = 8, features: int = 4,
              classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(features, width),
                         contdeq.DEQ(Cell(width), atol=tol, rtol=tol, max_steps=200),
                         nn.Linear(width, classes))


# -- the fusion rule -------------------------------------------------------------------------

def test_weights_follow_the_formula():
    """w_k = n_k a_k^gamma / sum_j n_j a_j^gamma; catches dropping n_k or the exponent, or a
    missing normalisation."""
    n, a, gamma = [10, 20, 30], [0.5, 0.9, 0.7], 2.0
    raw = [nk * ak**gamma for nk, ak in zip(n, a, strict=True)]
    expected = [r / sum(raw) for r in raw]
    got = fusion_weights([report(nk, ak) for nk, ak in zip(n, a, strict=True)], gamma)
    np.testing.assert_allclose(got.weights, expected, rtol=1e-12)
    assert got.excluded == {} and not got.fallback


def test_gamma_zero_is_fedavg():
    """gamma = 0 must give FedAvg's n_k / sum n_j whatever the accuracies."""
    got = fusion_weights([report(5, 0.1), report(15, 1.0)], gamma=0.0)
    np.testing.assert_allclose(got.weights, [0.25, 0.75], rtol=1e-12)


def test_nan_and_diverged_clients_are_excluded_and_the_rest_renormalised():
    """A NaN metric, a diverged flag or a caller-rejected client gets weight 0 with a reason;
    catches NaN propagating into the weights or the others not summing to 1."""
    reports = [report(10, 0.8), report(10, math.nan), report(30, 0.6),
               report(10, 0.9, diverged=True), report(10, 0.7)]
    got = fusion_weights(reports, 1.0, rejected={4: "its parameters contain NaN/Inf"})
    assert set(got.excluded) == {1, 3, 4}
    assert "non-finite" in got.excluded[1] and "diverged" in got.excluded[3]
    np.testing.assert_allclose(got.weights, [8 / 26, 0, 18 / 26, 0, 0], rtol=1e-12)


def test_all_excluded_gives_zero_weights_and_zero_accuracy_falls_back_to_fedavg():
    """No usable client: all weights 0 (the server keeps its model), not a division by zero;
    all accuracies 0: FedAvg's weights, flagged."""
    none = fusion_weights([report(10, math.nan), report(10, 0.5, diverged=True)])
    assert not none.weights.any() and len(none.excluded) == 2
    zero = fusion_weights([report(10, 0.0), report(30, 0.0)])
    assert zero.fallback
    np.testing.assert_allclose(zero.weights, [0.25, 0.75])


def test_bad_arguments_name_themselves():
    """gamma < 0, out-of-range accuracy, bad rejected indices and bad fusion weights give
    clear errors or exclusions."""
    with pytest.raises(ValueError, match="gamma"):
        fusion_weights([report(1, 0.5)], gamma=-1.0)
    assert "accuracy must be in [0, 1]" in fusion_weights([report(1, 1.5)]).excluded[0]
    with pytest.raises(ValueError, match="rejected"):
        fusion_weights([report(1, 0.5)], rejected={3: "x"})
    with pytest.raises(ValueError, match="weights must be >= 0 and sum to 1"):
        fuse_arrays([{"w": np.ones(2)}, {"w": np.ones(2)}], np.array([0.7, 0.7]))
    with pytest.raises(KeyError, match="val-residual"):
        ClientReport.from_metrics({"num-examples": 1, "val-accuracy": 0.5})


def test_fuse_arrays_is_the_weighted_average_and_skips_zero_weight_nan():
    """The fused parameters equal sum_k w_k theta_k per array, in the original dtype; an
    excluded (weight 0) client holding NaN does not poison the result."""
    rng = np.random.default_rng(0)
    states = [{"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4)}
              for _ in range(3)]
    states[2] = {k: np.full_like(v, np.nan) for k, v in states[2].items()}
    w = np.array([0.25, 0.75, 0.0])
    fused = fuse_arrays(states, w)
    for key in ("a", "b"):
        expected = 0.25 * states[0][key].astype(np.float64) + 0.75 * states[1][key]
        np.testing.assert_allclose(fused[key], expected, rtol=1e-6)
        assert fused[key].dtype == states[0][key].dtype


def test_identical_clients_keep_their_integer_buffers():
    """Catches integer arrays (BatchNorm's ``num_batches_tracked``) truncated after the
    float64 average: identical clients fused to ``n - 1`` when the weights' sum times ``n``
    fell just below ``n`` (two clients of 37 and 40 examples, ``n = 31`` -> 30)."""
    for counts in ([37, 40], [37, 40, 43, 46]):
        weights = fusion_weights([report(n, 1.0) for n in counts], gamma=0.0).weights
        for n in range(1, 200):
            states = [{"count": np.array(n, dtype=np.int64)} for _ in counts]
            fused = fuse_arrays(states, weights)["count"]
            assert fused == n and fused.dtype == np.int64


def test_fuse_arrays_refuses_arrays_of_another_shape():
    """Catches NumPy broadcasting a client's array of another shape into the average: a
    ``(1,)`` reply to a ``(3,)`` parameter was fused silently, a ``(3, 1)`` one made it
    ``(3, 3)``."""
    states = [{"w": np.ones(3)}, {"w": np.ones(3)}]
    for other in (np.array([5.0]), np.ones((3, 1))):
        states[1] = {"w": other}
        with pytest.raises(ValueError, match=r"state 1's 'w' has shape .* state 0's \(3,\)"):
            fuse_arrays(states, np.array([0.5, 0.5]))


def test_report_round_trips_through_metrics():
    """to_metrics / from_metrics keep every field (a lost key would silently zero a weight)."""
    original = ClientReport(12, 0.75, 3e-3, 0.5, 17.0, diverged=False)
    assert ClientReport.from_metrics(original.to_metrics()) == original


# -- budgets, local training, splits ---------------------------------------------------------

def test_budget_caps_the_solver_steps_in_training_and_evaluation():
    """apply_budget must reach every DEQ's train and eval solver: with max_steps=2 the forward
    stops after 2 steps (and does not warn); the unbudgeted model takes more."""
    torch.manual_seed(0)
    model, x = deq_model(), torch.randn(5, 4)
    model.eval()
    model(x)
    free_steps = model[1].stats.forward.steps
    apply_budget(model, SolverBudget(max_steps=2, atol=1e-8, rtol=1e-8))
    for mode in (model.train, model.eval):
        mode()
        model(x)
        assert model[1].stats.forward.steps == 2 < free_steps
        assert not model[1].stats.forward.all_converged


def test_budget_keeps_a_lyapunov_deqs_projected_field():
    """Catches ``apply_budget`` rebuilding a LyapunovDEQ's solvers as plain ones: the layer
    then solved the nominal field of ``f``, without its projection and ``V(z) <= V(z0)``."""
    from contdeq.nn.lyapunov import LyapunovDEQ, LyapunovSolver

    torch.manual_seed(0)
    layer = LyapunovDEQ(Cell(4), 4, hidden=(8,), atol=1e-6, rtol=1e-6)
    apply_budget(layer, SolverBudget(max_steps=5, atol=1e-2, rtol=1e-3))
    for solver in (layer.solver, layer.eval_solver):
        assert isinstance(solver, LyapunovSolver) and solver.lyapunov is layer.lyapunov
        assert solver.options["max_steps"] == 5 and solver.options["atol"] == 1e-2
        assert solver.on_nonconvergence == "ignore"


def test_budget_rejects_bad_values_and_methods_of_discrete_solvers():
    """Invalid budgets fail at construction with the argument's name; an ODE method on an
    Anderson layer is refused rather than ignored."""
    with pytest.raises(ValueError, match="max_steps"):
        SolverBudget(max_steps=0)
    for name in ("atol", "rtol"):
        with pytest.raises(ValueError, match=f"{name} must be"):
            SolverBudget(**{name: -1.0})
    anderson = nn.Sequential(contdeq.DEQ(Cell(4), solver="anderson"))
    with pytest.raises(ValueError, match=r"budget\.method"):
        apply_budget(anderson, SolverBudget(method="bosh3"))



def test_budget_tolerances_are_atol_and_rtol_each_kept_when_none():
    """atol and rtol reach the layer's forward solvers separately; a None one keeps the
    layer's own setting."""
    model = apply_budget(deq_model(tol=1e-6), SolverBudget(atol=1e-3))
    for solver in (model[1].solver, model[1].eval_solver):
        assert (solver.options["atol"], solver.options["rtol"]) == (1e-3, 1e-6)
    model = apply_budget(deq_model(tol=1e-6), SolverBudget(rtol=1e-2, max_steps=5))
    assert (model[1].solver.options["atol"], model[1].solver.options["rtol"]) == (1e-6, 1e-2)


def test_budget_tol_is_the_deprecated_spelling_of_atol_and_rtol():
    """SolverBudget(tol=...) (keyword or second positional, as before) still works for one
    release: a DeprecationWarning at the caller's line names atol and rtol, and the budget
    (equality, repr, options, the trained model) is that of atol=rtol=tol. Passing tol with
    atol or rtol raises TypeError; reading .tol warns likewise; a budget pickled before the
    rename loads as the new one; dataclasses.replace keeps working."""
    new = SolverBudget(max_steps=3, atol=0.1, rtol=0.1)
    with pytest.warns(DeprecationWarning,
                      match=r"SolverBudget\(tol=\.\.\.\) is deprecated.*use atol=\.\.\., rtol="
                      ) as record:
        old = SolverBudget(max_steps=3, tol=0.1)
    assert record[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="use atol=..., rtol="):
        assert SolverBudget(3, 0.1) == new
    assert old == new and hash(old) == hash(new) and old.options() == new.options()
    assert repr(old) == "SolverBudget(max_steps=3, atol=0.1, rtol=0.1, method=None)"
    data = LocalData(*_blobs(40, 0), *_blobs(20, 1))
    reports = []
    for budget in (old, new):
        torch.manual_seed(0)
        model = apply_budget(deq_model(), budget)
        reports.append((train_local(model, data, seed=0), model.state_dict()))
    (old_report, old_state), (new_report, new_state) = reports
    assert old_report == new_report
    assert all(torch.equal(old_state[k], new_state[k]) for k in new_state)
    for extra in ({"atol": 0.1}, {"rtol": 0.1}):
        with pytest.raises(TypeError, match=r"pass atol=\.\.\., rtol=\.\.\. only"):
            SolverBudget(tol=0.1, **extra)
    with pytest.warns(DeprecationWarning, match=r"\.tol is deprecated.*read \.atol and \.rtol"):
        assert new.tol == 0.1
    with pytest.raises(AttributeError, match="differ"), pytest.warns(DeprecationWarning):
        _ = SolverBudget(atol=0.1, rtol=0.2).tol
    assert pickle.loads(pickle.dumps(new)) == new == copy.deepcopy(new)
    constructor, arguments = new.__reduce_ex__(1)[:2]  # as pickled before the rename
    old_state = {"max_steps": 3, "tol": 0.1, "method": None}

    class Pickled:
        def __reduce__(self) -> tuple:
            return constructor, arguments, old_state

    assert pickle.loads(pickle.dumps(Pickled())) == new
    assert dataclasses.replace(new, rtol=0.5) == SolverBudget(max_steps=3, atol=0.1, rtol=0.5)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    return centres[y] + 0.5 * torch.randn(n, 4, generator=g), y


def test_train_local_learns_and_reports_solver_quality():
    """Local training must raise validation accuracy well above chance on separable blobs, and
    the report must carry the solve's residual and NFE (not zeros)."""
    torch.manual_seed(0)
    x, y = _blobs(90, 0)
    data = LocalData(x[:60], y[:60], x[60:], y[60:])
    rep = train_local(deq_model(tol=1e-3), data, epochs=3, lr=0.05, batch_size=20)
    assert rep.accuracy > 0.8 and rep.num_examples == 60 and not rep.diverged
    assert 0 < rep.residual < 1e-2 and rep.nfe > 2 and rep.converged == 1.0


def test_evaluate_classifier_refuses_labels_not_shaped_n():
    """Catches a ``(N, 1)`` column of labels broadcast against the predictions: the server's
    test "accuracy" came out above 1 (2.6 for 5 samples)."""
    x, y = _blobs(6, 0)
    with pytest.raises(ValueError, match=r"y must be class indices of shape \(N,\) = \(6,\)"):
        evaluate_classifier(nn.Linear(4, 3), x, y[:, None])


def test_evaluate_classifier_restores_every_modules_mode():
    """Catches the model left in eval mode: a training loop that evaluated between steps then
    trained without its Jacobian regularizer (``aux_loss`` 0: layers add it in training only),
    and a submodule frozen in eval mode must stay so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), contdeq.DEQ(Cell(8), jacobian_weight=1.0),
                          nn.Linear(8, 3), nn.Dropout(0.1).eval())
    x, y = _blobs(6, 0)
    model[0].train()
    model[1].train()
    model[2].train()
    evaluate_classifier(model, x, y)
    assert [m.training for m in model] == [True, True, True, False]
    model(x)
    assert float(contdeq.aux_loss(model).detach()) > 0


def test_train_local_reports_divergence_instead_of_raising():
    """A NaN loss is reported as diverged (so the server excludes the update), not raised."""
    model = deq_model()
    with torch.no_grad():
        model[2].bias.fill_(math.nan)
    x, y = _blobs(20, 1)
    rep = train_local(model, LocalData(x[:10], y[:10], x[10:], y[10:]))
    assert rep.diverged and rep.problem() is not None


def test_dirichlet_split_partitions_and_small_alpha_is_more_skewed():
    """Shards are disjoint and cover every index; with alpha = 0.1 clients see fewer classes
    than with alpha = 100 (a split ignoring alpha would fail)."""
    labels = torch.arange(600) % 10
    shards = dirichlet_split(labels, 5, 0.1, seed=0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(600))

    def classes_seen(alpha: float) -> float:
        return np.mean([len(np.unique(labels.numpy()[s]))
                        for s in dirichlet_split(labels, 5, alpha, seed=1)])
    assert classes_seen(0.1) < 6 < classes_seen(100.0) == 10
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(labels, 5, 0.0)


def _run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter on this checkout; its standard output (it must
    exit 0)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT),
                                                     "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_contdeq_does_not_import_flower_and_names_the_extra_without_it():
    """`import contdeq` must not pull in flwr; without flwr the pure parts still import and the
    Flower parts raise an ImportError naming the 'federated' extra."""
    code = (
        "import sys, contdeq\n"
        "assert 'flwr' not in sys.modules, 'import contdeq imported flwr'\n"
        "sys.modules['flwr'] = None\n"
        "from contdeq.federated import fusion_weights\n"
        "try:\n"
        "    from contdeq.federated import QualityWeightedFedAvg\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert "contdeq[federated]" in _run_python(code)


def test_star_import_works_without_flower():
    """Catches ``from contdeq.federated import *`` failing without flwr (``__all__`` listed
    the Flower names, whose lazy import raises): it takes the pure names; the Flower names
    still raise the ImportError naming the extra when asked for."""
    code = (
        "import sys\n"
        "sys.modules['flwr'] = None\n"
        "from contdeq.federated import *\n"
        "assert callable(fusion_weights) and 'QualityWeightedFedAvg' not in dir()\n"
        "import contdeq.federated as fed\n"
        "try:\n"
        "    fed.QualityWeightedFedAvg\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert "contdeq[federated]" in _run_python(code)
    import importlib.util

    import contdeq.federated as fed

    flower = importlib.util.find_spec("flwr") is not None
    assert ("QualityWeightedFedAvg" in fed.__all__) == flower


def test_scores_replace_the_reported_accuracy_and_bad_scores_exclude():
    reports = [report(10, 1.0), report(10, 1.0), report(20, 0.2)]
    fw = fusion_weights(reports, gamma=1.0, scores=[0.2, 0.6, 0.1])
    np.testing.assert_allclose(fw.weights, np.array([2.0, 6.0, 2.0]) / 10.0)
    fw = fusion_weights(reports, gamma=1.0, scores=[0.5, math.nan, 1.5])
    assert set(fw.excluded) == {1, 2} and fw.weights[0] == 1.0
    with pytest.raises(ValueError, match="one value per report"):
        fusion_weights(reports, scores=[0.5])


def _digits_shards(clients: int, per_client: int) -> tuple[list[LocalData], torch.Tensor,
                                                           torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    n, v = per_client, per_client // 4
    shards = [LocalData(x[i * (n + v):i * (n + v) + n], y[i * (n + v):i * (n + v) + n],
                        x[i * (n + v) + n:(i + 1) * (n + v)], y[i * (n + v) + n:(i + 1) * (n + v)])
              for i in range(clients)]
    return shards, x[1400:], y[1400:]


@pytest.mark.slow
def test_run_in_process_learns_and_fuses_by_the_rule():
    """Two clients, 2 rounds, no Flower: the global model learns, the weights are the rule
    applied to the reports (gamma 0: n_k / sum n_j), the server's score is used when given
    (a client with shuffled labels scores near chance and gets less weight), bytes count
    both ways."""
    from contdeq.federated import run_in_process, server_scores

    shards, x_test, y_test = _digits_shards(2, 160)
    bad = shards[1]
    shards[1] = LocalData(bad.x_train, bad.y_train[torch.randperm(len(bad.y_train),
                                                     generator=torch.Generator().manual_seed(0))],
                          bad.x_val, bad.y_val)
    budgets = [SolverBudget(max_steps=30, atol=1e-3, rtol=1e-3)] * 2

    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 16),
                             contdeq.DEQ(Cell(16), atol=1e-3, rtol=1e-3, max_steps=30,
                                         on_nonconvergence="ignore"), nn.Linear(16, 10))

    torch.manual_seed(0)
    history: list[dict] = []
    run = run_in_process(model_fn, shards[:1], budgets[:1], num_rounds=2, x_test=x_test,
                         y_test=y_test, epochs=2, lr=0.02, history=history)
    assert run.accuracy[2] > run.accuracy[0] + 0.2
    assert run.bytes_sent == [0, 2 * run.model_bytes, 4 * run.model_bytes]
    assert history[0]["weights"].tolist() == [1.0]
    torch.manual_seed(0)
    history = []
    run_in_process(model_fn, shards, budgets, num_rounds=1, x_test=x_test, y_test=y_test,
                   epochs=2, lr=0.02, gamma=1.0,
                   score=server_scores(model_fn, x_test[:100], y_test[:100]),
                   history=history)
    scores, weights = history[0]["scores"], history[0]["weights"]
    assert scores[0] > scores[1] + 0.1 and weights[0] > weights[1]
    np.testing.assert_allclose(weights, np.array(scores) / sum(scores))


# -- the Flower strategy (no engine) and a run on the simulation engine ----------------------

def _reply(node: int, state: dict[str, np.ndarray], rep: ClientReport) -> object:
    flwr = pytest.importorskip("flwr", reason="flwr not installed (the 'federated' extra)")
    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    del flwr
    metadata = Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="m", group_id="", created_at=0.0, ttl=60.0,
                        message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                          "metrics": MetricRecord(rep.to_metrics())})
    return Message(content=content, metadata=metadata)


def test_strategy_excludes_nan_parameters_and_fuses_the_rest():
    """QualityWeightedFedAvg.aggregate_train: a client with NaN parameters (but a plausible
    report) is excluded by node id; the global model is the rule's average of the others."""
    pytest.importorskip("flwr", reason="flwr not installed (the 'federated' extra)")
    from contdeq.federated import QualityWeightedFedAvg

    good = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 6.0])}]
    bad = {"w": np.array([np.nan, 0.0])}
    replies = [_reply(11, good[0], report(10, 0.5)), _reply(12, bad, report(10, 0.9)),
               _reply(13, good[1], report(30, 1.0))]
    strategy = QualityWeightedFedAvg(gamma=1.0)
    arrays, metrics = strategy.aggregate_train(1, replies)
    w = np.array([10 * 0.5, 30 * 1.0]) / 35.0
    np.testing.assert_allclose(arrays["w"].numpy(), w[0] * good[0]["w"] + w[1] * good[1]["w"])
    record = strategy.history[0]
    assert list(record.excluded) == [12] and "NaN" in record.excluded[12]
    assert metrics["clients-fused"] == 2 and metrics["clients-excluded"] == 1


def test_strategy_excludes_a_reply_of_another_layout_and_fuses_the_rest():
    """Catches one client whose arrays have other names or shapes aborting the round: its
    ValueError from ``fuse_arrays`` ended the server's run instead of excluding that client."""
    pytest.importorskip("flwr", reason="flwr not installed (the 'federated' extra)")
    from contdeq.federated import QualityWeightedFedAvg

    good = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 6.0])}]
    for bad in ({"v": np.array([1.0, 2.0])}, {"w": np.array([1.0, 2.0, 3.0])}):
        replies = [_reply(11, bad, report(10, 0.9)), _reply(12, good[0], report(10, 0.5)),
                   _reply(13, good[1], report(30, 1.0))]
        strategy = QualityWeightedFedAvg(gamma=1.0)
        arrays, _ = strategy.aggregate_train(1, replies)
        w = np.array([10 * 0.5, 30 * 1.0]) / 35.0
        np.testing.assert_allclose(arrays["w"].numpy(),
                                   w[0] * good[0]["w"] + w[1] * good[1]["w"])
        assert list(strategy.history[0].excluded) == [11]
        assert "names or shapes" in strategy.history[0].excluded[11]


def test_strategy_weights_by_the_servers_scores_not_the_reports():
    """With ``score``, the quality is what the server measures on each client's parameters:
    a client reporting accuracy 1.0 whose parameters score 0.1 gets the small weight."""
    pytest.importorskip("flwr", reason="flwr not installed (the 'federated' extra)")
    from contdeq.federated import QualityWeightedFedAvg

    states = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
    replies = [_reply(1, states[0], report(10, 1.0)), _reply(2, states[1], report(10, 0.5))]
    strategy = QualityWeightedFedAvg(gamma=1.0, score=lambda s: 0.1 if s["w"][0] < 2 else 0.9)
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.1 * 1.0 + 0.9 * 3.0])
    assert strategy.history[0].scores == [0.1, 0.9]


def test_federated_run_on_the_simulation_engine(tmp_path):
    """Two clients (one weak, one strong) and one that crashes, 2 rounds on Flower's Ray
    engine: the crash does not stall the rounds, the global model's test accuracy improves,
    and each round's fusion weights are the rule applied to the reports the clients sent."""
    pytest.importorskip("flwr", reason="flwr not installed (the 'federated' extra)")
    pytest.importorskip("ray", reason="ray not installed (flwr[simulation], the 'federated' "
                                      "extra)")
    from sklearn.datasets import load_digits

    from contdeq.federated import QualityWeightedFedAvg, run_federated

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    shards = [LocalData(x[i:i + 240], y[i:i + 240], x[i + 240:i + 300], y[i + 240:i + 300])
              for i in (0, 300)]
    # labels out of range: this client raises in every round (a crashed/dropped device)
    shards.append(LocalData(x[:20], y[:20] + 100, x[20:30], y[20:30]))
    budgets = [SolverBudget(max_steps=3, atol=0.1, rtol=0.1),
               SolverBudget(max_steps=50, atol=1e-3, rtol=1e-3), SolverBudget()]

    def model_fn() -> nn.Module:
        # the server's evaluation reports unconverged samples in run.converged
        return nn.Sequential(nn.Linear(64, 32),
                             contdeq.DEQ(Cell(32), atol=1e-3, rtol=1e-3, max_steps=50,
                                         on_nonconvergence="ignore"),
                             nn.Linear(32, 10))

    torch.manual_seed(0)
    strategy = QualityWeightedFedAvg(gamma=2.0, fraction_evaluate=0.0, min_train_nodes=3,
                                     min_available_nodes=3)
    run = run_federated(model_fn, shards, budgets, strategy, num_rounds=2, x_test=x[1500:],
                        y_test=y[1500:], epochs=2, lr=0.02, round_timeout=300)
    assert run.accuracy[2] > run.accuracy[0] + 0.3
    assert run.bytes_sent[2] == 2 * (3 + 2) * run.model_bytes  # 3 sent, 2 replies per round
    assert len(strategy.history) == 2
    for record in strategy.history:
        assert len(record.failures) == 1 and len(record.node_ids) == 2
        raw = np.array([r.num_examples * r.accuracy**2 for r in record.reports])
        np.testing.assert_allclose(record.weights, raw / raw.sum(), rtol=1e-9)
        # one weak client (3 steps at tol 0.1: large residual, few NFE) and one strong
        weak, strong = sorted(record.reports, key=lambda r: r.nfe)
        assert weak.residual > 1e-2 > strong.residual and weak.nfe < strong.nfe


def test_example_task_is_non_iid_and_keeps_the_test_set_apart():
    """examples/federated_digits.py: the clients' shards and the server's test set are
    disjoint and together cover the data set, and the Dirichlet split gives clients unequal
    class mixes (an IID split would give each client every class in equal share)."""
    pytest.importorskip("flwr", reason="flwr not installed (the 'federated' extra)")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import federated_digits as example
    finally:
        sys.path.remove(str(ROOT / "examples"))
    task = example.make_task("digits", 4, alpha=0.3, seed=0)
    rows = [torch.cat([s.x_train, s.x_val]) for s in task.shards] + [task.x_test, task.x_server]
    everything = torch.cat(rows)
    assert len(everything) == 1797 and len(torch.unique(everything, dim=0)) == len(
        torch.unique(example.load_dataset("digits")[0], dim=0))
    shares = torch.stack([torch.bincount(torch.cat([s.y_train, s.y_val]), minlength=10)
                          / (len(s.y_train) + len(s.y_val)) for s in task.shards])
    assert shares.max() > 0.3  # some client is dominated by one class (IID: about 0.1)
    assert example.budgets(4, 1) == [example.WEAK, example.STRONG, example.STRONG,
                                     example.STRONG]
