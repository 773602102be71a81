r"""Fused linear + cross-entropy: ``cross_entropy(hidden @ kernel + bias, labels)`` in blocks.

The ``[tokens, vocab]`` logits are never materialized. Two schedules share the per-block
math below (kept as small functions so that a vocabulary-parallel version can reuse them):

* **vocabulary blocks** (any dtype, any reduction): the forward walks the vocabulary in blocks
  of ``block_size`` columns keeping, per token, an online max ``m`` and sum ``s`` of
  ``exp(z - m)`` (plus the label's logit and, for label smoothing, the weighted logit sum);
  the backward recomputes each block's logits from ``lse = m + log s`` and writes
  ``d hidden += dz @ W_b^T`` (float32 carry), ``d W_b = hidden^T @ dz`` (one matmul
  accumulating in float32, written straight into the output) and ``d bias_b``. Extra memory
  ``O(N * block_size)``; four matmuls in all.
* **token blocks** (float32/float64 with ``reduction="mean"`` or ``"sum"``, under
  differentiation): each block of ``token_block_size`` tokens computes its full logits row,
  the loss *and* its gradient in the forward pass (Liger-Kernel style), so the backward only
  scales by the incoming cotangent: three matmuls instead of four. ``d kernel`` is
  accumulated in place, in vocabulary slices, in the (float32) gradient buffer itself.
  Extra memory ``O(token_block_size * V)``.

Per token, with ``x = hidden @ kernel + bias`` accumulated in float32,
``z = cap * tanh((x / T) / cap)`` and ``lse = logsumexp(z)``, the loss and its gradient are
those of :func:`jaxent.cross_entropy` (see :mod:`jaxent._core`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxent import _checks, _core

LAYOUTS = ("dv", "vd")
IMPLS = ("auto", "vocab", "token")

# The unit of the automatic sizes (8M float32 elements, 32 MB): see auto_block_sizes.
_BLOCK_ELEMS = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static configuration (hashable; a ``nondiff_argnums`` argument)."""

    opts: _core.Options
    num_classes: int
    layout: str
    block_v: int  # vocabulary block of the vocabulary schedule
    block_n: int  # token block of the token schedule
    block_dw: int  # vocabulary slice of the token schedule's kernel-gradient update
    aux: bool


# ---------------------------------------------------------------------------- block math


# XLA:CPU has no bfloat16 dynamic-slice / dynamic-update-slice: it runs them in float32 and
# hoists the convert of a loop-invariant operand out of the loop, i.e. a full float32 copy of
# the kernel; a bfloat16 carry updated in place costs a full pass per block. So bf16 blocks
# are moved as uint16 bits: slices read through an optimization barrier (which keeps the
# bitcast fused at block size), updates go into a uint16 carry.
def _bits_dtype(dtype):
    return jnp.uint16 if jnp.dtype(dtype) == jnp.bfloat16 else None


def dslice(x: jax.Array, start, size: int, axis: int) -> jax.Array:
    """``lax.dynamic_slice_in_dim`` that never copies a bf16 operand as a whole."""
    bits = _bits_dtype(x.dtype)
    if bits is None:
        return lax.dynamic_slice_in_dim(x, start, size, axis=axis)
    x, start = lax.optimization_barrier((x, start))
    out = lax.dynamic_slice_in_dim(lax.bitcast_convert_type(x, bits), start, size, axis=axis)
    return lax.bitcast_convert_type(out, x.dtype)


def carry_zeros(shape, dtype) -> jax.Array:
    """A zero buffer for :func:`dupdate` (uint16 bits for bf16)."""
    return jnp.zeros(shape, _bits_dtype(dtype) or dtype)


def dupdate(buf: jax.Array, upd: jax.Array, start, axis: int, dtype) -> jax.Array:
    """Write ``upd`` (cast to ``dtype``) into a :func:`carry_zeros` buffer in place."""
    upd = upd.astype(dtype)
    if _bits_dtype(dtype) is not None:
        upd = lax.bitcast_convert_type(upd, buf.dtype)
    return lax.dynamic_update_slice_in_dim(buf, upd, start, axis=axis)


def carry_value(buf: jax.Array, dtype) -> jax.Array:
    """The ``dtype`` array held by a :func:`carry_zeros` buffer."""
    return buf if buf.dtype == dtype else lax.bitcast_convert_type(buf, dtype)


def kernel_block(kernel: jax.Array, start, size: int, layout: str) -> jax.Array:
    """Columns ``[start, start + size)`` of the vocabulary: ``[D, size]`` or ``[size, D]``."""
    return dslice(kernel, start, size, axis=1 if layout == "dv" else 0)


def vocab_slice(v: jax.Array | None, start, size: int) -> jax.Array | None:
    """``v[..., start:start + size]`` along the last axis (``None`` stays ``None``)."""
    if v is None:
        return None
    return dslice(v, start, size, axis=v.ndim - 1)


def block_logits(
    h: jax.Array, kb: jax.Array, bb: jax.Array | None, layout: str
) -> jax.Array:
    """Raw logits ``h @ kb (+ bb)`` of one block, accumulated in float32: ``[N, B]``."""
    acc = _core.compute_dtype(h.dtype)
    dims = (((1,), (0,)), ((), ())) if layout == "dv" else (((1,), (1,)), ((), ()))
    x = lax.dot_general(h, kb, dims, preferred_element_type=acc)
    if bb is not None:
        x = x + bb.astype(acc)[None, :]
    return x


def block_dhidden(dx: jax.Array, kb: jax.Array, layout: str) -> jax.Array:
    """``dx @ kb^T``: ``[N, B] x kernel block -> [N, D]`` in float32."""
    acc = _core.compute_dtype(kb.dtype)
    dims = (((1,), (1,)), ((), ())) if layout == "dv" else (((1,), (0,)), ((), ()))
    return lax.dot_general(dx.astype(kb.dtype), kb, dims, preferred_element_type=acc)


def _transposed(x: jax.Array) -> jax.Array:
    """``x.T`` as a row-major copy that XLA cannot fold back into a transposed dot operand
    (the flat reshape forces the copy; the barrier keeps it)."""
    return lax.optimization_barrier(x.T.reshape(-1)).reshape(x.shape[::-1])


def block_dkernel(h: jax.Array, dx: jax.Array, layout: str) -> jax.Array:
    """``h^T @ dx`` in the kernel's layout (``[D, B]`` or ``[B, D]``), float32 accumulation.

    For bf16, XLA:CPU multiplies without upcasting only ``A @ B`` and ``A @ B^T`` with
    row-major operands; ``h^T @ dx`` would run in float32 on a float32 copy of all of ``h``
    (~3x slower, and ``4 N D`` bytes). So the block-sized ``dx`` is transposed instead.
    """
    acc = _core.compute_dtype(h.dtype)
    dx = dx.astype(h.dtype)
    if _bits_dtype(h.dtype) is not None:
        out = lax.dot_general(_transposed(dx), h, (((1,), (0,)), ((), ())),
                              preferred_element_type=acc)
        # The barrier keeps XLA from folding this transpose into the dot (h^T @ dx again).
        return out if layout == "vd" else _transposed(lax.optimization_barrier(out))
    if layout == "dv":
        return lax.dot_general(h, dx, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return lax.dot_general(dx, h, (((0,), (0,)), ((), ())), preferred_element_type=acc)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; older: ``aval.vma``
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def varying_like(carry, *refs):
    """Mark a loop's initial ``carry`` as varying over the manual mesh axes ``refs`` vary over.

    Inside ``jax.shard_map`` (``check_vma=True``) a ``fori_loop`` needs its carry to have the
    same type in and out; zeros made here are replicated while the block updates computed
    from sharded operands are varying. Outside ``shard_map`` this returns ``carry`` as is.
    """
    axes = frozenset().union(*(_varying_axes(r) for r in jax.tree.leaves(refs)))
    if not axes:
        return carry

    def cast(a):
        missing = tuple(n for n in axes if n not in _varying_axes(a))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, carry)


def psum_to_type(ct: jax.Array | None, ref: jax.Array | None) -> jax.Array | None:
    """Sum a cotangent over the manual mesh axes it varies over but its primal ``ref`` does not.

    Inside ``jax.shard_map``, an input replicated over an axis (the kernel, over the
    data-parallel axis) gets a partial gradient on each device; a ``custom_vjp`` must return
    their sum (``psum``), typed like the input. A no-op outside ``shard_map``.
    """
    if ct is None or ref is None:
        return ct
    extra = tuple(n for n in _varying_axes(ct) if n not in _varying_axes(ref))
    return lax.psum(ct, extra) if extra else ct


def _safe_max(m: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(m), m, 0.0)


def init_stats(n: int, dtype, smoothing: bool, aux: bool) -> dict:
    """Online statistics per row before any block: ``m=-inf, s=0, ...``."""
    st = {
        "m": jnp.full((n,), -jnp.inf, dtype),
        "s": jnp.zeros((n,), dtype),
        "zy": jnp.zeros((n,), dtype),
    }
    if smoothing:
        st["wz"] = jnp.zeros((n,), dtype)  # sum_c w_c (z_c - m_safe) over seen classes
        st["wseen"] = jnp.zeros((), dtype)  # sum_c w_c over seen classes
    if aux:
        st["arg"] = jnp.zeros((n,), jnp.int32)
    return st


def update_stats(
    st: dict, z: jax.Array, y_local: jax.Array, wb: jax.Array | None, start
) -> dict:
    """Fold one block of transformed logits ``z [N, B]`` into the online statistics.

    ``y_local = labels - start`` (matches nothing when outside the block); ``wb`` the block's
    class weights (or None); ``start`` the block's first class id (for the argmax).
    """
    bm = jnp.max(z, axis=1)
    m_new = jnp.maximum(st["m"], bm)
    old_safe, new_safe = _safe_max(st["m"]), _safe_max(m_new)
    zs = z - new_safe[:, None]
    out = dict(st)
    out["m"] = m_new
    out["s"] = st["s"] * jnp.exp(old_safe - new_safe) + jnp.sum(jnp.exp(zs), axis=1)
    cols = lax.broadcasted_iota(y_local.dtype, z.shape, 1)
    out["zy"] = st["zy"] + jnp.sum(jnp.where(cols == y_local[:, None], z, 0.0), axis=1)
    if "wz" in st:
        wsum = jnp.asarray(z.shape[1], z.dtype) if wb is None else jnp.sum(wb).astype(z.dtype)
        shifted = jnp.sum(zs if wb is None else zs * wb[None, :].astype(z.dtype), axis=1)
        out["wz"] = st["wz"] - st["wseen"] * (new_safe - old_safe) + shifted
        out["wseen"] = st["wseen"] + wsum
    if "arg" in st:
        barg = jnp.argmax(z, axis=1).astype(jnp.int32) + start
        out["arg"] = jnp.where(bm > st["m"], barg, st["arg"])
    return out


def row_losses(
    m: jax.Array,
    log_s: jax.Array,
    zy: jax.Array,
    wz: jax.Array | None,
    labels: jax.Array,
    row_w: jax.Array,
    counted: jax.Array,
    weight: jax.Array | None,
    opts: _core.Options,
    num_classes: int,
) -> jax.Array:
    """Per-row loss from the statistics (``wz = sum_c w_c (z_c - m)``), as in the core."""
    eps = opts.label_smoothing
    loss = (1.0 - eps) * row_w * (log_s - (zy - m))
    if eps > 0.0:
        big_w = _core._class_sum(weight, num_classes, m.dtype)
        loss = loss + (eps / num_classes) * (big_w * log_s - wz)
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * jnp.square(m + log_s)
    valid = (labels >= 0) & (labels < num_classes)
    return jnp.where(counted, jnp.where(valid, loss, jnp.nan), 0.0)


def grad_coefs(
    g: jax.Array,
    lse: jax.Array,
    labels: jax.Array,
    row_w: jax.Array,
    counted: jax.Array,
    weight: jax.Array | None,
    opts: _core.Options,
    num_classes: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row coefficients ``(cp, cy, cw)`` of ``dz = cp p - cy [c = y] - cw w_c``."""
    eps = opts.label_smoothing
    valid = (labels >= 0) & (labels < num_classes)
    g = jnp.where(counted, jnp.where(valid, g, jnp.nan), 0.0).astype(lse.dtype)
    a = (1.0 - eps) * row_w + 2.0 * opts.z_loss * lse
    if eps > 0.0:
        a = a + (eps / num_classes) * _core._class_sum(weight, num_classes, lse.dtype)
    return g * a, g * (1.0 - eps) * row_w, g * (eps / num_classes)


def block_dlogits(
    z: jax.Array,
    lse: jax.Array,
    y_local: jax.Array,
    coefs: tuple[jax.Array, jax.Array, jax.Array],
    counted: jax.Array,
    wb: jax.Array | None,
    opts: _core.Options,
    e: jax.Array | None = None,
) -> jax.Array:
    """Gradient w.r.t. the raw logits of one block, given the global ``lse`` per row.

    When the block holds whole rows and ``e = exp(z - m)`` was already formed (for the sum),
    ``p = e exp(m - lse)`` reuses it: no second ``exp``, and the result can take ``e``'s
    buffer (pass ``lse - m`` as ``lse``).
    """
    cp, cy, cw = coefs
    cols = lax.broadcasted_iota(y_local.dtype, z.shape, 1)
    p = jnp.exp(z - lse[:, None]) if e is None else e * jnp.exp(-lse)[:, None]
    dz = p * cp[:, None]
    dz = dz - jnp.where(cols == y_local[:, None], cy[:, None], 0.0)
    if opts.label_smoothing > 0.0:
        dz = dz - cw[:, None] * (1.0 if wb is None else wb[None, :].astype(z.dtype))
    dz = jnp.where(counted[:, None], dz, 0.0)
    return _core.transform_vjp(dz, z, opts)


def _piece_start(i, size: int, total: int):
    """Start of piece ``i`` when an axis of ``total`` is walked in pieces of a static
    ``size``: ``i * size``, the last piece shifted back to end at ``total``."""
    return jnp.minimum(i * size, total - size)


def _drop_before(x: jax.Array, start, done, axis: int) -> jax.Array:
    """``x``, a piece that starts at ``start`` along ``axis``, with the entries before ``done``
    zeroed: the ones an earlier piece already counted."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    ids = start + lax.broadcasted_iota(jnp.int32, tuple(shape), axis)
    return jnp.where(ids >= done, x, 0.0)


def _blocks(total: int, size: int) -> tuple[int, int]:
    """(number of full blocks, size of the ragged tail)."""
    return total // size, total % size


# ------------------------------------------------------------------- vocabulary schedule


def _vocab_forward(plan: _Plan, h, kernel, bias, labels, weight):
    """Online statistics over vocabulary blocks: returns ``(m, log_s, zy, wz, argmax)``."""
    opts, v = plan.opts, plan.num_classes
    acc = _core.compute_dtype(h.dtype)
    smoothing = opts.label_smoothing > 0.0

    def step(start, size, st):
        kb = kernel_block(kernel, start, size, plan.layout)
        z = _core.transform(block_logits(h, kb, vocab_slice(bias, start, size), plan.layout), opts)
        return update_stats(st, z, labels - start, vocab_slice(weight, start, size), start)

    st = varying_like(init_stats(h.shape[0], acc, smoothing, plan.aux),
                      h, kernel, bias, labels, weight)
    nb, tail = _blocks(v, plan.block_v)
    if nb:
        st = lax.fori_loop(0, nb, lambda j, st: step(j * plan.block_v, plan.block_v, st), st)
    if tail:
        st = step(nb * plan.block_v, tail, st)
    m = _safe_max(st["m"])
    log_s = jnp.log(st["s"])
    return m, log_s, st["zy"], st.get("wz"), st.get("arg")


def _add_dhidden(dh: jax.Array, dx: jax.Array, kb: jax.Array, layout: str) -> jax.Array:
    """``dh + dx @ kb^T`` in row slices of at most 4M float32 elements (16 MB), so no
    ``[N, D]`` product is held next to ``dh``; the last slice is shifted up to end at ``N``,
    its repeated rows masked out."""
    n, d = dh.shape
    rows = max(1, _BLOCK_ELEMS // 2 // max(d, 1))
    if rows >= n:
        return dh + block_dhidden(dx, kb, layout)

    def add(i, dh):
        start = _piece_start(i, rows, n)
        piece = _drop_before(lax.dynamic_slice_in_dim(dx, start, rows, 0), start, i * rows, 0)
        cur = lax.dynamic_slice_in_dim(dh, start, rows, 0)
        return lax.dynamic_update_slice_in_dim(dh, cur + block_dhidden(piece, kb, layout),
                                               start, 0)

    return lax.fori_loop(0, -(-n // rows), add, dh)


def _stage_width(n: int, d: int, bv: int) -> int:
    """Columns of ``d kernel`` staged between writes into a bf16 gradient (a multiple of
    ``bv``): a ``[d, width]`` uint16 stage no bigger than one ``[n, bv]`` float32 block, so
    the temporaries stay linear in ``n`` and the block size."""
    return bv * max(1, (2 * n) // max(d, 1))


def _vocab_backward(plan: _Plan, h, kernel, bias, labels, counted, weight, lse, coefs):
    """Recompute each vocabulary block; return float32-accumulated ``(dh, dkernel, dbias)``.

    A bf16 ``d kernel`` is written in stages: XLA:CPU updates a bf16 buffer in place only by
    a pass over all of it, and a uint16 buffer of the kernel's size would be copied once more
    into the bf16 result (a kernel-sized temporary). So blocks go, as uint16 bits, into a
    small stage of :func:`_stage_width` columns, and each full stage is written into the bf16
    gradient with one such pass. Stages are whole blocks; the last one is shifted left to end
    at ``V``, and the columns it repeats count once in ``d hidden``.
    """
    opts, v, bv = plan.opts, plan.num_classes, plan.block_v
    acc = _core.compute_dtype(h.dtype)
    axis = 1 if plan.layout == "dv" else 0
    refs = (h, kernel, bias, labels, counted, weight, lse, coefs)

    def step(start, size, carry, done=0, at=None):
        """Add block ``[start, start + size)``: its ``d kernel`` goes to column ``at`` of
        ``dk`` (``start`` by default), its columns before ``done`` are left out of ``dh``."""
        dh, dk, db = carry
        kb = kernel_block(kernel, start, size, plan.layout)
        z = _core.transform(block_logits(h, kb, vocab_slice(bias, start, size), plan.layout),
                            opts)
        dx = block_dlogits(z, lse, labels - start, coefs, counted,
                           vocab_slice(weight, start, size), opts)
        dk = dupdate(dk, block_dkernel(h, dx, plan.layout), start if at is None else at, axis,
                     kernel.dtype)
        if db is not None:
            db = dupdate(db, jnp.sum(dx, axis=0), start, 0, bias.dtype)
        fresh = dx if at is None else _drop_before(dx, start, done, 1)
        return _add_dhidden(dh, fresh, kb, plan.layout), dk, db

    dh = varying_like(jnp.zeros(h.shape, acc), *refs)
    db = None if bias is None else varying_like(carry_zeros(bias.shape, bias.dtype), *refs)
    width = _stage_width(h.shape[0], h.shape[1], bv)
    if _bits_dtype(kernel.dtype) is None or width >= v:
        carry = (dh, varying_like(carry_zeros(kernel.shape, kernel.dtype), *refs), db)
        nb, tail = _blocks(v, bv)
        if nb:
            carry = lax.fori_loop(0, nb, lambda j, c: step(j * bv, bv, c), carry)
        if tail:
            carry = step(nb * bv, tail, carry)
        dh, dk, db = carry
        dk = carry_value(dk, kernel.dtype)
    else:
        stage_shape = list(kernel.shape)
        stage_shape[axis] = width

        def stage(c, carry):
            dh, dk, db = carry
            first = _piece_start(c, width, v)
            stage0 = varying_like(carry_zeros(stage_shape, kernel.dtype), *refs)
            dh, st, db = lax.fori_loop(
                0, width // bv,
                lambda j, c2: step(first + j * bv, bv, c2, done=c * width, at=j * bv),
                (dh, stage0, db))
            bits = lax.bitcast_convert_type(dk, st.dtype)
            bits = lax.dynamic_update_slice_in_dim(bits, st, first, axis=axis)
            return dh, lax.bitcast_convert_type(bits, kernel.dtype), db

        dk = varying_like(jnp.zeros(kernel.shape, kernel.dtype), *refs)
        dh, dk, db = lax.fori_loop(0, -(-v // width), stage, (dh, dk, db))
    return dh, dk, None if db is None else carry_value(db, bias.dtype)


def _rows_fwd(plan: _Plan, h, kernel, bias, labels, row_w, counted, weight):
    m, log_s, zy, wz, arg = _vocab_forward(plan, h, kernel, bias, labels, weight)
    loss = row_losses(m, log_s, zy, wz, labels, row_w, counted, weight, plan.opts,
                      plan.num_classes)
    lse = m + log_s
    out = (loss, (lse, arg))
    return out, (h, kernel, bias, labels, row_w, counted, weight, lse)


def _rows_bwd(plan: _Plan, res, cts):
    h, kernel, bias, labels, row_w, counted, weight, lse = res
    g = cts[0]
    coefs = grad_coefs(g, lse, labels, row_w, counted, weight, plan.opts, plan.num_classes)
    dh, dk, db = _vocab_backward(plan, h, kernel, bias, labels, counted, weight, lse, coefs)
    return (
        psum_to_type(dh.astype(h.dtype), h),
        psum_to_type(dk, kernel),
        psum_to_type(db, bias),
        None,
        jnp.zeros_like(row_w),
        None,
        None if weight is None else jnp.zeros_like(weight),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows(plan: _Plan, h, kernel, bias, labels, row_w, counted, weight):
    """Per-token losses ``[N]`` and ``(lse [N], argmax [N] or None)``; vocabulary schedule."""
    return _rows_fwd(plan, h, kernel, bias, labels, row_w, counted, weight)[0]


_rows.defvjp(_rows_fwd, _rows_bwd)


# ------------------------------------------------------------------------ token schedule


def _token_step(plan: _Plan, hb, kernel, bias, yb, row_wb, countedb, weight):
    """One token block, full vocabulary: loss sum, ``dx [Nb, V]``, lse, argmax."""
    opts, v = plan.opts, plan.num_classes
    x = block_logits(hb, kernel, bias, plan.layout)
    z = _core.transform(x, opts)
    safe = jnp.clip(yb, 0, v - 1)
    zy = jnp.take_along_axis(z, safe[:, None], axis=1)[:, 0]
    arg = jnp.argmax(z, axis=1).astype(jnp.int32) if plan.aux else None
    # max(m, z_y) == m; it orders the pick before exp(z - m) may overwrite z in place.
    m = jnp.maximum(_safe_max(_core.row_max(z)), zy)
    wz = None
    if opts.label_smoothing > 0.0:
        zs = z - m[:, None]
        wz = _core.row_sum(zs if weight is None else zs * weight[None, :].astype(z.dtype))
    e = jnp.exp(z - m[:, None])
    log_s = jnp.log(_core.row_sum(e))
    loss = row_losses(m, log_s, zy, wz, yb, row_wb, countedb, weight, opts, v)
    lse = m + log_s
    coefs = grad_coefs(jnp.ones_like(lse), lse, yb, row_wb, countedb, weight, opts, v)
    # One exp per logit: p = e / s, written over e (one [Nb, V] buffer, not two).
    dx = block_dlogits(z, log_s, yb, coefs, countedb, weight, opts, e=e)
    return jnp.sum(loss), dx, lse, arg


def _accumulate_dkernel(plan: _Plan, dk, hb, dx):
    """``dk += hb^T @ dx`` in vocabulary slices, in place (no full-size temporary).

    Every slice is ``block_dw`` wide, the last one shifted left to end at ``V`` with the
    columns already done masked out: a separate ragged tail step would read ``dx`` outside
    the loop, and XLA would re-derive that slice from ``exp(z - m)``, keeping that buffer
    alive next to ``dx`` (two ``[Nb, V]`` buffers instead of one).
    """
    v, bv = plan.num_classes, plan.block_dw
    axis = 1 if plan.layout == "dv" else 0

    def add(j, dk):
        start = _piece_start(j, bv, v)
        piece = _drop_before(vocab_slice(dx, start, bv), start, j * bv, 1)
        upd = block_dkernel(hb, piece, plan.layout)
        cur = lax.dynamic_slice_in_dim(dk, start, bv, axis=axis)
        return lax.dynamic_update_slice_in_dim(dk, cur + upd.astype(dk.dtype), start, axis=axis)

    return lax.fori_loop(0, -(-v // bv), add, dk)


def _token_fwd(plan: _Plan, h, kernel, bias, labels, row_w, counted, weight):
    """Loss sum and its gradient (for a unit cotangent), walking token blocks."""
    n = h.shape[0]
    acc = _core.compute_dtype(h.dtype)

    def step(start, size, carry):
        total, dh, dk, db, lse, arg = carry
        sl = lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=0)  # noqa: E731
        hb = sl(h)
        tot_b, dx, lse_b, arg_b = _token_step(
            plan, hb, kernel, bias, sl(labels), sl(row_w), sl(counted), weight)
        dh = lax.dynamic_update_slice_in_dim(
            dh, block_dhidden(dx, kernel, plan.layout).astype(dh.dtype), start, axis=0)
        dk = _accumulate_dkernel(plan, dk, hb, dx)
        if db is not None:
            db = db + jnp.sum(dx, axis=0).astype(db.dtype)
        lse = lax.dynamic_update_slice_in_dim(lse, lse_b, start, axis=0)
        if arg is not None:
            arg = lax.dynamic_update_slice_in_dim(arg, arg_b, start, axis=0)
        return total + tot_b, dh, dk, db, lse, arg

    carry = (
        jnp.zeros((), acc),
        jnp.zeros(h.shape, h.dtype),
        jnp.zeros(kernel.shape, acc),
        None if bias is None else jnp.zeros(bias.shape, acc),
        jnp.zeros((n,), acc),
        jnp.zeros((n,), jnp.int32) if plan.aux else None,
    )
    carry = varying_like(carry, h, kernel, bias, labels, row_w, counted, weight)
    nb, tail = _blocks(n, plan.block_n)
    if nb:
        carry = lax.fori_loop(
            0, nb, lambda i, c: step(i * plan.block_n, plan.block_n, c), carry)
    if tail:
        carry = step(nb * plan.block_n, tail, carry)
    total, dh, dk, db, lse, arg = carry
    # Zero-size slices carry the inputs' types (for psum_to_type inside shard_map).
    types = (h[:0], kernel[:0], None if bias is None else bias[:0])
    return (total, (lse, arg)), (dh, dk, db, row_w, weight, types)


def _token_primal(plan: _Plan, h, kernel, bias, labels, row_w, counted, weight):
    loss, (lse, arg) = _rows_fwd(plan, h, kernel, bias, labels, row_w, counted, weight)[0]
    return loss.sum(), (lse, arg)


def _token_bwd(plan: _Plan, res, cts):
    dh, dk, db, row_w, weight, (h_t, k_t, b_t) = res
    g = cts[0]
    scale = lambda a: None if a is None else a * g.astype(a.dtype)  # noqa: E731
    return (
        psum_to_type(scale(dh), h_t),
        psum_to_type(scale(dk), k_t),
        psum_to_type(scale(db), b_t),
        None,
        jnp.zeros_like(row_w),
        None,
        None if weight is None else jnp.zeros_like(weight),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_sum(plan: _Plan, h, kernel, bias, labels, row_w, counted, weight):
    """Sum of per-token losses and ``(lse, argmax)``; the gradient is made in the forward."""
    return _token_primal(plan, h, kernel, bias, labels, row_w, counted, weight)


_token_sum.defvjp(_token_fwd, _token_bwd)


# ----------------------------------------------------------------------------- front end


def aux_dict(lse, arg, labels, counted, z_loss: float, batch_shape, total=None) -> dict:
    """``return_aux``'s dict from flat ``[N]`` rows: ``lse``, ``z_loss`` and ``argmax`` shaped
    ``batch_shape`` (no gradient), and the accuracy over counted rows. ``total`` sums the
    accuracy's two counts over the token shards (a ``psum``; None on one device)."""
    total = total or (lambda c: c)
    lse = lax.stop_gradient(lse)
    hits = total(jnp.sum(counted & (arg == labels)))
    return {
        "lse": lse.reshape(batch_shape),
        "z_loss": jnp.where(counted, z_loss * jnp.square(lse), 0.0).reshape(batch_shape),
        "argmax": arg.reshape(batch_shape),
        "accuracy": hits / jnp.maximum(total(jnp.sum(counted)), 1),
    }


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def auto_block_sizes(n: int, d: int, v: int) -> tuple[int, int, int]:
    """Default ``(block_size, token_block_size, dkernel_block)`` for ``n`` tokens, width
    ``d``, vocabulary ``v``.

    Blocked temporaries aim at about 4M float32 elements (16 MB) for ``[n, block_size]``
    logits in the vocabulary schedule, 16M (64 MB) for the token schedule's
    ``[token_block_size, v]`` block (its one ``[Nb, V]`` buffer) and 2M (8 MB) for its
    ``[d, dkernel_block]`` kernel-gradient slices. At ``V = 128256`` that is 128 tokens:
    1.8% of the materialized path's temporaries at ``N = 8192, D = 2048`` (256 tokens,
    3.4%, ran 1.07x naive at ``N = 2048`` against 1.21x; ``benchmarks/linear_notes.md``).
    Token blocks are capped at 512: the kernel-gradient matmul contracts over the block's
    tokens, and at ``V = 32000`` 512 tokens ran 1.03x naive against 1.13x for 256 and 1.08x
    for 1024.
    """
    bv = min(v, max(256, _pow2_floor(_BLOCK_ELEMS / 2 / max(n, 1))))
    bn = min(max(n, 1), 512, max(16, _pow2_floor(2 * _BLOCK_ELEMS / v)))
    bw = min(v, max(256, _pow2_floor(_BLOCK_ELEMS / 4 / max(d, 1))))
    return bv, bn, bw


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive Python int or None, got {value!r}")
    return value


def linear_cross_entropy(
    hidden: ArrayLike,
    kernel: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    kernel_layout: str = "dv",
    block_size: int | None = None,
    token_block_size: int | None = None,
    impl: str = "auto",
    return_aux: bool = False,
):
    r"""``cross_entropy(hidden @ kernel + bias, labels)`` without materializing the logits.

    With :math:`x = h W + b` accumulated in float32,
    :math:`z = \mathrm{cap}\,\tanh(x / (T\,\mathrm{cap}))` (the cap optional) and
    :math:`\ell = \log\sum_c e^{z_c}` over the :math:`V` classes, each counted token
    contributes

    .. math::
        (1-\epsilon)\, w_y (\ell - z_y) + \frac{\epsilon}{V} \sum_c w_c (\ell - z_c)
        + \lambda_z \ell^2 ,

    exactly :func:`jaxent.cross_entropy` on the product. The vocabulary (and, for
    float32 ``"mean"``/``"sum"`` under differentiation, the tokens) is walked in blocks
    with a hand-written ``jax.custom_vjp``: extra memory is ``O(N * block_size)`` (or
    ``O(token_block_size * V)``), never ``O(N * V)``.

    **Sharded inputs.** When the inputs' types carry shardings over a mesh with explicit axes
    (``jax.make_mesh``'s default, ``AxisType.Explicit``), the loss splits as they say, under
    plain ``jax.jit`` or eagerly: a kernel sharded along its vocabulary axis dispatches to
    the vocabulary-parallel walk of :func:`jaxent.sharded.linear_cross_entropy` in a
    ``jax.shard_map`` (tokens split over the mesh axes of ``hidden``'s leading axes; ``[N]``
    row statistics and ``d hidden`` are all-reduced, no ``[N, V]`` array or whole kernel
    is gathered); a kernel not sharded along the vocabulary runs this function on each
    device's tokens. Values and gradients are the single-device ones. On meshes with
    ``AxisType.Auto`` axes (``Mesh(devices, names)``, or ``jax.make_mesh(...,
    axis_types=(AxisType.Auto, ...))``) the placement of traced values is only known when
    compiling: with more than one device the per-token work is a
    ``jax.experimental.custom_partitioning`` call that the partitioner splits the same way
    once it knows the shardings (vocabulary-parallel over the kernel's vocabulary axis,
    token-parallel over ``hidden``'s first axis; no ``[N, V]`` logits or whole kernel
    gathered). Axes that do not divide ``V`` or ``N``, a kernel sharded along ``D`` or
    shardings without a mesh are gathered first; under ``jax.vmap`` the single-device walk
    runs (and is partitioned by XLA as it sees fit).

    Args:
      hidden: float ``[..., D]`` (e.g. ``[batch, seq, D]``); bf16/f16 accumulate in float32.
      kernel: float ``[D, V]`` (Flax ``nnx.Linear``/``Dense``, ``kernel_layout="dv"``) or
        ``[V, D]`` (a tied ``nnx.Embed`` table, ``kernel_layout="vd"``).
      labels: integer ``[...]``, ``hidden.shape[:-1]``.
      bias: optional float ``[V]``.
      weight: optional per-class weights ``[V]`` (constants, no gradient).
      ignore_index: label value that counts for nothing.
      label_smoothing: in ``[0, 1]``, PyTorch's definition over all ``V`` classes.
      reduction: ``"mean"`` (divides by the summed weights of counted labels), ``"sum"`` or
        ``"none"`` (shape of ``labels``).
      where: optional boolean mask shaped like ``labels``.
      z_loss: coefficient of ``logsumexp(z)**2`` per counted token.
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)``.
      temperature: logits are divided by it first.
      kernel_layout: ``"dv"`` for ``[D, V]`` kernels, ``"vd"`` for ``[V, D]`` tables.
      block_size: vocabulary columns per block (default: from the shapes, about 16 MB of
        float32 temporaries per block); also the slice width of the token schedule's
        kernel-gradient update. Per device when split over devices (above).
      token_block_size: tokens per block of the token schedule (default: from the shapes).
      impl: ``"auto"``, ``"vocab"`` (vocabulary blocks, recompute in the backward) or
        ``"token"`` (gradient made in the forward; float32/float64 and ``"mean"``/``"sum"``
        only, otherwise falls back to ``"vocab"``). The vocabulary-parallel split (above)
        always walks vocabulary blocks (on Auto meshes ``"token"`` then makes the gradient
        in the forward from a vocabulary walk).
      return_aux: also return a dict of per-token extras computed in the same pass, shaped
        like ``labels`` and carrying no gradient: ``"lse"`` (log-sum-exp of ``z``),
        ``"z_loss"`` (``z_loss * lse**2``, 0 where not counted), ``"argmax"`` (predicted
        class, int32) and the scalar ``"accuracy"`` over counted tokens.

    Returns:
      float32 (float64 for float64 inputs) scalar, or ``labels.shape`` for ``"none"``;
      with ``return_aux=True`` a pair ``(loss, aux)``. Gradients w.r.t. ``hidden``,
      ``kernel`` and ``bias`` come back in their dtypes. Labels outside ``[0, V)`` raise
      ``ValueError`` when concrete; under ``jit`` their losses are ``nan``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 8))     # [batch, seq, D]
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4   # [D, V]
      >>> y = jnp.array([[1, 7, 49], [0, -100, 3]])
      >>> loss = jaxent.linear_cross_entropy(h, w, y, block_size=16)
      >>> ref = jaxent.cross_entropy(h @ w, y)
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True
      >>> dh, dw = jax.grad(jaxent.linear_cross_entropy, argnums=(0, 1))(h, w, y)
      >>> dh.shape, dw.shape
      ((2, 3, 8), (8, 50))

      A Flax NNX language-model head with tied embeddings (the table is ``[V, D]``)::

        class LM(nnx.Module):
            def __init__(self, vocab, dim, *, rngs):
                self.embed = nnx.Embed(vocab, dim, rngs=rngs)
                ...

            def loss(self, tokens, labels):
                h = self.body(self.embed(tokens))                  # [B, T, D]
                return jaxent.linear_cross_entropy(
                    h, self.embed.embedding.value, labels, kernel_layout="vd",
                    z_loss=1e-4)

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024),
      https://arxiv.org/abs/2411.09009;
      Hsu et al., "Liger Kernel" (2024), https://arxiv.org/abs/2410.10989.
    """
    h = _checks.float_array(hidden, "hidden")
    k = _checks.float_array(kernel, "kernel")
    if kernel_layout not in LAYOUTS:
        raise ValueError(f"`kernel_layout` must be one of {LAYOUTS}, got {kernel_layout!r}")
    if impl not in IMPLS:
        raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}")
    if h.ndim < 1:
        raise ValueError("`hidden` must have shape [..., D] (at least one dimension), "
                         "got a scalar")
    if k.ndim != 2:
        raise ValueError(
            f"`kernel` must be 2-D, [D, V] for kernel_layout='dv' or [V, D] for 'vd', got "
            f"shape {tuple(k.shape)}")
    d = h.shape[-1]
    kd, v = (k.shape[0], k.shape[1]) if kernel_layout == "dv" else (k.shape[1], k.shape[0])
    if kd != d:
        other = "vd" if kernel_layout == "dv" else "dv"
        swapped = k.shape[1] if kernel_layout == "dv" else k.shape[0]
        hint = f"; it looks transposed, pass kernel_layout={other!r}" if swapped == d else ""
        raise ValueError(
            f"`kernel` must have shape {'[D, V]' if kernel_layout == 'dv' else '[V, D]'} "
            f"with D = hidden.shape[-1] = {d} (kernel_layout={kernel_layout!r}), got shape "
            f"{tuple(k.shape)}{hint}")
    b = None
    if bias is not None:
        b = _checks.float_array(bias, "bias")
        if b.shape != (v,):
            raise ValueError(
                f"`bias` must have shape ({v},) (one per class, V from `kernel`), got shape "
                f"{tuple(b.shape)}")
    eps, zl, temp, cap = _checks.options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temperature, logit_softcap=logit_softcap,
    )
    batch_shape = h.shape[:-1]
    y = _checks.int_labels(labels, batch_shape)
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, v)
    _checks.label_values(y, v, ignore_index, mask)

    from jaxent import sharded  # here: jaxent.sharded builds on this module

    layout = sharded.explicit_layout(h, k, b, y, w, mask, kernel_layout)
    if layout is not None:
        return sharded.linear_on_explicit_mesh(
            h, k, y, b, w, mask, layout, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
            logit_softcap=logit_softcap, temperature=temperature, kernel_layout=kernel_layout,
            block_size=block_size, token_block_size=token_block_size, impl=impl,
            return_aux=return_aux)

    n = math.prod(batch_shape)
    dtype = jnp.result_type(h.dtype, k.dtype)
    acc = _core.compute_dtype(dtype)
    use_token = impl == "token" or (impl == "auto" and n > 0)
    use_token = use_token and reduction != "none" and acc == dtype
    bv, bn, bw = auto_block_sizes(n, d, v)
    if block_size is not None:
        bv = bw = min(_positive_int(block_size, "block_size"), v)
    if token_block_size is not None:
        bn = min(_positive_int(token_block_size, "token_block_size"), max(n, 1))

    h2 = h.reshape(n, d).astype(dtype)
    k = k.astype(dtype)
    b = None if b is None else b.astype(dtype)
    y, counted, row_w = _core.counted_rows(y, mask, w, ignore_index, acc)
    wc = None if w is None else w.astype(acc)

    plan = _Plan(_core.Options(eps, zl, temp, cap), v, kernel_layout, bv, bn, bw, return_aux)
    rows, token_sum = functools.partial(_rows, plan), functools.partial(_token_sum, plan)
    if sharded.auto_partitioning():  # split when compiled, as the operands are sharded then
        ap = sharded.AutoPlan(plan, block_size is None, token_block_size is None,
                              b is not None, wc is not None)
        rows = functools.partial(sharded.auto_rows, ap)
        token_sum = functools.partial(sharded.auto_token_sum, ap)
    if use_token:
        total, (lse, arg) = token_sum(h2, k, b, y, row_w, counted, wc)
        loss = _core.reduce(total, row_w.sum(), reduction)
    else:
        losses, (lse, arg) = rows(h2, k, b, y, row_w, counted, wc)
        loss = _core.reduce(losses.reshape(batch_shape), row_w.sum(), reduction)
    if not return_aux:
        return loss
    return loss, aux_dict(lse, arg, y, counted, zl, batch_shape)
