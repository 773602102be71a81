"""The public losses: cross-entropy with integer labels or probability targets, NLL, binary.

All functions are pure and compose with ``jax.jit``, ``jax.vmap`` and ``jax.grad``. They follow
PyTorch's ``torch.nn.functional`` semantics (``weight``, ``ignore_index``,
``label_smoothing``, ``reduction``) with one deliberate difference: a ``"mean"`` over zero
counted elements is ``0.0`` with zero gradient, where PyTorch returns ``nan``, so that a fully
padded micro-batch cannot poison training.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxent import _checks, _platform, _shift
from jaxent import _rowmath as rm
from jaxent._options import Options, Reduction, Residual
from jaxent.impl import Request, select
from jaxent.impl import pallas as _pallas
from jaxent.impl import rows as _impl_rows


def _rows(logits: jax.Array, axis: int) -> jax.Array:
    """Move the class axis last and flatten the rest: ``[..., C] -> [N, C]``."""
    x = jnp.moveaxis(logits, axis, -1)
    return x.reshape(-1, x.shape[-1])


def _loss_dtype(dtype) -> jnp.dtype:
    return rm.compute_dtype(dtype)


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | ArrayLike = 1.0,
    residual: Residual = "auto",
    impl: Literal["auto", "xla", "pallas"] = "auto",
    interpret: bool = False,
    shift: int = 0,
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels (``F.cross_entropy``).

    With :math:`z = \mathrm{cap}\,\tanh(x / (T\,\mathrm{cap}))` (the cap optional),
    :math:`\ell = \log\sum_c e^{z_c}`, class weights :math:`w`, smoothing :math:`\epsilon`
    and :math:`C` classes, each counted element contributes

    .. math::
        (1-\epsilon)\, w_y (\ell - z_y) + \frac{\epsilon}{C} \sum_c w_c (\ell - z_c)
        + \lambda_z \ell^2 .

    ``"mean"`` divides the sum by :math:`\sum w_y` over counted elements (PyTorch).
    Gradients are hand-written (``jax.custom_vjp``); see ``residual``.

    Args:
      logits: float array ``[..., C, ...]``, classes along ``axis``; bf16/f16 are
        accumulated in float32.
      labels: integer array, ``logits.shape`` without ``axis``.
      axis: the class axis; PyTorch's ``(N, C, d1, ..., dk)`` layout is ``axis=1``.
      weight: optional per-class weights ``[C]`` (treated as constants).
      ignore_index: label value that counts for nothing (may be a valid class id).
      label_smoothing: in ``[0, 1]``, PyTorch's definition including ``weight``.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape of ``labels``); with
        ``shift=1`` the mean's count leaves out the last positions.
      where: optional boolean mask shaped like ``labels``; ``False`` is excluded like
        an ignored label.
      z_loss: coefficient of ``logsumexp(z)**2`` per counted element (PaLM).
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)`` (Gemma 2).
      temperature: logits are divided by it before everything else: a number, or an array
        broadcastable to ``labels.shape`` (one temperature per row, e.g. per sequence; a
        constant, no gradient). Values must be finite and > 0: concrete ones that are not
        raise ``ValueError``, traced ones give ``nan`` losses on their rows.
      residual: what the forward keeps for the backward when differentiated: ``"grad"``,
        the gradient, made in the forward with one ``exp`` per logit (the backward only
        scales it, which XLA fuses); ``"lse"``, two floats per row (the backward recomputes
        ``exp``). ``"auto"`` (default) picks per platform, dtype and shape
        (:func:`jaxent.impl.rows.uses_lse`). Values and gradients are the same; neither
        keeps a logits-sized temporary besides the gradient. Use ``"lse"`` when the
        backward runs much later than the forward (e.g. under ``jax.checkpoint``).
      impl: ``"auto"`` (the platform's choice), ``"xla"`` or ``"pallas"`` (Pallas
        kernels: Triton on NVIDIA GPUs, Mosaic on TPUs).
      interpret: with ``impl="pallas"``, run the kernels in Pallas's interpret mode (on the
        CPU; without it a CPU program raises ``ValueError`` when compiled).
{shift}

    Returns:
      float32 (float64 for float64 logits) scalar, or ``labels.shape`` for ``"none"``.
      Labels outside ``[0, C)`` raise ``ValueError`` when concrete; under ``jit`` their
      losses are ``nan`` (and ``jax.experimental.checkify`` reports them).

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> logits = jnp.array([[0.5, 0.2, 0.3], [0.1, 0.8, 0.1]])
      >>> round(float(jaxent.cross_entropy(logits, jnp.array([0, 1]))), 4)
      0.8148
      >>> round(float(jaxent.cross_entropy(jnp.array([[2.0, 1.0, 0.1]]), jnp.array([0]))), 4)
      0.417
      >>> x = jnp.array([[1.5, 0.3, 2.1], [2.0, 1.0, 0.1], [0.1, 2.2, 1.0]])
      >>> y = jnp.array([2, 0, 1])
      >>> round(float(jaxent.cross_entropy(x, y)), 4)
      0.4364
      >>> round(float(jaxent.cross_entropy(x, y, weight=jnp.array([1.0, 2.0, 3.0]))), 4)
      0.4567

      A causal LM's next-token loss, ``logits [B, T, C]`` against the input ids
      ``[B, T]``, without slicing the logits:

      >>> seq = jnp.array([[2, 0, 1]])
      >>> shifted = jaxent.cross_entropy(x[None], seq, shift=1)
      >>> bool(jnp.allclose(shifted, jaxent.cross_entropy(x[None, :-1], seq[:, 1:])))
      True

    References:
      PyTorch ``torch.nn.CrossEntropyLoss``:
      https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html
    """
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    temp_s, temp = _checks.temperature_array(temperature, batch_shape, _loss_dtype(x.dtype))
    opts = _checks.options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temp_s, logit_softcap=logit_softcap, residual=residual,
        ignore_index=ignore_index,
    )
    c = _checks.num_classes(x, ax)
    y = _checks.int_labels(labels, batch_shape, logits_shape=x.shape, axis=ax)
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, c)
    y = _checks.label_values(y, c, ignore_index, mask)
    y, mask = _shift.labels(shift, y, mask)
    if not isinstance(impl, str):
        raise TypeError(f"`impl` must be a string, got {impl!r}")
    name = select(impl, Request("ce", x.dtype, opts.reduction,
                                static_tokens=all(isinstance(s, int) for s in x.shape),
                                row_temperature=temp is not None))
    return _labels_loss(x, y, w, mask, temp, ax, opts, name, bool(interpret))


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _labels_loss(x, y, w, mask, temp, ax, opts: Options, impl: str, interpret: bool):
    acc = _loss_dtype(x.dtype)
    w = None if w is None else w.astype(acc)
    lab = rm.labels_info(y, x.shape[ax], opts.ignore_index, mask, w, acc, temp)
    if impl == "pallas":
        losses = rm.row_losses(_pallas.dispatch_ce_rows(
            _rows(x, ax), rm.kernel_labels(lab), lab.row_w, lab.counted, w, opts=opts,
            interpret=interpret), lab)
    else:  # the residual is chosen for the lowering's platform
        losses = _platform.by_platform(functools.partial(_impl_rows.label_rows, opts=opts),
                                       _rows(x, ax), lab, w)
    return rm.reduce(losses.reshape(y.shape), lab.row_w.sum(), opts.reduction,
                     lab.counted.sum())


cross_entropy.__doc__ = (cross_entropy.__doc__ or "").replace("{shift}", _shift.DOC)


def soft_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    axis: int = -1,
    weight: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | ArrayLike = 1.0,
    residual: Residual = "auto",
) -> jax.Array:
    r"""Softmax cross-entropy with probability targets (one-hot or soft).

    With the smoothed targets :math:`t' = (1-\epsilon) t + \epsilon / C` and the notation of
    :func:`cross_entropy`, each counted element contributes

    .. math:: \sum_c w_c t'_c (\ell - z_c) + \lambda_z \ell^2,

    with :math:`0 \cdot \log 0 = 0`: a class with no target mass contributes nothing even at a
    ``-inf`` logit. ``"mean"`` divides by the number of counted elements (PyTorch, also
    with ``weight``). Differentiable in ``logits`` and in ``targets`` (distillation).

    Args:
      logits: float array ``[..., C, ...]``, classes along ``axis``.
      targets: float array, same shape as ``logits``; each slice along ``axis`` is a
        distribution (not checked, as in PyTorch).
      axis: the class axis, as in :func:`cross_entropy`.
      weight: optional per-class weights ``[C]``; ``"mean"`` still divides by the number of
        counted elements (PyTorch).
      label_smoothing: in ``[0, 1]``; the targets become ``(1 - eps) * t + eps / C``.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      where: optional boolean mask shaped like ``logits`` without ``axis``.
      z_loss: as in :func:`cross_entropy`.
      logit_softcap: as in :func:`cross_entropy`.
      temperature: as in :func:`cross_entropy` (an array is broadcastable to
        ``logits.shape`` without ``axis``).
      residual: as in :func:`cross_entropy`.

    Returns:
      float32 scalar, or ``logits.shape`` without ``axis`` for ``"none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> logits = jnp.array([[2.0, 1.0, 0.1]])
      >>> onehot = jax.nn.one_hot(jnp.array([0]), 3)
      >>> round(float(jaxent.soft_cross_entropy(logits, onehot)), 4)
      0.417
      >>> teacher = jax.nn.softmax(jnp.array([[1.0, 3.0, 0.0]]) / 2.0)
      >>> round(float(jaxent.soft_cross_entropy(logits, teacher, temperature=2.0)), 4)
      1.1373
    """
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    temp_s, temp = _checks.temperature_array(
        temperature, x.shape[:ax] + x.shape[ax + 1 :], _loss_dtype(x.dtype))
    opts = _checks.options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temp_s, logit_softcap=logit_softcap, residual=residual,
    )
    t = jnp.asarray(targets)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise TypeError(
            f"`targets` must be floating-point probabilities, got dtype {t.dtype}; for integer "
            "class labels use jaxent.cross_entropy"
        )
    _checks.expect_shape(t, x.shape, "targets", "the same shape as logits")
    c = _checks.num_classes(x, ax)
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, c)
    return _targets_loss(x, t, w, mask, temp, ax, opts)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _targets_loss(x, t, w, mask, temp, ax, opts: Options):
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    rows = _rows(x, ax)
    w = None if w is None else w.astype(_loss_dtype(x.dtype))
    counted = jnp.ones(rows.shape[:1], bool) if mask is None else mask.reshape(-1)
    temp = None if temp is None else temp.reshape(-1)
    losses = _impl_rows.target_rows(rows, _rows(t, ax), counted, w, opts, temp)
    n = counted.sum()
    return rm.reduce(losses.reshape(batch_shape), n, opts.reduction, n)


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Negative log-likelihood of integer labels given log-probabilities (``F.nll_loss``).

    .. math:: -w_y \log p_y, \qquad \text{mean} = \frac{\sum -w_y \log p_y}{\sum w_y}

    Args:
      log_probs: float array ``[..., C, ...]`` (e.g. ``jax.nn.log_softmax``), classes
        along ``axis``.
      labels: integer array, ``log_probs.shape`` without ``axis``.
      axis: the class axis, as in :func:`cross_entropy`.
      weight: optional per-class weights ``[C]``, as in :func:`cross_entropy`.
      ignore_index: label value that counts for nothing.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      where: optional boolean mask shaped like ``labels``.

    Returns:
      A scalar, or ``labels.shape`` for ``"none"``, in the accumulation dtype.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> x = jnp.array([[1.5, 0.3, 2.1], [2.0, 1.0, 0.1], [0.1, 2.2, 1.0]])
      >>> y = jnp.array([2, 0, 1])
      >>> round(float(jaxent.nll_loss(jax.nn.log_softmax(x), y)), 4)
      0.4364
    """
    lp = _checks.float_array(log_probs, "log_probs")
    ax = _checks.normalize_axis(axis, lp.ndim, name="axis", array="log_probs")
    opts = _checks.options(reduction=reduction, ignore_index=ignore_index)
    c = _checks.num_classes(lp, ax, "log_probs")
    batch_shape = lp.shape[:ax] + lp.shape[ax + 1 :]
    y = _checks.int_labels(
        labels, batch_shape, logits_shape=lp.shape, axis=ax,
        soft="jaxent.soft_cross_entropy on the logits (or -(targets * log_probs).sum(axis) "
             "on log-probabilities)")
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, c)
    y = _checks.label_values(y, c, ignore_index, mask)
    return _nll(lp, y, w, mask, ax, opts)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _nll(lp, y, w, mask, ax, opts: Options):
    dtype = _loss_dtype(lp.dtype)
    w = None if w is None else w.astype(dtype)
    lab = rm.labels_info(y, lp.shape[ax], opts.ignore_index, mask, w, dtype)
    picked = _impl_rows.picked_log_probs(_rows(lp, ax), lab.y)
    # Select, never multiply, so that -inf log-probabilities of ignored rows stay out.
    losses = rm.row_losses(-lab.row_w * picked, lab)
    return rm.reduce(losses.reshape(y.shape), lab.row_w.sum(), opts.reduction,
                     lab.counted.sum())


def binary_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Sigmoid binary cross-entropy on logits (``F.binary_cross_entropy_with_logits``).

    With :math:`\sigma` the sigmoid, target :math:`t \in [0, 1]`, positive-class weight
    :math:`p` and element weight :math:`w`:

    .. math:: -w \left[p\, t \log \sigma(x) + (1 - t) \log (1 - \sigma(x))\right],

    computed as :math:`w[(1-t)x + (1 + (p - 1)t)\,\mathrm{softplus}(-x)]`, finite for any
    finite ``x``. ``"mean"`` averages over the counted elements.

    Args:
      logits: float array of any shape.
      targets: float array, same shape, values in ``[0, 1]``.
      weight: optional weights broadcastable to ``logits``.
      pos_weight: optional weights of positive examples, broadcastable to ``logits`` (one
        per class along the last axis, as in PyTorch).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      where: optional boolean mask shaped like ``logits``.

    Returns:
      float32 scalar, or ``logits.shape`` for ``"none"``.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> x = jnp.array([0.8, -1.2, 2.5])
      >>> t = jnp.array([1.0, 0.0, 1.0])
      >>> round(float(jaxent.binary_cross_entropy(x, t)), 4)
      0.2378
    """
    x = _checks.float_array(logits, "logits")
    opts = _checks.options(reduction=reduction)
    t = _checks.float_array(targets, "targets")
    _checks.expect_shape(t, x.shape, "targets", "the same shape as logits")
    mask = _checks.where_mask(where, x.shape)
    pw = None if pos_weight is None else _broadcastable(pos_weight, x.shape, "pos_weight")
    w = None if weight is None else _broadcastable(weight, x.shape, "weight")
    return _binary(x, t, w, pw, mask, opts.reduction)


@functools.partial(jax.jit, static_argnums=(5,))
def _binary(x, t, w, pw, mask, reduction):
    dtype = _loss_dtype(x.dtype)
    x, t = x.astype(dtype), t.astype(dtype)
    softplus_neg = jax.nn.softplus(-x)
    if pw is None:
        losses = (1.0 - t) * x + softplus_neg
    else:
        losses = (1.0 - t) * x + (1.0 + (pw.astype(dtype) - 1.0) * t) * softplus_neg
    if w is not None:
        losses = losses * w.astype(dtype)
    if mask is None:
        return rm.reduce(losses, jnp.asarray(losses.size, dtype), reduction)
    losses = jnp.where(mask, losses, 0.0)
    return rm.reduce(losses, mask.sum(), reduction)


def _broadcastable(value: ArrayLike, shape: tuple[int, ...], name: str) -> jax.Array:
    arr = _checks.float_array(value, name)
    try:
        ok = jnp.broadcast_shapes(arr.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"`{name}` must be broadcastable to the logits' shape {shape}, got shape {arr.shape}"
        )
    return jnp.broadcast_to(arr, shape)
