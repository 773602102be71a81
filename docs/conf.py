"""Sphinx configuration of the jaxent docs.

Build (warnings are errors, as in CI and ``tests/test_docs.py``)::

    python3 -m pip install -e ".[docs]"
    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

Why Sphinx + MyST: it is the stack of the projects jaxent's users read every day (jax,
flax and optax build their docs with Sphinx and write pages in Markdown through
myst-parser), so the API reference comes from the docstrings with ``autodoc`` +
``napoleon`` (Google style, DESIGN.md) and cross-references to ``jax.*`` work the same
way. Pages are Markdown (``.md``); their ``>>>`` examples are run by ``tests/test_docs.py``.

The API reference is generated, never hand-written: at build start :func:`write_api_pages`
writes one page per public name of ``jaxent`` (``jaxent.__all__`` when the package defines
it, else the names ``jaxent/__init__.py`` re-exports as ``import x as x``), so a function
added to the package gets its page with no edit here.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
import sys
import types

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy
sys.path.insert(0, str(DOCS / "_ext"))  # mathml: math rendered when the site is built

import jaxent  # noqa: E402

project = "jaxent"
author = "the jaxent authors"
copyright = "2026, the jaxent authors"  # noqa: A001
release = version = jaxent.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "mathml",
]
# No CDN: math becomes MathML at build time (docs/_ext/mathml.py), readable offline.
html_math_renderer = "mathml"
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "generated", "README.md", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"jaxent {release}"
html_static_path = ["_static"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Keep the aliases' names in signatures (``ArrayLike``, not its 10-member Union).
autodoc_type_aliases = {"ArrayLike": "jax.typing.ArrayLike", "Reduction": "Reduction",
                        "Residual": "Residual", "Impl": "Impl", "KernelLayout": "KernelLayout",
                        "AxisName": "AxisName"}
autodoc_default_options = {"members": False}
# Sphinx renders an alias inside a union (``ArrayLike | None``) as
# ``TypeAliasForwardRef('jax.typing.ArrayLike')``; ``_alias_names`` puts the name back.
_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Docstrings name private modules and JAX objects in ``:mod:`` / ``:func:`` roles; without
# intersphinx (no network in CI) those stay plain text instead of warnings.
nitpicky = False


# ----------------------------------------------------------------- the generated pages


def public_names(module: types.ModuleType = jaxent) -> list[str]:
    """``module.__all__``, else the names its ``__init__.py`` re-exports as ``x as x``."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    tree = ast.parse(pathlib.Path(inspect.getfile(module)).read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            out += [a.asname for a in node.names if a.asname and a.asname == a.name]
        elif isinstance(node, ast.Import):
            out += [a.asname for a in node.names if a.asname and a.asname == a.name]
    return out


def _page(name: str) -> str:
    obj = getattr(jaxent, name)
    title = f"jaxent.{name}"
    head = f"{title}\n{'=' * len(title)}\n\n"
    if isinstance(obj, types.ModuleType):
        members = ", ".join(getattr(obj, "__all__", [])) or ""
        opt = f"   :members: {members}\n" if members else "   :members:\n"
        return head + f".. automodule:: jaxent.{name}\n{opt}"
    if inspect.isclass(obj):
        # The signature without annotations: Sphinx renders a dataclass's string
        # annotations as ``TypeAliasForwardRef(...)``; the fields' types are in its Args.
        sig = inspect.signature(obj)
        sig = sig.replace(parameters=[q.replace(annotation=inspect.Parameter.empty)
                                      for q in sig.parameters.values()],
                          return_annotation=inspect.Signature.empty)
        return head + (f".. autoclass:: jaxent.{name}{sig}\n   :members:\n"
                       "   :special-members: __call__\n")
    return head + f".. autofunction:: jaxent.{name}\n"


def write_api_pages(app=None) -> list[str]:
    """Write ``docs/api/generated/<name>.rst`` for every public name; return the names."""
    out = DOCS / "api" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    names = public_names()
    keep = set()
    for name in names:
        path = out / f"{name}.rst"
        keep.add(path.name)
        text = _page(name)
        if not path.exists() or path.read_text() != text:  # keep mtimes for incremental builds
            path.write_text(text)
    for stale in out.glob("*.rst"):
        if stale.name not in keep:
            stale.unlink()
    return names


def write_gpu_results(app=None) -> None:
    """``docs/generated/gpu_results.md``: the GPU table when one was measured, else a note."""
    out = DOCS / "generated"
    out.mkdir(exist_ok=True)
    for name in ("RESULTS-gpu.md", "GPU_RESULTS.md"):
        if (ROOT / "benchmarks" / name).exists():
            text = (f"The GPU results, as measured (`benchmarks/{name}`):\n\n"
                    f"```{{include}} ../../benchmarks/{name}\n:heading-offset: 1\n```\n")
            break
    else:
        text = ("No GPU results have been recorded yet: `benchmarks/gpu/run.sh` writes them "
                "(see `DEVELOPERS.md`), and this section shows `benchmarks/RESULTS-gpu.md` "
                "once it exists.\n")
    path = out / "gpu_results.md"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _alias_names(app, what, name, obj, options, signature, return_annotation):
    """``autodoc-process-signature``: type aliases by name in every signature."""
    if signature is None and return_annotation is None:
        return None
    return (_FORWARD_REF.sub(r"\1", signature) if signature else signature,
            _FORWARD_REF.sub(r"\1", return_annotation) if return_annotation else return_annotation)


# The pages under zh/ are Chinese: their <html lang> says so (screen readers, search, fonts).
PAGE_LANGUAGES = {"zh/": "zh-CN"}


def _page_language(app, pagename, templatename, context, doctree):
    """``html-page-context``: the language of the pages under a translated folder."""
    for prefix, language in PAGE_LANGUAGES.items():
        if pagename.startswith(prefix):
            context["language"] = language


def setup(app):
    app.connect("autodoc-process-signature", _alias_names)
    app.connect("html-page-context", _page_language)


# Written at import time too, so that the toctree globs see them on the first read.
write_api_pages()
write_gpu_results()
