"""No private name crosses a module boundary, and no private JAX attribute is used.

An AST check over the package (import-linter checks the direction of the imports; this
checks what they reach):

* ``from x import _name`` of a private name that is not a module;
* ``mod._name`` where ``mod`` is a module bound by an import;
* anything from ``jax._src``, and ``._device_assignment`` anywhere.

The allowed exceptions are listed in :data:`ALLOWED` with the reason.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxent"

# (file relative to the repository, offending text) -> why it stays
ALLOWED = {
    ("jaxent/_checks.py", "jax._src"): (  # from jax._src import checkify
        "checkify has no public way to register a rule for a primitive; "
        "checkify.debug_check carries an effect that jax.export cannot serialize"),
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of this repository's ``jaxent``."""
    if not dotted.startswith("jaxent"):
        return False
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def violations(path: pathlib.Path, here: str | None = None) -> list[tuple[str, str]]:
    """``(file, offending text)`` of ``path``, the module ``here`` (from its path)."""
    tree = ast.parse(path.read_text())
    rel = str(path.relative_to(ROOT)) if here is None else path.name
    here = _module_of(path) if here is None else here
    found: list[tuple[str, str]] = []
    modules: set[str] = set()  # names bound to modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jax._src"):
                    found.append((rel, alias.name))
                modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, here, path.name == "__init__.py")
            if source.startswith("jax._src"):
                found.append((rel, source))
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if _is_module(full) or source in ("jax", "jax.experimental", "jax.extend"):
                    modules.add(alias.asname or alias.name)
                elif _private(alias.name):
                    found.append((rel, f"from {source} import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr == "_device_assignment":
                found.append((rel, "._device_assignment"))
            elif (_private(node.attr) and isinstance(node.value, ast.Name)
                  and node.value.id in modules):
                found.append((rel, f"{node.value.id}.{node.attr}"))
    return found


def test_no_private_name_crosses_a_module_boundary():
    found = [v for p in sorted(PACKAGE.rglob("*.py")) for v in violations(p)]
    bad = [v for v in found if v not in ALLOWED]
    assert not bad, "private names used across modules:\n" + "\n".join(
        f"  {f}: {what}" for f, what in bad)


def test_the_check_finds_what_it_looks_for(tmp_path):
    """The checker itself: each pattern is caught in a sample file."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from jaxent.impl.vocab import _stats\n"
        "from jaxent.impl import vocab\n"
        "from jax._src import core\n"
        "x = vocab._rows_fwd\n"
        "y = z._device_assignment\n")
    found = {what for _, what in violations(sample, "jaxent.placement.sample")}
    assert found == {"from jaxent.impl.vocab import _stats", "jax._src",
                     "vocab._rows_fwd", "._device_assignment"}, found
