"""Counts read off the optimized HLO of the plain-CE program: passes over the logits,
fusions, ``exp`` per logit, bytes written.

Times move with the host's load; these counts do not. ``python -m jaxent.bench --suite hlo
[N C]`` prints them for ``jax.jit(cross_entropy)`` and ``jax.jit(jax.value_and_grad(
cross_entropy))`` in float32 and bfloat16, and :data:`EXPECTED` holds what this checkout
compiles to on the CPU (``tests/test_hlo_counts.py`` asserts it at a small shape). A
changed count is a changed program: re-time it (``--suite ab``) before updating the table.

What is counted, in the entry computation of the compiled module, for logits ``[N, C]``:

* ``fusions``: fusion instructions (XLA:CPU's loop fusions and library reductions);
* ``passes``: instructions that read or write every element of an ``[N, C]`` array (one
  pass each), and ``picks`` those that only gather from it (the label logits);
* ``writes``: instructions whose result is ``[N, C]``, and ``bytes_written`` their size;
* ``exps``: ``exponential`` ops on ``[N, C]`` arrays inside the instructions' fused
  computations (each is one ``exp`` per logit);
* ``temp_bytes``: the compiled temporaries (``memory_analysis()``).

>>> import jax.numpy as jnp
>>> counts(plain_ce("value_and_grad", 8, 300, jnp.float32))["passes"]
4
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

Mode = Literal["value", "value_and_grad"]

# This checkout on the CPU at SHAPE (the ``[N]``-sized bookkeeping, hence ``fusions``, varies
# with N; the passes hold for 256 <= C <= 32768, where the rows' residual and splitting choices
# are those of SHAPE: jaxent._platform.TABLE).
#   value: the row max and a fused sum(exp) read the logits; one gather picks the labels'.
#   float32 value_and_grad: max, exp written to the gradient's buffer, its sum, the gradient
#     written over it (one exp per logit; eb1d4c4 had 3 passes, 2 exps, 1 write, 11 fusions).
#   bfloat16 value_and_grad: max, sum(exp), the gradient pass with its own exp (upcasts fused).
SHAPE = (4096, 32000)
EXPECTED: dict[tuple[str, str], dict[str, int]] = {
    ("float32", "value"): {"passes": 2, "picks": 1, "writes": 0, "exps": 1, "fusions": 13},
    ("float32", "value_and_grad"): {"passes": 4, "picks": 1, "writes": 2, "exps": 1,
                                    "fusions": 20},
    ("bfloat16", "value"): {"passes": 2, "picks": 1, "writes": 0, "exps": 1, "fusions": 13},
    ("bfloat16", "value_and_grad"): {"passes": 3, "picks": 1, "writes": 1, "exps": 2,
                                     "fusions": 17},
}

_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "pred": 1, "u16": 2}


def plain_ce(mode: Mode, n: int, c: int, dtype: Any, loss: Callable | None = None):
    """The compiled ``jax.jit(loss)`` (or of its ``value_and_grad``) on ``[n, c]`` logits of
    ``dtype`` and int32 labels; ``loss`` defaults to :func:`jaxent.cross_entropy`."""
    if loss is None:
        import jaxent  # noqa: PLC0415  (the bench imports jaxent lazily)

        loss = jaxent.cross_entropy
    fn = jax.value_and_grad(loss) if mode == "value_and_grad" else loss
    specs = (jax.ShapeDtypeStruct((n, c), dtype), jax.ShapeDtypeStruct((n,), jnp.int32))
    return jax.jit(fn).lower(*specs).compile()


def _computations(text: str) -> dict[str, list[str]]:
    """The module's computations by name (the entry under ``"ENTRY"``), as their lines."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _elements(dims: str) -> int:
    out = 1
    for d in filter(None, dims.split(",")):
        out *= int(d)
    return out


def counts(compiled: Any) -> dict[str, int]:
    """The counts above for a compiled plain-CE program (its first parameter is the logits)."""
    comps = _computations(compiled.as_text())
    entry = comps["ENTRY"]
    params = [ln for ln in entry if re.search(r"\bparameter\(0\)", ln)]
    logits = _SHAPE.search(_INSTR.match(params[0]).group(2))  # type: ignore[union-attr]
    assert logits is not None
    size = _elements(logits.group(2))
    shapes: dict[str, int] = {}
    out = {"fusions": 0, "passes": 0, "picks": 0, "writes": 0, "bytes_written": 0, "exps": 0}
    for line in entry:
        m = _INSTR.match(line)
        if m is None:
            continue
        name, rest = m.groups()
        result = _SHAPE.search(rest)
        if result is None or "parameter(" in rest or rest.lstrip().startswith("("):
            if result is not None and "parameter(" in rest:
                shapes[name] = _elements(result.group(2))
            continue
        shapes[name] = _elements(result.group(2))
        op = re.search(r"\}?\s([a-z\-]+)\(([^)]*)\)", rest)
        if op is None or op.group(1) in ("bitcast", "tuple", "get-tuple-element"):
            continue
        operands = re.findall(r"%([\w.\-]+)", op.group(2))
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = comps.get(called.group(1), []) if called else []
        writes = shapes[name] == size
        reads = any(shapes.get(o) == size for o in operands)
        picks = reads and not writes and any(" gather(" in ln for ln in body)
        out["fusions"] += op.group(1) == "fusion"
        out["picks"] += picks
        out["passes"] += (writes or reads) and not picks
        out["writes"] += writes
        out["bytes_written"] += size * _BYTES.get(result.group(1), 4) if writes else 0
        out["exps"] += sum(1 for ln in body if " exponential(" in ln
                           and (s := _SHAPE.search(ln)) is not None
                           and _elements(s.group(2)) == size)
    analysis = compiled.memory_analysis()
    out["temp_bytes"] = int(analysis.temp_size_in_bytes) if analysis is not None else -1
    return out


def table(n: int, c: int, libs: dict[str, Any]) -> str:
    """A markdown table of :func:`counts` for each library's ``cross_entropy``, mode and
    dtype, beside :data:`EXPECTED` (at :data:`SHAPE`)."""
    lines = [f"HLO counts of the plain-CE program at {n}x{c} (passes over the logits / "
             "[N, C] writes / exp per logit / fusions; MiB written; MiB temporaries)", "",
             "| program | " + " | ".join(libs) + " | expected |",
             "| --- |" + " ---: |" * (len(libs) + 1)]
    for dtype in ("float32", "bfloat16"):
        for mode in ("value", "value_and_grad"):
            cells = []
            for lib in libs.values():
                k = counts(plain_ce(mode, n, c, dtype, lib.cross_entropy))
                cells.append(f"{k['passes']} / {k['writes']} / {k['exps']} / {k['fusions']}; "
                             f"{k['bytes_written'] / 2**20:.0f}; {k['temp_bytes'] / 2**20:.1f}")
            e = EXPECTED[(dtype, mode)] if (n, c) == SHAPE else None
            cells.append(f"{e['passes']} / {e['writes']} / {e['exps']} / {e['fusions']}"
                         if e else "(at SHAPE only)")
            lines.append(f"| {dtype} {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
