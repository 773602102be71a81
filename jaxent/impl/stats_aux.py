r"""Row statistics with the extras of ``return_aux``: the log-sum-exp and the argmax.

Each statistic here is one of :mod:`jaxent.impl.stats` that also keeps, per row, the argmax
of each stream's raw logits (the first class that holds the row max) and gives
``lse = transform(m) + log s`` (:mod:`jaxent._rowmath`), all without gradient:

* :class:`LogProbsAux` -- outputs ``(log p_y, H, lse, argmax)``;
* :class:`SoftTargetsAux` -- ``(loss, lse, argmax)``;
* :class:`DistillAux` -- ``(loss, student lse, student argmax, teacher argmax)``; for
  ``"jsd"`` the argmaxes ride the first pass's residuals into the second pass
  (:class:`JsdAux`), whose outputs are the ones returned.

The argmax folds as ``arg = argmax(block) + start`` where the block's max exceeds the
running one; vocabulary shards merge it as the smallest global id among the shards that
hold the max. The gradients are the wrapped statistic's, from the cotangents of its own
outputs (the extras' are ignored).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxent._options import Options
  >>> from jaxent.impl import stats, stats_aux, stream
  >>> from jaxent.impl.plan import stream_plan
  >>> x = jax.random.normal(jax.random.key(0), (4, 10))
  >>> t = jax.nn.softmax(jax.random.normal(jax.random.key(1), (4, 10)))
  >>> loss, lse, arg = stream.run(stats_aux.SoftTargetsAux(10), stream_plan(Options(), 10,
  ...                             10, 4, block_size=4), ((x,),),
  ...                             stats.Rows(None, jnp.ones(4, bool)), {"targets": t})
  >>> bool(jnp.allclose(lse, jax.nn.logsumexp(x, -1))), bool((arg == x.argmax(-1)).all())
  (True, True)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxent import _rowmath as rm
from jaxent.impl.stats import Distill, LogProbs, SoftTargets, Statistic


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
    arg = rm.pmin(jnp.where(holds, arg, none), axis_name)
    return jnp.where(arg == none, 0, arg)


def lse(opts, m, log_s):
    """``transform(m) + log s`` of finished statistics, without gradient."""
    return lax.stop_gradient(rm.transform(m, opts) + log_s)


def _zeros(n):
    return jnp.zeros((n,), jnp.int32)


class _Argmax:
    """The carry of a statistic whose first two carried rows are ``(m, s)``, extended by the
    running argmax of the logits (:func:`fold_argmax`, :func:`merge_argmax`)."""

    def init(self, n, dtype):
        return super().init(n, dtype), _zeros(n)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        inner, arg = carry
        arg = fold_argmax(arg, inner[0], xs[0], start)
        return super().fold(opts, inner, xs, rows, cols, start, valid), arg

    def merge(self, opts, carry, axis_name):
        inner, arg = carry
        merged = super().merge(opts, inner, axis_name)
        return merged, merge_argmax(arg, inner[0], inner[1], merged[0], axis_name)


@dataclasses.dataclass(frozen=True)
class LogProbsAux(_Argmax, LogProbs):
    """:class:`~jaxent.impl.stats.LogProbs` with outputs ``(log p_y, H, lse, argmax)``; the
    last two carry no gradient."""

    def finish(self, opts, carry, rows):
        inner, arg = carry
        (logp, ent), res = super().finish(opts, inner, rows)
        return (logp, ent, lse(opts, res[0], res[1]), arg), res

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        return super().block_grad(opts, res, xs, rows, cols, start, cts[:2])


@dataclasses.dataclass(frozen=True)
class SoftTargetsAux(_Argmax, SoftTargets):
    """:class:`~jaxent.impl.stats.SoftTargets` with outputs ``(loss, lse, argmax)``; the last
    two carry no gradient."""

    def finish(self, opts, carry, rows):
        inner, arg = carry
        loss, res = super().finish(opts, inner, rows)
        return (loss, lax.stop_gradient(res[2]), arg), res

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        return super().block_grad(opts, res, xs, rows, cols, start, cts[0])


@dataclasses.dataclass(frozen=True)
class DistillAux(Distill):
    """:class:`~jaxent.impl.stats.Distill` with outputs ``(loss, lse, argmax, teacher
    argmax)`` (``lse`` the student's); the last three carry no gradient."""

    def init(self, n, dtype):
        return super().init(n, dtype), (_zeros(n), _zeros(n))

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        inner, (arg_s, arg_t) = carry
        arg_s = fold_argmax(arg_s, inner[0], xs[0], start)
        arg_t = fold_argmax(arg_t, inner[2], xs[1], start)
        return super().fold(opts, inner, xs, rows, cols, start, valid), (arg_s, arg_t)

    def merge(self, opts, carry, axis_name):
        inner, (arg_s, arg_t) = carry
        merged = super().merge(opts, inner, axis_name)
        return merged, (merge_argmax(arg_s, inner[0], inner[1], merged[0], axis_name),
                        merge_argmax(arg_t, inner[2], inner[3], merged[2], axis_name))

    def finish(self, opts, carry, rows):
        inner, args = carry
        loss, res = super().finish(opts, inner, rows)
        if self.kind == "jsd":  # the second pass gives the outputs: the ids go with it
            return (loss, lse(opts, res[0], res[1]), *args), (*res, *args)
        return (loss, lse(opts, res[0], res[1]), *args), res

    def then(self, res) -> Statistic | None:
        nxt = super().then(res[:5])
        return None if nxt is None else JsdAux(nxt, tuple(res[5:]))

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        return super().block_grad(opts, res[:5], xs, rows, cols, start, cts[0])


class JsdAux:
    """The second pass of :class:`DistillAux` ``"jsd"``: ``inner`` (the plain second pass)
    with outputs ``(loss, lse, argmax, teacher argmax)``, ``args`` the first pass's ids
    (held here: built while tracing, never hashed)."""

    streams = 2
    diff_cols: tuple[str, ...] = ()

    def __init__(self, inner: Statistic, args: tuple):
        self.inner, self.args = inner, args

    def init(self, n, dtype):
        return self.inner.init(n, dtype)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        return self.inner.fold(opts, carry, xs, rows, cols, start, valid)

    def merge(self, opts, carry, axis_name):
        return self.inner.merge(opts, carry, axis_name)

    def finish(self, opts, carry, rows):
        loss, res = self.inner.finish(opts, carry, rows)
        return (loss, lse(opts, res[0], res[1]), *self.args), res

    def then(self, res) -> Statistic | None:
        return None

    def block_grad(self, opts, res, xs, rows, cols, start, cts):  # pragma: no cover
        raise NotImplementedError("the jsd gradient is DistillAux's")
