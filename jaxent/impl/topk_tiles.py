r"""The top-k and sparse-teacher statistics with ops the Pallas kernels lower.

:class:`jaxent.impl.topk.TopK` merges a block into the running top-k with ``lax.top_k``
over ``concat(carry, block)`` and reads its gradient through a scatter;
:class:`jaxent.impl.topk.SparseTeacher` gathers the student's logits at the teacher's ids.
Neither Triton nor Mosaic lowers ``top_k``, gathers or scatters. :class:`TopKTiles` and
:class:`SparseTeacherTiles` compute the same things with maxima, minima, compares and
``where`` only:

* **merge**: ``k`` rounds; each takes the largest available key of the carry and of the
  tile, the carry's on a tie (its ids are lower), and within either the first position
  among the maxima (the carry is sorted by key, then id; the tile by id), which is exactly
  the order ``lax.top_k`` gives over ``concat(carry, block)``; the chosen candidate is
  written to slot ``j`` and marked taken. The evicted mass is the sum of ``exp`` over the
  candidates not taken (empty slots and padding columns count 0), as in
  :class:`~jaxent.impl.topk.TopK`.
* **gather** (the sparse teacher): ``x`` at each id, and ``[c \in S]``, by ``k`` rounds
  of ``column == i_j``.
* **gradient**: ``[c = i_j] g_j`` and ``[c \in S]`` by ``k`` rounds of ``column == i_j``
  (one array: ``nan`` off the support).

The carry holds ``width >= k`` slots (a power of two: Triton's tiles need one), the ids as
float32 (exact below ``2**24`` classes); slots past ``k`` stay empty. Per-row vectors and
``[rows, width]`` blocks only, so the kernels of :mod:`jaxent.impl.pallas_stats` take it.
The per-row math (:func:`jaxent.impl.topk.support_grad`'s formula) is the same; only the
merge and the scatter are written differently.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxent import _rowmath as rm
from jaxent.impl import stats
from jaxent.impl import topk as _topk

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
    neg = _topk.empty_key(kc.dtype)

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


def support_grad(opts, x, m, log_s, log_out, ids, start, g, g_t, counted, k: int):
    """:func:`jaxent.impl.topk.support_grad` with the scatter as :func:`scatter` (``g``:
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

    def then(self, res):
        return None

    def init(self, n, dtype):
        w = self.width
        return (jnp.full((n,), -jnp.inf, dtype), jnp.zeros((n,), dtype),
                jnp.full((n, w), _topk.empty_key(dtype), dtype),
                jnp.full((n, w), -jnp.inf, dtype), jnp.full((n, w), -1.0, dtype))

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        m, out, keys, xk, ik = carry
        (x,) = xs
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        ns = rm.safe(m_new)[:, None]
        alpha = jnp.exp(rm.shift(m[:, None], ns, opts))[:, 0]
        ids = (start + lax.broadcasted_iota(jnp.int32, x.shape, 1)).astype(x.dtype)
        kt = _topk.order_key(rm.transform(x, opts), valid)
        nk, nx, ni, left_c, left_t = merge(self.k, keys, xk, ik, kt, x, ids)
        empty = _topk.empty_key(x.dtype)
        ev_c = jnp.where(left_c & (keys != empty), jnp.exp(rm.shift(xk, ns, opts)), 0.0)
        ev_t = jnp.where(left_t & (kt != empty), jnp.exp(rm.shift(x, ns, opts)), 0.0)
        return m_new, out * alpha + ev_c.sum(1) + ev_t.sum(1), nk, nx, ni

    def merge(self, opts, carry, axis_name):
        raise NotImplementedError("TopKTiles walks one vocabulary (no shards to merge)")

    def finish(self, opts, carry, rows):
        m, out, keys, xk, ik = carry
        k = self.k
        outs, (m, log_s, log_out, _) = _topk.TopK(k, self.tail).finish(
            opts, (m, out, keys[:, :k], xk[:, :k], ik[:, :k].astype(jnp.int32)), rows)
        return outs, (m, log_s, log_out, ik)

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        m, log_s, log_out, ik = res
        (x,) = xs
        g, g_t = cts[1], cts[2]
        g = jnp.where(rows.counted[:, None], g, 0.0)  # (the kernels pad g to the width)
        g_t = jnp.where(rows.counted, g_t, 0.0) if self.tail else None
        return support_grad(opts, x, m, log_s, log_out, ik, start, g, g_t, rows.counted,
                            self.k), {}


def tiled(stat: _topk.TopK) -> TopKTiles:
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

    def _dense(self) -> _topk.SparseTeacher:
        return _topk.SparseTeacher(self.kind, self.k, self.beta, self.tail)

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
        return support_grad(opts, x, m, log_s, log_out, rows.y.astype(x.dtype), start, g,
                            g_t, rows.counted, self.k), {}


def tiled_sparse(stat: _topk.SparseTeacher) -> SparseTeacherTiles:
    """The Pallas form of ``stat``."""
    return SparseTeacherTiles(stat.kind, stat.k, stat.beta, stat.tail)

