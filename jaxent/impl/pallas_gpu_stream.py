r"""The chunk loops of the streamed backward of the GPU statistic kernels
(:mod:`jaxent.impl.pallas_stats_gpu`): the logits gradient ``dz`` goes through global memory
one chunk at a time, in the input's dtype, and XLA's matmuls contract each chunk whole.

* ``d kernel`` (+ ``d bias``): for each vocabulary chunk ``[c, c + Vc)``, ``dz [Np, Vc]``,
  then ``dW[c : c + Vc] = h^T dz`` and ``db[c : c + Vc] = sum_rows dz`` (:func:`put_dkernel`):
  each chunk of the output is one whole contraction over the tokens, written once;
* ``d hidden``: for each token chunk ``[r, r + Nc)``, ``dz [Nc, Vp]``, then
  ``dh[r : r + Nc] = dz W^T``, one whole contraction over the vocabulary.

No accumulator outlives a chunk: the memory beyond the outputs is one ``dz`` chunk and one
chunk's product, about ``Config.chunk`` elements, instead of float32 ``[V, D]`` and
``[N, D]`` accumulators; each logits tile is formed once per gradient. The last chunk of a
size that is not a multiple of the chunk starts early (at ``size - chunk``) and recomputes
a few columns or rows, writing the same values again: every chunk has one static shape, so
the loop is one ``fori_loop`` (:func:`over_chunks`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxent.impl import pallas_common as common


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
