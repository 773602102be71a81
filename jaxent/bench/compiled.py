"""Every public loss and fused head, compiled for TPUs and GPUs on a host with no device.

``python -m jaxent.bench.compiled`` (``--help``) compiles each head x implementation x
(value, value-and-gradient) for the chips of :mod:`jaxent.bench.targets` with the real
compilers (libtpu; the CUDA plugin and ptxas), and writes the table of
``benchmarks/COMPILED.md``: compiled temporaries (``memory_analysis()``), the jaxent kernels
each program launches, their grids, registers and spill bytes (ptxas ``-v``), and the
flops of ``cost_analysis()``. ``ci/compile/test_compiled.py`` asserts on the same records.

How: the arguments are ``jax.ShapeDtypeStruct``\\ s placed on a compile-only device
(``SingleDeviceSharding``), the program is lowered under ``jax.default_device(device)``
(Pallas asks the default device for the target) and compiled. GPU kernel facts come from
the compiled HLO (each Triton custom call names its kernel and carries its grid) and from
ptxas's own report, which XLA logs when ptxas runs as a subprocess (:data:`GPU_FLAGS`; the
log is read from the process's stderr). TPU grids come from the program's ``pallas_call``\\ s
(the Mosaic custom call keeps its grid inside serialized MLIR).

Needs the ``compile`` extra (``jax[tpu]``, ``jax-cuda12-plugin``, ``jax-cuda12-pjrt``,
``nvidia-cuda-nvcc-cu12``), in a virtual environment of its own (``ci/compile/run``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import jaxent
from jaxent._options import KernelLayout
from jaxent.bench import targets
from jaxent.bench.targets import Chip

# ptxas runs as a subprocess and XLA logs its -v report (registers, spills) at VLOG 3.
GPU_FLAGS = ("--xla_gpu_enable_libnvptxcompiler=false --xla_gpu_enable_libnvjitlink=false "
             "--xla_gpu_ptx_compiler_extra_flags=-v")
ENV = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "subprocess_compilation=3"}


def configure() -> None:
    """Set the flags above and keep the CPU as the default backend (the CUDA plugin then
    skips its check for a CUDA runtime); call before the first compile (the CLI and CI do).
    :data:`ENV` counts only when set before jax loads: CI exports it, the CLI restarts
    itself with it (:func:`_with_log_env`).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if GPU_FLAGS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {GPU_FLAGS}".strip()
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    jax.config.update("jax_platforms", "cpu")



LLAMA = (16384, 4096, 128256)  # Llama-3-8B's head: tokens x hidden x vocabulary
SMALL = (512, 256, 4096)
PLAIN = (8192, 0, 128256)  # plain losses: tokens x classes


# --------------------------------------------------------------------------- the heads


def _logits(h, w, layout: KernelLayout):
    return jnp.einsum(f"nd,{layout}->nv", h, w).astype(jnp.float32)


def _log_softmax(h, w, layout: KernelLayout):
    return jax.nn.log_softmax(_logits(h, w, layout), axis=-1)


def _naive_ce(layout: KernelLayout):
    import optax

    return lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(
        _logits(h, w, layout), y).mean()


def _naive_log_probs(layout: KernelLayout):
    return lambda h, w, y: jnp.take_along_axis(
        _log_softmax(h, w, layout), y[:, None], axis=-1).sum()


def _naive_soft(layout: KernelLayout):
    return lambda h, w, t: -(t.astype(jnp.float32) * _log_softmax(h, w, layout)).sum(-1).mean()


def _naive_distill(layout: KernelLayout):
    def f(h, w, th, tw):
        lq, lp = _log_softmax(h, w, layout), _log_softmax(th, tw, layout)
        return (jnp.exp(lp) * (lp - lq)).sum(-1).mean()
    return f


@dataclasses.dataclass(frozen=True)
class Head:
    """One public loss: how to call it, its arguments, the naive program it replaces.

    ``call(impl, layout)`` gives the scalar loss of the head's arguments with
    ``kernel_layout=layout``; ``args(n, d, v, dtype)`` their shapes and dtypes (kernels
    ``[V, D]``; :func:`_specs` turns them for ``"dv"``); ``grad`` the differentiated
    arguments; ``impls`` those it accepts; ``naive(layout)`` the materialized program
    (logits, then optax or the textbook formula), None for the plain losses.
    """

    name: str
    fused: bool
    impls: tuple[str, ...]
    call: Callable[[Any, KernelLayout], Callable]
    args: Callable[..., tuple]
    grad: tuple[int, ...]
    naive: Callable[[KernelLayout], Callable] | None = None


def _fused_args(n, d, v, dt):
    return (((n, d), dt), ((v, d), dt), ((n,), jnp.int32))


# The RL and distillation heads (row statistics: impl="pallas" runs jaxent.impl.pallas_stats).
STAT_HEADS = ("linear_log_probs", "linear_soft_cross_entropy", "linear_distillation_loss",
              "linear_topk_log_probs", "sparse_teacher_distillation",
              "linear_support_log_probs")
TOPK = 16  # the top-k head's k and the sparse teacher's ids per row


def _topk(impl, layout: KernelLayout):
    def f(h, w):
        _, lp, tail = jaxent.linear_topk_log_probs(h, w, TOPK, kernel_layout=layout,
                                                   return_tail=True, impl=impl)
        return lp.sum() + tail.sum()
    return f


def _support(impl, layout: KernelLayout):
    def f(h, w, y):  # the nucleus within the TOPK candidates: three passes, none flagged
        lp, ent = jaxent.linear_support_log_probs(
            h, w, y, top_k=TOPK, top_p=0.9, min_p=0.01, max_candidates=TOPK,
            return_entropy=True, kernel_layout=layout, impl=impl)
        return lp.sum() + ent.sum()
    return f


HEADS: dict[str, Head] = {head.name: head for head in (
    Head("cross_entropy", False, ("auto", "xla", "pallas"),
         lambda impl, layout: lambda x, y: jaxent.cross_entropy(x, y, impl=impl),
         lambda n, d, v, dt: (((n, v), dt), ((n,), jnp.int32)), (0,)),
    # soft_cross_entropy takes no `impl` (one XLA program): "-" calls it without.
    Head("soft_cross_entropy", False, ("-",),
         lambda impl, layout: lambda x, t: jaxent.soft_cross_entropy(x, t),
         lambda n, d, v, dt: (((n, v), dt), ((n, v), dt)), (0,)),
    Head("linear_cross_entropy", True, ("auto", "vocab", "token", "pallas"),
         lambda impl, layout: lambda h, w, y: jaxent.linear_cross_entropy(
             h, w, y, kernel_layout=layout, impl=impl),
         _fused_args, (0, 1), _naive_ce),
    Head("linear_log_probs", True, ("auto", "vocab", "token", "pallas"),
         lambda impl, layout: lambda h, w, y: jaxent.linear_log_probs(
             h, w, y, kernel_layout=layout, impl=impl).sum(),
         _fused_args, (0, 1), _naive_log_probs),
    Head("linear_soft_cross_entropy", True, ("auto", "vocab", "token", "pallas"),
         lambda impl, layout: lambda h, w, t: jaxent.linear_soft_cross_entropy(
             h, w, t, kernel_layout=layout, impl=impl),
         lambda n, d, v, dt: (((n, d), dt), ((v, d), dt), ((n, v), dt)), (0, 1),
         _naive_soft),
    Head("linear_distillation_loss", True, ("auto", "vocab", "token", "pallas"),
         lambda impl, layout: lambda h, w, th, tw: jaxent.linear_distillation_loss(
             h, w, th, tw, kernel_layout=layout, impl=impl),
         lambda n, d, v, dt: (((n, d), dt), ((v, d), dt), ((n, d), dt), ((v, d), dt)),
         (0, 1), _naive_distill),
    # No naive program: its temporaries are held against the naive one in tests/test_topk.py.
    Head("linear_topk_log_probs", True, ("auto", "vocab", "token", "pallas"), _topk,
         lambda n, d, v, dt: (((n, d), dt), ((v, d), dt)), (0, 1)),
    # linear_distillation_loss with a sparse teacher (TOPK ids and log-probabilities a row).
    Head("sparse_teacher_distillation", True, ("auto", "vocab", "token", "pallas"),
         lambda impl, layout: lambda h, w, ids, lq: jaxent.linear_distillation_loss(
             h, w, teacher_topk=(ids, lq), kernel_layout=layout, impl=impl),
         lambda n, d, v, dt: (((n, d), dt), ((v, d), dt), ((n, TOPK), jnp.int32),
                              ((n, TOPK), jnp.float32)), (0, 1)),
    # The sampler's filters (top-k, top-p, min-p; no naive program).
    Head("linear_support_log_probs", True, ("auto", "vocab", "token", "pallas"), _support,
         _fused_args, (0, 1)),
)}


# ------------------------------------------------------------------------ the records


@dataclasses.dataclass
class Kernel:
    """One jaxent kernel launch of a compiled program (None: not reported there)."""

    name: str
    grid: tuple[int, ...] | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    cost_flops: int | None = None  # the pallas_call's cost_estimate


@dataclasses.dataclass
class Record:
    """One compiled program: ``target x head x impl x mode x shape x kernel layout``."""

    target: str
    head: str
    impl: str
    mode: str
    shape: tuple[int, int, int]
    layout: KernelLayout = "vd"
    error: str | None = None
    temp_bytes: int | None = None
    flops: float | None = None
    kernels: list[Kernel] = dataclasses.field(default_factory=list)
    launches: int | None = None
    naive_temp_bytes: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def fraction(self) -> float | None:
        """Temporaries over the naive program's on the same target (fused heads)."""
        if self.temp_bytes is None or not self.naive_temp_bytes:
            return None
        return self.temp_bytes / self.naive_temp_bytes


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    """Send file descriptor 2 (where XLA's C++ logs go) to ``path`` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


_PTXAS = re.compile(
    r"Function properties for (\w+)\s+\d+ bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads\s+ptxas info\s+: Used (\d+) registers")


def ptxas_report(log: str) -> dict[str, tuple[int, int]]:
    """``{entry function: (registers, spill bytes)}`` from ptxas ``-v`` output."""
    return {m[1]: (int(m[4]), int(m[2]) + int(m[3])) for m in _PTXAS.finditer(log)}


_SEEN_PTXAS: dict[str, tuple[int, int]] = {}  # XLA compiles an identical kernel once


def _gpu_kernels(text: str, log: str) -> tuple[list[Kernel], int]:
    """The jaxent kernels of a compiled GPU program (grids from its HLO, registers and
    spills from ptxas) and how many kernels ptxas compiled for it (the HLO's fusions and
    custom calls when XLA reused every one from an earlier compile)."""
    report = ptxas_report(log)
    _SEEN_PTXAS.update(report)
    out = []
    for line in text.splitlines():
        if 'custom_call_target="__gpu$xla.gpu.triton"' not in line:
            continue
        name = re.search(r'op_name="[^"]*?(jaxent_\w+)/pallas_call', line)
        grid = re.search(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", line)
        k = Kernel(name[1] if name else "?",
                   tuple(int(g) for g in grid.groups()) if grid else None)
        if k.name in _SEEN_PTXAS:
            k.registers, k.spill_bytes = _SEEN_PTXAS[k.name]
        out.append(k)
    return out, len(report) or len(re.findall(r"ENTRY|fusion\(|custom-call\(", text))


def pallas_calls(jaxpr, backend: str) -> list[Kernel]:
    """The ``pallas_call``\\ s of ``jaxpr`` (sub-jaxprs included) lowered by ``backend``
    (``"mosaic"`` for TPU, ``"triton"``), told apart by their compiler params: name, grid
    and the flops of their ``cost_estimate``."""
    from jax.extend import core as jex_core

    out: list[Kernel] = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                if backend in type(eqn.params["compiler_params"]).__module__:
                    src = eqn.params["jaxpr"].debug_info.func_src_info or "?"
                    est = eqn.params.get("cost_estimate")
                    out.append(Kernel(src.split(" ")[0], tuple(eqn.params["grid_mapping"].grid),
                                      cost_flops=None if est is None else est.flops))
        for sub in jex_core.subjaxprs(jx):
            walk(sub)

    walk(jaxpr.jaxpr)
    return out


def _specs(head: Head, shape, dtype, dev, layout: KernelLayout = "vd"):
    """The arguments' ``ShapeDtypeStruct``\\ s on ``dev``; kernels ``[D, V]`` for ``"dv"``."""
    sharding = jax.sharding.SingleDeviceSharding(dev)
    _, d, v = shape
    turn = {(v, d): (d, v)} if layout == "dv" and head.fused else {}
    return tuple(jax.ShapeDtypeStruct(turn.get(s, s), dt, sharding=sharding)
                 for s, dt in head.args(*shape, dtype))


def _program(fn: Callable, head: Head, mode: str) -> Any:
    return jax.jit(fn if mode == "value" else jax.value_and_grad(fn, argnums=head.grad))


def compile_one(chip: Chip, dev, head: Head, impl: str, mode: str, shape,
                dtype=jnp.bfloat16, fn: Callable | None = None,
                layout: KernelLayout = "vd") -> Record:
    """Compile one program for ``chip`` (``fn``, else the head's ``impl`` with
    ``kernel_layout=layout``); failures are recorded, not raised."""
    rec = Record(chip.name, head.name, impl, mode, tuple(shape), layout)
    args = _specs(head, shape, dtype, dev, layout)
    prog = _program(fn or head.call(impl, layout), head, mode)
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".log") as log, jax.default_device(dev):
        try:
            with _stderr_to(log.name):
                compiled = prog.lower(*args).compile()
        except Exception as e:  # noqa: BLE001 - a failure to compile is the finding
            rec.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            rec.seconds = time.perf_counter() - t0
            return rec
        text = compiled.as_text()
        ptx_log = open(log.name, errors="replace").read()
        jaxpr = jax.make_jaxpr(prog)(*args)
    rec.seconds = time.perf_counter() - t0
    rec.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    rec.flops = float(cost.get("flops", 0.0)) if isinstance(cost, dict) else None
    if chip.platform == "cuda":
        rec.kernels, rec.launches = _gpu_kernels(text, ptx_log)
        costs = {k.name: k.cost_flops for k in pallas_calls(jaxpr, "triton")}
        for k in rec.kernels:
            k.cost_flops = costs.get(k.name)
    else:
        rec.kernels = pallas_calls(jaxpr, "mosaic") if "tpu_custom_call" in text else []
        rec.launches = text.count('custom_call_target="tpu_custom_call"')
    return rec


SHAPES = {"small": SMALL, "llama": LLAMA, "plain": PLAIN, "plain-small": (SMALL[0], 0, SMALL[2])}


class Key(NamedTuple):
    """One program of the plan: ``target x head x impl x mode x shape x kernel layout``
    (``impl="naive"``: the materialized program a fused head replaces; the plain losses
    have no kernel and keep the default)."""

    target: str
    head: str
    impl: str
    mode: str
    shape: str
    layout: KernelLayout = "vd"

    def __str__(self) -> str:
        return "-".join(self)


def plan(profile: str = "full") -> list[Key]:
    """The programs to compile. ``"full"``: every chip x head x impl x mode, fused heads at
    a small shape and at Llama-3-8B's (16384 x 4096 x 128256), plain losses at a small shape
    and at 8192 x 128256; kernels ``[V, D]`` (``kernel_layout="vd"``), and the fused heads'
    value-and-gradient at Llama's shape with ``[D, V]`` kernels too (``"dv"``, the
    default). ``"ci"`` (a few minutes on two cores): on the H100 and the v5e, every head x
    impl x mode at the small shapes (the RL and distillation heads with ``"auto"`` and
    ``"pallas"``), value-and-gradient at the large ones (the RL and distillation heads
    there on the H100 only: TPU compiles take longer); on the other chips the Pallas kernels
    and the XLA walk they are held against; on every chip the fused CE's walk with ``[D,
    V]`` kernels, and on the v6e the soft-target head's walk with both layouts (XLA:TPU's
    layout assignment there: :data:`jaxent._platform.Quirks` ``pin_row_major``)."""
    if profile == "full":
        out = []
        for target in targets.CHIPS:
            for head in HEADS.values():
                for shape in ("small", "llama") if head.fused else ("plain-small", "plain"):
                    if head.naive is not None and shape == "llama":
                        out.append(Key(target, head.name, "naive", "grad", shape))
                    out += [Key(target, head.name, impl, mode, shape)
                            for impl in head.impls for mode in ("value", "grad")]
                if head.fused:
                    naive = ("naive",) if head.naive is not None else ()
                    out += [Key(target, head.name, impl, "grad", "llama", "dv")
                            for impl in (*naive, "auto", "vocab", "pallas")]
        return out
    out = []
    for target in targets.CHIPS:
        wide = target in ("h100", "v5e")
        big = ("vocab", "pallas") if not wide else ("naive", "auto", "vocab", "pallas")
        for head in HEADS.values() if wide else ():
            small = "small" if head.fused else "plain-small"
            impls = head.impls if head.name == "linear_cross_entropy" or not head.fused \
                else ("auto", "pallas")
            out += [Key(target, head.name, i, m, small) for i in impls for m in ("value", "grad")]
        out += [Key(target, "cross_entropy", "pallas", "value", "plain")]
        out += [Key(target, "cross_entropy", i, "grad", "plain") for i in ("xla", "pallas")]
        out += [Key(target, "linear_cross_entropy", i, "grad", "llama") for i in big]
        out += [Key(target, "linear_cross_entropy", i, "grad", "llama", "dv")
                for i in ("naive", "vocab")]
        if target == "v6e":
            out += [Key(target, "linear_soft_cross_entropy", i, "grad", "llama", layout)
                    for i in ("naive", "vocab", "pallas") for layout in ("vd", "dv")]
        if target == "h100":
            out += [Key(target, h, i, "grad", "llama") for h in HEADS
                    if HEADS[h].naive is not None and h != "linear_cross_entropy"
                    for i in ("naive", "auto", "pallas")]
    return out


_DEVICES: dict[str, Any] = {}
_RECORDS: dict[Key, Record] = {}


def get(key: Key) -> Record:
    """The record of ``key``, compiled once per process (with its naive program's
    temporaries for a fused head's value-and-gradient program)."""
    if key not in _RECORDS:
        chip = targets.CHIPS[key.target]
        if key.target not in _DEVICES:
            _DEVICES[key.target] = targets.device(chip)
        head = HEADS[key.head]
        fn = head.naive(key.layout) if key.impl == "naive" and head.naive else None
        rec = compile_one(chip, _DEVICES[key.target], head, key.impl, key.mode,
                          SHAPES[key.shape], fn=fn, layout=key.layout)
        if head.naive is not None and key.mode == "grad" and key.impl != "naive" \
                and key.shape == "llama":
            rec.naive_temp_bytes = get(key._replace(impl="naive")).temp_bytes
        _RECORDS[key] = rec
    return _RECORDS[key]


def records(keys: Sequence[Key], progress: bool = True) -> list[Record]:
    """:func:`get` of every key, printing one line each to stderr with ``progress``."""
    out = []
    for key in keys:
        out.append(get(key))
        if progress:
            print(_line(out[-1]), file=sys.stderr, flush=True)
    return out


def _gb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e9:.3f}"


def _line(r: Record) -> str:
    head = f"{r.target} {r.head} {r.impl} {r.mode} {'x'.join(map(str, r.shape))} {r.layout}"
    if not r.ok:
        return f"{head}: FAILED {r.error}"
    return f"{head}: {_gb(r.temp_bytes)} GB temp, {len(r.kernels)} kernels ({r.seconds:.1f}s)"


def table(recs: Sequence[Record]) -> str:
    """The Markdown table: target x head x impl (value and gradient programs)."""
    rows = ["| target | head | impl | mode | shape | kernel | temp GB | / naive | launches | "
            "jaxent kernels: grid, registers, spill B | flops |",
            "|---|---|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in recs:
        where = (f"| {r.target} | {r.head} | {r.impl} | {r.mode} | "
                 f"{'x'.join(map(str, r.shape))} | {r.layout if HEADS[r.head].fused else '-'} |")
        if not r.ok:
            rows.append(f"{where} failed: {r.error} ||||||")
            continue
        gpu = targets.CHIPS[r.target].platform == "cuda"
        ks = "; ".join(
            f"{k.name.removeprefix('jaxent_')} {'x'.join(map(str, k.grid or ()))}"
            + (f" r{k.registers} s{k.spill_bytes}" if k.registers is not None
               else " r? s? (no ptxas report)" if gpu else "")
            for k in r.kernels) or "-"
        frac = "-" if r.fraction is None else f"{100 * r.fraction:.1f} %"
        flops = "-" if r.flops is None else f"{r.flops:.3g}"
        rows.append(f"{where} {_gb(r.temp_bytes)} | {frac} | "
                    f"{r.launches if r.launches is not None else '-'} | {ks} | {flops} |")
    return "\n".join(rows) + "\n"


def mosaic_gpu_probe() -> dict[str, str]:
    """Compile for the H100 the two pieces a Pallas Mosaic GPU cross-entropy kernel needs:
    a row reduction (max and log-sum-exp of a ``[128, 128]`` float32 tile) and a warpgroup
    MMA (``[128, 64] x [64, 128]`` bf16 from swizzled shared memory). ``{name: "ok" or the
    error}``; the evidence behind the GPU kernel strategy (``benchmarks/COMPILED.md``)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plmg

    dev = targets.device(targets.CHIPS["h100"])
    sh = jax.sharding.SingleDeviceSharding(dev)

    def rowstats(x):
        def kernel(x_ref, o_ref):
            v = x_ref[...]
            m = jnp.max(v, axis=1)
            o_ref[...] = m + jnp.log(jnp.sum(jnp.exp(v - m[:, None]), axis=1))
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((128,), jnp.float32),
                              compiler_params=plmg.CompilerParams())(x)

    def wgmma(a, b):
        tr = (plmg.TilingTransform((8, 64)), plmg.SwizzleTransform(128))
        smem = plmg.BlockSpec(memory_space=plmg.SMEM, transforms=tr)

        def kernel(a_ref, b_ref, o_ref):
            def scope(acc_ref):
                plmg.wgmma(acc_ref, a_ref, b_ref)
                return acc_ref[...]
            o_ref[...] = pl.run_scoped(scope, plmg.ACC((128, 128), jnp.float32))
        return pl.pallas_call(kernel, in_specs=[smem, smem],
                              out_specs=pl.BlockSpec(memory_space=plmg.SMEM),
                              out_shape=jax.ShapeDtypeStruct((128, 128), jnp.float32),
                              compiler_params=plmg.CompilerParams())(a, b)

    out = {}
    for name, fn, shapes in (
            ("row reduction", rowstats, [((128, 128), jnp.float32)]),
            ("wgmma", wgmma, [((128, 64), jnp.bfloat16), ((64, 128), jnp.bfloat16)])):
        args = [jax.ShapeDtypeStruct(s, dt, sharding=sh) for s, dt in shapes]
        try:
            with jax.default_device(dev):
                jax.jit(fn).lower(*args).compile()
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - the failure is the evidence
            out[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return out


def page(recs: Sequence[Record], argv: Sequence[str]) -> str:
    """``benchmarks/COMPILED.md``: how it was made, then :func:`table`."""
    import jaxlib

    ok = sum(r.ok for r in recs)
    return (
        "# Compiled without a device: temporaries, kernels, grids, registers, spills\n\n"
        f"Generated by `python -m jaxent.bench.compiled {' '.join(argv)}` (jax "
        f"{jax.__version__}, jaxlib {jaxlib.__version__}; {ok} of {len(recs)} programs "
        "compiled; the rest are refusals, `impl='token'` for bf16). Notes and the GPU kernel "
        "strategy: `benchmarks/compiled_notes.md`.\n\n"
        "Columns: temporaries of `memory_analysis()` in GB (`/ naive`: against the "
        "materialized program of the same head on the same chip); launches: kernels the "
        "compiled program runs (GPU: ptxas entry functions; TPU: Mosaic custom calls); per "
        "jaxent kernel its grid, on GPUs its registers per thread (`r`) and spill bytes "
        "(`s`) from ptxas; flops: `cost_analysis()` (None on a compile-only GPU). "
        "Programs: `value` is the loss, `grad` value_and_grad wrt the logits, or hidden and "
        "kernel; kernel: `kernel_layout` (`vd`: `[V, D]`, `dv`: `[D, V]`, the default); "
        "bf16; shapes N x D x V (plain losses N x 0 x C)."
        "\n\n" + table(recs))


def main(argv: Sequence[str] | None = None) -> list[Record]:
    p = argparse.ArgumentParser(prog="python -m jaxent.bench.compiled", description=__doc__)
    p.add_argument("--profile", default="full", choices=["full", "ci"])
    p.add_argument("--targets", nargs="+", default=list(targets.CHIPS), choices=targets.CHIPS)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    p.add_argument("--write", metavar="PATH", help="write the table (Markdown) to PATH")
    p.add_argument("--mosaic-gpu-probe", action="store_true",
                   help="only compile the Mosaic GPU probe (mosaic_gpu_probe) and print it")
    args = p.parse_args(argv)
    configure()
    if args.mosaic_gpu_probe:
        for name, got in mosaic_gpu_probe().items():
            print(f"Mosaic GPU {name}: {got}")
        return []
    keys = [k for k in plan(args.profile) if k.target in args.targets and k.head in args.heads]
    recs = records(keys)
    text = table(recs)
    if args.write:
        with open(args.write, "w") as f:
            f.write(page(recs, argv if argv is not None else sys.argv[1:]))
    print(text)
    return recs


def _with_log_env() -> None:
    """Start this command again with :data:`ENV` set, unless it already is.

    XLA reads ``TF_CPP_VMODULE`` when jaxlib loads, at ``import jax``, before any code of
    this module runs; without it ptxas's report is not logged and the GPU rows would lose
    their registers and spills.
    """
    if any(os.environ.get(k) != v for k, v in ENV.items()):
        cmd = [sys.executable, "-m", "jaxent.bench.compiled", *sys.argv[1:]]
        os.execve(sys.executable, cmd, {**os.environ, **ENV})


if __name__ == "__main__":
    _with_log_env()
    main()
