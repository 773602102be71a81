r"""Per-row formulas of the softmax losses: the one copy every implementation calls.

For a row of raw logits :math:`x` (from a logits array, or a block of ``hidden @ kernel``)
the loss works on :math:`z = \mathrm{cap}\tanh(x / (T\,\mathrm{cap}))` (the cap optional).
The transform is increasing, so the row max is kept in the *raw* domain, ``m_raw = max x``,
and every shifted logit is formed by :func:`shift` as :math:`z - m` with
:math:`m = \mathrm{transform}(m_\mathrm{raw})`:

* without a soft-cap as ``(x - m_raw) / T``, so the max element is exactly 0 at any
  temperature (``x / T - m / T`` rounds ``x / T`` first and leaves an error of
  ``ulp(max |x| / T)``);
* never as ``z - lse``: the shift is kept apart from ``log s``, so that
  ``p = exp((z - m) - log s)`` stays accurate at any logit offset (``m + log s`` rounded in
  float32 loses the small ``log s`` next to a large ``m``).

Row statistics (all in the accumulation dtype, float32 for 16-bit inputs):
``m`` (raw max; its :func:`safe` version is 0 where not finite), ``log s`` with
``s = sum_c exp(z_c - m)``, the label's shifted logit ``z_y - m`` and, for label smoothing,
``wz = sum_c w_c (z_c - m)``. From them, with row weight ``r = w_y`` (0 when not counted),
``W = sum_c w_c`` and ``lse = m + log s``:

.. math::
    \mathrm{loss} = (1-\epsilon)\, r\,(\log s - (z_y - m))
      + \frac{\epsilon}{C}\,(W \log s - wz) + \lambda_z\,\mathrm{lse}^2

    \frac{\partial\,\mathrm{loss}}{\partial z_c} = g\,[p_c A - (1-\epsilon) r [c = y]
      - \tfrac{\epsilon}{C} w_c],\qquad
    A = (1-\epsilon) r + \tfrac{\epsilon}{C} W + 2\lambda_z\,\mathrm{lse},

then :func:`transform_vjp` chains the gradient through the soft-cap and the temperature.
Streaming walks fold blocks of a row into :class:`Stats` with :func:`update_stats` and
merge the statistics of vocabulary shards with :func:`merge_stats`.

**Per-row temperatures.** ``opts.temperature`` is a static float, or, inside a walk, an
array ``[N]`` with one temperature per row (:func:`row_options`; it comes in
:attr:`Labels.temp`). Every formula here divides by it through :func:`_scale`, which lines
an ``[N]`` temperature up with the rows of ``[N]`` and ``[N, B]`` operands, so there is one
copy of each formula for both.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxent._options import Options


def compute_dtype(dtype) -> jnp.dtype:
    """The accumulation dtype: float32 for 16-bit inputs, otherwise the input's dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def safe(m: jax.Array) -> jax.Array:
    """``m`` where finite, else 0: the shift of a row with no finite logit."""
    return jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype))


def row_options(opts: Options, temp: jax.Array | None) -> Options:
    """``opts`` with the per-row temperatures ``temp [N]`` (None: ``opts`` itself).

    The result is for the row math inside a walk only (it holds an array, so it is not
    hashable and never goes into a plan); ``opts.temperature`` is then 1.
    """
    return opts if temp is None else dataclasses.replace(opts, temperature=temp)


def row_temperature(opts: Options) -> bool:
    """Whether ``opts`` carries one temperature per row (see :func:`row_options`)."""
    return not isinstance(opts.temperature, (int, float))


def _scale(z: jax.Array, opts: Options) -> jax.Array:
    """``z / T``: ``T`` static, or per row (``[N]``, lined up with ``z``'s first axis)."""
    t = opts.temperature
    if isinstance(t, (int, float)):
        return z if t == 1.0 else z / t
    t = t.astype(z.dtype)
    return z / (t.reshape(t.shape + (1,) * (z.ndim - t.ndim)))


def transform(x: jax.Array, opts: Options) -> jax.Array:
    """``z = cap * tanh((x / T) / cap)`` in the accumulation dtype."""
    z = _scale(x.astype(compute_dtype(x.dtype)), opts)
    if opts.logit_softcap is not None:
        z = opts.logit_softcap * jnp.tanh(z / opts.logit_softcap)
    return z


def shift(x: jax.Array, m_raw: jax.Array, opts: Options) -> jax.Array:
    """``transform(x) - transform(m_raw)``; exactly 0 where ``x == m_raw`` at any temperature.

    ``m_raw`` broadcasts against ``x`` (a ``[N, 1]`` row max, or a scalar); it may be ``-inf``
    (the shift is then ``+inf``, or finite with a soft-cap).
    """
    acc = compute_dtype(x.dtype)
    if opts.logit_softcap is None:
        return _scale(x.astype(acc) - m_raw.astype(acc), opts)
    return transform(x, opts) - transform(m_raw, opts)


def transform_vjp(dz: jax.Array, x: jax.Array, opts: Options) -> jax.Array:
    """Chain ``d/dz`` back to ``d/dx`` through the soft-cap and the temperature."""
    if opts.logit_softcap is not None:
        dz = dz * (1.0 - jnp.square(transform(x, opts) / opts.logit_softcap))
    return _scale(dz, opts)


def equals(labels: jax.Array, value: int) -> jax.Array:
    """``labels == value`` without wrapping ``value`` into a narrow label dtype."""
    info = jnp.iinfo(labels.dtype)
    if not info.min <= value <= info.max:
        return jnp.zeros(labels.shape, bool)
    return labels == jnp.asarray(value, labels.dtype)


def in_range(labels: jax.Array, num_classes: int) -> jax.Array:
    """``0 <= labels < num_classes`` in the labels' own dtype (``num_classes`` may not fit)."""
    info = jnp.iinfo(labels.dtype)
    ok = labels >= 0 if info.min < 0 else jnp.ones(labels.shape, bool)
    if num_classes <= info.max:
        ok = ok & (labels < jnp.asarray(num_classes, labels.dtype))
    return ok


def class_ids(labels: jax.Array, num_classes: int) -> jax.Array:
    """``labels`` as int32 class ids, ``-1`` where out of ``[0, num_classes)`` (compared in
    the labels' own dtype, so that no narrow or 64-bit id wraps onto a class)."""
    ok = in_range(labels, num_classes)
    return jnp.where(ok, labels.astype(jnp.int32), jnp.int32(-1))


class Labels(NamedTuple):
    """Flat integer labels, ready for the row math (each ``[N]``).

    ``y``: int32 class ids clipped into ``[0, C)`` (safe to gather with); ``valid``: the
    label was in range; ``counted``: the row contributes (not ``ignore_index``, inside
    ``where``); ``row_w``: ``w[y]`` on counted rows, 0 elsewhere (the mean's denominator is
    its sum); ``temp``: the per-row temperatures (a constant), or None when the temperature
    is the static ``opts.temperature``.
    """

    y: jax.Array
    valid: jax.Array
    counted: jax.Array
    row_w: jax.Array
    temp: jax.Array | None = None

    def options(self, opts: Options) -> Options:
        """``opts`` with these rows' temperatures (:func:`row_options`)."""
        return row_options(opts, self.temp)


def labels_info(labels, num_classes: int, ignore_index: int, where, weight, dtype,
                temp=None) -> Labels:
    """:class:`Labels` of ``labels`` (any integer dtype and shape), compared in their own
    dtype so that narrow dtypes never wrap ``num_classes`` or ``ignore_index``; ``temp``
    (shaped like ``labels``, or None) the per-row temperatures."""
    flat = labels.reshape(-1)
    valid = in_range(flat, num_classes)
    counted = ~equals(flat, ignore_index)
    if where is not None:
        counted = counted & where.reshape(-1)
    y = jnp.where(valid, flat, jnp.zeros((), flat.dtype)).astype(jnp.int32)
    w_y = jnp.ones(y.shape, dtype) if weight is None else take_class(weight.astype(dtype), y)
    t = None if temp is None else lax.stop_gradient(temp.reshape(-1).astype(dtype))
    return Labels(y, valid, counted, jnp.where(counted, w_y, jnp.zeros((), dtype)), t)


def kernel_labels(lab: Labels) -> jax.Array:
    """``lab.y`` with ``-1`` on out-of-range labels, for kernels that form the ``nan`` of a
    bad label inside their ``custom_vjp`` (so that its gradient is ``nan`` too, not the zero
    cotangent that :func:`row_losses` passes through a select)."""
    return jnp.where(lab.valid, lab.y, jnp.int32(-1))


def take_class(values: jax.Array, y: jax.Array) -> jax.Array:
    """``values[y]`` for a per-class vector and in-range int32 ``y``, laid out like ``y``."""
    sharding = getattr(jax.typeof(y), "sharding", None)
    if sharding is not None and getattr(sharding, "spec", None) and any(sharding.spec):
        return values.at[y].get(out_sharding=sharding)  # explicit mesh: say where
    return values[y]


def row_losses(loss, lab: Labels):
    """``loss`` on counted rows with valid labels, ``nan`` on counted invalid ones, else 0
    (selected, never multiplied: rows of ``-inf`` logits that are not counted stay 0)."""
    return jnp.where(lab.counted, jnp.where(lab.valid, loss, jnp.nan), 0.0)


def row_cotangent(g, lab: Labels):
    """The cotangent of the per-row losses as :func:`row_losses` passes it back."""
    return jnp.where(lab.counted, jnp.where(lab.valid, g, jnp.nan), 0.0)


def reduce(losses, denominator, reduction: str, count=None):
    """``"none"``: ``losses``; ``"sum"``: their sum; ``"mean"``: sum / denominator.

    A mean over no counted element (``count == 0``; ``denominator == 0`` when ``count`` is
    not given) is 0.0 with zero gradient, not nan; counted elements whose weights sum to 0
    give ``nan`` (as PyTorch).
    """
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    denominator = jnp.asarray(denominator).astype(total.dtype)
    empty = denominator == 0 if count is None else jnp.asarray(count) == 0
    safe_den = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
    return jnp.where(empty, total * 0.0, jnp.where(denominator == 0, jnp.nan, total / safe_den))


def class_sum(weight: jax.Array | None, num_classes: int, dtype) -> jax.Array:
    """``W = sum_c w_c`` (``C`` without weights)."""
    return jnp.asarray(num_classes, dtype) if weight is None else weight.sum().astype(dtype)


def label_loss(log_s, zy_s, wz, lse, row_w, big_w, opts: Options, num_classes: int):
    """Per-row loss from the statistics (no masking); ``zy_s = z_y - m``, ``wz`` or None."""
    eps = opts.label_smoothing
    loss = (1.0 - eps) * row_w * (log_s - zy_s)
    if eps > 0.0:
        loss = loss + (eps / num_classes) * (big_w * log_s - wz)
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * jnp.square(lse)
    return loss


def grad_coefs(g, lse, row_w, big_w, opts: Options, num_classes: int):
    """``(cp, cy, cw)`` of ``dz = cp p - cy [c = y] - cw w_c`` for the cotangent ``g [N]``."""
    eps = opts.label_smoothing
    a = (1.0 - eps) * row_w + 2.0 * opts.z_loss * lse
    if eps > 0.0:
        a = a + (eps / num_classes) * big_w
    return g * a, g * (1.0 - eps) * row_w, g * (eps / num_classes)


def onehot(y_local: jax.Array, shape) -> jax.Array:
    """``[c == y_local]`` over ``shape = [N, B]`` (int32 columns; no narrow-dtype wrap)."""
    return lax.broadcasted_iota(jnp.int32, shape, 1) == y_local.astype(jnp.int32)[:, None]


def dlogits(p, coefs, y_local, w_block, counted, opts: Options):
    """``cp p - cy [c = y] - cw w_c`` over a block of probabilities ``p [N, B]``; 0 on rows
    not counted (selected: their ``p`` may be ``nan`` when all their logits are ``-inf``).
    ``counted [N]`` is bool or int (nonzero: counted); kernels pass int32, since Mosaic TPU
    cannot reshape a boolean vector to ``[N, 1]``."""
    cp, cy, cw = coefs
    dz = p * cp[:, None] - jnp.where(onehot(y_local, p.shape), cy[:, None], 0.0)
    if opts.label_smoothing > 0.0:
        dz = dz - cw[:, None] * (1.0 if w_block is None else w_block[None, :].astype(p.dtype))
    return jnp.where(counted[:, None] != 0, dz, 0.0)


def probs(x, m_raw, log_s, opts: Options):
    """``p = exp((z - m) - log s)`` of a block of raw logits ``x [N, B]``."""
    return jnp.exp(shift(x, m_raw[:, None], opts) - log_s[:, None])


def block_grad(x, m_raw, log_s, y_local, coefs, w_block, counted, opts: Options):
    """Gradient w.r.t. the raw logits ``x [N, B]`` of a block (any offset ``y_local``)."""
    dz = dlogits(probs(x, m_raw, log_s, opts), coefs, y_local, w_block, counted, opts)
    return transform_vjp(dz, x, opts)


# ---------------------------------------------------------------- streaming statistics


class Stats(NamedTuple):
    """Online row statistics of the blocks seen so far (each ``[N]`` unless noted).

    ``m``: raw max (``-inf`` before any block); ``s``: ``sum exp(z - transform(safe(m)))``;
    ``zy``: the label's raw logit (0 until its block is seen); ``wz``: ``sum_c w_c (z_c -
    transform(safe(m)))`` and ``wseen`` (scalar, or ``[N]``): ``sum_c w_c`` over the classes
    seen, both only with label smoothing; ``arg``: argmax (int32) when asked for.
    """

    m: jax.Array
    s: jax.Array
    zy: jax.Array
    wz: jax.Array | None = None
    wseen: jax.Array | None = None
    arg: jax.Array | None = None


def init_stats(n: int, dtype, smoothing: bool, aux: bool) -> Stats:
    """Statistics before any block: ``m = -inf``, sums 0."""
    zeros = jnp.zeros((n,), dtype)
    return Stats(
        m=jnp.full((n,), -jnp.inf, dtype), s=zeros, zy=zeros,
        wz=zeros if smoothing else None,
        wseen=jnp.zeros((), dtype) if smoothing else None,
        arg=jnp.zeros((n,), jnp.int32) if aux else None)


def mask_columns(x: jax.Array, valid: jax.Array) -> jax.Array:
    """``x`` with its padding columns (``valid`` False) at the lowest finite logit: never a
    row max, and ``exp(z - m) = 0`` there (but with a soft-cap, which maps them to
    ``-cap``)."""
    return jnp.where(valid, x, jnp.finfo(x.dtype).min)


def padding_bias(valid: jax.Array, dtype) -> jax.Array:
    """0 on classes, the lowest finite number on padding columns: added to a block's logits
    it masks them as :func:`mask_columns` does (sums may round them on to ``-inf``)."""
    return jnp.where(valid, jnp.zeros((), dtype), jnp.finfo(dtype).min)


def update_stats(st: Stats, x, y_local, w_block, start, opts: Options, valid=None) -> Stats:
    """Fold a block of raw logits ``x [N, B]`` (accumulation dtype) into ``st``.

    ``y_local = labels - start`` (matches no column when the label is elsewhere), ``w_block``
    the block's class weights (or None), ``start`` its first class id (for the argmax). The
    old sum is rescaled by ``exp(shift(m_old, m_new))``, which is 0 (not ``0 * inf``) when
    nothing was seen yet, however far below 0 the block's logits are. ``valid`` (bool,
    broadcastable to ``x``, or None) marks the block's columns that are classes: a
    fixed-size block (a Pallas tile, a padded vocabulary) may run past the vocabulary, and
    its padding columns count for nothing. Their logits must come masked
    (:func:`mask_columns` or :func:`padding_bias`: never a max, ``exp`` 0); here they are
    left out of the label-smoothing sums, and with a soft-cap (which maps them to a finite
    ``-cap``) out of the sum of exps.
    With a ``valid`` of ``N`` rows, ``wseen`` is counted per row: start from an ``[N]`` one.
    """
    bm = jnp.max(x, axis=1)
    m_new = jnp.maximum(st.m, bm)
    new_safe = safe(m_new)[:, None]
    zs = shift(x, new_safe, opts)
    alpha = jnp.exp(shift(st.m[:, None], new_safe, opts)[:, 0])
    e = jnp.exp(zs)
    if valid is not None and opts.logit_softcap is not None:  # the cap keeps -cap finite
        e = jnp.where(valid, e, 0.0)
    s = st.s * alpha + jnp.sum(e, axis=1)
    zy = st.zy + jnp.sum(jnp.where(onehot(y_local, x.shape), x, 0.0), axis=1)
    wz, wseen = st.wz, st.wseen
    if wz is not None and wseen is not None:
        back = shift(safe(st.m)[:, None], new_safe, opts)[:, 0]
        wzs = zs if w_block is None else zs * w_block[None, :].astype(x.dtype)
        if valid is None:
            wsum = class_sum(w_block, x.shape[1], x.dtype)
        elif valid.shape[0] == 1:  # the same columns on every row: a scalar count
            wzs = jnp.where(valid, wzs, 0.0)
            wcols = jnp.ones(x.shape[1:], x.dtype) if w_block is None else w_block.astype(
                x.dtype)
            wsum = jnp.sum(jnp.where(valid[0], wcols, 0.0))
        else:
            wzs = jnp.where(valid, wzs, 0.0)
            wcols = jnp.ones(x.shape, x.dtype) if w_block is None else jnp.broadcast_to(
                w_block[None, :].astype(x.dtype), x.shape)
            wsum = jnp.sum(jnp.where(valid, wcols, 0.0), axis=1)
        wz = wz + wseen * back + jnp.sum(wzs, axis=1)
        wseen = wseen + wsum
    arg = st.arg
    if arg is not None:
        barg = jnp.argmax(x, axis=1).astype(jnp.int32) + start
        arg = jnp.where(bm > st.m, barg, arg)
    return Stats(m_new, s, zy, wz, wseen, arg)


class ArrayAxis(NamedTuple):
    """An array axis standing for a mesh axis in the collectives below (:func:`psum`,
    :func:`pmax`, :func:`pmin`, :func:`all_gather`, :func:`shared_max`) and so in every
    statistic's ``merge`` and :func:`merge_stats`: each member of the "collective" is one
    index of that axis (e.g. the vocabulary splits of one kernel, ``[splits, N]``)."""

    axis: int


def _collective(op: str, x, axis_name):
    """``lax.p{op}`` of the arrays of ``x`` (a pytree) over the mesh axis ``axis_name``; over
    an :class:`ArrayAxis`, the same reduction along that array axis, broadcast back (each
    member's result)."""
    if isinstance(axis_name, ArrayAxis):
        def one(a):
            reduced = getattr(jnp, op)(a, axis=axis_name.axis, keepdims=True)  # jnp.max, ...
            return jnp.broadcast_to(reduced, a.shape)

        return jax.tree.map(one, x)
    return getattr(lax, "p" + op)(x, axis_name)  # lax.pmax, lax.pmin, lax.psum


def psum(x, axis_name):
    """The sum of ``x`` (a pytree of arrays) over the members of ``axis_name``: a mesh axis
    (``lax.psum``) or an :class:`ArrayAxis`.

    >>> psum(jnp.array([[1.0, 2.0], [3.0, 4.0]]), ArrayAxis(0))
    Array([[4., 6.],
           [4., 6.]], dtype=float32)
    """
    return _collective("sum", x, axis_name)


def pmax(x, axis_name):
    """The maximum of ``x`` over the members of ``axis_name`` (as :func:`psum`)."""
    return _collective("max", x, axis_name)


def pmin(x, axis_name):
    """The minimum of ``x`` over the members of ``axis_name`` (as :func:`psum`)."""
    return _collective("min", x, axis_name)


def all_gather(x: jax.Array, axis_name, axis: int) -> jax.Array:
    """Every member's ``x`` side by side along its axis ``axis`` (in member order), on every
    member: ``lax.all_gather(..., tiled=True)`` over a mesh axis (typed as varying: a
    reduction after it, e.g. :func:`pmax`, types its result as replicated). Over an
    :class:`ArrayAxis` ``a``, ``x`` holds the members along its axis ``a`` and ``axis``
    counts the axes of one member's array (``a`` left out).

    >>> all_gather(jnp.array([[1, 2], [3, 4]]), ArrayAxis(0), 0)  # two members' [2]
    Array([[1, 2, 3, 4],
           [1, 2, 3, 4]], dtype=int32)
    """
    if not isinstance(axis_name, ArrayAxis):
        return lax.all_gather(x, axis_name, axis=axis, tiled=True)
    a = axis_name.axis
    side = jnp.moveaxis(x, a, axis)  # the members just before their axis `axis`
    shape = side.shape
    joined = side.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])
    return jnp.broadcast_to(jnp.expand_dims(joined, a),
                            joined.shape[:a] + (x.shape[a],) + joined.shape[a:])


def shared_max(m: jax.Array, axis_name) -> jax.Array:
    """``pmax`` of the raw row maxima over ``axis_name``, under ``stop_gradient``.

    The max is only the shift that keeps ``exp`` finite: every statistic built on it is
    invariant to it (``lse = m + log sum e^{z - m}``), so its derivative is 0 and a constant
    is exact. ``pmax`` has no differentiation rule, so without the ``stop_gradient`` the
    forward of a ``custom_vjp`` could not be differentiated again (second order)."""
    return pmax(lax.stop_gradient(m), axis_name)


def merge_stats(st: Stats, axis_name, offset, opts: Options) -> Stats:
    r"""Merge the statistics of vocabulary shards over the mesh axis ``axis_name``.

    One ``pmax`` of ``m`` and one ``psum`` each of the rescaled sums:

    .. math::
        m = \max_i m_i,\quad s = \sum_i s_i e^{z(m_i) - z(m)},\quad
        wz = \sum_i wz_i + W_i (z(m_i) - z(m)),\quad z_y = \sum_i z_{y,i}.

    ``st.arg`` holds local column ids; ``offset`` (this shard's first class id) makes them
    global: the smallest global id among the shards that hold the max (0 if none does).
    ``axis_name`` may be an :class:`ArrayAxis`: the shards are then the indices of that axis
    of the statistics' arrays.
    """
    m = shared_max(st.m, axis_name)
    new_safe = safe(m)
    back = shift(safe(st.m), new_safe, opts)
    alpha = jnp.exp(shift(st.m, new_safe, opts))
    s = psum(st.s * alpha, axis_name)
    zy = psum(st.zy, axis_name)
    wz = wseen = None
    if st.wz is not None and st.wseen is not None:
        wz = psum(st.wz + st.wseen * back, axis_name)
        wseen = psum(st.wseen, axis_name)
    arg = None
    if st.arg is not None:
        none = jnp.iinfo(jnp.int32).max
        holds = (st.s > 0) & (st.m == m)
        arg = pmin(jnp.where(holds, st.arg + offset, none), axis_name)
        arg = jnp.where(arg == none, 0, arg)
    return Stats(m, s, zy, wz, wseen, arg)


class RowStats(NamedTuple):
    """Final statistics of whole rows: ``m`` raw max, ``log_s``, ``zy_s = z_y - m``,
    ``wz`` (or None), ``lse = m + log s`` (transformed ``m``), ``arg`` (or None)."""

    m: jax.Array
    log_s: jax.Array
    zy_s: jax.Array
    wz: jax.Array | None
    lse: jax.Array
    arg: jax.Array | None


def finish(st: Stats, opts: Options) -> RowStats:
    """Row statistics from streamed ones (raw label logit shifted, ``lse`` formed)."""
    m = safe(st.m)
    log_s = jnp.log(st.s)
    return RowStats(m, log_s, shift(st.zy, m, opts), st.wz,
                    transform(m, opts) + log_s, st.arg)


def stats_losses(rs: RowStats, lab: Labels, weight, opts: Options, num_classes: int):
    """Per-row losses (masked as :func:`row_losses`) from whole-row statistics."""
    big_w = class_sum(weight, num_classes, rs.lse.dtype)
    loss = label_loss(rs.log_s, rs.zy_s, rs.wz, rs.lse, lab.row_w, big_w, opts, num_classes)
    return row_losses(loss, lab)


def stats_coefs(g, lse, lab: Labels, weight, opts: Options, num_classes: int):
    """:func:`grad_coefs` for the cotangent ``g`` of the per-row losses of
    :func:`stats_losses`."""
    big_w = class_sum(weight, num_classes, lse.dtype)
    return grad_coefs(row_cotangent(g, lab), lse, lab.row_w, big_w, opts, num_classes)
