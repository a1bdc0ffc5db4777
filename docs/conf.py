"""Sphinx configuration of the optax_gc documentation (built by ``.ci/docs``).

Everything is local: no intersphinx, no remote assets at build time.
"""

import importlib.metadata
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS), str(DOCS / "_ext")]

from check_links import REPOSITORY, documentation_url  # noqa: E402
from optax_gc_sphinx import type_aliases  # noqa: E402

project = "optax_gc"
author = "optax_gc developers"
copyright = "optax_gc developers, Apache-2.0"
release = version = importlib.metadata.version("optax-gc")

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "optax_gc_sphinx",
]
root_doc = "index"
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext"]

# Unresolved references to optax_gc's own names fail the build (-n -W).
# Other packages' names cannot resolve without intersphinx, which needs the
# network: they are listed here.
nitpicky = True
_EXTERNAL = r"(optax|jax|jaxlib|numpy|np|jnp|typing|collections|types|re|flax)(\..+)?"
_BUILTINS = (
    r"(int|float|complex|bool|str|bytes|object|tuple|list|dict|set|frozenset|type"
    r"|None|Ellipsis|UserWarning|Warning|ValueError|TypeError|KeyError"
    r"|Any|Callable|Sequence|Mapping|Iterator|Literal|NamedTuple|TypeAlias)"
)
nitpick_ignore_regex = [(r"py:.*", _EXTERNAL), (r"py:.*", _BUILTINS)]

# API page: Google docstrings; signatures name the aliases instead of their
# expanded unions; classes are shown by name, without their constructor.
autodoc_type_aliases = type_aliases("optax_gc")
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
python_use_unqualified_type_names = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Markdown pages: headings get GitHub-style anchors, so [x](page.md#heading)
# works in the site and on GitHub alike.
myst_heading_anchors = 3

html_theme = "sphinx_book_theme"
html_title = f"optax_gc {release}"
html_baseurl = documentation_url(DOCS.parent / "pyproject.toml") or ""
html_theme_options = {
    "repository_url": REPOSITORY,
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    "use_source_button": True,
    "show_toc_level": 2,
    "navbar_persistent": [],
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
