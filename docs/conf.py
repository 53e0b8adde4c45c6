"""Sphinx configuration: Markdown pages (MyST) and an API reference from the numpydoc
docstrings. Built by ``nox -s docs`` with warnings as errors."""

from __future__ import annotations

import importlib.metadata

project = "kldiv"
author = "kldiv developers"
copyright = "kldiv developers"
release = importlib.metadata.version("kldiv")
version = release

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
autodoc_member_order = "bysource"
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

intersphinx_mapping: dict[str, tuple[str, None]] = {}  # offline builds: no inventories to fetch

html_theme = "pydata_sphinx_theme"
html_title = f"kldiv {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path: list[str] = []
