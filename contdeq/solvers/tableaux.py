"""Butcher tableaux of the embedded Runge-Kutta pairs, written out with their sources.

The coefficients are the published ones, as plain Python floats; each :class:`Tableau` checks
itself at construction (consistent lengths, row sums, weight sums and the order conditions
listed in :meth:`Tableau.order_defects`), and ``tests/test_tableaux.py`` checks that they
equal the tableaux of torchdiffeq 0.2, whose solvers the ``"torchdiffeq"`` and ``"event"``
backends and :class:`~contdeq.nn.NeuralODE` run.

Convention (torchdiffeq's): stage 0 is ``k_0 = f(t, y)``; stage ``i + 1`` is evaluated at
``t + alpha[i] h`` and ``y + h * sum_j beta[i][j] k_j``; ``y_1 = y + h * sum_j c_sol[j] k_j``;
the local error estimate is ``h * sum_j c_error[j] k_j`` with ``c_error = b - b_hat`` (``b``
the propagated weights, ``b_hat`` the embedded ones). In an FSAL pair (dopri5, tsit5, bosh3,
dopri8) the last stage is evaluated at ``y_1`` itself, so ``f(t + h, y_1)`` comes for free: it
is the next step's ``k_0`` and the steady-state residual. adaptive_heun is not FSAL
(torchdiffeq nevertheless reuses its last stage as ``f(y_1)``, which is the derivative at
another point); the lean stepper evaluates ``f(y_1)`` for it, one extra evaluation that is
again the next step's ``k_0``. torchdiffeq's fehlberg2 is left out: its error estimate (weights
of 1/512) does not see the stability limit, and near a steady state it was measured to chatter
there without converging (1000 steps, residual 10x above tolerance).

A new pair is a ``Tableau(...)`` here and one ``TABLEAUX.register(name, tableau)``;
:func:`~contdeq.solvers.steady_state` then accepts it as ``method=name``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .registry import TABLEAUX

__all__ = ["TABLEAUX", "Tableau"]

#: Largest defect a published tableau may show in a checked condition (the coefficients of
#: dopri8 and tsit5 are rounded; theirs are below 1e-14).
TABLEAU_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Tableau:
    """An explicit embedded Runge-Kutta pair, checked at construction.

    Attributes:
        name: method name.
        order: order of the propagated solution (sets the step-size exponent); the embedded
            solution ``b_hat = c_sol - c_error`` is checked to order ``order - 1``.
        alpha: stage times as fractions of the step, one per stage after ``k_0``.
        beta: stage coefficients; ``beta[i]`` has ``i + 1`` entries.
        c_sol: weights of ``k_0 .. k_s`` in the propagated solution.
        c_error: weights of ``k_0 .. k_s`` in the local error estimate (``b - b_hat``).

    Raises:
        ValueError: the lengths are inconsistent, or a row sum, weight sum or order
            condition fails by more than ``1e-12`` (the message names which).
    """

    name: str
    order: int
    alpha: tuple[float, ...]
    beta: tuple[tuple[float, ...], ...]
    c_sol: tuple[float, ...]
    c_error: tuple[float, ...]

    def __post_init__(self) -> None:
        def floats(values: Sequence[float]) -> tuple[float, ...]:
            return tuple(float(v) for v in values)

        object.__setattr__(self, "alpha", floats(self.alpha))
        object.__setattr__(self, "beta", tuple(floats(row) for row in self.beta))
        object.__setattr__(self, "c_sol", floats(self.c_sol))
        object.__setattr__(self, "c_error", floats(self.c_error))
        self._check()

    def _check(self) -> None:
        where = f"tableau {self.name!r}"
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"{where}: order must be an int >= 1, got {self.order!r}")
        stages = len(self.alpha) + 1
        if len(self.beta) != stages - 1 or len(self.c_sol) != stages or len(self.c_error) != stages:
            raise ValueError(
                f"{where}: lengths must be alpha s-1, beta s-1 rows, c_sol s, c_error s; got "
                f"alpha {len(self.alpha)}, beta {len(self.beta)}, c_sol {len(self.c_sol)}, "
                f"c_error {len(self.c_error)}"
            )
        for i, row in enumerate(self.beta):
            if len(row) != i + 1:
                raise ValueError(f"{where}: beta[{i}] must have {i + 1} entries, got {len(row)}")
            if abs(math.fsum(row) - self.alpha[i]) > TABLEAU_TOLERANCE:
                raise ValueError(f"{where}: beta[{i}] sums to {math.fsum(row)!r}, but alpha[{i}] "
                                 f"is {self.alpha[i]!r} (each stage row must sum to its time)")
        if abs(math.fsum(self.c_error)) > TABLEAU_TOLERANCE:
            raise ValueError(f"{where}: c_error must sum to 0 (both solutions consistent), got "
                             f"{math.fsum(self.c_error)!r}")
        b_hat = tuple(b - e for b, e in zip(self.c_sol, self.c_error, strict=True))
        for weights, order, what in ((self.c_sol, self.order, "c_sol"),
                                     (b_hat, self.order - 1, "the embedded c_sol - c_error")):
            for condition, defect in self.order_defects(weights, order):
                if abs(defect) > TABLEAU_TOLERANCE:
                    raise ValueError(f"{where}: {what} violates the order condition {condition} "
                                     f"by {defect:.3g} (order {order} claimed)")

    def order_defects(self, weights: Sequence[float], order: int) -> list[tuple[str, float]]:
        """``(condition, defect)`` of the order conditions checked for ``weights`` ``b``:
        ``sum(b) = 1`` and, for each order ``k <= order``, ``b A^m c^j = j! / k!`` for
        ``m + j = k - 1, j >= 1`` (``A`` the stage matrix, ``c`` the stage times), and
        ``b (c * A c) = 1/8`` for ``k = 4``. Not every condition of orders above 3."""
        c = (0.0, *self.alpha)

        def times_a(v: Sequence[float]) -> list[float]:  # (A v)_i, A strictly lower triangular
            return [0.0] + [math.fsum(a * x for a, x in zip(row, v, strict=False))
                            for row in self.beta]

        def dot(u: Sequence[float], v: Sequence[float]) -> float:
            return math.fsum(x * y for x, y in zip(u, v, strict=True))

        defects = [("sum(b) = 1", math.fsum(weights) - 1.0)]
        for k in range(2, order + 1):
            for m in range(k - 1):
                j = k - 1 - m
                v = [ci**j for ci in c]
                for _ in range(m):
                    v = times_a(v)
                want = math.factorial(j) / math.factorial(k)
                defects.append((f"b A^{m} c^{j} = {j}!/{k}!", dot(weights, v) - want))
            if k == 4:
                ac = times_a(c)
                defects.append(("b (c * A c) = 1/8",
                                dot(weights, [ci * x for ci, x in zip(c, ac, strict=True)])
                                - 1 / 8))
        return defects

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


def _minus(b: Sequence[float], b_hat: Sequence[float]) -> tuple[float, ...]:
    """``c_error = b - b_hat`` entry by entry (the same floats as written out term by term)."""
    return tuple(x - y for x, y in zip(b, b_hat, strict=True))


# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math.
# 6(1): 19-26 (RK5(4)7M), with the embedded fourth-order weights of Shampine (1986), "Some
# practical Runge-Kutta formulas", Math. Comp. 46(173): 135-150, as in torchdiffeq's dopri5.
_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
DOPRI5 = Tableau(
    name="dopri5",
    order=5,
    alpha=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    beta=(
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DOPRI5_B,
    ),
    c_sol=(*_DOPRI5_B, 0.0),
    c_error=_minus((*_DOPRI5_B, 0.0), (1951 / 21600, 0.0, 22642 / 50085, 451 / 720,
                                       -12231 / 42400, 649 / 6300, 1 / 60)),
)

# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62(2): 770-775 (the coefficients as printed;
# error weights b - b_hat).
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

# Bogacki & Shampine (1989), "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 2(4):
# 321-325.
_BOSH3_B = (2 / 9, 1 / 3, 4 / 9)
BOSH3 = Tableau(
    name="bosh3",
    order=3,
    alpha=(1 / 2, 3 / 4, 1.0),
    beta=((1 / 2,), (0.0, 3 / 4), _BOSH3_B),
    c_sol=(*_BOSH3_B, 0.0),
    c_error=_minus((*_BOSH3_B, 0.0), (7 / 24, 1 / 4, 1 / 3, 1 / 8)),
)

# Prince & Dormand (1981), "High order embedded Runge-Kutta formulae", J. Comput. Appl. Math.
# 7(1): 67-75: RK8(7)13M with the paper's rational approximations of the coefficients (those
# of torchdiffeq's dopri8). Thirteen stages; the appended fourteenth, at y_1 with the weights
# b, makes the pair FSAL: 13 evaluations per step.
_DOPRI8_B = (14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825,
             181606767 / 758867731, 561292985 / 797845732, -1041891430 / 1371343529,
             760417239 / 1151165299, 118820643 / 751138087, -528747749 / 2220607170, 1 / 4)
DOPRI8 = Tableau(
    name="dopri8",
    order=8,
    alpha=(1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821,
           13 / 20, 1201146811 / 1299019798, 1.0, 1.0, 1.0),
    beta=(
        (1 / 18,),
        (1 / 48, 1 / 16),
        (1 / 32, 0.0, 3 / 32),
        (5 / 16, 0.0, -75 / 64, 75 / 64),
        (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
        (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000,
         23124283 / 1800000000),
        (16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777,
         545815736 / 2771057229, -180193667 / 1043307555),
        (39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301,
         100302831 / 723423059, 790204164 / 839813087, 800635310 / 3783071287),
        (246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246,
         -309121744 / 1061227803, -12992083 / 490766935, 6005943493 / 2108947869,
         393006217 / 1396673457, 123872331 / 1001029789),
        (-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823,
         -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
         -45442868181 / 3398467696, 3065993473 / 597172653),
        (185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517,
         -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563,
         -4093664535 / 808688257, 3962137247 / 1805957418, 65686358 / 487910083),
        (403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805,
         652783627 / 914296604, 11173962825 / 925320556, -13158990841 / 6184727034,
         3936647629 / 1978049680, -160528059 / 685178525, 248638103 / 1413531060, 0.0),
        _DOPRI8_B,
    ),
    c_sol=(*_DOPRI8_B, 0.0),
    c_error=_minus((*_DOPRI8_B, 0.0), (13451932 / 455176623, 0.0, 0.0, 0.0, 0.0,
                                       -808719846 / 976000145, 1757004468 / 5645159321,
                                       656045339 / 265891186, -3867574721 / 1518517206,
                                       465885868 / 322736535, 53011238 / 667516719, 2 / 45,
                                       0.0, 0.0)),
)

# Heun's method (the explicit trapezoidal rule, order 2) with a first-order embedded solution
# ``y + h k_1``, as in torchdiffeq's adaptive_heun (its error estimate is Euler's with the
# sign flipped, which the error norm does not see).
ADAPTIVE_HEUN = Tableau(
    name="adaptive_heun",
    order=2,
    alpha=(1.0,),
    beta=((1.0,),),
    c_sol=(1 / 2, 1 / 2),
    c_error=_minus((1 / 2, 1 / 2), (0.0, 1.0)),
)

for _tableau in (DOPRI5, TSIT5, BOSH3, DOPRI8, ADAPTIVE_HEUN):
    TABLEAUX.register(_tableau.name, _tableau)
