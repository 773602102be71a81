"""The fused vocabulary walk: any dtype, any reduction, vocabulary-parallel when asked.

The forward walks the vocabulary in blocks of ``block_v`` columns, folding each block of
``h @ W_b + b_b`` into the online row statistics (:func:`jaxent._rowmath.update_stats`);
on a vocabulary shard they are then merged over the mesh axis
(:func:`jaxent._rowmath.merge_stats`: one ``pmax`` and a ``psum`` of ``[N]`` vectors). The
backward recomputes each block's logits, forms its gradient from the kept ``m`` and
``log s`` and writes ``d hidden += dz @ W_b^T`` (float32), ``d W_b = h^T @ dz`` and
``d b_b``; a vocabulary shard sums ``d hidden`` over the axis. Extra memory
``O(N * block_v)``; four matmuls in all.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _platform
from jaxent import _rowmath as rm
from jaxent._platform import Quirks
from jaxent.impl import _blocks as B
from jaxent.impl.plan import Plan


def shard_offset(plan: Plan) -> jax.Array | int:
    """First global class id of this device's columns (0 unless vocabulary-parallel)."""
    if plan.vocab_axis is None:
        return 0
    return lax.axis_index(plan.vocab_axis).astype(jnp.int32) * plan.local_classes


def local_weight(weight, plan: Plan):
    """This device's slice of the full ``[V]`` class weights (or None); padding columns
    weigh 0."""
    if weight is None or (plan.vocab_axis is None and not plan.padded):
        return weight
    shards = plan.local_classes if plan.vocab_axis is None else (
        plan.local_classes * lax.axis_size(plan.vocab_axis))
    if shards != weight.shape[0]:
        weight = jnp.pad(weight, (0, shards - weight.shape[0]))
    return lax.dynamic_slice_in_dim(weight, shard_offset(plan), plan.local_classes)


def valid_columns(plan: Plan, start, size: int):
    """``[1, size]``: which of this device's columns ``[start, start + size)`` are classes
    (None when nothing is padding)."""
    if not plan.padded:
        return None
    ids = shard_offset(plan) + start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    return ids < plan.num_classes


def block(plan: Plan, q: Quirks, h, kernel, bias, w_local, start, size: int,
          masked: bool = False):
    """``(kernel block, raw logits [N, size], class weights, valid)`` of columns ``[start,
    start + size)``. With ``masked`` (and ``plan.padded``), ``valid [1, size]`` marks the
    columns that are classes and the others' logits are masked by a
    :func:`jaxent._rowmath.padding_bias`, added like a bias; else ``valid`` is None."""
    kb = B.kernel_block(kernel, start, size, plan.layout, q)
    bb = B.vocab_slice(bias, start, size, q)
    valid = valid_columns(plan, start, size) if masked else None
    if valid is not None:
        pad = rm.padding_bias(valid[0], rm.compute_dtype(h.dtype))
        bb = pad if bb is None else bb.astype(pad.dtype) + pad
    x = B.block_logits(h, kb, bb, plan.layout)
    return kb, x, B.vocab_slice(w_local, start, size, q), valid


def walk(plan: Plan, step, carry):
    """``carry`` through ``step(start, size, masked, carry)`` over this device's columns in
    blocks of ``block_v``.

    Padding sits at the end of the vocabulary, so on any device only its last
    ``plan.padding`` columns can be padding: they are walked in blocks of their own, the
    only ones with ``masked`` (on XLA:CPU a masked block costs a second ``[N, size]``
    buffer: each row reduction takes the masked logits materialized).
    """
    v, bv = plan.local_classes, plan.block_v
    pad = min(plan.padding, v)
    for first, width, masked in ((0, v - pad, False), (v - pad, pad, True)):
        nb, tail = B.blocks(width, bv)
        if nb:
            carry = lax.fori_loop(
                0, nb, lambda j, c, first=first, masked=masked: step(
                    first + j * bv, bv, masked, c), carry)
        if tail:
            carry = step(first + nb * bv, tail, masked, carry)
    return carry


def forward_stats(plan: Plan, q: Quirks, h, kernel, bias, y_local, w_local,
                  temp=None) -> rm.Stats:
    """Online statistics of this device's classes, walked in blocks of ``block_v``
    (``temp [N]``: per-row temperatures, or None)."""
    opts = rm.row_options(plan.opts, temp)

    def step(start, size, masked, st):
        _, x, wb, valid = block(plan, q, h, kernel, bias, w_local, start, size, masked)
        return rm.update_stats(st, x, y_local - start, wb, start, opts, valid=valid)

    acc = rm.compute_dtype(h.dtype)
    st = rm.init_stats(h.shape[0], acc, plan.opts.smoothing, plan.aux)
    st = B.varying_like(st, h, kernel, bias, y_local, w_local, temp)
    return walk(plan, step, st)


def _stage_width(n: int, d: int, bv: int) -> int:
    """Columns of ``d kernel`` staged between writes into a bf16 gradient (a multiple of
    ``bv``): a ``[d, width]`` uint16 stage no bigger than one ``[n, bv]`` float32 block."""
    return bv * max(1, (2 * _platform.static_size(n)) // max(d, 1))


def backward(plan: Plan, q: Quirks, h, kernel, bias, y_local, counted, w_local, m, log_s,
             coefs, temp=None):
    """Recompute each block; return ``(dh float32, dkernel, dbias)``.

    With ``q.bf16_bits`` a bf16 ``d kernel`` is written in stages: blocks go, as uint16
    bits, into a small stage of :func:`_stage_width` columns, and each full stage is written
    into the bf16 gradient with one pass. Stages are whole blocks; the last one is shifted
    left to end at ``V``, and the columns it repeats count once in ``d hidden``.
    """
    opts, v, bv = rm.row_options(plan.opts, temp), plan.local_classes, plan.block_v
    acc = rm.compute_dtype(h.dtype)
    axis = B.vocab_axis(plan.layout)
    refs = (h, kernel, bias, y_local, counted, w_local, m, log_s, coefs, temp)
    slice_elems = _platform.heuristics().block_elems // 2

    def step(start, size, masked, carry, done=0, at=None):
        """Add block ``[start, start + size)``: its ``d kernel`` goes to column ``at`` of
        ``dk`` (``start`` by default), its columns before ``done`` are left out of ``dh``."""
        dh, dk, db = carry
        kb, x, wb, valid = block(plan, q, h, kernel, bias, w_local, start, size, masked)
        dx = rm.block_grad(x, m, log_s, y_local - start, coefs, wb, counted, opts)
        if valid is not None:
            dx = jnp.where(valid, dx, 0.0)
        dk = _platform.dupdate(dk, B.block_dkernel(h, dx, plan.layout, q),
                               start if at is None else at, axis, kernel.dtype, q)
        if db is not None:
            db = _platform.dupdate(db, jnp.sum(dx, axis=0), start, 0, bias.dtype, q)
        fresh = dx if at is None else B.drop_before(dx, start, done, 1)
        return B.add_dhidden(dh, fresh, kb, plan.layout, slice_elems), dk, db

    dh = B.varying_like(jnp.zeros(h.shape, acc), *refs)
    db = None if bias is None else B.varying_like(
        _platform.carry_zeros(bias.shape, bias.dtype, q), *refs)
    width = _stage_width(h.shape[0], h.shape[1], bv)
    if not _platform.stages_bf16(kernel.dtype, q) or width >= v:
        dk = B.varying_like(_platform.carry_zeros(kernel.shape, kernel.dtype, q), *refs)
        dh, dk, db = walk(plan, step, (dh, dk, db))
        dk = _platform.carry_value(dk, kernel.dtype)
    else:
        stage_shape = list(kernel.shape)
        stage_shape[axis] = width

        # Stages span the vocabulary in whole blocks: with padding, every block is masked.
        def stage(c, carry):
            dh, dk, db = carry
            first = B.piece_start(c, width, v)
            stage0 = B.varying_like(_platform.carry_zeros(stage_shape, kernel.dtype, q), *refs)
            dh, st, db = lax.fori_loop(
                0, width // bv,
                lambda j, c2: step(first + j * bv, bv, plan.padded, c2, done=c * width,
                                   at=j * bv),
                (dh, stage0, db))
            bits = lax.bitcast_convert_type(dk, st.dtype)
            bits = lax.dynamic_update_slice_in_dim(bits, st, first, axis=axis)
            return dh, lax.bitcast_convert_type(bits, kernel.dtype), db

        dk = B.varying_like(jnp.zeros(kernel.shape, kernel.dtype), *refs)
        dh, dk, db = lax.fori_loop(0, -(-v // width), stage, (dh, dk, db))
    return dh, dk, None if db is None else _platform.carry_value(db, bias.dtype)


def _stats(plan: Plan, q: Quirks, h, kernel, bias, lab: rm.Labels, weight):
    """``(losses, m, log_s, lse, argmax)`` over the whole vocabulary."""
    off = shard_offset(plan)
    st = forward_stats(plan, q, h, kernel, bias, lab.y - off, local_weight(weight, plan),
                       lab.temp)
    opts = lab.options(plan.opts)
    if plan.vocab_axis is not None:
        st = rm.merge_stats(st, plan.vocab_axis, off, opts)
    rs = rm.finish(st, opts)
    losses = rm.stats_losses(rs, lab, weight, plan.opts, plan.num_classes)
    return losses, rs.m, rs.log_s, rs.lse, rs.arg


def _grads(plan: Plan, q: Quirks, h, kernel, bias, lab, weight, m, log_s, lse, g):
    coefs = rm.stats_coefs(g, lse, lab, weight, plan.opts, plan.num_classes)
    return backward(plan, q, h, kernel, bias, lab.y - shard_offset(plan), lab.counted,
                    local_weight(weight, plan), m, log_s, coefs, lab.temp)


class Forward(NamedTuple):
    """What the forward walk gives: per-token ``losses``, ``lse`` and ``arg`` (argmax or
    None), and the row statistics ``m`` (raw max) and ``log_s`` its backward needs."""

    losses: jax.Array
    lse: jax.Array
    arg: jax.Array | None
    m: jax.Array
    log_s: jax.Array


def row_stats(plan: Plan, h, kernel, bias, lab: rm.Labels, weight) -> Forward:
    """The forward walk of :func:`rows` (no ``custom_vjp``: for placements that split it)."""
    losses, m, log_s, lse, arg = _platform.per_platform(
        functools.partial(_stats, plan), h, kernel, bias, lab, weight)
    return Forward(losses, lse, arg, m, log_s)


def row_grads(plan: Plan, h, kernel, bias, lab: rm.Labels, weight, m, log_s, lse, g):
    """``(d hidden, d kernel, d bias)`` of :func:`rows` for the per-token cotangent ``g``
    (the backward walk, summed over the vocabulary shards)."""
    dh, dk, db = _platform.per_platform(functools.partial(_grads, plan), h, kernel, bias,
                                        lab, weight, m, log_s, lse, g)
    if plan.vocab_axis is not None:  # each shard holds its classes' share of d hidden
        dh = lax.psum(dh, plan.vocab_axis)
    return (B.psum_to_type(dh.astype(h.dtype), h), B.psum_to_type(dk, kernel),
            B.psum_to_type(db, bias))


def _rows_fwd(plan: Plan, h, kernel, bias, lab, weight):
    f = row_stats(plan, h, kernel, bias, lab, weight)
    return (f.losses, (f.lse, f.arg)), (h, kernel, bias, lab, weight, f.m, f.log_s, f.lse)


def _rows_bwd(plan: Plan, res, cts):
    h, kernel, bias, lab, weight, m, log_s, lse = res
    dh, dk, db = row_grads(plan, h, kernel, bias, lab, weight, m, log_s, lse, cts[0])
    return dh, dk, db, None, None if weight is None else jnp.zeros_like(weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def rows(plan: Plan, h, kernel, bias, lab: rm.Labels, weight):
    """Per-token losses ``[N]`` and ``(lse [N], argmax [N] or None)`` of ``h [N, D] @
    kernel (+ bias)`` against :class:`~jaxent._rowmath.Labels`, walking vocabulary blocks.

    With ``plan.vocab_axis`` (inside ``jax.shard_map``) ``kernel`` and ``bias`` are this
    device's ``V / k`` columns, ``weight`` the full ``[V]``; the result is the full
    vocabulary's on every shard.
    """
    return _rows_fwd(plan, h, kernel, bias, lab, weight)[0]


rows.defvjp(_rows_fwd, _rows_bwd)
