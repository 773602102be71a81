"""The docs site: every code example on every page runs and prints what the page shows, the
API reference has a page for every public name, and the site builds with warnings as errors.

Examples are ```` ```pycon ```` (or ```` ```python ````) blocks of ``>>>`` lines, checked
with :mod:`doctest`, one namespace per page (blocks run in order, as a reader would type
them). A Python block without ``>>>`` must say why it is not run on its first line
(``# Not run here: ...``); a block right after ``<!-- doctest: needs NAME ... -->`` runs
once ``jaxent`` has those public names (functions other branches are adding) and is
skipped until then; pages that start with ``<!-- doctest: devices=8 -->`` run in a
subprocess with 8 simulated CPU devices.

Run::

    PYTHONPATH=. python3 -m pytest -q -p no:xdist tests/test_docs.py

The build test needs the ``docs`` extra (``pip install -e ".[docs]"``) and is skipped
without it; CI can also build the site directly with
``python3 -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import doctest
import html
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md")
               if "_build" not in p.parts and "generated" not in p.parts)
FENCE = re.compile(r"(?:<!-- doctest: needs ([\w ]+) -->\n)?^```(pycon|python)[^\n]*\n(.*?)^```",
                   re.S | re.M)
DEVICES = re.compile(r"\A<!-- doctest: devices=(\d+) -->")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_FLOAT = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?")


class NumberChecker(doctest.OutputChecker):
    """Exact text, except that floats written with 5 or more significant digits match
    within 2e-6 relative (the last float32 digit depends on the reduction order)."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if super().check_output(want, got, optionflags):
            return True
        wants, gots = _FLOAT.findall(want), _FLOAT.findall(got)
        if len(wants) != len(gots) or _FLOAT.sub("#", want) != _FLOAT.sub("#", got):
            return super().check_output(_FLOAT.sub("#", want), _FLOAT.sub("#", got),
                                        optionflags) and self._close(wants, gots)
        return self._close(wants, gots)

    @staticmethod
    def _close(wants: list[str], gots: list[str]) -> bool:
        if len(wants) != len(gots):
            return False
        for w, g in zip(wants, gots, strict=True):
            a, b = float(w), float(g)
            digits = len(w.lstrip("-").split("e")[0].replace(".", "").lstrip("0"))
            tol = 2e-6 if digits >= 5 else 0.0
            if abs(a - b) > tol * max(abs(a), abs(b)):
                return False
        return True


def blocks(text: str):
    """``(line number, names the block needs, body)`` of each Python block of a page.

    A block right after ``<!-- doctest: needs NAME ... -->`` runs only once ``jaxent`` has
    those public names (functions that other branches are adding); until then it is skipped.
    """
    for m in FENCE.finditer(text):
        yield text.count("\n", 0, m.start(3)), (m.group(1) or "").split(), m.group(3)


def missing_names(needs) -> list[str]:
    import jaxent

    return [n for n in needs if not hasattr(jaxent, n)]


def run_page(path: pathlib.Path) -> tuple[int, int, str]:
    """Run a page's examples; return ``(failures, examples, report)``."""
    import io

    text = path.read_text()
    parser = doctest.DocTestParser()
    out = io.StringIO()
    runner = doctest.DocTestRunner(checker=NumberChecker(), optionflags=FLAGS)
    globs: dict = {"__name__": f"docs.{path.stem}"}
    examples = 0
    problems = []
    for line, needs, body in blocks(text):
        missing = missing_names(needs)
        if missing:
            print(f"{path.name}:{line + 1}: skipped, jaxent has no {', '.join(missing)} yet")
            continue
        if ">>>" not in body:
            if not body.lstrip().startswith("# Not run here"):
                problems.append(f"{path.name}:{line + 1}: a Python block without >>> examples "
                                "must start with '# Not run here: <why>'")
            continue
        test = parser.get_doctest(body, globs, f"{path.name}:{line + 1}", str(path), line)
        examples += len(test.examples)
        runner.run(test, out=out.write, clear_globs=False)
        globs = test.globs  # DocTest copies its globals: carry them to the next block
    failures = runner.summarize(verbose=False).failed + len(problems)
    return failures, examples, "\n".join(problems) + out.getvalue()


def _rel(p: pathlib.Path) -> str:
    return str(p.relative_to(DOCS))


def test_pages_exist():
    names = {_rel(p) for p in PAGES}
    for page in ("index.md", "getting_started.md", "coming_from_pytorch.md",
                 "zh/coming_from_pytorch.md", "coming_from_optax.md", "language_models.md",
                 "sharding.md", "rl_distillation.md", "debugging.md", "benchmarks.md",
                 "compared_with.md", "api/index.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_page_examples(page):
    m = DEVICES.match(page.read_text())
    if m:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={m.group(1)}",
                   JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, __file__, str(page)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return
    failures, _, report = run_page(page)
    assert failures == 0, report


def _conf():
    spec = importlib.util.spec_from_file_location("jaxent_docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def test_every_public_name_has_an_api_page():
    import jaxent

    conf = _conf()
    names = conf.public_names()
    for name in ("cross_entropy", "linear_cross_entropy", "CrossEntropyLoss", "sharded"):
        assert name in names
    # Every public function or class of the package is on the generated list (submodules
    # that importing jaxent loads as a side effect, like jaxent.losses, are not names).
    for name, obj in vars(jaxent).items():
        if not name.startswith("_") and callable(obj):
            assert name in names, f"jaxent.{name} is public but has no API page"
    pages = {p.stem for p in (DOCS / "api" / "generated").glob("*.rst")}
    assert pages == set(names)


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason='the docs build needs: pip install -e ".[docs]"')
    pytest.importorskip("myst_parser", reason='the docs build needs: pip install -e ".[docs]"')
    pytest.importorskip("furo", reason='the docs build needs: pip install -e ".[docs]"')
    pytest.importorskip("latex2mathml", reason='the docs build needs: pip install -e ".[docs]"')
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = _conf()
    for name in conf.public_names():
        assert f"jaxent.{name}" in (out / "api" / "generated" / f"{name}.html").read_text()
    assert (out / "zh" / "coming_from_pytorch.html").exists()
    pages = {p: p.read_text() for p in out.rglob("*.html")}
    # Type aliases by name, math as MathML, nothing loaded from another site.
    for page, text in pages.items():
        assert "TypeAliasForwardRef" not in text, page
        assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', text), page
    assert "<math" in pages[out / "api" / "generated" / "cross_entropy.html"]
    assert "jax.typing.ArrayLike | None" in html.unescape(
        re.sub(r"<[^>]+>", "", pages[out / "api" / "generated" / "cross_entropy.html"]))
    # The Chinese pages say so; the others are English.
    for page, text in pages.items():
        lang = re.search(r'<html[^>]* lang="([^"]+)"', text).group(1)
        assert lang == ("zh-CN" if page.parent.name == "zh" else "en"), (page, lang)
    assert broken_links(out, pages) == []


def broken_links(out: pathlib.Path, pages: dict[pathlib.Path, str]) -> list[str]:
    """Every relative ``href``/``src`` of the built site that names a missing file or a
    missing ``#anchor`` (links to other sites are not followed: CI has no network)."""
    anchors: dict[pathlib.Path, set[str]] = {}
    bad = []
    for page, text in pages.items():
        for url in re.findall(r'(?:href|src)="([^"]*)"', text):
            url = html.unescape(url)
            if re.match(r"[a-z][a-z0-9+.-]*:|//", url):
                continue
            path, _, fragment = url.partition("#")
            path = urllib.parse.unquote(path.split("?")[0])
            target = (page.parent / path).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                bad.append(f"{page.relative_to(out)}: {url} (no such file)")
            elif fragment and target.suffix == ".html":
                if target not in anchors:
                    anchors[target] = set(re.findall(r'\bid="([^"]*)"', target.read_text()))
                if urllib.parse.unquote(fragment) not in anchors[target]:
                    bad.append(f"{page.relative_to(out)}: {url} (no such anchor)")
    return bad


def test_link_check_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "b.html").write_text('<h1 id="y">b</h1>')
    (tmp_path / "a.html").write_text('<a href="b.html#y">ok</a> <a href="b.html#x">no anchor</a>'
                                     '<a href="c.html">no file</a> <a href="https://x.org/">'
                                     'not followed</a> <a href="#top">self</a>')
    pages = {p: p.read_text() for p in tmp_path.glob("*.html")}
    assert broken_links(tmp_path, pages) == ["a.html: b.html#x (no such anchor)",
                                             "a.html: c.html (no such file)",
                                             "a.html: #top (no such anchor)"]


def test_readme_links_name_files_of_the_repository():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links
    missing = [x for x in links if not re.match(r"[a-z]+:", x) and not (ROOT / x).exists()]
    assert missing == []


if __name__ == "__main__":  # one page, in this process: python tests/test_docs.py PAGE
    n_failed, n_examples, text = run_page(pathlib.Path(sys.argv[1]))
    print(text)
    print(f"{n_examples} examples, {n_failed} failed")
    sys.exit(1 if n_failed else 0)
