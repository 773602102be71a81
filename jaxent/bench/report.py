"""Reporting a run: the Markdown table with what it is measured against, JSON, plots, and
``benchmarks/RESULTS.md``.

A suite is the dict :func:`jaxent.bench.measure.run_suite` returns (or :func:`load_json`
rebuilds from saved runs). The table is headed by what each ratio is against, how times were
taken, the ceilings measured in the same run, the machine's load, and a warning when the
machine was busy or the times too spread to trust.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import jax

from jaxent.bench import deps
from jaxent.bench.cases import CE, FWD_BWD
from jaxent.bench.measure import BUSY_SPREAD, Result, busy_warnings

MIB = 2**20
BASELINES = ("Ratio: a row's median time over its baseline's, in the same case and run "
             "(lower is better). Baselines: optax "
             "(`softmax_cross_entropy_with_integer_labels(...).mean()`) for plain CE; the naive "
             "materialized XLA path (`h @ W` in full, then `log_softmax`) for the fused linear CE "
             "(and both models' full logits for the fused distillation loss).")


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _mib(v: int | None) -> str:
    return _fmt(None if v is None else v / MIB, ".1f")


def flops_unit(results: Sequence[Result]) -> tuple[str, float]:
    """``("TFLOP/s", 1e3)`` when the table's rates reach TFLOP/s, else ``("GFLOP/s", 1)``:
    the unit of the FLOP/s column and what to divide GFLOP/s by."""
    rates = [r.gflops for r in results if r.gflops]
    return ("TFLOP/s", 1e3) if rates and max(rates) >= 1e3 else ("GFLOP/s", 1.0)


def trust_lines(suite: dict[str, Any]) -> list[str]:
    """The lines above the table: baselines, timing method, ceilings, load, warnings."""
    results = suite["results"]
    rounds = sorted({len(r.times_s) for r in results if r.times_s})
    copy = suite.get("copy_bandwidth")
    lines = [BASELINES, "",
             "Times: min / median / max over "
             + (f"{'/'.join(map(str, rounds))} interleaved calls" if rounds else "the calls")
             + " per row, after a warm-up whose loss was checked against the baseline's; "
             f"a max/min above {BUSY_SPREAD:.1f}x means the times were disturbed.", ""]
    if copy:
        lines.append(f"Copy bandwidth measured in this run: {copy['reference']:.1f} GB/s ("
                     + ", ".join(f"{k} {v:.1f}" for k, v in copy.items() if k != "reference")
                     + "); GB/s counts the minimum bytes (read the logits once, write the "
                     "gradient once).")
    matmul = suite.get("matmul_gflops") or {}
    if matmul:
        unit, div = flops_unit(results)
        lines.append(f"Matmul ceiling measured in this run (one `[N, D] @ [D, V]` in the case's "
                     f"dtype), {unit}: "
                     + ", ".join(f"{k.split()[-1]} {v / div:.1f}" for k, v in matmul.items())
                     + "; FLOP/s counts the materialized path's matmuls (6·N·D·V for the fused "
                     "CE, 8·N·D·V for distillation).")
    load = suite.get("load") or {}
    if load.get("start") is not None:
        lines.append(f"Load average: {load['start']:.1f} at the start, "
                     f"{_fmt(load.get('end'), '.1f')} at the end, on {load.get('cores')} cores.")
    warnings = busy_warnings(results, load.get("start"), load.get("end"), load.get("cores"))
    return [*lines, *([""] + warnings if warnings else [])]


def table(results: Sequence[Result]) -> list[str]:
    """The Markdown table, one row per case and contender."""
    unit, div = flops_unit(results)
    # The fraction of the chip's analytic floor (jaxent.bench.targets), on a known chip.
    roof = any(r.roofline_fraction is not None for r in results)
    lines = [
        f"| case | contender | median ms | min–max ms | ratio | GB/s | % copy BW | {unit} "
        "| % matmul | temp MiB | peak MiB |" + (" % roofline |" if roof else ""),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if roof else ""),
    ]
    for r in results:
        span = f"{r.min_s * 1e3:.1f}–" + ("?" if r.max_s is None else f"{r.max_s * 1e3:.1f}")
        lines.append(
            f"| {r.case} | {r.contender} | {r.median_s * 1e3:.1f} | {span} "
            f"| {_fmt(r.ratio, '.2f', 'x')} | {_fmt(r.gbps, '.1f')} "
            f"| {_fmt(r.copy_fraction and 100 * r.copy_fraction, '.0f')} "
            f"| {_fmt(r.gflops and r.gflops / div, '.1f' if div > 1 else '.0f')} "
            f"| {_fmt(r.matmul_fraction and 100 * r.matmul_fraction, '.0f')} "
            f"| {_mib(r.temp_bytes)} | {_mib(r.peak_bytes)} |"
            + (f" {_fmt(r.roofline_fraction and 100 * r.roofline_fraction, '.0f')} |"
               if roof else ""))
    return lines


def to_markdown(suite: dict[str, Any]) -> str:
    """The results as Markdown: :func:`trust_lines`, then the table (and the warnings again
    under it, so that they are seen whichever end is read)."""
    head = trust_lines(suite)
    warnings = [ln for ln in head if ln.startswith("WARNING")]
    return "\n".join([*head, "", *table(suite["results"]), *([""] + warnings if warnings else [])])


def to_json(suite: dict[str, Any]) -> str:
    """The results as JSON (times in seconds, memory in bytes)."""
    return json.dumps({"copy_bandwidth": suite.get("copy_bandwidth"),
                       "matmul_gflops": suite.get("matmul_gflops", {}),
                       "load": suite.get("load", {}),
                       "environment": environment(),
                       "argv": sys.argv[1:],
                       "notes": suite.get("notes", []),
                       "results": [dataclasses.asdict(r) for r in suite["results"]]}, indent=1)


def load_json(paths: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Merge saved ``--json`` runs (the first run's copy bandwidth and load head the table)."""
    results: list[Result] = []
    notes: list[str] = []
    first: dict[str, Any] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        first = first or data
        results += [Result(**r) for r in data["results"]]
        copy = data.get("copy_bandwidth") or {}
        notes.append(f"from {path}: `python -m jaxent.bench {' '.join(data.get('argv', []))}`"
                     + (f", copy bandwidth {copy['reference']:.1f} GB/s" if copy else ""))
        notes += [n for n in data.get("notes", []) if n not in notes]
    return {"copy_bandwidth": first.get("copy_bandwidth"),
            "matmul_gflops": first.get("matmul_gflops", {}), "load": first.get("load", {}),
            "environment": first.get("environment"), "results": results}, notes


MEMORY_FLOOR_MIB = 0.01  # the memory plot's log axis starts here; smaller values sit on it


def plot(suite: dict[str, Any], path: str) -> None:
    """Plain CE value_and_grad: time ratio to optax and compiled temporary memory per shape.

    The x-axis lists the shapes ``N x C`` in order of C (N changes too); both axes are
    logarithmic, memory from :data:`MEMORY_FLOOR_MIB` up (smaller values are drawn on the
    floor). One legend covers every line of both panels.
    """
    matplotlib = deps.require("matplotlib", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in suite["results"] if r.kind == CE and r.mode == FWD_BWD]
    shapes = sorted({(r.c, _rows(r)) for r in rows})
    xpos = {s: i for i, s in enumerate(shapes)}
    names = list(dict.fromkeys(r.contender for r in rows))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 5))
    handles: dict[str, Any] = {}
    for name in names:
        for dtype, style in (("float32", "-"), ("bfloat16", "--")):
            pts = sorted((xpos[(r.c, _rows(r))], r.ratio, r.temp_bytes) for r in rows
                         if r.contender == name and r.dtype == dtype and r.ratio is not None)
            if not pts:
                continue
            label = f"{name} {'bf16' if dtype == 'bfloat16' else 'f32'}"
            kw = {"color": colors[name], "linestyle": style, "marker": "o", "label": label}
            (handles[label],) = ax_t.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
            mem = [(p[0], max(p[2] / MIB, MEMORY_FLOOR_MIB)) for p in pts if p[2] is not None]
            if mem:
                (handles[label],) = ax_m.plot([m[0] for m in mem], [m[1] for m in mem], **kw)
    ticks = [f"{n} x {c}" if n else str(c) for c, n in shapes]
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(shapes)), ticks, rotation=15)
        ax.set_xlabel("shape N x C (rows x classes)")
    ax_t.set(yscale="log", ylabel="time / optax (same run)",
             title="CE value_and_grad: time ratio to optax (f32 solid, bf16 dashed)")
    ax_t.axhline(1.0, color="gray", lw=0.8)
    ax_m.set(yscale="log", ylabel=f"compiled temp MiB (log; < {MEMORY_FLOOR_MIB} on the floor)",
             title="compiled temporary memory (JAX contenders)")
    ax_m.set_ylim(bottom=MEMORY_FLOOR_MIB * 0.8)
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rows(r: Result) -> int | None:
    """A result's N (saved runs before N was recorded: read off the case name)."""
    if r.n:
        return r.n
    try:
        return int(r.case.split()[-1].split("x")[0])
    except ValueError:
        return None


def environment() -> dict[str, str]:
    """Machine, versions and date, for the results file."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
    }
    from importlib import metadata

    for dist in ("jaxlib", "optax", "torch", "triton", "jax-cce", "tokamax", "liger-kernel",
                 "cut-cross-entropy"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return env


def results_markdown(suite: dict[str, Any], argv: Sequence[str], notes: Sequence[str]) -> str:
    """The full RESULTS.md body: command line, machine, versions, date, notes and table.

    For a report of saved runs, the machine, versions and date are those of the first run.
    """
    env = suite.get("environment") or environment()
    head = [
        "# Benchmark results",
        "",
        f"Command: `python -m jaxent.bench {' '.join(argv)}`",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        "",
        *(f"- note: {n}" for n in notes),
        "",
        "",
    ]
    return "\n".join(head) + to_markdown(suite) + "\n"


ANALYSIS_HEADING = "## Analysis"


def write_results(path: str, generated: str) -> None:
    """Write ``generated``, keeping a hand-written ``## Analysis`` section of an existing file."""
    kept = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if ANALYSIS_HEADING in old:
            kept = "\n" + old[old.index(ANALYSIS_HEADING):]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(generated + kept)
