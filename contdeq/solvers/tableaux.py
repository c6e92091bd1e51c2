"""Butcher tableaux of the embedded Runge-Kutta pairs, as plain Python floats.

The pairs torchdiffeq 0.2 ships are read from its own tableaux (one source of truth);
Tsitouras 5(4), which torchdiffeq 0.2.5 lacks, is written out here.

Convention (torchdiffeq's): stage 0 is ``k_0 = f(t, y)``; stage ``i + 1`` is evaluated at
``t + alpha[i] h`` and ``y + h * sum_j beta[i][j] k_j``; ``y_1 = y + h * sum_j c_sol[j] k_j``.
In an FSAL pair (dopri5, tsit5, bosh3, dopri8) the last stage is evaluated at ``y_1`` itself, so
``f(t + h, y_1)`` comes for free: it is the next step's ``k_0`` and the steady-state residual.
adaptive_heun is not FSAL (torchdiffeq nevertheless reuses its last stage as ``f(y_1)``, which is
the derivative at another point); the lean stepper evaluates ``f(y_1)`` for it, one extra
evaluation that is again the next step's ``k_0``. torchdiffeq's fehlberg2 is left out: its error
estimate (weights of 1/512) does not see the stability limit, and near a steady state it was
measured to chatter there without converging (1000 steps, residual 10x above tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

from torchdiffeq._impl.adaptive_heun import _ADAPTIVE_HEUN_TABLEAU
from torchdiffeq._impl.bosh3 import _BOGACKI_SHAMPINE_TABLEAU
from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU
from torchdiffeq._impl.dopri8 import _DOPRI8_TABLEAU


@dataclass(frozen=True)
class Tableau:
    """An explicit embedded Runge-Kutta pair.

    Attributes:
        name: method name.
        order: order of the propagated solution (sets the step-size exponent).
        alpha: stage times as fractions of the step, one per stage after ``k_0``.
        beta: stage coefficients; ``beta[i]`` has ``i + 1`` entries.
        c_sol: weights of ``k_0 .. k_s`` in the propagated solution.
        c_error: weights of ``k_0 .. k_s`` in the local error estimate.
    """

    name: str
    order: int
    alpha: tuple[float, ...]
    beta: tuple[tuple[float, ...], ...]
    c_sol: tuple[float, ...]
    c_error: tuple[float, ...]

    @property
    def fsal(self) -> bool:
        """True when the last stage is evaluated at the propagated solution ``y_1``."""
        return (
            self.alpha[-1] == 1.0
            and self.c_sol[-1] == 0.0
            and tuple(self.beta[-1]) == tuple(self.c_sol[:-1])
        )

    @property
    def evaluations_per_step(self) -> int:
        """Function evaluations per step, ``f(y_1)`` included (``k_0`` is the previous one)."""
        return len(self.alpha) + (0 if self.fsal else 1)


def _from_torchdiffeq(name: str, order: int, tableau: object) -> Tableau:
    def floats(values: object) -> tuple[float, ...]:
        return tuple(float(v) for v in values)

    return Tableau(
        name=name,
        order=order,
        alpha=floats(tableau.alpha),
        beta=tuple(floats(row) for row in tableau.beta),
        c_sol=floats(tableau.c_sol),
        c_error=floats(tableau.c_error),
    )


# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62(2): 770-775. Error weights are b - b_hat.
_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
)
TSIT5 = Tableau(
    name="tsit5",
    order=5,
    alpha=(0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    beta=(
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.897153057105493, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (
            5.86145544294642,
            -12.92096931784711,
            8.159367898576159,
            -0.071584973281401,
            -0.028269050394068383,
        ),
        _TSIT5_B,
    ),
    c_sol=(*_TSIT5_B, 0.0),
    c_error=(
        -0.00178001105222577714,
        -0.0008164344596567469,
        0.007880878010261995,
        -0.1447110071732629,
        0.5823571654525552,
        -0.45808210592918697,
        0.015151515151515152,
    ),
)

TABLEAUX: dict[str, Tableau] = {
    "dopri5": _from_torchdiffeq("dopri5", 5, _DORMAND_PRINCE_SHAMPINE_TABLEAU),
    "tsit5": TSIT5,
    "bosh3": _from_torchdiffeq("bosh3", 3, _BOGACKI_SHAMPINE_TABLEAU),
    "dopri8": _from_torchdiffeq("dopri8", 8, _DOPRI8_TABLEAU),
    "adaptive_heun": _from_torchdiffeq("adaptive_heun", 2, _ADAPTIVE_HEUN_TABLEAU),
}
