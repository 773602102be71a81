r"""The ``"stream"`` backward of the Triton fused linear cross-entropy (the default
``Config.backward`` of :mod:`jaxent.impl.pallas_gpu`): the logits gradient streamed through
global memory one chunk at a time, contracted by XLA's matmuls.

One kernel, ``dz``: grid ``(rows / block_n, columns / block_v)``, each program forms one
logits tile ``x = h W (+ b)`` (float32 accumulation over ``block_k`` slices of ``D``) and
writes its gradient ``dz = d loss / d x`` (:func:`jaxent.impl.pallas_common.grad_tile`) in
the input's dtype. It runs twice, on chunks of at most ``Config.chunk`` logits:

* ``d kernel`` (+ ``d bias``): for each vocabulary chunk ``[c, c + Vc)``, ``dz [Np, Vc]``,
  then ``dW[c : c + Vc] = h^T dz`` and ``db[c : c + Vc] = sum_rows dz``: each chunk of the
  output is one whole contraction over the tokens, written once in ``W``'s dtype;
* ``d hidden``: for each token chunk ``[r, r + Nc)``, ``dz [Nc, Vp]``, then
  ``dh[r : r + Nc] = dz W^T``, one whole contraction over the vocabulary.

So no accumulator outlives a chunk: the memory beyond the outputs is one ``dz`` chunk and
one chunk of ``W`` (or of ``h`` and the row vectors), about ``Config.chunk`` elements of the
input's dtype, instead of float32 ``[V, D]`` and ``[N, D]`` accumulators. Each logits tile is
formed once per gradient, as in the ``"accumulate"`` strategy; the two large contractions
are XLA's (cuBLAS) matmuls, and ``dz`` travels through global memory once each way. The
last chunk of a size that is not a multiple of the chunk starts early (at ``size - chunk``)
and recomputes a few columns or rows, writing the same values again: every chunk has one
static shape, so the loop is one ``fori_loop``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxent.impl import pallas_common as common
from jaxent.impl import pallas_gpu_blocks as blocks


def _dz_kernel(*refs, spec, has_b, has_w, dp, num_classes):
    h_ref, w_ref, b_ref, wt_ref, rest = blocks.unpack(refs, has_b, has_w)
    *row_refs, dz_ref = rest
    bk, bv = spec.config.block_k, spec.config.block_v
    start = pl.multiple_of(pl.program_id(1) * bv, bv)
    x = blocks.logits(spec, lambda k: h_ref[:, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
    rows = tuple(r[...] for r in row_refs)
    dz = common.grad_tile(x, rows, start, blocks.vslice(wt_ref, start, bv), spec.opts,
                          num_classes)
    dz_ref[...] = dz.astype(dz_ref.dtype)


def _dz(spec, h, w, b, rows, wt, num_classes: int, name: str):
    """``dz [n, v]`` in ``h``'s dtype for ``h [n, Dp]`` and the kernel ``w`` of ``v`` columns
    (labels in ``rows`` relative to ``w``'s first column; columns from ``num_classes`` on are
    0)."""
    cfg = spec.config
    n, dp = h.shape
    v = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row = pl.BlockSpec((cfg.block_n,), lambda i, j: (i,))
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    specs = [pl.BlockSpec((cfg.block_n, dp), lambda i, j: (i, 0)), pl.no_block_spec] + [
        pl.no_block_spec for a in (b, wt) if a is not None] + [row] * len(rows)
    return common.pallas_call(
        functools.partial(_dz_kernel, spec=spec, has_b=b is not None, has_w=wt is not None,
                          dp=dp, num_classes=num_classes),
        grid=(n // cfg.block_n, v // cfg.block_v), in_specs=specs,
        out_specs=pl.BlockSpec((cfg.block_n, cfg.block_v), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n, v), h.dtype),
        compiler_params=blocks.params(cfg), interpret=spec.interpret, name=name,
        cost_estimate=common.cost(n, dp, v, h.dtype.itemsize, matmuls=1,
                                  h_reads=v // cfg.block_v, w_reads=n // cfg.block_n,
                                  extra_bytes=4 * common.NUM_ROWS * n + n * v * h.dtype.itemsize,
                                  elementwise=12),
    )(*ins)


def chunk(size: int, block: int, other: int, budget: int) -> tuple[int, int]:
    """``(chunk, count)``: a whole number of ``block``\\ s of ``size`` (itself a multiple of
    ``block``) such that ``chunk * other <= budget`` (at least one block), and how many
    chunks cover ``size``.

    >>> chunk(1000 * 128, 128, 16384, 1 << 25)
    (2048, 63)
    """
    tiles = size // block
    per = max(1, min(tiles, budget // (other * block)))
    return per * block, -(-tiles // per)


def over_chunks(count: int, size: int, total: int, one, init):
    """``one(start, carry)`` over ``count`` chunks of ``size`` covering ``total``, the last
    starting at ``total - size``; one call when a single chunk covers it all."""
    if count == 1:
        return one(0, init)
    return lax.fori_loop(0, count, lambda c, carry: one(jnp.minimum(c * size, total - size),
                                                       carry), init)


def dkernel(spec, h, w, b, rows, wt):
    """``(d kernel, d bias or None)`` in ``w``'s and ``b``'s dtypes, by vocabulary chunks."""
    cfg = spec.config
    np_ = h.shape[0]
    vax = 1 if spec.layout == "dv" else 0
    vp = w.shape[vax]
    vc, count = chunk(vp, cfg.block_v, np_, cfg.chunk)

    def one(start, carry):
        cut = lambda a, axis=0: None if a is None else lax.dynamic_slice_in_dim(  # noqa: E731
            a, start, vc, axis)
        dz = _dz(spec, h, cut(w, vax), cut(b), (rows[0] - start,) + tuple(rows[1:]), cut(wt),
                 vc, "jaxent_lce_dkernel")
        return put_dkernel(carry, h, dz, start, spec.layout)

    init = (jnp.zeros(w.shape, w.dtype), None if b is None else jnp.zeros(b.shape, b.dtype))
    return over_chunks(count, vc, vp, one, init)


def put_dkernel(carry, h, dz, start, layout: str):
    """``(dW, db)`` with the vocabulary chunk ``[start, start + Vc)`` written from its logits
    gradient ``dz [Np, Vc]``: ``h^T dz`` (XLA's matmul) and ``sum_rows dz`` (in float32)."""
    dw, db = carry
    part = common.dot(h, dz, (0, 0)) if layout == "dv" else common.dot(dz, h, (0, 0))
    dw = lax.dynamic_update_slice_in_dim(dw, part.astype(dw.dtype), start,
                                         1 if layout == "dv" else 0)
    if db is not None:
        part_b = jnp.sum(dz.astype(jnp.float32), axis=0).astype(db.dtype)
        db = lax.dynamic_update_slice_in_dim(db, part_b, start, 0)
    return dw, db


def dhidden(spec, h, w, b, rows, wt):
    """``d hidden [Np, Dp]`` in ``h``'s dtype, by token chunks."""
    cfg = spec.config
    np_ = h.shape[0]
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    nc, count = chunk(np_, cfg.block_n, vp, cfg.chunk)

    def one(start, dh):
        cut = lambda a: lax.dynamic_slice_in_dim(a, start, nc, 0)  # noqa: E731
        dz = _dz(spec, cut(h), w, b, tuple(cut(r) for r in rows), wt, spec.num_classes,
                 "jaxent_lce_dhidden")
        part = common.dot(dz, w, (1, 1) if spec.layout == "dv" else (1, 0))
        return lax.dynamic_update_slice_in_dim(dh, part.astype(dh.dtype), start, 0)

    return over_chunks(count, nc, np_, one, jnp.zeros(h.shape, h.dtype))
