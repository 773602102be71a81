"""Side-by-side benchmark of cross-entropy losses: time per step and compiled memory.

Run ``python -m jaxent.bench`` (``--help`` for the options). Every contender runs in the same
process on the same inputs; after a warm-up the contenders of a case are timed interleaved
(A B C A B C ...) and the median is reported, so slow drifts of a shared machine hit every
contender alike. Before each timed call the process pauses briefly (as long as the previous
call took, at most :data:`SETTLE_S`): freeing a large buffer costs the operating system work
that otherwise lands on whichever call comes next (measured: a loss timed right after the
naive path, which frees 1.5 GB, took 1.5x as long as the same loss timed after a pause).
For each case and contender the table reports:

* the median wall time of one call (value, or value and gradient);
* the ratio to the baseline (optax for plain cross-entropy, the naive materialized path for
  the fused linear cross-entropy);
* the achieved bandwidth against the *minimum* bytes a loss must move (read the logits once,
  and for the backward write the gradient once), and that as a fraction of a copy bandwidth
  measured in the same run;
* the compiled temporary memory (``memory_analysis().temp_size_in_bytes``) of JAX contenders.

Before timing, every contender's loss is checked against the baseline's, so the benchmark
never times a wrong implementation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Case",
    "Contender",
    "Result",
    "Runner",
    "default_cases",
    "default_contenders",
    "main",
    "run_suite",
    "to_json",
    "to_markdown",
]

CE, LINEAR = "ce", "linear"
SETTLE_S = 0.3  # longest pause before a timed call (see the module docstring)
FWD, FWD_BWD = "fwd", "fwd+bwd"


# ------------------------------------------------------------------------------------ cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark problem.

    Attributes:
      kind: ``"ce"`` (logits ``[n, c]``) or ``"linear"`` (hidden ``[n, d]``, kernel ``[d, c]``).
      mode: ``"fwd"`` (loss only) or ``"fwd+bwd"`` (loss and gradient).
      dtype: ``"float32"`` or ``"bfloat16"``.
      n: rows (tokens).
      c: classes (vocabulary).
      d: hidden size (linear cases only).
    """

    kind: str
    mode: str
    dtype: str
    n: int
    c: int
    d: int = 0

    @property
    def name(self) -> str:
        shape = f"{self.n}x{self.c}" if self.kind == CE else f"{self.n}x{self.d}x{self.c}"
        dt = "bf16" if self.dtype == "bfloat16" else "f32"
        label = "CE" if self.kind == CE else "linear CE"
        return f"{label} {self.mode} {dt} {shape}"

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    def min_bytes(self) -> int:
        """Bytes any implementation must move: read the inputs once, write the gradients once."""
        if self.kind == CE:
            size = self.n * self.c * self.itemsize
        else:
            size = (self.n * self.d + self.d * self.c) * self.itemsize
        return size * (2 if self.mode == FWD_BWD else 1) + self.n * 4

    def flops(self) -> int:
        """Matmul flops of the linear cases (forward ``2ndc``, backward twice more)."""
        if self.kind != LINEAR:
            return 0
        return 2 * self.n * self.d * self.c * (3 if self.mode == FWD_BWD else 1)


CE_SHAPES = ((8192, 1000), (4096, 32000), (2048, 128256), (65536, 10))
LINEAR_SHAPES = ((4096, 1024, 32000), (2048, 2048, 128256))
QUICK_CE_SHAPES = ((2048, 1000), (512, 32000), (128, 128256), (16384, 10))
QUICK_LINEAR_SHAPES = ((256, 256, 32000),)


def default_cases(quick: bool = False) -> list[Case]:
    """The suite of the issue (or a small version of it with ``quick``)."""
    ce_shapes = QUICK_CE_SHAPES if quick else CE_SHAPES
    lin_shapes = QUICK_LINEAR_SHAPES if quick else LINEAR_SHAPES
    cases = []
    for n, c in ce_shapes:
        for dtype in ("float32", "bfloat16"):
            for mode in (FWD, FWD_BWD):
                if quick and mode == FWD and dtype == "bfloat16":
                    continue
                cases.append(Case(CE, mode, dtype, n, c))
    for n, d, c in lin_shapes:
        for dtype in ("float32", "bfloat16") if not quick else ("float32",):
            cases.append(Case(LINEAR, FWD_BWD, dtype, n, c, d))
    return cases


def make_inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Host (numpy, float32) inputs shared by every contender; labels are int32."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, case.c, size=(case.n,), dtype=np.int32)
    if case.kind == CE:
        logits = rng.standard_normal((case.n, case.c), dtype=np.float32) * 2.0
        return {"logits": logits, "labels": labels}
    hidden = rng.standard_normal((case.n, case.d), dtype=np.float32)
    kernel = rng.standard_normal((case.d, case.c), dtype=np.float32) / math.sqrt(case.d)
    return {"hidden": hidden, "kernel": kernel, "labels": labels}


# -------------------------------------------------------------------------------- contenders
@dataclasses.dataclass
class Runner:
    """A contender prepared for one case.

    Attributes:
      call: runs once, blocks until the result is ready, returns ``(loss, grads or None)``.
      prepare: untimed set-up before each call (e.g. a fresh buffer for a donated input).
      temp_bytes: compiled temporary memory, when known.
    """

    call: Callable[[], tuple[Any, Any]]
    prepare: Callable[[], None] | None = None
    temp_bytes: int | None = None
    grad_fix: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None

    def grads(self, out: tuple[Any, Any]) -> list[np.ndarray] | None:
        """The gradients of a call's output as float32 numpy arrays, in the order and layout
        of :func:`make_inputs` (hidden ``[n, d]``, kernel ``[d, c]``)."""
        if out[1] is None:
            return None
        gs = [_to_numpy(g) for g in out[1]]
        return self.grad_fix(gs) if self.grad_fix else gs


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch
        return a.detach().float().cpu().numpy()
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def _kernel_transposed(gs: list[np.ndarray]) -> list[np.ndarray]:
    """Grads of (hidden, kernel [c, d]) back to (hidden, kernel [d, c])."""
    return [gs[0], gs[1].T]


@dataclasses.dataclass(frozen=True)
class Contender:
    """A loss implementation: a name and a function building a :class:`Runner` for a case.

    ``build`` returns ``None`` when the contender does not apply to the case.
    """

    name: str
    build: Callable[[Case, dict[str, np.ndarray]], Runner | None]
    family: str = "jax"
    baseline_for: tuple[str, ...] = ()


def _jax_array(a: np.ndarray, dtype: str) -> jax.Array:
    return jnp.asarray(a).astype(dtype) if a.dtype.kind == "f" else jnp.asarray(a)


def _compile(fn: Any, *args: Any) -> tuple[Callable, int | None]:
    """Compile once; the executable is what gets timed, and its temp memory is reported."""
    compiled = fn.lower(*args).compile()
    try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is best effort (backend dependent)
        temp = None
    return compiled, temp


def jax_runner(loss_fn: Callable, case: Case, inputs: dict[str, np.ndarray],
               donate: bool = False) -> Runner:
    """Runner for a JAX loss ``loss_fn(*float_inputs, labels) -> scalar``.

    ``fwd+bwd`` differentiates with respect to every float input. With ``donate`` the first
    float input is donated to the call, and a fresh copy is made (untimed) before each call.
    """
    names = [k for k in inputs if k != "labels"]
    args = [_jax_array(inputs[k], case.dtype) for k in names]
    labels = jnp.asarray(inputs["labels"])
    argnums = tuple(range(len(args)))
    if case.mode == FWD:
        fn = jax.jit(loss_fn)
    else:
        fn = jax.jit(jax.value_and_grad(loss_fn, argnums=argnums),
                     donate_argnums=(0,) if donate else ())
    fn, temp = _compile(fn, *args, labels)
    state = {"args": args}

    def prepare() -> None:
        fresh = jnp.copy(args[0])
        fresh.block_until_ready()
        state["args"] = [fresh, *args[1:]]

    def call() -> tuple[Any, Any]:
        out = jax.block_until_ready(fn(*state["args"], labels))
        return (out, None) if case.mode == FWD else (out[0], list(out[1]))

    return Runner(call, prepare if donate else None, temp)


def _optax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    import optax

    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _naive_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Autodiff of ``log_softmax`` + take: what people write by hand."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1).mean()


def _naive_linear(hidden: jax.Array, kernel: jax.Array, labels: jax.Array) -> jax.Array:
    """The materialized path: full ``[n, c]`` logits, then cross-entropy."""
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    return _naive_ce(logits, labels)


def _build_optax(case: Case, inputs: dict) -> Runner | None:
    return jax_runner(_optax_loss, case, inputs) if case.kind == CE else None


def _build_naive(case: Case, inputs: dict) -> Runner | None:
    return jax_runner(_naive_ce, case, inputs) if case.kind == CE else None


def _build_materialized(case: Case, inputs: dict) -> Runner | None:
    return jax_runner(_naive_linear, case, inputs) if case.kind == LINEAR else None


def _jaxent() -> Any | None:
    try:
        import jaxent
    except ImportError:
        return None
    return jaxent


def _build_jaxent(case: Case, inputs: dict, donate: bool = False) -> Runner | None:
    jx = _jaxent()
    if case.kind == CE:
        fn = getattr(jx, "cross_entropy", None)
        if fn is None or (donate and case.mode == FWD):
            return None
        return jax_runner(lambda x, y: fn(x, y), case, inputs, donate=donate)
    fn = getattr(jx, "linear_cross_entropy", None)
    if fn is None or donate:
        return None
    return jax_runner(lambda h, w, y: fn(h, w, y), case, inputs)


def _build_jax_cce(case: Case, inputs: dict) -> Runner | None:
    if case.kind != LINEAR:
        return None
    import jax_cce

    # jax-cce takes the classifier as [c, d]; the transposed copy is made once, untimed.
    inp = {"hidden": inputs["hidden"], "kernel": np.ascontiguousarray(inputs["kernel"].T),
           "labels": inputs["labels"]}
    runner = jax_runner(lambda h, w, y: jax_cce.linear_cross_entropy(h, w, y), case, inp)
    runner.grad_fix = _kernel_transposed
    return runner


def _torch_device(gpu: bool) -> str:
    return "cuda" if gpu else "cpu"


def torch_runner(loss_fn: Callable, case: Case, inputs: dict[str, np.ndarray],
                 gpu: bool = False) -> Runner:
    """Runner for a PyTorch loss ``loss_fn(*float_tensors, labels) -> scalar``."""
    import torch

    dev = _torch_device(gpu)
    tdt = torch.bfloat16 if case.dtype == "bfloat16" else torch.float32
    names = [k for k in inputs if k != "labels"]
    tensors = [torch.from_numpy(inputs[k]).to(device=dev, dtype=tdt) for k in names]
    labels = torch.from_numpy(inputs["labels"]).to(device=dev, dtype=torch.long)
    bwd = case.mode == FWD_BWD
    for t in tensors:
        t.requires_grad_(bwd)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def call() -> tuple[Any, Any]:
        if not bwd:
            with torch.no_grad():
                loss = loss_fn(*tensors, labels)
            sync()
            return loss.float().cpu().numpy(), None
        for t in tensors:
            t.grad = None
        loss = loss_fn(*tensors, labels)
        loss.backward()
        sync()
        return loss.detach().float().cpu().numpy(), [t.grad for t in tensors]

    return Runner(call)


def _build_torch(case: Case, inputs: dict, gpu: bool = False) -> Runner | None:
    import torch
    import torch.nn.functional as F

    if case.kind == CE:
        return torch_runner(lambda x, y: F.cross_entropy(x, y), case, inputs, gpu)
    if not hasattr(F, "linear_cross_entropy"):
        return None
    # The chunked path (options=LinearCrossEntropyOptions()) is ~10x slower than the reference
    # path on CPU (22 s vs 2.1 s at 512x256x32000, torch 2.13), so the CPU run uses the
    # reference path; the GPU run uses the chunked one.
    opts_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    opts = opts_cls() if (opts_cls and gpu) else None
    # torch's classifier is [c, d] (nn.Linear layout); transposed once, untimed.
    inp = {"hidden": inputs["hidden"], "kernel": np.ascontiguousarray(inputs["kernel"].T),
           "labels": inputs["labels"]}
    runner = torch_runner(lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts),
                          case, inp, gpu)
    runner.grad_fix = _kernel_transposed
    return runner


def _build_liger(case: Case, inputs: dict) -> Runner | None:
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

    if case.kind == CE:
        loss = LigerCrossEntropyLoss()
        return torch_runner(lambda x, y: loss(x, y), case, inputs, gpu=True)
    lin = LigerFusedLinearCrossEntropyLoss()
    inp = {"kernel": np.ascontiguousarray(inputs["kernel"].T), "hidden": inputs["hidden"],
           "labels": inputs["labels"]}
    runner = torch_runner(lambda w, h, y: lin(w, h, y), case, inp, gpu=True)
    runner.grad_fix = lambda gs: [gs[1], gs[0].T]
    return runner


def _build_cut_ce(case: Case, inputs: dict) -> Runner | None:
    if case.kind != LINEAR:
        return None
    from cut_cross_entropy import linear_cross_entropy

    inp = {"hidden": inputs["hidden"], "kernel": np.ascontiguousarray(inputs["kernel"].T),
           "labels": inputs["labels"]}
    runner = torch_runner(lambda h, w, y: linear_cross_entropy(h, w, y), case, inp, gpu=True)
    runner.grad_fix = _kernel_transposed
    return runner


def load_extra(spec: str) -> list[Contender]:
    """Contenders from ``NAME=path/to/file.py:function`` (a CE loss ``f(logits, labels)``).

    Gives two contenders, ``NAME`` and ``NAME (donated logits)``: a way to measure a candidate
    formulation beside the others without touching the package.
    """
    import importlib.util

    name, _, target = spec.partition("=")
    path, _, attr = target.rpartition(":")
    mod_spec = importlib.util.spec_from_file_location(f"_bench_extra_{attr}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    fn = getattr(module, attr)

    def build(case: Case, inputs: dict, donate: bool = False) -> Runner | None:
        if case.kind != CE or (donate and case.mode == FWD):
            return None
        return jax_runner(fn, case, inputs, donate=donate)

    return [Contender(name, build),
            Contender(f"{name} (donated logits)", lambda c, i: build(c, i, donate=True))]


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def default_contenders(gpu: bool = False) -> tuple[list[Contender], list[str]]:
    """The contenders available in this environment, and notes on those skipped."""
    notes: list[str] = []
    out = [
        Contender("optax", _build_optax, baseline_for=(CE,)),
        Contender("naive (log_softmax+take)", _build_naive),
        Contender("naive (materialized logits)", _build_materialized, baseline_for=(LINEAR,)),
    ]
    jx = _jaxent()
    if jx is not None and hasattr(jx, "cross_entropy"):
        out.append(Contender("jaxent", _build_jaxent))
        out.append(Contender("jaxent (donated logits)",
                             lambda c, i: _build_jaxent(c, i, donate=True)))
    else:
        notes.append("jaxent.cross_entropy not importable yet: skipped")
    if jx is not None and hasattr(jx, "linear_cross_entropy") and not hasattr(jx, "cross_entropy"):
        out.append(Contender("jaxent", _build_jaxent))
    if jx is None or not hasattr(jx, "linear_cross_entropy"):
        notes.append("jaxent.linear_cross_entropy not importable yet: skipped")
    if _importable("jax_cce"):
        out.append(Contender("jax-cce", _build_jax_cce))
    else:
        notes.append("jax-cce not installed: skipped")
    if _importable("torch"):
        label = "torch (cuda)" if gpu else "torch (cpu)"
        out.append(Contender(label, lambda c, i: _build_torch(c, i, gpu), family="torch"))
    else:
        notes.append("torch not installed: skipped")
    if gpu:
        for mod, name, build in (("liger_kernel", "liger-kernel", _build_liger),
                                 ("cut_cross_entropy", "cut-cross-entropy", _build_cut_ce)):
            if _importable(mod):
                out.append(Contender(name, build, family="torch"))
            else:
                notes.append(f"{name} not installed: skipped")
    return out, notes


# ---------------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class Result:
    """One (case, contender) measurement; times in seconds, memory in bytes."""

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


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, rounds: int = 5,
                           gpu: bool = False) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) into an existing buffer, measured now.

    JAX: ``x + 1`` jitted with the input donated (written in place). torch: ``out.copy_(x)``.
    """
    n = nbytes // 4
    f = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = jax.block_until_ready(f(jnp.zeros((n,), jnp.float32)))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t)
    out = {"jax_inplace": 2 * nbytes / statistics.median(times) / 1e9}
    if _importable("torch"):
        import torch

        dev = _torch_device(gpu)
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
    out["reference"] = max(out.values())
    return out


def _loss_value(out: Any) -> float:
    return float(np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float32))


def check_agreement(case: Case, losses: dict[str, float]) -> None:
    """Every contender's loss must match the baseline's (dtype-aware tolerance)."""
    ref = next(iter(losses.values()))
    tol = 2e-2 if case.dtype == "bfloat16" else 2e-4
    for name, val in losses.items():
        if not abs(val - ref) <= tol * max(1.0, abs(ref)):
            raise AssertionError(f"{case.name}: {name} loss {val} disagrees with {ref}")


def run_case(case: Case, contenders: Sequence[Contender], rounds: int,
             copy_gbps: float, on_step: Callable[[], None] | None = None) -> list[Result]:
    """Build, check, warm up and time (interleaved) every contender applicable to ``case``."""
    inputs = make_inputs(case)
    runners: dict[str, Runner] = {}
    losses: dict[str, float] = {}
    baseline = None
    for con in contenders:
        try:
            runner = con.build(case, inputs)
        except Exception as e:  # noqa: BLE001 - one broken contender must not stop the suite
            print(f"  {con.name} failed to build on {case.name}: {e!r}", file=sys.stderr)
            continue
        if runner is None:
            continue
        if runner.prepare:
            runner.prepare()
        losses[con.name] = _loss_value(runner.call()[0])  # warm-up (compile) and check
        runners[con.name] = runner
        if case.kind in con.baseline_for:
            baseline = con.name
    if baseline in losses:  # compare against the baseline first
        losses = {baseline: losses[baseline], **losses}
    check_agreement(case, losses)
    times: dict[str, list[float]] = {k: [] for k in runners}
    last = SETTLE_S
    for _ in range(rounds):
        for name, runner in runners.items():
            if runner.prepare:
                runner.prepare()
            time.sleep(min(last, SETTLE_S))
            t = time.perf_counter()
            runner.call()
            last = time.perf_counter() - t
            times[name].append(last)
        if on_step:
            on_step()
    base = statistics.median(times[baseline]) if baseline in times else None
    results = []
    for name, ts in times.items():
        med = statistics.median(ts)
        gbps = case.min_bytes() / med / 1e9 if case.kind == CE else None
        results.append(Result(
            case=case.name, contender=name, median_s=med, min_s=min(ts),
            ratio=med / base if base else None, gbps=gbps,
            copy_fraction=gbps / copy_gbps if gbps and copy_gbps else None,
            gflops=case.flops() / med / 1e9 if case.kind == LINEAR else None,
            temp_bytes=runners[name].temp_bytes, loss=losses[name], c=case.c,
            kind=case.kind, mode=case.mode, dtype=case.dtype))
    return results


def case_rounds(case: Case, rounds: int) -> int:
    """Timed rounds for a case: the matmul-bound linear cases get half (at least 2)."""
    return max(2, rounds // 2) if case.kind == LINEAR else rounds


def run_suite(cases: Sequence[Case], contenders: Sequence[Contender], rounds: int = 5,
              progress: bool = True, copy_bytes: int = 256 * 2**20,
              gpu: bool = False) -> dict[str, Any]:
    """Run every case; returns ``{"copy_bandwidth": ..., "results": [Result, ...]}``."""
    copy = measure_copy_bandwidth(copy_bytes, gpu=gpu)
    results: list[Result] = []
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(case_rounds(c, rounds) for c in cases)
        bar = tqdm(total=total, desc="bench", unit="round", file=sys.stderr)
    for case in cases:
        if bar:
            bar.set_postfix_str(case.name)
        results += run_case(case, contenders, case_rounds(case, rounds), copy["reference"],
                            on_step=bar.update if bar else None)
    if bar:
        bar.close()
    return {"copy_bandwidth": copy, "results": results}


# ---------------------------------------------------------------------------------- reporting
def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def to_markdown(suite: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per case and contender)."""
    copy = suite["copy_bandwidth"]
    lines = [
        f"Copy bandwidth measured in this run: {copy['reference']:.1f} GB/s "
        + "(" + ", ".join(f"{k} {v:.1f}" for k, v in copy.items() if k != "reference") + ").",
        "",
        "| case | contender | median ms | ratio | GB/s (min bytes) | % copy BW | GFLOP/s "
        "| temp MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in suite["results"]:
        temp = None if r.temp_bytes is None else r.temp_bytes / 2**20
        lines.append(
            f"| {r.case} | {r.contender} | {r.median_s * 1e3:.1f} | {_fmt(r.ratio, '.2f', 'x')} "
            f"| {_fmt(r.gbps, '.1f')} | {_fmt(r.copy_fraction and 100 * r.copy_fraction, '.0f')} "
            f"| {_fmt(r.gflops, '.0f')} | {_fmt(temp, '.1f')} |")
    return "\n".join(lines)


def to_json(suite: dict[str, Any]) -> str:
    """The results as JSON (times in seconds, memory in bytes)."""
    return json.dumps({"copy_bandwidth": suite["copy_bandwidth"],
                       "environment": environment(),
                       "argv": sys.argv[1:],
                       "notes": suite.get("notes", []),
                       "results": [dataclasses.asdict(r) for r in suite["results"]]}, indent=1)


def load_json(paths: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Merge saved ``--json`` runs (the first run's copy bandwidth heads the table)."""
    results: list[Result] = []
    notes: list[str] = []
    copy = env = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        copy = copy or data["copy_bandwidth"]
        env = env or data.get("environment")
        results += [Result(**r) for r in data["results"]]
        notes.append(f"from {path}: `python -m jaxent.bench {' '.join(data.get('argv', []))}`, "
                     f"copy bandwidth {data['copy_bandwidth']['reference']:.1f} GB/s")
        notes += [n for n in data.get("notes", []) if n not in notes]
    return {"copy_bandwidth": copy, "environment": env, "results": results}, notes


def plot(suite: dict[str, Any], path: str) -> None:
    """Time ratio to the baseline and compiled temp memory against the vocabulary size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    rows = [r for r in suite["results"] if r.kind == CE and r.mode == FWD_BWD]
    names = sorted({r.contender for r in rows})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for name in names:
        for dtype, style in (("float32", "-"), ("bfloat16", "--")):
            pts = sorted((r.c, r.ratio, r.temp_bytes) for r in rows
                         if r.contender == name and r.dtype == dtype)
            if not pts:
                continue
            label = f"{name} {'bf16' if dtype == 'bfloat16' else 'f32'}"
            kw = {"color": colors[name], "linestyle": style, "marker": "o", "label": label}
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
            mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], **kw)
    ax_t.set(xscale="log", yscale="log", xlabel="vocabulary size C", ylabel="time / optax",
             title="cross-entropy value_and_grad: time ratio (f32 solid, bf16 dashed)")
    ax_t.axhline(1.0, color="gray", lw=0.8)
    ax_m.set(xscale="log", xlabel="vocabulary size C", ylabel="compiled temp MiB",
             title="compiled temporary memory (JAX contenders)")
    ax_m.set_yscale("symlog", linthresh=1.0)
    ax_m.set_ylim(bottom=0)
    if ax_m.get_legend_handles_labels()[0]:
        ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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

    for dist in ("jaxlib", "optax", "torch", "jax-cce", "liger-kernel", "cut-cross-entropy"):
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


# -------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxent.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, a run under 2 minutes")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per case")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--plot", metavar="FILE.png", help="plot time ratio and memory vs vocabulary")
    p.add_argument("--write", nargs="?", const="benchmarks/RESULTS.md", metavar="PATH",
                   help="write RESULTS.md (default benchmarks/RESULTS.md)")
    p.add_argument("--gpu", action="store_true", help="run on the GPU (adds Liger, Apple CCE)")
    p.add_argument("--only", default="", help="regular expression searched in case names")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FILE.py:FUNC",
                   help="add a CE loss f(logits, labels) as a contender (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--from-json", nargs="+", metavar="FILE.json",
                   help="report (table, --plot, --write) saved --json runs instead of running")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.gpu:  # before any backend starts: a CPU run stays on the CPU
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() == "cpu":
        raise SystemExit("--gpu: JAX sees no GPU (install jax[cuda12])")
    if _importable("torch") and not args.gpu:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    contenders, notes = default_contenders(args.gpu)
    if args.from_json:
        suite, notes = load_json(args.from_json)
    else:
        cases = [c for c in default_cases(args.quick) if re.search(args.only, c.name)]
        for spec in args.extra:
            contenders += load_extra(spec)
        rounds = args.rounds or (3 if args.quick else 5)
        suite = run_suite(cases, contenders, rounds, progress=not args.no_progress,
                          gpu=args.gpu)
        suite["notes"] = notes
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(to_json(suite) if args.json else to_markdown(suite))
    if args.plot:
        plot(suite, args.plot)
    if args.write:
        write_results(args.write, results_markdown(suite, argv, notes))
    return suite


if __name__ == "__main__":
    main()
