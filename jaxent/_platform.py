"""What one platform needs: XLA:CPU and XLA:TPU workarounds, and the measured heuristics
per platform.

**Workarounds.** The math is written once; where XLA:CPU (or XLA:TPU) compiles a plain
expression badly, the code asks a :class:`Quirks` object whether to take a detour.
:func:`per_platform` runs a function with :data:`CPU` quirks on the CPU, :data:`TPU` quirks
on TPUs and :data:`NONE` elsewhere, through ``jax.lax.platform_dependent``: a program lowered
for cuda carries none of the detours, one lowered for tpu only the TPU's, and one exported
for several platforms picks per platform. Each detour below names the XLA behaviour it
answers; it can go when that behaviour changes (re-measure with ``python -m jaxent.bench``,
or, for TPU, ``python -m jaxent.bench.compiled``).

**Heuristics.** :data:`TABLE` holds, per platform, the sizes and residuals the walks choose
(the plain-CE residual, block budgets); which implementation ``"auto"`` picks is the
registry's (:mod:`jaxent.impl`). :func:`by_platform` traces a function once per distinct
row of the table (and of the caller's ``distinct`` answer) inside ``lax.platform_dependent``,
each trace reading its own row (:func:`heuristics`, :func:`platform`), so the program
lowered (compiled, exported) for cuda or tpu holds that platform's choices whatever the
host; outside it, the row is the default backend's. The choices change speed and memory,
and the numbers only by rounding (a backward walked in row groups rounds a 16-bit
``d kernel`` once per group).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir


@dataclasses.dataclass(frozen=True)
class Quirks:
    """Which XLA:CPU and XLA:TPU detours to take (all False: the plain program).

    Attributes:
      bf16_bits: XLA:CPU has no bfloat16 dynamic-slice / dynamic-update-slice; it runs them
        in float32 and hoists the convert of a loop-invariant operand out of the loop (a
        full float32 copy of the kernel), and a bf16 carry updated in place costs a full
        pass per block. bf16 blocks are then moved as uint16 bits, read through an
        optimization barrier, and a bf16 ``d kernel`` is written in stages.
      barrier_before_gather: XLA:CPU fuses the float32 upcast of 16-bit logits into its
        reductions only while the logits have no other reader in the fusion graph; a gather
        of the label logits makes it materialize a float32 copy. A barrier keeps them apart.
      split_long_rows: XLA:CPU's row reductions slow down 2-3x on rows longer than 32K
        elements; such rows are reduced in equal pieces, twice.
      transpose_bf16_dkernel: XLA:CPU multiplies bf16 without upcasting only ``A @ B`` and
        ``A @ B^T`` with row-major operands; ``h^T @ dx`` would run in float32 on a copy of
        ``h``, so the block-sized ``dx`` is transposed instead.
      shift_apart: XLA:CPU's library row reductions fuse their elementwise producer only
        while it has no other reader. CSE merges the backward's ``z - m`` with the
        forward's ``exp(z - m)``, and the merged ``[N, C]`` difference is then materialized
        for both (a logits-sized temporary, or a copy of donated logits). The backward
        reads the row max through an optimization barrier, so the two stay apart.
      pin_row_major: XLA:TPU's layout assignment (v6e) lays out transposed the float32
        product ``h^T @ dx`` of a ``[D, V]`` kernel's block, and the blocks of the
        ``[N, V]`` per-class inputs (soft targets) and of their gradient. The walk's
        loop-carried array (the whole ``d kernel``, targets or targets' gradient) then
        takes that layout too, which costs one full copy of it. Those blocks are pinned
        row-major (:func:`row_major`); XLA then writes each block in place, with no copy.
        It can go when XLA:TPU keeps a loop-carried array in its caller's layout (check:
        the v6e ``llama`` cases of ``.ci/compile/test_compiled.py`` with the pin off).
    """

    bf16_bits: bool = False
    barrier_before_gather: bool = False
    split_long_rows: bool = False
    transpose_bf16_dkernel: bool = False
    shift_apart: bool = False
    pin_row_major: bool = False


NONE = Quirks()
CPU = Quirks(bf16_bits=True, barrier_before_gather=True, split_long_rows=True,
             transpose_bf16_dkernel=True, shift_apart=True)
TPU = Quirks(pin_row_major=True)


def per_platform(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(CPU, *args)`` on the CPU, ``fn(TPU, *args)`` on TPUs, ``fn(NONE, *args)`` on
    every other platform.

    Inside a branch of :func:`by_platform` only the platforms that branch is lowered for
    are traced: the cpu branch's and the tpu branch's quirks directly, the default
    branch's (GPUs, and TPUs when their heuristics are the GPUs') through
    ``lax.platform_dependent``.
    """
    tpu, default = functools.partial(fn, TPU), functools.partial(fn, NONE)
    where = _TRACED_FOR.get()
    if where is None:
        return lax.platform_dependent(*args, cpu=functools.partial(fn, CPU), tpu=tpu,
                                      default=default)
    if where in ("cpu", "tpu"):
        return fn(CPU if where == "cpu" else TPU, *args)
    return lax.platform_dependent(*args, tpu=tpu, default=default)


# ---------------------------------------------------------------------- the detours

MAX_PIECE = 32768  # the row length above which XLA:CPU's reductions slow down


def row_pieces(c: int, q: Quirks) -> int:
    """How many equal pieces of at most 32K a row of ``c`` classes is reduced in (1: none)."""
    if not q.split_long_rows or c <= MAX_PIECE:
        return 1
    return next((k for k in range(-(-c // MAX_PIECE), c // 1024 + 1) if c % k == 0), 1)


def apart(m: jax.Array, q: Quirks) -> jax.Array:
    """The backward's row max ``m [N]``, behind a barrier where ``shift_apart`` asks."""
    return lax.optimization_barrier(m) if q.shift_apart else m


def fresh(x: jax.Array, q: Quirks) -> jax.Array:
    """16-bit ``x`` behind an optimization barrier, for reads beside the main passes."""
    if not q.barrier_before_gather or x.dtype == jnp.promote_types(x.dtype, jnp.float32):
        return x
    return lax.optimization_barrier(x)


def row_major(x: jax.Array, q: Quirks) -> jax.Array:
    """``x`` laid out row-major where ``pin_row_major`` asks.

    The values are ``x``'s. The pin is ``jax.experimental.layout.with_layout_constraint``,
    whose custom call ``jax.export`` does not serialize (no compatibility guarantee): a
    program lowered for export carries no pin, and XLA lays the block out as it likes.
    """
    return _row_major_p.bind(x) if q.pin_row_major else x


def _pin(x: jax.Array) -> jax.Array:
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def _lower_row_major(ctx, x):
    if ctx.module_context.lowering_parameters.for_export:
        return [x]
    return mlir.lower_fun(_pin, multiple_results=False)(ctx, x)


_row_major_p = jex_core.Primitive("jaxent_row_major")
_row_major_p.def_impl(lambda x: x)
_row_major_p.def_abstract_eval(lambda x: x)
ad.deflinear2(_row_major_p, lambda ct, _: (_row_major_p.bind(ct),))
batching.primitive_batchers[_row_major_p] = lambda args, dims: (_row_major_p.bind(*args),
                                                                dims[0])
mlir.register_lowering(_row_major_p, _lower_row_major)


def _bits(dtype, q: Quirks):
    return jnp.uint16 if q.bf16_bits and jnp.dtype(dtype) == jnp.bfloat16 else None


def dslice(x: jax.Array, start, size: int, axis: int, q: Quirks) -> jax.Array:
    """``lax.dynamic_slice_in_dim``, as uint16 bits behind a barrier for bf16 on the CPU."""
    bits = _bits(x.dtype, q)
    if bits is None:
        return lax.dynamic_slice_in_dim(x, start, size, axis=axis)
    x, start = lax.optimization_barrier((x, start))
    out = lax.dynamic_slice_in_dim(lax.bitcast_convert_type(x, bits), start, size, axis=axis)
    return lax.bitcast_convert_type(out, x.dtype)


def carry_zeros(shape, dtype, q: Quirks) -> jax.Array:
    """A zero buffer for :func:`dupdate` (uint16 bits for bf16 on the CPU)."""
    return jnp.zeros(shape, _bits(dtype, q) or dtype)


def dupdate(buf: jax.Array, upd: jax.Array, start, axis: int, dtype, q: Quirks) -> jax.Array:
    """Write ``upd`` (cast to ``dtype``) into a :func:`carry_zeros` buffer in place."""
    upd = upd.astype(dtype)
    if _bits(dtype, q) is not None:
        upd = lax.bitcast_convert_type(upd, buf.dtype)
    return lax.dynamic_update_slice_in_dim(buf, upd, start, axis=axis)


def carry_value(buf: jax.Array, dtype) -> jax.Array:
    """The ``dtype`` array held by a :func:`carry_zeros` buffer."""
    return buf if buf.dtype == dtype else lax.bitcast_convert_type(buf, dtype)


def stages_bf16(dtype, q: Quirks) -> bool:
    """Whether a bf16 ``d kernel`` is written in stages of uint16 bits (see ``bf16_bits``)."""
    return _bits(dtype, q) is not None


def transposed(x: jax.Array) -> jax.Array:
    """``x.T`` as a row-major copy that XLA cannot fold back into a transposed dot operand."""
    return lax.optimization_barrier(x.T.reshape(-1)).reshape(x.shape[::-1])


# ----------------------------------------------------------------------- heuristics


@dataclasses.dataclass(frozen=True)
class Heuristics:
    """The sizes and residuals the walks choose on one platform.

    Attributes:
      lse_min_elements: float32 plain CE keeps the log-sum-exp (else the gradient) from
        this many logits on.
      lse_16bit_rows: 16-bit plain CE keeps the log-sum-exp for rows in this range of
        classes (inclusive), the gradient outside it.
      block_elems: the unit of the fused walks' automatic block sizes (float32 elements).
      max_token_block: the largest token block of the token walk.
      dhidden_elems: the most float32 elements of a 16-bit ``d hidden``'s carry the
        vocabulary walk's backward holds at once; more rows are walked in groups
        (:func:`jaxent.impl.plan.row_groups`).
    """

    lse_min_elements: int = 1 << 24
    lse_16bit_rows: tuple[int, int] = (256, MAX_PIECE)
    block_elems: int = 8 * 1024 * 1024
    max_token_block: int = 512
    dhidden_elems: int = 8 * 1024 * 1024


TABLE: dict[str, Heuristics] = {
    # Measured on 2-core CPUs: float32 plain CE keeps the gradient at every size: one exp
    # per logit and four passes beat the log-sum-exp's second exp in three
    # (benchmarks/FINDINGS.md, 2026-12-05).
    "cpu": Heuristics(lse_min_elements=1 << 62),
    # Not measured yet: the lse residual moves the fewest bytes.
    "gpu": Heuristics(lse_min_elements=0, lse_16bit_rows=(0, 1 << 62)),
    "tpu": Heuristics(lse_min_elements=0, lse_16bit_rows=(0, 1 << 62)),
}


_TRACED_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jaxent_traced_for", default=None)


def platform() -> str:
    """The platform programs are traced for: the branch of :func:`by_platform` being traced,
    else ``jax.default_backend()`` (``"cpu"``, ``"gpu"``, ``"tpu"``; cuda and rocm are
    ``"gpu"``)."""
    name = _TRACED_FOR.get() or jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


@contextlib.contextmanager
def traced_for(name: str):
    """Within it, :func:`heuristics` answers for platform ``name``."""
    token = _TRACED_FOR.set(name)
    try:
        yield
    finally:
        _TRACED_FOR.reset(token)


def by_platform(fn: Callable[..., Any], *args: Any,
                distinct: Callable[[str], Hashable] | None = None) -> Any:
    """``fn(*args)`` with the heuristics of the platform the program is lowered for.

    ``fn`` is traced once per distinct :data:`TABLE` row (cpu, gpu, tpu), and per distinct
    ``distinct(platform)`` (e.g. the implementations ``"auto"`` may pick there), inside
    ``lax.platform_dependent``; lowering keeps the branch of its platform only. Nested
    calls (already inside a branch) run ``fn`` directly.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda x: x * len(platform())
    >>> float(jax.jit(lambda x: by_platform(f, x))(jnp.float32(1.0)))  # "cpu"
    3.0
    """
    if _TRACED_FOR.get() is not None:
        return fn(*args)

    def branch(name):
        def run(*a):
            with traced_for(name):
                return fn(*a)
        return run

    def key(name):
        return TABLE[name], None if distinct is None else distinct(name)

    if key("gpu") == key("tpu"):
        return lax.platform_dependent(*args, cpu=branch("cpu"), default=branch("gpu"))
    return lax.platform_dependent(*args, cpu=branch("cpu"), tpu=branch("tpu"),
                                  default=branch("gpu"))


def heuristics() -> Heuristics:
    """This platform's row of :data:`TABLE` (the CPU's for a platform not in it)."""
    return TABLE.get(platform(), TABLE["cpu"])


def static_size(n: Any, default: int = 1 << 20) -> int:
    """``n`` when it is a concrete int, ``default`` for a symbolic dimension (export)."""
    return n if isinstance(n, int) else default
