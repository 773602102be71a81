r"""Row statistics: what each fused head folds over vocabulary blocks.

A statistic (:class:`Statistic`) is the whole per-loss part of a streaming head; the walk
(:mod:`jaxent.impl.stream`) is written once for all of them. Per row, with shifted logits
``zs = shift(x, m)`` (:mod:`jaxent._rowmath`: the max kept in the raw domain, temperature
and soft-cap applied, one temperature per row when ``opts`` carries them) and
``s = sum exp(zs)``, ``p = exp(zs - log s)``:

* :class:`LogProbs` -- statistics ``m, s``, ``u = sum e zs`` and the token's raw logit:
  ``log p_y = zs_y - log s``, ``H = log s - u / s``;
  ``d/dz_c = g_lp ([c = y] - p_c) - g_H p_c (log p_c + H)``.
* :class:`SoftTargets` -- ``wt = w (1 - eps) t + w eps / V``: ``WT = sum wt``,
  ``WTZ = sum wt zs``; loss ``WT log s - WTZ + lambda_z lse^2``;
  ``d/dz = g (p (WT + 2 lambda_z lse) - wt)``, ``d/dt = g (1 - eps) w (log s - zs)``.
* :class:`Distill` (student ``p``, teacher ``q``: two streams, each with its own ``m, s``):
  ``"kl"``: ``KL(q || p) = (U_t - X) / s_t + log s_s - log s_t`` with ``U_t = sum e_t zs_t``
  and ``X = sum e_t zs_s`` (``d/dz_s = p - q``); ``"reverse_kl"`` symmetrically with
  ``U_s = sum e_s zs_s``, ``Y = sum e_s zs_t`` (``d/dz_s = p (log p - log q - KL)``);
  ``"jsd"`` needs the normalized probabilities, so a second pass (:class:`_JsdPass`) sums
  ``beta q log(q/M) + (1-beta) p log(p/M)`` and ``K = KL(p || M)``, ``M = beta q + (1 - beta)
  p`` (``d/dz_s = (1-beta) p (log(p/M) - K)``).

Online sums ``sum e_a zs_b`` fold as ``alpha_a (old + back_b s_a,old) + block`` with
``alpha = exp(shift(m_old, m_new))`` and ``back = shift(safe(m_old), safe(m_new))``; the
merge over vocabulary shards is the same fold over ``pmax``/``psum``. ``0 log 0 = 0``
throughout (products with ``e = 0`` are selected away).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _rowmath as rm
from jaxent._options import Options

# The row math a statistic is written with (the one copy, :mod:`jaxent._rowmath`), and the
# collectives of its ``merge``: over a mesh axis or an array axis (:class:`~jaxent._rowmath.
# ArrayAxis`, the vocabulary splits of a kernel) alike.
onehot, safe, shift, transform, transform_vjp = (
    rm.onehot, rm.safe, rm.shift, rm.transform, rm.transform_vjp)
psum, pmax, pmin, all_gather = rm.psum, rm.pmax, rm.pmin, rm.all_gather


class Rows(NamedTuple):
    """Per-row inputs of a statistic (each ``[N]``): ``y`` int32 global class ids (or None),
    ``counted`` (bool; int32, nonzero where counted, inside Pallas kernels: Mosaic cannot
    reshape a boolean vector), ``temp`` per-row temperatures (or None: ``opts.temperature``)."""

    y: jax.Array | None
    counted: jax.Array
    temp: jax.Array | None = None


class Statistic(Protocol):
    """A row statistic over vocabulary blocks (hashable: a static argument of the walk).

    ``xs`` is a tuple of raw-logit blocks ``[N, B]`` in the accumulation dtype, one per
    stream (``streams``: 1, or 2 for a student and a teacher); ``cols`` a dict of per-class
    inputs cut to the block (last axis ``B``: targets ``[N, B]``, class weights ``[B]``);
    ``start`` the block's first global class id; ``valid`` (``[1, B]`` bool, or None) marks
    the block's columns that are classes (padding columns come with the lowest finite
    logit: never a max, ``exp`` 0 but with a soft-cap). ``opts`` are the loss options with
    the rows' temperatures (:func:`jaxent._rowmath.row_options`).

    ``merge`` runs over vocabulary shards of a mesh axis and over the vocabulary splits of a
    GPU kernel (``axis_name`` a :class:`jaxent._rowmath.ArrayAxis`, each carry leaf then
    ``[splits, N, ...]`` and the temperatures ``[splits, N]``), so it reduces only with the
    collectives of :mod:`jaxent._rowmath` (:func:`~jaxent._rowmath.psum`, ``pmax``,
    ``pmin``, ``all_gather``, ``shared_max``), never with ``lax``'s. A statistic whose
    ``merge`` cannot run (it walks one whole vocabulary) says so with a class attribute
    ``vocab_splits = False``: the kernels then walk each row's vocabulary in one range (read
    with ``getattr``, True by default).
    """

    streams: int
    diff_cols: tuple[str, ...]

    def init(self, n: int, dtype) -> Any:
        """The carry before any block."""

    def fold(self, opts: Options, carry, xs, rows: Rows, cols: dict, start, valid) -> Any:
        """The carry after one more block."""

    def merge(self, opts: Options, carry, axis_name) -> Any:
        """The carry of the whole vocabulary from the carries of its shards."""

    def finish(self, opts: Options, carry, rows: Rows) -> tuple[Any, Any]:
        """``(per-row outputs, residuals for block_grad)``."""

    def then(self, res) -> Statistic | None:
        """A statistic for a second pass over the blocks (None: done)."""

    def block_grad(self, opts: Options, res, xs, rows: Rows, cols: dict, start,
                   cts) -> tuple[jax.Array, dict]:
        """``(d/d raw logits of stream 0 [N, B], {name: d cols[name] block})`` for the
        cotangents ``cts`` of the outputs."""


# --------------------------------------------------------------------- stream updates


class Stream(NamedTuple):
    """One stream's online max and sum after a block, with what the sums need."""

    m: jax.Array  # new raw max [N]
    s: jax.Array  # new sum [N]
    alpha: jax.Array  # exp(shift(m_old, m_new)) [N]
    back: jax.Array  # shift(safe(m_old), safe(m_new)) [N]
    zs: jax.Array  # shift(x, safe(m_new)) [N, B]
    e: jax.Array  # exp(zs) [N, B], 0 on padding columns


def stream(m, s, x, opts: Options, valid=None) -> Stream:
    """Fold a block of raw logits ``x [N, B]`` into a stream's ``(m, s)``."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    ns = rm.safe(m_new)[:, None]
    zs = rm.shift(x, ns, opts)
    e = jnp.exp(zs)
    if valid is not None:  # with a soft-cap padding columns keep a finite -cap
        e = jnp.where(valid, e, 0.0)
    alpha = jnp.exp(rm.shift(m[:, None], ns, opts))[:, 0]
    back = rm.shift(rm.safe(m)[:, None], ns, opts)[:, 0]
    return Stream(m_new, s * alpha + e.sum(1), alpha, back, zs, e)


def wsum(e, zs):
    """``sum_c e_c zs_c`` with ``0 * (-inf) = 0`` (a ``nan`` ``e`` stays ``nan``)."""
    return jnp.sum(jnp.where(e == 0, 0.0, e * zs), axis=1)


def refold(old, a: Stream, s_old, back_b, block):
    """``sum e_a zs_b`` after a block: rescaled to the new maxima, plus the block's sum."""
    return a.alpha * (old + back_b * s_old) + block


def merge_stream(m, s, opts: Options, axis_name):
    """``(m, s, alpha, back)`` of a stream merged over the vocabulary shards."""
    mg = rm.shared_max(m, axis_name)
    ns = rm.safe(mg)
    alpha = jnp.exp(rm.shift(m, ns, opts))
    back = rm.shift(rm.safe(m), ns, opts)
    return mg, rm.psum(s * alpha, axis_name), alpha, back


def _first_pass(n: int, dtype, extra: int) -> tuple:
    """``(m = -inf, s = 0)`` and ``extra`` more zero sums, each ``[N]``."""
    z = jnp.zeros((n,), dtype)
    return (jnp.full((n,), -jnp.inf, dtype), z) + (z,) * extra


class _OnePass:
    streams = 1
    diff_cols: tuple[str, ...] = ()

    def then(self, res) -> Statistic | None:
        return None


# ---------------------------------------------------------------- log-probs, entropy


@dataclasses.dataclass(frozen=True)
class LogProbs(_OnePass):
    """``(log p_y, H)`` per row (``H`` zeros unless ``entropy``); ``num_classes`` the
    vocabulary (ids outside it give ``nan``); 0 where not counted."""

    num_classes: int
    entropy: bool = False

    def init(self, n, dtype):
        return _first_pass(n, dtype, 2)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        m, s, u, zy = carry
        (x,) = xs
        a = stream(m, s, x, opts, valid)
        if self.entropy:
            u = refold(u, a, s, a.back, wsum(a.e, a.zs))
        hit = rm.onehot(rows.y - start, x.shape)
        return a.m, a.s, u, zy + jnp.sum(jnp.where(hit, x, 0.0), axis=1)

    def merge(self, opts, carry, axis_name):
        m, s, u, zy = carry
        m, s_all, alpha, back = merge_stream(m, s, opts, axis_name)
        u = rm.psum(alpha * (u + back * s), axis_name)
        return m, s_all, u, rm.psum(zy, axis_name)

    def finish(self, opts, carry, rows):
        m, s, u, zy = carry
        m = rm.safe(m)
        log_s = jnp.log(s)
        logp = rm.shift(zy, m, opts) - log_s
        ent = log_s - u / s if self.entropy else jnp.zeros_like(log_s)
        valid = (rows.y >= 0) & (rows.y < self.num_classes)
        logp = jnp.where(rows.counted, jnp.where(valid, logp, jnp.nan), 0.0)
        ent = jnp.where(rows.counted, ent, 0.0)
        return (logp, ent), (m, log_s, ent)

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        m, log_s, ent = res
        g_lp, g_h = (jnp.where(rows.counted, g, 0.0) for g in cts)
        # A counted id outside [0, V) has a nan value, and so nan gradients.
        valid = (rows.y >= 0) & (rows.y < self.num_classes)
        g_lp = jnp.where(valid | jnp.logical_not(rows.counted), g_lp, jnp.nan)
        (x,) = xs
        lp = rm.shift(x, m[:, None], opts) - log_s[:, None]
        p = jnp.exp(lp)
        hit = rm.onehot(rows.y - start, x.shape)
        dz = jnp.where(hit, g_lp[:, None], 0.0) - g_lp[:, None] * p
        if self.entropy:
            dz = dz - g_h[:, None] * _xlogy_diff(p, lp, -ent[:, None])
        dz = jnp.where(rows.counted[:, None], dz, 0.0)
        return rm.transform_vjp(dz, x, opts), {}


# ---------------------------------------------------------------- probability targets


@dataclasses.dataclass(frozen=True)
class SoftTargets(_OnePass):
    """Per-row cross-entropy against probability targets (``cols["targets"]``, optional
    class weights ``cols["weight"]``); 0 where not counted. Differentiable in the targets."""

    num_classes: int
    diff_cols: tuple[str, ...] = ("targets",)

    def _wt(self, opts, cols, acc):
        eps = opts.label_smoothing
        t = cols["targets"].astype(acc)
        if eps > 0.0:
            t = (1.0 - eps) * t + eps / self.num_classes
        w = cols.get("weight")
        return t if w is None else t * w.astype(acc)[None, :]

    def init(self, n, dtype):
        return _first_pass(n, dtype, 2)

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        m, s, wt, wtz = carry
        (x,) = xs
        a = stream(m, s, x, opts, valid)
        w = self._wt(opts, cols, x.dtype)
        if valid is not None:  # smoothing puts eps / V on every column, padding too
            w = jnp.where(valid, w, 0.0)
        wtz = wtz + wt * a.back + jnp.sum(jnp.where(w == 0, 0.0, w * a.zs), axis=1)
        return a.m, a.s, wt + w.sum(1), wtz

    def merge(self, opts, carry, axis_name):
        m, s, wt, wtz = carry
        m, s_all, _, back = merge_stream(m, s, opts, axis_name)
        wtz = rm.psum(wtz + wt * back, axis_name)
        return m, s_all, rm.psum(wt, axis_name), wtz

    def finish(self, opts, carry, rows):
        m, s, wt, wtz = carry
        m = rm.safe(m)
        log_s = jnp.log(s)
        lse = rm.transform(m, opts) + log_s
        loss = wt * log_s - wtz
        if opts.z_loss > 0.0:
            loss = loss + opts.z_loss * jnp.square(lse)
        return jnp.where(rows.counted, loss, 0.0), (m, log_s, lse, wt)

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        m, log_s, lse, wt = res
        (x,) = xs
        g = jnp.where(rows.counted, cts, 0.0)
        coef = wt + 2.0 * opts.z_loss * lse
        zs = rm.shift(x, m[:, None], opts)
        p = jnp.exp(zs - log_s[:, None])
        w = self._wt(opts, cols, x.dtype)
        dz = jnp.where(rows.counted[:, None], g[:, None] * (p * coef[:, None] - w), 0.0)
        dt = g[:, None] * (1.0 - opts.label_smoothing) * (log_s[:, None] - zs)
        if cols.get("weight") is not None:
            dt = dt * cols["weight"].astype(x.dtype)[None, :]
        dt = jnp.where(rows.counted[:, None], dt, 0.0)
        return rm.transform_vjp(dz, x, opts), {"targets": dt}


# ------------------------------------------------------------------------ distillation


def _log_pq(opts, xs, ms, ls, mt, lt):
    """Student and teacher log-probabilities of a block (final statistics)."""
    x_s, x_t = xs
    lp = rm.shift(x_s, ms[:, None], opts) - ls[:, None]
    lq = rm.shift(x_t, mt[:, None], opts) - lt[:, None]
    return lp, lq


def _log_mix(beta: float, lp, lq):
    """``log M = log(beta q + (1 - beta) p)``."""
    return jnp.logaddexp(math.log(beta) + lq, math.log1p(-beta) + lp)


def _xlogy_diff(p, lp, lo):
    """``p (lp - lo)`` with ``0 log 0 = 0`` (a ``nan`` ``p`` stays ``nan``)."""
    return jnp.where(p == 0, 0.0, p * (lp - lo))


@dataclasses.dataclass(frozen=True)
class Distill(_OnePass):
    """Per-row divergence of a student (stream 0) from a teacher (stream 1, a constant):
    ``kind`` is ``"kl"``, ``"reverse_kl"`` or ``"jsd"`` (weight ``beta``); 0 where not
    counted."""

    kind: str
    beta: float = 0.5
    streams = 2

    def init(self, n, dtype):
        ms, ss, a, b = _first_pass(n, dtype, 2)
        mt, st = _first_pass(n, dtype, 0)
        return ms, ss, mt, st, a, b

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        ms, ss, mt, st, a, b = carry
        fs = stream(ms, ss, xs[0], opts, valid)
        ft = stream(mt, st, xs[1], opts, valid)
        if self.kind == "kl":  # a = sum e_t zs_t, b = sum e_t zs_s
            a = refold(a, ft, st, ft.back, wsum(ft.e, ft.zs))
            b = refold(b, ft, st, fs.back, wsum(ft.e, fs.zs))
        elif self.kind == "reverse_kl":  # a = sum e_s zs_s, b = sum e_s zs_t
            a = refold(a, fs, ss, fs.back, wsum(fs.e, fs.zs))
            b = refold(b, fs, ss, ft.back, wsum(fs.e, ft.zs))
        return fs.m, fs.s, ft.m, ft.s, a, b

    def merge(self, opts, carry, axis_name):
        ms, ss, mt, st, a, b = carry
        ms, ss_all, al_s, bk_s = merge_stream(ms, ss, opts, axis_name)
        mt, st_all, al_t, bk_t = merge_stream(mt, st, opts, axis_name)
        if self.kind == "kl":
            a = rm.psum(al_t * (a + bk_t * st), axis_name)
            b = rm.psum(al_t * (b + bk_s * st), axis_name)
        elif self.kind == "reverse_kl":
            a = rm.psum(al_s * (a + bk_s * ss), axis_name)
            b = rm.psum(al_s * (b + bk_t * ss), axis_name)
        return ms, ss_all, mt, st_all, a, b

    def finish(self, opts, carry, rows):
        ms, ss, mt, st, a, b = carry
        ms, ls, mt, lt = rm.safe(ms), jnp.log(ss), rm.safe(mt), jnp.log(st)
        if self.kind == "kl":
            loss, extra = (a - b) / st + ls - lt, jnp.zeros_like(ls)
        elif self.kind == "reverse_kl":
            loss = (a - b) / ss + lt - ls
            extra = loss
        else:  # jsd: the loss comes from the second pass
            loss, extra = jnp.zeros_like(ls), None
        return jnp.where(rows.counted, loss, 0.0), (ms, ls, mt, lt, extra)

    def then(self, res) -> Statistic | None:
        return _JsdPass(self.beta, res[:4]) if self.kind == "jsd" else None

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        ms, ls, mt, lt, extra = res
        g = jnp.where(rows.counted, cts, 0.0)
        lp, lq = _log_pq(opts, xs, ms, ls, mt, lt)
        p = jnp.exp(lp)
        if self.kind == "kl":
            dz = p - jnp.exp(lq)
        elif self.kind == "reverse_kl":
            dz = _xlogy_diff(p, lp, lq + extra[:, None])
        else:
            lm = _log_mix(self.beta, lp, lq)
            dz = (1.0 - self.beta) * _xlogy_diff(p, lp, lm + extra[:, None])
        dz = jnp.where(rows.counted[:, None], g[:, None] * dz, 0.0)
        return rm.transform_vjp(dz, xs[0], opts), {}


class _JsdPass(_OnePass):
    """The second pass of ``"jsd"``: the divergence and ``K = KL(p || M)`` per row from the
    first pass's ``(ms, ls, mt, lt)`` (held here: built while tracing, never hashed)."""

    streams = 2

    def __init__(self, beta: float, first):
        self.beta, self.first = beta, first

    def init(self, n, dtype):
        return _first_pass(n, dtype, 0)[1], _first_pass(n, dtype, 0)[1]

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        tot, k = carry
        lp, lq = _log_pq(opts, xs, *self.first)
        lm = _log_mix(self.beta, lp, lq)
        p, q = jnp.exp(lp), jnp.exp(lq)
        if valid is not None:  # with a soft-cap padding columns keep a finite -cap
            p, q = jnp.where(valid, p, 0.0), jnp.where(valid, q, 0.0)
        kpm = _xlogy_diff(p, lp, lm).sum(1)
        tot = tot + self.beta * _xlogy_diff(q, lq, lm).sum(1) + (1.0 - self.beta) * kpm
        return tot, k + kpm

    def merge(self, opts, carry, axis_name):
        return rm.psum(carry, axis_name)

    def finish(self, opts, carry, rows):
        tot, k = carry
        return jnp.where(rows.counted, tot, 0.0), (*self.first, k)

    def block_grad(self, opts, res, xs, rows, cols, start, cts):  # pragma: no cover
        raise NotImplementedError("the jsd gradient is Distill's")


# ----------------------------------------------------------------------- cross-entropy


@dataclasses.dataclass(frozen=True)
class CrossEntropy(_OnePass):
    """Cross-entropy against integer labels with every option (class weights
    ``cols["weight"]``, smoothing, z-loss, soft-cap, temperature): the online statistics of
    :func:`jaxent._rowmath.update_stats` (``m, s, z_y``, ``wz`` and ``W`` with smoothing,
    the argmax with ``aux``). ``rows`` is a :class:`jaxent._rowmath.Labels`. Outputs
    ``(losses, lse, argmax or None)``, the last two without gradient; the residuals are
    ``[N]`` each. The fused cross-entropy of :func:`jaxent.linear_cross_entropy` is this
    statistic on the streaming walk (:mod:`jaxent.impl.linear_ce`).
    """

    num_classes: int
    aux: bool = False

    def init(self, n, dtype):
        return rm.init_stats(n, dtype, False, self.aux), (
            (jnp.zeros((n,), dtype), jnp.zeros((), dtype)))

    def fold(self, opts, carry, xs, rows, cols, start, valid):
        st, (wz, wseen) = carry
        smooth = opts.label_smoothing > 0.0
        st = rm.Stats(st.m, st.s, st.zy, wz if smooth else None, wseen if smooth else None,
                      st.arg)
        st = rm.update_stats(st, xs[0], rows.y - start, cols.get("weight"), start, opts,
                             valid=valid)
        sums = (st.wz, st.wseen) if smooth else (wz, wseen)
        return st._replace(wz=None, wseen=None), sums

    def merge(self, opts, carry, axis_name):
        st, (wz, wseen) = carry
        st = rm.merge_stats(st._replace(wz=wz, wseen=wseen), axis_name, 0, opts)
        return st._replace(wz=None, wseen=None), (st.wz, st.wseen)

    def finish(self, opts, carry, rows):
        st, (wz, wseen) = carry
        rs = rm.finish(st._replace(wz=wz), opts)
        big_w = wseen if opts.label_smoothing > 0.0 else jnp.zeros((), wz.dtype)
        loss = rm.label_loss(rs.log_s, rs.zy_s, rs.wz, rs.lse, rows.row_w, big_w, opts,
                             self.num_classes)
        arg = rs.arg if self.aux else None
        return ((rm.row_losses(loss, rows), lax.stop_gradient(rs.lse), arg),
                (rs.m, rs.log_s, rs.lse, jnp.broadcast_to(big_w, rs.lse.shape)))

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        return self._grad(opts, res, xs, rows, cols, start, rm.row_cotangent(cts[0], rows),
                          rows.row_w)

    def _grad(self, opts, res, xs, rows, cols, start, g, row_w):
        """``block_grad`` for the per-row cotangent ``g`` and row weights ``row_w``."""
        m, log_s, lse, big_w = res
        coefs = rm.grad_coefs(g, lse, row_w, big_w, opts, self.num_classes)
        dx = rm.block_grad(xs[0], m, log_s, rows.y - start, coefs, cols.get("weight"),
                           rows.counted, opts)
        return dx, {}

    def tiled(self) -> CrossEntropyTiles:
        """This statistic in the form the Pallas kernels take (:class:`CrossEntropyTiles`)."""
        return CrossEntropyTiles(self.num_classes, self.aux)


@dataclasses.dataclass(frozen=True)
class CrossEntropyTiles(CrossEntropy):
    """:class:`CrossEntropy` as the Pallas kernels (:mod:`jaxent.impl.pallas_stats`) take
    it: every carry leaf a per-row vector (the class-weight sum ``W`` too, which masked
    tiles count per row), and a ``block_grad`` that reads only :class:`Rows`' fields (the
    kernels pass no more): the row weight ``w_y`` rides in a fifth ``[N]`` residual, ``nan``
    on rows whose label is out of range, so that their gradient is ``nan`` as their loss
    (the walks select it from the labels instead, keeping four residuals). Same outputs.
    """

    def init(self, n, dtype):
        st, (wz, _) = super().init(n, dtype)
        return st, (wz, jnp.zeros((n,), dtype))

    def finish(self, opts, carry, rows):
        outs, res = super().finish(opts, carry, rows)
        return outs, (*res, jnp.where(rows.valid, rows.row_w, jnp.nan))

    def block_grad(self, opts, res, xs, rows, cols, start, cts):
        # Rows not counted get 0 from rm.block_grad's select.
        return self._grad(opts, res[:4], xs, rows, cols, start, cts[0], res[4])
