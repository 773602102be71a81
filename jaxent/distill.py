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

from jaxent import _checks, _compact, _heads, _rowmath, _shift
from jaxent._options import Impl, KernelLayout, Options, Reduction
from jaxent.impl import stats, stats_aux
from jaxent.impl import topk as _topk

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


_DOC_SPARSE = r"""
    **Sparse teacher.** ``teacher_topk=(ids, log_probs)`` (each ``[..., k]``, the tokens'
    shape plus ``k``; e.g. from :func:`jaxent.linear_topk_log_probs`) stands for the
    teacher's logits: the divergence is taken over ``k + 1`` bins, the teacher's ``k`` ids
    and one *tail* bin with the mass outside them,

    .. math::
        \log p_\mathrm{tail} = \log\sum_{c \notin \mathrm{ids}} e^{z^s_c / T}
          - \log\sum_c e^{z^s_c / T},\qquad
        \log q_\mathrm{tail} = \texttt{teacher\_tail}\ \text{or}\
          \log\max\Big(0,\ 1 - \sum_j e^{\log q_j}\Big),

    with the same formulas as above summed over the bins (``0 log 0 = 0``; a teacher tail
    of ``-inf`` drops the bin from ``kl``). With ``k = V`` there is no tail bin and the loss
    equals the dense one. ``temperature`` divides the student's logits only: the teacher's
    log-probabilities are used as given. The ids must be distinct in each counted row and
    in ``[0, V)``: concrete ids that are not raise ``ValueError`` naming ``teacher_topk``;
    under ``jit`` such rows are ``nan``."""


def _sparse_teacher(teacher_topk, teacher_tail, batch_shape, v: int, mask, acc,
                    vocab_parallel: bool = False):
    """``(k, ids [N, k] int32 (-1 on invalid rows), lq [N, k], lqt [N])`` of a sparse
    teacher, validated."""
    ids, lq = teacher_pair(teacher_topk)
    ids, lq = jnp.asarray(ids), _checks.float_array(lq, "teacher_topk log_probs")
    shape = tuple(batch_shape)
    if ids.ndim != len(shape) + 1 or tuple(ids.shape[:-1]) != shape:
        raise ValueError(f"`teacher_topk` ids must have shape {shape} + (k,) (the tokens' "
                         f"shape plus k), got shape {tuple(ids.shape)}")
    k = ids.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"`teacher_topk` must hold k in [1, V] = [1, {v}] ids per token, "
                         f"got k = {k}")
    ids = _checks.int_labels(ids, shape + (k,), "teacher_topk ids", what="the tokens' "
                             "shape plus k")
    _checks.expect_shape(lq, shape + (k,), "teacher_topk log_probs",
                         f"the ids' shape {shape + (k,)}")
    full = None if mask is None else jnp.broadcast_to(mask[..., None], ids.shape)
    if not vocab_parallel:  # (inside shard_map ids are not checked: bad rows give nan)
        ids = _checks.token_values(ids, v, full, "teacher_topk ids")
    dup = _checks.distinct_ids(ids, mask, "teacher_topk ids")
    ids = _rowmath.class_ids(ids, v)
    ids = jnp.where(dup[..., None], -1, ids).reshape(-1, k)
    lq = jax.lax.stop_gradient(lq.astype(acc)).reshape(-1, k)
    if teacher_tail is None:
        mass = jnp.minimum(jnp.exp(lq).sum(1), 1.0)
        lqt = jnp.log1p(-mass)
    else:
        lqt = _checks.float_array(teacher_tail, "teacher_tail")
        _checks.expect_shape(lqt, shape, "teacher_tail", "the tokens' shape")
        lqt = jax.lax.stop_gradient(lqt.astype(acc)).reshape(-1)
    return k, ids, lq, lqt


def _which_teacher(dense: dict, teacher_topk, teacher_tail) -> bool:
    """Whether the teacher is sparse; exactly one of the dense arrays (``dense``: name ->
    value) and ``teacher_topk`` must be given."""
    given = [n for n, a in dense.items() if a is not None]
    names = " and ".join(f"`{n}`" for n in dense)
    if teacher_topk is not None and given:
        raise ValueError(f"pass either a dense teacher ({names}) or a sparse one "
                         f"(`teacher_topk`), not both; got {', '.join(given)} too")
    if teacher_topk is None:
        if teacher_tail is not None:
            raise ValueError("`teacher_tail` goes with a sparse teacher: pass `teacher_topk`")
        missing = [n for n, a in dense.items() if a is None]
        if missing:
            raise ValueError(f"pass a teacher: {names} (dense) or `teacher_topk` (sparse); "
                             f"{', '.join(missing)} missing")
    return teacher_topk is not None




def _run_sparse(kind: str, beta: float, plan, stream_, batch_shape, mask, temp,
                teacher_topk, teacher_tail, v: int, acc, impl: str | None = None):
    """Per-row losses of a student stream against a sparse teacher (``impl``: the
    implementation of a linear-head stream, :func:`jaxent._heads.walk`; None: the
    vocabulary walk)."""
    k, ids, lq, lqt = _sparse_teacher(teacher_topk, teacher_tail, batch_shape, v, mask, acc,
                                      plan.vocab_axis is not None)
    n = lq.shape[0]
    rows = _topk.SupportRows(ids, _heads.counted(mask, n), temp, lq, lqt)
    stat = _topk.SparseTeacher(kind, k, beta, k < v)
    if impl is None:
        return _heads.run(stat, plan, (stream_,), rows, {})
    return _heads.walk(impl, stat, plan, (stream_,), rows, {})


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike | None = None,
    *,
    teacher_topk: tuple[ArrayLike, ArrayLike] | None = None,
    teacher_tail: ArrayLike | None = None,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    temperature: float | ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    labels: ArrayLike | None = None,
    reduction: Reduction = "mean",
    shift: int = 0,
):
    r"""Per-token divergence between a student's and a teacher's softmax distributions.
    {doc}

    Args:
      student_logits: float ``[..., V, ...]``, classes along ``axis``.
      teacher_logits: float, same shape (any float dtype); or None with ``teacher_topk``.
      teacher_topk: a sparse teacher instead of ``teacher_logits``: ``(ids, log_probs)``,
        integer and float ``[..., k]`` (the tokens' shape plus ``k``, for any ``axis``).
      teacher_tail: optional float ``[...]``, the sparse teacher's log-mass outside its
        ``k`` ids (default: ``log(1 - sum exp(log_probs))``, clipped at ``-inf``).
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
      reduction: ``"mean"`` (over counted tokens; 0.0 when none is counted; with
        ``shift=1`` the last positions are not counted), ``"sum"`` or ``"none"`` (tokens'
        shape, 0 where not counted).
{shift} Here the labels (and ``where``) only mask: position ``t`` counts when
        label ``t+1`` is not ignored and ``where[..., t+1]``; both models' distributions
        at ``t`` are compared as they are (they predict token ``t+1``).

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
    sparse = _which_teacher({"teacher_logits": teacher_logits}, teacher_topk, teacher_tail)
    xs = _checks.float_array(student_logits, "student_logits")
    if teacher_logits is not None:
        xt = _checks.float_array(teacher_logits, "teacher_logits")
        _checks.expect_shape(xt, xs.shape, "teacher_logits", "the student_logits' shape")
    ax = _checks.normalize_axis(axis, xs.ndim)
    v = _checks.num_classes(xs, ax, "student_logits")
    batch_shape = xs.shape[:ax] + xs.shape[ax + 1:]
    if labels is None and ignore_index is not None:
        raise ValueError("`ignore_index` masks tokens through `labels`; pass `labels` too")
    mask = _distill_mask(labels, -100 if ignore_index is None else ignore_index, where,
                         batch_shape)
    mask = _shift.mask(shift, mask, batch_shape, "the tokens (logits without `axis`)")
    acc = _rowmath.compute_dtype(xs.dtype)
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    rs = _heads.rows(xs, ax)
    n = rs.shape[0]
    counted = _heads.counted(mask, n)
    if sparse:
        plan = _heads.plan(Options(temperature=temp_s), v, v, n, max(v, 1))
        losses = _run_sparse(kind, b, plan, (rs,), batch_shape, mask, temp, teacher_topk,
                             teacher_tail, v, acc)
        return _heads.reduce(losses.reshape(batch_shape), counted, reduction)
    rt = jax.lax.stop_gradient(_heads.rows(xt, ax))
    plan = _heads.plan(Options(temperature=temp_s), v, v, n, max(v, 1), streams=2)
    losses = _heads.run(stats.Distill(kind, b), plan, ((rs,), (rt,)),
                  stats.Rows(None, counted, temp), {})
    return _heads.reduce(losses.reshape(batch_shape), counted, reduction)


def linear_distillation_loss(
    student_hidden: ArrayLike,
    student_kernel: ArrayLike,
    teacher_hidden: ArrayLike | None = None,
    teacher_kernel: ArrayLike | None = None,
    *,
    teacher_topk: tuple[ArrayLike, ArrayLike] | None = None,
    teacher_tail: ArrayLike | None = None,
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
    token_block_size: int | None = None,
    interpret: bool = False,
    shift: int = 0,
    capacity: int | None = None,
    return_aux: bool = False,
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
      teacher_hidden: float ``[..., Dt]`` with the student's leading shape (or None with
        ``teacher_topk``).
      teacher_kernel: float ``[Dt, V]`` or ``[V, Dt]`` (same ``kernel_layout``).
      teacher_topk: a sparse teacher instead of ``teacher_hidden``/``teacher_kernel``:
        ``(ids, log_probs)``, integer and float ``student_hidden.shape[:-1] + (k,)``.
      teacher_tail: optional float ``student_hidden.shape[:-1]``: the sparse teacher's
        tail log-mass (default ``log(1 - sum exp(log_probs))``, clipped).
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
      impl: ``"auto"``, ``"xla"``, ``"vocab"``, ``"token"`` or ``"pallas"``, as in
        :func:`linear_log_probs`.
      vocab_size: the number of real classes when both kernels hold padding columns after
        them, as in :func:`linear_log_probs`.
      token_block_size: ``impl="token"``: tokens per block.
      interpret: with ``impl="pallas"``, run the kernels in Pallas's interpret mode.
{shift} As in :func:`distillation_loss` (the labels only mask).
{capacity}
      return_aux: also return a dict of per-token extras from the same pass, shaped like
        the tokens and carrying no gradient, with :func:`jaxent.linear_cross_entropy`'s
        names: ``"lse"`` (log-sum-exp of the student's ``z``), ``"argmax"`` (the student's
        first class of largest logit, int32) and ``"teacher_argmax"`` (the teacher's);
        with ``capacity``, 0 on rows not counted. Every ``impl`` serves it; a sparse
        teacher (``teacher_topk``) does not.

    Returns:
      float32 scalar, or ``student_hidden.shape[:-1]`` for ``"none"``; with
      ``return_aux=True`` the pair ``(loss, aux)``. Gradients flow to the student's hidden,
      kernel and bias only.

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
      >>> keep = jnp.array([True, False, True, False, False, True])
      >>> compact = jaxent.linear_distillation_loss(hs, ws, ht, wt, where=keep, capacity=3)
      >>> ref = jaxent.distillation_loss(hs @ ws, ht @ wt, where=keep)
      >>> bool(jnp.allclose(compact, ref, rtol=1e-5))
      True
    """
    _heads.check_impl(impl)
    ids, lq = teacher_pair(teacher_topk)
    if ids is not None and jnp.ndim(student_kernel) == 2:
        # checked here too: a placement on a mesh traces the ids before the head checks them
        v = vocab_size or jnp.shape(student_kernel)[1 if kernel_layout == "dv" else 0]
        shape = tuple(jnp.shape(student_hidden)[:-1])
        _sparse_teacher(teacher_topk, teacher_tail, shape, v,
                        _distill_mask(labels, ignore_index, where, shape), jnp.float32)
    cap = _compact.check(capacity)
    if shift or cap is not None:  # labels, where -> one mask of counted tokens
        labels, where = _counted_tokens(student_hidden, labels, ignore_index, where, shift)
        ignore_index = -100
    arrays = {"student_hidden": student_hidden, "student_kernel": student_kernel,
              "teacher_hidden": teacher_hidden, "teacher_kernel": teacher_kernel,
              "student_bias": student_bias, "teacher_bias": teacher_bias, "labels": labels,
              "where": where, "teacher_ids": ids, "teacher_log_probs": lq,
              "teacher_tail": teacher_tail}
    static = {"divergence": divergence, "beta": beta, "kernel_layout": kernel_layout,
              "ignore_index": ignore_index, "reduction": reduction, "block_size": block_size,
              "vocab_size": vocab_size, "impl": impl, "token_block_size": token_block_size,
              "interpret": bool(interpret), "return_aux": bool(return_aux)}
    names = DISTILL_AUX if return_aux else None
    if cap is not None:
        return _heads.aux_dict(_compact.head(fused_distillation_loss, cap, where, arrays,
                                             static, temperature, "linear_distillation_loss"),
                               names)
    out = "row" if reduction == "none" else "replicated"
    return _heads.aux_dict(_heads.place(
        fused_distillation_loss, _distill_shard, arrays, static, temperature, impl,
        (out, ("row",) * len(DISTILL_AUX)) if return_aux else out), names)


# The names of linear_distillation_loss's aux, in the order fused_distillation_loss gives it.
DISTILL_AUX = ("lse", "argmax", "teacher_argmax")


def _counted_tokens(student_hidden, labels, ignore_index, where, shift):
    """``(None, mask)``: the tokens counted by ``labels``/``ignore_index`` and ``where``,
    shifted by ``shift`` (all True when nothing masks and nothing shifts)."""
    batch_shape = jnp.shape(student_hidden)[:-1]
    if labels is None and ignore_index != -100:
        raise ValueError("`ignore_index` masks tokens through `labels`; pass `labels` too")
    mask = _distill_mask(labels, ignore_index, where, batch_shape)
    mask = _shift.mask(shift, mask, batch_shape, "student_hidden.shape[:-1]")
    return None, jnp.ones(batch_shape, bool) if mask is None else mask


def _distill_shard(vocab, tok, **kw):
    return fused_distillation_loss(**kw, axis_name=vocab, token_axis_name=tok)


def teacher_pair(teacher_topk):
    """``(ids, log_probs)`` of ``teacher_topk`` (None: ``(None, None)``)."""
    if teacher_topk is None:
        return None, None
    if not (isinstance(teacher_topk, tuple | list) and len(teacher_topk) == 2):
        raise TypeError("`teacher_topk` must be a pair (ids, log_probs) of arrays shaped "
                        f"like the tokens plus k, got {type(teacher_topk).__name__}")
    return tuple(teacher_topk)


def fused_distillation_loss(student_hidden, student_kernel, teacher_hidden, teacher_kernel, *,
                            divergence, beta, temperature, student_bias, teacher_bias,
                            kernel_layout, labels, ignore_index, where, reduction,
                            block_size, vocab_size=None, impl="auto",
                            token_block_size=None, interpret=False, return_aux=False,
                            axis_name=None, token_axis_name=None, teacher_ids=None,
                            teacher_log_probs=None, teacher_tail=None):
    """:func:`linear_distillation_loss`, vocabulary-parallel over ``axis_name`` when given
    (a sparse teacher as ``teacher_ids`` and ``teacher_log_probs``); with ``return_aux``
    the pair ``(loss, aux)``, the aux a tuple in :data:`DISTILL_AUX`'s order."""
    kind, b = _divergence(divergence, beta)
    _heads.check_reduction(reduction)
    topk = None if teacher_ids is None and teacher_log_probs is None else (
        teacher_ids, teacher_log_probs)
    sparse = _which_teacher({"teacher_hidden": teacher_hidden,
                             "teacher_kernel": teacher_kernel}, topk, teacher_tail)
    if sparse and teacher_bias is not None:
        raise ValueError("`teacher_bias` belongs to a dense teacher head; a sparse teacher "
                         "(`teacher_topk`) has none")
    if labels is None and ignore_index != -100:
        raise ValueError("`ignore_index` masks tokens through `labels`; pass `labels` too")
    hs, ks, bs, local, v = _heads.head(student_hidden, student_kernel, student_bias, kernel_layout,
                                 ("student_hidden", "student_kernel", "student_bias"),
                                 axis_name)
    if sparse:
        if return_aux:
            raise ValueError("`return_aux` is served with a dense teacher (`teacher_hidden`, "
                             "`teacher_kernel`), not with a sparse one (`teacher_topk`)")
        v = _heads.vocab(vocab_size, v, "student_kernel")
        batch_shape = tuple(jnp.shape(student_hidden)[:-1])
        mask = _distill_mask(labels, ignore_index, where, batch_shape)
        acc = _rowmath.compute_dtype(hs.dtype)
        temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
        n = hs.shape[0]
        plan = _heads.plan(Options(temperature=temp_s), v, local, n, block_size,
                           kernel_layout, axis_name, token_block_size=token_block_size,
                           interpret=interpret)
        losses = _run_sparse(kind, b, plan, (hs, ks, bs), batch_shape, mask, temp, topk,
                             teacher_tail, v, acc, impl)
        return _heads.reduce(losses.reshape(batch_shape), _heads.counted(mask, n), reduction,
                             token_axis_name)
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
                       axis_name, streams=2, token_block_size=token_block_size,
                       interpret=interpret)
    counted = _heads.counted(mask, n)
    stat = (stats_aux.DistillAux if return_aux else stats.Distill)(kind, b)
    outs = _heads.walk(impl, stat, plan, ((hs, ks, bs), jax.lax.stop_gradient((ht, kt, bt))),
                       stats.Rows(None, counted, temp), {})
    losses = outs[0] if return_aux else outs
    loss = _heads.reduce(losses.reshape(batch_shape), counted, reduction, token_axis_name)
    if not return_aux:
        return loss
    return loss, tuple(a.reshape(batch_shape) for a in outs[1:])


distillation_loss.__doc__ = (distillation_loss.__doc__ or "").replace(
    "{doc}", _DOC_DIVERGENCE + "\n" + _DOC_SPARSE)
linear_distillation_loss.__doc__ = (linear_distillation_loss.__doc__ or "").replace(
    "{doc}", _DOC_DIVERGENCE + "\n" + _DOC_SPARSE).replace("{capacity}", _compact.DOC)
for _f in (distillation_loss, linear_distillation_loss):
    _f.__doc__ = (_f.__doc__ or "").replace("{shift}", _shift.DOC)
