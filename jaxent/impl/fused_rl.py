r"""Vocabulary walks of the per-token RL and distillation losses (private).

One walk serves materialized logits (``ops = (x,)``, ``x [N, C]``, one block per row or a
few) and the fused head (``ops = (h, kernel, bias)``: each block's raw logits are
``h @ W_b + b_b``, never the whole ``[N, V]``). The forward folds blocks into online row
statistics; each ``jax.custom_vjp`` keeps ``O(N)`` of them and the backward recomputes the
blocks (for the head: ``d h += dx @ W_b^T``, ``d W_b = h^T dx``, ``d b_b = sum dx``).

Per row, with shifted logits ``zs = shift(x, m)`` (:mod:`jaxent._rowmath`, the max kept in
the raw domain) and ``s = sum exp(zs)``, ``p = exp(zs - log s)``:

* **log-probs and entropy** -- statistics ``m, s``, ``u = sum e zs`` and the token's raw
  logit: ``log p_y = zs_y - log s``, ``H = log s - u / s``;
  ``d/dz_c = g_lp ([c = y] - p_c) - g_H p_c (log p_c + H)``.
* **probability targets** -- ``wt = w (1 - eps) t + w eps / V``: ``WT = sum wt``,
  ``WTZ = sum wt zs``; loss ``WT log s - WTZ + lambda_z lse^2``;
  ``d/dz = g (p (WT + 2 lambda_z lse) - wt)``, ``d/dt = g (1 - eps) w (log s - zs)``.
* **distillation** (student ``p``, teacher ``q``: two streams, each with its own ``m, s``):
  ``"kl"``: ``KL(q || p) = (U_t - X) / s_t + log s_s - log s_t`` with ``U_t = sum e_t zs_t``
  and ``X = sum e_t zs_s`` (``d/dz_s = p - q``); ``"reverse_kl"`` symmetrically with
  ``U_s = sum e_s zs_s``, ``Y = sum e_s zs_t`` (``d/dz_s = p (log p - log q - KL)``);
  ``"jsd"`` needs the normalized probabilities, so a second forward pass sums
  ``beta q log(q/M) + (1-beta) p log(p/M)`` and ``K = KL(p || M)``, ``M = beta q + (1 - beta)
  p`` (``d/dz_s = (1-beta) p (log(p/M) - K)``).

Online sums ``sum e_a zs_b`` fold as ``alpha_a (old + back_b s_a,old) + block`` with
``alpha = exp(shift(m_old, m_new))`` and ``back = shift(safe(m_old), safe(m_new))``; the
shard merge of the vocabulary-parallel version is the same fold over ``pmax``/``psum``.
``0 log 0 = 0`` throughout (products with ``e = 0`` are selected away).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _platform, _rowmath
from jaxent._options import Options
from jaxent._platform import Quirks, carry_value, carry_zeros, dupdate
from jaxent.impl._blocks import (
    block_dhidden,
    block_dkernel,
    block_logits,
    kernel_block,
    psum_to_type,
    varying_like,
)
from jaxent.impl._blocks import blocks as _blocks


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static configuration of a walk (hashable; a ``nondiff_argnums`` argument).

    ``num_classes`` is the global vocabulary; ``local_v`` the columns this walk sees (the
    shard's, inside ``shard_map``; equal otherwise); ``axis_name`` the mesh axis the
    vocabulary is split over (None on one device).
    """

    opts: Options
    num_classes: int
    local_v: int
    block_v: int
    layout: str = "dv"
    kind: str = "logp"  # "logp" | "soft" | "kl" | "reverse_kl" | "jsd"
    entropy: bool = False
    beta: float = 0.5
    axis_name: str | tuple | None = None


# ------------------------------------------------------------------------ blocks, walks


def _acc(ops) -> jnp.dtype:
    return _rowmath.compute_dtype(ops[0].dtype)


def _block(plan: Plan, ops, start, size: int):
    """Raw logits ``[N, size]`` of columns ``[start, start + size)`` (and the kernel block)."""
    if len(ops) == 1:
        (x,) = ops
        xb = x if size == x.shape[1] else lax.dynamic_slice_in_dim(x, start, size, 1)
        return xb.astype(_acc(ops)), None
    h, k, b = ops
    kb = _platform.per_platform(
        lambda q, k, start: kernel_block(k, start, size, plan.layout, q), k, start)
    bb = None if b is None else lax.dynamic_slice_in_dim(b, start, size, 0)
    return block_logits(h, kb, bb, plan.layout), kb


def _cols(v, start, size: int):
    """``v[:, start:start + size]`` (``[N, V]``) or ``v[start:start + size]`` (``[V]``)."""
    if v is None:
        return None
    return lax.dynamic_slice_in_dim(v, start, size, v.ndim - 1)


def _walk(plan: Plan, step, carry):
    """Fold ``step(start, size, carry)`` over the vocabulary blocks (a ragged tail last)."""
    bv = plan.block_v
    nb, tail = _blocks(plan.local_v, bv)
    if nb == 1 and not tail:
        return step(0, bv, carry)
    if nb:
        carry = lax.fori_loop(0, nb, lambda j, c: step(j * bv, bv, c), carry)
    if tail:
        carry = step(nb * bv, tail, carry)
    return carry


def _offset(plan: Plan):
    """First global class id of this walk's columns (0 on one device)."""
    if plan.axis_name is None:
        return 0
    return lax.axis_index(plan.axis_name) * plan.local_v


def _grads(plan: Plan, ops, dz_fn, refs, dt_like=None):
    """Walk again: ``dz_fn(start, size, x) -> (dx [N, B], dt block or None)`` per block;
    returns the cotangent of ``ops`` (and the assembled ``dt``, shaped like ``dt_like``)."""
    return _platform.per_platform(
        lambda q: _grads_walk(plan, q, ops, dz_fn, refs, dt_like))


def _grads_walk(plan: Plan, q: Quirks, ops, dz_fn, refs, dt_like):
    rows = len(ops) == 1
    axis = 1 if plan.layout == "dv" else 0

    def step(start, size, carry):
        g, dt = carry
        x, kb = _block(plan, ops, start, size)
        dx, dtb = dz_fn(start, size, x)
        if dt is not None:
            dt = lax.dynamic_update_slice_in_dim(dt, dtb.astype(dt.dtype), start, 1)
        if rows:
            return (lax.dynamic_update_slice_in_dim(g[0], dx.astype(g[0].dtype), start, 1),), dt
        dh, dk, db = g
        h = ops[0]
        dk = dupdate(dk, block_dkernel(h, dx, plan.layout, q), start, axis, ops[1].dtype, q)
        if db is not None:
            db = dupdate(db, dx.sum(0), start, 0, ops[2].dtype, q)
        return (dh + block_dhidden(dx, kb, plan.layout), dk, db), dt

    g0: tuple
    if rows:
        g0 = (jnp.zeros(ops[0].shape, ops[0].dtype),)
    else:
        h, k, b = ops
        # bf16 gradients are carried as uint16 bits on the CPU (_platform.Quirks.bf16_bits).
        g0 = (jnp.zeros(h.shape, _acc(ops)), carry_zeros(k.shape, k.dtype, q),
              None if b is None else carry_zeros(b.shape, b.dtype, q))
    dt0 = None if dt_like is None else jnp.zeros(dt_like.shape, dt_like.dtype)
    g, dt = _walk(plan, step, varying_like((g0, dt0), *refs))
    if not rows:
        g = (g[0].astype(ops[0].dtype), carry_value(g[1], ops[1].dtype),
             None if g[2] is None else carry_value(g[2], ops[2].dtype))
    g = tuple(psum_to_type(c, r) for c, r in zip(g, ops, strict=True))
    return g, psum_to_type(dt, dt_like)


def _tcol(temp):
    return None if temp is None else temp[:, None]


# ----------------------------------------------------------------------- stream updates


class _Stream(NamedTuple):
    m: jax.Array  # new raw max [N]
    s: jax.Array  # new sum [N]
    alpha: jax.Array  # exp(shift(m_old, m_new)) [N]
    back: jax.Array  # shift(safe(m_old), safe(m_new)) [N]
    zs: jax.Array  # shift(x, safe(m_new)) [N, B]
    e: jax.Array  # exp(zs) [N, B]


def _stream(m, s, x, temp, opts: Options) -> _Stream:
    """Fold a block of raw logits into a stream's ``(m, s)`` and keep what the sums need."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    ns = _rowmath.safe(m_new)[:, None]
    zs = _rowmath.shift(x, ns, _rowmath.row_options(opts, temp))
    e = jnp.exp(zs)
    alpha = jnp.exp(_rowmath.shift(m[:, None], ns, _rowmath.row_options(opts, temp)))[:, 0]
    back = _rowmath.shift(_rowmath.safe(m)[:, None], ns, _rowmath.row_options(opts, temp))[:, 0]
    return _Stream(m_new, s * alpha + e.sum(1), alpha, back, zs, e)


def _wsum(e, zs):
    """``sum_c e_c zs_c`` with ``0 * (-inf) = 0``."""
    return jnp.sum(jnp.where(e > 0, e * zs, 0.0), axis=1)


def _fold(old, a: _Stream, s_old, back_b, block):
    """``sum e_a zs_b`` after a block: rescaled to the new maxima, plus the block's sum."""
    return a.alpha * (old + back_b * s_old) + block


def _merge_stream(m, s, plan: Plan, temp):
    """``(m, s, alpha, back)`` of a stream merged over the vocabulary shards."""
    mg = lax.pmax(m, plan.axis_name)
    ns = _rowmath.safe(mg)
    alpha = jnp.exp(_rowmath.shift(m, ns, _rowmath.row_options(plan.opts, temp)))
    back = _rowmath.shift(_rowmath.safe(m), ns, _rowmath.row_options(plan.opts, temp))
    return mg, lax.psum(s * alpha, plan.axis_name), alpha, back


# --------------------------------------------------------------- log-probs and entropy


def _logp_stats(plan: Plan, ops, y, temp):
    """Forward walk: ``(m, log s, log p_y, H)`` per row."""
    n, acc, opts = ops[0].shape[0], _acc(ops), plan.opts
    tcol, off = _tcol(temp), _offset(plan)

    def step(start, size, st):
        m, s, u, zy = st
        x, _ = _block(plan, ops, start, size)
        a = _stream(m, s, x, tcol, opts)
        if plan.entropy:
            u = _fold(u, a, s, a.back, _wsum(a.e, a.zs))
        hit = _rowmath.onehot(y - off - start, x.shape)
        return a.m, a.s, u, zy + jnp.sum(jnp.where(hit, x, 0.0), axis=1)

    z = jnp.zeros((n,), acc)
    st = varying_like((jnp.full((n,), -jnp.inf, acc), z, z, z), *ops, y, temp)
    m, s, u, zy = _walk(plan, step, st)
    if plan.axis_name is not None:
        m, s_all, alpha, back = _merge_stream(m, s, plan, temp)
        u = lax.psum(alpha * (u + back * s), plan.axis_name)
        zy, s = lax.psum(zy, plan.axis_name), s_all
    m = _rowmath.safe(m)
    log_s = jnp.log(s)
    logp = _rowmath.shift(zy, m, _rowmath.row_options(opts, temp)) - log_s
    ent = log_s - u / s if plan.entropy else jnp.zeros_like(log_s)
    return m, log_s, logp, ent


def _logp_fwd(plan: Plan, ops, y, counted, temp):
    m, log_s, logp, ent = _logp_stats(plan, ops, y, temp)
    valid = (y >= 0) & (y < plan.num_classes)
    logp = jnp.where(counted, jnp.where(valid, logp, jnp.nan), 0.0)
    ent = jnp.where(counted, ent, 0.0)
    return (logp, ent), (ops, y, counted, temp, m, log_s, ent)


def _logp_bwd(plan: Plan, res, cts):
    ops, y, counted, temp, m, log_s, ent = res
    g_lp, g_h = cts
    opts, tcol, off = plan.opts, _tcol(temp), _offset(plan)
    g_lp = jnp.where(counted, g_lp, 0.0)
    g_h = jnp.where(counted, g_h, 0.0)

    def dz_fn(start, size, x):
        lp = _rowmath.shift(x, m[:, None], _rowmath.row_options(opts, tcol)) - log_s[:, None]
        p = jnp.exp(lp)
        hit = _rowmath.onehot(y - off - start, x.shape)
        dz = jnp.where(hit, g_lp[:, None], 0.0) - g_lp[:, None] * p
        if plan.entropy:
            dz = dz - g_h[:, None] * jnp.where(p > 0, p * (lp + ent[:, None]), 0.0)
        dz = jnp.where(counted[:, None], dz, 0.0)
        return _rowmath.transform_vjp(dz, x, _rowmath.row_options(opts, tcol)), None

    g, _ = _grads(plan, ops, dz_fn, (ops, y, counted, temp, m, log_s, ent, g_lp, g_h))
    return g, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def log_probs(plan: Plan, ops, y, counted, temp):
    """``(log p_y [N], H [N])`` (H zeros unless ``plan.entropy``); 0 where not counted."""
    return _logp_fwd(plan, ops, y, counted, temp)[0]


log_probs.defvjp(_logp_fwd, _logp_bwd)


# ---------------------------------------------------------------- probability targets


def _smoothed(plan: Plan, tb, wb, acc):
    eps = plan.opts.label_smoothing
    t = tb.astype(acc)
    if eps > 0.0:
        t = (1.0 - eps) * t + eps / plan.num_classes
    return t if wb is None else t * wb.astype(acc)[None, :]


def _soft_fwd(plan: Plan, ops, targets, weight, counted, temp):
    n, acc, opts = ops[0].shape[0], _acc(ops), plan.opts
    tcol = _tcol(temp)

    def step(start, size, st):
        m, s, wt, wtz = st
        x, _ = _block(plan, ops, start, size)
        a = _stream(m, s, x, tcol, opts)
        w = _smoothed(plan, _cols(targets, start, size), _cols(weight, start, size), acc)
        wtz = wtz + wt * a.back + jnp.sum(jnp.where(w == 0, 0.0, w * a.zs), axis=1)
        return a.m, a.s, wt + w.sum(1), wtz

    z = jnp.zeros((n,), acc)
    st = varying_like((jnp.full((n,), -jnp.inf, acc), z, z, z), *ops, targets, weight, temp)
    m, s, wt, wtz = _walk(plan, step, st)
    if plan.axis_name is not None:
        m, s_all, _, back = _merge_stream(m, s, plan, temp)
        wtz = lax.psum(wtz + wt * back, plan.axis_name)
        wt, s = lax.psum(wt, plan.axis_name), s_all
    m = _rowmath.safe(m)
    log_s = jnp.log(s)
    lse = _rowmath.transform(m, _rowmath.row_options(opts, temp)) + log_s
    loss = wt * log_s - wtz
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * jnp.square(lse)
    loss = jnp.where(counted, loss, 0.0)
    return loss, (ops, targets, weight, counted, temp, m, log_s, lse, wt)


def _soft_bwd(plan: Plan, res, g):
    ops, targets, weight, counted, temp, m, log_s, lse, wt = res
    opts, tcol, acc = plan.opts, _tcol(temp), _acc(ops)
    g = jnp.where(counted, g, 0.0)
    coef = wt + 2.0 * opts.z_loss * lse

    def dz_fn(start, size, x):
        zs = _rowmath.shift(x, m[:, None], _rowmath.row_options(opts, tcol))
        p = jnp.exp(zs - log_s[:, None])
        wb = _cols(weight, start, size)
        w = _smoothed(plan, _cols(targets, start, size), wb, acc)
        dz = jnp.where(counted[:, None], g[:, None] * (p * coef[:, None] - w), 0.0)
        dt = g[:, None] * (1.0 - opts.label_smoothing) * (log_s[:, None] - zs)
        if wb is not None:
            dt = dt * wb.astype(acc)[None, :]
        dt = jnp.where(counted[:, None], dt, 0.0)
        return _rowmath.transform_vjp(dz, x, _rowmath.row_options(opts, tcol)), dt

    refs = (ops, targets, weight, counted, temp, m, log_s, lse, wt, g)
    gops, dt = _grads(plan, ops, dz_fn, refs, dt_like=targets)
    return gops, dt, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def soft_rows(plan: Plan, ops, targets, weight, counted, temp):
    """Per-row cross-entropy against probability ``targets [N, V]``; 0 where not counted."""
    return _soft_fwd(plan, ops, targets, weight, counted, temp)[0]


soft_rows.defvjp(_soft_fwd, _soft_bwd)


# ------------------------------------------------------------------------ distillation


def _two_stats(plan: Plan, sops, tops, temp):
    """Both streams' ``(m, s)`` and, for ``"kl"``/``"reverse_kl"``, the two cross sums."""
    n, acc, opts = sops[0].shape[0], _acc(sops), plan.opts
    tcol = _tcol(temp)
    kind = plan.kind

    def step(start, size, st):
        ms, ss, mt, st_, a, b = st
        xs, _ = _block(plan, sops, start, size)
        xt, _ = _block(plan, tops, start, size)
        fs = _stream(ms, ss, xs, tcol, opts)
        ft = _stream(mt, st_, xt.astype(acc), tcol, opts)
        if kind == "kl":  # a = sum e_t zs_t, b = sum e_t zs_s
            a = _fold(a, ft, st_, ft.back, _wsum(ft.e, ft.zs))
            b = _fold(b, ft, st_, fs.back, _wsum(ft.e, fs.zs))
        elif kind == "reverse_kl":  # a = sum e_s zs_s, b = sum e_s zs_t
            a = _fold(a, fs, ss, fs.back, _wsum(fs.e, fs.zs))
            b = _fold(b, fs, ss, ft.back, _wsum(fs.e, ft.zs))
        return fs.m, fs.s, ft.m, ft.s, a, b

    z = jnp.zeros((n,), acc)
    ninf = jnp.full((n,), -jnp.inf, acc)
    st = varying_like((ninf, z, ninf, z, z, z), *sops, *tops, temp)
    ms, ss, mt, st_, a, b = _walk(plan, step, st)
    if plan.axis_name is not None:
        ms, ss_all, al_s, bk_s = _merge_stream(ms, ss, plan, temp)
        mt, st_all, al_t, bk_t = _merge_stream(mt, st_, plan, temp)
        if kind == "kl":
            a = lax.psum(al_t * (a + bk_t * st_), plan.axis_name)
            b = lax.psum(al_t * (b + bk_s * st_), plan.axis_name)
        elif kind == "reverse_kl":
            a = lax.psum(al_s * (a + bk_s * ss), plan.axis_name)
            b = lax.psum(al_s * (b + bk_t * ss), plan.axis_name)
        ss, st_ = ss_all, st_all
    return _rowmath.safe(ms), jnp.log(ss), _rowmath.safe(mt), jnp.log(st_), a, b, ss, st_


def _log_pq(plan: Plan, xs, xt, ms, ls, mt, lt, tcol):
    """Student and teacher log-probabilities of a block (final statistics)."""
    lp = _rowmath.shift(xs, ms[:, None], _rowmath.row_options(plan.opts, tcol)) - ls[:, None]
    lq = _rowmath.shift(xt, mt[:, None], _rowmath.row_options(plan.opts, tcol)) - lt[:, None]
    return lp, lq


def _log_mix(plan: Plan, lp, lq):
    """``log M = log(beta q + (1 - beta) p)``."""
    return jnp.logaddexp(math.log(plan.beta) + lq, math.log1p(-plan.beta) + lp)


def _xlogy_diff(p, lp, lo):
    """``p (lp - lo)`` with ``0 log 0 = 0``."""
    return jnp.where(p > 0, p * (lp - lo), 0.0)


def _distill_fwd(plan: Plan, sops, tops, counted, temp):
    ms, ls, mt, lt, a, b, ss, st_ = _two_stats(plan, sops, tops, temp)
    tcol, beta = _tcol(temp), plan.beta
    if plan.kind == "kl":
        loss = (a - b) / st_ + ls - lt
        extra = jnp.zeros_like(loss)
    elif plan.kind == "reverse_kl":
        loss = (a - b) / ss + lt - ls
        extra = loss
    else:  # jsd: a second pass with the normalized probabilities

        def step(start, size, acc_):
            tot, k = acc_
            xs, _ = _block(plan, sops, start, size)
            xt, _ = _block(plan, tops, start, size)
            lp, lq = _log_pq(plan, xs, xt.astype(xs.dtype), ms, ls, mt, lt, tcol)
            lm = _log_mix(plan, lp, lq)
            p, q = jnp.exp(lp), jnp.exp(lq)
            kpm = _xlogy_diff(p, lp, lm).sum(1)
            tot = tot + beta * _xlogy_diff(q, lq, lm).sum(1) + (1.0 - beta) * kpm
            return tot, k + kpm

        z = jnp.zeros_like(ls)
        loss, extra = _walk(plan, step, varying_like((z, z), *sops, *tops, temp, ms, mt))
        if plan.axis_name is not None:
            loss, extra = lax.psum((loss, extra), plan.axis_name)
    loss = jnp.where(counted, loss, 0.0)
    return loss, (sops, tops, counted, temp, ms, ls, mt, lt, extra)


def _distill_bwd(plan: Plan, res, g):
    sops, tops, counted, temp, ms, ls, mt, lt, extra = res
    tcol, beta = _tcol(temp), plan.beta
    g = jnp.where(counted, g, 0.0)

    def dz_fn(start, size, xs):
        xt, _ = _block(plan, tops, start, size)
        lp, lq = _log_pq(plan, xs, xt.astype(xs.dtype), ms, ls, mt, lt, tcol)
        p = jnp.exp(lp)
        if plan.kind == "kl":
            dz = p - jnp.exp(lq)
        elif plan.kind == "reverse_kl":
            dz = jnp.where(p > 0, p * (lp - lq - extra[:, None]), 0.0)
        else:
            lm = _log_mix(plan, lp, lq)
            dz = (1.0 - beta) * jnp.where(p > 0, p * (lp - lm - extra[:, None]), 0.0)
        dz = jnp.where(counted[:, None], g[:, None] * dz, 0.0)
        return _rowmath.transform_vjp(dz, xs, _rowmath.row_options(plan.opts, tcol)), None

    refs = (sops, tops, counted, temp, ms, ls, mt, lt, extra, g)
    gs, _ = _grads(plan, sops, dz_fn, refs)
    return gs, jax.tree.map(lambda _: None, tops), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def distill_rows(plan: Plan, sops, tops, counted, temp):
    """Per-row divergence between the student (``sops``) and the teacher (``tops``, a
    constant: its cotangent is zero); 0 where not counted."""
    return _distill_fwd(plan, sops, tops, counted, temp)[0]


distill_rows.defvjp(_distill_fwd, _distill_bwd)
