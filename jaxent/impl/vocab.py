"""The vocabulary blocks of the streaming walk (:mod:`jaxent.impl.stream`).

A device walks its columns in blocks of ``block_v`` (:func:`walk`, padding columns in blocks
of their own); each block of a linear head is ``h @ W_b + b_b`` (:func:`block`), its class
weights this device's slice of the full ``[V]`` (:func:`local_weight`), its global class
ids offset by the device's shard (:func:`shard_offset`).
"""

from __future__ import annotations

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


def stage_width(n: int, d: int, bv: int) -> int:
    """Columns of ``d kernel`` staged between writes into a bf16 gradient (a multiple of
    ``bv``): a ``[d, width]`` uint16 stage no bigger than one ``[n, bv]`` float32 block."""
    return bv * max(1, (2 * _platform.static_size(n)) // max(d, 1))
