"""The named suites of ``python -m jaxent.bench --suite NAME [ARGS...]``.

* ``main`` (the default): plain CE (optax, hand-written autodiff, jaxent, torch) and the
  fused linear CE (materialized path, jaxent, jax-cce, torch) on the CPU.
* ``gpu`` (``--gpu``): bf16 fused linear CE at model-sized heads and plain CE at
  8192x128256 against jaxent's XLA walks, tokamax, Liger, Apple CCE and torch, with FLOP/s
  against a matmul and GB/s against a copy measured in the same run.
* ``tpu`` (``--tpu``): every fused head x impl at Llama-3-8B's head and plain CE at
  8192x128256, bf16, against naive XLA and tokamax, with the roofline fraction
  (``benchmarks/tpu/run.sh``).
* ``linear-memory [N D V]``: compiled temporaries of the fused loss's value_and_grad.
* ``rl-memory [N D V]``: the same for the fused RL and distillation heads against the
  textbook formulas on materialized logits.
* ``linear-speed N D V``: interleaved value_and_grad timing of chosen fused variants.
* ``matmul [N D V TOKEN_BLOCK DW_SLICE]``: throughput of the matmuls behind the fused loss.
* ``explore-ce N C DTYPE [NAMES...]``: candidate plain-CE formulations
  (:mod:`jaxent.bench.formulations`).
* ``ab [REV]``: this checkout against a commit, interleaved (:mod:`jaxent.bench.ab`).
* ``compaction [N D V PERCENT]``: ``capacity=`` against ``capacity=None``, interleaved
  (:mod:`jaxent.bench.compaction`).
* ``hlo [N C]``: passes, writes, ``exp`` per logit and fusions of the compiled plain-CE
  programs (:mod:`jaxent.bench.hlo`).

Each suite takes the parsed command line and returns a :class:`Report`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxent.bench import deps, formulations
from jaxent.bench.cases import (
    CE,
    FWD,
    FWD_BWD,
    LINEAR,
    Case,
    default_cases,
    gpu_cases,
    matmul_flops,
    tpu_cases,
)
from jaxent.bench.compaction import compaction_suite
from jaxent.bench.contenders import (
    Contender,
    build_jax_cce,
    build_torch_linear,
    default_contenders,
    for_kind,
    jaxent_linear,
    load_extra,
)
from jaxent.bench.measure import SETTLE_S, machine_load, run_case, run_suite
from jaxent.bench.report import to_json, to_markdown
from jaxent.distill import DIVERGENCES, Divergence

SuiteName = Literal["main", "gpu", "tpu"]


@dataclasses.dataclass
class Report:
    """What a suite printed and measured: ``markdown`` for people, ``data`` for ``--json``;
    ``suite`` is the timing suite (``main``, ``gpu``, ``linear-speed``, ``explore-ce``)
    that ``--plot`` and ``--write`` take."""

    markdown: str
    data: dict[str, Any]
    suite: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def text(self, as_json: bool) -> str:
        if not as_json:
            return self.markdown
        return to_json(self.suite) if self.suite is not None else json.dumps(self.data, indent=1)


def _ints(args: Sequence[str], defaults: Sequence[int], what: str) -> list[int]:
    """Positional integers (``defaults`` when none are given)."""
    if not args:
        return list(defaults)
    if len(args) != len(defaults) or not all(a.isdigit() for a in args):
        raise SystemExit(f"--suite {what} takes {len(defaults)} integers, got {list(args)}")
    return [int(a) for a in args]


def _timing_suite(results: list, notes: list[str], load_start: float | None) -> dict[str, Any]:
    """A timing suite without ceilings (no copy or matmul measured), with the load."""
    return {"copy_bandwidth": None, "results": results, "notes": notes,
            "load": {"start": load_start, "end": machine_load(), "cores": os.cpu_count()}}


def _timing_report(suite: dict[str, Any], notes: list[str]) -> Report:
    suite["notes"] = notes + suite.get("notes", [])
    return Report(to_markdown(suite), {}, suite, suite["notes"])


def suite_cases(name: SuiteName, quick: bool, tiny: bool, only: str) -> list[Case]:
    """The cases of the ``main``, ``gpu`` or ``tpu`` suite whose names match ``only`` (the
    distillation cases only where jaxent has ``linear_distillation_loss``)."""
    import jaxent

    distill = hasattr(jaxent, "linear_distillation_loss")
    cases = (gpu_cases(quick, tiny, distill) if name == "gpu"
             else tpu_cases(tiny, distill) if name == "tpu" else default_cases(quick, distill))
    return [c for c in cases if re.search(only, c.name)]


def _suite_contenders(name: SuiteName) -> tuple[list[Contender], list[str]]:
    """The suite's contenders: the CPU's, the GPU's (CUDA ones on a GPU), or the TPU's (the
    GPU suite's JAX contenders: jaxent's walks and kernels, naive XLA, tokamax)."""
    if name == "tpu":
        return default_contenders(gpu=True, cuda=False, torch=False)
    gpu = name == "gpu"
    return default_contenders(gpu, cuda=gpu and jax.default_backend() == "gpu")


def main_suite(args: Any, name: SuiteName = "main") -> Report:
    """The ``main`` (CPU), ``gpu`` or ``tpu`` suite."""
    deps.require("optax", "the plain cross-entropy baseline")
    on_gpu = jax.default_backend() == "gpu"
    contenders, notes = _suite_contenders(name)
    for spec in args.extra:
        contenders += load_extra(spec)
    cases = suite_cases(name, args.quick, args.tiny, args.only)
    rounds = args.rounds or (3 if args.quick or args.tiny else 5)
    suite = run_suite(cases, contenders, rounds, progress=not args.no_progress, gpu=on_gpu,
                      copy_bytes=2**30 if on_gpu else (2**20 if args.tiny else 256 * 2**20),
                      matmul_ceiling=name != "main")
    return _timing_report(suite, notes)


def list_suite(args: Any, name: SuiteName) -> Report:
    """``--list``: the cases and contenders a run would time, and the ones skipped (why)."""
    contenders, notes = _suite_contenders(name)
    cases = suite_cases(name, args.quick, args.tiny, args.only)
    names = list(dict.fromkeys(c.name for c in contenders))
    lines = [f"suite {name}: {len(cases)} cases, {len(names)} contenders", "", "cases:",
             *(f"  {c.name}" for c in cases), "", "contenders:", *(f"  {n}" for n in names),
             "", "skipped:", *(f"  {n}" for n in notes)]
    return Report("\n".join(lines), {"cases": [c.name for c in cases], "contenders": names,
                                     "skipped": notes})


# ------------------------------------------------------------------------------ linear-memory
def _naive_jaxent(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
    """The materialized path of the linear notes: ``h @ W`` then ``jaxent.cross_entropy``."""
    import jaxent

    return jaxent.cross_entropy(h @ w, y)


def _memory_variants() -> tuple[dict[str, tuple[Callable, str]], list[str]]:
    """Loss functions and kernel layouts (``"dv"``/``"vd"``) for ``linear-memory``."""
    variants = {
        "naive (h @ W, jaxent.cross_entropy)": (_naive_jaxent, "dv"),
        "jaxent dv": (jaxent_linear(), "dv"),
        "jaxent vd": (jaxent_linear(kernel_layout="vd"), "vd"),
        'jaxent impl="vocab"': (jaxent_linear(impl="vocab"), "dv"),
    }
    jax_cce, why = deps.optional("jax_cce")
    if jax_cce is not None:
        variants["jax-cce"] = (jax_cce.linear_cross_entropy, "vd")
    return variants, [] if jax_cce is not None else [f"jax-cce: skipped ({why})"]


def linear_memory(args: Any) -> Report:
    """Compiled temporaries of value_and_grad w.r.t. hidden and kernel on abstract inputs
    (``jax.ShapeDtypeStruct``: nothing is allocated), default N=8192, D=2048, V=128256."""
    n, d, v = _ints(args.args, (8192, 2048, 128256), "linear-memory")
    variants, notes = _memory_variants()
    rows = []
    for dtype in ("bfloat16", "float32"):
        temp = {}
        for name, (f, layout) in variants.items():
            shapes = (jax.ShapeDtypeStruct((n, d), dtype),
                      jax.ShapeDtypeStruct((d, v) if layout == "dv" else (v, d), dtype),
                      jax.ShapeDtypeStruct((n,), jnp.int32))
            compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*shapes).compile()
            analysis = compiled.memory_analysis()
            assert analysis is not None
            temp[name] = analysis.temp_size_in_bytes
        base = next(iter(temp.values()))
        rows += [{"dtype": dtype, "contender": k, "temp_bytes": t, "of_naive": t / base}
                 for k, t in temp.items()]
    lines = [f"Compiled temporaries of value_and_grad (w.r.t. hidden and kernel) at N={n}, "
             f"D={d}, V={v}; `memory_analysis().temp_size_in_bytes`.", "",
             "| dtype | contender | temp MB | % of naive |", "| --- | --- | ---: | ---: |",
             *(f"| {r['dtype']} | {r['contender']} | {r['temp_bytes'] / 1e6:.1f} "
               f"| {100 * r['of_naive']:.2f} |" for r in rows)]
    return Report("\n".join(lines), {"n": n, "d": d, "v": v, "rows": rows}, notes=notes)


# ---------------------------------------------------------------------------------- rl-memory
def _rl_cases(n: int) -> list[tuple[str, Callable, Callable, int]]:
    """``(name, fused, naive, number of head arguments)`` of the ``rl-memory`` suite."""
    import jaxent

    y = jnp.zeros((n,), jnp.int32)

    def fused_lp(h, k):
        lp, ent = jaxent.linear_log_probs(h, k, y, return_entropy=True)
        return (lp + 0.1 * ent).sum()

    def naive_lp(h, k):
        logp = jax.nn.log_softmax(h @ k)
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        return (jnp.take_along_axis(logp, y[:, None], -1)[:, 0] + 0.1 * ent).sum()

    def naive_divergence(xs, xt, div):
        """The textbook formulas on materialized float32 logits (the teacher constant)."""
        lp, lq = jax.nn.log_softmax(xs), jax.nn.log_softmax(jax.lax.stop_gradient(xt))
        p, q = jnp.exp(lp), jnp.exp(lq)
        if div == "kl":
            return jnp.mean(jnp.sum(q * (lq - lp), -1))
        if div == "reverse_kl":
            return jnp.mean(jnp.sum(p * (lp - lq), -1))
        lm = jnp.log(0.5 * q + 0.5 * p)
        return jnp.mean(0.5 * jnp.sum(q * (lq - lm), -1) + 0.5 * jnp.sum(p * (lp - lm), -1))

    def fused_div(div: Divergence) -> Callable:
        return lambda h, k, ht, kt: jaxent.linear_distillation_loss(h, k, ht, kt,
                                                                    divergence=div)

    def naive_div(div: Divergence) -> Callable:
        return lambda h, k, ht, kt: naive_divergence(h @ k, ht @ kt, div)

    out: list[tuple[str, Callable, Callable, int]] = [
        ("linear_log_probs(entropy)", fused_lp, naive_lp, 2)]
    out += [(f"linear_distillation_loss({div})", fused_div(div), naive_div(div), 4)
            for div in DIVERGENCES]
    return out


def rl_memory(args: Any) -> Report:
    """Compiled temporaries of value_and_grad (w.r.t. the student's hidden and kernel) of the
    fused RL/distillation heads against the naive programs, float32, default N=8192, D=2048,
    V=128256 (abstract inputs: nothing is allocated)."""
    n, d, v = _ints(args.args, (8192, 2048, 128256), "rl-memory")
    rows = []
    for name, fused, naive, nargs in _rl_cases(n):
        shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(n, d), (d, v)] * (nargs // 2)]
        temp = []
        for fn in (fused, naive):
            compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
            analysis = compiled.memory_analysis()
            assert analysis is not None
            temp.append(analysis.temp_size_in_bytes)
        rows.append({"loss": name, "fused_bytes": temp[0], "naive_bytes": temp[1],
                     "of_naive": temp[0] / temp[1]})
    lines = [f"Compiled temporaries of value_and_grad (w.r.t. hidden and kernel) at N={n}, "
             f"D={d}, V={v}, float32; `memory_analysis().temp_size_in_bytes`.", "",
             "| loss | fused MiB | naive MiB | % of naive |", "| --- | ---: | ---: | ---: |",
             *(f"| {r['loss']} | {r['fused_bytes'] / 2**20:.1f} | "
               f"{r['naive_bytes'] / 2**20:.1f} | {100 * r['of_naive']:.2f} |" for r in rows)]
    return Report("\n".join(lines), {"n": n, "d": d, "v": v, "rows": rows})


# ------------------------------------------------------------------------------- linear-speed
def speed_contender(spec: str) -> Contender:
    """A ``linear-speed`` contender from its spec: ``naive``, ``cce`` (jax-cce), ``torch``
    (``F.linear_cross_entropy``'s reference path), or ``ours[:KEY=VALUE...]``
    (``jaxent.linear_cross_entropy`` with those keywords; ``impl`` and ``kernel_layout``
    stay strings, the rest are integers), e.g. ``ours:impl=vocab:block_size=2048``."""
    if spec == "naive":
        return Contender("naive (h @ W, jaxent.cross_entropy)", for_kind(LINEAR, _naive_jaxent),
                         baseline_for=(LINEAR,))
    if spec == "cce":
        return Contender("jax-cce", build_jax_cce)
    if spec == "torch":
        return Contender("torch (cpu)", lambda c, i: build_torch_linear(c, i, gpu=False),
                         family="torch")
    if spec.split(":")[0] != "ours":
        raise SystemExit(f"--contenders: unknown {spec!r} (naive, ours[:k=v...], cce, torch)")
    kw: dict[str, Any] = {}
    for item in spec.split(":")[1:]:
        key, _, val = item.partition("=")
        kw[key] = val if key in ("impl", "kernel_layout") else int(val)
    label = "jaxent" + "".join(f" {k}={v!r}" if isinstance(v, str) else f" {k}={v}"
                               for k, v in kw.items())
    return Contender(label, for_kind(LINEAR, jaxent_linear(**kw)))


def linear_speed(args: Any) -> Report:
    """value_and_grad of the fused loss at one shape, interleaved, for ``--contenders``."""
    if len(args.args) != 3:
        raise SystemExit("--suite linear-speed takes N D V, e.g. 4096 1024 32000")
    n, d, v = _ints(args.args, (0, 0, 0), "linear-speed")
    contenders = [speed_contender(s) for s in args.contenders.split(",")]
    if not any(c.baseline_for for c in contenders):
        contenders[0] = dataclasses.replace(contenders[0], baseline_for=(LINEAR,))
    case = Case(LINEAR, FWD_BWD, args.dtype, n, v, d)
    notes: list[str] = []
    load = machine_load()
    results = run_case(case, contenders, args.rounds or 3, None, notes=notes)
    return _timing_report(_timing_suite(results, notes, load), [])


# ------------------------------------------------------------------------------------- matmul
def _dot(a: jax.Array, b: jax.Array, ca: int, cb: int) -> jax.Array:
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())))


def _dkernel_slices(v: int, bw: int) -> Callable:
    """``dW += h_b^T @ dx`` written in place in ``[D, bw]`` slices (as the token walk does)."""
    def run(dk: jax.Array, hb: jax.Array, dx: jax.Array) -> jax.Array:
        def add(j: jax.Array, dk: jax.Array) -> jax.Array:
            s = j * bw
            upd = _dot(hb, lax.dynamic_slice_in_dim(dx, s, bw, 1), 0, 0)
            return lax.dynamic_update_slice_in_dim(
                dk, lax.dynamic_slice_in_dim(dk, s, bw, 1) + upd, s, 1)

        return lax.fori_loop(0, v // bw, add, dk)

    return run


def _time_calls(f: Callable, args: Sequence[Any], rounds: int) -> list[float]:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return times


def matmul(args: Any) -> Report:
    """GFLOP/s of the naive path's three products and of the token walk's per-block ones
    (default N=2048, D=2048, V=128256, 128-token blocks, 1024-wide ``d kernel`` slices), and
    torch's forward product when torch is installed; ``--rounds`` calls after a warm-up."""
    n, d, v, nb, bw = _ints(args.args, (2048, 2048, 128256, 128, 1024), "matmul")
    rounds = args.rounds or 3
    keys = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(keys[0], (d, v)) / d**0.5
    h = jax.random.normal(keys[1], (n, d))
    full, block = matmul_flops(n, d, v), matmul_flops(nb, d, v)
    rows: list[dict[str, Any]] = []

    def report(name: str, fn: Callable, *xs: Any, flops: float) -> None:
        times = _time_calls(jax.jit(fn).lower(*xs).compile(), xs, rounds)
        rows.append({"product": name, "times_s": times, "flops": flops})

    report(f"naive  h @ W          [{n}, {v}]", lambda a, b: _dot(a, b, 1, 0), h, w, flops=full)
    dz = jax.random.normal(keys[2], (n, v))
    report(f"naive  dz @ W^T       [{n}, {d}]", lambda a, b: _dot(a, b, 1, 1), dz, w, flops=full)
    report(f"naive  h^T @ dz       [{d}, {v}]", lambda a, b: _dot(a, b, 0, 0), h, dz, flops=full)
    del dz
    hb, dx = h[:nb], jax.random.normal(keys[2], (nb, v))
    report(f"block  h_b @ W        [{nb}, {v}]", lambda a, b: _dot(a, b, 1, 0), hb, w,
           flops=block)
    report(f"block  dx @ W^T       [{nb}, {d}]", lambda a, b: _dot(a, b, 1, 1), dx, w,
           flops=block)
    report(f"block  dW += h_b^T dx in [{d}, {bw}] slices", _dkernel_slices(v, bw),
           jnp.zeros((d, v)), hb, dx, flops=block * (v // bw * bw) / v)
    notes = []
    torch, why = deps.optional("torch")
    if torch is not None:
        import numpy as np

        ta, tb = torch.from_numpy(np.array(h)), torch.from_numpy(np.array(w))
        rows.append({"product": "torch  h @ W", "flops": full,
                     "times_s": _time_calls(lambda: ta @ tb, (), rounds)})
    else:
        notes.append(f"torch: skipped ({why})")
    lines = ["| product | median ms | min–max ms | GFLOP/s (median) |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
        ts, med = r["times_s"], statistics.median(r["times_s"])
        lines.append(f"| {r['product']} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f}–"
                     f"{max(ts) * 1e3:.1f} | {r['flops'] / med / 1e9:.0f} |")
    return Report("\n".join(lines), {"n": n, "d": d, "v": v, "token_block": nb,
                                     "dw_slice": bw, "rows": rows}, notes=notes)


# --------------------------------------------------------------------------------- explore-ce
def formulation_contender(name: str, baseline: bool) -> Contender:
    """A :mod:`jaxent.bench.formulations` entry as a contender (``fwd:`` forward only,
    ``_donate`` donated logits)."""
    base = name.removeprefix("fwd:").removesuffix("_donate")
    if base not in formulations.FORMS:
        raise SystemExit(f"explore-ce: unknown formulation {base!r}; known: "
                         + ", ".join(formulations.FORMS))
    return Contender(name, for_kind(CE, formulations.FORMS[base],
                                     donate=name.endswith("_donate")),
                     baseline_for=(CE,) if baseline else ())


def explore_ce(args: Any) -> Report:
    """Candidate formulations at one shape: ``N C DTYPE [NAMES...]`` (all by default; the
    first of each mode is the baseline), or ``check`` for the per-row cotangent check."""
    if args.args == ["check"]:
        formulations.check_per_row()
        return Report("per-row cotangents ok", {"check": "ok"})
    if len(args.args) < 3:
        raise SystemExit("--suite explore-ce takes N C DTYPE [NAMES...] (or `check`)")
    n, c = _ints(args.args[:2], (0, 0), "explore-ce")
    dtype, names = args.args[2], args.args[3:] or list(formulations.FORMS)
    notes: list[str] = []
    results = []
    load = machine_load()
    for mode, group in ((FWD, [x for x in names if x.startswith("fwd:")]),
                        (FWD_BWD, [x for x in names if not x.startswith("fwd:")])):
        if group:
            cons = [formulation_contender(x, i == 0) for i, x in enumerate(group)]
            results += run_case(Case(CE, mode, dtype, n, c), cons, args.rounds or 7, None,
                                notes=notes, settle_s=SETTLE_S)
    return _timing_report(_timing_suite(results, notes, load), [])


def ab_suite(args: Any) -> Report:
    """``--suite ab [REV]``: this checkout against commit ``REV`` (default ``HEAD~1``),
    interleaved in one run (:mod:`jaxent.bench.ab`); ``--rounds`` calls per case."""
    from jaxent.bench import ab  # noqa: PLC0415  (imports the base commit's package)

    rev = args.args[0] if args.args else "HEAD~1"
    text, data = ab.run(rev, args.rounds or 5, pathlib.Path(__file__).resolve().parents[2],
                        args.only)
    return Report(text, data)


def hlo_suite(args: Any) -> Report:
    """``--suite hlo [N C]``: passes over the logits, writes, ``exp`` per logit and fusions
    of the compiled plain-CE programs (:mod:`jaxent.bench.hlo`; compiled, never run)."""
    import jaxent  # noqa: PLC0415
    from jaxent.bench import hlo  # noqa: PLC0415

    n, c = _ints(args.args, hlo.SHAPE, "hlo")
    return Report(hlo.table(n, c, {"this": jaxent}), {})


SUITES: dict[str, Callable[[Any], Report]] = {
    "ab": ab_suite,
    "hlo": hlo_suite,
    "main": main_suite,
    "gpu": lambda args: main_suite(args, "gpu"),
    "tpu": lambda args: main_suite(args, "tpu"),
    "linear-memory": linear_memory,
    "rl-memory": rl_memory,
    "linear-speed": linear_speed,
    "matmul": matmul,
    "explore-ce": explore_ce,
    "compaction": lambda args: Report(*compaction_suite(args)),
}
