r"""Support-restricted log-probabilities: the sampler's filters as row statistics.

A sampler with top-k, top-p (nucleus) and min-p draws from the softmax of the
(temperature-scaled, soft-capped) logits ``z`` restricted to a set ``S`` per row; the
training log-probability that matches it is renormalized over ``S``:

.. math::
    \log p'_y = z_y - \log\sum_{c\in S} e^{z_c}\ (y \in S),\qquad -\infty\ (y \notin S),
    \qquad H' = -\sum_{c\in S} p'_c \log p'_c.

``S`` is a set of *values*: every class whose logit reaches the row's threshold is in it,
ties included. In vLLM's order (min-p as a logits processor first, then top-k, then top-p
on the renormalized survivors):

1. min-p: ``p_c >= min_p * max p``, i.e. ``z_c - z_max >= log(min_p)``;
2. top-k: ``x_c >= x_(k)``, the ``k``-th largest raw logit (a running top-``C`` of raw
   values, ``C >= k``; the temperature and soft-cap are monotone, so raw order is ``z``
   order);
3. top-p on ``S_0`` (steps 1 and 2) renormalized: with ``S_0``'s values sorted descending,
   keep the positions whose mass strictly before them is ``< top_p``; their smallest value
   is ``x_p`` and every ``x_c >= x_p`` in ``S_0`` stays (``top_p = 1`` keeps ``S_0``).

Passes over the vocabulary (:func:`jaxent.impl.stream.run`): :class:`Sampler` keeps the
row max and the top ``candidates`` raw logits (merged over vocabulary shards by an
``all_gather``); with top-p, :class:`_Mass` sums ``e^{z - z_max}`` over ``S_0``, and the
nucleus is found among the candidates (exact while it fits in them; a row whose nucleus
would need more candidates is *flagged*: ``nan`` outputs and ``flag = 1``); the last pass
(:class:`_Restricted`) sums ``s' = sum_S e^{z - z_max}``, ``u' = sum_S e^{z-z_max}(z - z_max)``
and reads the token's logit. The gradient holds ``S`` fixed (no gradient through the
thresholds):

.. math::
    \frac{\partial \log p'_y}{\partial z_c} = [c\in S]([c = y] - p'_c),\qquad
    \frac{\partial H'}{\partial z_c} = -[c\in S]\,p'_c(\log p'_c + H').

Per-row sampler parameters (``[N]``, or None when the filter is off) ride in
:class:`SupportRows`; a parameter out of its range (a traced one) gives ``nan`` rows. Later
passes take ``log(min_p)`` from the residuals (:class:`FirstPass`, :class:`Nucleus`,
:class:`Final`), not from the rows, and ``Sampler.tiled()`` (:class:`SamplerTiles`) merges
the candidates without ``lax.top_k``: the Pallas kernels run all three passes.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _rowmath as rm
from jaxent.impl import stats, topk


class SupportRows(NamedTuple):
    """:class:`jaxent.impl.stats.Rows` plus the sampler's per-row parameters (each ``[N]``
    or None): ``top_k`` int32, ``top_p`` and ``min_p`` in the accumulation dtype."""

    y: jax.Array
    counted: jax.Array
    temp: jax.Array | None = None
    top_k: jax.Array | None = None
    top_p: jax.Array | None = None
    min_p: jax.Array | None = None


def _neg_inf(n: int, dtype) -> jax.Array:
    return jnp.full((n,), -jnp.inf, dtype)


def _top(values: jax.Array, c: int) -> jax.Array:
    """The ``c`` largest of ``values [N, M]`` along the last axis, descending."""
    return lax.top_k(values, c)[0]


def min_p_bound(rows: SupportRows, dtype) -> jax.Array | None:
    """``log(min_p)`` per row (``-inf`` for 0; ``nan`` outside ``[0, 1]``), or None."""
    if rows.min_p is None:
        return None
    mp = rows.min_p.astype(dtype)
    ok = (mp >= 0.0) & (mp <= 1.0)
    return jnp.where(ok, jnp.log(jnp.where(ok, mp, 1.0)), jnp.nan)


def in_first_set(x, m, tk, lmin, opts) -> jax.Array:
    """Whether raw logits ``x`` pass min-p and top-k (``tk``, ``lmin``: ``[N]``)."""
    keep = x >= tk[:, None]
    if lmin is not None:
        keep = keep & (rm.shift(x, m[:, None], opts) >= lmin[:, None])
    return keep


class FirstPass(NamedTuple):
    """:class:`Sampler`'s residuals (``[N]``; ``cand [N, C]``; ``lmin`` :func:`min_p_bound`)."""

    m: jax.Array
    tk: jax.Array
    cand: jax.Array
    lmin: jax.Array | None


class Nucleus(NamedTuple):
    """:class:`_Mass`'s residuals: the row max, the threshold ``tau``, the flag, ``lmin``."""

    m: jax.Array
    tau: jax.Array
    over: jax.Array
    lmin: jax.Array | None


class Final(NamedTuple):
    """The last pass's residuals (:class:`Sampler`'s gradient): ``y_in`` (the token in
    ``S``) and ``bad`` (a nan row) as 0/1 floats, as the kernels take their rows."""

    m: jax.Array
    tau: jax.Array
    lmin: jax.Array | None
    log_s: jax.Array
    ent: jax.Array
    y_in: jax.Array
    bad: jax.Array


def _valid_keep(keep, valid):
    return keep if valid is None else keep & valid


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The first pass: the raw row max and the top ``candidates`` raw logits; outputs
    ``(log p'_y, H', flag)`` after the last pass (0 where not counted).

    ``num_classes`` is the vocabulary; ``top_p`` whether the rows carry a top-p (the
    nucleus pass runs); ``entropy`` whether ``H'`` is summed.
    """

    num_classes: int
    candidates: int
    top_p: bool = False
    entropy: bool = False
    streams = 1
    diff_cols: tuple[str, ...] = ()

    def init(self, n, dtype):
        return _neg_inf(n, dtype), jnp.full((n, self.candidates), -jnp.inf, dtype)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        m, cand = carry
        (x,) = xs
        m = jnp.maximum(m, jnp.max(x, axis=1))
        if self.candidates:
            xv = x if valid is None else jnp.where(valid, x, -jnp.inf)
            cand = self._keep(cand, xv)
        return m, cand

    def _keep(self, cand, xv):
        """The largest ``candidates`` values of the carry and the block's valid logits."""
        return _top(jnp.concatenate([cand, xv], axis=1), self.candidates)

    def merge(self, opts, carry, axis_name):
        m, cand = carry
        m = rm.shared_max(m, axis_name)
        if self.candidates:
            every = rm.all_gather(cand, axis_name, 1)
            # The same values on every shard; the pmax types them as replicated.
            cand = rm.pmax(_top(every, self.candidates), axis_name)
        return m, cand

    def finish(self, opts, carry, rows):
        m, cand = carry
        m = rm.safe(m)
        tk = _neg_inf(m.shape[0], m.dtype)
        if rows.top_k is not None:
            k = rows.top_k
            ok = (k >= 1) & (k <= min(self.candidates, self.num_classes))
            idx = jnp.clip(k - 1, 0, max(self.candidates - 1, 0))[:, None]
            tk = jnp.where(ok, jnp.take_along_axis(cand, idx, axis=1)[:, 0], jnp.nan)
        zeros = jnp.zeros_like(m)
        return (zeros, zeros, zeros), FirstPass(m, tk, cand, min_p_bound(rows, m.dtype))

    def then(self, res) -> stats.Statistic | None:
        """The pass after the one whose residuals are ``res`` (:class:`FirstPass` or
        :class:`Nucleus`; None after :class:`Final`: the type names the pass, so the kernels
        of :mod:`jaxent.impl.pallas_stats` build every later pass from this statistic)."""
        if isinstance(res, Final):
            return None
        if isinstance(res, Nucleus):
            return _Restricted(self, *res)
        m, tk, cand, lmin = res
        if self.top_p:
            return _Mass(self, m, tk, cand, lmin)
        return _Restricted(self, m, tk, jnp.zeros_like(m), lmin)

    def tiled(self) -> SamplerTiles:
        """The Pallas form (:class:`SamplerTiles`)."""
        return SamplerTiles(self.num_classes, self.candidates, self.top_p, self.entropy)

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        m, tau, lmin, log_s, ent, y_in, bad = res
        y_in, bad = y_in > 0, bad > 0
        # A token outside S has log p' = -inf whatever the logits: no gradient. A flagged
        # row (nan outputs) gets nan gradients.
        g_lp = jnp.where(rows.counted & y_in, cts[0], 0.0)
        g_h = jnp.where(rows.counted, cts[1], 0.0) if self.entropy else jnp.zeros_like(g_lp)
        (x,) = xs
        keep = in_first_set(x, m, tau, lmin, opts)
        lp = rm.shift(x, m[:, None], opts) - log_s[:, None]
        p = jnp.where(keep, jnp.exp(lp), 0.0)
        hit = rm.onehot(rows.y - start, x.shape)
        dz = jnp.where(hit & keep, g_lp[:, None], 0.0) - g_lp[:, None] * p
        if self.entropy:
            dz = dz - g_h[:, None] * jnp.where(keep, p * (lp + ent[:, None]), 0.0)
        dz = jnp.where((rows.counted & bad)[:, None], jnp.nan, dz)
        dz = jnp.where(rows.counted[:, None], dz, 0.0)
        return rm.transform_vjp(dz, x, opts), {}


class _Pass:
    """A later pass (holds the traced results of the earlier ones: never hashed)."""

    streams = 1
    diff_cols: tuple[str, ...] = ()

    def block_grad(self, opts, res, xs, rows, cols, start, cts):  # pragma: no cover
        raise NotImplementedError("the gradient is Sampler's")


class _Mass(_Pass):
    """Second pass with top-p: ``S_0 = sum e^{z - z_max}`` over the classes that pass min-p
    and top-k; its finish finds the nucleus threshold ``x_p`` among the candidates."""

    def __init__(self, first: Sampler, m, tk, cand, lmin):
        self.first, self.m, self.tk, self.cand, self.lmin = first, m, tk, cand, lmin

    def init(self, n, dtype):
        return jnp.zeros((n,), dtype)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        (x,) = xs
        keep = _valid_keep(in_first_set(x, self.m, self.tk, self.lmin, opts), valid)
        e = jnp.exp(rm.shift(x, self.m[:, None], opts))
        return carry + jnp.sum(jnp.where(keep, e, 0.0), axis=1)

    def merge(self, opts, carry, axis_name):
        return rm.psum(carry, axis_name)

    def finish(self, opts, carry, rows):
        s0, cand, m, tk = carry, self.cand, self.m, self.tk
        c = self.first.candidates
        top_p = rows.top_p.astype(s0.dtype)
        in0 = in_first_set(cand, m, tk, self.lmin, opts)
        q = jnp.where(in0, jnp.exp(rm.shift(cand, m[:, None], opts)) / s0[:, None], 0.0)
        incl = jnp.cumsum(q, axis=1)
        excl = jnp.concatenate([jnp.zeros_like(incl[:, :1]), incl[:, :-1]], axis=1)
        kept = in0 & (excl < top_p[:, None])
        n_kept = jnp.sum(kept, axis=1)
        last = jnp.take_along_axis(cand, jnp.maximum(n_kept - 1, 0)[:, None], axis=1)[:, 0]
        # The nucleus reaches past the buffer unless the buffer's last value is top-k's
        # threshold (all further members of S_0 are then ties of it) or holds every class.
        short = (n_kept == c) & (incl[:, -1] < top_p) & (cand[:, -1] != tk)
        over = short & (top_p < 1.0) if c < self.first.num_classes else jnp.zeros_like(short)
        ok = (top_p > 0.0) & (top_p <= 1.0)
        tp = jnp.where(top_p >= 1.0, -jnp.inf, last)
        tp = jnp.where(ok & ~over, tp, jnp.nan)
        tau = jnp.maximum(tk, tp)  # nan stays nan
        zeros = jnp.zeros_like(s0)
        return (zeros, zeros, zeros), Nucleus(m, tau, over.astype(s0.dtype), self.lmin)

    def then(self, res) -> stats.Statistic | None:
        return self.first.then(res)


class _Restricted(_Pass):
    """The last pass: ``s' = sum_S e^{z - z_max}``, ``u' = sum_S e^{z - z_max}(z - z_max)``
    (with the entropy) and whether the token is in ``S`` with its raw logit."""

    def __init__(self, first: Sampler, m, tau, over, lmin):
        self.first, self.m, self.tau, self.over, self.lmin = first, m, tau, over, lmin

    def init(self, n, dtype):
        z = jnp.zeros((n,), dtype)
        return z, z, z, z  # (the token in S as 0/1: Triton lowers no reduce_or)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        s, u, zy, y_in = carry
        (x,) = xs
        keep = _valid_keep(in_first_set(x, self.m, self.tau, self.lmin, opts), valid)
        zs = rm.shift(x, self.m[:, None], opts)
        e = jnp.where(keep, jnp.exp(zs), 0.0)
        if self.first.entropy:
            u = u + stats.wsum(e, zs)
        hit = rm.onehot(rows.y - start, x.shape)
        zy = zy + jnp.sum(jnp.where(hit, x, 0.0), axis=1)
        y_in = jnp.maximum(y_in, jnp.max(jnp.where(hit & keep, 1.0, 0.0), axis=1))
        return s + e.sum(1), u, zy, y_in

    def merge(self, opts, carry, axis_name):
        s, u, zy, y_in = carry
        y_in = rm.pmax(y_in, axis_name)
        return rm.psum(s, axis_name), rm.psum(u, axis_name), rm.psum(zy, axis_name), y_in

    def finish(self, opts, carry, rows):
        s, u, zy, y_in = carry
        y_in = y_in > 0
        m = self.m
        lmin = self.lmin
        bad = jnp.isnan(self.tau) | (self.over > 0)
        if lmin is not None:
            bad = bad | jnp.isnan(lmin)
        log_s = jnp.log(s)
        logp = jnp.where(y_in, rm.shift(zy, m, opts) - log_s, -jnp.inf)
        ent = log_s - u / s if self.first.entropy else jnp.zeros_like(log_s)
        valid = (rows.y >= 0) & (rows.y < self.first.num_classes)
        logp = jnp.where(valid & ~bad, logp, jnp.nan)
        ent = jnp.where(bad, jnp.nan, ent)
        out = tuple(jnp.where(rows.counted, a, 0.0) for a in (logp, ent, self.over))
        return out, Final(m, self.tau, lmin, log_s, ent, (y_in & valid & ~bad).astype(s.dtype),
                          (bad | ~valid).astype(s.dtype))

    def then(self, res) -> stats.Statistic | None:
        return None


@dataclasses.dataclass(frozen=True)
class SamplerTiles(Sampler):
    """:class:`Sampler` (same outputs and passes) with its candidate merge written as
    :func:`jaxent.impl.topk.merge` (``candidates`` rounds of max extraction; the raw
    value is the key) and a carry of ``pow2(candidates)`` slots, so the kernels of
    :mod:`jaxent.impl.pallas_stats` take it (no ``lax.top_k``)."""

    vocab_splits = False  # (merge raises: the kernels walk each row's vocabulary whole)

    def init(self, n, dtype):
        w = topk.pow2(max(self.candidates, 1))
        return _neg_inf(n, dtype), jnp.full((n, w), -jnp.inf, dtype)

    def _keep(self, cand, xv):
        # Values are their own keys (ties are equal values: any order holds them), and the
        # merge's ids are unused (the values again).
        return topk.merge(self.candidates, cand, cand, cand, xv, xv, xv)[1]

    def merge(self, opts, carry, axis_name):
        raise NotImplementedError("SamplerTiles walks one vocabulary (no shards to merge)")

    def finish(self, opts, carry, rows):
        m, cand = carry
        return super().finish(opts, (m, cand[:, :self.candidates]), rows)


DEFAULT_CANDIDATES = 1024


def candidates_for(num_classes: int, k_need: int, top_p: bool,
                   max_candidates: int | None) -> int:
    """The candidate buffer's size: ``max_candidates`` when given, else what top-k needs
    (``k_need``) and, with top-p, at least :data:`DEFAULT_CANDIDATES`; at most the
    vocabulary."""
    if max_candidates is not None:
        return min(max_candidates, num_classes)
    need = k_need
    if top_p:
        need = max(need, DEFAULT_CANDIDATES)
    return min(need, num_classes)


# ------------------------------------------------------------------ a list of allowed ids


def unique_ids(ids: jax.Array, num_classes: int):
    """``(sorted ids [N, K], member [N, K], bad [N])`` of allowed-id lists: ``member``
    marks each distinct real id once (``-1`` is padding, repeats count once); ``bad`` rows
    hold an id outside ``[-1, num_classes)``."""
    sid = jnp.sort(ids.astype(jnp.int32), axis=1)
    repeat = jnp.concatenate([jnp.zeros_like(sid[:, :1], bool), sid[:, 1:] == sid[:, :-1]],
                             axis=1)
    bad = jnp.any((sid < -1) | (sid >= num_classes), axis=1)
    return sid, (sid >= 0) & (sid < num_classes) & ~repeat, bad


def gathered_log_probs(xk: jax.Array, sid: jax.Array, member: jax.Array, bad: jax.Array,
                       y: jax.Array, counted: jax.Array, num_classes: int, opts,
                       entropy: bool):
    """``(log p'_y, H')`` from the raw logits ``xk [N, K]`` at the allowed ids (plain JAX,
    differentiated by autodiff): ``-inf`` for a token outside the set, ``nan`` for a bad
    row, an empty set or a token id outside ``[0, V)``; 0 where not counted."""
    empty = ~jnp.any(member, axis=1)
    # An empty row sums over its first entry instead (its outputs are nan): no nan
    # reaches the gradients of the other rows through a shared kernel.
    member_ = member.at[:, 0].set(member[:, 0] | empty)
    z = jnp.where(member_, rm.transform(xk, opts), 0.0)
    lse = jax.nn.logsumexp(z, axis=1, where=member_)
    match = member & (sid == y[:, None])
    y_in = jnp.any(match, axis=1)
    zy = jnp.sum(jnp.where(match, z, 0.0), axis=1)
    lp = jnp.where(y_in, zy - lse, -jnp.inf)
    nan = bad | empty
    lp = jnp.where(nan | (y < 0) | (y >= num_classes), jnp.nan, lp)
    if entropy:
        lpk = z - lse[:, None]
        ent = -jnp.sum(jnp.where(member, jnp.exp(lpk) * lpk, 0.0), axis=1)
        ent = jnp.where(nan, jnp.nan, ent)
    else:
        ent = jnp.zeros_like(lp)
    return jnp.where(counted, lp, 0.0), jnp.where(counted, ent, 0.0)
