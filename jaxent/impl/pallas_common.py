r"""What the Pallas kernels of every backend share: tile math, padding, cost estimates,
the plain cross-entropy's ``custom_vjp``, and the ``pallas_call`` that types its outputs.

The per-row formulas are :mod:`jaxent._rowmath`'s (the one copy); this module only cuts the
work into tiles. The fused heads' kernels are built from their row statistics
(:mod:`jaxent.impl.pallas_stats`); the plain cross-entropy of materialized logits has kernels
of its own in each backend module (:mod:`jaxent.impl.pallas_gpu`,
:mod:`jaxent.impl.pallas_tpu`), which supplies :class:`Launchers` (its forward and
backward on padded row vectors) and its block ``Config``; :func:`ce_rows` pads, calls them
and finishes the per-row math outside the kernels.

Per row, the forward folds class tiles into the streaming :class:`~jaxent._rowmath.Stats`
(raw max ``m``, ``s = \sum e^{z - z(m)}``, the label's raw logit, the smoothing sum); the
loss

.. math::
    (1-\epsilon)\, r\,(\log s - (z_y - m)) + \frac{\epsilon}{C}(W \log s - wz)
    + \lambda_z\,\mathrm{lse}^2

is formed outside the kernel (:func:`jaxent._rowmath.label_loss`). The backward writes
each tile's ``dx = g [p A - (1-\epsilon) r [c = y] - \tfrac{\epsilon}{C} w_c]`` with
``p = exp(shift(x, m) - log s)`` (:func:`jaxent._rowmath.block_grad`). The logits are read
in place (no padded copy: the loss is memory bound); only the ``[N]`` and ``[C]`` vectors
are padded to whole blocks, padding rows with label ``-1``, weight 0 and a zero cotangent,
padding columns masked by ``column < C`` (:func:`column_mask`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

from jaxent import _rowmath
from jaxent._options import Options
from jaxent.impl import _blocks as B

_HINT = ("impl='pallas' has no compiled kernels for the CPU: pass interpret=True (Pallas's "
         "interpreter, slow, for testing) or run on a GPU or TPU.")


def check_platform(interpret: bool, platform: str | None = None) -> None:
    """Raise ``ValueError`` when Pallas kernels cannot run here without ``interpret=True``.

    ``platform`` defaults to JAX's default backend (``"cpu"``, ``"gpu"``/``"cuda"``,
    ``"tpu"``...). Compiled Pallas kernels exist for NVIDIA GPUs (Triton) and TPUs (Mosaic).
    The entry points also check where they are *lowered* (:func:`guard_platform`), so a
    program exported for ``cuda``/``tpu`` from a CPU host passes and one compiled for the CPU
    fails with this hint.
    """
    if not interpret and (platform or jax.default_backend()) == "cpu":
        raise ValueError(_HINT)


def _guard_lowering_cpu(ctx, x):
    del ctx, x
    raise ValueError(_HINT)


def _guard_impl(x):
    """Eager evaluation: check the platform the operand lives on."""
    devices = getattr(x, "devices", None)
    check_platform(False, next(iter(devices())).platform if devices else None)
    return x


_guard_p = jex_core.Primitive("jaxent_pallas_platform_guard")
_guard_p.def_abstract_eval(lambda x: x)
_guard_p.def_impl(_guard_impl)
mlir.register_lowering(_guard_p, lambda ctx, x: [x])
mlir.register_lowering(_guard_p, _guard_lowering_cpu, platform="cpu")
batching.primitive_batchers[_guard_p] = lambda args, dims: (_guard_p.bind(*args), dims[0])


def guard_platform(x: jax.Array, interpret: bool) -> jax.Array:
    """``x`` unchanged; compiling it for the CPU without ``interpret`` raises ``ValueError``
    with :func:`check_platform`'s hint (an identity elsewhere, so exports for cuda/tpu
    from a CPU host work)."""
    return x if interpret else _guard_p.bind(x)


def pallas_call(kernel: Callable, *, out_shape, **kwargs) -> Callable:
    """``pl.pallas_call`` whose outputs vary over the manual mesh axes that its operands
    vary over. Inside a ``jax.shard_map`` that checks varying axes (its default), pallas_call
    takes each output's from its ``ShapeDtypeStruct`` (``manual_axis_type``) and a kernel
    cannot infer them; outside one they are empty and ignored."""
    call = functools.partial(pl.pallas_call, kernel, **kwargs)

    def run(*args):
        leaves = jax.tree.leaves(args)
        mat = type(jax.typeof(leaves[0]).manual_axis_type)(varying=B.varying_axes(leaves))
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, manual_axis_type=mat), out_shape)
        return call(out_shape=shapes)(*args)

    return run


def round_up(x: int, b: int) -> int:
    """The smallest multiple of ``b`` that is at least ``max(x, 1)``."""
    return -(-max(x, 1) // b) * b


def pad_to(x: jax.Array | None, axis: int, size: int, value=0) -> jax.Array | None:
    """``x`` padded with ``value`` at the end of ``axis`` to ``size`` (no copy if it fits)."""
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def cost(n: int, d: int, v: int, itemsize: int, *, matmuls: float, h_reads: float = 1,
         w_reads: float = 1, extra_bytes: int = 0, elementwise: int = 8) -> pl.CostEstimate:
    """What a kernel over ``[n, d] x [d, v]`` costs, for XLA's scheduler (``cost_estimate``).

    ``flops = 2 * matmuls * n d v + elementwise * n v`` (``matmuls`` logits-sized products,
    the row math a few flops per logit), ``transcendentals = n v`` (one ``exp`` per logit),
    ``bytes = itemsize (h_reads n d + w_reads v d) + extra_bytes`` (each operand read as
    often as the grid re-reads it, plus the outputs and row vectors). Plain CE: ``d = 0``,
    its logits and ``dx`` in ``extra_bytes``.

    >>> cost(8, 4, 16, 2, matmuls=1).flops
    2048
    """
    return pl.CostEstimate(
        flops=int(2 * matmuls * n * d * v + elementwise * n * v), transcendentals=int(n * v),
        bytes_accessed=int(itemsize * (h_reads * n * d + w_reads * v * d) + extra_bytes))


# ---------------------------------------------------------------------------- tile math


def dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """``a . b`` contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]``,
    accumulated in float32 (full float32 precision for float32 operands: no TF32)."""
    acc = _rowmath.compute_dtype(a.dtype)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=acc, precision=precision)


def logits_tile(h_at: Callable, w_at: Callable, nk: int, layout: str, bias) -> jax.Array:
    """Raw logits of a tile ``[bn, bv]``: ``sum_k h_at(k) . w_at(k) (+ bias [bv])``.

    ``h_at(k)`` is the tile's ``[bn, bk]`` slice of the hidden states, ``w_at(k)`` the
    kernel's ``[bk, bv]`` (``"dv"``) or ``[bv, bk]`` (``"vd"``) slice; ``nk`` static.
    """
    contract = (1, 0) if layout == "dv" else (1, 1)
    if nk == 1:
        x = dot(h_at(0), w_at(0), contract)
    else:
        x0 = dot(h_at(0), w_at(0), contract)
        x = lax.fori_loop(1, nk, lambda k, acc: acc + dot(h_at(k), w_at(k), contract), x0)
    if bias is not None:
        x = x + bias.astype(x.dtype)[None, :]
    return x


def column_mask(shape: tuple[int, int], start, num_classes: int) -> jax.Array:
    """``[bn, bv]`` booleans: which columns of a tile starting at ``start`` are classes."""
    return lax.broadcasted_iota(jnp.int32, shape, 1) + start < num_classes


def init_stats(bn: int, dtype, opts: Options) -> _rowmath.Stats:
    """:func:`jaxent._rowmath.init_stats` with ``wseen`` per row (masked tiles count it so)."""
    st = _rowmath.init_stats(bn, dtype, opts.smoothing, False)
    if st.wseen is not None:
        st = st._replace(wseen=jnp.zeros((bn,), dtype))
    return st


def fold_tile(st, x, labels, w_blk, start, opts: Options, num_classes: int):
    """Fold the raw logits ``x [bn, bv]`` of the tile starting at class ``start`` into ``st``."""
    valid = column_mask(x.shape, start, num_classes)
    return _rowmath.update_stats(st, _rowmath.mask_columns(x, valid), labels - start, w_blk,
                                 start, opts, valid)


NUM_ROWS = 7  # the per-row vectors of the backward kernels: see grad_tile


def grad_tile(x, rows, start, w_blk, opts: Options, num_classes: int) -> jax.Array:
    """``d loss / d x`` of a tile ``[bn, bv]`` (0 on padding columns), accumulation dtype.

    ``rows = (labels, m, log_s, cp, cy, cw, live)``, each ``[bn]`` (:data:`NUM_ROWS`): the
    safe raw max and ``log s`` of the forward, the coefficients of
    :func:`jaxent._rowmath.grad_coefs` and ``live`` (int32, 1 for counted rows). Rows not
    counted are selected away, not multiplied by 0: their ``p`` may be ``nan`` (a row of
    ``-inf`` logits has ``log s = -inf``).
    """
    labels, m, log_s, cp, cy, cw, live = rows
    dz = _rowmath.block_grad(x, m, log_s, labels - start, (cp, cy, cw), w_blk, live,
                             opts)
    return jnp.where(column_mask(x.shape, start, num_classes), dz, 0.0)


def dhidden_part(dz: jax.Array, w_tile: jax.Array, layout: str) -> jax.Array:
    """``dz . W_tile^T``: ``[bn, bv]`` with ``[bd, bv]`` (``"dv"``) or ``[bv, bd]`` (``"vd"``)
    gives ``[bn, bd]``."""
    return dot(dz.astype(w_tile.dtype), w_tile, (1, 1) if layout == "dv" else (1, 0))


def dkernel_part(h_tile: jax.Array, dz: jax.Array, layout: str) -> jax.Array:
    """``h^T dz`` in the kernel's layout: ``[bd, bv]`` (``"dv"``) or ``[bv, bd]`` (``"vd"``)."""
    dz = dz.astype(h_tile.dtype)
    return dot(h_tile, dz, (0, 0)) if layout == "dv" else dot(dz, h_tile, (0, 0))


def ce_bwd_kernel(*refs, opts: Options, num_classes: int, block_c: int, weighted: bool):
    """Plain CE backward tile (grid ``(token tiles, class tiles)``): ``dx`` of one tile.

    Refs: ``x [bn, bc]``, the :data:`NUM_ROWS` row vectors ``[bn]`` (or ``[1, bn]``),
    ``weight [bc]`` (or ``[1, bc]``) if ``weighted``; out ``dx [bn, bc]`` in the logits'
    dtype. An edge tile may run past the logits (TPU partial blocks: unspecified values
    there, writes dropped); its columns beyond ``C`` are masked to 0 and its rows beyond
    ``N`` are only ever written out of bounds, so nothing leaks.
    """
    x_ref, *row_refs = refs[:1 + NUM_ROWS]
    w_ref = refs[1 + NUM_ROWS] if weighted else None
    dx_ref = refs[-1]
    start = pl.program_id(1) * block_c
    x = x_ref[...].astype(_rowmath.compute_dtype(x_ref.dtype))
    rows = tuple(r[...].reshape(-1) for r in row_refs)
    dz = grad_tile(x, rows, start, None if w_ref is None else w_ref[...].reshape(-1), opts,
                   num_classes)
    dx_ref[...] = dz.astype(dx_ref.dtype)


# --------------------------------------------------------------------- entry points


class Launchers(NamedTuple):
    """A backend's plain cross-entropy kernels on padded row vectors: ``ce_fwd(spec, x, y,
    wt) -> Stats`` (``[Np]`` fields) and ``ce_bwd(spec, x, rows, wt) -> dx``; the logits
    ``x [N, C]`` come unpadded and ``dx`` is ``[N, C]``."""

    ce_fwd: Callable
    ce_bwd: Callable


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one call (hashable: a ``nondiff_argnums`` argument)."""

    launch: Launchers
    opts: Options
    num_classes: int
    config: Any
    interpret: bool


_SECOND_ORDER = (
    "second-order derivatives (differentiating a gradient) of the Pallas kernels "
    "(impl='pallas') are not supported: pallas_call has no differentiation rule for them. "
    "Use impl='xla' (or 'vocab' / 'token') where a gradient is differentiated again")


def first_order(launch: Callable, spec, *args):
    """``launch(spec, *args)``, with a clear ``NotImplementedError`` when differentiated (only
    a gradient of the loss's gradient differentiates the kernels themselves)."""

    @jax.custom_jvp
    def call(*args):
        return launch(spec, *args)

    @call.defjvp
    def _no_jvp(primals, tangents):
        del primals, tangents
        raise NotImplementedError(_SECOND_ORDER)

    return call(*args)


def _finish(spec: Spec, st: _rowmath.Stats, labels, row_w, counted, weight):
    """Per-row loss, lse and the backward's residuals from the kernels' statistics."""
    rs = _rowmath.finish(st, spec.opts)
    acc = rs.lse.dtype
    big_w = _rowmath.class_sum(weight, spec.num_classes, acc)
    loss = _rowmath.label_loss(rs.log_s, rs.zy_s, rs.wz, rs.lse, row_w, big_w, spec.opts,
                               spec.num_classes)
    valid = (labels >= 0) & (labels < spec.num_classes)
    loss = jnp.where(counted, jnp.where(valid, loss, jnp.nan), 0.0)
    return loss, rs


def _coef_rows(spec: Spec, g, rs, labels, row_w, counted, weight, n_pad: int):
    """``(labels, m, log_s, cp, cy, cw, live)`` padded to ``n_pad`` rows for the backward
    kernels (see :func:`grad_tile`)."""
    v = spec.num_classes
    valid = (labels >= 0) & (labels < v)
    g = jnp.where(counted, jnp.where(valid, g, jnp.nan), 0.0).astype(rs.lse.dtype)
    big_w = _rowmath.class_sum(weight, v, rs.lse.dtype)
    cp, cy, cw = _rowmath.grad_coefs(g, rs.lse, row_w, big_w, spec.opts, v)
    cw = jnp.broadcast_to(cw, cp.shape)
    rows = (labels.astype(jnp.int32), rs.m, rs.log_s, cp, cy, cw, counted.astype(jnp.int32))
    return tuple(pad_to(r, 0, n_pad, -1 if i == 0 else 0) for i, r in enumerate(rows))


def _ce_padded(spec: Spec, x, labels, weight):
    """Labels and weights padded to whole blocks; the logits are *not* copied: the kernels
    read ``x [N, C]`` as is (masked loads on GPUs, partial edge blocks on TPUs), since a
    padded copy would double the memory traffic of this memory-bound loss."""
    n, c = x.shape
    np_, _, cp = spec.config.padded(n, 0, c)
    return x, pad_to(labels.astype(jnp.int32), 0, np_, -1), pad_to(weight, 0, cp), np_


def _ce_fwd(spec: Spec, x, labels, row_w, counted, weight):
    n = x.shape[0]
    xp, yp, wp, _ = _ce_padded(spec, x, labels, weight)
    st = jax.tree.map(lambda a: a[:n], first_order(spec.launch.ce_fwd, spec, xp, yp, wp))
    loss, rs = _finish(spec, st, labels, row_w, counted, weight)
    return loss, (x, labels, row_w, counted, weight, rs)


def _ce_bwd(spec: Spec, res, g):
    x, labels, row_w, counted, weight, rs = res
    n, c = x.shape
    xp, _, wp, np_ = _ce_padded(spec, x, labels, weight)
    rows = _coef_rows(spec, g, rs, labels, row_w, counted, weight, np_)
    dx = first_order(spec.launch.ce_bwd, spec, xp, rows, wp)
    return (B.psum_to_type(dx.astype(x.dtype), x), None, jnp.zeros_like(row_w), None,
            None if weight is None else jnp.zeros_like(weight))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce(spec: Spec, x, labels, row_w, counted, weight):
    return _ce_fwd(spec, x, labels, row_w, counted, weight)[0]


_ce.defvjp(_ce_fwd, _ce_bwd)


def ce_rows(launch: Launchers, x, labels, row_w, counted, weight, *, opts: Options, config,
            interpret: bool):
    """Per-row plain cross-entropy of logits ``x [N, C]`` on one backend."""
    spec = Spec(launch, opts, x.shape[1], config, interpret)
    return _ce(spec, x, labels, row_w, counted, weight)


# ------------------------------------------------------------ one program, both devices
