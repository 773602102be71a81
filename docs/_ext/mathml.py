"""Math rendered to MathML when the site is built: the pages need no script and no network.

Sphinx's default, MathJax, loads a script from a CDN and shows raw TeX offline. Here the
TeX of ``:math:`` roles, ``.. math::`` directives and MyST ``$...$`` / ``$$...$$`` is
converted by ``latex2mathml`` (pure Python, the ``docs`` extra) into ``<math>`` elements,
which every current browser renders natively.
"""

from __future__ import annotations

from docutils import nodes
from latex2mathml.converter import convert
from sphinx.application import Sphinx


def _mathml(latex: str, display: str) -> str:
    return convert(latex.strip(), display=display)


def visit_math(self, node: nodes.math) -> None:
    self.body.append(self.starttag(node, "span", "", CLASS="math notranslate"))
    self.body.append(_mathml(node.astext(), "inline") + "</span>")
    raise nodes.SkipNode


def visit_displaymath(self, node: nodes.math_block) -> None:
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    for part in (p for p in node.astext().split("\n\n") if p.strip()):
        self.body.append(_mathml(part, "block"))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app: Sphinx) -> dict:
    app.add_html_math_renderer("mathml", (visit_math, None), (visit_displaymath, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
