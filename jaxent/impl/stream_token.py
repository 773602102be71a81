r"""The token walk over any row statistic (:mod:`jaxent.impl.stats`): ``impl="token"``.

Where :func:`jaxent.impl.stream.run` walks vocabulary blocks of every token at once, this
walk takes the tokens in blocks of ``plan.block_n`` rows and forms each block's *whole*
vocabulary row at once: per block ``x_b = h_b W + b`` (``[block_n, V]``, the accumulation
dtype), folded into the statistic as one block (``stat.fold`` with ``start = 0``), the
carries of all blocks put together and finished once (``stat.finish``); a statistic with a
second pass (``stat.then``, e.g. JSD) walks the token blocks again, each block's pass built
from its rows of the first pass's residuals. Streams are materialized rows ``(x,)`` or
linear heads ``(h, kernel, bias)``; a teacher is a second stream (a constant).

It is a ``jax.custom_vjp`` keeping ``O(N)`` residuals; the backward walks the token blocks
again and, per block, forms ``dx_b`` from ``stat.block_grad`` (0 on padding columns) and

.. math::
    dh_b = dx_b W^T,\qquad dW \mathrel{+}= h_b^T dx_b,\qquad
    db \mathrel{+}= \textstyle\sum_{rows} dx_b

with ``dW``, ``db`` accumulated in float32 and written in the kernel's dtype at the end.
The tokens are padded to whole blocks with rows that are not counted. Extra memory
``O(block_n V)`` plus the float32 ``dW``; no vocabulary-parallel split (whole rows).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxent._options import Options
  >>> from jaxent.impl import stats, stream_token
  >>> from jaxent.impl.plan import stream_plan
  >>> h = jax.random.normal(jax.random.key(0), (5, 8))
  >>> w = jax.random.normal(jax.random.key(1), (8, 40))
  >>> y = jnp.array([0, 3, 39, 7, 1])
  >>> plan = stream_token.token_plan(stream_plan(Options(), 40, 40, 5), 5, 2)
  >>> lp, _ = stream_token.run(stats.LogProbs(40), plan, ((h, w, None),),
  ...                          stats.Rows(y, jnp.ones(5, bool)), {})
  >>> ref = jnp.take_along_axis(jax.nn.log_softmax(h @ w), y[:, None], 1)[:, 0]
  >>> bool(jnp.allclose(lp, ref, atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _platform
from jaxent import _rowmath as rm
from jaxent.impl import _blocks as B
from jaxent.impl.plan import Plan, auto_block_sizes
from jaxent.impl.stats import Rows, Statistic


def token_plan(plan: Plan, n: int, block_n: int | None = None) -> Plan:
    """``plan`` with its token block: ``block_n`` (clipped to ``n``) or the default of
    :func:`jaxent.impl.plan.auto_block_sizes` for ``n`` tokens and the vocabulary."""
    bn = auto_block_sizes(n, 1, plan.local_classes)[1] if block_n is None else block_n
    return dataclasses.replace(plan, block_n=max(1, min(bn, max(n, 1))))


def _block_n(plan: Plan, n: int) -> int:
    """The plan's token block (its default when the plan leaves it at 0)."""
    return plan.block_n or token_plan(plan, n).block_n


def _acc(streams) -> jnp.dtype:
    return rm.compute_dtype(streams[0][0].dtype)


def _per_row(cols: dict) -> dict:
    """Which per-class inputs also run along the rows (``[N, V]`` targets, not ``[V]``)."""
    return {k: a is not None and a.ndim == 2 for k, a in cols.items()}


def _blocked(tree, nb: int, bn: int):
    """Every ``[N, ...]`` leaf padded to ``nb * bn`` rows and cut into ``[nb, bn, ...]``."""
    def cut(a):
        a = jnp.pad(a, [(0, nb * bn - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((nb, bn) + a.shape[1:])
    return jax.tree.map(cut, tree)


def _rows_blocked(rows: Rows, nb: int, bn: int) -> Rows:
    """The rows (a :class:`~jaxent.impl.stats.Rows` or another NamedTuple of ``[N, ...]``
    per-row inputs with ``counted`` and ``temp``) cut into blocks: padding rows are not
    counted and have temperature 1."""
    temp = rows.temp
    if temp is not None:
        temp = jnp.pad(temp, (0, nb * bn - temp.shape[0]), constant_values=1)
    blocked = _blocked(rows._replace(temp=None), nb, bn)
    return blocked._replace(temp=None if temp is None else temp.reshape(nb, bn))


def _valid(plan: Plan, size: int):
    """``[1, size]`` columns that are classes, or None when every column is one."""
    if not plan.padded:
        return None
    return lax.broadcasted_iota(jnp.int32, (1, size), 1) < plan.num_classes


def _logits(plan: Plan, ops, valid):
    """The whole raw-logit rows of one block of a stream (``[bn, V]``, accumulation dtype)."""
    if len(ops) == 1:
        x = ops[0].astype(rm.compute_dtype(ops[0].dtype))
    else:
        h, k, b = ops
        x = B.block_logits(h, k, b, plan.layout)
    return x if valid is None else rm.mask_columns(x, valid)


def _split(streams, rows: Rows, cols: dict, bn: int):
    """``(nb, per-block streams, rows, per-row cols, per-class cols)``."""
    n = streams[0][0].shape[0]
    nb = -(-max(n, 1) // bn)
    per_row = _per_row(cols)
    sb = tuple((_blocked(ops[0], nb, bn),) + tuple(ops[1:]) for ops in streams)
    rcols = {k: _blocked(a, nb, bn) for k, a in cols.items() if per_row[k]}
    ccols = {k: a for k, a in cols.items() if not per_row[k]}
    return nb, sb, _rows_blocked(rows, nb, bn), rcols, ccols


def _block_inputs(sb, xs_b):
    """Streams of one block: its rows of each stream's first operand, the rest shared."""
    return tuple((x,) + tuple(ops[1:]) for x, ops in zip(xs_b, sb, strict=True))


def _pass(stat: Statistic, plan: Plan, streams, rows: Rows, cols: dict, res=None):
    """One pass: ``(outputs, residuals)`` of ``stat`` (or of ``stat.then(res)`` per block
    when ``res`` is given: the second pass, built from each block's residual rows)."""
    n = streams[0][0].shape[0]
    bn = _block_n(plan, n)
    nb, sb, rb, rcols, ccols = _split(streams, rows, cols, bn)
    resb = None if res is None else _blocked(res, nb, bn)
    acc = _acc(streams)
    valid = _valid(plan, plan.local_classes)

    def one(args):
        xs_b, r, rc, rs = args
        st = stat if rs is None else stat.then(rs)
        assert st is not None
        blocks = _block_inputs(sb, xs_b)
        xs = tuple(_logits(plan, ops, valid) for ops in blocks)
        opts = rm.row_options(plan.opts, r.temp)
        carry = B.varying_like(st.init(bn, acc), streams, rows, cols)
        return st.fold(opts, carry, xs, r, {**rc, **ccols}, 0, valid)

    carry = lax.map(one, (tuple(s[0] for s in sb), rb, rcols, resb))
    carry = jax.tree.map(lambda a: a.reshape((nb * bn,) + a.shape[2:])[:n], carry)
    st = stat if res is None else stat.then(res)
    assert st is not None
    return st.finish(rm.row_options(plan.opts, rows.temp), carry, rows)


def _forward(stat: Statistic, plan: Plan, streams, rows: Rows, cols: dict):
    out, res = _pass(stat, plan, streams, rows, cols)
    cur, nxt = stat, stat.then(res)
    while nxt is not None:
        out, res_next = _pass(cur, plan, streams, rows, cols, res)
        cur, res = nxt, res_next
        nxt = cur.then(res)
    return out, res


def _grads(stat: Statistic, plan: Plan, streams, rows: Rows, cols: dict, res, cts):
    n = streams[0][0].shape[0]
    bn = _block_n(plan, n)
    nb, sb, rb, rcols, ccols = _split(streams, rows, cols, bn)
    resb, ctsb = _blocked(res, nb, bn), _blocked(cts, nb, bn)
    acc = _acc(streams)
    valid = _valid(plan, plan.local_classes)
    head = len(streams[0]) == 3

    def one(g, args):
        xs_b, r, rc, rs, ct = args
        blocks = _block_inputs(sb, xs_b)
        xs = tuple(_logits(plan, ops, valid) for ops in blocks)
        opts = rm.row_options(plan.opts, r.temp)
        dx, dcb = stat.block_grad(opts, rs, xs, r, {**rc, **ccols}, 0, ct)
        if valid is not None:
            dx = jnp.where(valid, dx, 0.0)
        dcb = {k: dcb[k] for k in stat.diff_cols}
        if not head:
            return g, (dx.astype(streams[0][0].dtype), dcb)
        h_b, k, b = blocks[0]
        dk, db = g
        dk = dk + B.block_dkernel(h_b, dx, plan.layout, _platform.NONE)
        db = None if db is None else db + dx.sum(0)
        return (dk, db), (B.block_dhidden(dx, k, plan.layout).astype(h_b.dtype), dcb)

    g0: tuple = ()
    if head:
        _, k, b = streams[0]
        g0 = (jnp.zeros(k.shape, acc), None if b is None else jnp.zeros(b.shape, acc))
    g0 = B.varying_like(g0, streams, rows, cols, res, cts)
    g, (d0, dcols) = lax.scan(one, g0, (tuple(s[0] for s in sb), rb, rcols, resb, ctsb))
    d0 = d0.reshape((nb * bn,) + d0.shape[2:])[:n]
    dcols = {k: d.reshape((nb * bn,) + d.shape[2:])[:n].astype(cols[k].dtype)
             for k, d in dcols.items()}
    ops = streams[0]
    grads: tuple = (d0,)
    if head:
        _, k, b = ops
        grads = (d0, g[0].astype(k.dtype), None if b is None else g[1].astype(b.dtype))
    grads = tuple(B.psum_to_type(c, r) for c, r in zip(grads, ops, strict=True))
    return grads, {k: B.psum_to_type(d, cols[k]) for k, d in dcols.items()}


def _run_fwd(stat: Statistic, plan: Plan, streams, rows: Rows, cols: dict):
    out, res = _forward(stat, plan, streams, rows, cols)
    return out, (streams, rows, cols, res)


def _run_bwd(stat: Statistic, plan: Plan, saved, cts):
    streams, rows, cols, res = saved
    g, dcols = _grads(stat, plan, streams, rows, cols, res, cts)
    none = lambda tree: jax.tree.map(lambda _: None, tree)  # noqa: E731
    dstreams = (g,) + tuple(none(s) for s in streams[1:])
    return dstreams, none(rows), {k: dcols.get(k) for k in cols}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def run(stat: Statistic, plan: Plan, streams: tuple, rows: Rows, cols: dict):
    """The per-row outputs of ``stat`` over ``streams``, walked in token blocks of
    ``plan.block_n`` rows (see the module docstring); the same contract as
    :func:`jaxent.impl.stream.run` on one device (``plan.vocab_axis`` must be None)."""
    return _run_fwd(stat, plan, streams, rows, cols)[0]


run.defvjp(_run_fwd, _run_bwd)
