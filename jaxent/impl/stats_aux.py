r"""Row statistics with the extras of ``return_aux``: the log-sum-exp and the argmax.

:class:`LogProbsAux` is :class:`~jaxent.impl.stats.LogProbs` that also keeps, per row, the
argmax of the raw logits (the first class that holds the row max) and gives
``lse = transform(m) + log s`` (:mod:`jaxent._rowmath`), both without gradient. The argmax
folds as ``arg = argmax(block) + start`` where the block's max exceeds the running one;
vocabulary shards merge it as the smallest global id among the shards that hold the max.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxent import _rowmath as rm
from jaxent.impl.stats import LogProbs


def fold_argmax(arg, m_old, x, start):
    """The running argmax ``arg [N]`` (int32 global ids) after a block of raw logits ``x``
    (``m_old``: the running max before it)."""
    barg = jnp.argmax(x, axis=1).astype(jnp.int32) + start
    return jnp.where(jnp.max(x, axis=1) > m_old, barg, arg)


def merge_argmax(arg, m_local, s_local, m_all, axis_name):
    """The argmax over vocabulary shards: the smallest id among the shards whose max is the
    merged max ``m_all`` (0 if none holds it, e.g. a row of ``-inf``)."""
    none = jnp.iinfo(jnp.int32).max
    holds = (s_local > 0) & (m_local == m_all)
    arg = lax.pmin(jnp.where(holds, arg, none), axis_name)
    return jnp.where(arg == none, 0, arg)


@dataclasses.dataclass(frozen=True)
class LogProbsAux(LogProbs):
    """:class:`~jaxent.impl.stats.LogProbs` with outputs ``(log p_y, H, lse, argmax)``; the
    last two carry no gradient."""

    def init(self, n, dtype):
        return super().init(n, dtype), jnp.zeros((n,), jnp.int32)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        inner, arg = carry
        arg = fold_argmax(arg, inner[0], xs[0], start)
        return super().fold(opts, inner, xs, rows, cols, start, valid), arg

    def merge(self, opts, carry, axis_name):
        inner, arg = carry
        merged = super().merge(opts, inner, axis_name)
        return merged, merge_argmax(arg, inner[0], inner[1], merged[0], axis_name)

    def finish(self, opts, carry, rows):
        inner, arg = carry
        (logp, ent), res = super().finish(opts, inner, rows)
        m, log_s, _ = res
        lse = lax.stop_gradient(rm.transform(m, opts) + log_s)
        return (logp, ent, lse, arg), res

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        return super().block_grad(opts, res, xs, rows, cols, start, cts[:2])
