"""Every public name has a docstring (with shapes where tensors go in or out) and an entry in
the API reference, ``docs/api.rst``."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import contdeq
import contdeq.solvers
import contdeq.solvers.validation

ROOT = Path(__file__).resolve().parent.parent


def _api_entries() -> set[str]:
    """Qualified names documented in ``docs/api.rst`` by ``.. auto*::`` or ``.. py:*::``
    directives; short names are qualified by the preceding ``.. currentmodule::``."""
    entries, current = set(), ""
    directive = re.compile(r"^\.\. (auto\w+|py:\w+|currentmodule)::\s*(\S+)\s*$")
    for line in (ROOT / "docs" / "api.rst").read_text().splitlines():
        match = directive.match(line)
        if not match:
            continue
        kind, name = match.groups()
        if kind in ("currentmodule", "py:currentmodule"):
            current = name
        else:
            entries.add(name if name.startswith("contdeq") else f"{current}.{name}")
    return entries


API_ENTRIES = _api_entries()

MODULES = {module.__name__: module
           for module in (contdeq, contdeq.solvers, contdeq.solvers.validation)}
PUBLIC = [(module, name) for module, mod in MODULES.items() for name in mod.__all__]
#: How a docstring states a tensor's shape: ``(B, ...)``, ``(B,)``, ``(N, 64)``, ``(out, ...)``,
#: "shaped like ``z``", or a 0-dim / scalar result.
SHAPE = re.compile(r"``\((B|N|K|out)\b[^`]*\)``|shaped like|0-dim|scalar tensor")
#: Public names whose docstrings do not state shapes yet, although tensors go in or out. Owners:
#: remove a name when its docstring gains shapes (the ratchet test below then keeps it so).
KNOWN_MISSING_SHAPES: set[str] = set()


def _constant_doc(module: ModuleType, name: str) -> str:
    """The ``#:`` comment above ``name = ...`` in ``module``'s package sources."""
    folder = Path(module.__file__).parent
    pattern = re.compile(rf"((?:^#:.*\n)+)^{re.escape(name)}\b.*=", re.M)
    for path in sorted(folder.rglob("*.py")):
        match = pattern.search(path.read_text())
        if match:
            return " ".join(line[2:].strip() for line in match.group(1).splitlines())
    return ""


def _doc(module: ModuleType, name: str) -> str:
    obj = getattr(module, name)
    if isinstance(obj, ModuleType) or inspect.isclass(obj) or inspect.isroutine(obj):
        return inspect.getdoc(obj) or ""
    return _constant_doc(module, name)


def _signatures(obj: object) -> list[object]:
    """A function itself; for a class, its constructor and public methods (inherited too)."""
    if inspect.isfunction(obj):
        return [obj]
    return [member for attr, member in inspect.getmembers(obj, inspect.isfunction)
            if attr == "__init__" or attr == "__call__" or not attr.startswith("_")]


def _takes_tensors(obj: object) -> bool:
    """Whether any annotation of :func:`_signatures` names ``Tensor``."""
    return any("Tensor" in str(a) for target in _signatures(obj)
               for a in inspect.get_annotations(target).values())


def _full_doc(obj: object) -> str:
    """The docstring, for a class with those of the methods it defines itself."""
    parts = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj):
        parts += [inspect.getdoc(member) or "" for member in vars(obj).values()
                  if inspect.isfunction(member)]
    return "\n".join(parts)


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_has_docstring(module: str, name: str) -> None:
    assert _doc(MODULES[module], name).strip(), f"{module}.{name} has no docstring"


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_in_api_reference(module: str, name: str) -> None:
    obj = getattr(MODULES[module], name)
    qualified = obj.__name__ if isinstance(obj, ModuleType) else f"{module}.{name}"
    assert qualified in API_ENTRIES, f"{qualified} has no entry in docs/api.rst"


def _missing_shapes() -> set[str]:
    missing = set()
    for module, name in PUBLIC:
        obj = getattr(MODULES[module], name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and _takes_tensors(obj):
            if not SHAPE.search(_full_doc(obj)):
                missing.add(name)
    return missing


def test_docstrings_state_shapes() -> None:
    new = _missing_shapes() - KNOWN_MISSING_SHAPES
    assert not new, f"docstrings without shapes (write e.g. ``(B, ...)``): {sorted(new)}"


def test_known_missing_shapes_are_still_missing() -> None:
    fixed = KNOWN_MISSING_SHAPES - _missing_shapes()
    assert not fixed, f"remove {sorted(fixed)} from KNOWN_MISSING_SHAPES: they state shapes now"
