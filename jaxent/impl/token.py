"""The fused token walk: the gradient made in the forward, three matmuls instead of four.

For float32/float64 ``"mean"``/``"sum"`` under differentiation. Each block of
``block_n`` tokens forms its full logits row ``h_b @ W + b``, the losses *and* their
gradient (:func:`jaxent.impl.rows.loss_and_grad`, Liger-Kernel style), and accumulates
``d hidden`` (its rows), ``d kernel`` (in place, in vocabulary slices of ``block_dw``) and
``d bias``; the backward only scales them by the incoming cotangent. Extra memory
``O(block_n * V)``.
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
from jaxent.impl import linear_ce
from jaxent.impl import rows as _rows
from jaxent.impl.plan import Plan


def _accumulate_dkernel(plan: Plan, q: Quirks, dk, hb, dx):
    """``dk += hb^T @ dx`` in vocabulary slices, in place (no full-size temporary).

    Every slice is ``block_dw`` wide, the last one shifted left to end at ``V`` with the
    columns already done masked out: a separate ragged tail step would read ``dx`` outside
    the loop, and XLA would re-derive that slice from ``exp(z - m)``, keeping that buffer
    alive next to ``dx`` (two ``[Nb, V]`` buffers instead of one).
    """
    v, bw = plan.local_classes, plan.block_dw
    axis = B.vocab_axis(plan.layout)

    def add(j, dk):
        start = B.piece_start(j, bw, v)
        piece = B.drop_before(B.vocab_slice(dx, start, bw, q), start, j * bw, 1)
        upd = B.block_dkernel(hb, piece, plan.layout, q)
        cur = lax.dynamic_slice_in_dim(dk, start, bw, axis=axis)
        return lax.dynamic_update_slice_in_dim(dk, cur + upd.astype(dk.dtype), start, axis=axis)

    return lax.fori_loop(0, -(-v // bw), add, dk)


def walk(plan: Plan, q: Quirks, h, kernel, bias, lab: rm.Labels, weight):
    """Loss sum, ``(lse, argmax)`` and the gradients for a unit cotangent."""
    n = h.shape[0]
    acc = rm.compute_dtype(h.dtype)

    def step(start, size, carry):
        total, dh, dk, db, lse, arg = carry
        sl = lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=0)  # noqa: E731
        hb = sl(h)
        x = B.block_logits(hb, kernel, bias, plan.layout)
        lab_b = rm.Labels(*(None if a is None else sl(a) for a in lab))
        # p formed again: dx takes the block logits' buffer (one [Nb, V] buffer, not two)
        loss_b, dx, lse_b = _rows.loss_and_grad(x, lab_b, weight, plan.opts, q, reuse_e=False)
        dh = lax.dynamic_update_slice_in_dim(
            dh, B.block_dhidden(dx, kernel, plan.layout).astype(dh.dtype), start, axis=0)
        dk = _accumulate_dkernel(plan, q, dk, hb, dx)
        if db is not None:
            db = db + jnp.sum(dx, axis=0).astype(db.dtype)
        lse = lax.dynamic_update_slice_in_dim(lse, lse_b, start, axis=0)
        if arg is not None:
            arg_b = jnp.argmax(x, axis=1).astype(jnp.int32)
            arg = lax.dynamic_update_slice_in_dim(arg, arg_b, start, axis=0)
        return total + jnp.sum(loss_b), dh, dk, db, lse, arg

    carry = (
        jnp.zeros((), acc),
        jnp.zeros(h.shape, h.dtype),
        jnp.zeros(kernel.shape, acc),
        None if bias is None else jnp.zeros(bias.shape, acc),
        jnp.zeros((n,), acc),
        jnp.zeros((n,), jnp.int32) if plan.aux else None,
    )
    carry = B.varying_like(carry, h, kernel, bias, lab, weight)
    nb, tail = B.blocks(n, plan.block_n)
    if nb:
        carry = lax.fori_loop(0, nb, lambda i, c: step(i * plan.block_n, plan.block_n, c),
                              carry)
    if tail:
        carry = step(nb * plan.block_n, tail, carry)
    total, dh, dk, db, lse, arg = carry
    return total, (lse, arg), (dh, dk.astype(kernel.dtype),
                               None if db is None else db.astype(bias.dtype))


def _primal(plan: Plan, h, kernel, bias, lab, weight):
    # Without differentiation: the vocabulary walk's statistics (no [N, V] gradient).
    losses, (lse, arg) = linear_ce.rows(plan, h, kernel, bias, lab, weight)
    return losses.sum(), (lse, arg)


def _fwd(plan: Plan, h, kernel, bias, lab, weight):
    total, aux, grads = _platform.per_platform(
        functools.partial(walk, plan), h, kernel, bias, lab, weight)
    # Zero-size slices carry the inputs' types (for psum_to_type inside shard_map).
    types = (h[:0], kernel[:0], None if bias is None else bias[:0])
    return (total, aux), (grads, weight, types)


def _bwd(plan: Plan, res, cts):
    (dh, dk, db), weight, (h_t, k_t, b_t) = res
    g = cts[0]
    scale = lambda a: None if a is None else a * g.astype(a.dtype)  # noqa: E731
    return (B.psum_to_type(scale(dh), h_t), B.psum_to_type(scale(dk), k_t),
            B.psum_to_type(scale(db), b_t), None,
            None if weight is None else jnp.zeros_like(weight))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def token_sum(plan: Plan, h, kernel, bias, lab: rm.Labels, weight):
    """Sum of per-token losses and ``(lse, argmax)``; the gradient is made in the forward."""
    return _primal(plan, h, kernel, bias, lab, weight)


token_sum.defvjp(_fwd, _bwd)
