r"""Distillation losses between a student's and a teacher's softmax distributions, per
token, on materialized logits or on two linear heads (neither model's ``[N, V]`` logits
built).

Forward KL, reverse KL and the beta-weighted Jensen-Shannon divergence are row statistics
(:class:`jaxent.impl.stats.Distill`) walked over vocabulary blocks; each loss is a
``jax.custom_vjp`` whose forward keeps ``O(rows)`` statistics and whose backward recomputes
the blocks. ``temperature`` may be a number or an array broadcastable to the tokens' shape;
it is a constant (no gradient).
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxent import _checks, _heads, _rowmath
from jaxent._options import Impl, KernelLayout, Options, Reduction
from jaxent.impl import stats

Divergence = Literal["kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[Divergence, ...] = get_args(Divergence)


# ------------------------------------------------------------------------ distillation

_DOC_DIVERGENCE = r"""
    With student probabilities :math:`p = \mathrm{softmax}(z^s / T)` and teacher
    probabilities :math:`q = \mathrm{softmax}(z^t / T)` per token:

    .. math::
        \mathrm{kl} = \sum_c q_c \log\frac{q_c}{p_c},\qquad
        \mathrm{reverse\_kl} = \sum_c p_c \log\frac{p_c}{q_c},\qquad
        \mathrm{jsd}_\beta = \beta\,\mathrm{KL}(q\,\|\,M) + (1-\beta)\,\mathrm{KL}(p\,\|\,M),
        \quad M = \beta q + (1-\beta) p,

    the generalized Jensen-Shannon divergence of Liger-Kernel's ``LigerJSD`` /
    ``LigerFusedLinearJSD`` (teacher ``P``, student ``Q`` there), with its limits: at
    ``beta=0`` the forward KL ``KL(q || p)`` and at ``beta=1`` the reverse KL
    ``KL(p || q)`` (the limits of ``jsd / beta`` and ``jsd / (1 - beta)``; ``jsd`` itself
    vanishes there). No ``T**2`` factor is applied (multiply by it for Hinton's scaling).
    The teacher is a constant: its inputs are under ``jax.lax.stop_gradient`` and only the
    student gets gradients. ``0 log 0 = 0``."""


def _divergence(divergence, beta) -> tuple[str, float]:
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}")
    b = _checks.static_float(beta, "beta")
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {b}")
    if divergence == "jsd" and b == 0.0:
        return "kl", b
    if divergence == "jsd" and b == 1.0:
        return "reverse_kl", b
    return divergence, b


def _distill_mask(labels, ig, where, batch_shape):
    mask = _checks.where_mask(where, batch_shape)
    if labels is None:
        return mask
    y = _checks.int_labels(labels, batch_shape)
    keep = ~_rowmath.equals(y, _checks.check_ignore_index(ig))  # (no narrow-dtype wrap)
    return keep if mask is None else keep & mask


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    temperature: float | ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    labels: ArrayLike | None = None,
    reduction: Reduction = "mean",
):
    r"""Per-token divergence between a student's and a teacher's softmax distributions.
    {doc}

    Args:
      student_logits: float ``[..., V, ...]``, classes along ``axis``.
      teacher_logits: float, same shape (any float dtype).
      divergence: ``"kl"`` (forward, ``KL(teacher || student)``), ``"reverse_kl"``
        (``KL(student || teacher)``) or ``"jsd"``.
      beta: the ``jsd`` weight in ``[0, 1]`` (ignored otherwise).
      temperature: a number or an array broadcastable to the tokens' shape (the logits'
        shape without ``axis``); divides both models' logits. A constant.
      axis: the class axis.
      where: optional boolean mask shaped like the tokens.
      ignore_index: with ``labels``, tokens whose label equals it count for nothing
        (default -100 when ``labels`` are given).
      labels: optional integer labels shaped like the tokens (only used for masking).
      reduction: ``"mean"`` (over counted tokens; 0.0 when none is counted), ``"sum"`` or
        ``"none"`` (tokens' shape, 0 where not counted).

    Returns:
      float32 (float64 for float64 logits) scalar, or the tokens' shape for ``"none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> s = jax.random.normal(jax.random.key(0), (4, 10))
      >>> t = jax.random.normal(jax.random.key(1), (4, 10))
      >>> q = jax.nn.softmax(t)
      >>> ref = jnp.mean(jnp.sum(q * (jnp.log(q) - jax.nn.log_softmax(s)), -1))
      >>> bool(jnp.allclose(jaxent.distillation_loss(s, t), ref, rtol=1e-5))
      True
    """
    kind, b = _divergence(divergence, beta)
    _heads.check_reduction(reduction)
    xs = _checks.float_array(student_logits, "student_logits")
    xt = _checks.float_array(teacher_logits, "teacher_logits")
    _checks.expect_shape(xt, xs.shape, "teacher_logits", "the student_logits' shape")
    ax = _checks.normalize_axis(axis, xs.ndim)
    v = _checks.num_classes(xs, ax, "student_logits")
    batch_shape = xs.shape[:ax] + xs.shape[ax + 1:]
    if labels is None and ignore_index is not None:
        raise ValueError("`ignore_index` masks tokens through `labels`; pass `labels` too")
    mask = _distill_mask(labels, -100 if ignore_index is None else ignore_index, where,
                         batch_shape)
    acc = _rowmath.compute_dtype(xs.dtype)
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    rs, rt = _heads.rows(xs, ax), jax.lax.stop_gradient(_heads.rows(xt, ax))
    n = rs.shape[0]
    plan = _heads.plan(Options(temperature=temp_s), v, v, n, max(v, 1), streams=2)
    counted = _heads.counted(mask, n)
    losses = _heads.run(stats.Distill(kind, b), plan, ((rs,), (rt,)),
                  stats.Rows(None, counted, temp), {})
    return _heads.reduce(losses.reshape(batch_shape), counted, reduction)


def linear_distillation_loss(
    student_hidden: ArrayLike,
    student_kernel: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_kernel: ArrayLike,
    *,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    temperature: float | ArrayLike = 1.0,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    kernel_layout: KernelLayout = "dv",
    labels: ArrayLike | None = None,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
    block_size: int | None = None,
    impl: Impl = "auto",
    vocab_size: int | None = None,
):
    r""":func:`distillation_loss` of two linear heads, neither model's logits materialized.

    The student's logits are ``student_hidden @ student_kernel + student_bias``, the
    teacher's ``teacher_hidden @ teacher_kernel + teacher_bias`` (same vocabulary ``V``;
    the widths may differ), both accumulated in float32 and walked in vocabulary blocks
    with online statistics of both streams (``"jsd"`` walks the forward twice); the
    backward recomputes both blocks. Extra memory ``O(N * block_size)``.
    {doc}

    Args:
      student_hidden: float ``[..., Ds]``.
      student_kernel: float ``[Ds, V]`` (``"dv"``) or ``[V, Ds]`` (``"vd"``).
      teacher_hidden: float ``[..., Dt]`` with the student's leading shape.
      teacher_kernel: float ``[Dt, V]`` or ``[V, Dt]`` (same ``kernel_layout``).
      divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: the ``jsd`` weight in ``[0, 1]``.
      temperature: a number or an array broadcastable to ``student_hidden.shape[:-1]``.
      student_bias, teacher_bias: optional float ``[V]``.
      kernel_layout: ``"dv"`` or ``"vd"``, for both kernels.
      labels: optional integer ``student_hidden.shape[:-1]``; tokens labelled
        ``ignore_index`` count for nothing.
      ignore_index: see ``labels``.
      where: optional boolean mask shaped like the tokens.
      reduction: ``"mean"`` (over counted tokens; 0.0 when none), ``"sum"`` or ``"none"``.
      block_size: vocabulary columns per block (default: about 16 MB for the two blocks).
      impl: ``"auto"``, ``"xla"`` or ``"vocab"``.
      vocab_size: the number of real classes when both kernels hold padding columns after
        them, as in :func:`linear_log_probs`.

    Returns:
      float32 scalar, or ``student_hidden.shape[:-1]`` for ``"none"``; gradients flow to the
      student's hidden, kernel and bias only.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> ks = jax.random.split(jax.random.key(0), 4)
      >>> hs, ws = jax.random.normal(ks[0], (6, 8)), jax.random.normal(ks[1], (8, 40)) / 3
      >>> ht, wt = jax.random.normal(ks[2], (6, 16)), jax.random.normal(ks[3], (16, 40)) / 4
      >>> loss = jaxent.linear_distillation_loss(hs, ws, ht, wt, divergence="jsd",
      ...                                        block_size=16)
      >>> ref = jaxent.distillation_loss(hs @ ws, ht @ wt, divergence="jsd")
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True
    """
    arrays = {"student_hidden": student_hidden, "student_kernel": student_kernel,
              "teacher_hidden": teacher_hidden, "teacher_kernel": teacher_kernel,
              "student_bias": student_bias, "teacher_bias": teacher_bias, "labels": labels,
              "where": where}
    static = {"divergence": divergence, "beta": beta, "kernel_layout": kernel_layout,
              "ignore_index": ignore_index, "reduction": reduction, "block_size": block_size,
              "vocab_size": vocab_size}
    return _heads.place(fused_distillation_loss, _distill_shard, arrays, static, temperature,
                        impl, "row" if reduction == "none" else "replicated")


def _distill_shard(vocab, tok, **kw):
    return fused_distillation_loss(**kw, axis_name=vocab, token_axis_name=tok)


def fused_distillation_loss(student_hidden, student_kernel, teacher_hidden, teacher_kernel, *,
                            divergence, beta, temperature, student_bias, teacher_bias,
                            kernel_layout, labels, ignore_index, where, reduction,
                            block_size, vocab_size=None, axis_name=None,
                            token_axis_name=None):
    """:func:`linear_distillation_loss`, vocabulary-parallel over ``axis_name`` when given."""
    kind, b = _divergence(divergence, beta)
    _heads.check_reduction(reduction)
    if labels is None and ignore_index != -100:
        raise ValueError("`ignore_index` masks tokens through `labels`; pass `labels` too")
    hs, ks, bs, local, v = _heads.head(student_hidden, student_kernel, student_bias, kernel_layout,
                                 ("student_hidden", "student_kernel", "student_bias"),
                                 axis_name)
    ht, kt, bt, local_t, _ = _heads.head(teacher_hidden, teacher_kernel, teacher_bias,
                                   kernel_layout,
                                   ("teacher_hidden", "teacher_kernel", "teacher_bias"),
                                   axis_name)
    if local_t != local:
        what = (f"vocabulary V = {v}, got V = {local_t}" if axis_name is None else
                f"{local} vocabulary columns per device, got {local_t}")
        raise ValueError(f"`teacher_kernel` must have the student's {what} (shape "
                         f"{tuple(jnp.shape(teacher_kernel))})")
    v = _heads.vocab(vocab_size, v, "student_kernel")
    batch_shape = jnp.shape(student_hidden)[:-1]
    if jnp.shape(teacher_hidden)[:-1] != batch_shape:
        raise ValueError(f"`teacher_hidden` must have the student's leading shape "
                         f"{tuple(batch_shape)}, got shape {tuple(jnp.shape(teacher_hidden))}")
    mask = _distill_mask(labels, ignore_index, where, batch_shape)
    acc = _rowmath.compute_dtype(hs.dtype)
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    n = hs.shape[0]
    plan = _heads.plan(Options(temperature=temp_s), v, local, n, block_size, kernel_layout,
                 axis_name, streams=2)
    counted = _heads.counted(mask, n)
    losses = _heads.run(stats.Distill(kind, b), plan, ((hs, ks, bs), jax.lax.stop_gradient(
        (ht, kt, bt))), stats.Rows(None, counted, temp), {})
    return _heads.reduce(losses.reshape(batch_shape), counted, reduction, token_axis_name)


distillation_loss.__doc__ = (distillation_loss.__doc__ or "").replace("{doc}", _DOC_DIVERGENCE)
linear_distillation_loss.__doc__ = (linear_distillation_loss.__doc__ or "").replace(
    "{doc}", _DOC_DIVERGENCE)
