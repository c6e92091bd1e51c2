"""Models of the paper benchmark: every layer kind around the same ``f``, with NFE counters.

Shared settings (:data:`TOL`): steady-state / fixed-point tolerance ``atol = rtol = 5e-3``,
the paper's MNIST setting (DeepEquilibriumNetworks.jl's ``experiments/mnist``); the ODE
integrators (the DEQ's and the NeuralODE's) run 10x tighter, 5e-4; backward tolerance 5e-3;
at most 1000 ODE steps / 100 fixed-point iterations / 100 backward iterations
(:func:`set_tolerance` changes the tolerances together). torchdeq's *default* configuration
keeps its own defaults (fixed-point iteration, 40 iterations, absolute tolerance 1e-3, 1-step
gradient); its IFT configuration uses the shared relative tolerances and iteration caps.

Skip rows use the library's skip term (``skip_weight=1``, L2, stop-gradient at ``z*``); rows
ending in ``paper loss`` use the paper's (``5 * mean|z0 - z*|`` with the gradient reaching
``z*``: ``skip_weight=5, skip_norm="l1", skip_detach=False``).

``WeightTied(d)`` rows apply the same ``f`` ``d`` times and backpropagate through the
applications (:class:`contdeq.WeightTied`); ``masks s`` adds a distinct random mask per
application zeroing the fraction ``s`` of every weight. They are optional in ``paper.py``;
``benchmarks/weight_tied.py`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import contdeq

__all__ = ["COMPILED_MODELS", "MODELS", "OPTIONAL_MODELS", "PAPER_SKIP_LOSS", "TOL",
           "WEIGHT_TIED_MODELS", "Net", "TorchDEQLayer", "build_model", "has_torchdeq",
           "layer_counts", "set_tolerance", "weight_tied_name"]

TOL: dict[str, float] = {"tol": 5e-3, "ode_tol": 5e-4, "backward_tol": 5e-3,
                         "ode_max_steps": 1000, "fp_max_steps": 100, "backward_max_steps": 100}


def set_tolerance(tol: float) -> None:
    """Set the shared steady-state / fixed-point and backward tolerance to ``tol``; the ODE
    integrators (the DEQ's and the NeuralODE's) run 10x tighter."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    TOL.update(tol=tol, ode_tol=tol / 10, backward_tol=tol)


def has_torchdeq() -> bool:
    """Whether the benchmark-only extra ``torchdeq`` can be imported."""
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        return False
    return True


class TorchDEQLayer(nn.Module):
    """torchdeq's DEQ around ``f(z, x)``, counting forward f calls and backward VJPs.

    Advances ``f``'s spectral-norm cap once per training forward and caches the capped weight
    over the solve, as the contdeq layers do (the cache is filled with autograd on, so the
    1-step / IFT gradient reaches the weight).
    """

    def __init__(self, f: nn.Module, **config: Any) -> None:
        super().__init__()
        from torchdeq import get_deq

        self.f = f
        self.deq = get_deq(**config)
        self.ift = bool(config.get("ift", False))
        self.forward_nfe = 0
        self.backward_vjps = 0

    def _count_vjp(self, grad: Tensor) -> None:
        self.backward_vjps += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            contdeq.update_normalization(self.f)
        self.forward_nfe = 0
        self.backward_vjps = 0

        def func(z: Tensor) -> Tensor:
            out = self.f(z, x)
            if torch.is_grad_enabled() and out.requires_grad:
                out.register_hook(self._count_vjp)
            else:
                self.forward_nfe += 1
            return out

        with parametrize.cached():
            _touch_parametrized(self.f)
            z_out, _ = self.deq(func, torch.zeros_like(x))
        if self.training:
            self.forward_nfe += 1  # the graph-building call of the gradient
        return z_out[-1]

    def counts(self) -> tuple[int, int | None]:
        """Forward NFE and backward linear-solve VJPs of the last step (IFT), else ``None``."""
        if not self.ift:
            return self.forward_nfe, 0
        return self.forward_nfe, max(self.backward_vjps - 1, 0)


def _touch_parametrized(module: nn.Module) -> None:
    """Read every parametrized tensor once, so ``parametrize.cached()`` keeps its graph."""
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in sub.parametrizations:
                getattr(sub, name)


class Net(nn.Module):
    """``encoder -> layer -> head``."""

    def __init__(self, encoder: nn.Module, layer: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.layer, self.head = encoder, layer, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.encoder(x)))


def _shared_options(solver: str) -> dict[str, Any]:
    """The shared tolerances and caps of a contdeq equilibrium layer, read from :data:`TOL` when
    the model is built."""
    return {"solver": solver, "atol": TOL["tol"], "rtol": TOL["tol"],
            "max_steps": TOL["ode_max_steps"] if solver == "ode" else TOL["fp_max_steps"],
            "backward_tol": TOL["backward_tol"], "backward_max_steps": TOL["backward_max_steps"],
            "on_nonconvergence": "ignore"}


def _deq(solver: str, backward: str = "implicit", **kw: Any) -> Callable[..., nn.Module]:
    def make(f: nn.Module, predictor: Callable[[], nn.Module], kind: type = contdeq.DEQ
             ) -> nn.Module:
        args = (f, predictor()) if kind is contdeq.SkipDEQ else (f,)
        # Rows without a method are dopri5's (the layers' default before it became ptc).
        method = {"method": "dopri5"} if solver == "ode" and "method" not in kw else {}
        return kind(*args, backward=backward, **_shared_options(solver), **method, **kw)
    return make


def _node(adjoint: bool, compile: bool = False) -> Callable[..., nn.Module]:
    def make(f: nn.Module, predictor: Callable[[], nn.Module]) -> nn.Module:
        return contdeq.NeuralODE(f, adjoint=adjoint, rtol=TOL["ode_tol"], atol=TOL["ode_tol"],
                                 compile=compile)
    return make


def _torchdeq(ift: bool) -> Callable[..., nn.Module]:
    def make(f: nn.Module, predictor: Callable[[], nn.Module]) -> nn.Module:
        if not ift:
            return TorchDEQLayer(f)
        return TorchDEQLayer(f, ift=True, f_stop_mode="rel", b_stop_mode="rel",
                             f_tol=TOL["tol"], b_tol=TOL["backward_tol"],
                             f_max_iter=TOL["fp_max_steps"], b_max_iter=TOL["backward_max_steps"])
    return make


#: The skip term of Pal et al. (2022) / DeepEquilibriumNetworks.jl's MNIST experiments.
PAPER_SKIP_LOSS: dict[str, Any] = {"skip_weight": 5.0, "skip_norm": "l1", "skip_detach": False}


def _skip(kind: type, **kw: Any) -> Callable[..., nn.Module]:
    base = _deq("ode", **kw)
    return lambda f, predictor: base(f, predictor, kind=kind)


#: Depths and mask sparsities of the weight-tied rows (sparsity 0: no masks).
WEIGHT_TIED_DEPTHS = (4, 8, 16)
WEIGHT_TIED_SPARSITIES = (0.0, 0.5, 0.8)


def weight_tied_name(depth: int, sparsity: float, multiscale: bool = False) -> str:
    """``"WeightTied(8)"``, ``"WeightTied(8) masks 0.5"``, ``"MS WeightTied(8) masks 0.8"``."""
    masks = f" masks {sparsity:g}" if sparsity else ""
    return f"{'MS ' if multiscale else ''}WeightTied({depth}){masks}"


def _weight_tied(depth: int, sparsity: float, multiscale: bool = False
                 ) -> Callable[..., nn.Module]:
    """A weight-tied layer factory; the masks' seed is drawn from torch's generator, which
    :func:`build_model` has seeded, so each training seed gets its own reproducible masks."""
    options = {"masks": "distinct", "sparsity": sparsity} if sparsity else {}

    def make(f: nn.Module, predictor: Callable[[], nn.Module], *shapes: Any) -> nn.Module:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        if multiscale:
            return contdeq.MultiScaleWeightTied(f, depth, state_shapes=shapes[0], seed=seed,
                                                **options)
        return contdeq.WeightTied(f, depth, seed=seed, **options)
    return make


def _weight_tied_rows(multiscale: bool) -> dict[str, Callable[..., nn.Module]]:
    return {weight_tied_name(d, s, multiscale): _weight_tied(d, s, multiscale)
            for d in WEIGHT_TIED_DEPTHS for s in WEIGHT_TIED_SPARSITIES}


#: Model name -> factory ``(f, predictor_factory) -> layer``. NeuralODE (backprop) comes first:
#: it defines the target accuracy.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "NeuralODE": _node(adjoint=False),
    "NeuralODE adjoint": _node(adjoint=True),
    "NeuralODE compiled": _node(adjoint=False, compile=True),
    "DEQ(ode, dopri5)": _deq("ode"),
    "DEQ(ode, ptc)": _deq("ode", method="ptc"),
    "DEQ(ode, ptc) jfb": _deq("ode", "jfb", method="ptc"),
    "DEQ(ode, ptc) compiled": _deq("ode", method="ptc", compile=True),
    "DEQ(anderson)": _deq("anderson"),
    "DEQ(anderson) jfb": _deq("anderson", "jfb"),
    "DEQ(broyden)": _deq("broyden"),
    "DEQ(broyden) jfb": _deq("broyden", "jfb"),
    "DEQ(picard)": _deq("picard"),
    "DEQ(picard) jfb": _deq("picard", "jfb"),
    "SkipDEQ(ode, dopri5)": _skip(contdeq.SkipDEQ),
    "SkipRegDEQ(ode, dopri5)": _skip(contdeq.SkipRegDEQ),
    "SkipDEQ(ode, ptc)": _skip(contdeq.SkipDEQ, method="ptc"),
    "SkipRegDEQ(ode, ptc)": _skip(contdeq.SkipRegDEQ, method="ptc"),
    "SkipDEQ(ode, dopri5) paper loss": _skip(contdeq.SkipDEQ, **PAPER_SKIP_LOSS),
    "SkipRegDEQ(ode, dopri5) paper loss": _skip(contdeq.SkipRegDEQ, **PAPER_SKIP_LOSS),
    "SkipDEQ(ode, ptc) paper loss": _skip(contdeq.SkipDEQ, method="ptc", **PAPER_SKIP_LOSS),
    "SkipRegDEQ(ode, ptc) paper loss": _skip(contdeq.SkipRegDEQ, method="ptc",
                                             **PAPER_SKIP_LOSS),
    "torchdeq default": _torchdeq(ift=False),
    "torchdeq IFT": _torchdeq(ift=True),
    **_weight_tied_rows(multiscale=False),
}


def _multiscale(kind: type, solver: str = "ode", **kw: Any) -> Callable[..., nn.Module]:
    """A multi-scale layer factory ``(f, predictor, state_shapes) -> layer``."""
    if kind is contdeq.MultiScaleNeuralODE:
        return lambda f, predictor, shapes: kind(f, state_shapes=shapes, rtol=TOL["ode_tol"],
                                                 atol=TOL["ode_tol"])

    def make(f: nn.Module, predictor: Callable[[], nn.Module], shapes: Any) -> nn.Module:
        args = (f, predictor()) if kind is contdeq.MultiScaleSkipDEQ else (f,)
        method = {"method": "dopri5"} if solver == "ode" and "method" not in kw else {}
        return kind(*args, state_shapes=shapes, **_shared_options(solver), **method, **kw)
    return make


#: Multi-scale models (tasks with ``state_shapes``); "MS NeuralODE" is their reference.
MULTISCALE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "MS NeuralODE": _multiscale(contdeq.MultiScaleNeuralODE),
    "MS DEQ(ode, dopri5)": _multiscale(contdeq.MultiScaleDEQ),
    "MS DEQ(ode, ptc)": _multiscale(contdeq.MultiScaleDEQ, method="ptc"),
    "MS DEQ(ode, ptc) jfb": _multiscale(contdeq.MultiScaleDEQ, method="ptc", backward="jfb"),
    "MS DEQ(anderson)": _multiscale(contdeq.MultiScaleDEQ, solver="anderson"),
    "MS SkipDEQ(ode, ptc)": _multiscale(contdeq.MultiScaleSkipDEQ, method="ptc"),
    "MS SkipRegDEQ(ode, ptc)": _multiscale(contdeq.MultiScaleSkipRegDEQ, method="ptc"),
    "MS SkipRegDEQ(ode, dopri5) paper loss": _multiscale(contdeq.MultiScaleSkipRegDEQ,
                                                         **PAPER_SKIP_LOSS),
    "MS SkipDEQ(ode, ptc) paper loss": _multiscale(contdeq.MultiScaleSkipDEQ, method="ptc",
                                                   **PAPER_SKIP_LOSS),
    "MS SkipRegDEQ(ode, ptc) paper loss": _multiscale(contdeq.MultiScaleSkipRegDEQ,
                                                      method="ptc", **PAPER_SKIP_LOSS),
    **_weight_tied_rows(multiscale=True),
}

#: The weight-tied rows (single- and multi-scale); ``benchmarks/weight_tied.py`` runs them.
WEIGHT_TIED_MODELS = tuple(n for n in (*MODELS, *MULTISCALE_MODELS) if "WeightTied(" in n)

#: Rows whose layer runs compiled (``compile=True``): the DEQ's ptc steps, the NeuralODE's f.
COMPILED_MODELS = ("NeuralODE compiled", "DEQ(ode, ptc) compiled")

#: Registered but left out of the default run (the dopri5 skip rows: slow, and the ptc rows
#: answer the same question; the weight-tied rows: their own run, ``benchmarks/weight_tied.py``;
#: the compiled rows: their warm-up, ``benchmarks/compile.py``): run them with ``--models``.
OPTIONAL_MODELS = ("SkipDEQ(ode, dopri5)", "SkipRegDEQ(ode, dopri5)", *WEIGHT_TIED_MODELS,
                   *COMPILED_MODELS)


def models_for(task: Any, names: Any) -> list[str]:
    """The names among ``names`` that apply to ``task`` (multi-scale or not)."""
    registry = MULTISCALE_MODELS if task.state_shapes is not None else MODELS
    return [n for n in names if n in registry]


def build_model(name: str, task: Any, seed: int) -> Net:
    """Model ``name`` for ``task``; encoder, ``f`` and head get the same weights for every name
    (seeded before they are built; a SkipDEQ predictor is built after them)."""
    torch.manual_seed(seed)
    encoder, f, head = task.encoder(), task.f(), task.head()
    torch.manual_seed(seed + 1)
    if task.state_shapes is not None:
        layer = MULTISCALE_MODELS[name](f, task.predictor, task.state_shapes)
    else:
        layer = MODELS[name](f, task.predictor)
    return Net(encoder, layer, head).to(task.x_train.device)


def layer_counts(layer: nn.Module) -> tuple[int, int | None]:
    """Forward NFE and backward iterations of the layer's last training step.

    Backward iterations: VJPs of the implicit linear solve (0 for jfb / torchdeq's 1-step
    gradient), f calls of the adjoint ODE (NeuralODE adjoint), ``None`` for backprop through
    the solver (NeuralODE).
    """
    if isinstance(layer, TorchDEQLayer):
        return layer.counts()
    stats = layer.stats
    if stats is None:
        return 0, None
    if stats.backward is not None:
        return stats.forward.nfe, stats.backward.nfe
    if isinstance(layer, contdeq.DEQ) and isinstance(layer.backward_mode, contdeq.JFB):
        return stats.forward.nfe, 0
    return stats.forward.nfe, None
