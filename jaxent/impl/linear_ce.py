r"""The fused cross-entropy's vocabulary walk: :class:`~jaxent.impl.stats.CrossEntropy` on
the streaming walk (:mod:`jaxent.impl.stream`) over a linear head.

The forward folds each block of ``h @ W_b + b_b`` into the online row statistics; on a
vocabulary shard they are merged over the mesh axis (one ``pmax`` and a ``psum`` of ``[N]``
vectors). The backward recomputes each block's logits, forms its gradient from the kept
``m``, ``log s`` and ``lse`` and writes ``d hidden += dz @ W_b^T`` (float32),
``d W_b = h^T @ dz`` and ``d b_b``. Extra memory ``O(N * block_v)``; four matmuls in all.
"""

from __future__ import annotations

from typing import cast

from jax import lax

from jaxent import _rowmath as rm
from jaxent.impl import _blocks as B
from jaxent.impl import stats, stream, vocab
from jaxent.impl.plan import Plan

RESIDUALS = 4  # the [N] residuals of forward: m, log s, lse and the summed class weights


def _rows(lab: rm.Labels) -> stats.Rows:
    """The labels as the statistic's per-row inputs (``Labels`` has ``Rows``' fields and
    the ones :class:`~jaxent.impl.stats.CrossEntropy` reads besides)."""
    return cast(stats.Rows, lab)


def statistic(plan: Plan, h, kernel, bias, weight) -> tuple:
    """``(statistic, streams, cols)`` of the fused cross-entropy: the arguments of the
    walks over any statistic (:func:`jaxent.impl.stream.run`, the Pallas kernels'
    :func:`jaxent.impl.pallas.dispatch_stat`)."""
    return (stats.CrossEntropy(plan.num_classes, plan.aux), ((h, kernel, bias),),
            {"weight": vocab.local_weight(weight, plan)})


def rows(plan: Plan, h, kernel, bias, lab: rm.Labels, weight):
    """Per-token losses ``[N]`` and ``(lse [N], argmax [N] or None)`` of ``h [N, D] @
    kernel (+ bias)`` against :class:`~jaxent._rowmath.Labels` (a ``jax.custom_vjp``).

    With ``plan.vocab_axis`` (inside ``jax.shard_map``) ``kernel`` and ``bias`` are this
    device's ``V / k`` columns, ``weight`` the full ``[V]``; the result is the full
    vocabulary's on every shard.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxent import _rowmath as rm
      >>> from jaxent._options import Options
      >>> from jaxent.impl import linear_ce
      >>> from jaxent.impl.plan import make_plan
      >>> h = jax.random.normal(jax.random.key(0), (4, 8))
      >>> k = jax.random.normal(jax.random.key(1), (8, 50))
      >>> lab = rm.labels_info(jnp.array([1, 7, 49, 0]), 50, -100, None, None, jnp.float32)
      >>> plan = make_plan(Options(), 50, 50, 4, 8, "dv", False, block_size=16)
      >>> losses, _ = linear_ce.rows(plan, h, k, None, lab, None)
      >>> ref = -jnp.take_along_axis(jax.nn.log_softmax(h @ k), lab.y[:, None], 1)[:, 0]
      >>> bool(jnp.allclose(losses, ref, rtol=1e-5))
      True
    """
    stat, streams, cols = statistic(plan, h, kernel, bias, weight)
    losses, lse, arg = stream.run(stat, plan, streams, lab, cols)
    return losses, (lse, arg)


def forward(plan: Plan, h, kernel, bias, lab: rm.Labels, weight):
    """``(losses, lse, argmax or None, residuals)`` of :func:`rows`'s forward walk (no
    ``custom_vjp``: for placements that split it); the residuals are ``[N]`` arrays."""
    stat, streams, cols = statistic(plan, h, kernel, bias, weight)
    (losses, lse, arg), res = stream.forward(stat, plan, streams, _rows(lab), cols)
    return losses, lse, arg, tuple(res)


def grads(plan: Plan, h, kernel, bias, lab: rm.Labels, weight, res: tuple, g):
    """``(d hidden, d kernel, d bias)`` of :func:`rows` for the per-token cotangent ``g``,
    from :func:`forward`'s residuals, ``d hidden`` summed over the vocabulary shards."""
    stat, streams, cols = statistic(plan, h, kernel, bias, weight)
    (dh, dk, db), _ = stream.grads(stat, plan, streams, _rows(lab), cols, res, (g, None, None))
    if plan.vocab_axis is not None and not B.varies(dh, plan.vocab_axis):
        dh = lax.psum(dh, plan.vocab_axis)  # untyped shards: each holds its classes' share
    return dh, dk, db

