r"""Row statistics over a per-row set of classes: the top-k and a sparse teacher's support.

Both heads score a row's probabilities on a set ``S`` of ``k`` class ids (the row's top-k,
found while walking; or the ids a sparse teacher stored) plus one *tail* bin, the mass
outside ``S``. With ``zs = shift(x, m)`` (:mod:`jaxent._rowmath`), ``s = sum_c exp(zs_c)``
and ``s_out = sum_{c not in S} exp(zs_c)``:

.. math::
    \log p_j = zs_{i_j} - \log s,\qquad \log p_\mathrm{tail} = \log s_\mathrm{out} - \log s,

with ``s_out`` a sum of positive terms (never ``s - sum_j p_j``, which cancels), ``-inf``
when ``S`` holds all the mass. For per-bin cotangents ``g_j`` (of ``log p_j``) and ``g_t``
(of ``log p_tail``), ``G = sum_j g_j + g_t``:

.. math::
    \frac{\partial}{\partial z_c} = [c = i_j]\, g_j
      + [c \notin S]\, g_t\, \frac{p_c}{p_\mathrm{tail}} - p_c\, G

(:func:`support_grad`; ``p_c / p_tail = exp(zs_c - log s_out)``).

* :class:`TopK` keeps the running top-k of each row as ``(key, raw logit, id)``: the key is
  the transformed logit ``z`` (:func:`order_key`), so that ``lax.top_k`` over
  ``concat(carry, block)`` orders by ``z`` descending and ties by the lower id (the carry
  holds lower ids than the block and ``top_k`` keeps the lower position first); empty
  slots and padding columns get the key ``-inf`` and a class at ``-inf`` the lowest finite
  value, so that it still beats an empty slot (it then ties with a class at that lowest
  finite value: the one place where the order is by id rather than by ``z``). A column
  leaves the running top-k at most once, so ``s_out`` is the sum of ``exp(zs)`` over the
  evicted candidates. Over vocabulary shards the shards' candidates are gathered (in shard
  order, so in id order) and selected the same way.
* :class:`SparseTeacher` reads the student's logits at the teacher's ids ``rows.y [N, k]``
  and ``s_out`` of the columns outside them, and scores forward KL, reverse KL or the
  beta-JSD over the ``k + 1`` bins (:func:`bin_divergence`): with ``k = V`` (no tail bin)
  it is the dense divergence of :class:`jaxent.impl.stats.Distill`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _rowmath as rm
from jaxent.impl import stats


class SupportRows(NamedTuple):
    """Per-row inputs of :class:`SparseTeacher` (``y``, ``counted``, ``temp`` as in
    :class:`jaxent.impl.stats.Rows`): ``y [N, k]`` int32 teacher ids (``-1``: invalid, the
    row is ``nan``), ``lq [N, k]`` the teacher's log-probabilities there and ``lqt [N]`` its
    tail log-mass."""

    y: jax.Array
    counted: jax.Array
    temp: jax.Array | None
    lq: jax.Array
    lqt: jax.Array


# ------------------------------------------------------------------------ order keys


def empty_key(dtype) -> jax.Array:
    """The key of an empty slot or a padding column: ``-inf``, below every class's key."""
    return jnp.array(-jnp.inf, dtype)


def order_key(z: jax.Array, valid=None) -> jax.Array:
    """The sort key of transformed logits ``z``: ``z``, with ``-inf`` raised to the lowest
    finite value (so that a class at ``-inf`` beats an empty slot, :func:`empty_key`);
    :func:`empty_key` where ``valid`` is False. (A float key keeps ``lax.top_k`` on its fast
    path: on XLA:CPU an integer ``top_k`` is a full sort, 30x slower.)"""
    key = jnp.maximum(z, jnp.finfo(z.dtype).min)
    return key if valid is None else jnp.where(valid, key, empty_key(z.dtype))


def _select(keys, xs, ids, k: int, ns, opts):
    """The top ``k`` of the candidates ``keys, xs, ids [N, C]`` and the sum of ``exp(shift(x,
    ns))`` over the others (empty slots count 0)."""
    top, pos = lax.top_k(keys, k)
    n, c = keys.shape
    sel = jnp.zeros((n, c), bool).at[jnp.arange(n)[:, None], pos].set(True)
    e = jnp.exp(rm.shift(xs, ns[:, None], opts))
    out = jnp.sum(jnp.where(sel | (keys == empty_key(xs.dtype)), 0.0, e), axis=1)
    return (top, jnp.take_along_axis(xs, pos, axis=1), jnp.take_along_axis(ids, pos, axis=1),
            out)


# --------------------------------------------------------------------------- gradient


def _scatter(n: int, b: int, loc, values, fill):
    """``[N, b]`` of ``fill`` with ``values [N, k]`` at the columns ``loc [N, k]`` (those
    outside ``[0, b)`` dropped)."""
    loc = jnp.where((loc >= 0) & (loc < b), loc, b)
    base = jnp.full((n, b), fill, jnp.result_type(values))
    return base.at[jnp.arange(n)[:, None], loc].set(values, mode="drop")


def support_mask(ids, start, shape) -> jax.Array:
    """``[c in S]`` over a block ``[N, B]`` of columns from ``start`` (``ids [N, k]``)."""
    n, b = shape
    return _scatter(n, b, ids - start, jnp.ones(ids.shape, bool), False)


def support_grad(opts, x, m, log_s, log_out, ids, start, g, g_t, counted):
    """``d/d raw x`` of a block ``x [N, B]`` for the cotangents ``g [N, k]`` of the support's
    log-probabilities and ``g_t [N]`` of the tail's (None: no tail), from the statistics
    ``m``, ``log s`` and ``log s_out`` (see the module docstring)."""
    n, b = x.shape
    zs = rm.shift(x, m[:, None], opts)
    p = jnp.exp(zs - log_s[:, None])
    total = g.sum(1) if g_t is None else g.sum(1) + g_t
    dz = _scatter(n, b, ids - start, g.astype(x.dtype), 0.0) - p * total[:, None]
    if g_t is not None:
        out = ~support_mask(ids, start, (n, b)) & (p > 0)
        ratio = jnp.exp(jnp.where(out, zs - log_out[:, None], -jnp.inf))
        dz = dz + g_t[:, None] * ratio
    dz = jnp.where(counted[:, None], dz, 0.0)
    return rm.transform_vjp(dz, x, opts)


# ----------------------------------------------------------------------------- top-k


@dataclasses.dataclass(frozen=True)
class TopK:
    """Per row: the ``k`` largest transformed logits' ids ``[N, k]`` (int32), their
    log-probabilities ``[N, k]`` and the tail log-mass ``[N]`` (zeros unless ``tail``);
    ids ``-1`` and values 0 where not counted."""

    k: int
    tail: bool = False
    streams = 1
    diff_cols: tuple[str, ...] = ()

    def then(self, res):
        return None

    def tiled(self):
        """The same statistic with ops the Pallas kernels lower
        (:class:`TopKTiles`)."""
        return tiled(self)

    def init(self, n, dtype):
        k = self.k
        return (jnp.full((n,), -jnp.inf, dtype), jnp.zeros((n,), dtype),
                jnp.full((n, k), empty_key(dtype), dtype),
                jnp.full((n, k), -jnp.inf, dtype), jnp.full((n, k), -1, jnp.int32))

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        m, out, keys, xk, ik = carry
        (x,) = xs
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        ns = rm.safe(m_new)
        alpha = jnp.exp(rm.shift(m[:, None], ns[:, None], opts))[:, 0]
        ids = start + lax.broadcasted_iota(jnp.int32, x.shape, 1)
        keys, xk, ik, evicted = _select(
            jnp.concatenate([keys, order_key(rm.transform(x, opts), valid)], axis=1),
            jnp.concatenate([xk, x], axis=1), jnp.concatenate([ik, ids], axis=1),
            self.k, ns, opts)
        return m_new, out * alpha + evicted, keys, xk, ik

    def merge(self, opts, carry, axis_name):
        m, out, keys, xk, ik = carry
        mg = rm.shared_max(m, axis_name)
        ns = rm.safe(mg)
        out = rm.psum(out * jnp.exp(rm.shift(m, ns, opts)), axis_name)
        # Every shard's candidates side by side, in shard order (so in id order).
        keys, xk, ik, evicted = _select(
            *(rm.all_gather(a, axis_name, 1) for a in (keys, xk, ik)), self.k, ns, opts)
        # The same on every shard; the pmax types them as replicated.
        keys, xk, ik, evicted = rm.pmax((keys, xk, ik, evicted), axis_name)
        return mg, out + evicted, keys, xk, ik

    def finish(self, opts, carry, rows):
        m, out, _, xk, ik = carry
        m = rm.safe(m)
        zs = rm.shift(xk, m[:, None], opts)
        log_s = jnp.log(out + jnp.exp(zs).sum(1))
        log_out = jnp.log(out)
        lp = zs - log_s[:, None]
        tail = log_out - log_s if self.tail else jnp.zeros_like(log_s)
        c = rows.counted
        outs = (jnp.where(c[:, None], ik, -1), jnp.where(c[:, None], lp, 0.0),
                jnp.where(c, tail, 0.0))
        return outs, (m, log_s, log_out, ik)

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        m, log_s, log_out, ik = res
        _, g, g_t = cts
        g = jnp.where(rows.counted[:, None], g, 0.0)
        g_t = jnp.where(rows.counted, g_t, 0.0) if self.tail else None
        return support_grad(opts, xs[0], m, log_s, log_out, ik, start, g, g_t,
                            rows.counted), {}


# ------------------------------------------------------------------- sparse teacher


def _xlogy(p, lp, lo):
    return jnp.where(p == 0, 0.0, p * (lp - lo))


def bin_divergence(kind: str, beta: float, lp, lq):
    """``(loss [N], d loss / d lp [N, K])`` of the student's bin log-probabilities
    ``lp [N, K]`` against the teacher's ``lq [N, K]`` (the gradients as in
    :class:`jaxent.impl.stats.Distill`, up to terms that sum to 0 over the bins)."""
    p, q = jnp.exp(lp), jnp.exp(lq)
    if kind == "kl":
        return _xlogy(q, lq, lp).sum(1), -q
    if kind == "reverse_kl":
        loss = _xlogy(p, lp, lq).sum(1)
        return loss, _xlogy(p, lp, lq + loss[:, None])
    lm = jnp.logaddexp(math.log(beta) + lq, math.log1p(-beta) + lp)
    kpm = _xlogy(p, lp, lm).sum(1)
    loss = beta * _xlogy(q, lq, lm).sum(1) + (1.0 - beta) * kpm
    return loss, (1.0 - beta) * _xlogy(p, lp, lm + kpm[:, None])


@dataclasses.dataclass(frozen=True)
class SparseTeacher:
    """Per-row divergence of the student (stream 0) from a teacher given on ``k`` ids
    (``rows``: a :class:`SupportRows`) plus a tail bin (``tail``: False when the ids cover
    the whole vocabulary); ``kind`` ``"kl"``, ``"reverse_kl"`` or ``"jsd"`` (``beta``); 0
    where not counted, ``nan`` on rows with invalid ids (``-1``)."""

    kind: str
    k: int
    beta: float = 0.5
    tail: bool = True
    streams = 1
    diff_cols: tuple[str, ...] = ()

    def then(self, res):
        return None

    def tiled(self):
        """The same statistic with ops the Pallas kernels lower
        (:class:`SparseTeacherTiles`)."""
        return tiled_sparse(self)

    def init(self, n, dtype):
        z = jnp.zeros((n,), dtype)
        return jnp.full((n,), -jnp.inf, dtype), z, z, jnp.zeros((n, self.k), dtype)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        m, s, out, xk = carry
        (x,) = xs
        b = x.shape[1]
        a = stats.stream(m, s, x, opts, valid)
        loc = rows.y - start
        hit = jnp.take_along_axis(x, jnp.clip(loc, 0, b - 1), axis=1)
        xk = xk + jnp.where((loc >= 0) & (loc < b), hit, 0.0)
        if self.tail:
            e = jnp.where(support_mask(rows.y, start, x.shape), 0.0, a.e)
            out = out * a.alpha + e.sum(1)
        return a.m, a.s, out, xk

    def merge(self, opts, carry, axis_name):
        m, s, out, xk = carry
        m, s_all, alpha, _ = stats.merge_stream(m, s, opts, axis_name)
        return m, s_all, rm.psum(out * alpha, axis_name), rm.psum(xk, axis_name)

    def finish(self, opts, carry, rows):
        m, s, out, xk = carry
        m, log_s, log_out = rm.safe(m), jnp.log(s), jnp.log(out)
        lp = rm.shift(xk, m[:, None], opts) - log_s[:, None]
        lq = rows.lq
        if self.tail:
            lp = jnp.concatenate([lp, (log_out - log_s)[:, None]], axis=1)
            lq = jnp.concatenate([lq, rows.lqt[:, None]], axis=1)
        loss, g = bin_divergence(self.kind, self.beta, lp, lq)
        bad = jnp.any(rows.y < 0, axis=1)
        loss = jnp.where(bad, jnp.nan, loss)
        g = jnp.where(bad[:, None], jnp.nan, g)
        c = rows.counted
        return jnp.where(c, loss, 0.0), (m, log_s, log_out, jnp.where(c[:, None], g, 0.0))

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        m, log_s, log_out, g = res
        g = g * cts[:, None]
        g_t = g[:, -1] if self.tail else None
        return support_grad(opts, xs[0], m, log_s, log_out, rows.y, start, g[:, :self.k],
                            g_t, rows.counted), {}

# ------------------------------------------------- the forms the Pallas kernels lower
#
# The top-k and sparse-teacher statistics with ops the Pallas kernels lower.
#
# :class:`jaxent.impl.topk.TopK` merges a block into the running top-k with ``lax.top_k``
# over ``concat(carry, block)`` and reads its gradient through a scatter;
# :class:`jaxent.impl.topk.SparseTeacher` gathers the student's logits at the teacher's ids.
# Neither Triton nor Mosaic lowers ``top_k``, gathers or scatters. :class:`TopKTiles` and
# :class:`SparseTeacherTiles` compute the same things with maxima, minima, compares and
# ``where`` only:
#
# * **merge**: ``k`` rounds; each takes the largest available key of the carry and of the
#   tile, the carry's on a tie (its ids are lower), and within either the first position
#   among the maxima (the carry is sorted by key, then id; the tile by id), which is exactly
#   the order ``lax.top_k`` gives over ``concat(carry, block)``; the chosen candidate is
#   written to slot ``j`` and marked taken. The evicted mass is the sum of ``exp`` over the
#   candidates not taken (empty slots and padding columns count 0), as in
#   :class:`~jaxent.impl.topk.TopK`.
# * **gather** (the sparse teacher): ``x`` at each id, and ``[c \in S]``, by ``k`` rounds
#   of ``column == i_j``.
# * **gradient**: ``[c = i_j] g_j`` and ``[c \in S]`` by ``k`` rounds of ``column == i_j``
#   (one array: ``nan`` off the support).
#
# The carry holds ``width >= k`` slots (a power of two: Triton's tiles need one), the ids as
# float32 (exact below ``2**24`` classes); slots past ``k`` stay empty. Per-row vectors and
# ``[rows, width]`` blocks only, so the kernels of :mod:`jaxent.impl.pallas_stats` take it.
# The per-row math (:func:`jaxent.impl.topk.support_grad`'s formula) is the same; only the
# merge and the scatter are written differently.

_NONE = 1e9  # a position above every real one


def pow2(k: int) -> int:
    """The smallest power of two ``>= k``."""
    return 1 << max(k - 1, 0).bit_length()


def _first(mask, pos):
    """Per row, the lowest ``pos`` where ``mask`` (``_NONE`` if none)."""
    return jnp.min(jnp.where(mask, pos, _NONE), axis=1)


def _pick(sel, a):
    """Per row, ``a`` where ``sel`` (one True per row, or none: 0)."""
    return jnp.sum(jnp.where(sel, a, 0.0), axis=1)


def merge(k: int, kc, xc, ic, kt, xt, it):
    """The top ``k`` of the carry (``kc, xc, ic [N, W]``: keys, raw logits, ids, sorted) and a
    tile (``kt, xt, it [N, B]``) by key, ties by position (carry first), as ``[N, W]`` slots
    (past ``k``: empty), and per candidate whether it was not taken (``[N, W]``, ``[N, B]``)."""
    n, w = kc.shape
    pc = lax.broadcasted_iota(jnp.int32, (n, w), 1).astype(jnp.float32)
    pt = lax.broadcasted_iota(jnp.int32, kt.shape, 1).astype(jnp.float32)
    neg = empty_key(kc.dtype)

    def body(j, st):
        ac, at, nk, nx, ni = st
        ac, at = ac > 0, at > 0  # (carried as floats: Mosaic keeps no i1 vectors in loops)
        mc = jnp.max(jnp.where(ac, kc, neg), axis=1)
        mt = jnp.max(jnp.where(at, kt, neg), axis=1)
        from_c = (jnp.max(jnp.where(ac, 1.0, 0.0), axis=1) > 0) & (mc >= mt)
        selc = from_c[:, None] & (pc == _first(ac & (kc == mc[:, None]), pc)[:, None])
        selt = ~from_c[:, None] & (pt == _first(at & (kt == mt[:, None]), pt)[:, None])
        slot = pc == j
        nk = jnp.where(slot, jnp.where(from_c, mc, mt)[:, None], nk)
        nx = jnp.where(slot, (_pick(selc, xc) + _pick(selt, xt))[:, None], nx)
        ni = jnp.where(slot, (_pick(selc, ic) + _pick(selt, it))[:, None], ni)
        return (jnp.where(ac & ~selc, 1.0, 0.0), jnp.where(at & ~selt, 1.0, 0.0), nk, nx, ni)

    init = (jnp.ones((n, w), kc.dtype), jnp.ones(kt.shape, kc.dtype), jnp.full((n, w), neg),
            jnp.full((n, w), -jnp.inf, xc.dtype), jnp.full((n, w), -1.0, ic.dtype))
    ac, at, nk, nx, ni = lax.fori_loop(0, k, body, init)
    return nk, nx, ni, ac > 0, at > 0


def scatter(k: int, ids, g, start, shape):
    """``[N, B]`` with ``g[:, j]`` at the columns ``ids[:, j] - start`` and ``nan`` at the
    others (the support's columns are where it is not ``nan``), by ``k`` rounds of compares
    (``ids`` float32 ``[N, W]``, distinct per row; ``g`` ``[N, W]``). One array, not a value
    and a mask: the ``d kernel`` program keeps it beside its logits tile in registers."""
    col = (start + lax.broadcasted_iota(jnp.int32, shape, 1)).astype(ids.dtype)
    slot = lax.broadcasted_iota(jnp.int32, ids.shape, 1)
    gslot = lax.broadcasted_iota(jnp.int32, g.shape, 1)

    def body(j, out):
        return jnp.where(col == _pick(slot == j, ids)[:, None], _pick(gslot == j, g)[:, None],
                         out)

    return lax.fori_loop(0, k, body, jnp.full(shape, jnp.nan, ids.dtype))


def gather(k: int, ids, x, start):
    """``(x at ids[:, j] - start per slot j [N, W] (0 where the id is not in the block),
    [c in S] of the block as 0/1 [N, B])`` by ``k`` rounds of compares."""
    col = (start + lax.broadcasted_iota(jnp.int32, x.shape, 1)).astype(ids.dtype)
    slot = lax.broadcasted_iota(jnp.int32, ids.shape, 1)

    def body(j, st):
        got, member = st
        hit = col == _pick(slot == j, ids)[:, None]
        got = jnp.where(slot == j, _pick(hit, x)[:, None], got)
        return got, jnp.maximum(member, jnp.where(hit, 1.0, 0.0))

    return lax.fori_loop(0, k, body, (jnp.zeros(ids.shape, x.dtype), jnp.zeros_like(x)))


def tiled_support_grad(opts, x, m, log_s, log_out, ids, start, g, g_t, counted, k: int):
    """:func:`support_grad` with the scatter as :func:`scatter` (``g``:
    ``[N, W]``, zeros past ``k``)."""
    hits = scatter(k, ids, g, start, x.shape)
    member = hits == hits  # (a nan cotangent makes the whole row nan through the total)
    zs = rm.shift(x, m[:, None], opts)
    p = jnp.exp(zs - log_s[:, None])
    total = g.sum(1) if g_t is None else g.sum(1) + g_t
    dz = jnp.where(member, hits, 0.0) - p * total[:, None]
    if g_t is not None:
        outside = ~member & (p > 0)
        dz = dz + g_t[:, None] * jnp.exp(jnp.where(outside, zs - log_out[:, None], -jnp.inf))
    dz = jnp.where(counted[:, None], dz, 0.0)
    return rm.transform_vjp(dz, x, opts)


@dataclasses.dataclass(frozen=True)
class TopKTiles:
    """:class:`jaxent.impl.topk.TopK` (same outputs) with ``width`` carry slots (``>= k``)."""

    k: int
    width: int
    tail: bool = False
    streams = 1
    diff_cols: tuple[str, ...] = ()
    # The gradient keeps the support's [block_n, block_v] array (scatter) beside the logits
    # tile: with 64-row tiles the H100's d kernel program spilled 72 bytes (ptxas -v).
    extra_tiles = 1
    vocab_splits = False  # (merge raises: the kernels walk each row's vocabulary whole)

    def then(self, res):
        return None

    def init(self, n, dtype):
        w = self.width
        return (jnp.full((n,), -jnp.inf, dtype), jnp.zeros((n,), dtype),
                jnp.full((n, w), empty_key(dtype), dtype),
                jnp.full((n, w), -jnp.inf, dtype), jnp.full((n, w), -1.0, dtype))

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        m, out, keys, xk, ik = carry
        (x,) = xs
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        ns = rm.safe(m_new)[:, None]
        alpha = jnp.exp(rm.shift(m[:, None], ns, opts))[:, 0]
        ids = (start + lax.broadcasted_iota(jnp.int32, x.shape, 1)).astype(x.dtype)
        kt = order_key(rm.transform(x, opts), valid)
        nk, nx, ni, left_c, left_t = merge(self.k, keys, xk, ik, kt, x, ids)
        empty = empty_key(x.dtype)
        ev_c = jnp.where(left_c & (keys != empty), jnp.exp(rm.shift(xk, ns, opts)), 0.0)
        ev_t = jnp.where(left_t & (kt != empty), jnp.exp(rm.shift(x, ns, opts)), 0.0)
        return m_new, out * alpha + ev_c.sum(1) + ev_t.sum(1), nk, nx, ni

    def merge(self, opts, carry, axis_name):
        raise NotImplementedError("TopKTiles walks one vocabulary (no shards to merge)")

    def finish(self, opts, carry, rows):
        m, out, keys, xk, ik = carry
        k = self.k
        outs, (m, log_s, log_out, _) = TopK(k, self.tail).finish(
            opts, (m, out, keys[:, :k], xk[:, :k], ik[:, :k].astype(jnp.int32)), rows)
        return outs, (m, log_s, log_out, ik)

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        m, log_s, log_out, ik = res
        (x,) = xs
        g, g_t = cts[1], cts[2]
        g = jnp.where(rows.counted[:, None], g, 0.0)  # (the kernels pad g to the width)
        g_t = jnp.where(rows.counted, g_t, 0.0) if self.tail else None
        return tiled_support_grad(opts, x, m, log_s, log_out, ik, start, g, g_t, rows.counted,
                            self.k), {}


def tiled(stat: TopK) -> TopKTiles:
    """The Pallas form of ``stat`` (its carry ``pow2(k)`` slots wide)."""
    return TopKTiles(stat.k, pow2(stat.k), stat.tail)


@dataclasses.dataclass(frozen=True)
class SparseTeacherTiles:
    """:class:`jaxent.impl.topk.SparseTeacher` (same outputs) with the student's logits at
    the teacher's ids read by :func:`gather` and the gradient's scatter by :func:`scatter`;
    the ids come as ``[rows, 2**j]`` (``-1`` past ``k``: the kernels pad them), the carry
    ``[rows, 2**j]`` wide."""

    kind: str
    k: int
    beta: float = 0.5
    tail: bool = True
    streams = 1
    diff_cols: tuple[str, ...] = ()
    extra_tiles = 1  # (as TopKTiles: the support's [block_n, block_v] array)
    vocab_splits = False  # (as TopKTiles: merge raises)

    def _dense(self) -> SparseTeacher:
        return SparseTeacher(self.kind, self.k, self.beta, self.tail)

    def then(self, res):
        return None

    def init(self, n, dtype):
        z = jnp.zeros((n,), dtype)
        return jnp.full((n,), -jnp.inf, dtype), z, z, jnp.zeros((n, pow2(self.k)), dtype)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        m, s, out, xk = carry
        (x,) = xs
        a = stats.stream(m, s, x, opts, valid)
        got, member = gather(self.k, rows.y.astype(x.dtype), x, start)
        if self.tail:
            out = out * a.alpha + jnp.where(member > 0, 0.0, a.e).sum(1)
        return a.m, a.s, out, xk + got

    def merge(self, opts, carry, axis_name):
        raise NotImplementedError("SparseTeacherTiles walks one vocabulary (no shards)")

    def finish(self, opts, carry, rows):
        m, s, out, xk = carry
        return self._dense().finish(opts, (m, s, out, xk[:, :self.k]), rows)

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        m, log_s, log_out, g = res  # g: [N, 2**j], the k bins and the tail's, then zeros
        (x,) = xs
        g = g * cts[:, None]
        slot = lax.broadcasted_iota(jnp.int32, g.shape, 1)
        g_t = _pick(slot == self.k, g) if self.tail else None
        g = jnp.where(slot < self.k, g, 0.0)
        return tiled_support_grad(opts, x, m, log_s, log_out, rows.y.astype(x.dtype), start, g,
                            g_t, rows.counted, self.k), {}


def tiled_sparse(stat: SparseTeacher) -> SparseTeacherTiles:
    """The Pallas form of ``stat``."""
    return SparseTeacherTiles(stat.kind, stat.k, stat.beta, stat.tail)

