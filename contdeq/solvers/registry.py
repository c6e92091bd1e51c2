"""Registries: every method name contdeq accepts, registered once next to its implementation.

A :class:`Registry` maps names to implementations. Argument validation
(:meth:`Registry.check`), the public name lists (``STEADY_STATE_METHODS``,
``FIXED_POINT_METHODS``, ``contdeq.implicit.FORWARD_SOLVERS``, ...), the tests'
parametrizations and the check that the documentation names every method all read the
registries, so a new method is its implementation plus one ``register`` call::

    @FIXED_POINT_METHODS.register("newton")
    class Newton: ...

A registry can include others (its names are then its own plus theirs, kept live): the
steady-state methods are the Runge-Kutta tableaux plus ``"ptc"``, the layers' forward solvers
are ``"ode"`` plus every fixed-point method. :func:`registries` lists every registry created.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from .validation import check_choice

if TYPE_CHECKING:
    from .tableaux import Tableau

__all__ = ["FIXED_POINT_METHODS", "STEADY_STATE_METHODS", "TABLEAUX", "Registry", "registries"]

T = TypeVar("T")

_ALL: list[Registry[Any]] = []


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping ``name -> implementation``, filled by :meth:`register`.

    Args:
        kind: what the names are, for messages (``"fixed-point method"``).
        argument: the argument that takes these names, for messages (``"method"``).
        includes: registries whose names this one also contains (live: later registrations
            there show here), listed before this registry's own names.
    """

    def __init__(self, kind: str, argument: str, *, includes: Sequence[Registry[T]] = ()):
        self.kind = kind
        self.argument = argument
        self.includes = tuple(includes)
        self._own: dict[str, T] = {}
        _ALL.append(self)

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name: str, entry: Any = None) -> Any:
        """Register ``entry`` under ``name``; without ``entry``, a decorator that does.

        Raises:
            ValueError: ``name`` is not a non-empty string, or is taken (here or in an
                included registry).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if entry is None:
            def decorator(obj: T) -> T:
                self.register(name, obj)
                return obj
            return decorator
        self._own[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove a name this registry itself holds (for tests registering a toy method)."""
        if name not in self._own:
            raise KeyError(f"{self.kind} {name!r} is not registered in this registry")
        del self._own[name]

    def check(self, value: object, argument: str | None = None) -> str:
        """``value`` is a registered name; otherwise ``ValueError`` naming ``argument`` (default
        :attr:`argument`) and the choices."""
        if isinstance(value, str) and value in self:
            return value
        return check_choice(value, argument or self.argument, tuple(self))

    def __getitem__(self, name: str) -> T:
        if name in self._own:
            return self._own[name]
        for included in self.includes:
            if name in included:
                return included[name]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self._own or any(name in included for included in self.includes)

    def __iter__(self) -> Iterator[str]:
        for included in self.includes:
            yield from included
        yield from self._own

    def __len__(self) -> int:
        return len(self._own) + sum(len(included) for included in self.includes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {tuple(self)})"


def registries() -> tuple[Registry[Any], ...]:
    """Every registry created so far (the solvers' here, the layers' in
    :mod:`contdeq.implicit`)."""
    return tuple(_ALL)


#: Butcher tableaux of the embedded Runge-Kutta pairs, by name (filled in ``tableaux.py``).
TABLEAUX: Registry[Tableau] = Registry("Runge-Kutta tableau", "method")
#: The discrete solvers of :func:`~contdeq.solvers.fixed_point`, by name (each class registers
#: itself in its module; see :class:`~contdeq.solvers.protocol.FixedPointSolver`).
FIXED_POINT_METHODS: Registry[Any] = Registry("fixed-point method", "method")
#: Methods of :func:`~contdeq.solvers.steady_state`: the Runge-Kutta tableaux and the loops
#: registered here (``"ptc"``, in ``integrate.py``).
STEADY_STATE_METHODS: Registry[Any] = Registry("steady-state method", "method",
                                               includes=(TABLEAUX,))
