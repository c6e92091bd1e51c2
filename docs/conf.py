"""Sphinx configuration of the contdeq documentation.

Build with ``make docs`` (warnings are errors). ``CONTDEQ_TUTORIAL_QUICK=1`` (``make
docs-quick``) runs the tutorials on their tiny settings; figures are also saved under
``docs/_build/figures`` (``CONTDEQ_TUTORIAL_OUT``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

import contdeq

matplotlib.use("Agg")

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
os.environ.setdefault("CONTDEQ_TUTORIAL_OUT", str(DOCS / "_build" / "figures"))

project = "contdeq"
author = "The contdeq developers"
copyright = "The contdeq developers"
release = contdeq.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}  # members are listed in api.rst
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": str(DOCS / "auto_examples"),
    # Only the tutorials are executed and shown; demo.py, train_digits.py and the data
    # readers in real_data.py are scripts and modules, not gallery pages.
    "filename_pattern": r"/tutorial_",
    "ignore_pattern": r"^(?!tutorial_)",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "image_scrapers": ("matplotlib",),
}

html_theme = "furo"
html_title = f"contdeq {release}"
#: ``make docs`` is the build to publish. ``make docs-quick`` (CI) runs the tutorials at
#: smoke-test sizes, whose accuracies and plots mean little: every page then says so.
QUICK_BUILD = os.environ.get("CONTDEQ_TUTORIAL_QUICK") == "1"
if QUICK_BUILD:
    html_title += " (quick build)"
    html_theme_options = {
        "announcement": "Quick build: the tutorials ran at smoke-test sizes "
                        "(CONTDEQ_TUTORIAL_QUICK=1); their numbers and plots are not "
                        "results. <code>make docs</code> builds the full site.",
    }


def public_bases(app: object, name: str, obj: object, options: object, bases: list) -> None:
    """Show only base classes a user can see: a private base (``_SkipBase``, the mixin
    ``_MultiScale``) or an internal contdeq class (``PerThreadResults``) is replaced by its own
    bases (``DEQ``, ``torch.nn.Module``); ``object`` beside another base is dropped."""

    def hidden(base: type) -> bool:
        return base.__name__.startswith("_") or (
            base.__module__.startswith("contdeq") and base.__name__ not in contdeq.__all__
            and base.__name__ not in contdeq.solvers.__all__)

    shown: list[type] = []
    pending = list(bases)
    while pending:
        base = pending.pop(0)
        if isinstance(base, type) and hidden(base):
            pending[:0] = base.__bases__
        elif base not in shown:
            shown.append(base)
    if len(shown) > 1 and object in shown:
        shown.remove(object)
    bases[:] = shown


def setup(app: Any) -> None:
    app.connect("autodoc-process-bases", public_bases)
