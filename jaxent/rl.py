r"""Per-token log-probabilities, entropies and distillation losses, plain and fused.

For RL fine-tuning (policy gradients, GRPO/PPO ratios, entropy bonuses, KL penalties) and
knowledge distillation. Every function is a ``jax.custom_vjp`` whose forward keeps ``O(rows)``
statistics, never ``[N, V]`` probabilities; the ``linear_*`` versions take the hidden states
and the output layer's kernel and walk the vocabulary in blocks, so the ``[N, V]`` logits are
never built (the backward recomputes each block). ``temperature`` may be a number or an array
broadcastable to the tokens' shape (one temperature per row, e.g. per prompt); it is a
constant (no gradient).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxent import _checks, _rowmath
from jaxent._options import LAYOUTS, Impl, KernelLayout, Options, Reduction
from jaxent.impl import stats, stream
from jaxent.impl.plan import Plan, stream_plan
from jaxent.placement import explicit as _explicit

Divergence = Literal["kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[Divergence, ...] = get_args(Divergence)
_IMPLS = ("auto", "xla", "vocab")

# Blocked temporaries aim at about 4M float32 elements (16 MB) per [N, block] logits block.


# ------------------------------------------------------------------------------ helpers


def _rows(x: jax.Array, axis: int) -> jax.Array:
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (-1 fails for 0 classes)


def _reduce(losses: jax.Array, counted: jax.Array, reduction: str,
            token_axis_name=None) -> jax.Array:
    """``"none"``: as is; ``"sum"``; ``"mean"``: sum / count of ``counted``, 0.0 when
    nothing is counted; with ``token_axis_name`` summed over the shards of the tokens."""
    if reduction == "none":
        return losses
    total, count = losses.sum(), counted.sum()
    if token_axis_name is not None:
        total, count = lax.psum(total, token_axis_name), lax.psum(count, token_axis_name)
    if reduction == "sum":
        return total
    return total / jnp.maximum(count, 1).astype(total.dtype)


def _reduction(value) -> None:
    if value not in ("mean", "sum", "none"):
        raise ValueError(f"`reduction` must be one of ('mean', 'sum', 'none'), got {value!r}")


def _impl(value) -> None:
    if value not in _IMPLS:
        hint = ("; only the vocabulary walk serves these losses (no 'token' or 'pallas' "
                "implementation)") if value in ("token", "pallas") else ""
        raise ValueError(f"`impl` must be one of {_IMPLS}, got {value!r}{hint}")


def _block_size(block_size) -> int | None:
    if block_size is not None and (isinstance(block_size, bool)
                                   or not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"`block_size` must be a positive Python int or None, got "
                         f"{block_size!r}")
    return block_size


def _vocab(vocab_size, columns: int, kernel_name: str = "kernel") -> int:
    """The real vocabulary: ``vocab_size`` (at most the kernel's ``columns``, the rest
    padding) or ``columns``."""
    if vocab_size is None:
        return columns
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            0 < vocab_size <= columns):
        raise ValueError(f"`vocab_size` must be a Python int in [1, {columns}] (the columns "
                         f"of `{kernel_name}`), got {vocab_size!r}")
    return vocab_size


def _head(hidden, kernel, bias, layout, names=("hidden", "kernel", "bias"), axis_name=None):
    """Validate a head ``hidden [..., D] @ kernel (+ bias)``; ``(h, k, b, V_local, V)``.

    With ``axis_name`` (inside ``jax.shard_map``) the kernel and bias are this device's
    block of ``V_local = V / k`` columns; else ``V_local = V``.
    """
    hn, kn, bn = names
    if layout not in LAYOUTS:
        raise ValueError(f"`kernel_layout` must be one of {LAYOUTS}, got {layout!r}")
    h = _checks.float_array(hidden, hn)
    k = _checks.float_array(kernel, kn)
    d, local = _checks.head_shape(h, k, layout, hn, kn)
    b = None
    if bias is not None:
        b = _checks.float_array(bias, bn)
        if b.shape != (local,):
            what = "V from" if axis_name is None else "this device's V/k columns of"
            raise ValueError(f"`{bn}` must have shape ({local},) (one per class, {what} "
                             f"`{kn}`), got shape {tuple(b.shape)}")
    dtype = jnp.result_type(h.dtype, k.dtype)
    h = h.reshape(math.prod(h.shape[:-1]), d).astype(dtype)  # (-1 fails for D = 0)
    v = local if axis_name is None else local * lax.axis_size(axis_name)
    return h, k.astype(dtype), None if b is None else b.astype(dtype), local, v


# The walks, jitted with their static plan: eager calls compile once instead of running the
# walk op by op (inside an outer jit these are inlined).
_run = jax.jit(stream.run, static_argnums=(0, 1))


def _plan(opts: Options, num_classes: int, local: int, n, block_size=None,
          layout: str = "dv", axis_name=None, streams: int = 1) -> Plan:
    """The walk's plan: ``local`` columns on this device, the first ``num_classes`` of all
    shards real classes (the rest padding)."""
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    return stream_plan(opts, num_classes, local, n, layout=layout,
                       block_size=_block_size(block_size), vocab_axis=axis_name,
                       shards=shards, streams=streams)


def _row_temperature(temperature, batch_shape, acc):
    """``(static T, flat [N] per-row temperatures or None)`` (see
    :func:`jaxent._checks.temperature_array`)."""
    temp_s, temp = _checks.temperature_array(temperature, batch_shape, acc)
    return temp_s, None if temp is None else temp.reshape(-1)


def _counted(mask, n):
    return jnp.ones((n,), bool) if mask is None else mask.reshape(-1)


# ---------------------------------------------------------------------------- log-probs


def token_log_probs(
    logits: ArrayLike,
    tokens: ArrayLike,
    *,
    axis: int = -1,
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
):
    r"""Per-token log-probabilities ``log softmax(z)[token]`` and, optionally, entropies.

    With :math:`z = \mathrm{cap}\tanh(x / (T\,\mathrm{cap}))` (the cap optional),
    :math:`p = \mathrm{softmax}(z)` over the class axis:

    .. math::
        \log p_y = z_y - \log\sum_c e^{z_c},\qquad H = -\sum_c p_c \log p_c,\qquad
        \frac{\partial H}{\partial z_c} = -p_c(\log p_c + H).

    Both outputs are differentiable (``jax.custom_vjp``): the forward keeps per-row
    statistics only (no ``[N, C]`` residual besides the logits themselves) and the backward
    recomputes ``p = exp((z - m) - log s)``.

    Args:
      logits: float ``[..., C, ...]``, classes along ``axis``; 16-bit logits accumulate in
        float32.
      tokens: integer ``[...]``, ``logits.shape`` without ``axis``: the sampled tokens.
      axis: the class axis.
      temperature: a number, or an array broadcastable to ``tokens.shape`` (one temperature
        per row, e.g. per prompt): the logits are divided by it first. A constant.
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)``.
      where: optional boolean mask shaped like ``tokens``; ``False`` entries are 0 (and get
        zero gradient).
      return_entropy: also return the entropy of each row's distribution.

    Returns:
      ``log_probs`` float32 (float64 for float64 logits) shaped like ``tokens``, or the pair
      ``(log_probs, entropy)`` with ``return_entropy=True``. Token ids outside ``[0, C)``
      raise ``ValueError`` when concrete; under ``jit`` they give ``nan``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> x = jax.random.normal(jax.random.key(0), (2, 3, 5))
      >>> y = jnp.array([[0, 4, 2], [1, 1, 3]])
      >>> lp, ent = jaxent.token_log_probs(x, y, return_entropy=True)
      >>> ref = jnp.take_along_axis(jax.nn.log_softmax(x), y[..., None], -1)[..., 0]
      >>> bool(jnp.allclose(lp, ref, atol=1e-6)), ent.shape
      (True, (2, 3))
    """
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    cap = _checks.options(reduction="none", logit_softcap=logit_softcap).logit_softcap
    c = _checks.num_classes(x, ax)
    batch_shape = x.shape[:ax] + x.shape[ax + 1:]
    y = _checks.int_labels(tokens, batch_shape, "tokens")
    mask = _checks.where_mask(where, batch_shape)
    acc = _rowmath.compute_dtype(x.dtype)
    temp_s, temp = _row_temperature(temperature, batch_shape, acc)
    y = _rowmath.class_ids(_checks.token_values(y, c, mask), c)
    rows = _rows(x, ax)
    n = rows.shape[0]
    plan = _plan(Options(temperature=temp_s, logit_softcap=cap), c, c, n, max(c, 1))
    lp, ent = _run(stats.LogProbs(c, bool(return_entropy)), plan, ((rows,),),
                   stats.Rows(y.reshape(-1), _counted(mask, n), temp), {})
    lp = lp.reshape(batch_shape)
    return (lp, ent.reshape(batch_shape)) if return_entropy else lp


def linear_log_probs(
    hidden: ArrayLike,
    kernel: ArrayLike,
    tokens: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    kernel_layout: KernelLayout = "dv",
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
    block_size: int | None = None,
    impl: Impl = "auto",
    vocab_size: int | None = None,
):
    r""":func:`token_log_probs` of ``hidden @ kernel + bias`` without materializing logits.

    With :math:`x = hW + b` accumulated in float32 and :math:`z` as in
    :func:`token_log_probs`, per token

    .. math::
        \log p_y = z_y - \log\sum_c e^{z_c},\qquad
        H = \log s - \frac{\sum_c e^{z_c - m}(z_c - m)}{s},\quad s = \sum_c e^{z_c - m}.

    The vocabulary is walked in blocks of ``block_size`` columns keeping an online max,
    ``s`` and (for the entropy) ``sum e^{z-m}(z-m)`` per token; the backward recomputes each
    block and forms ``d hidden``, ``d kernel`` and ``d bias`` through both outputs. Extra
    memory ``O(N * block_size)``.

    Args:
      hidden: float ``[..., D]``.
      kernel: float ``[D, V]`` (``kernel_layout="dv"``) or ``[V, D]`` (``"vd"``, a tied
        embedding table).
      tokens: integer ``hidden.shape[:-1]``.
      bias: optional float ``[V]``.
      kernel_layout: ``"dv"`` or ``"vd"``.
      temperature: a number or an array broadcastable to ``tokens.shape`` (a constant).
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)``.
      where: optional boolean mask shaped like ``tokens`` (``False``: output 0).
      return_entropy: also return the per-token entropy.
      block_size: vocabulary columns per block (default: about 16 MB of float32 logits).
      impl: ``"auto"``, ``"xla"`` or ``"vocab"`` (all: the vocabulary walk).
      vocab_size: the number of real classes when the kernel's vocabulary axis holds
        padding columns after them (e.g. rounded up for sharding): they are masked out of
        the softmax and get zero gradient. Default: every column is a class.

    Returns:
      ``log_probs`` shaped like ``tokens`` (float32; float64 for float64 inputs), or
      ``(log_probs, entropy)``. Gradients w.r.t. ``hidden``, ``kernel``, ``bias`` come back
      in their dtypes.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> y = jnp.array([[1, 7, 49], [0, 5, 3]])
      >>> lp, ent = jaxent.linear_log_probs(h, w, y, return_entropy=True, block_size=16)
      >>> ref_lp, ref_ent = jaxent.token_log_probs(h @ w, y, return_entropy=True)
      >>> bool(jnp.allclose(lp, ref_lp, atol=1e-5)), bool(jnp.allclose(ent, ref_ent, atol=1e-5))
      (True, True)
    """
    _impl(impl)
    arrays = {"hidden": hidden, "kernel": kernel, "tokens": tokens, "bias": bias,
              "where": where}
    static = {"kernel_layout": kernel_layout, "logit_softcap": logit_softcap,
              "return_entropy": bool(return_entropy), "block_size": block_size,
              "vocab_size": vocab_size}
    placed = _explicit.run_head(_log_probs_shard, arrays, static, temperature,
                               ("row", "row") if return_entropy else "row")
    if placed is not None:
        return placed
    return fused_log_probs(**arrays, **static, temperature=temperature)


def _log_probs_shard(vocab, tok, **kw):
    del tok
    return fused_log_probs(**kw, axis_name=vocab)


def fused_log_probs(hidden, kernel, tokens, *, bias, kernel_layout, temperature,
                    logit_softcap, where, return_entropy, block_size, vocab_size=None,
                    axis_name=None):
    """:func:`linear_log_probs`, vocabulary-parallel over ``axis_name`` when given."""
    h, k, b, local, v = _head(hidden, kernel, bias, kernel_layout, axis_name=axis_name)
    v = _vocab(vocab_size, v)
    batch_shape = jnp.shape(hidden)[:-1]
    cap = _checks.options(reduction="none", logit_softcap=logit_softcap).logit_softcap
    y = _checks.int_labels(tokens, batch_shape, "tokens")
    mask = _checks.where_mask(where, batch_shape)
    acc = _rowmath.compute_dtype(h.dtype)
    temp_s, temp = _row_temperature(temperature, batch_shape, acc)
    if axis_name is None:  # (inside shard_map ids are not checked: out-of-range ones give nan)
        y = _checks.token_values(y, v, mask)
    y = _rowmath.class_ids(y, v)
    n = h.shape[0]
    plan = _plan(Options(temperature=temp_s, logit_softcap=cap), v, local, n, block_size,
                 kernel_layout, axis_name)
    lp, ent = _run(stats.LogProbs(v, bool(return_entropy)), plan, ((h, k, b),),
                   stats.Rows(y.reshape(-1), _counted(mask, n), temp), {})
    lp = lp.reshape(batch_shape)
    return (lp, ent.reshape(batch_shape)) if return_entropy else lp


# -------------------------------------------------------------------- soft targets, fused


def linear_soft_cross_entropy(
    hidden: ArrayLike,
    kernel: ArrayLike,
    targets: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    kernel_layout: KernelLayout = "dv",
    weight: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | ArrayLike = 1.0,
    block_size: int | None = None,
    impl: Impl = "auto",
):
    r"""``soft_cross_entropy(hidden @ kernel + bias, targets)`` without materializing logits.

    With :math:`z` as in :func:`jaxent.linear_cross_entropy`, :math:`\ell = \log\sum_c
    e^{z_c}` and the smoothed targets :math:`t' = (1-\epsilon)t + \epsilon/V`, each counted
    token contributes

    .. math:: \sum_c w_c t'_c (\ell - z_c) + \lambda_z \ell^2

    with :math:`0 \cdot \log 0 = 0`. ``"mean"`` divides by the number of counted tokens
    (PyTorch, also with ``weight``). The logits and the targets are read in vocabulary
    blocks; the loss is differentiable in ``hidden``, ``kernel``, ``bias`` and ``targets``.
    Equal to ``torch.nn.functional.linear_cross_entropy`` with probability targets.

    Args:
      hidden: float ``[..., D]``.
      kernel: float ``[D, V]`` or ``[V, D]`` (``kernel_layout``).
      targets: float ``[..., V]`` (``hidden.shape[:-1] + (V,)``), a distribution per token.
      bias: optional float ``[V]``.
      kernel_layout: ``"dv"`` or ``"vd"``.
      weight: optional per-class weights ``[V]`` (constants).
      label_smoothing: in ``[0, 1]``.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``hidden.shape[:-1]``).
      where: optional boolean mask shaped ``hidden.shape[:-1]``.
      z_loss: coefficient of ``logsumexp(z)**2`` per counted token.
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)``.
      temperature: a number or an array broadcastable to ``hidden.shape[:-1]``.
      block_size: vocabulary columns per block (default: about 16 MB of float32 logits).
      impl: ``"auto"``, ``"xla"`` or ``"vocab"``.

    Returns:
      float32 scalar, or ``hidden.shape[:-1]`` for ``"none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> h = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> t = jax.nn.softmax(jax.random.normal(jax.random.key(2), (4, 50)))
      >>> loss = jaxent.linear_soft_cross_entropy(h, w, t, block_size=16)
      >>> bool(jnp.allclose(loss, jaxent.soft_cross_entropy(h @ w, t), rtol=1e-5))
      True
    """
    _impl(impl)
    arrays = {"hidden": hidden, "kernel": kernel, "targets": targets, "bias": bias,
              "weight": weight, "where": where}
    static = {"kernel_layout": kernel_layout, "label_smoothing": label_smoothing,
              "reduction": reduction, "z_loss": z_loss, "logit_softcap": logit_softcap,
              "block_size": block_size}
    placed = _explicit.run_head(_soft_shard, arrays, static, temperature,
                               "row" if reduction == "none" else "replicated")
    if placed is not None:
        return placed
    return fused_soft_cross_entropy(**arrays, **static, temperature=temperature)


def _soft_shard(vocab, tok, **kw):
    return fused_soft_cross_entropy(**kw, axis_name=vocab, token_axis_name=tok)


def fused_soft_cross_entropy(hidden, kernel, targets, *, bias, kernel_layout, weight,
                             label_smoothing, reduction, where, z_loss, logit_softcap,
                             temperature, block_size, axis_name=None, token_axis_name=None):
    """:func:`linear_soft_cross_entropy`, vocabulary-parallel over ``axis_name`` when given
    (then ``targets`` and ``weight`` are this device's ``V/k`` columns)."""
    h, k, b, local, v = _head(hidden, kernel, bias, kernel_layout, axis_name=axis_name)
    batch_shape = jnp.shape(hidden)[:-1]
    opts = _checks.options(reduction=reduction, label_smoothing=label_smoothing,
                           z_loss=z_loss, logit_softcap=logit_softcap)
    t = jnp.asarray(targets)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise TypeError(f"`targets` must be floating-point probabilities, got dtype {t.dtype};"
                        " for integer class labels use jaxent.linear_cross_entropy")
    _checks.expect_shape(t, tuple(batch_shape) + (local,), "targets",
                         "hidden.shape[:-1] + (V,), one distribution per token"
                         if axis_name is None else
                         "hidden.shape[:-1] + (V/k,), this device's vocabulary block")
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, local)
    acc = _rowmath.compute_dtype(h.dtype)
    temp_s, temp = _row_temperature(temperature, batch_shape, acc)
    n = h.shape[0]
    plan = _plan(Options(opts.label_smoothing, opts.z_loss, temp_s, opts.logit_softcap), v,
                 local, n, block_size, kernel_layout, axis_name)
    counted = _counted(mask, n)
    losses = _run(stats.SoftTargets(v), plan, ((h, k, b),), stats.Rows(None, counted, temp),
                  {"targets": t.reshape(n, local), "weight": w})
    return _reduce(losses.reshape(batch_shape), counted, reduction, token_axis_name)


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
    _reduction(reduction)
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
    temp_s, temp = _row_temperature(temperature, batch_shape, acc)
    rs, rt = _rows(xs, ax), jax.lax.stop_gradient(_rows(xt, ax))
    n = rs.shape[0]
    plan = _plan(Options(temperature=temp_s), v, v, n, max(v, 1), streams=2)
    counted = _counted(mask, n)
    losses = _run(stats.Distill(kind, b), plan, ((rs,), (rt,)),
                  stats.Rows(None, counted, temp), {})
    return _reduce(losses.reshape(batch_shape), counted, reduction)


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
    _impl(impl)
    arrays = {"student_hidden": student_hidden, "student_kernel": student_kernel,
              "teacher_hidden": teacher_hidden, "teacher_kernel": teacher_kernel,
              "student_bias": student_bias, "teacher_bias": teacher_bias, "labels": labels,
              "where": where}
    static = {"divergence": divergence, "beta": beta, "kernel_layout": kernel_layout,
              "ignore_index": ignore_index, "reduction": reduction, "block_size": block_size,
              "vocab_size": vocab_size}
    placed = _explicit.run_head(_distill_shard, arrays, static, temperature,
                               "row" if reduction == "none" else "replicated")
    if placed is not None:
        return placed
    return fused_distillation_loss(**arrays, **static, temperature=temperature)


def _distill_shard(vocab, tok, **kw):
    return fused_distillation_loss(**kw, axis_name=vocab, token_axis_name=tok)


def fused_distillation_loss(student_hidden, student_kernel, teacher_hidden, teacher_kernel, *,
                            divergence, beta, temperature, student_bias, teacher_bias,
                            kernel_layout, labels, ignore_index, where, reduction,
                            block_size, vocab_size=None, axis_name=None,
                            token_axis_name=None):
    """:func:`linear_distillation_loss`, vocabulary-parallel over ``axis_name`` when given."""
    kind, b = _divergence(divergence, beta)
    _reduction(reduction)
    if labels is None and ignore_index != -100:
        raise ValueError("`ignore_index` masks tokens through `labels`; pass `labels` too")
    hs, ks, bs, local, v = _head(student_hidden, student_kernel, student_bias, kernel_layout,
                                 ("student_hidden", "student_kernel", "student_bias"),
                                 axis_name)
    ht, kt, bt, local_t, _ = _head(teacher_hidden, teacher_kernel, teacher_bias,
                                   kernel_layout,
                                   ("teacher_hidden", "teacher_kernel", "teacher_bias"),
                                   axis_name)
    if local_t != local:
        what = (f"vocabulary V = {v}, got V = {local_t}" if axis_name is None else
                f"{local} vocabulary columns per device, got {local_t}")
        raise ValueError(f"`teacher_kernel` must have the student's {what} (shape "
                         f"{tuple(jnp.shape(teacher_kernel))})")
    v = _vocab(vocab_size, v, "student_kernel")
    batch_shape = jnp.shape(student_hidden)[:-1]
    if jnp.shape(teacher_hidden)[:-1] != batch_shape:
        raise ValueError(f"`teacher_hidden` must have the student's leading shape "
                         f"{tuple(batch_shape)}, got shape {tuple(jnp.shape(teacher_hidden))}")
    mask = _distill_mask(labels, ignore_index, where, batch_shape)
    acc = _rowmath.compute_dtype(hs.dtype)
    temp_s, temp = _row_temperature(temperature, batch_shape, acc)
    n = hs.shape[0]
    plan = _plan(Options(temperature=temp_s), v, local, n, block_size, kernel_layout,
                 axis_name, streams=2)
    counted = _counted(mask, n)
    losses = _run(stats.Distill(kind, b), plan, ((hs, ks, bs), jax.lax.stop_gradient(
        (ht, kt, bt))), stats.Rows(None, counted, temp), {})
    return _reduce(losses.reshape(batch_shape), counted, reduction, token_axis_name)


distillation_loss.__doc__ = (distillation_loss.__doc__ or "").replace("{doc}", _DOC_DIVERGENCE)
linear_distillation_loss.__doc__ = (linear_distillation_loss.__doc__ or "").replace(
    "{doc}", _DOC_DIVERGENCE)
