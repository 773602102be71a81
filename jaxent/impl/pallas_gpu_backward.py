r"""The backward kernels of the Triton fused linear cross-entropy: ``d hidden`` and
``d kernel`` (+ ``d bias``), in two strategies (``Config.backward``, see
:mod:`jaxent.impl.pallas_gpu`): ``"accumulate"`` adds each logits tile's contribution into
float32 output rows/columns in global memory (each logits tile formed once per kernel);
``"recompute"`` keeps a ``block_d``-wide register accumulator per program and forms each
logits tile ``Dp / block_d`` times. All on operands padded to whole blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxent import _rowmath
from jaxent.impl import pallas_common as common
from jaxent.impl import pallas_gpu_blocks as blocks
from jaxent.impl import pallas_gpu_stream as stream

# ----------------------------------------------------------------------------- backward


def _dhidden_kernel(*refs, spec, has_b, has_w, dp, vp):
    h_ref, w_ref, b_ref, wt_ref, rest = blocks.unpack(refs, has_b, has_w)
    *row_refs, dh_ref = rest
    cfg = spec.config
    bk, bv, bd = cfg.block_k, cfg.block_v, cfg.block_d
    dstart = pl.multiple_of(pl.program_id(1) * bd, bd)
    rows = tuple(r[...] for r in row_refs)

    def body(j, acc):
        start = pl.multiple_of(j * bv, bv)
        x = blocks.logits(spec, lambda k: h_ref[:, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        dz = common.grad_tile(x, rows, start, blocks.vslice(wt_ref, start, bv), spec.opts,
                              spec.num_classes)
        if spec.layout == "dv":
            wd = w_ref[pl.ds(dstart, bd), pl.ds(start, bv)]
        else:
            wd = w_ref[pl.ds(start, bv), pl.ds(dstart, bd)]
        return acc + common.dhidden_part(dz, wd, spec.layout)

    acc = jnp.zeros((cfg.block_n, bd), _rowmath.compute_dtype(h_ref.dtype))
    dh_ref[...] = lax.fori_loop(0, vp // bv, body, acc).astype(dh_ref.dtype)


def _dhidden(spec, h, w, b, rows, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row = pl.BlockSpec((cfg.block_n,), lambda i, k: (i,))
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    specs = [pl.BlockSpec((cfg.block_n, dp), lambda i, k: (i, 0)), pl.no_block_spec] + [
        pl.no_block_spec for a in (b, wt) if a is not None] + [row] * len(rows)
    return common.pallas_call(
        functools.partial(_dhidden_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None, dp=dp, vp=vp),
        grid=(np_ // cfg.block_n, dp // cfg.block_d), in_specs=specs,
        out_specs=pl.BlockSpec((cfg.block_n, cfg.block_d), lambda i, k: (i, k)),
        out_shape=jax.ShapeDtypeStruct((np_, dp), h.dtype),
        compiler_params=blocks.params(cfg), interpret=spec.interpret, name="jaxent_lce_dhidden",
        cost_estimate=_grad_cost(h, np_, dp, vp, matmuls=dp // cfg.block_d + 1,
                                 w_reads=np_ // cfg.block_n * 2, h_reads=2),
    )(*ins)


def _grad_cost(h, np_: int, dp: int, vp: int, **reads):
    """:func:`common.cost` of a gradient kernel, with its row vectors read once."""
    return common.cost(np_, dp, vp, h.dtype.itemsize, extra_bytes=4 * common.NUM_ROWS * np_,
                       elementwise=12, **reads)


def _dkernel_kernel(*refs, spec, has_b, has_w, dp, np_):
    h_ref, w_ref, b_ref, wt_ref, rest = blocks.unpack(refs, has_b, has_w)
    row_refs, (dw_ref, *db_ref) = rest[:common.NUM_ROWS], rest[common.NUM_ROWS:]
    cfg = spec.config
    bn, bk, bv, bd = cfg.block_n, cfg.block_k, cfg.block_v, cfg.block_d
    start = pl.multiple_of(pl.program_id(0) * bv, bv)
    dstart = pl.multiple_of(pl.program_id(1) * bd, bd)
    w_blk = blocks.vslice(wt_ref, start, bv)
    acc_t = _rowmath.compute_dtype(h_ref.dtype)

    def body(i, carry):
        acc, dbacc = carry
        r0 = pl.multiple_of(i * bn, bn)
        rs = pl.ds(r0, bn)
        x = blocks.logits(spec, lambda k: h_ref[rs, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        rows = tuple(r[rs] for r in row_refs)
        dz = common.grad_tile(x, rows, start, w_blk, spec.opts, spec.num_classes)
        acc = acc + common.dkernel_part(h_ref[rs, pl.ds(dstart, bd)], dz, spec.layout)
        if dbacc is not None:
            dbacc = dbacc + jnp.sum(dz, axis=0)
        return acc, dbacc

    shape = (bd, bv) if spec.layout == "dv" else (bv, bd)
    init = (jnp.zeros(shape, acc_t), jnp.zeros((bv,), acc_t) if has_b else None)
    acc, dbacc = lax.fori_loop(0, np_ // bn, body, init)
    dw_ref[...] = acc.astype(dw_ref.dtype)
    if has_b:
        @pl.when(pl.program_id(1) == 0)
        def _():
            db_ref[0][...] = dbacc.astype(db_ref[0].dtype)


def _dkernel(spec, h, w, b, rows, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    specs = [pl.no_block_spec] * len(ins)
    if spec.layout == "dv":
        dw_spec = pl.BlockSpec((cfg.block_d, cfg.block_v), lambda j, k: (k, j))
    else:
        dw_spec = pl.BlockSpec((cfg.block_v, cfg.block_d), lambda j, k: (j, k))
    out_specs = [dw_spec]
    out_shape = [jax.ShapeDtypeStruct(w.shape, w.dtype)]
    if b is not None:
        out_specs.append(pl.BlockSpec((cfg.block_v,), lambda j, k: (j,)))
        out_shape.append(jax.ShapeDtypeStruct((vp,), b.dtype))
    outs = common.pallas_call(
        functools.partial(_dkernel_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None, dp=dp, np_=np_),
        grid=(vp // cfg.block_v, dp // cfg.block_d), in_specs=specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=blocks.params(cfg), interpret=spec.interpret,
        name="jaxent_lce_dkernel",
        cost_estimate=_grad_cost(h, np_, dp, vp, matmuls=dp // cfg.block_d + 1,
                                 h_reads=vp // cfg.block_v * 2, w_reads=2),
    )(*ins)
    return outs[0], (outs[1] if b is not None else None)


# ------------------------------------------------ backward, accumulating in global memory


def _sync(spec):
    """A CTA barrier between a program's store of an accumulator tile and its next load of
    it (the two may map elements to different threads); Pallas's interpreter needs none."""
    if not spec.interpret:
        plgpu.debug_barrier()


def _zero(ref, nd: int, bd: int, axis: int):
    """Zero ``ref`` in ``nd`` slices of ``bd`` along ``axis`` (a register-sized tile each)."""
    shape = list(ref.shape)
    shape[axis] = bd

    def step(k, _):
        sl = pl.ds(pl.multiple_of(k * bd, bd), bd)
        idx = (slice(None), sl) if axis == 1 else (sl, slice(None))
        ref[idx] = jnp.zeros(shape, ref.dtype)
        return 0

    lax.fori_loop(0, nd, step, 0)


def _dhidden_acc_kernel(*refs, spec, has_b, has_w, dp, vp):
    h_ref, w_ref, b_ref, wt_ref, rest = blocks.unpack(refs, has_b, has_w)
    *row_refs, dh_ref = rest
    cfg = spec.config
    bk, bv, bd = cfg.block_k, cfg.block_v, cfg.block_d
    nd = dp // bd // cfg.d_split  # slices of this program's D chunk
    d0 = pl.program_id(1) * nd
    rows = tuple(r[...] for r in row_refs)
    _zero(dh_ref, nd, bd, 1)
    _sync(spec)

    def body(j, carry):
        start = pl.multiple_of(j * bv, bv)
        x = blocks.logits(spec, lambda k: h_ref[:, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        dz = common.grad_tile(x, rows, start, blocks.vslice(wt_ref, start, bv), spec.opts,
                              spec.num_classes)

        def piece(k, c):
            ds = pl.ds(pl.multiple_of((d0 + k) * bd, bd), bd)  # in W
            local = pl.ds(pl.multiple_of(k * bd, bd), bd)  # in this program's block
            wd = w_ref[ds, pl.ds(start, bv)] if spec.layout == "dv" else w_ref[
                pl.ds(start, bv), ds]
            dh_ref[:, local] = dh_ref[:, local] + common.dhidden_part(dz, wd, spec.layout)
            return c

        lax.fori_loop(0, nd, piece, 0)
        _sync(spec)
        return carry

    lax.fori_loop(0, vp // bv, body, 0)


def _dhidden_acc(spec, h, w, b, rows, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row = pl.BlockSpec((cfg.block_n,), lambda i, c: (i,))
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    specs = [pl.BlockSpec((cfg.block_n, dp), lambda i, c: (i, 0)), pl.no_block_spec] + [
        pl.no_block_spec for a in (b, wt) if a is not None] + [row] * len(rows)
    out = pl.BlockSpec((cfg.block_n, dp // cfg.d_split), lambda i, c: (i, c))
    return common.pallas_call(
        functools.partial(_dhidden_acc_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None, dp=dp, vp=vp),
        grid=(np_ // cfg.block_n, cfg.d_split), in_specs=specs, out_specs=out,
        out_shape=jax.ShapeDtypeStruct((np_, dp), _rowmath.compute_dtype(h.dtype)),
        compiler_params=blocks.params(cfg), interpret=spec.interpret, name="jaxent_lce_dhidden",
        cost_estimate=_grad_cost(h, np_, dp, vp, matmuls=cfg.d_split + 1,
                                 w_reads=np_ // cfg.block_n * (cfg.d_split + 1)),
    )(*ins)


def _dkernel_acc_kernel(*refs, spec, has_b, has_w, dp, np_):
    h_ref, w_ref, b_ref, wt_ref, rest = blocks.unpack(refs, has_b, has_w)
    row_refs, (dw_ref, *db_ref) = rest[:common.NUM_ROWS], rest[common.NUM_ROWS:]
    cfg = spec.config
    bn, bk, bv, bd = cfg.block_n, cfg.block_k, cfg.block_v, cfg.block_d
    start = pl.multiple_of(pl.program_id(0) * bv, bv)
    nd = dp // bd // cfg.d_split  # slices of this program's D chunk
    d0 = pl.program_id(1) * nd
    w_blk = blocks.vslice(wt_ref, start, bv)
    daxis = 0 if spec.layout == "dv" else 1
    _zero(dw_ref, nd, bd, daxis)
    _sync(spec)

    def body(i, dbacc):
        rs = pl.ds(pl.multiple_of(i * bn, bn), bn)
        x = blocks.logits(spec, lambda k: h_ref[rs, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        rows = tuple(r[rs] for r in row_refs)
        dz = common.grad_tile(x, rows, start, w_blk, spec.opts, spec.num_classes)

        def piece(k, c):
            ds = pl.ds(pl.multiple_of((d0 + k) * bd, bd), bd)  # in h
            local = pl.ds(pl.multiple_of(k * bd, bd), bd)  # in this program's block
            idx = (local, slice(None)) if daxis == 0 else (slice(None), local)
            dw_ref[idx] = dw_ref[idx] + common.dkernel_part(h_ref[rs, ds], dz, spec.layout)
            return c

        lax.fori_loop(0, nd, piece, 0)
        _sync(spec)
        return None if dbacc is None else dbacc + jnp.sum(dz, axis=0)

    acc_t = _rowmath.compute_dtype(h_ref.dtype)
    dbacc = lax.fori_loop(0, np_ // bn, body, jnp.zeros((bv,), acc_t) if has_b else None)
    if has_b:
        @pl.when(pl.program_id(1) == 0)
        def _():
            db_ref[0][...] = dbacc.astype(db_ref[0].dtype)


def _dkernel_acc(spec, h, w, b, rows, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    dc = dp // cfg.d_split
    if spec.layout == "dv":
        dw_spec = pl.BlockSpec((dc, cfg.block_v), lambda j, c: (c, j))
    else:
        dw_spec = pl.BlockSpec((cfg.block_v, dc), lambda j, c: (j, c))
    out_specs = [dw_spec]
    out_shape = [jax.ShapeDtypeStruct(w.shape, _rowmath.compute_dtype(w.dtype))]
    if b is not None:
        out_specs.append(pl.BlockSpec((cfg.block_v,), lambda j, c: (j,)))
        out_shape.append(jax.ShapeDtypeStruct((vp,), b.dtype))
    outs = common.pallas_call(
        functools.partial(_dkernel_acc_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None, dp=dp, np_=np_),
        grid=(vp // cfg.block_v, cfg.d_split), in_specs=[pl.no_block_spec] * len(ins),
        out_specs=out_specs, out_shape=out_shape, compiler_params=blocks.params(cfg),
        interpret=spec.interpret, name="jaxent_lce_dkernel",
        cost_estimate=_grad_cost(h, np_, dp, vp, matmuls=cfg.d_split + 1,
                                 h_reads=vp // cfg.block_v * (cfg.d_split + 1)),
    )(*ins)
    return outs[0], (outs[1] if b is not None else None)


_STRATEGIES = {"stream": (stream.dhidden, stream.dkernel),
               "accumulate": (_dhidden_acc, _dkernel_acc), "recompute": (_dhidden, _dkernel)}


def dhidden(spec, *args):
    """``d hidden [Np, Dp]`` by ``spec.config.backward``'s kernels (float32 for
    ``"accumulate"``, the input's dtype otherwise)."""
    return _STRATEGIES[spec.config.backward][0](spec, *args)


def dkernel(spec, *args):
    """``(d kernel, d bias or None)`` by ``spec.config.backward``'s kernels."""
    return _STRATEGIES[spec.config.backward][1](spec, *args)
