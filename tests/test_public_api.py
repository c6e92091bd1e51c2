"""The public/private split of ``contdeq.solvers``: every module of the package outside it
imports only the names ``contdeq.solvers`` exports and those of
``contdeq.solvers.validation`` (the one module of argument checks)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import contdeq.solvers
import contdeq.solvers.validation

PACKAGE = Path(contdeq.solvers.__file__).resolve().parent.parent
#: The submodules of ``contdeq.solvers`` other packages may import from, with their public names.
ALLOWED = {
    "contdeq.solvers": set(contdeq.solvers.__all__),
    "contdeq.solvers.validation": set(contdeq.solvers.validation.__all__),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def solver_imports(source: str, module: str, is_package: bool) -> list[tuple[str, str, int]]:
    """``(imported module, name, line)`` for each import of ``contdeq.solvers`` or one of its
    submodules in ``source`` (the code of ``module``); relative imports resolved. ``name`` is
    ``"*"`` for ``import contdeq.solvers.x`` and a star import."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "contdeq" or target.startswith("contdeq.solvers"):
                for alias in node.names:
                    if target == "contdeq":  # from contdeq import solvers / from .. import solvers
                        if alias.name == "solvers":
                            found.append(("contdeq.solvers", "*", node.lineno))
                    else:
                        found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "*", node.lineno) for alias in node.names
                      if alias.name.startswith("contdeq.solvers")]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports in ``source`` of a private submodule or private name of ``contdeq.solvers``."""
    bad = []
    for target, name, line in solver_imports(source, module, is_package):
        if target not in ALLOWED:
            bad.append(f"{module}:{line} imports {name} from the private module {target}")
        elif name != "*" and name not in ALLOWED[target]:
            bad.append(f"{module}:{line} imports {name}, which {target} does not export")
    return bad


def test_packages_outside_solvers_import_only_public_names() -> None:
    paths = [p for p in sorted(PACKAGE.rglob("*.py")) if "solvers" not in
             p.relative_to(PACKAGE).parts[:1]]
    assert len(paths) > 20  # the walk found the package
    bad = [v for p in paths for v in violations(p.read_text(), _module_name(p),
                                                 p.name == "__init__.py")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("source", "module"), [
    ("from ..solvers.errors import report_nonconvergence", "contdeq.jiio.joint"),
    ("from .solvers.callback import Stop", "contdeq.robust"),
    ("from ..solvers.validation import raise_nonfinite", "contdeq.nn.deq"),
    ("from ..solvers import _Residual", "contdeq.implicit.options"),
    ("import contdeq.solvers.rk", "contdeq.nn.node"),
    ("from contdeq.solvers.structure import split_states", "contdeq.nn.multiscale"),
])
def test_a_private_import_is_caught(source: str, module: str) -> None:
    """The check is not vacuous: each private import form is reported."""
    assert violations(source, module)


@pytest.mark.parametrize(("source", "module"), [
    ("from ..solvers import sample_rms, solve", "contdeq.jiio.joint"),
    ("from .solvers import Restart", "contdeq.robust"),
    ("from ..solvers.validation import check_state", "contdeq.nn.deq"),
    ("from .. import solvers", "contdeq.nn.deq"),
    ("from ..nn.structure import x", "contdeq.implicit.options"),
])
def test_a_public_import_passes(source: str, module: str) -> None:
    assert not violations(source, module)
