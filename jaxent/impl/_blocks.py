"""Blocks of the fused walks: slices of the kernel, the block's logits and its gradients.

Each block of ``hidden @ kernel`` is formed in the accumulation dtype (float32 for 16-bit
inputs). The helpers take a :class:`~jaxent._platform.Quirks` where the CPU needs a detour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _platform
from jaxent import _rowmath as rm
from jaxent._platform import Quirks


def vocab_axis(layout: str) -> int:
    """The kernel's vocabulary axis: 1 for ``[D, V]`` (``"dv"``), 0 for ``[V, D]``."""
    return 1 if layout == "dv" else 0


def kernel_block(kernel: jax.Array, start, size: int, layout: str, q: Quirks) -> jax.Array:
    """Columns ``[start, start + size)`` of the vocabulary: ``[D, size]`` or ``[size, D]``."""
    return _platform.dslice(kernel, start, size, vocab_axis(layout), q)


def vocab_slice(v: jax.Array | None, start, size: int, q: Quirks) -> jax.Array | None:
    """``v[..., start:start + size]`` along the last axis (``None`` stays ``None``)."""
    return None if v is None else _platform.dslice(v, start, size, v.ndim - 1, q)


def block_logits(h: jax.Array, kb: jax.Array, bb: jax.Array | None, layout: str) -> jax.Array:
    """Raw logits ``h @ kb (+ bb)`` of one block, accumulated in float32: ``[N, B]``."""
    acc = rm.compute_dtype(h.dtype)
    dims = (((1,), (0,)), ((), ())) if layout == "dv" else (((1,), (1,)), ((), ()))
    x = lax.dot_general(h, kb, dims, preferred_element_type=acc)
    return x if bb is None else x + bb.astype(acc)[None, :]


def block_dhidden(dx: jax.Array, kb: jax.Array, layout: str) -> jax.Array:
    """``dx @ kb^T``: ``[N, B] x kernel block -> [N, D]`` in float32."""
    acc = rm.compute_dtype(kb.dtype)
    dims = (((1,), (1,)), ((), ())) if layout == "dv" else (((1,), (0,)), ((), ()))
    return lax.dot_general(dx.astype(kb.dtype), kb, dims, preferred_element_type=acc)


def block_dkernel(h: jax.Array, dx: jax.Array, layout: str, q: Quirks) -> jax.Array:
    """``h^T @ dx`` in the kernel's layout (``[D, B]`` or ``[B, D]``), float32 accumulation
    (``[D, B]`` pinned row-major where ``q.pin_row_major`` asks)."""
    acc = rm.compute_dtype(h.dtype)
    dx = dx.astype(h.dtype)
    if q.transpose_bf16_dkernel and h.dtype == jnp.bfloat16:
        out = lax.dot_general(_platform.transposed(dx), h, (((1,), (0,)), ((), ())),
                              preferred_element_type=acc)
        # The barrier keeps XLA from folding this transpose into the dot (h^T @ dx again).
        return out if layout == "vd" else _platform.transposed(lax.optimization_barrier(out))
    if layout == "dv":
        out = lax.dot_general(h, dx, (((0,), (0,)), ((), ())), preferred_element_type=acc)
        return _platform.row_major(out, q)
    return lax.dot_general(dx, h, (((0,), (0,)), ((), ())), preferred_element_type=acc)


def piece_start(i, size: int, total: int):
    """Start of piece ``i`` of an axis of ``total`` walked in pieces of a static ``size``:
    ``i * size``, the last piece shifted back to end at ``total``."""
    return jnp.minimum(i * size, total - size)


def drop_before(x: jax.Array, start, done, axis: int) -> jax.Array:
    """``x``, a piece starting at ``start`` along ``axis``, with the entries before ``done``
    zeroed: the ones an earlier piece already counted."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    ids = start + lax.broadcasted_iota(jnp.int32, tuple(shape), axis)
    return jnp.where(ids >= done, x, 0.0)


def blocks(total: int, size: int) -> tuple[int, int]:
    """``(number of full blocks, size of the ragged tail)``."""
    return total // size, total % size


def add_dhidden(dh: jax.Array, dx: jax.Array, kb: jax.Array, layout: str,
                max_elems: int) -> jax.Array:
    """``dh + dx @ kb^T`` in row slices of at most ``max_elems`` float32 elements, so no
    ``[N, D]`` product is held next to ``dh``; the last slice is shifted up to end at ``N``,
    its repeated rows masked out. A symbolic ``N`` (export) is added in one piece."""
    n, d = dh.shape
    rows = max(1, max_elems // max(d, 1))
    if not isinstance(n, int) or rows >= n:
        return dh + block_dhidden(dx, kb, layout)

    def add(i, dh):
        start = piece_start(i, rows, n)
        piece = drop_before(lax.dynamic_slice_in_dim(dx, start, rows, 0), start, i * rows, 0)
        cur = lax.dynamic_slice_in_dim(dh, start, rows, 0)
        return lax.dynamic_update_slice_in_dim(dh, cur + block_dhidden(piece, kb, layout),
                                               start, 0)

    return lax.fori_loop(0, -(-n // rows), add, dh)


# ------------------------------------------------------------- inside jax.shard_map


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; older: ``aval.vma``
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def varying_axes(*trees) -> frozenset:
    """The manual mesh axes that any array of ``trees`` varies over (empty outside
    ``jax.shard_map``)."""
    return frozenset().union(*(_varying_axes(a) for a in jax.tree.leaves(trees)))


def varies(x, axis) -> bool:
    """Whether ``x``'s type says it varies over the manual mesh axis (or axes) ``axis``."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    return all(a in _varying_axes(x) for a in axes)


def varying_like(carry, *refs):
    """Mark a loop's initial ``carry`` as varying over the manual mesh axes ``refs`` vary over.

    Inside ``jax.shard_map`` (``check_vma=True``) a ``fori_loop`` needs its carry to have the
    same type in and out; zeros made here are replicated while the block updates computed
    from sharded operands are varying. Outside ``shard_map`` this returns ``carry`` as is.
    """
    axes = varying_axes(refs)
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
