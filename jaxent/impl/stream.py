"""The one streaming walk over any row statistic (:mod:`jaxent.impl.stats`).

A *stream* is a source of raw logits: materialized rows ``(x,)`` (``x [N, C]``) or a linear
head ``(h, kernel, bias)`` whose blocks are ``h @ W_b + b_b`` (never the whole ``[N, V]``).
:func:`run` folds the blocks of every stream into the statistic, in blocks of
``plan.block_v`` columns (the vocabulary walk of :func:`jaxent.impl.vocab.walk`: padding
columns masked, in blocks of their own); on a vocabulary shard (``plan.vocab_axis``, inside
``jax.shard_map``) the carries are merged over the mesh axis, and the statistic finishes
the per-row outputs. It is a ``jax.custom_vjp`` that keeps ``O(N)`` residuals: the backward
walks again and asks the statistic for each block's gradient, which it turns into
``d x`` (rows), or ``d h += dx @ W_b^T``, ``d W_b = h^T dx``, ``d b_b = sum dx`` (head).
Only the first stream gets gradients (a teacher is a constant). A 16-bit head whose float32
``d h`` carry exceeds the platform's budget (:func:`jaxent.impl.plan.row_groups`) is walked
in groups of rows, each group over the whole vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _platform
from jaxent import _rowmath as rm
from jaxent._platform import Quirks
from jaxent.impl import _blocks as B
from jaxent.impl import vocab
from jaxent.impl.plan import Plan, row_groups
from jaxent.impl.stats import Rows, Statistic


def _acc(streams) -> jnp.dtype:
    return rm.compute_dtype(streams[0][0].dtype)


def _block(plan: Plan, q: Quirks, ops, start, size: int, masked: bool):
    """``(raw logits [N, size] of columns [start, start + size), kernel block or None,
    valid [1, size] or None)`` of one stream."""
    if len(ops) == 1:
        (x,) = ops
        xb = x if size == x.shape[1] else lax.dynamic_slice_in_dim(x, start, size, 1)
        xb = xb.astype(rm.compute_dtype(x.dtype))
        valid = vocab.valid_columns(plan, start, size) if masked else None
        return (xb if valid is None else rm.mask_columns(xb, valid)), None, valid
    h, k, b = ops
    kb, xb, _, valid = vocab.block(plan, q, h, k, b, None, start, size, masked)
    return xb, kb, valid


def _cols(cols: dict, start, size: int, q: Quirks) -> dict:
    """The per-class inputs of columns ``[start, start + size)`` (last axis; pinned
    row-major where ``q.pin_row_major`` asks)."""
    return {n: None if a is None else _platform.row_major(
        lax.dynamic_slice_in_dim(a, start, size, a.ndim - 1), q) for n, a in cols.items()}


def _walk(plan: Plan, step, carry):
    """``step(start, size, masked, carry)`` over this device's columns; one block is a
    plain call (materialized rows usually are one block)."""
    if not plan.padded and plan.local_classes <= plan.block_v:
        return step(0, plan.local_classes, False, carry)
    return vocab.walk(plan, step, carry)


def _pass(stat: Statistic, plan: Plan, q: Quirks, streams, rows: Rows, cols: dict):
    opts = rm.row_options(plan.opts, rows.temp)
    off = vocab.shard_offset(plan)
    n = streams[0][0].shape[0]

    def step(start, size, masked, carry):
        blocks = [_block(plan, q, ops, start, size, masked) for ops in streams]
        return stat.fold(opts, carry, tuple(b[0] for b in blocks), rows,
                         _cols(cols, start, size, q), off + start, blocks[0][2])

    carry = B.varying_like(stat.init(n, _acc(streams)), streams, rows, cols)
    carry = _walk(plan, step, carry)
    if plan.vocab_axis is not None:
        carry = stat.merge(opts, carry, plan.vocab_axis)
    return stat.finish(opts, carry, rows)


def _forward(stat: Statistic, plan: Plan, q: Quirks, streams, rows: Rows, cols: dict):
    out, res = _pass(stat, plan, q, streams, rows, cols)
    nxt = stat.then(res)
    while nxt is not None:
        out, res = _pass(nxt, plan, q, streams, rows, cols)
        nxt = nxt.then(res)
    return out, res


def _head_grads(stat: Statistic, plan: Plan, q: Quirks, streams, rows: Rows, cols: dict,
                res, cts, opts, off):
    """``((d hidden, d kernel, d bias), d cols)`` of a linear-head stream 0, summed over this
    device's columns.

    ``d hidden`` is added in row slices (:func:`jaxent.impl._blocks.add_dhidden`: no
    ``[N, D]`` product held next to it). With ``q.bf16_bits`` a bf16 ``d kernel`` is written
    in stages: blocks go, as uint16 bits, into a stage of
    :func:`jaxent.impl.vocab.stage_width` columns, and each full stage is written into the
    bf16 gradient with one pass. Stages are whole blocks; the last one is shifted left to end
    at ``V``, and the columns it repeats count once in ``d hidden``. A 16-bit ``d hidden``
    of more rows than one float32 carry of the budget goes in groups
    (:func:`_grouped_grads`; not with stages).
    """
    h, k, b = streams[0]
    v, bv = plan.local_classes, plan.block_v
    axis = B.vocab_axis(plan.layout)
    refs = (streams, rows, cols, res, cts)
    slice_elems = _platform.heuristics().block_elems // 2

    def step(start, size, masked, carry, done=0, at=None):
        """Add block ``[start, start + size)``: its ``d kernel`` goes to column ``at`` of
        ``dk`` (``start`` by default), its columns before ``done`` are left out of ``dh``."""
        dh, dk, db, dcols = carry
        blocks = [_block(plan, q, o, start, size, masked) for o in streams]
        dx, dcb = stat.block_grad(opts, res, tuple(bl[0] for bl in blocks), rows,
                                  _cols(cols, start, size, q), off + start, cts)
        valid = blocks[0][2]
        if valid is not None:
            dx = jnp.where(valid, dx, 0.0)
        dk = _platform.dupdate(dk, B.block_dkernel(h, dx, plan.layout, q),
                               start if at is None else at, axis, k.dtype, q)
        if db is not None:
            db = _platform.dupdate(db, jnp.sum(dx, axis=0), start, 0, b.dtype, q)
        dcols = _write_cols(dcols, dcb, start, q)
        fresh = dx if at is None else B.drop_before(dx, start, done, 1)
        return B.add_dhidden(dh, fresh, blocks[0][1], plan.layout, slice_elems), dk, db, dcols

    # A float32 d hidden carry is the gradient itself: groups would only add a group's copy.
    auto = plan.row_groups == 0 and h.dtype == _acc(streams)
    groups = 1 if auto else row_groups(h.shape[0], h.shape[1], plan.row_groups)
    if groups > 1 and not _platform.stages_bf16(k.dtype, q):
        return _grouped_grads(stat, plan, q, streams, rows, cols, res, cts, off, groups)
    dh = B.varying_like(jnp.zeros(h.shape, _acc(streams)), *refs)
    db = None if b is None else B.varying_like(
        _platform.carry_zeros(b.shape, b.dtype, q), *refs)
    dc0 = B.varying_like(_zero_cols(stat, cols), *refs)
    width = vocab.stage_width(h.shape[0], h.shape[1], bv)
    if not _platform.stages_bf16(k.dtype, q) or width >= v:
        dk = B.varying_like(_platform.carry_zeros(k.shape, k.dtype, q), *refs)
        dh, dk, db, dcols = _walk(plan, step, (dh, dk, db, dc0))
        dk = _platform.carry_value(dk, k.dtype)
    else:
        stage_shape = list(k.shape)
        stage_shape[axis] = width

        # Stages span the vocabulary in whole blocks: with padding, every block is masked.
        def stage(c, carry):
            dh, dk, db, dcols = carry
            first = B.piece_start(c, width, v)
            stage0 = B.varying_like(_platform.carry_zeros(stage_shape, k.dtype, q), *refs)
            dh, st, db, dcols = lax.fori_loop(
                0, width // bv,
                lambda j, c2: step(first + j * bv, bv, plan.padded, c2, done=c * width,
                                   at=j * bv),
                (dh, stage0, db, dcols))
            bits = lax.bitcast_convert_type(dk, st.dtype)
            bits = lax.dynamic_update_slice_in_dim(bits, st, first, axis=axis)
            return dh, lax.bitcast_convert_type(bits, k.dtype), db, dcols

        dk = B.varying_like(jnp.zeros(k.shape, k.dtype), *refs)
        dh, dk, db, dcols = lax.fori_loop(0, -(-v // width), stage, (dh, dk, db, dc0))
    g = (dh.astype(h.dtype), dk, None if db is None else _platform.carry_value(db, b.dtype))
    return g, dcols


def _grouped_grads(stat: Statistic, plan: Plan, q: Quirks, streams, rows: Rows, cols: dict,
                   res, cts, off, groups: int):
    """:func:`_head_grads` with the rows outermost, in ``groups`` groups of ``r = ceil(N /
    groups)`` rows (the last one shifted up to end at ``N``).

    Each group walks the whole vocabulary: its float32 ``d hidden [r, D]`` is summed over
    the blocks and written once in the hidden states' dtype; each block's ``d kernel`` and
    ``d bias`` are read, added in float32 and written back (so rounded once per group in
    their dtype). The per-row inputs are sliced per group, the ``[N, V]`` per-class ones
    per group and block; rows a shifted last group repeats get their ``d hidden`` written
    again (the same values) and count once in ``d kernel`` and ``d bias``.
    """
    h, k, b = streams[0]
    n, d = h.shape
    r = -(-n // groups)
    axis = B.vocab_axis(plan.layout)
    refs = (streams, rows, cols, res, cts)
    slice_elems = _platform.heuristics().block_elems // 2

    def group(i, carry):
        dho, dk, db, dcols = carry
        start = B.piece_start(i, r, n)
        def part(a):  # every per-row input is [N, ...]
            return lax.dynamic_slice_in_dim(a, start, r, 0) if a.ndim else a

        gs = tuple((part(o[0]),) + tuple(o[1:]) for o in streams)
        g_rows, g_res, g_cts = jax.tree.map(part, (rows, res, cts))
        opts = rm.row_options(plan.opts, g_rows.temp)
        hg = gs[0][0]

        def step(bstart, size, masked, carry):
            dh, dk, db, dcols = carry
            blocks = [_block(plan, q, o, bstart, size, masked) for o in gs]
            dx, dcb = stat.block_grad(opts, g_res, tuple(bl[0] for bl in blocks), g_rows,
                                      _group_cols(cols, start, r, bstart, size, q), off + bstart,
                                      g_cts)
            valid = blocks[0][2]
            if valid is not None:
                dx = jnp.where(valid, dx, 0.0)
            once = dx if n % r == 0 else B.drop_before(dx, start, i * r, 0)
            dk = _add_block(dk, B.block_dkernel(hg, once, plan.layout, q), bstart, axis)
            if db is not None:
                db = _add_block(db, jnp.sum(once, axis=0), bstart, 0)
            dcols = {nm: lax.dynamic_update_slice(
                c, _platform.row_major(dcb[nm].astype(c.dtype), q), (start, bstart))
                for nm, c in dcols.items()}
            return B.add_dhidden(dh, dx, blocks[0][1], plan.layout, slice_elems), dk, db, dcols

        dh = B.varying_like(jnp.zeros((r, d), _acc(streams)), *refs)
        dh, dk, db, dcols = _walk(plan, step, (dh, dk, db, dcols))
        return lax.dynamic_update_slice_in_dim(dho, dh.astype(h.dtype), start, 0), dk, db, dcols

    init = (jnp.zeros(h.shape, h.dtype), jnp.zeros(k.shape, k.dtype),
            None if b is None else jnp.zeros(b.shape, b.dtype), _zero_cols(stat, cols))
    dh, dk, db, dcols = lax.fori_loop(0, groups, group, B.varying_like(init, *refs))
    return (dh, dk, db), dcols


def _group_cols(cols: dict, start, rows: int, bstart, size: int, q: Quirks) -> dict:
    """The per-class inputs of rows ``[start, start + rows)`` (``[N, V]`` ones, pinned
    row-major where ``q.pin_row_major`` asks) and columns ``[bstart, bstart + size)``."""
    def cut(a):
        if a.ndim == 1:
            return lax.dynamic_slice_in_dim(a, bstart, size, 0)
        return _platform.row_major(lax.dynamic_slice(a, (start, bstart), (rows, size)), q)
    return {nm: None if a is None else cut(a) for nm, a in cols.items()}


def _add_block(buf: jax.Array, upd: jax.Array, start, axis: int) -> jax.Array:
    """``buf`` with ``upd`` (float32) added to its slice at ``start`` along ``axis``, in
    float32, written back in ``buf``'s dtype."""
    cur = lax.dynamic_slice_in_dim(buf, start, upd.shape[axis], axis)
    new = cur.astype(upd.dtype) + upd
    return lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis)


def _zero_cols(stat: Statistic, cols: dict) -> dict:
    return {n: jnp.zeros(cols[n].shape, cols[n].dtype) for n in stat.diff_cols}


def _write_cols(dcols: dict, dcb: dict, start, q: Quirks) -> dict:
    """The gradients of the per-class inputs with one block's written at ``start`` (pinned
    row-major where ``q.pin_row_major`` asks)."""
    return {n: lax.dynamic_update_slice_in_dim(
        d, _platform.row_major(dcb[n].astype(d.dtype), q), start, d.ndim - 1)
        for n, d in dcols.items()}


def _grads(stat: Statistic, plan: Plan, q: Quirks, streams, rows: Rows, cols: dict, res,
           cts):
    """``(cotangent of stream 0, {name: cotangent of cols[name]})``."""
    opts = rm.row_options(plan.opts, rows.temp)
    off = vocab.shard_offset(plan)
    ops = streams[0]
    if len(ops) == 3:
        g, dcols = _head_grads(stat, plan, q, streams, rows, cols, res, cts, opts, off)
    else:
        def step(start, size, masked, carry):
            (gx,), dcols = carry
            blocks = [_block(plan, q, o, start, size, masked) for o in streams]
            dx, dcb = stat.block_grad(opts, res, tuple(bl[0] for bl in blocks), rows,
                                      _cols(cols, start, size, q), off + start, cts)
            if blocks[0][2] is not None:
                dx = jnp.where(blocks[0][2], dx, 0.0)
            gx = lax.dynamic_update_slice_in_dim(gx, dx.astype(gx.dtype), start, 1)
            return (gx,), _write_cols(dcols, dcb, start, q)

        g0 = (jnp.zeros(ops[0].shape, ops[0].dtype),)
        g, dcols = _walk(plan, step, B.varying_like((g0, _zero_cols(stat, cols)), streams,
                                                    rows, cols, res, cts))
    g = tuple(B.psum_to_type(c, r) for c, r in zip(g, ops, strict=True))
    return g, {n: B.psum_to_type(d, cols[n]) for n, d in dcols.items()}


def forward(stat: Statistic, plan: Plan, streams, rows: Rows, cols: dict):
    """``(per-row outputs, residuals)`` of :func:`run`'s forward walk, without its
    ``custom_vjp`` (for placements that split the walk themselves)."""
    return _platform.per_platform(
        lambda q, s, r, c: _forward(stat, plan, q, s, r, c), streams, rows, cols)


def grads(stat: Statistic, plan: Plan, streams, rows: Rows, cols: dict, res, cts):
    """``(cotangents of stream 0, {name: cotangent of cols[name]})`` of :func:`run` for the
    outputs' cotangents ``cts``, from :func:`forward`'s residuals ``res``. Inside
    ``jax.shard_map`` each is summed over the mesh axes it varies over and its input does
    not; elsewhere a vocabulary shard's ``d hidden`` is its columns' share."""
    return _platform.per_platform(
        lambda q, s, r, c, res, cts: _grads(stat, plan, q, s, r, c, res, cts),
        streams, rows, cols, res, cts)


def _run_fwd(stat: Statistic, plan: Plan, streams, rows: Rows, cols: dict):
    out, res = forward(stat, plan, streams, rows, cols)
    return out, (streams, rows, cols, res)


def _run_bwd(stat: Statistic, plan: Plan, saved, cts):
    streams, rows, cols, res = saved
    g, dcols = grads(stat, plan, streams, rows, cols, res, cts)
    none = lambda tree: jax.tree.map(lambda _: None, tree)  # noqa: E731
    dstreams = (g,) + tuple(none(s) for s in streams[1:])
    return dstreams, none(rows), {n: dcols.get(n) for n in cols}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def run(stat: Statistic, plan: Plan, streams: tuple, rows: Rows, cols: dict):
    """The per-row outputs of ``stat`` over ``streams`` (see the module docstring).

    ``plan.local_classes`` are the columns this device walks (the whole vocabulary on one
    device), ``plan.padding`` the padding columns at the vocabulary's end; ``cols`` holds
    this device's columns of the per-class inputs.
    """
    return _run_fwd(stat, plan, streams, rows, cols)[0]


run.defvjp(_run_fwd, _run_bwd)
