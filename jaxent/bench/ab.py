"""The ``ab`` suite: this checkout against another commit of jaxent, interleaved in one run.

``python -m jaxent.bench --suite ab --base REV`` exports ``jaxent/`` at ``REV`` (``git
archive``) into a temporary folder as the package ``jaxent_base`` and times, per case, the
baseline (optax for plain CE, the naive materialized product for the fused loss), the base
commit and this checkout, interleaved (A B C A B C ...), reporting each one's median over
the baseline's with the spread; the fused loss's compiled temporaries at the large shape
come from ``memory_analysis()``. Plain CE is also timed against the fresh-write floor, and
both commits' plain-CE programs are counted (:mod:`jaxent.bench.hlo`).
"""

from __future__ import annotations

import importlib
import io
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxent.bench import hlo

# (name, kind, dtype, shape[, keyword arguments of both commits' loss]): plain CE [N, C]
# or the fused loss [N, D, V], value and gradient
CASES: tuple[tuple, ...] = (
    ("CE f32 4096x32000", "ce", "float32", (4096, 32000)),
    ("CE f32 2048x128256", "ce", "float32", (2048, 128256)),
    ("CE bf16 4096x32000", "ce", "bfloat16", (4096, 32000)),
    ("linear f32 4096x1024x32000", "linear", "float32", (4096, 1024, 32000)),
    ("linear bf16 4096x1024x32000", "linear", "bfloat16", (4096, 1024, 32000)),
    ("linear f32 vocab 4096x1024x32000", "linear", "float32", (4096, 1024, 32000),
     {"impl": "vocab"}),
    ("linear f32 2048x2048x128256", "linear", "float32", (2048, 2048, 128256)),
)
MEMORY_SHAPE = (8192, 2048, 128256)


def load_base(rev: str, root: pathlib.Path) -> Any:
    """``jaxent`` at ``rev`` imported as ``jaxent_base`` (its imports renamed)."""
    tar = subprocess.run(["git", "-C", str(root), "archive", rev, "jaxent"], check=True,
                         capture_output=True).stdout
    out = pathlib.Path(tempfile.mkdtemp(prefix="jaxent_base_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(out, filter="data")
    pkg = out / "jaxent_base"
    (out / "jaxent").rename(pkg)
    for path in pkg.rglob("*.py"):
        path.write_text(re.sub(r"\bjaxent\b", "jaxent_base", path.read_text()))
    sys.path.insert(0, str(out))
    return importlib.import_module("jaxent_base")


def _optax_ce(x, y):
    import optax  # noqa: PLC0415  (the bench extra)

    return optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()


def _naive_linear(lib: Any) -> Callable:
    return lambda h, k, y: lib.cross_entropy(h @ k, y)


def _programs(lib: Any, base: Any, kind: str, **kw: Any) -> dict[str, Callable]:
    if kind == "ce":
        fns = {"baseline": _optax_ce, "base": base.cross_entropy, "this": lib.cross_entropy}
        progs = {k: jax.jit(jax.value_and_grad(f)) for k, f in fns.items()}
        # The fresh-write floor: one read and one new [N, C] buffer, as any non-donating
        # gradient pays.
        return {**progs, "floor": jax.jit(lambda x, y: jnp.exp(x))}
    fns = {"baseline": _naive_linear(lib),
           "base": lambda h, k, y: base.linear_cross_entropy(h, k, y, **kw),
           "this": lambda h, k, y: lib.linear_cross_entropy(h, k, y, **kw)}
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in fns.items()}


def _inputs(kind: str, dtype: str, shape: tuple) -> tuple:
    rng = np.random.default_rng(0)
    if kind == "ce":
        n, c = shape
        return (jnp.asarray(rng.normal(size=(n, c)), dtype),
                jnp.asarray(rng.integers(0, c, n), jnp.int32))
    n, d, v = shape
    return (jnp.asarray(rng.normal(size=(n, d)), dtype),
            jnp.asarray(rng.normal(size=(d, v)) / d**0.5, dtype),
            jnp.asarray(rng.integers(0, v, n), jnp.int32))


def _cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def time_case(programs: dict[str, Callable], args: tuple, rounds: int,
              cpu: dict[str, list] | None = None) -> dict[str, list]:
    """Interleaved wall times of each program (after one warm-up call each); the process's
    CPU seconds per call go into ``cpu`` when given (less moved by other processes' load
    than wall time, as long as this one is not starved)."""
    for f in programs.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list] = {k: [] for k in programs}
    for _ in range(rounds):
        for name, f in programs.items():
            time.sleep(0.2)
            c0, t0 = _cpu_seconds(), time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(_cpu_seconds() - c0)
    return times


def temp_bytes(fn: Callable, dtype: str) -> int:
    n, d, v = MEMORY_SHAPE
    specs = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
             jax.ShapeDtypeStruct((n,), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*specs).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None
    return int(analysis.temp_size_in_bytes)


def _mins(times: dict[str, list], name: str) -> str:
    """``name``'s fastest call over optax's and over the fresh-write floor's."""
    best = min(times[name])
    return f"{best / min(times['baseline']):.2f}x, {best / min(times['floor']):.2f}x"


def _cell(ts: list, ref: float) -> str:
    return f"{statistics.median(ts) / ref:.2f}x ({min(ts) / ref:.2f}-{max(ts) / ref:.2f})"


def run(rev: str, rounds: int, root: pathlib.Path, only: str = "") -> tuple[str, dict]:
    """The markdown table and the raw data of one ``ab`` run (the cases whose names match
    ``only``; the fused temporaries only when a fused case runs)."""
    import jaxent  # noqa: PLC0415  (this checkout)

    base = load_base(rev, root)
    lines = [f"Base {rev} against this checkout; each cell: median / baseline (min-max "
             f"over {rounds} interleaved calls); for plain CE also min / min of optax and "
             "of the fresh-write floor (`jnp.exp(x)` into a new buffer).", "",
             "| case | base | this | base min: optax, floor (CPU s) | this min: optax, floor "
             "(CPU s) |", "| --- | ---: | ---: | ---: | ---: |"]
    data: dict[str, Any] = {"rev": rev, "rounds": rounds, "cases": {}}
    cases = [case for case in CASES if re.search(only, case[0])]
    for name, kind, dtype, shape, *kw in cases:
        cpu: dict[str, list] = {}
        times = time_case(_programs(jaxent, base, kind, **(kw[0] if kw else {})),
                          _inputs(kind, dtype, shape), rounds, cpu)
        ref = statistics.median(times["baseline"])
        mins = ["", ""]
        if "floor" in times:
            mins = [f"{_mins(times, k)} ({_mins(cpu, k)})" for k in ("base", "this")]
        lines.append(f"| {name} | {_cell(times['base'], ref)} | {_cell(times['this'], ref)} "
                     f"| {mins[0]} | {mins[1]} |")
        data["cases"][name] = times
        data.setdefault("cpu", {})[name] = cpu
    fused = any(case[1] == "linear" for case in cases)
    lines += ["", "| fused temporaries at 8192x2048x128256 | base | this |",
              "| --- | ---: | ---: |"] if fused else []
    for dtype in ("float32", "bfloat16") if fused else ():
        naive = temp_bytes(_naive_linear(jaxent), dtype)
        row = [temp_bytes(lib.linear_cross_entropy, dtype) / naive for lib in (base, jaxent)]
        data[f"memory {dtype}"] = row
        lines.append(f"| {dtype} (of naive's {naive / 2**20:.0f} MiB) | {row[0]:.2%} | "
                     f"{row[1]:.2%} |")
    lines += ["", hlo.table(*hlo.SHAPE, {"base": base, "this": jaxent})]
    return "\n".join(lines), data
