"""Sphinx configuration: MyST Markdown pages, the PyData theme, and references generated from the code at build
time (docs/_ext/san_docs.py: the pydantic models' fields, the API's OpenAPI document, the paper-claims verdicts;
sphinx-argparse: the CLI; autodoc: docstrings). `make docs` builds it with -W: a warning fails the build."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

from san import __version__  # noqa: E402  (after the path: the checkout's package, not an installed one)

project = "SAN"
author = "the SAN project"
copyright = "the SAN project, MIT licence"
release = version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
    "san_docs",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]  # the results files start at ### (they are also printed on their own)
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "pydata_sphinx_theme"
html_title = f"SAN {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = False
html_static_path: list[str] = []
