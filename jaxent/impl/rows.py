"""Plain cross-entropy on whole rows of logits ``[N, C]``, with hand-written gradients.

The per-row formulas are :mod:`jaxent._rowmath`'s. Evaluated without differentiation only
the row statistics are formed. Under differentiation the gradient is one fused elementwise
expression, made either

* in the forward (``residual="grad"``): ``e = exp(z - m)`` is formed once, summed (in the
  accumulation dtype) and turned into the gradient; the backward only scales it by the
  cotangent, which XLA fuses into the producer; or
* in the backward (``residual="lse"``): the forward keeps ``m`` and ``log s`` per row, the
  backward forms ``p = exp((z - m) - log s)``.

``residual="auto"`` picks one per platform, dtype and shape (:func:`uses_lse`). Rows that
are not counted give exactly 0 loss and 0 gradient even when all their logits are ``-inf``.
The CPU's detours (:mod:`jaxent._platform`) are applied through
:func:`jaxent._platform.per_platform`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _platform
from jaxent import _rowmath as rm
from jaxent._options import Options
from jaxent._platform import Quirks


def uses_lse(x, opts: Options) -> bool:
    """Whether the forward of ``x [N, C]`` keeps the log-sum-exp (else the gradient).

    ``"auto"`` reads :func:`jaxent._platform.heuristics`; a symbolic ``N`` counts as large.
    """
    if opts.residual != "auto":
        return opts.residual == "lse"
    h = _platform.heuristics()
    c = _platform.static_size(x.shape[1])
    if x.dtype != rm.compute_dtype(x.dtype):
        lo, hi = h.lse_16bit_rows
        return lo <= c <= hi
    return _platform.static_size(x.shape[0]) * c >= h.lse_min_elements


def _classes_explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x [N, C]`` carries an explicit sharding of its class axis (explicit mesh)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and len(spec) > 1 and spec[1] is not None


def _pick(x: jax.Array, y: jax.Array, q: Quirks) -> jax.Array:
    """Raw label logits ``x[r, y[r]]`` in the accumulation dtype (``y`` in range)."""
    acc = rm.compute_dtype(x.dtype)
    if _classes_explicitly_sharded(x):
        # A gather across an explicitly sharded axis is refused; a masked sum reduces.
        return jnp.where(rm.onehot(y, x.shape), x, jnp.zeros((), x.dtype)).sum(1).astype(acc)
    return jnp.take_along_axis(_platform.fresh(x, q), y[:, None], axis=1)[:, 0].astype(acc)


def _max_and_sum(x: jax.Array, m_lo: jax.Array, opts: Options, q: Quirks,
                 split: bool = True):
    """Safe raw row max (at least ``m_lo``), ``e = exp(z - m) [N, C]`` and ``s = sum e``;
    with ``split``, long float32 rows are reduced in pieces where the platform needs it
    (not when ``e`` is kept: the pieces' layout would make it a second ``[N, C]`` buffer)."""
    n, c = x.shape
    acc = rm.compute_dtype(x.dtype)
    split = split and not rm.row_temperature(opts)  # pieces would not line up with [N]
    k = _platform.row_pieces(c, q) if split and x.dtype == acc else 1
    if k == 1:
        m = rm.safe(jnp.maximum(x.max(axis=1).astype(acc), m_lo))
        e = jnp.exp(rm.shift(x, m[:, None], opts))
        return m, e, e.sum(axis=1)
    xr = x.reshape(n * k, c // k)
    m = rm.safe(jnp.maximum(xr.max(axis=1).reshape(n, k).max(axis=1).astype(acc), m_lo))
    e = jnp.exp(rm.shift(xr, jnp.repeat(m, k)[:, None], opts))
    return m, e.reshape(n, c), e.sum(axis=1).reshape(n, k).sum(axis=1)


def _label_stats(x, lab: rm.Labels, weight, opts: Options, q: Quirks, split: bool = True):
    """``(m, e, s, loss)`` of whole rows against integer labels (``e = exp(z - m)``)."""
    c = x.shape[1]
    opts = lab.options(opts)
    x_y = _pick(x, lab.y, q)
    # max(m, x_y) == m; it orders the pick before a backward that may overwrite x in place.
    m, e, s = _max_and_sum(x, x_y, opts, q, split)
    log_s = jnp.log(s)
    wz = None
    if opts.smoothing:
        zs = rm.shift(x, m[:, None], opts)
        wz = (zs if weight is None else zs * weight[None, :]).sum(axis=1)
    lse = rm.transform(m, opts) + log_s
    loss = rm.label_loss(log_s, rm.shift(x_y, m, opts), wz, lse, lab.row_w,
                         rm.class_sum(weight, c, m.dtype), opts, c)
    return m, e, s, rm.row_losses(loss, lab)


def _label_grad(x, lab: rm.Labels, weight, m, log_s, g, opts: Options, q: Quirks, p=None):
    """``d loss / d x`` for the row cotangent ``g``, from the row statistics (or from the
    probabilities ``p`` when the forward has them)."""
    c = x.shape[1]
    opts = lab.options(opts)
    lse = rm.transform(m, opts) + log_s
    coefs = rm.grad_coefs(rm.row_cotangent(g, lab), lse, lab.row_w,
                          rm.class_sum(weight, c, m.dtype), opts, c)
    x = _platform.fresh(x, q)
    if p is None:
        p = rm.probs(x, _platform.apart(m, q), log_s, opts)
    dz = rm.dlogits(p, coefs, lab.y, weight, lab.counted, opts)
    return rm.transform_vjp(dz, x, opts).astype(x.dtype)


def _labels_primal(x, lab, weight, opts: Options):
    return _platform.per_platform(
        lambda q, x, lab, w: _label_stats(x, lab, w, opts, q)[3], x, lab, weight)


def _labels_fwd(x, lab, weight, opts: Options):
    if uses_lse(x, opts):
        def fwd(q, x, lab, w):
            m, _, s, loss = _label_stats(x, lab, w, opts, q)
            return m, jnp.log(s), loss

        m, log_s, loss = _platform.per_platform(fwd, x, lab, weight)
        return loss, (x, lab, weight, m, log_s)

    def fwd_grad(q, x, lab, w):
        return loss_and_grad(x, lab, w, opts, q)[:2]

    loss, dx = _platform.per_platform(fwd_grad, x, lab, weight)
    return loss, (dx, lab, weight, None, None)


def loss_and_grad(x, lab: rm.Labels, weight, opts: Options, q: Quirks, reuse_e: bool = True):
    """``(losses, d losses.sum() / dx, lse)`` of whole rows ``x [N, C]`` in one pass.

    With ``reuse_e``, one exp per logit: ``p = e / s`` reuses the ``e`` that was summed
    (``e`` is then a buffer of its own beside ``x``); without, ``p`` is formed again from
    ``x`` and the gradient can take ``x``'s buffer. 16-bit logits always form ``p`` again
    (keeping ``e`` would be a float32 ``[N, C]``).
    """
    keep_e = reuse_e and x.dtype == rm.compute_dtype(x.dtype)
    m, e, s, loss = _label_stats(x, lab, weight, opts, q, split=not keep_e)
    p = e * (1.0 / s)[:, None] if keep_e else None
    log_s = jnp.log(s)
    dx = _label_grad(x, lab, weight, m, log_s, jnp.ones_like(m), opts, q, p)
    return loss, dx, rm.transform(m, lab.options(opts)) + log_s


def _labels_bwd(opts: Options, res, g):
    x_or_dx, lab, weight, m, log_s = res
    if m is None:  # the gradient residual, made for a unit cotangent
        dx = (x_or_dx.astype(g.dtype) * g[:, None]).astype(x_or_dx.dtype)
    else:
        dx = _platform.per_platform(
            lambda q, x, lab, w, m, s, g: _label_grad(x, lab, w, m, s, g, opts, q),
            x_or_dx, lab, weight, m, log_s, g)
    return dx, None, None if weight is None else jnp.zeros_like(weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def label_rows(x, lab: rm.Labels, weight, opts: Options):
    """Per-row cross-entropy of ``x [N, C]`` against :class:`~jaxent._rowmath.Labels`.

    ``weight [C]`` (or None) are the class weights (label smoothing uses them; ``lab.row_w``
    already holds ``w[y]``). Returns ``[N]`` losses in the accumulation dtype; counted rows
    with out-of-range labels give ``nan``.
    """
    return _labels_primal(x, lab, weight, opts)


label_rows.defvjp(_labels_fwd, _labels_bwd)


# --------------------------------------------------------------------- probability targets


def _smoothed(t, weight, opts: Options, dtype):
    """``w_c t'_c`` with ``t' = (1 - e) t + e / C``."""
    c = t.shape[-1]
    t = t.astype(dtype)
    if opts.smoothing:
        t = (1.0 - opts.label_smoothing) * t + opts.label_smoothing / c
    return t if weight is None else t * weight.astype(dtype)[None, :]


def _target_stats(x, t, counted, weight, opts: Options, q: Quirks):
    """``(m, log_s, wt, loss)``: ``sum_c wt_c (lse - z_c) + zl lse^2`` with 0 log 0 = 0."""
    m, _, s = _max_and_sum(x, jnp.full(x.shape[:1], -jnp.inf, rm.compute_dtype(x.dtype)),
                           opts, q)
    log_s = jnp.log(s)
    wt = _smoothed(t, weight, opts, m.dtype)
    zs = rm.shift(x, m[:, None], opts)
    # Classes without target mass contribute nothing, even at -inf logits.
    wtz = jnp.where(wt == 0, 0.0, wt * zs).sum(axis=1)
    loss = wt.sum(axis=1) * log_s - wtz
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * jnp.square(rm.transform(m, opts) + log_s)
    return m, log_s, wt, jnp.where(counted, loss, 0.0)


def _target_grads(x, t, counted, weight, m, log_s, g, opts: Options, q: Quirks):
    """``(d/dx, d/dt)``: ``g [p (sum wt + 2 zl lse) - wt]`` and ``g (1 - e) w (log s - zs)``."""
    g = jnp.where(counted, g, 0.0)
    wt = _smoothed(t, weight, opts, m.dtype)
    lse = rm.transform(m, opts) + log_s
    coef = g * (wt.sum(axis=1) + 2.0 * opts.z_loss * lse)
    xf = _platform.fresh(x, q)
    zs = rm.shift(xf, m[:, None], opts)
    dz = jnp.exp(zs - log_s[:, None]) * coef[:, None] - g[:, None] * wt
    dx = rm.transform_vjp(jnp.where(counted[:, None], dz, 0.0), xf, opts).astype(x.dtype)
    dt = g[:, None] * (1.0 - opts.label_smoothing) * (log_s[:, None] - zs)
    if weight is not None:
        dt = dt * weight[None, :]
    return dx, jnp.where(counted[:, None], dt, 0.0).astype(t.dtype)


def _targets_primal(x, t, counted, weight, opts: Options, temp=None):
    return _platform.per_platform(
        lambda q, x, t, c, w, tp: _target_stats(x, t, c, w, rm.row_options(opts, tp), q)[3],
        x, t, counted, weight, temp)


def _targets_fwd(x, t, counted, weight, opts: Options, temp=None):
    m, log_s, _, loss = _platform.per_platform(
        lambda q, x, t, c, w, tp: _target_stats(x, t, c, w, rm.row_options(opts, tp), q),
        x, t, counted, weight, temp)
    return loss, (x, t, counted, weight, m, log_s, temp)


def _targets_bwd(opts: Options, res, g):
    x, t, counted, weight, m, log_s, temp = res
    def grads(q, x, t, counted, weight, m, log_s, g, tp):
        return _target_grads(x, t, counted, weight, m, log_s, g, rm.row_options(opts, tp), q)

    dx, dt = _platform.per_platform(grads, x, t, counted, weight, m, log_s, g, temp)
    return dx, dt, None, None if weight is None else jnp.zeros_like(weight), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def target_rows(x, targets, counted, weight, opts: Options, temp=None):
    """Per-row cross-entropy of ``x [N, C]`` against probability ``targets [N, C]``.

    Differentiable in both ``x`` and ``targets`` (knowledge distillation); returns ``[N]``.
    ``temp [N]`` (a constant, or None) are per-row temperatures. The backward recomputes
    ``p`` from the kept ``m`` and ``log s``.
    """
    return _targets_primal(x, targets, counted, weight, opts, temp)


target_rows.defvjp(_targets_fwd, _targets_bwd)


def picked_log_probs(lp: jax.Array, y: jax.Array) -> jax.Array:
    """``lp[r, y[r]]`` of log-probabilities ``[N, C]`` (``nll_loss``), accumulation dtype;
    a masked sum where the class axis is explicitly sharded (a gather would be refused)."""
    acc = rm.compute_dtype(lp.dtype)
    if _classes_explicitly_sharded(lp):
        return jnp.where(rm.onehot(y, lp.shape), lp, jnp.zeros((), lp.dtype)).sum(1).astype(acc)
    return jnp.take_along_axis(lp, y[:, None], axis=1)[:, 0].astype(acc)



# ----------------------------------------------------------- vocabulary-parallel rows


def _parallel_stats(x, lab: rm.Labels, weight, opts: Options, axis_name, q: Quirks):
    """Merged statistics over the shards of ``axis_name`` and this shard's offset."""
    local = x.shape[1]
    off = lax.axis_index(axis_name).astype(jnp.int32) * local
    w_loc = None if weight is None else lax.dynamic_slice_in_dim(weight, off, local)
    y_loc = lab.y - off
    opts = lab.options(opts)
    acc = rm.compute_dtype(x.dtype)
    st = rm.init_stats(x.shape[0], acc, opts.smoothing, False)
    st = rm.update_stats(st, _platform.fresh(x, q).astype(acc), y_loc, w_loc, 0, opts)
    return rm.finish(rm.merge_stats(st, axis_name, off, opts), opts), off, w_loc


def _parallel_primal(x, lab, weight, opts: Options, axis_name):
    def primal(q, x, lab, w):
        rs, _, _ = _parallel_stats(x, lab, w, opts, axis_name, q)
        c = x.shape[1] * lax.axis_size(axis_name)
        return rm.stats_losses(rs, lab, w, opts, c), rs.m, rs.log_s, rs.lse

    return _platform.per_platform(primal, x, lab, weight)


def _parallel_fwd(x, lab, weight, opts: Options, axis_name):
    losses, m, log_s, lse = _parallel_primal(x, lab, weight, opts, axis_name)
    return losses, (x, lab, weight, m, log_s, lse)


def _parallel_bwd(opts: Options, axis_name, res, g):
    def grad(q, x, lab, w, m, log_s, lse, g):
        local = x.shape[1]
        off = lax.axis_index(axis_name).astype(jnp.int32) * local
        w_loc = None if w is None else lax.dynamic_slice_in_dim(w, off, local)
        coefs = rm.stats_coefs(g, lse, lab, w, opts, local * lax.axis_size(axis_name))
        x = _platform.fresh(x, q)
        return rm.block_grad(x, m, log_s, lab.y - off, coefs, w_loc, lab.counted,
                             lab.options(opts)).astype(x.dtype)

    x, lab, weight = res[:3]
    dx = _platform.per_platform(grad, *res, g)
    return dx, None, None if weight is None else jnp.zeros_like(weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def label_rows_parallel(x, lab: rm.Labels, weight, opts: Options, axis_name):
    """:func:`label_rows` of this shard's logits ``x [N, C/k]`` over the full vocabulary,
    inside ``jax.shard_map`` with the classes split over ``axis_name``.

    ``lab`` holds global class ids, ``weight`` the full ``[C]`` class weights. The row
    statistics are merged with one ``pmax`` and ``psum`` of ``[N]`` vectors; the result is
    the same on every shard; the backward is local (no collective).
    """
    return _parallel_primal(x, lab, weight, opts, axis_name)[0]


label_rows_parallel.defvjp(_parallel_fwd, _parallel_bwd)
