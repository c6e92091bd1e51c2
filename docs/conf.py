"""Sphinx configuration of the contdeq documentation.

Build with ``make docs`` (warnings are errors). ``CONTDEQ_TUTORIAL_QUICK=1`` (``make
docs-quick``) runs the tutorials on their tiny settings; figures are also saved under
``docs/_build/figures`` (``CONTDEQ_TUTORIAL_OUT``).
"""

from __future__ import annotations

import os
from pathlib import Path

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
