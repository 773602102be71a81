r"""Policy-gradient objectives (PPO, GRPO, DAPO, GSPO) with exact global normalizers.

Pure functions from per-token log-probabilities to a scalar loss and a few metrics. They
take arrays, not models: the new log-probs come from :func:`jaxent.token_log_probs` or
:func:`jaxent.linear_log_probs` (with ``return_entropy=True`` for the entropy bonus), the
old, reference and behaviour log-probs are constants recorded beforehand.

Every array is ``[..., T]``: the last axis holds one sequence's tokens (a completion), the
leading axes index sequences. ``mask`` marks the counted tokens; advantages are given per
token (``[..., T]``) or per sequence (``[...]``).

The per-token loss of the clipped objectives, with :math:`r_t = \exp(\log\pi_\theta(y_t)
- \log\pi_{old}(y_t))` and advantage :math:`A_t`, is

.. math::

    \ell_t = -\min\bigl(r_t A_t,\ \operatorname{clip}(r_t, 1-\epsilon_{low},
    1+\epsilon_{high})\,A_t\bigr)

(dual-clip bounds it by :math:`-c A_t` when :math:`A_t < 0`), plus
``kl_coef * kl_t - entropy_coef * H_t``, times a truncated importance weight when the
sampler's own log-probs are given. The loss is an aggregate of :math:`\ell` over the counted
tokens (``aggregation``), divided by a *global* normalizer: the counts of the whole batch,
either passed in (:func:`normalizers` of the full batch's mask) or summed over a named mesh
axis (``axis_name``, inside ``jax.shard_map``). The losses of the micro-batches (or of the
devices) then add up to the full batch's loss, and so do their gradients.

Gradients flow to ``logp`` and ``entropy`` only: ``old_logp``, ``ref_logp``,
``behaviour_logp`` and ``advantages`` are constants (``stop_gradient``).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxent import _checks

__all__ = ["AGGREGATIONS", "Aggregation", "KLEstimator", "Metrics", "Normalizers",
           "aggregate", "dapo_loss", "grpo_loss", "gspo_loss", "kl_penalty", "normalizers",
           "policy_loss", "ppo_loss"]

Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
KLEstimator = Literal["k1", "k2", "k3"]
RatioLevel = Literal["token", "sequence"]
_AS_LOGP = "the shape of `logp`"  # what the optional per-token inputs must match


class Normalizers(NamedTuple):
    """The global counts an aggregation divides by (a pytree: it passes through ``jit``).

    Fields (float32 scalars):

    - ``tokens``: counted tokens of the global batch;
    - ``sequences``: sequences with at least one counted token;
    - ``length``: the constant of ``"seq-mean-token-sum-norm"`` (Dr. GRPO's maximal
      completion length).
    """

    tokens: jax.Array
    sequences: jax.Array
    length: jax.Array


class Metrics(NamedTuple):
    """Diagnostics of one policy loss (float32 scalars, no gradient).

    Each is a mean over the counted tokens of the global batch (divided by
    ``Normalizers.tokens``), so the metrics of micro-batches add up to the full batch's;
    ``ratio_max`` is a maximum (take the max over micro-batches). With ``axis_name`` they
    are already combined over that axis.

    Fields:

    - ``clip_frac_low``: tokens with :math:`A<0` and :math:`r<1-\\epsilon_{low}` (clipped);
    - ``clip_frac_high``: tokens with :math:`A>0` and :math:`r>1+\\epsilon_{high}` (clipped);
    - ``clip_frac_dual``: tokens with :math:`A<0` and :math:`r>c` (dual-clip bound);
    - ``approx_kl``: the ``k3`` estimate of :math:`KL(\\pi_{old}\\,\\|\\,\\pi_\\theta)`,
      :math:`(r-1)-\\log r`;
    - ``kl``: the KL penalty's estimate of :math:`KL(\\pi_\\theta\\,\\|\\,\\pi_{ref})` (0
      without ``ref_logp``);
    - ``entropy``: mean entropy (0 without ``entropy``);
    - ``ratio_mean``: mean of the ratio :math:`r` (the sequence ratio for GSPO);
    - ``ratio_max``: largest ratio;
    - ``is_weight_mean``: mean truncated importance weight (1 without ``behaviour_logp``).
    """

    clip_frac_low: jax.Array
    clip_frac_high: jax.Array
    clip_frac_dual: jax.Array
    approx_kl: jax.Array
    kl: jax.Array
    entropy: jax.Array
    ratio_mean: jax.Array
    ratio_max: jax.Array
    is_weight_mean: jax.Array


# ----------------------------------------------------------------------------- checks


def _mask(mask: ArrayLike | None, shape: tuple) -> jax.Array:
    if mask is None:
        return jnp.ones(shape, bool)
    m = jnp.asarray(mask)
    _checks.expect_shape(m, shape, "mask", "the shape of `logp`: True where a token counts")
    return m.astype(bool)


def _logp(logp: ArrayLike) -> jax.Array:
    arr = _checks.float_array(logp, "logp")
    if arr.ndim < 1:
        raise ValueError("`logp` must have a token axis (shape [..., T]), got a scalar")
    return arr


# ------------------------------------------------------------------------ normalizers


def normalizers(mask: ArrayLike, *, max_length: int | None = None,
                axis_name=None) -> Normalizers:
    r"""The global counts of a batch, for :func:`aggregate` and the policy losses.

    Compute them once from the *full* batch's mask and pass them to the loss of every
    micro-batch: the micro-batch losses then sum to the full-batch loss, gradients too.

    .. math::

        N_{tok} = \sum_{i,t} m_{i,t}, \qquad N_{seq} = \#\{i : \textstyle\sum_t m_{i,t} > 0\}

    Args:
      mask: ``[..., T]`` booleans, True where a token counts.
      max_length: the constant ``L`` of ``"seq-mean-token-sum-norm"``; default ``T``.
      axis_name: a mesh axis name (inside ``jax.shard_map``): the counts are summed over it.

    Returns:
      :class:`Normalizers` of float32 scalars.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxent import objectives
      >>> mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
      >>> n = objectives.normalizers(mask)
      >>> float(n.tokens), float(n.sequences), float(n.length)
      (5.0, 2.0, 3.0)
    """
    m = jnp.asarray(mask)
    if m.ndim < 1:
        raise ValueError("`mask` must have a token axis (shape [..., T]), got a scalar")
    m = m.astype(bool)
    length = m.shape[-1] if max_length is None else max_length
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"`max_length` must be a positive int, got {max_length!r}")
    tokens = m.sum(dtype=jnp.float32)
    sequences = m.any(-1).sum(dtype=jnp.float32)
    if axis_name is not None:
        tokens, sequences = lax.psum((tokens, sequences), axis_name)
    return Normalizers(tokens, sequences, jnp.float32(length))


def _normalizers_arg(norm, mask, max_length, axis_name) -> Normalizers:
    if norm is None:
        return normalizers(mask, max_length=max_length, axis_name=axis_name)
    if max_length is not None:
        raise ValueError("`max_length` is part of the given `normalizers`: pass it to "
                         "objectives.normalizers(full_mask, max_length=...) instead")
    if not isinstance(norm, Normalizers):
        raise TypeError("`normalizers` must be a jaxent.objectives.Normalizers (from "
                        f"objectives.normalizers(full_mask)), got {type(norm).__name__}")
    return norm


def aggregate(values: ArrayLike, mask: ArrayLike | None = None,
              aggregation: Aggregation = "token-mean", *,
              normalizers: Normalizers | None = None, max_length: int | None = None,
              axis_name=None) -> jax.Array:
    r"""Reduces per-token values ``[..., T]`` to a scalar, with a global normalizer.

    verl's ``agg_loss`` modes (``verl/trainer/ppo/core_algos.py``), with
    :math:`S_i = \sum_t m_{i,t}\,\ell_{i,t}` and :math:`n_i = \sum_t m_{i,t}`:

    - ``"token-mean"``: :math:`\sum_i S_i / N_{tok}` (DAPO's token-level mean);
    - ``"seq-mean-token-sum"``: :math:`\sum_i S_i / N_{seq}`;
    - ``"seq-mean-token-mean"``: :math:`\sum_{i: n_i>0} (S_i / n_i) / N_{seq}` (GRPO);
    - ``"seq-mean-token-sum-norm"``: :math:`\sum_i S_i / (N_{seq} L)` (Dr. GRPO, TRL's
      ``dr_grpo``; verl divides by :math:`L` alone).

    :math:`N_{tok}`, :math:`N_{seq}` and :math:`L` are the *global* counts of
    :func:`normalizers` (given, or computed from ``mask`` and summed over ``axis_name``);
    the sums run over this call's tokens, so the results of disjoint parts of a batch add
    up to the whole batch's. A normalizer of 0 (nothing counted) gives 0.0. A sequence must
    not be split between two parts (``"seq-mean-token-mean"`` divides by its own count).

    Args:
      values: ``[..., T]`` per-token values.
      mask: ``[..., T]`` booleans, True where a token counts (default: all).
      aggregation: one of :data:`AGGREGATIONS`.
      normalizers: the full batch's :class:`Normalizers`; default: this call's (psum over
        ``axis_name`` when given).
      max_length: ``L`` when ``normalizers`` is not given (default ``T``).
      axis_name: mesh axis over which the counts are summed when ``normalizers`` is None.

    Returns:
      A float scalar: this part's share of the batch's aggregate.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxent import objectives
      >>> loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
      >>> mask = jnp.array([[True, True, False], [True, True, True]])
      >>> for mode in objectives.AGGREGATIONS:
      ...     print(mode, float(objectives.aggregate(loss, mask, mode)))
      token-mean 3.6
      seq-mean-token-sum 9.0
      seq-mean-token-mean 3.25
      seq-mean-token-sum-norm 3.0
    """
    _checks.one_of(aggregation, AGGREGATIONS, "aggregation")
    v = _checks.float_array(values, "values")
    if v.ndim < 1:
        raise ValueError("`values` must have a token axis (shape [..., T]), got a scalar")
    m = _mask(mask, v.shape)
    norm = _normalizers_arg(normalizers, m, max_length, axis_name)
    dtype = jnp.promote_types(v.dtype, jnp.float32)
    per_seq = jnp.where(m, v, 0).astype(dtype).sum(-1)
    if aggregation == "token-mean":
        return per_seq.sum() / jnp.maximum(norm.tokens, 1).astype(dtype)
    if aggregation == "seq-mean-token-mean":
        per_seq = per_seq / jnp.maximum(m.sum(-1), 1).astype(dtype)
    denom = norm.sequences * norm.length if aggregation == "seq-mean-token-sum-norm" \
        else norm.sequences
    return per_seq.sum() / jnp.maximum(denom, 1).astype(dtype)


# ---------------------------------------------------------------------------- KL


def kl_penalty(logp: ArrayLike, ref_logp: ArrayLike,
               estimator: KLEstimator = "k3") -> jax.Array:
    r"""Per-token estimate of :math:`KL(\pi_\theta \,\|\, \pi_{ref})` from sampled tokens.

    Schulman's estimators (http://joschu.net/blog/kl-approx.html), with
    :math:`\log\rho = \log\pi_{ref}(y_t) - \log\pi_\theta(y_t)`:

    .. math::

        k_1 = -\log\rho, \qquad k_2 = \tfrac12 (\log\rho)^2, \qquad
        k_3 = \rho - 1 - \log\rho

    ``k3`` (unbiased, non-negative, low variance) is GRPO's penalty. Unlike verl, nothing
    is clamped: a huge ratio gives a huge (true) value.

    Args:
      logp: ``[..., T]`` the policy's log-probs of the sampled tokens (differentiable).
      ref_logp: ``[..., T]`` the reference model's (a constant).
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      ``[..., T]`` per-token estimates, in ``logp``'s dtype (at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxent import objectives
      >>> logp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
      >>> [round(float(objectives.kl_penalty(logp, ref, e)[0]), 4) for e in ("k1", "k2", "k3")]
      [0.6931, 0.2402, 0.1931]
    """
    _checks.one_of(estimator, get_args(KLEstimator), "estimator")
    lp = _logp(logp)
    ref = _checks.float_array(ref_logp, "ref_logp")
    _checks.expect_shape(ref, lp.shape, "ref_logp", _AS_LOGP)
    dtype = jnp.promote_types(lp.dtype, jnp.float32)
    log_rho = lax.stop_gradient(ref).astype(dtype) - lp.astype(dtype)
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho**2
    return jnp.exp(log_rho) - 1 - log_rho


# --------------------------------------------------------------------- policy losses


def _advantages(advantages: ArrayLike, shape: tuple) -> jax.Array:
    adv = _checks.float_array(advantages, "advantages")
    if adv.shape == shape:
        return adv
    if adv.shape == shape[:-1]:
        return adv[..., None]
    raise ValueError(f"`advantages` must have shape {shape} (one per token) or {shape[:-1]} "
                     f"(one per sequence), got shape {tuple(adv.shape)}")


def policy_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
                mask: ArrayLike | None = None, *, ratio_level: RatioLevel = "token",
                eps_low: float = 0.2, eps_high: float | None = None,
                dual_clip: float | None = None, ref_logp: ArrayLike | None = None,
                kl_coef: float = 0.0, kl_estimator: KLEstimator = "k3",
                entropy: ArrayLike | None = None, entropy_coef: float = 0.0,
                behaviour_logp: ArrayLike | None = None, tis_level: RatioLevel = "token",
                tis_cap: float | None = 2.0, aggregation: Aggregation = "token-mean",
                normalizers: Normalizers | None = None, max_length: int | None = None,
                axis_name=None) -> tuple[jax.Array, Metrics]:
    r"""The clipped policy-gradient loss that :func:`ppo_loss`, :func:`grpo_loss`,
    :func:`dapo_loss` and :func:`gspo_loss` configure.

    Per counted token, with :math:`A` the advantage and :math:`r` the ratio
    (``ratio_level="token"``: :math:`r_t = \pi_\theta(y_t)/\pi_{old}(y_t)`;
    ``"sequence"`` (GSPO): :math:`s_i = \exp(\frac{1}{n_i}\sum_t \log r_{i,t})`, the
    geometric mean over the sequence's counted tokens, whose gradient reaches every token
    as :math:`s_i \nabla \log\pi_\theta(y_t)`, verl's GSPO-token form):

    .. math::

        \ell_t = w_t \cdot \max\bigl(-r A,\ -\operatorname{clip}(r, 1-\epsilon_{low},
        1+\epsilon_{high}) A\bigr) + \beta\, k(\pi_\theta, \pi_{ref})_t - \gamma H_t

    where dual-clip (Ye et al., 2020) replaces the first term by :math:`\min(\cdot, -cA)`
    when :math:`A<0`. :math:`w_t` is the truncated importance weight (TIS) of the
    trainer's old policy against the sampler's (``behaviour_logp``):
    ``"token"``: :math:`\min(\pi_{old}(y_t)/\pi_{beh}(y_t), C)`; ``"sequence"``:
    :math:`\min(\prod_t \pi_{old}(y_t)/\pi_{beh}(y_t), C)`; ``tis_cap=None``: untruncated.
    :math:`k` is :func:`kl_penalty`'s estimator, :math:`H_t` the given entropy. The loss is
    :func:`aggregate` of :math:`\ell` (one mode for all three terms, as in verl).

    Args:
      logp: ``[..., T]`` log-probs of the sampled tokens under the policy being trained.
      old_logp: ``[..., T]`` the same under the policy that sampled them (as the trainer
        computes them).
      advantages: ``[..., T]`` per token or ``[...]`` per sequence.
      mask: ``[..., T]`` booleans, True where a token counts (default: all).
      ratio_level: ``"token"`` (PPO) or ``"sequence"`` (GSPO).
      eps_low: the clip range below 1, in (0, 1).
      eps_high: the clip range above 1, > 0; default ``eps_low`` (DAPO's clip-higher sets
        it larger).
      dual_clip: the dual-clip bound ``c`` > 1 on negative-advantage tokens, or None.
      ref_logp: ``[..., T]`` log-probs under the reference model, for the KL penalty (and
        the ``kl`` metric).
      kl_coef: :math:`\beta` >= 0 (needs ``ref_logp`` when > 0).
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (:func:`kl_penalty`).
      entropy: ``[..., T]`` per-token entropies, e.g. from ``jaxent.token_log_probs(...,
        return_entropy=True)`` (differentiable).
      entropy_coef: :math:`\gamma` >= 0 (needs ``entropy`` when > 0).
      behaviour_logp: ``[..., T]`` log-probs under the sampler (e.g. vLLM's), for TIS.
      tis_level: ``"token"`` or ``"sequence"`` importance weights.
      tis_cap: the truncation :math:`C` > 0, or None.
      aggregation: one of :data:`AGGREGATIONS`.
      normalizers: the full batch's :class:`Normalizers` (for micro-batches); default:
        this call's counts, summed over ``axis_name`` when given.
      max_length: the constant of ``"seq-mean-token-sum-norm"`` when ``normalizers`` is
        not given (default ``T``).
      axis_name: a mesh axis (inside ``jax.shard_map``) over which the counts and the
        metrics are summed. The loss stays this device's share: sum (``psum``) the
        gradients over the axis, or multiply the loss by the axis size before a ``pmean``.

    Returns:
      ``(loss, metrics)``: a float32 (or wider) scalar and :class:`Metrics`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxent import objectives
      >>> logp = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.4]]))
      >>> old = jnp.log(jnp.array([[0.4, 0.3, 0.3], [0.2, 0.1, 0.5]]))
      >>> adv = jnp.array([1.0, -1.0])                        # one per sequence
      >>> mask = jnp.array([[True, True, True], [True, True, False]])
      >>> loss, m = objectives.policy_loss(logp, old, adv, mask, eps_low=0.2, dual_clip=2.0)
      >>> print(f"{float(loss):.4f}", f"{float(m.clip_frac_high):.2f}",
      ...       f"{float(m.clip_frac_dual):.2f}")
      0.0267 0.20 0.20
      >>> jax.grad(lambda lp: objectives.policy_loss(lp, old, adv, mask)[0])(logp).shape
      (2, 3)
    """
    _checks.one_of(ratio_level, get_args(RatioLevel), "ratio_level")
    _checks.one_of(tis_level, get_args(RatioLevel), "tis_level")
    _checks.one_of(kl_estimator, get_args(KLEstimator), "kl_estimator")
    _checks.one_of(aggregation, AGGREGATIONS, "aggregation")
    lo_eps = _checks.positive_float(eps_low, "eps_low", below=1.0)
    hi_eps = lo_eps if eps_high is None else _checks.positive_float(eps_high, "eps_high")
    if dual_clip is not None and not _checks.static_float(dual_clip, "dual_clip") > 1:
        raise ValueError(f"`dual_clip` must be > 1 (the bound c on the ratio of negative-"
                         f"advantage tokens, Ye et al. 2020), got {dual_clip!r}")
    cap = None if tis_cap is None else _checks.positive_float(tis_cap, "tis_cap")
    beta = _checks.nonnegative_float(kl_coef, "kl_coef")
    gamma = _checks.nonnegative_float(entropy_coef, "entropy_coef")
    if beta > 0 and ref_logp is None:
        raise ValueError("`kl_coef` > 0 needs `ref_logp` (the reference model's log-probs)")
    if gamma > 0 and entropy is None:
        raise ValueError("`entropy_coef` > 0 needs `entropy` (per-token entropies, e.g. "
                         "from jaxent.token_log_probs(..., return_entropy=True))")

    lp = _logp(logp)
    shape = lp.shape
    m = _mask(mask, shape)
    old = _checks.float_array(old_logp, "old_logp")
    _checks.expect_shape(old, shape, "old_logp", _AS_LOGP)
    adv = _advantages(advantages, shape)
    ref = _checks.optional_float_like(ref_logp, shape, "ref_logp", _AS_LOGP)
    ent = _checks.optional_float_like(entropy, shape, "entropy", _AS_LOGP)
    beh = _checks.optional_float_like(behaviour_logp, shape, "behaviour_logp", _AS_LOGP)
    norm = _normalizers_arg(normalizers, m, max_length, axis_name)
    dtype = jnp.promote_types(lp.dtype, jnp.float32)

    def counted(x, grad=False):  # masked-out entries are 0, so padding never gives nan
        x = jnp.where(m, x.astype(dtype), 0)
        return x if grad else lax.stop_gradient(x)

    lp, old, adv = counted(lp, grad=True), counted(old), counted(jnp.broadcast_to(adv, shape))
    delta = lp - old
    if ratio_level == "sequence":
        n = jnp.maximum(m.sum(-1, keepdims=True), 1).astype(dtype)
        log_seq = lax.stop_gradient(delta.sum(-1, keepdims=True) / n)
        log_r = jnp.where(m, log_seq + lp - lax.stop_gradient(lp), 0)
    else:
        log_r = delta
    # -min(rA, clip(r)A) (and dual-clip) is -A * exp(log r clipped to a sign-dependent
    # range): A >= 0 keeps r <= 1+eps_high; A < 0 keeps 1-eps_low <= r <= c. Clipping the
    # logarithm keeps the unused branch's exp out of the gradient (no inf * 0).
    log_hi, log_lo = math.log1p(hi_eps), math.log1p(-lo_eps)
    log_c = math.inf if dual_clip is None else math.log(float(dual_clip))
    pos = adv >= 0
    clipped = jnp.clip(log_r, jnp.where(pos, -jnp.inf, log_lo), jnp.where(pos, log_hi, log_c))
    tok = -adv * jnp.exp(clipped)

    weight = jnp.ones_like(tok)
    if beh is not None:
        log_w = old - counted(beh)
        if tis_level == "sequence":
            log_w = jnp.broadcast_to(log_w.sum(-1, keepdims=True), shape)
        weight = jnp.exp(log_w if cap is None else jnp.minimum(log_w, math.log(cap)))
        tok = weight * tok
    kl = None if ref is None else kl_penalty(lp, counted(ref), kl_estimator)
    if beta > 0 and kl is not None:
        tok = tok + beta * kl
    if ent is not None:
        ent = counted(ent, grad=True)
        if gamma > 0:
            tok = tok - gamma * ent
    loss = aggregate(tok, m, aggregation, normalizers=norm)

    def mean(x):
        total = jnp.where(m, x, 0).astype(jnp.float32).sum()
        if axis_name is not None:
            total = lax.psum(total, axis_name)
        return lax.stop_gradient(total / jnp.maximum(norm.tokens, 1))

    r = lax.stop_gradient(jnp.exp(log_r))
    ratio_max = lax.stop_gradient(jnp.where(m, r, 0).max().astype(jnp.float32))
    if axis_name is not None:
        ratio_max = lax.pmax(ratio_max, axis_name)
    zero = jnp.zeros((), jnp.float32)
    metrics = Metrics(
        clip_frac_low=mean((adv < 0) & (log_r < log_lo)),
        clip_frac_high=mean((adv > 0) & (log_r > log_hi)),
        clip_frac_dual=mean((adv < 0) & (log_r > log_c)),
        approx_kl=mean(jnp.expm1(delta) - delta),
        kl=zero if kl is None else mean(kl),
        entropy=zero if ent is None else mean(ent),
        ratio_mean=mean(r),
        ratio_max=ratio_max,
        is_weight_mean=mean(weight),
    )
    return loss, metrics


def ppo_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
             mask: ArrayLike | None = None, *, eps_low: float = 0.2, eps_high: float = 0.2,
             dual_clip: float | None = None, aggregation: Aggregation = "token-mean",
             **options) -> tuple[jax.Array, Metrics]:
    r"""PPO's clipped surrogate (Schulman et al., 2017), dual-clip optional (Ye et al., 2020).

    .. math::

        \ell_t = -\min\bigl(r_t A_t,\ \operatorname{clip}(r_t, 1-\epsilon_{low},
        1+\epsilon_{high}) A_t\bigr), \qquad
        \text{dual-clip, } A_t<0:\ \min(\ell_t, -c A_t)

    averaged over the counted tokens (``"token-mean"``, verl's and TRL's default). Every
    other option of :func:`policy_loss` is accepted (``ref_logp``/``kl_coef``, ``entropy``/
    ``entropy_coef``, ``behaviour_logp`` for TIS, ``normalizers``, ``axis_name``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxent import objectives
      >>> logp = jnp.log(jnp.array([[0.5, 0.3], [0.6, 0.1]]))
      >>> old = jnp.log(jnp.array([[0.4, 0.3], [0.2, 0.1]]))
      >>> adv = jnp.array([[1.0, 0.5], [-1.0, -2.0]])
      >>> loss, metrics = objectives.ppo_loss(logp, old, adv, dual_clip=3.0)
      >>> print(f"{float(loss):.4f}")
      0.8250
    """
    return policy_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                       dual_clip=dual_clip, aggregation=aggregation, **options)


def grpo_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
              mask: ArrayLike | None = None, *, ref_logp: ArrayLike | None = None,
              eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 0.04,
              kl_estimator: KLEstimator = "k3",
              aggregation: Aggregation = "seq-mean-token-mean",
              **options) -> tuple[jax.Array, Metrics]:
    r"""GRPO (Shao et al., 2024, DeepSeekMath): PPO's clip, a ``k3`` KL penalty to the
    reference model in the loss, each sequence's tokens averaged, then the sequences.

    .. math::

        \mathcal{L} = \frac{1}{G}\sum_{i=1}^{G} \frac{1}{|o_i|}\sum_{t}
        \Bigl[-\min\bigl(r_{i,t} \hat A_i, \operatorname{clip}(r_{i,t}, 1-\epsilon,
        1+\epsilon)\hat A_i\bigr) + \beta\, k_3(\pi_\theta, \pi_{ref})_{i,t}\Bigr]

    The group-standardized advantages :math:`\hat A_i` are an input (one per sequence).
    Defaults are the paper's (:math:`\epsilon=0.2`, :math:`\beta=0.04`); ``kl_coef=0``
    drops the penalty (TRL's default) and ``ref_logp`` then is optional.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxent import objectives
      >>> logp = jnp.log(jnp.array([[0.5, 0.3], [0.6, 0.1]]))
      >>> old = jnp.log(jnp.array([[0.4, 0.3], [0.2, 0.1]]))
      >>> ref = jnp.log(jnp.array([[0.5, 0.2], [0.3, 0.1]]))
      >>> loss, m = objectives.grpo_loss(logp, old, jnp.array([1.0, -1.0]), ref_logp=ref)
      >>> print(f"{float(loss):.4f}", f"{float(m.kl):.4f}")
      0.4527 0.0663
    """
    return policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, eps_low=eps_low,
                       eps_high=eps_high, kl_coef=kl_coef, kl_estimator=kl_estimator,
                       aggregation=aggregation, **options)


def dapo_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
              mask: ArrayLike | None = None, *, eps_low: float = 0.2, eps_high: float = 0.28,
              aggregation: Aggregation = "token-mean",
              **options) -> tuple[jax.Array, Metrics]:
    r"""DAPO (Yu et al., 2025): clip-higher (:math:`\epsilon_{high} > \epsilon_{low}`),
    token-level normalization over the whole batch, no KL penalty.

    .. math::

        \mathcal{L} = \frac{1}{\sum_i |o_i|}\sum_{i}\sum_{t}
        -\min\bigl(r_{i,t} \hat A_{i,t}, \operatorname{clip}(r_{i,t}, 1-\epsilon_{low},
        1+\epsilon_{high})\hat A_{i,t}\bigr)

    Defaults are the paper's (0.2, 0.28). Under gradient accumulation, pass the full
    batch's :func:`normalizers` so that :math:`\sum_i |o_i|` is the whole batch's count.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxent import objectives
      >>> logp = jnp.log(jnp.array([[0.5, 0.3], [0.6, 0.1]]))
      >>> old = jnp.log(jnp.array([[0.4, 0.3], [0.5, 0.1]]))
      >>> loss, m = objectives.dapo_loss(logp, old, jnp.array([1.0, 1.0]))
      >>> print(f"{float(loss):.4f}", f"{float(m.clip_frac_high):.2f}")
      -1.1125 0.00
    """
    return policy_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                       aggregation=aggregation, **options)


def gspo_loss(logp: ArrayLike, old_logp: ArrayLike, advantages: ArrayLike,
              mask: ArrayLike | None = None, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
              aggregation: Aggregation = "seq-mean-token-mean",
              **options) -> tuple[jax.Array, Metrics]:
    r"""GSPO (Zheng et al., 2025): one importance ratio per sequence, the geometric mean of
    its token ratios, clipped at the sequence level.

    .. math::

        s_i = \exp\Bigl(\frac{1}{|o_i|}\sum_t \log\frac{\pi_\theta(y_{i,t})}
        {\pi_{old}(y_{i,t})}\Bigr), \qquad
        \mathcal{L} = \frac{1}{G}\sum_i -\min\bigl(s_i \hat A_i,
        \operatorname{clip}(s_i, 1-\epsilon_{low}, 1+\epsilon_{high})\hat A_i\bigr)

    computed per token in the GSPO-token form (verl's): the ratio's value is :math:`s_i`,
    its gradient :math:`s_i \nabla\log\pi_\theta(y_{i,t})`, so with one advantage per
    sequence and ``"seq-mean-token-mean"`` the loss and gradient are the sequence-level
    ones above. The default clip ranges are the paper's (3e-4, 4e-4).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxent import objectives
      >>> logp = jnp.log(jnp.array([[0.5, 0.3], [0.6, 0.1]]))
      >>> old = logp - jnp.array([[0.005, 0.015], [0.0, 0.02]])    # s = exp(0.01) twice
      >>> loss, m = objectives.gspo_loss(logp, old, jnp.array([1.0, -1.0]))
      >>> print(f"{float(m.ratio_mean):.5f}", f"{float(loss):.5f}", float(m.clip_frac_high))
      1.01005 0.00483 0.5
    """
    return policy_loss(logp, old_logp, advantages, mask, ratio_level="sequence",
                       eps_low=eps_low, eps_high=eps_high, aggregation=aggregation, **options)
