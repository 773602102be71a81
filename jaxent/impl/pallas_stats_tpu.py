r"""The statistic kernels of :mod:`jaxent.impl.pallas_stats` for TPUs (Mosaic).

Blocks are :class:`jaxent.impl.pallas_tpu.Config`'s; the tokens and the vocabulary come
padded to whole tiles, ``D`` as is (each tile spans it). In Mosaic's style the reduction
runs along the last grid axis (``"arbitrary"``), Pallas pipelines the tiles HBM -> VMEM and
what is reduced stays in VMEM between steps:

* forward ``(Np / block_n, Vp / block_v)``: the logits tile of each stream on the MXU
  (float32), folded by the statistic into the carry held in the (revisited) output blocks.
* ``d hidden`` ``(Np / block_n, Vp / block_v)``: the tile's ``dx``, ``acc += dx W_tile^T``
  in a ``[block_n, D]`` float32 scratch, written at the last vocabulary tile.
* ``d kernel`` ``(Vp / block_v, Np / block_n)``: ``acc += h_tile^T dx`` in a ``[D,
  block_v]`` (or ``[block_v, D]``) float32 scratch (and ``db``), written at the last token
  tile.
* per-row inputs' gradients ``(Np / block_n, Vp / block_v)``, both axes parallel: one tile
  each.

Every per-row or per-class vector travels as ``[1, n]`` in ``(1, block)`` blocks (see
:mod:`jaxent.impl.pallas_tpu`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxent import _rowmath as rm
from jaxent.impl import pallas_common as common
from jaxent.impl import pallas_stats as ps
from jaxent.impl import pallas_tpu
from jaxent.impl.pallas_tpu import Config

_ROW_TAGS = ("y", "counted", "temp", "extra")


def default_config(n: int, d: int, v: int, dtype, streams: int = 1) -> Config:
    """The Mosaic kernels' default blocks (:func:`jaxent.impl.pallas_tpu.
    default_config`; one per-stream tile more in VMEM for a teacher, unmeasured)."""
    del streams
    return pallas_tpu.default_config(n, d, v, dtype)


def tile(cfg: Config) -> tuple[int, int, int]:
    """``(block_n, block_v, D alignment)`` of the padded operands (``D`` is not padded)."""
    return cfg.block_n, cfg.block_v, 1


def _params(cfg: Config, semantics=("parallel", "arbitrary")):
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


def _specs(spec, tags, arrays, order: str) -> list:
    """Blocks of each operand for a grid ``(token tile, vocabulary tile)`` (``order="nv"``)
    or ``(vocabulary tile, token tile)`` (``"vn"``)."""
    bn, bv = spec.config.block_n, spec.config.block_v

    def nv(f):
        return f if order == "nv" else (lambda j, i: f(i, j))

    out = []
    for t, a in zip(tags, arrays, strict=True):
        if t[0] in _ROW_TAGS and a.ndim == 2:  # [Np, c] blocks
            out.append(pl.BlockSpec((bn, a.shape[1]), nv(lambda i, j: (i, 0))))
        elif t[0] in _ROW_TAGS:
            out.append(pl.BlockSpec((1, bn), nv(lambda i, j: (0, i))))
        elif t[0] in ("b", "col"):
            out.append(pl.BlockSpec((1, bv), nv(lambda i, j: (0, j))))
        elif t[0] == "row_col":
            out.append(pl.BlockSpec((bn, bv), nv(lambda i, j: (i, j))))
        elif t[0] == "h":
            out.append(pl.BlockSpec((bn, a.shape[1]), nv(lambda i, j: (i, 0))))
        else:  # the kernel
            d = a.shape[0 if spec.layout == "dv" else 1]
            out.append(_w_spec(spec, d, order))
    return out


def _w_spec(spec, d: int, order: str) -> pl.BlockSpec:
    bv = spec.config.block_v
    if spec.layout == "dv":
        idx = (lambda i, j: (0, j)) if order == "nv" else (lambda j, i: (0, j))
        return pl.BlockSpec((d, bv), idx)
    idx = (lambda i, j: (j, 0)) if order == "nv" else (lambda j, i: (j, 0))
    return pl.BlockSpec((bv, d), idx)


def _lanes(tags, arrays):
    """The row and class vectors as ``[1, n]`` (``[Np, c]`` row blocks as they are)."""
    out = [a.reshape(1, -1) if t[0] in _ROW_TAGS + ("b", "col") and a.ndim == 1 else a
           for t, a in zip(tags, arrays, strict=True)]
    return out


def _vec(ref):
    """A row operand's tile: ``[bn]`` from a ``(1, bn)`` block, ``[bn, c]`` as it is."""
    return ref[...].reshape(-1) if ref.shape[0] == 1 else ref[...]


def _read(r: dict):
    """``(rows, extra row vectors, cols)`` of the current tile from its refs."""
    get = {t[0]: _vec(r[t]) for t in r if t[0] in ("y", "counted", "temp")}
    extra = [_vec(r["extra", i]) for i in range(sum(t[0] == "extra" for t in r))]
    cols = {t[1]: (ref[...] if t[0] == "row_col" else ref[...].reshape(-1))
            for t, ref in r.items() if t[0] in ("row_col", "col")}
    return ps.tile_rows(get), extra, cols


def _logits(spec, r: dict, streams: int):
    out = []
    for s in range(streams):
        b_ref = r.get(("b", s))
        out.append(ps.logits(r["h", s][...], r["w", s][...],
                             None if b_ref is None else b_ref[...].reshape(-1), spec.layout))
    return tuple(out)


def _split_extra(extra, trees):
    res_tree, cts_tree, n_res = trees
    return (jax.tree.unflatten(res_tree, extra[:n_res]),
            jax.tree.unflatten(cts_tree, extra[n_res:]))


# ------------------------------------------------------------------------------ forward


def _fwd_kernel(*refs, spec, tags, prev_tree, tree, streams):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    outs = refs[len(tags):]
    bn, bv = spec.config.block_n, spec.config.block_v
    j = pl.program_id(1)
    rows, extra, cols = _read(r)
    prev = None if prev_tree is None else jax.tree.unflatten(prev_tree, extra)
    stat = ps.pass_stat(spec, prev)
    acc = rm.compute_dtype(r["h", 0].dtype)

    @pl.when(j == 0)
    def _():
        for ref, leaf in zip(outs, jax.tree.leaves(stat.init(bn, acc)), strict=True):
            ref[...] = leaf.reshape(ref.shape)

    carry = jax.tree.unflatten(tree, [_vec(o) for o in outs])
    carry = ps.fold_tile(spec, stat, carry, _logits(spec, r, streams), rows, cols, j * bv)
    for ref, leaf in zip(outs, jax.tree.leaves(carry), strict=True):
        ref[...] = leaf.reshape(ref.shape)


def forward(spec, op: ps.Operands, prev_tree):
    """The carry's leaves ``[Np]`` of one pass (see :func:`jaxent.impl.pallas_stats_gpu.
    forward`)."""
    cfg = spec.config
    bn, bv = cfg.block_n, cfg.block_v
    tags, arrays = ps.flat(op)
    np_, vp = op.counted.shape[0], ps.vocab_size(op, spec.layout)
    acc = rm.compute_dtype(op.streams[0][0].dtype)
    prev = None if prev_tree is None else jax.tree.unflatten(prev_tree, op.extra)
    tree, leaves = ps.carry_leaves(ps.pass_stat(spec, prev), bn, acc)

    def out(t):  # a per-row leaf in (1, bn) lanes, a [bn, c] one in (bn, c) blocks
        if t:
            return pl.BlockSpec((bn, *t), lambda i, j: (i, 0)), (np_, *t)
        return pl.BlockSpec((1, bn), lambda i, j: (0, i)), (1, np_)

    arrays = [common.guard_platform(arrays[0], spec.interpret)] + arrays[1:]
    outs = common.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, tags=tags, prev_tree=prev_tree, tree=tree,
                          streams=len(op.streams)),
        grid=(np_ // bn, vp // bv), in_specs=_specs(spec, tags, arrays, "nv"),
        out_specs=[out(t)[0] for t, _ in leaves],
        out_shape=[jax.ShapeDtypeStruct(out(t)[1], dt) for t, dt in leaves],
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_stat_fwd",
        cost_estimate=ps.cost(spec, op, 1, np_ // bn),
    )(*_lanes(tags, arrays))
    return [o.reshape(-1) if not t else o for o, (t, _) in zip(outs, leaves, strict=True)]


# ----------------------------------------------------------------------------- backward


def _dh_kernel(*refs, spec, tags, trees, streams):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    dh_ref, acc_ref = refs[len(tags):]
    j, nv = pl.program_id(1), pl.num_programs(1)
    rows, extra, cols = _read(r)
    res, cts = _split_extra(extra, trees)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    dx, _ = ps.grad_tile(spec, res, _logits(spec, r, streams), rows, cols,
                         j * spec.config.block_v, cts)
    acc_ref[...] += common.dhidden_part(dx, r["w", 0][...], spec.layout)

    @pl.when(j == nv - 1)
    def _():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def dhidden(spec, op: ps.Operands, trees):
    """``d hidden [Np, D]`` of the padded first stream."""
    cfg = spec.config
    bn, bv = cfg.block_n, cfg.block_v
    tags, arrays = ps.flat(op)
    h = op.streams[0][0]
    np_, d = h.shape
    vp = ps.vocab_size(op, spec.layout)
    arrays = [common.guard_platform(arrays[0], spec.interpret)] + arrays[1:]
    return common.pallas_call(
        functools.partial(_dh_kernel, spec=spec, tags=tags, trees=trees,
                          streams=len(op.streams)),
        grid=(np_ // bn, vp // bv), in_specs=_specs(spec, tags, arrays, "nv"),
        out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((np_, d), h.dtype),
        scratch_shapes=[pltpu.VMEM((bn, d), rm.compute_dtype(h.dtype))],
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_stat_dhidden",
        cost_estimate=ps.cost(spec, op, 2, np_ // bn, elementwise=12),
    )(*_lanes(tags, arrays))


def _dc_kernel(*refs, spec, tags, trees, streams, diff):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    outs = refs[len(tags):]
    rows, extra, cols = _read(r)
    res, cts = _split_extra(extra, trees)
    _, dcols = ps.grad_tile(spec, res, _logits(spec, r, streams), rows, cols,
                            pl.program_id(1) * spec.config.block_v, cts)
    for name, o_ref in zip(diff, outs, strict=True):
        o_ref[...] = dcols[name].astype(o_ref.dtype)


def dcols(spec, op: ps.Operands, trees, diff: tuple) -> list:
    """The gradients ``[Np, Vp]`` of the per-row inputs ``diff`` (see
    :func:`jaxent.impl.pallas_stats_gpu.dcols`)."""
    cfg = spec.config
    bn, bv = cfg.block_n, cfg.block_v
    tags, arrays = ps.flat(op)
    np_, vp = op.counted.shape[0], ps.vocab_size(op, spec.layout)
    arrays = [common.guard_platform(arrays[0], spec.interpret)] + arrays[1:]
    return common.pallas_call(
        functools.partial(_dc_kernel, spec=spec, tags=tags, trees=trees,
                          streams=len(op.streams), diff=diff),
        grid=(np_ // bn, vp // bv), in_specs=_specs(spec, tags, arrays, "nv"),
        out_specs=[pl.BlockSpec((bn, bv), lambda i, j: (i, j))] * len(diff),
        out_shape=[jax.ShapeDtypeStruct((np_, vp), op.cols[k].dtype) for k in diff],
        compiler_params=_params(cfg, ("parallel", "parallel")), interpret=spec.interpret,
        name="jaxent_stat_dcols", cost_estimate=ps.cost(spec, op, 1, np_ // bn),
    )(*_lanes(tags, arrays))


def _dk_kernel(*refs, spec, tags, trees, streams, has_b):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    outs = refs[len(tags):]
    if has_b:
        dw_ref, db_ref, acc_ref, dbacc_ref = outs
    else:
        (dw_ref, acc_ref), db_ref, dbacc_ref = outs, None, None
    j, i, ni = pl.program_id(0), pl.program_id(1), pl.num_programs(1)
    rows, extra, cols = _read(r)
    res, cts = _split_extra(extra, trees)

    @pl.when(i == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
        if dbacc_ref is not None:
            dbacc_ref[...] = jnp.zeros(dbacc_ref.shape, dbacc_ref.dtype)

    dx, _ = ps.grad_tile(spec, res, _logits(spec, r, streams), rows, cols,
                         j * spec.config.block_v, cts)
    acc_ref[...] += common.dkernel_part(r["h", 0][...], dx, spec.layout)
    if dbacc_ref is not None:
        dbacc_ref[...] += jnp.sum(dx, axis=0, keepdims=True)

    @pl.when(i == ni - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)
        if db_ref is not None:
            db_ref[...] = dbacc_ref[...].astype(db_ref.dtype)


def dkernel(spec, op: ps.Operands, trees):
    """``(d kernel, d bias or None)`` of the padded first stream."""
    cfg = spec.config
    bn, bv = cfg.block_n, cfg.block_v
    tags, arrays = ps.flat(op)
    h, w, b = op.streams[0]
    np_, d = h.shape
    vp = ps.vocab_size(op, spec.layout)
    acc = rm.compute_dtype(h.dtype)
    out_specs = [_w_spec(spec, d, "vn")]
    out_shape = [jax.ShapeDtypeStruct(w.shape, w.dtype)]
    scratch = [pltpu.VMEM((d, bv) if spec.layout == "dv" else (bv, d), acc)]
    if b is not None:
        out_specs.append(pl.BlockSpec((1, bv), lambda j, i: (0, j)))
        out_shape.append(jax.ShapeDtypeStruct((1, vp), b.dtype))
        scratch.append(pltpu.VMEM((1, bv), acc))
    arrays = [common.guard_platform(arrays[0], spec.interpret)] + arrays[1:]
    out = common.pallas_call(
        functools.partial(_dk_kernel, spec=spec, tags=tags, trees=trees,
                          streams=len(op.streams), has_b=b is not None),
        grid=(vp // bv, np_ // bn), in_specs=_specs(spec, tags, arrays, "vn"),
        out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_stat_dkernel",
        cost_estimate=ps.cost(spec, op, 2, 2, elementwise=12),
    )(*_lanes(tags, arrays))
    return out[0], (out[1].reshape(-1) if b is not None else None)
