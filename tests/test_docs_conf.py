"""The documentation configuration: public base classes in the API page, the quick-build
banner."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from torch import nn

import contdeq

CONF = Path(__file__).resolve().parents[1] / "docs" / "conf.py"


def load_conf(monkeypatch: pytest.MonkeyPatch, quick: bool) -> ModuleType:
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("CONTDEQ_TUTORIAL_QUICK", "1" if quick else "0")
    spec = importlib.util.spec_from_file_location("docs_conf", CONF)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_page_shows_public_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``Bases: _SkipBase`` (a private class) on the API page."""
    conf = load_conf(monkeypatch, quick=False)
    for cls, expected in ((contdeq.SkipDEQ, [contdeq.DEQ]), (contdeq.DEQ, [nn.Module]),
                          (contdeq.NeuralODE, [nn.Module]),
                          (contdeq.MultiScaleSkipDEQ, [contdeq.SkipDEQ])):
        bases = list(cls.__bases__)
        conf.public_bases(None, cls.__name__, cls, None, bases)
        assert bases == expected, cls


def test_quick_builds_are_labelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a quick (smoke-test sized) documentation build that looks like the real one."""
    quick = load_conf(monkeypatch, quick=True)
    assert "quick build" in quick.html_title
    assert "smoke-test sizes" in quick.html_theme_options["announcement"]
    full = load_conf(monkeypatch, quick=False)
    assert "quick" not in full.html_title and not hasattr(full, "html_theme_options")
