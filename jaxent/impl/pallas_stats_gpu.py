r"""The statistic kernels of :mod:`jaxent.impl.pallas_stats` for NVIDIA GPUs (Triton).

Blocks are :class:`jaxent.impl.pallas_gpu.Config`'s (``block_n``, ``block_v``, ``block_k``,
``v_split``, ``chunk`` and the launch parameters); the operands come padded to whole tiles,
``D`` to a multiple of ``block_k``. Each logits tile ``x = h W (+ b)`` is formed over
``block_k`` slices of ``D`` in float32:

* forward, grid ``(Np / block_n, v_split)``: program ``(i, s)`` walks the ``s``-th range of
  ``ceil(T / v_split)`` of the ``T = Vp / block_v`` vocabulary tiles (the last ranges
  shorter or empty: the vocabulary is not padded for the split) with a ``fori_loop``, each
  tile folded by the statistic, and writes its carry's ``[block_n]`` vectors once, to rows
  ``s Np + i block_n`` of ``[v_split Np]`` outputs; ``stat.merge`` over the ranges' array
  axis gives the ``[Np]`` carry (:func:`jaxent.impl.pallas_stats.merge_splits`, a few
  ``[v_split, Np]`` element-wise ops in XLA). A statistic that cannot merge
  (``vocab_splits = False``) runs with ``v_split = 1``.
* backward, streamed (:mod:`jaxent.impl.pallas_gpu_stream`):
  one ``dz`` kernel, one program per ``[block_n, block_v]`` tile, writes the logits gradient
  ``dz = stat.block_grad`` (0 on padding columns) of a chunk of at most ``Config.chunk``
  logits in the hidden states' dtype, and XLA's matmuls contract it: ``d kernel``
  (+ ``d bias``) by vocabulary chunks, ``dW[c] = h^T dz`` and ``db[c] = sum_rows dz``
  (grid ``(Np / block_n, Vc / block_v)``); ``d hidden`` by token chunks,
  ``dh[r] = dz W^T`` (grid ``(Nc / block_n, Vp / block_v)``). Each logits tile is formed
  once per gradient; nothing float32 of the gradients' size is kept, only one chunk.
* per-row inputs' gradients ``(Np / block_n, Vp / block_v)``: one tile each.

No atomics: each output element has one writer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxent import _rowmath as rm
from jaxent.impl import pallas_common as common
from jaxent.impl import pallas_gpu_blocks as blocks
from jaxent.impl import pallas_gpu_stream as stream
from jaxent.impl import pallas_stats as ps
from jaxent.impl.pallas_gpu_blocks import Config

_ROW_TAGS = ("y", "counted", "temp", "extra")


def default_config(n: int, d: int, v: int, dtype, streams: int = 1) -> Config:
    """The Triton kernels' default blocks (:func:`jaxent.impl.pallas_gpu_blocks.
    default_config`), with token tiles divided by the number of ``streams`` (each program
    holds a ``[block_n, block_v]`` float32 logits tile per stream); the forward's vocabulary
    split ``v_split`` shrinks as the token tiles multiply, for as many programs as a
    one-stream forward.

    >>> cfg = default_config(512, 256, 4096, "bfloat16")
    >>> (512 // cfg.block_n) * cfg.v_split   # programs of the forward, for 132 SMs
    128
    """
    cfg = blocks.default_config(n, d, v, dtype)
    bn = max(16, cfg.block_n // streams)
    tiles = -(-n // cfg.block_n), -(-n // bn)
    return dataclasses.replace(cfg, block_n=bn,
                               v_split=max(1, cfg.v_split * tiles[0] // tiles[1]))


def tile(cfg: Config) -> tuple[int, int, int]:
    """``(block_n, block_v, D alignment)`` of the padded operands."""
    return cfg.block_n, cfg.block_v, cfg.block_k


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


def _split_row_spec(bn: int, nn: int, trailing: tuple) -> pl.BlockSpec:
    """The block of a per-row output ``[v_split * Np, *trailing]`` of program ``(i, s)`` on
    the forward's grid ``(nn = Np / bn, v_split)``: rows ``s Np + i bn``."""
    zeros = (0,) * len(trailing)
    return pl.BlockSpec((bn, *trailing), lambda i, s: (s * nn + i, *zeros))


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


def _fwd_kernel(*refs, spec, tags, prev_tree, streams, tiles):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    outs = refs[len(tags):]
    bn, bv, splits = spec.config.block_n, spec.config.block_v, spec.config.v_split
    rows, extra = _rows(r, Ellipsis)
    prev = None if prev_tree is None else jax.tree.unflatten(prev_tree, extra)
    stat = ps.pass_stat(spec, prev)
    cs = pl.ds(pl.multiple_of(pl.program_id(0) * bn, bn), bn)
    per = -(-tiles // splits)  # tiles per range; the last ranges hold fewer (or none)
    first = pl.program_id(1) * per
    count = per if tiles % splits == 0 else jnp.clip(tiles - first, 0, per)

    def body(j, carry):
        start = pl.multiple_of((first + j) * bv, bv)
        cols = _cols(spec, r, cs, start)
        xs = _logits(spec, r, Ellipsis, start, streams)
        return ps.fold_tile(spec, stat, carry, xs, rows, cols, start)

    carry = stat.init(bn, rm.compute_dtype(r["h", 0].dtype))
    carry = lax.fori_loop(0, count, body, carry)
    for ref, leaf in zip(outs, jax.tree.leaves(carry), strict=True):
        ref[...] = leaf


def forward(spec, op: ps.Operands, prev_tree):
    """The carry's leaves ``[Np]`` of one pass (``prev_tree``: the structure of the first
    pass's residuals in ``op.extra`` for the second pass, else None), the vocabulary ranges'
    carries merged."""
    cfg = spec.config
    bn, splits = cfg.block_n, cfg.v_split
    tags, arrays = ps.flat(op)
    np_, vp = op.counted.shape[0], ps.vocab_size(op, spec.layout)
    nn = np_ // bn
    acc = rm.compute_dtype(op.streams[0][0].dtype)
    prev = None if prev_tree is None else jax.tree.unflatten(prev_tree, op.extra)
    stat = ps.pass_stat(spec, prev)
    tree, leaves = ps.carry_leaves(stat, bn, acc)
    specs = _in_specs(tags, arrays, bn, lambda d: pl.BlockSpec((bn, d), lambda i, s: (i, 0)))
    out_specs = [_split_row_spec(bn, nn, t) for t, _ in leaves]
    out_shape = [jax.ShapeDtypeStruct((splits * np_, *t), dt) for t, dt in leaves]
    out_bytes = sum(o.size * o.dtype.itemsize for o in out_shape)
    outs = common.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, tags=tags, prev_tree=prev_tree,
                          streams=len(op.streams), tiles=vp // cfg.block_v),
        grid=(nn, splits), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=blocks.params(cfg), interpret=spec.interpret,
        name="jaxent_stat_fwd",
        cost_estimate=ps.cost(spec, op, 1, nn, h_reads=splits, out_bytes=out_bytes),
    )(*_guarded(spec, arrays))
    if splits == 1:
        return outs
    return ps.merge_splits(spec, stat, tree, list(outs), splits, op.temp)


# ----------------------------------------------------------------------------- backward


def _dz_kernel(*refs, spec, tags, trees, streams):
    r = dict(zip(tags, refs[:len(tags)], strict=True))
    off_ref, dz_ref = refs[len(tags):]
    bn, bv = spec.config.block_n, spec.config.block_v
    rs = pl.ds(pl.multiple_of(off_ref[0] + pl.program_id(0) * bn, bn), bn)
    start = pl.multiple_of(off_ref[1] + pl.program_id(1) * bv, bv)
    rows, extra = _rows(r, rs)
    res, cts = _split_extra(extra, trees)
    xs = _logits(spec, r, rs, start, streams)
    dx, _ = ps.grad_tile(spec, res, xs, rows, _cols(spec, r, rs, start), start, cts)
    dz_ref[...] = dx.astype(dz_ref.dtype)


def _dz(spec, op: ps.Operands, trees, offsets, nc: int, vc: int, name: str):
    """``dz [nc, vc]`` in the hidden states' dtype: the logits gradient of the rows from
    ``offsets[0]`` and the columns from ``offsets[1]`` (int32 ``[2]``, multiples of the
    tile), one tile per program."""
    cfg = spec.config
    bn, bv = cfg.block_n, cfg.block_v
    tags, arrays = ps.flat(op)
    h = op.streams[0][0]
    d = sum(s[0].shape[1] for s in op.streams)
    rows = 4 * nc * (3 + len(op.extra))
    return common.pallas_call(
        functools.partial(_dz_kernel, spec=spec, tags=tags, trees=trees,
                          streams=len(op.streams)),
        grid=(nc // bn, vc // bv), in_specs=[pl.no_block_spec] * (len(arrays) + 1),
        out_specs=pl.BlockSpec((bn, bv), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((nc, vc), h.dtype),
        compiler_params=blocks.params(cfg), interpret=spec.interpret, name=name,
        cost_estimate=common.cost(nc, d, vc, h.dtype.itemsize, matmuls=1,
                                  h_reads=vc // bv, w_reads=nc // bn,
                                  extra_bytes=rows + nc * vc * h.dtype.itemsize,
                                  elementwise=12),
    )(*_guarded(spec, arrays), offsets)


def _at(rows, cols):
    """The int32 ``[2]`` offsets operand of :func:`_dz`."""
    return jnp.stack([jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)])


def dhidden(spec, op: ps.Operands, trees):
    """``d hidden [Np, Dp]`` of the padded first stream, by token chunks: ``dz`` of a chunk
    of rows over the whole vocabulary, then ``dh[chunk] = dz W^T`` (XLA's matmul)."""
    cfg = spec.config
    h, w, _ = op.streams[0]
    np_, vp = h.shape[0], ps.vocab_size(op, spec.layout)
    nc, count = stream.chunk(np_, cfg.block_n, vp, cfg.chunk)

    def one(start, dh):
        dz = _dz(spec, op, trees, _at(start, 0), nc, vp, "jaxent_stat_dhidden")
        part = common.dot(dz, w, (1, 1) if spec.layout == "dv" else (1, 0))
        return lax.dynamic_update_slice_in_dim(dh, part.astype(dh.dtype), start, 0)

    return stream.over_chunks(count, nc, np_, one, jnp.zeros(h.shape, h.dtype))


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


def dkernel(spec, op: ps.Operands, trees):
    """``(d kernel, d bias or None)`` of the padded first stream, by vocabulary chunks:
    ``dz`` of all rows over a chunk of columns, then ``dW[chunk] = h^T dz`` (XLA's matmul)
    and ``db[chunk] = sum_rows dz``."""
    cfg = spec.config
    h, w, b = op.streams[0]
    np_, vp = h.shape[0], ps.vocab_size(op, spec.layout)
    vc, count = stream.chunk(vp, cfg.block_v, np_, cfg.chunk)

    def one(start, carry):
        dz = _dz(spec, op, trees, _at(0, start), np_, vc, "jaxent_stat_dkernel")
        return stream.put_dkernel(carry, h, dz, start, spec.layout)

    init = (jnp.zeros(w.shape, w.dtype), None if b is None else jnp.zeros(b.shape, b.dtype))
    return stream.over_chunks(count, vc, vp, one, init)
