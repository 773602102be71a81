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
The forward keeps only ``lse`` per row (``O(rows)`` residuals, not the ``[rows, C]``
probabilities); the backward recomputes ``p = exp(z - lse)`` and writes the gradient in one
fused elementwise expression::

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


def _pieces(z: jax.Array) -> jax.Array:
    """View ``[N, C]`` as ``[N, k, C // k]`` with pieces of at most 32K when C divides."""
    c = z.shape[-1]
    if c <= _MAX_PIECE:
        return z
    for k in range(2, c // 1024 + 1):
        if c % k == 0 and c // k <= _MAX_PIECE:
            return z.reshape(*z.shape[:-1], k, c // k)
    return z


def row_sum(v: jax.Array) -> jax.Array:
    """Sum over the last axis, split into pieces when rows are long."""
    v = _pieces(v)
    return v.sum(axis=-1) if v.ndim == 2 else v.sum(axis=-1).sum(axis=-1)


def row_max(v: jax.Array) -> jax.Array:
    """Max over the last axis, split into pieces when rows are long."""
    v = _pieces(v)
    return v.max(axis=-1) if v.ndim == 2 else v.max(axis=-1).max(axis=-1)


def shifted_stats(x: jax.Array, opts: Options) -> tuple[jax.Array, jax.Array]:
    """Row max ``m`` of ``z = transform(x)`` (0 where not finite) and ``log sum exp(z - m)``.

    The transform is increasing, so ``m = transform(max x)``: the max runs on the raw input
    and no upcast copy of 16-bit logits is ever materialized for two reductions to share.
    """
    m = transform(row_max(x), opts)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    log_s = jnp.log(row_sum(jnp.exp(transform(x, opts) - m[:, None])))
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


def _labels_fwd(x, labels, row_w, counted, weight, opts: Options):
    c = x.shape[1]
    m, log_s = shifted_stats(x, opts)
    valid = (labels >= 0) & (labels < c)
    safe = jnp.clip(labels, 0, c - 1)
    z_y = transform(jnp.take_along_axis(_fresh(x), safe[:, None], axis=1)[:, 0], opts)
    eps = opts.label_smoothing
    loss = (1.0 - eps) * row_w * (log_s - (z_y - m))
    if eps > 0.0:
        zs = transform(x, opts) - m[:, None]
        wz = row_sum(zs if weight is None else zs * weight[None, :])
        big_w = _class_sum(weight, c, m.dtype)
        loss = loss + (eps / c) * (big_w * log_s - wz)
    lse = m + log_s
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * jnp.square(lse)
    loss = jnp.where(counted, jnp.where(valid, loss, jnp.nan), 0.0)
    return loss, (x, labels, row_w, counted, weight, lse)


def _labels_bwd(opts: Options, res, g):
    x, labels, row_w, counted, weight, lse = res
    c = x.shape[1]
    z = transform(_fresh(x), opts)
    eps = opts.label_smoothing
    valid = (labels >= 0) & (labels < c)
    g = jnp.where(valid, g, jnp.nan)
    coef = (1.0 - eps) * row_w + 2.0 * opts.z_loss * lse
    if eps > 0.0:
        coef = coef + (eps / c) * _class_sum(weight, c, z.dtype)
    p = jnp.exp(z - lse[:, None])
    onehot = jnp.arange(c, dtype=labels.dtype)[None, :] == labels[:, None]
    dz = p * coef[:, None] - jnp.where(onehot, ((1.0 - eps) * row_w)[:, None], 0.0)
    if eps > 0.0:
        dz = dz - (eps / c) * (1.0 if weight is None else weight[None, :])
    dz = jnp.where(counted[:, None], dz * g[:, None], 0.0)
    dx = transform_vjp(dz, z, opts).astype(x.dtype)
    return dx, None, jnp.zeros_like(row_w), None, None if weight is None else jnp.zeros_like(weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def label_rows(x, labels, row_w, counted, weight, opts: Options):
    """Per-row cross-entropy of ``x [N, C]`` against integer ``labels [N]``.

    ``row_w [N]`` is ``w[y]`` for counted rows (0 otherwise), ``counted [N]`` selects the rows
    that contribute, ``weight [C]`` (or None) the class weights used by label smoothing.
    Returns ``[N]`` losses in the accumulation dtype; out-of-range labels give ``nan``.
    """
    return _labels_fwd(x, labels, row_w, counted, weight, opts)[0]


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


def _targets_fwd(x, targets, counted, weight, opts: Options):
    m, log_s = shifted_stats(x, opts)
    wt = _smoothed(targets, weight, opts, m.dtype)
    # 0 * log 0 = 0: classes without target mass contribute nothing, even at -inf logits.
    wtz = row_sum(jnp.where(wt == 0, 0.0, wt * (transform(x, opts) - m[:, None])))
    loss = row_sum(wt) * log_s - wtz
    lse = m + log_s
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * jnp.square(lse)
    loss = jnp.where(counted, loss, 0.0)
    return loss, (x, targets, counted, weight, lse)


def _targets_bwd(opts: Options, res, g):
    x, targets, counted, weight, lse = res
    z = transform(_fresh(x), opts)
    wt = _smoothed(targets, weight, opts, z.dtype)
    g = jnp.where(counted, g, 0.0)[:, None]
    coef = row_sum(wt) + 2.0 * opts.z_loss * lse
    dz = jnp.where(counted[:, None], g * (jnp.exp(z - lse[:, None]) * coef[:, None] - wt), 0.0)
    dx = transform_vjp(dz, z, opts).astype(x.dtype)
    # d loss / d t_c = (1 - e) w_c (lse - z_c)
    dt = g * (1.0 - opts.label_smoothing) * (lse[:, None] - z)
    if weight is not None:
        dt = dt * weight[None, :]
    dt = jnp.where(counted[:, None], dt, 0.0).astype(targets.dtype)
    return dx, dt, None, None if weight is None else jnp.zeros_like(weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def target_rows(x, targets, counted, weight, opts: Options):
    """Per-row cross-entropy of ``x [N, C]`` against probability ``targets [N, C]``.

    Differentiable in both ``x`` and ``targets`` (knowledge distillation); returns ``[N]``.
    """
    return _targets_fwd(x, targets, counted, weight, opts)[0]


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
