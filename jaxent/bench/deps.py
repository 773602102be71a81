"""Optional dependencies of the benchmark: import them, or say in one line what is missing.

jaxent itself needs only JAX and chex; the benchmark's baseline (optax), its progress bar
(tqdm), its plots (matplotlib) and its PyTorch contenders come with the ``bench`` extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCH_EXTRA = 'pip install "jaxent[bench]"'


class MissingExtra(SystemExit):
    """Raised (and, from the command line, printed as one line) when a needed package is
    missing; a ``SystemExit`` so that ``python -m jaxent.bench`` prints no traceback."""


def optional(module: str) -> tuple[ModuleType | None, str]:
    """``(module, "")`` when ``module`` imports, else ``(None, why)``: the error in one line.

    An import that fails for another reason than absence (a broken build, a missing GPU
    library) is reported the same way, with its own message.
    """
    try:
        return importlib.import_module(module), ""
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here", with why
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"{type(e).__name__}: {first}"[:200]


def importable(module: str) -> bool:
    """Whether ``module`` imports (it is imported, so later imports are free)."""
    return optional(module)[0] is not None


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` with one line naming the extra.

    >>> require("sys", "nothing").__name__
    'sys'
    """
    mod, why = optional(module)
    if mod is None:
        raise MissingExtra(f"jaxent.bench: {needed_for} needs `{module}`, which is not "
                           f"installed ({why}). Install the benchmark extra: {BENCH_EXTRA}")
    return mod


def require_jaxent() -> None:
    """Stop with one line when ``import jaxent`` is not the jaxent package.

    Run from the directory that holds a clone named ``jaxent``, Python imports the clone
    itself as an empty namespace package (no ``__init__.py`` at its top), and the benchmark
    would measure nothing of jaxent; this names the folder it found and what to do instead.

    >>> require_jaxent()  # the package, as imported here
    """
    import jaxent

    if getattr(jaxent, "__file__", None) is not None and hasattr(jaxent, "cross_entropy"):
        return
    where = ", ".join(getattr(jaxent, "__path__", [])) or repr(jaxent)
    raise SystemExit(
        f"jaxent.bench: `import jaxent` found {where}, which is not the jaxent package (a "
        "folder named jaxent without jaxent's __init__.py, such as a clone when run from "
        "its parent directory). Run from the clone's root, or from any other directory, "
        "with jaxent installed: pip install -e \".[bench]\" in the clone.")
