"""The numerical core: per-row softmax cross-entropy with hand-written gradients.

Everything here works on 2-D ``[rows, classes]`` logits; the public functions in
:mod:`jaxent.losses` move the class axis last, flatten, validate and reduce.

Per row, with ``z = cap * tanh((x / T) / cap)`` (the soft-cap optional), ``m = max_c z_c``,
``s = sum_c exp(z_c - m)`` and ``lse = m + log s``:

* integer labels ``y``, row weight ``r = w[y]`` (0 for rows not counted), smoothing ``e``::

    loss = (1 - e) r (lse - z_y) + (e / C) sum_c w_c (lse - z_c) + zl lse^2

  the PyTorch definition of label smoothing, class weights included;
* probability targets ``t`` (smoothed: ``t' = (1 - e) t + e / C``)::

    loss = sum_c w_c t'_c (lse - z_c) + zl lse^2,   with 0 * log 0 = 0.

Differences ``lse - z`` are formed as ``log s - (z - m)`` so that large logits do not cancel.
Evaluated without differentiation, only the row statistics are formed. Under differentiation
the gradient is written in one fused elementwise expression, either in the forward
(``residual="grad"``: ``e = exp(z - m)`` is computed once, summed and turned into
the gradient in place; the backward only scales it by the cotangent, which XLA fuses) or in the
backward (``residual="lse"``: the forward keeps ``lse`` per row, the backward recomputes
``p = exp(z - lse)``); ``residual="auto"``, the default, picks one by dtype and shape
(:func:`uses_lse`)::

    d loss / d z_c = g [p_c A - (1 - e) r [c = y] - (e / C) w_c],
    A = (1 - e) r + (e / C) sum(w) + 2 zl lse          (integer labels)
    d loss / d z_c = g [p_c (sum(w t') + 2 zl lse) - w_c t'_c]   (probability targets)

then chains through the soft-cap (``1 - (z / cap)^2``) and the temperature (``1 / T``).
Rows that are not counted give exactly 0 loss and 0 gradient even when every logit is
``-inf`` (a fully masked vocabulary), because they are selected away, never multiplied by 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

# XLA:CPU's row reductions slow down sharply on rows longer than about 32K elements;
# splitting such rows into equal pieces and reducing twice restores full speed.
_MAX_PIECE = 32768


@dataclasses.dataclass(frozen=True)
class Options:
    """Static configuration of the softmax losses (hashable, passed as nondiff argument)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    temperature: float = 1.0
    logit_softcap: float | None = None
    residual: str = "auto"


# "auto" keeps the log-sum-exp (two exps, three passes, one fresh [N, C] write) once the
# logits are large enough to be memory bound, and the gradient (one exp, four passes) below;
# 16-bit rows longer than 32K keep the gradient (their fused sum-of-exp cannot be split).
_LSE_MIN_ELEMENTS = 1 << 24


def uses_lse(x: jax.Array, opts: Options) -> bool:
    """Whether the forward of ``x [N, C]`` keeps the log-sum-exp (else the gradient).

    ``"auto"`` follows measurements of ``jit(value_and_grad)`` on a 2-core CPU
    (``benchmarks/RESULTS.md``): in float32 the gradient residual is faster on small
    logits (8192 x 1000: 0.85x optax against 0.93x), the lse residual on large ones
    (4096 x 32000: 0.97x against 1.10x); in bf16 the lse residual is twice as fast (its
    sum of ``exp`` fuses the upcast: 0.13x optax against 0.26x at 4096 x 32000) except on
    rows longer than 32K (0.74x against 1.04x at 2048 x 128256) and tiny rows.
    """
    if opts.residual != "auto":
        return opts.residual == "lse"
    n, c = x.shape
    if x.dtype != compute_dtype(x.dtype):
        return 256 <= c <= _MAX_PIECE
    return n * c >= _LSE_MIN_ELEMENTS


def compute_dtype(dtype) -> jnp.dtype:
    """The accumulation dtype: float32 for 16-bit inputs, otherwise the input's dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def transform(x: jax.Array, opts: Options) -> jax.Array:
    """``z = cap * tanh((x / T) / cap)`` in the accumulation dtype."""
    z = x.astype(compute_dtype(x.dtype))
    if opts.temperature != 1.0:
        z = z / opts.temperature
    if opts.logit_softcap is not None:
        z = opts.logit_softcap * jnp.tanh(z / opts.logit_softcap)
    return z


def transform_vjp(dz: jax.Array, z: jax.Array, opts: Options) -> jax.Array:
    """Chain ``d/dz`` back to ``d/dx`` through the soft-cap and the temperature."""
    if opts.logit_softcap is not None:
        dz = dz * (1.0 - jnp.square(z / opts.logit_softcap))
    if opts.temperature != 1.0:
        dz = dz / opts.temperature
    return dz


def _split(c: int) -> int:
    """How many equal pieces of at most 32K a row of ``c`` classes is cut into (1: none)."""
    if c <= _MAX_PIECE:
        return 1
    return next((k for k in range(-(-c // _MAX_PIECE), c // 1024 + 1) if c % k == 0), 1)


def row_sum(v: jax.Array) -> jax.Array:
    """Sum over the last axis of ``[N, C]``."""
    return v.sum(axis=-1)


def _sum_of_exps(e: jax.Array) -> jax.Array:
    """Row sums of ``e = exp(z - max z)`` (any float dtype), accumulated in float32.

    For 16-bit ``e`` XLA:CPU's library reduction cannot fuse the upcast and would materialize
    a float32 copy of ``e``; a two-output reduce (sum, max) is lowered as XLA's own loop,
    which reads ``e`` directly. ``max(e)`` is exactly 1 (``exp(0)`` at the row max; 0 for an
    all ``-inf`` row, whose sum is 0 too), so multiplying by it keeps the second output alive
    without changing the value.
    """
    if e.dtype == compute_dtype(e.dtype):
        return e.sum(axis=-1)
    ef = e.astype(compute_dtype(e.dtype))
    total, top = jax.lax.reduce(
        (ef, ef), (jnp.zeros((), ef.dtype), jnp.full((), -jnp.inf, ef.dtype)),
        lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])), (1,))
    return total * top


def row_max(v: jax.Array) -> jax.Array:
    """Max over the last axis (exact in any dtype: it runs on the raw input)."""
    return v.max(axis=-1)


def shifted_stats(x: jax.Array, opts: Options) -> tuple[jax.Array, jax.Array]:
    """Row max ``m`` of ``z = transform(x)`` (0 where not finite) and ``log sum exp(z - m)``.

    The transform is increasing, so ``m = transform(max x)``: the max runs on the raw input
    and no upcast copy of 16-bit logits is ever materialized for two reductions to share.
    Rows longer than 32K are reduced as ``k`` rows of ``C / k`` in a 2-D view (XLA:CPU's row
    reductions slow down 2-3x beyond 32K; a 3-D view would be folded back into one row).
    """
    n, c = x.shape
    # 16-bit rows are not split: XLA:CPU would then materialize their float32 upcast.
    k = _split(c) if x.dtype == compute_dtype(x.dtype) else 1
    if k == 1:
        m = transform(row_max(x), opts)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        return m, jnp.log(jnp.exp(transform(x, opts) - m[:, None]).sum(axis=-1))
    xr = x.reshape(n * k, c // k)
    m = transform(row_max(xr).reshape(n, k).max(axis=-1), opts)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(transform(xr, opts) - jnp.repeat(m, k)[:, None])
    log_s = jnp.log(e.sum(axis=-1).reshape(n, k).sum(axis=-1))
    return m, log_s



def _fresh(x: jax.Array) -> jax.Array:
    """16-bit ``x`` behind an optimization barrier, for reads other than the main passes.

    XLA:CPU fuses the float32 upcast of 16-bit logits into its reductions only while the
    logits have no other reader in the fusion graph; a gather of the target logits from the
    same value makes it materialize a full float32 copy (doubling a bf16 loss's temporary
    memory). Reading through a barrier keeps the two apart.
    """
    if x.dtype == compute_dtype(x.dtype):
        return x
    return jax.lax.optimization_barrier(x)


def _class_sum(weight: jax.Array | None, num_classes: int, dtype) -> jax.Array:
    return jnp.asarray(num_classes, dtype) if weight is None else weight.sum().astype(dtype)


# --------------------------------------------------------------------------- integer labels


def _pick(x, labels, opts: Options):
    """Transformed target logits ``z_y [N]`` (clamped index) and whether labels are in range."""
    c = x.shape[1]
    safe = jnp.clip(labels, 0, c - 1)
    if _classes_explicitly_sharded(x):
        # A gather across an explicitly sharded axis is refused; a masked sum reduces
        # (one psum of [N]) instead of gathering logits.
        onehot = jax.lax.broadcasted_iota(safe.dtype, x.shape, 1) == safe[:, None]
        z_y = transform(jnp.where(onehot, x, jnp.zeros((), x.dtype)).sum(axis=1), opts)
    else:
        z_y = transform(jnp.take_along_axis(_fresh(x), safe[:, None], axis=1)[:, 0], opts)
    return z_y, (labels >= 0) & (labels < c)


def take_class(values: jax.Array, labels: jax.Array) -> jax.Array:
    """``values[clip(labels)]`` for a per-class vector, laid out like ``labels``."""
    safe = jnp.clip(labels, 0, values.shape[0] - 1)
    sharding = getattr(jax.typeof(labels), "sharding", None)
    if sharding is not None and getattr(sharding, "spec", None) and any(sharding.spec):
        return values.at[safe].get(out_sharding=sharding)  # explicit mesh: say where
    return values[safe]


def counted_rows(labels, where, weight, ignore_index: int, dtype):
    """Flat labels, which rows count (not ``ignore_index``, inside ``where``) and their
    weights ``w[y]`` (0 where not counted); the mean's denominator is the sum of the latter."""
    y = labels.reshape(-1)
    counted = y != ignore_index
    if where is not None:
        counted = counted & where.reshape(-1)
    w_y = jnp.ones(y.shape, dtype) if weight is None else take_class(weight.astype(dtype), y)
    return y, counted, jnp.where(counted, w_y, 0.0)


def _classes_explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x [N, C]`` carries an explicit sharding of its class axis (explicit mesh)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and len(spec) > 1 and spec[1] is not None


def _label_loss(x, z_y, m, log_s, row_w, weight, opts: Options):
    """Per-row loss from the row statistics (``lse - z = log s - (z - m)``: no cancellation)."""
    c = x.shape[1]
    eps = opts.label_smoothing
    loss = (1.0 - eps) * row_w * (log_s - (z_y - m))
    if eps > 0.0:
        zs = transform(x, opts) - m[:, None]
        wz = row_sum(zs if weight is None else zs * weight[None, :])
        loss = loss + (eps / c) * (_class_sum(weight, c, m.dtype) * log_s - wz)
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * jnp.square(m + log_s)
    return loss


def _label_coef(row_w, lse, weight, c: int, opts: Options):
    """``A`` of ``dz = p A - (1 - e) r onehot - (e / C) w`` per row."""
    eps = opts.label_smoothing
    coef = (1.0 - eps) * row_w + 2.0 * opts.z_loss * lse
    if eps > 0.0:
        coef = coef + (eps / c) * _class_sum(weight, c, lse.dtype)
    return coef


def _label_dz(p, coef, labels, row_w, weight, opts: Options):
    """``p A - (1 - e) r [c = y] - (e / C) w``: one elementwise expression over ``[N, C]``."""
    c = p.shape[1]
    eps = opts.label_smoothing
    onehot = jax.lax.broadcasted_iota(labels.dtype, p.shape, 1) == labels[:, None]
    dz = p * coef[:, None] - jnp.where(onehot, ((1.0 - eps) * row_w)[:, None], 0.0)
    if eps > 0.0:
        dz = dz - (eps / c) * (1.0 if weight is None else weight[None, :])
    return dz


def _row_scale(counted, valid, dtype):
    """1 for counted rows, nan for counted rows with out-of-range labels, 0 otherwise."""
    return jnp.where(counted, jnp.where(valid, 1.0, jnp.nan), 0.0).astype(dtype)


def _labels_lse(x, labels, row_w, counted, weight, opts: Options):
    """Per-row losses and log-sum-exp from the row statistics (no ``[N, C]`` output)."""
    m, log_s = shifted_stats(x, opts)
    z_y, valid = _pick(x, labels, opts)
    # max(m, z_y) == m; it orders the pick before a backward that may overwrite x in place.
    m = jnp.maximum(m, z_y)
    loss = _label_loss(x, z_y, m, log_s, row_w, weight, opts)
    return jnp.where(counted, jnp.where(valid, loss, jnp.nan), 0.0), m + log_s


def _labels_fwd(x, labels, row_w, counted, weight, opts: Options):
    if uses_lse(x, opts):
        loss, lse = _labels_lse(x, labels, row_w, counted, weight, opts)
        return loss, (x, labels, row_w, counted, weight, lse)
    # Gradient in the forward: one exp per element. e = exp(z - m) is stored once (in the
    # logits' dtype), summed, and turned into the gradient in place; the backward only
    # scales it, which XLA fuses into the producer under jit(value_and_grad).
    c = x.shape[1]
    z_y, valid = _pick(x, labels, opts)
    m = transform(row_max(x), opts)
    # max(m, z_y) == m, but it orders the pick before the pass that may overwrite x in place.
    m = jnp.maximum(m, z_y)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    z = transform(x, opts)
    e = jnp.exp(z - m[:, None]).astype(x.dtype)
    s = _sum_of_exps(e)
    log_s = jnp.log(s)
    loss = _label_loss(x, z_y, m, log_s, row_w, weight, opts)
    scale = _row_scale(counted, valid, m.dtype)
    loss = jnp.where(counted, loss * scale, 0.0)
    coef = _label_coef(row_w, m + log_s, weight, c, opts) / s
    dz = _label_dz(e.astype(m.dtype), coef, labels, row_w, weight, opts)
    dz = jnp.where(counted[:, None], dz * scale[:, None], 0.0)
    dx = transform_vjp(dz, z, opts).astype(x.dtype)
    return loss, (dx, row_w, weight)


def _labels_bwd(opts: Options, res, g):
    if len(res) == 3:  # the gradient residual
        dx, row_w, weight = res
        dx = (dx.astype(g.dtype) * g[:, None]).astype(dx.dtype)
        return dx, None, jnp.zeros_like(row_w), None, _zeros_or_none(weight)
    x, labels, row_w, counted, weight, lse = res
    c = x.shape[1]
    z = transform(_fresh(x), opts)
    valid = (labels >= 0) & (labels < c)
    p = jnp.exp(z - lse[:, None])
    dz = _label_dz(p, _label_coef(row_w, lse, weight, c, opts), labels, row_w, weight, opts)
    g = g * _row_scale(counted, valid, g.dtype)
    dz = jnp.where(counted[:, None], dz * g[:, None], 0.0)
    dx = transform_vjp(dz, z, opts).astype(x.dtype)
    return dx, None, jnp.zeros_like(row_w), None, _zeros_or_none(weight)


def _zeros_or_none(v):
    return None if v is None else jnp.zeros_like(v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def label_rows(x, labels, row_w, counted, weight, opts: Options):
    """Per-row cross-entropy of ``x [N, C]`` against integer ``labels [N]``.

    ``row_w [N]`` is ``w[y]`` for counted rows (0 otherwise), ``counted [N]`` selects the rows
    that contribute, ``weight [C]`` (or None) the class weights used by label smoothing.
    Returns ``[N]`` losses in the accumulation dtype; out-of-range labels give ``nan``.
    """
    return _labels_lse(x, labels, row_w, counted, weight, opts)[0]


label_rows.defvjp(
    lambda x, labels, row_w, counted, weight, opts: _labels_fwd(
        x, labels, row_w, counted, weight, opts
    ),
    _labels_bwd,
)


# --------------------------------------------------------------------- probability targets


def _smoothed(t, weight, opts: Options, dtype):
    c = t.shape[-1]
    t = t.astype(dtype)
    eps = opts.label_smoothing
    if eps > 0.0:
        t = (1.0 - eps) * t + eps / c
    return t if weight is None else t * weight.astype(dtype)[None, :]


def _target_loss(x, wt, m, log_s, opts: Options):
    """``sum_c wt_c (lse - z_c) + zl lse^2`` with ``0 * log 0 = 0``."""
    # Classes without target mass contribute nothing, even at -inf logits.
    wtz = row_sum(jnp.where(wt == 0, 0.0, wt * (transform(x, opts) - m[:, None])))
    loss = row_sum(wt) * log_s - wtz
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * jnp.square(m + log_s)
    return loss


def _target_dt(g, x, targets, counted, weight, lse, opts: Options):
    """``d loss / d t_c = g (1 - e) w_c (lse - z_c)`` for counted rows."""
    z = transform(x, opts)
    dt = g[:, None] * (1.0 - opts.label_smoothing) * (lse[:, None] - z)
    if weight is not None:
        dt = dt * weight[None, :]
    return jnp.where(counted[:, None], dt, 0.0).astype(targets.dtype)


def _targets_primal(x, targets, counted, weight, opts: Options):
    m, log_s = shifted_stats(x, opts)
    wt = _smoothed(targets, weight, opts, m.dtype)
    return jnp.where(counted, _target_loss(x, wt, m, log_s, opts), 0.0)


def _targets_fwd(x, targets, counted, weight, opts: Options):
    if uses_lse(x, opts):
        m, log_s = shifted_stats(x, opts)
        wt = _smoothed(targets, weight, opts, m.dtype)
        loss = jnp.where(counted, _target_loss(x, wt, m, log_s, opts), 0.0)
        return loss, (None, x, targets, counted, weight, m + log_s)
    m = transform(row_max(x), opts)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    z = transform(x, opts)
    e = jnp.exp(z - m[:, None]).astype(x.dtype)
    s = _sum_of_exps(e)
    log_s = jnp.log(s)
    wt = _smoothed(targets, weight, opts, m.dtype)
    sum_wt = row_sum(wt)
    loss = jnp.where(counted, _target_loss(x, wt, m, log_s, opts), 0.0)
    coef = (sum_wt + 2.0 * opts.z_loss * (m + log_s)) / s
    dz = jnp.where(counted[:, None], e.astype(m.dtype) * coef[:, None] - wt, 0.0)
    dx = transform_vjp(dz, z, opts).astype(x.dtype)
    return loss, (dx, x, targets, counted, weight, m + log_s)


def _targets_bwd(opts: Options, res, g):
    dx, x, targets, counted, weight, lse = res
    g = jnp.where(counted, g, 0.0)
    if dx is not None:
        dx = (dx.astype(g.dtype) * g[:, None]).astype(dx.dtype)
    else:
        z = transform(_fresh(x), opts)
        wt = _smoothed(targets, weight, opts, z.dtype)
        coef = row_sum(wt) + 2.0 * opts.z_loss * lse
        dz = jnp.where(counted[:, None],
                       g[:, None] * (jnp.exp(z - lse[:, None]) * coef[:, None] - wt), 0.0)
        dx = transform_vjp(dz, z, opts).astype(x.dtype)
    dt = _target_dt(g, x, targets, counted, weight, lse, opts)
    return dx, dt, None, _zeros_or_none(weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def target_rows(x, targets, counted, weight, opts: Options):
    """Per-row cross-entropy of ``x [N, C]`` against probability ``targets [N, C]``.

    Differentiable in both ``x`` and ``targets`` (knowledge distillation); returns ``[N]``.
    """
    return _targets_primal(x, targets, counted, weight, opts)


target_rows.defvjp(
    lambda x, targets, counted, weight, opts: _targets_fwd(x, targets, counted, weight, opts),
    _targets_bwd,
)


# ----------------------------------------------------------------------------- reductions


def reduce(losses: jax.Array, denominator: jax.Array, reduction: str) -> jax.Array:
    """``"none"``: ``losses``; ``"sum"``: their sum; ``"mean"``: sum / denominator.

    A mean over nothing (``denominator == 0``) is 0.0 with zero gradient, not nan.
    """
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
    return total / safe.astype(total.dtype)
