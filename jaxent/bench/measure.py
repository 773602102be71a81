"""Measuring: interleaved timing with its spread, the machine's ceilings, and whether to trust them.

Every contender of a case runs in the same process on the same inputs. After a warm-up
(which is also the call whose loss is checked against the baseline's), the contenders are
timed interleaved (A B C A B C ...), so slow drifts of a shared machine hit every contender
alike; each row keeps every time, and reports min, median and max. Before each timed call the
process pauses briefly (as long as the previous call took, at most ``settle_s``): freeing a
large buffer costs the operating system work that otherwise lands on whichever call comes
next (measured on the CPU: a loss timed right after the naive path, which frees 1.5 GB, took
1.5x as long as the same loss timed after a pause).

The ceilings are measured in the same run: a copy bandwidth (for the plain loss's GB/s) and,
for each fused case, the rate of one matmul of the same shape and dtype (for its FLOP/s).
The machine's load average at the start and the end, and each row's max/min, say whether
the numbers can be trusted (:func:`busy_warnings`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxent.bench import deps, targets
from jaxent.bench.cases import CE, Case, make_inputs, matmul_flops
from jaxent.bench.contenders import Contender, Runner

SETTLE_S = 0.3  # longest pause before a timed call (see the module docstring)
BUSY_SPREAD = 1.3  # a row whose max/min exceeds this was timed on a busy machine


@dataclasses.dataclass
class Result:
    """One (case, contender) measurement; times in seconds, memory in bytes.

    ``ratio`` is the median time over the baseline's median time in the same case;
    ``gbps`` the minimum bytes over the median time, ``copy_fraction`` that over the copy
    bandwidth; ``gflops`` the matmul flops over the median time, ``matmul_fraction`` that
    over one same-shaped matmul's rate measured in the same run.
    """

    case: str
    contender: str
    median_s: float
    min_s: float
    ratio: float | None
    gbps: float | None
    copy_fraction: float | None
    gflops: float | None
    temp_bytes: int | None
    loss: float
    c: int
    kind: str
    mode: str
    dtype: str
    max_s: float | None = None
    n: int | None = None
    d: int | None = None
    matmul_fraction: float | None = None
    peak_bytes: int | None = None
    times_s: list[float] | None = None
    roofline_fraction: float | None = None

    @property
    def spread(self) -> float | None:
        """max/min of the timed calls (1.0 for perfectly steady times)."""
        if self.max_s is None or self.min_s <= 0:
            return None
        return self.max_s / self.min_s


def spread(times: Sequence[float]) -> float:
    """max/min of ``times``.

    >>> spread([0.10, 0.12, 0.11])
    1.2
    """
    return round(max(times) / min(times), 12)


def machine_load() -> float | None:
    """The 1-minute load average (``None`` where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def busy_warnings(results: Sequence[Result], load_start: float | None,
                  load_end: float | None, cores: int | None = None,
                  threshold: float = BUSY_SPREAD) -> list[str]:
    """Lines to print with the table when its numbers should not be trusted.

    Warns when the load average at the start or the end of the run exceeded the number of
    cores, and when any row's max/min exceeded ``threshold`` (naming the worst rows).
    """
    cores = cores or os.cpu_count() or 1
    out = []
    loads = [x for x in (load_start, load_end) if x is not None]
    if loads and max(loads) > cores:
        out.append(f"WARNING: the machine was busy: load average {_loads(load_start, load_end)}"
                   f", on {cores} cores. Other work shared the CPU; times may be inflated and "
                   "ratios shifted.")
    noisy = sorted((r for r in results if r.spread and r.spread > threshold),
                   key=lambda r: -(r.spread or 0.0))
    if noisy:
        worst = ", ".join(f"{r.contender} on {r.case} ({r.spread:.2f}x)" for r in noisy[:3])
        out.append(f"WARNING: {len(noisy)} of {len(results)} rows varied by more than "
                   f"{threshold:.1f}x between their fastest and slowest call (worst: {worst}); "
                   "rerun with more --rounds on a quieter machine before trusting them.")
    return out


def _loads(start: float | None, end: float | None) -> str:
    fmt = lambda x: "?" if x is None else f"{x:.1f}"  # noqa: E731
    return f"{fmt(start)} at the start, {fmt(end)} at the end"


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, rounds: int = 5,
                           gpu: bool = False) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) into an existing buffer, measured now.

    JAX: ``x + 1`` jitted with the input donated (written in place). torch: ``out.copy_(x)``
    (on CUDA when ``gpu``). ``"reference"`` is the faster of the two.
    """
    n = nbytes // 4
    f = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = jax.block_until_ready(f(jnp.zeros((n,), jnp.float32)))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t)
    del x
    out = {"jax_inplace": 2 * nbytes / statistics.median(times) / 1e9}
    torch, _ = deps.optional("torch")
    if torch is not None and (not gpu or torch.cuda.is_available()):
        dev = "cuda" if gpu else "cpu"
        src, dst = torch.ones(n, device=dev), torch.empty(n, device=dev)
        dst.copy_(src)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            dst.copy_(src)
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out["torch_copy_"] = 2 * nbytes / statistics.median(times) / 1e9
        del src, dst
    out["reference"] = max(out.values())
    return out


def measure_matmul(n: int, d: int, c: int, dtype: str, rounds: int = 5) -> float:
    """GFLOP/s of one jitted ``[n, d] @ [d, c]`` product in ``dtype`` on the default device
    (random inputs, median of ``rounds`` calls after a warm-up): the ceiling a fused loss's
    matmuls are compared with."""
    kh, kw = jax.random.split(jax.random.key(0))
    h = jax.random.normal(kh, (n, d), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (d, c), jnp.float32).astype(dtype)
    f = jax.jit(jnp.dot).lower(h, w).compile()
    jax.block_until_ready(f(h, w))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(f(h, w))
        times.append(time.perf_counter() - t)
    return matmul_flops(n, d, c) / statistics.median(times) / 1e9


def _loss_value(out: Any) -> float:
    return float(np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float32))


def disagreements(case: Case, losses: dict[str, float]) -> dict[str, str]:
    """Contenders whose loss differs from the first one's (the baseline), with why.

    Tolerance: 2e-2 relative in bf16, 2e-4 in float32.
    """
    ref_name, ref = next(iter(losses.items()))
    tol = 2e-2 if case.dtype == "bfloat16" else 2e-4
    return {name: f"{case.name}: {name} loss {val} disagrees with {ref_name}'s {ref}"
            for name, val in losses.items()
            if not abs(val - ref) <= tol * max(1.0, abs(ref))}


def check_agreement(case: Case, losses: dict[str, float]) -> None:
    """Raise ``AssertionError`` if any contender's loss disagrees with the first one's."""
    bad = disagreements(case, losses)
    if bad:
        raise AssertionError("; ".join(bad.values()))


def time_interleaved(runners: dict[str, Runner], rounds: int, settle_s: float = SETTLE_S,
                     on_round: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall time of every call, ``rounds`` rounds of A B C ... (each call after its
    ``prepare``, and after a pause as long as the previous call, at most ``settle_s``)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    last = settle_s
    for _ in range(rounds):
        for name, runner in runners.items():
            if runner.prepare:
                runner.prepare()
            if settle_s > 0:
                time.sleep(min(last, settle_s))
            t = time.perf_counter()
            runner.call()
            last = time.perf_counter() - t
            times[name].append(last)
        if on_round:
            on_round()
    return times


def build_runners(case: Case, contenders: Sequence[Contender], inputs: dict,
                  notes: list[str]) -> tuple[dict[str, Runner], dict[str, float], str | None]:
    """Build every contender that applies to ``case`` and run it once (compile, warm up, and
    read its loss). Returns runners and losses with the baseline first, and its name.

    A contender that fails to build, or whose loss disagrees with the baseline's, is left
    out of the timing with a note (the benchmark never times a wrong implementation).
    """
    runners: dict[str, Runner] = {}
    losses: dict[str, float] = {}
    baseline = None
    for con in contenders:
        try:
            runner = con.build(case, inputs)
            if runner is None:
                continue
            if runner.prepare:
                runner.prepare()
            losses[con.name] = _loss_value(runner.call()[0])
        except Exception as e:  # noqa: BLE001 - one broken contender must not stop the suite
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            notes.append(f"{con.name} failed on {case.name}: {type(e).__name__}: {msg}")
            continue
        runners[con.name] = runner
        if case.kind in con.baseline_for:
            baseline = con.name
    if baseline in losses:
        losses = {baseline: losses[baseline], **losses}
        runners = {baseline: runners[baseline], **runners}
    for name, why in (disagreements(case, losses) if losses else {}).items():
        notes.append(f"NOT TIMED: {why}")
        del runners[name], losses[name]
    return runners, losses, baseline


def results_of(case: Case, times: dict[str, list[float]], runners: dict[str, Runner],
               losses: dict[str, float], baseline: str | None, copy_gbps: float | None,
               matmul_gflops: float | None) -> list[Result]:
    """One :class:`Result` per timed contender, with ratios against ``baseline``."""
    base = statistics.median(times[baseline]) if baseline in times else None
    floor = roofline_floor(case)
    out = []
    for name, ts in times.items():
        med = statistics.median(ts)
        gbps = case.min_bytes() / med / 1e9 if case.kind == CE else None
        gflops = case.flops() / med / 1e9 if case.kind != CE else None
        out.append(Result(
            case=case.name, contender=name, median_s=med, min_s=min(ts), max_s=max(ts),
            times_s=list(ts), ratio=med / base if base else None, gbps=gbps,
            copy_fraction=gbps / copy_gbps if gbps and copy_gbps else None,
            gflops=gflops,
            matmul_fraction=gflops / matmul_gflops if gflops and matmul_gflops else None,
            temp_bytes=runners[name].temp_bytes, peak_bytes=runners[name].peak_bytes,
            loss=losses[name], c=case.c, n=case.n, d=case.d or None,
            kind=case.kind, mode=case.mode, dtype=case.dtype,
            roofline_fraction=floor / med if floor else None))
    return out


def roofline_floor(case: Case, device: Any = None) -> float | None:
    """The analytic floor (seconds) of ``case`` on ``device`` (default: JAX's first) when it
    is a chip of :mod:`jaxent.bench.targets`: its matmul flops at the bf16 rate against its
    minimum bytes at the HBM bandwidth, whichever is longer; None on other devices."""
    dev = device or jax.devices()[0]
    chip = targets.chip_of(getattr(dev, "device_kind", ""))
    if chip is None:
        return None
    return targets.floor(chip, case.flops(), case.min_bytes()).floor_s


def run_case(case: Case, contenders: Sequence[Contender], rounds: int,
             copy_gbps: float | None, on_step: Callable[[], None] | None = None,
             notes: list[str] | None = None, settle_s: float = SETTLE_S,
             matmul_gflops: float | None = None) -> list[Result]:
    """Build, check, warm up and time (interleaved) every contender applicable to ``case``."""
    notes = [] if notes is None else notes
    runners, losses, baseline = build_runners(case, contenders, make_inputs(case), notes)
    times = time_interleaved(runners, rounds, settle_s, on_step)
    return results_of(case, times, runners, losses, baseline, copy_gbps, matmul_gflops)


def case_rounds(case: Case, rounds: int) -> int:
    """Timed rounds for a case: the matmul-bound fused cases get half (at least 2) on the
    CPU, where one of their calls takes seconds."""
    return max(2, rounds // 2) if case.kind != CE and not _on_gpu() else rounds


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr, or ``None`` (disabled, or tqdm not installed)."""
    if not enabled:
        return None
    tqdm, _ = deps.optional("tqdm")
    if tqdm is None:
        print(f"jaxent.bench: no progress bar (tqdm not installed; {deps.BENCH_EXTRA})",
              file=sys.stderr)
        return None
    return tqdm.tqdm(total=total, desc="bench", unit="round", file=sys.stderr)


def run_suite(cases: Sequence[Case], contenders: Sequence[Contender], rounds: int = 5,
              progress: bool = True, copy_bytes: int = 256 * 2**20,
              gpu: bool = False, matmul_ceiling: bool = False) -> dict[str, Any]:
    """Run every case: ``{"copy_bandwidth", "results", "notes", "load", "matmul_gflops"}``.

    ``matmul_ceiling`` measures, per fused case, one same-shaped matmul (the FLOP/s ceiling;
    the GPU suite turns it on).
    """
    load_start = machine_load()
    copy = measure_copy_bandwidth(copy_bytes, gpu=gpu)
    results: list[Result] = []
    notes: list[str] = []
    matmul: dict[str, float] = {}
    bar = _progress(sum(case_rounds(c, rounds) for c in cases), progress)
    for case in cases:
        if bar:
            bar.set_postfix_str(case.name)
        if matmul_ceiling and case.kind != CE:
            matmul[case.name] = measure_matmul(case.n, case.d, case.c, case.dtype)
        results += run_case(case, contenders, case_rounds(case, rounds), copy["reference"],
                            on_step=bar.update if bar else None, notes=notes,
                            settle_s=0.0 if gpu else SETTLE_S,
                            matmul_gflops=matmul.get(case.name))
        _release_torch_cache()
    if bar:
        bar.close()
    return {"copy_bandwidth": copy, "results": results, "notes": notes,
            "matmul_gflops": matmul, "load": {"start": load_start, "end": machine_load(),
                                              "cores": os.cpu_count()}}


def _release_torch_cache() -> None:
    """Give PyTorch's cached CUDA blocks back between cases (JAX and torch share the GPU)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
