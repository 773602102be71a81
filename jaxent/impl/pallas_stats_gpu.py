r"""The statistic kernels of :mod:`jaxent.impl.pallas_stats` for NVIDIA GPUs (Triton).

Blocks are :class:`jaxent.impl.pallas_gpu.Config`'s (``v_split``/``d_split``/``backward``
unused); the operands come padded to whole tiles, ``D`` to a multiple of ``block_k`` and
``block_d``. Grids, each program walking its tiles with a ``fori_loop``:

* forward ``(Np / block_n,)``: a token tile walks the vocabulary tiles, each logits tile
  formed over ``block_k`` slices of ``D`` (float32), folded by the statistic; the carry's
  ``[block_n]`` vectors are written once.
* ``d hidden`` ``(Np / block_n, Dp / block_d)``: a token tile walks the vocabulary, forms
  each logits tile and ``dx``, and adds ``dx W[d-slice, tile]^T`` into a ``[block_n,
  block_d]`` float32 accumulator (each logits tile formed ``Dp / block_d`` times).
* ``d kernel`` ``(Vp / block_v, Dp / block_d)``: a vocabulary tile walks the tokens,
  ``dW += h[:, d-slice]^T dx`` in float32 (``db`` too, by the first slice).
* per-row inputs' gradients ``(Np / block_n, Vp / block_v)``: one tile each.

No atomics: each output element has one writer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxent import _rowmath as rm
from jaxent.impl import pallas_common as common
from jaxent.impl import pallas_gpu_blocks as blocks
from jaxent.impl import pallas_stats as ps
from jaxent.impl.pallas_gpu_blocks import Config

_ROW_TAGS = ("y", "counted", "temp", "extra")


def default_config(n: int, d: int, v: int, dtype, streams: int = 1) -> Config:
    """The fused cross-entropy kernels' default blocks (:func:`jaxent.impl.pallas_gpu.
    default_config`), without their vocabulary or ``D`` splits, ``D`` slices of at most 64
    and token tiles divided by the number of ``streams``: the ``d kernel`` program holds a
    ``[block_d, block_v]`` float32 accumulator next to a ``[block_n, block_v]`` logits tile
    per stream, which spill registers on an H100 beyond that."""
    cfg = blocks.default_config(n, d, v, dtype)
    return dataclasses.replace(cfg, v_split=1, d_split=1, block_d=min(cfg.block_d, 64),
                               block_n=max(16, cfg.block_n // streams))


def tile(cfg: Config) -> tuple[int, int, int]:
    """``(block_n, block_v, D alignment)`` of the padded operands."""
    return cfg.block_n, cfg.block_v, math.lcm(cfg.block_k, cfg.block_d)


# ------------------------------------------------------------------------------ helpers


def _rows(r: dict, rs):
    """``(rows, extra row vectors)`` of a tile: ``rs`` indexes the row vectors (``...`` for a
    row block, a slice when they are whole)."""
    get = {t[0]: r[t][rs] for t in r if t[0] in ("y", "counted", "temp")}
    extra = [r["extra", i][rs] for i in range(sum(t[0] == "extra" for t in r))]
    return ps.tile_rows(get), extra


def _cols(spec, r: dict, cs, start) -> dict:
    """The per-class inputs' tiles at rows ``cs`` (a slice) and vocabulary ``start``."""
    bv = spec.config.block_v
    cols = {}
    for t, ref in r.items():
        if t[0] == "row_col":
            cols[t[1]] = ref[cs, pl.ds(start, bv)]
        elif t[0] == "col":
            cols[t[1]] = ref[pl.ds(start, bv)]
    return cols


def _logits(spec, r: dict, rs, start, streams: int):
    """The logits tile of each stream at rows ``rs`` and vocabulary ``start``."""
    bk, bv = spec.config.block_k, spec.config.block_v
    out = []
    for s in range(streams):
        h_ref, w_ref, b_ref = r["h", s], r["w", s], r.get(("b", s))
        if spec.layout == "dv":
            w_at = lambda k, w_ref=w_ref: w_ref[pl.ds(k * bk, bk), pl.ds(start, bv)]  # noqa: E731
        else:
            w_at = lambda k, w_ref=w_ref: w_ref[pl.ds(start, bv), pl.ds(k * bk, bk)]  # noqa: E731
        h_at = lambda k, h_ref=h_ref: h_ref[rs, pl.ds(k * bk, bk)]  # noqa: E731
        bias = None if b_ref is None else b_ref[pl.ds(start, bv)]
        out.append(common.logits_tile(h_at, w_at, h_ref.shape[1] // bk, spec.layout, bias))
    return tuple(out)


def _row_spec(bn: int, trailing: tuple) -> pl.BlockSpec:
    """The block of a per-row operand ``[Np]`` or ``[Np, c]`` (``trailing``: ``()`` or
    ``(c,)``) on a grid whose first axis walks the token tiles."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((bn, *trailing), lambda i, *_: (i, *zeros))


def _in_specs(tags, arrays, bn, h_block):
    """Blocks of each operand: token tiles of ``bn`` rows for the row vectors (None: whole),
    ``h_block(width)`` for the hidden states (None: whole), the rest whole."""
    specs = []
    for t, a in zip(tags, arrays, strict=True):
        if t[0] in _ROW_TAGS and bn is not None:
            specs.append(_row_spec(bn, a.shape[1:]))
        elif t[0] == "h" and h_block is not None:
            specs.append(h_block(a.shape[1]))
        else:
            specs.append(pl.no_block_spec)
    return specs


def _guarded(spec, arrays):
    return [common.guard_platform(arrays[0], spec.interpret)] + arrays[1:]


def _split_extra(extra, trees):
    res_tree, cts_tree, n_res = trees
    return (jax.tree.unflatten(res_tree, extra[:n_res]),
            jax.tree.unflatten(cts_tree, extra[n_res:]))


# ------------------------------------------------------------------------------ forward


def _fwd_kernel(*refs, spec, tags, prev_tree, streams, vp):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    outs = refs[len(tags):]
    bn, bv = spec.config.block_n, spec.config.block_v
    rows, extra = _rows(r, Ellipsis)
    prev = None if prev_tree is None else jax.tree.unflatten(prev_tree, extra)
    stat = ps.pass_stat(spec, prev)
    cs = pl.ds(pl.multiple_of(pl.program_id(0) * bn, bn), bn)

    def body(j, carry):
        start = pl.multiple_of(j * bv, bv)
        cols = _cols(spec, r, cs, start)
        xs = _logits(spec, r, Ellipsis, start, streams)
        return ps.fold_tile(spec, stat, carry, xs, rows, cols, start)

    carry = stat.init(bn, rm.compute_dtype(r["h", 0].dtype))
    carry = lax.fori_loop(0, vp // bv, body, carry)
    for ref, leaf in zip(outs, jax.tree.leaves(carry), strict=True):
        ref[...] = leaf


def forward(spec, op: ps.Operands, prev_tree):
    """The carry's leaves ``[Np]`` of one pass (``prev_tree``: the structure of the first
    pass's residuals in ``op.extra`` for the second pass, else None)."""
    cfg = spec.config
    bn = cfg.block_n
    tags, arrays = ps.flat(op)
    np_, vp = op.counted.shape[0], ps.vocab_size(op, spec.layout)
    acc = rm.compute_dtype(op.streams[0][0].dtype)
    prev = None if prev_tree is None else jax.tree.unflatten(prev_tree, op.extra)
    _, leaves = ps.carry_leaves(ps.pass_stat(spec, prev), bn, acc)
    specs = _in_specs(tags, arrays, bn, lambda d: pl.BlockSpec((bn, d), lambda i: (i, 0)))
    return common.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, tags=tags, prev_tree=prev_tree,
                          streams=len(op.streams), vp=vp),
        grid=(np_ // bn,), in_specs=specs, out_specs=[_row_spec(bn, t) for t, _ in leaves],
        out_shape=[jax.ShapeDtypeStruct((np_, *t), dt) for t, dt in leaves],
        compiler_params=blocks.params(cfg), interpret=spec.interpret,
        name="jaxent_stat_fwd", cost_estimate=ps.cost(spec, op, 1, np_ // bn),
    )(*_guarded(spec, arrays))


# ----------------------------------------------------------------------------- backward


def _dh_kernel(*refs, spec, tags, trees, streams, vp):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    (dh_ref,) = refs[len(tags):]
    cfg = spec.config
    bn, bv, bd = cfg.block_n, cfg.block_v, cfg.block_d
    rows, extra = _rows(r, Ellipsis)
    res, cts = _split_extra(extra, trees)
    cs = pl.ds(pl.multiple_of(pl.program_id(0) * bn, bn), bn)
    dstart = pl.multiple_of(pl.program_id(1) * bd, bd)
    w_ref = r["w", 0]

    def body(j, acc):
        start = pl.multiple_of(j * bv, bv)
        cols = _cols(spec, r, cs, start)
        xs = _logits(spec, r, Ellipsis, start, streams)
        dx, _ = ps.grad_tile(spec, res, xs, rows, cols, start, cts)
        if spec.layout == "dv":
            wd = w_ref[pl.ds(dstart, bd), pl.ds(start, bv)]
        else:
            wd = w_ref[pl.ds(start, bv), pl.ds(dstart, bd)]
        return acc + common.dhidden_part(dx, wd, spec.layout)

    acc = jnp.zeros((bn, bd), rm.compute_dtype(r["h", 0].dtype))
    dh_ref[...] = lax.fori_loop(0, vp // bv, body, acc).astype(dh_ref.dtype)


def dhidden(spec, op: ps.Operands, trees):
    """``d hidden [Np, Dp]`` of the padded first stream."""
    cfg = spec.config
    bn, bd = cfg.block_n, cfg.block_d
    tags, arrays = ps.flat(op)
    h = op.streams[0][0]
    np_, dp = h.shape
    vp = ps.vocab_size(op, spec.layout)
    specs = _in_specs(tags, arrays, bn, lambda d: pl.BlockSpec((bn, d), lambda i, k: (i, 0)))
    nd = dp // bd
    return common.pallas_call(
        functools.partial(_dh_kernel, spec=spec, tags=tags, trees=trees,
                          streams=len(op.streams), vp=vp),
        grid=(np_ // bn, nd), in_specs=specs,
        out_specs=pl.BlockSpec((bn, bd), lambda i, k: (i, k)),
        out_shape=jax.ShapeDtypeStruct((np_, dp), h.dtype),
        compiler_params=blocks.params(cfg), interpret=spec.interpret,
        name="jaxent_stat_dhidden",
        cost_estimate=ps.cost(spec, op, nd + 1, np_ // bn * nd, elementwise=12),
    )(*_guarded(spec, arrays))


def _dc_kernel(*refs, spec, tags, trees, streams, diff):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    outs = refs[len(tags):]
    bn, bv = spec.config.block_n, spec.config.block_v
    rows, extra = _rows(r, Ellipsis)
    res, cts = _split_extra(extra, trees)
    cs = pl.ds(pl.multiple_of(pl.program_id(0) * bn, bn), bn)
    start = pl.multiple_of(pl.program_id(1) * bv, bv)
    xs = _logits(spec, r, Ellipsis, start, streams)
    _, dcols = ps.grad_tile(spec, res, xs, rows, _cols(spec, r, cs, start), start, cts)
    for name, o_ref in zip(diff, outs, strict=True):
        o_ref[...] = dcols[name].astype(o_ref.dtype)


def dcols(spec, op: ps.Operands, trees, diff: tuple) -> list:
    """The gradients ``[Np, Vp]`` of the per-row inputs ``diff`` (a call of its own, one
    tile per program, so that XLA drops it when they are not asked for)."""
    cfg = spec.config
    bn, bv = cfg.block_n, cfg.block_v
    tags, arrays = ps.flat(op)
    np_, vp = op.counted.shape[0], ps.vocab_size(op, spec.layout)
    specs = _in_specs(tags, arrays, bn, lambda d: pl.BlockSpec((bn, d), lambda i, j: (i, 0)))
    return common.pallas_call(
        functools.partial(_dc_kernel, spec=spec, tags=tags, trees=trees,
                          streams=len(op.streams), diff=diff),
        grid=(np_ // bn, vp // bv), in_specs=specs,
        out_specs=[pl.BlockSpec((bn, bv), lambda i, j: (i, j))] * len(diff),
        out_shape=[jax.ShapeDtypeStruct((np_, vp), op.cols[k].dtype) for k in diff],
        compiler_params=blocks.params(cfg), interpret=spec.interpret,
        name="jaxent_stat_dcols", cost_estimate=ps.cost(spec, op, 1, np_ // bn),
    )(*_guarded(spec, arrays))


def _dk_kernel(*refs, spec, tags, trees, streams, np_, has_b):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    dw_ref, *db_ref = refs[len(tags):]
    cfg = spec.config
    bn, bv, bd = cfg.block_n, cfg.block_v, cfg.block_d
    start = pl.multiple_of(pl.program_id(0) * bv, bv)
    dstart = pl.multiple_of(pl.program_id(1) * bd, bd)
    acc_t = rm.compute_dtype(r["h", 0].dtype)

    def body(i, carry):
        acc, dbacc = carry
        rs = pl.ds(pl.multiple_of(i * bn, bn), bn)
        rows, extra = _rows(r, rs)
        cols = _cols(spec, r, rs, start)
        res, cts = _split_extra(extra, trees)
        xs = _logits(spec, r, rs, start, streams)
        dx, _ = ps.grad_tile(spec, res, xs, rows, cols, start, cts)
        acc = acc + common.dkernel_part(r["h", 0][rs, pl.ds(dstart, bd)], dx, spec.layout)
        if dbacc is not None:
            dbacc = dbacc + jnp.sum(dx, axis=0)
        return acc, dbacc

    shape = (bd, bv) if spec.layout == "dv" else (bv, bd)
    init = (jnp.zeros(shape, acc_t), jnp.zeros((bv,), acc_t) if has_b else None)
    acc, dbacc = lax.fori_loop(0, np_ // bn, body, init)
    dw_ref[...] = acc.astype(dw_ref.dtype)
    if has_b:
        @pl.when(pl.program_id(1) == 0)
        def _():
            db_ref[0][...] = dbacc.astype(db_ref[0].dtype)


def dkernel(spec, op: ps.Operands, trees):
    """``(d kernel, d bias or None)`` of the padded first stream."""
    cfg = spec.config
    bv, bd = cfg.block_v, cfg.block_d
    tags, arrays = ps.flat(op)
    h, w, b = op.streams[0]
    np_, dp = h.shape
    vp = ps.vocab_size(op, spec.layout)
    if spec.layout == "dv":
        out_specs = [pl.BlockSpec((bd, bv), lambda j, k: (k, j))]
    else:
        out_specs = [pl.BlockSpec((bv, bd), lambda j, k: (j, k))]
    out_shape = [jax.ShapeDtypeStruct(w.shape, w.dtype)]
    if b is not None:
        out_specs.append(pl.BlockSpec((bv,), lambda j, k: (j,)))
        out_shape.append(jax.ShapeDtypeStruct((vp,), b.dtype))
    nd = dp // bd
    out = common.pallas_call(
        functools.partial(_dk_kernel, spec=spec, tags=tags, trees=trees,
                          streams=len(op.streams), np_=np_, has_b=b is not None),
        grid=(vp // bv, nd), in_specs=_in_specs(tags, arrays, None, None),
        out_specs=out_specs, out_shape=out_shape, compiler_params=blocks.params(cfg),
        interpret=spec.interpret, name="jaxent_stat_dkernel",
        cost_estimate=ps.cost(spec, op, nd + 1, nd, elementwise=12),
    )(*_guarded(spec, arrays))
    return out[0], (out[1] if b is not None else None)
