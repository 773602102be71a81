r"""Per-token log-probabilities and entropies, and soft-target cross-entropy, plain and
fused.

For RL fine-tuning (policy gradients, GRPO/PPO ratios, entropy bonuses, KL penalties; the
objectives themselves are :mod:`jaxent.objectives`). Every function is a ``jax.custom_vjp``
whose forward keeps ``O(rows)`` statistics, never ``[N, V]`` probabilities; the ``linear_*``
versions take the hidden states and the output layer's kernel and walk the vocabulary in
blocks, so the ``[N, V]`` logits are never built (the backward recomputes each block).
``temperature`` may be a number or an array broadcastable to the tokens' shape (one
temperature per row, e.g. per prompt); it is a constant (no gradient). Distillation losses
are :mod:`jaxent.distill`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxent import _checks, _compact, _heads, _rowmath, _shift
from jaxent._options import Impl, KernelLayout, Options, Reduction
from jaxent.impl import stats, stats_aux
from jaxent.placement import explicit as _explicit

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
    shift: int = 0,
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
{shift} Output ``t`` is then ``log p(tokens[..., t+1])`` (0 at the last position,
        its entropy too): ``out[..., :-1]`` is the log-prob of ``logits[..., :-1, :]``
        against ``tokens[..., 1:]``.

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
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    y, mask = _shift.labels(shift, _checks.token_values(y, c, mask), mask, "tokens")
    y = _rowmath.class_ids(y, c)
    rows = _heads.rows(x, ax)
    n = rows.shape[0]
    plan = _heads.plan(Options(temperature=temp_s, logit_softcap=cap), c, c, n, max(c, 1))
    lp, ent = _heads.run(stats.LogProbs(c, bool(return_entropy)), plan, ((rows,),),
                   stats.Rows(y.reshape(-1), _heads.counted(mask, n), temp), {})
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
    token_block_size: int | None = None,
    interpret: bool = False,
    shift: int = 0,
    capacity: int | None = None,
    return_aux: bool = False,
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
      impl: ``"auto"``, ``"xla"`` or ``"vocab"`` (the vocabulary walk), ``"token"``
        (token blocks, each with its whole vocabulary row) or ``"pallas"`` (the kernels
        of :mod:`jaxent.impl.pallas_stats`: NVIDIA GPUs and TPUs, or ``interpret``; not
        with a vocabulary split over a mesh axis).
      vocab_size: the number of real classes when the kernel's vocabulary axis holds
        padding columns after them (e.g. rounded up for sharding): they are masked out of
        the softmax and get zero gradient. Default: every column is a class.
      token_block_size: ``impl="token"``: tokens per block (default: about 64 MB of
        float32 logits).
      interpret: with ``impl="pallas"``, run the kernels in Pallas's interpret mode (on the
        CPU, for testing).
{shift} As in :func:`token_log_probs` (out-of-range ids are then reported at
        their positions in ``tokens[..., 1:]``).
{capacity} Counted rows: ``where`` True (all rows when ``where`` is None).
      return_aux: also return a dict of per-token extras from the same pass, shaped like
        ``tokens`` and carrying no gradient: ``"lse"`` (log-sum-exp of ``z``) and
        ``"argmax"`` (the greedy token: the first class of largest logit, int32), on
        every row (with ``capacity``, 0 on rows not counted). Every ``impl`` serves it.

    Returns:
      ``log_probs`` shaped like ``tokens`` (float32; float64 for float64 inputs), or
      ``(log_probs, entropy)``; with ``return_aux`` the pair ``(that, aux dict)``. Gradients
      w.r.t. ``hidden``, ``kernel``, ``bias`` come back in their dtypes.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> y = jnp.array([[1, 7, 49], [0, 5, 3]])
      >>> lp, ent = jaxent.linear_log_probs(h, w, y, return_entropy=True, block_size=16)
      >>> ref_lp, ref_ent = jaxent.token_log_probs(h @ w, y, return_entropy=True)
      >>> bool(jnp.allclose(lp, ref_lp, atol=1e-5)), bool(jnp.allclose(ent, ref_ent, atol=1e-5))
      (True, True)

      Completion tokens only (a prompt of 2 tokens, ``where`` False there), shifted so that
      position t scores token t+1, walking 2 rows per call instead of 6:

      >>> comp = jnp.array([[False, False, True], [False, False, True]])
      >>> lp = jaxent.linear_log_probs(h, w, y, where=comp, shift=1, capacity=2)
      >>> ref = jaxent.token_log_probs((h @ w)[:, :-1], y[:, 1:])
      >>> bool(jnp.allclose(lp[:, 1], ref[:, 1], atol=1e-5)), lp[:, [0, 2]].tolist()
      (True, [[0.0, 0.0], [0.0, 0.0]])
    """
    _heads.check_impl(impl)
    cap = _compact.check(capacity)
    tokens, where = _shift.labels(shift, tokens, where, "tokens")
    arrays = {"hidden": hidden, "kernel": kernel, "tokens": tokens, "bias": bias,
              "where": where}
    static = {"kernel_layout": kernel_layout, "logit_softcap": logit_softcap,
              "return_entropy": bool(return_entropy), "block_size": block_size,
              "vocab_size": vocab_size, "impl": impl, "token_block_size": token_block_size,
              "interpret": bool(interpret), "return_aux": bool(return_aux)}
    if cap is not None:
        mask = _checks.where_mask(where, jnp.shape(hidden)[:-1])
        counted = jnp.ones(jnp.shape(hidden)[:-1], bool) if mask is None else mask
        return _heads.aux_dict(_compact.head(fused_log_probs, cap, counted, arrays, static,
                                             temperature, "linear_log_probs"),
                               LOG_PROBS_AUX if return_aux else None)
    out = ("row", "row") if return_entropy else "row"
    placed = _explicit.run_head(_log_probs_shard, arrays, static, temperature,
                               (out, ("row", "row")) if return_aux else out)
    if placed is None:
        placed = fused_log_probs(**arrays, **static, temperature=temperature)
    return _heads.aux_dict(placed, LOG_PROBS_AUX if return_aux else None)


# The names of linear_log_probs's aux, in the order fused_log_probs gives it.
LOG_PROBS_AUX = ("lse", "argmax")


def _log_probs_shard(vocab, tok, **kw):
    del tok
    return fused_log_probs(**kw, axis_name=vocab)


def fused_log_probs(hidden, kernel, tokens, *, bias, kernel_layout, temperature,
                    logit_softcap, where, return_entropy, block_size, vocab_size=None,
                    impl="auto", token_block_size=None, interpret=False, return_aux=False,
                    axis_name=None):
    """:func:`linear_log_probs`, vocabulary-parallel over ``axis_name`` when given (with
    ``return_aux`` the aux a tuple in :data:`LOG_PROBS_AUX`'s order)."""
    h, k, b, local, v = _heads.head(hidden, kernel, bias, kernel_layout, axis_name=axis_name)
    v = _heads.vocab(vocab_size, v)
    batch_shape = jnp.shape(hidden)[:-1]
    cap = _checks.options(reduction="none", logit_softcap=logit_softcap).logit_softcap
    y = _checks.int_labels(tokens, batch_shape, "tokens")
    mask = _checks.where_mask(where, batch_shape)
    acc = _rowmath.compute_dtype(h.dtype)
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    if axis_name is None:  # (inside shard_map ids are not checked: out-of-range ones give nan)
        y = _checks.token_values(y, v, mask)
    y = _rowmath.class_ids(y, v)
    n = h.shape[0]
    plan = _heads.plan(Options(temperature=temp_s, logit_softcap=cap), v, local, n, block_size,
                       kernel_layout, axis_name, token_block_size=token_block_size,
                       interpret=interpret)
    stat = (stats_aux.LogProbsAux if return_aux else stats.LogProbs)(v, bool(return_entropy))
    outs = _heads.walk(impl, stat, plan, ((h, k, b),),
                       stats.Rows(y.reshape(-1), _heads.counted(mask, n), temp), {})
    lp, ent = (o.reshape(batch_shape) for o in outs[:2])
    out = (lp, ent) if return_entropy else lp
    if not return_aux:
        return out
    return out, (outs[2].reshape(batch_shape), outs[3].reshape(batch_shape))


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
    token_block_size: int | None = None,
    interpret: bool = False,
    capacity: int | None = None,
    return_aux: bool = False,
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
      impl: ``"auto"``, ``"xla"``, ``"vocab"``, ``"token"`` or ``"pallas"``, as in
        :func:`linear_log_probs`.
      token_block_size: ``impl="token"``: tokens per block.
      interpret: with ``impl="pallas"``, run the kernels in Pallas's interpret mode.
{capacity} Counted rows: ``where`` True (all rows when ``where`` is None).
      return_aux: also return a dict of per-token extras from the same pass, shaped
        ``hidden.shape[:-1]`` and carrying no gradient, as :func:`jaxent.linear_cross_entropy`
        gives them: ``"lse"`` (log-sum-exp of ``z``), ``"z_loss"`` (``z_loss * lse**2``,
        0 where not counted) and ``"argmax"`` (the first class of largest logit, int32);
        with ``capacity``, 0 on rows not counted. Every ``impl`` serves it.

    Returns:
      float32 scalar, or ``hidden.shape[:-1]`` for ``"none"``; with ``return_aux=True`` the
      pair ``(loss, aux)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> h = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> t = jax.nn.softmax(jax.random.normal(jax.random.key(2), (4, 50)))
      >>> loss = jaxent.linear_soft_cross_entropy(h, w, t, block_size=16)
      >>> bool(jnp.allclose(loss, jaxent.soft_cross_entropy(h @ w, t), rtol=1e-5))
      True
    """
    _heads.check_impl(impl)
    arrays = {"hidden": hidden, "kernel": kernel, "targets": targets, "bias": bias,
              "weight": weight, "where": where}
    static = {"kernel_layout": kernel_layout, "label_smoothing": label_smoothing,
              "reduction": reduction, "z_loss": z_loss, "logit_softcap": logit_softcap,
              "block_size": block_size, "impl": impl, "token_block_size": token_block_size,
              "interpret": bool(interpret), "return_aux": bool(return_aux)}
    cap = _compact.check(capacity)
    if cap is not None:
        mask = _checks.where_mask(where, jnp.shape(hidden)[:-1])
        counted = jnp.ones(jnp.shape(hidden)[:-1], bool) if mask is None else mask
        return _heads.aux_dict(_compact.head(fused_soft_cross_entropy, cap, counted, arrays,
                                             static, temperature, "linear_soft_cross_entropy"),
                               SOFT_AUX if return_aux else None)
    out = "row" if reduction == "none" else "replicated"
    return _heads.aux_dict(_heads.place(
        fused_soft_cross_entropy, _soft_shard, arrays, static, temperature, impl,
        (out, ("row",) * len(SOFT_AUX)) if return_aux else out),
        SOFT_AUX if return_aux else None)


# The names of linear_soft_cross_entropy's aux, in the order fused_soft_cross_entropy gives it.
SOFT_AUX = ("lse", "z_loss", "argmax")


def _soft_shard(vocab, tok, **kw):
    return fused_soft_cross_entropy(**kw, axis_name=vocab, token_axis_name=tok)


def fused_soft_cross_entropy(hidden, kernel, targets, *, bias, kernel_layout, weight,
                             label_smoothing, reduction, where, z_loss, logit_softcap,
                             temperature, block_size, impl="auto", token_block_size=None,
                             interpret=False, return_aux=False, axis_name=None,
                             token_axis_name=None):
    """:func:`linear_soft_cross_entropy`, vocabulary-parallel over ``axis_name`` when given
    (then ``targets`` and ``weight`` are this device's ``V/k`` columns); with
    ``return_aux`` the pair ``(loss, aux)``, the aux a tuple in :data:`SOFT_AUX`'s order."""
    h, k, b, local, v = _heads.head(hidden, kernel, bias, kernel_layout, axis_name=axis_name)
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
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    n = h.shape[0]
    plan = _heads.plan(Options(opts.label_smoothing, opts.z_loss, temp_s, opts.logit_softcap), v,
                       local, n, block_size, kernel_layout, axis_name,
                       token_block_size=token_block_size, interpret=interpret)
    counted = _heads.counted(mask, n)
    stat = (stats_aux.SoftTargetsAux if return_aux else stats.SoftTargets)(v)
    outs = _heads.walk(impl, stat, plan, ((h, k, b),), stats.Rows(None, counted, temp),
                       {"targets": t.reshape(n, local), "weight": w})
    losses = outs[0] if return_aux else outs
    loss = _heads.reduce(losses.reshape(batch_shape), counted, reduction, token_axis_name)
    if not return_aux:
        return loss
    lse, arg = outs[1], outs[2]
    z = jnp.where(counted, opts.z_loss * jnp.square(lse), 0.0)
    return loss, tuple(a.reshape(batch_shape) for a in (lse, z, arg))


token_log_probs.__doc__ = (token_log_probs.__doc__ or "").replace("{shift}", _shift.DOC)
linear_log_probs.__doc__ = (linear_log_probs.__doc__ or "").replace(
    "{shift}", _shift.DOC).replace("{capacity}", _compact.DOC)
linear_soft_cross_entropy.__doc__ = (linear_soft_cross_entropy.__doc__ or "").replace(
    "{capacity}", _compact.DOC)
