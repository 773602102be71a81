r"""Vocabulary-parallel cross-entropy over a mesh axis, with JAX's own SPMD machinery.

When the output layer is sharded along the vocabulary, each device holds ``C / k`` of the
classes (``k`` devices along the mesh axis ``axis_name``). The losses here give the numbers
of :func:`jaxent.cross_entropy` and :func:`jaxent.linear_cross_entropy` on the full
vocabulary while every device only ever touches its own slice: per row, each shard computes
local statistics of its transformed logits ``z`` (``m_i = max z``,
``log s_i = log sum exp(z - m_i)``, the label's logit when the label falls in its range,
``sum_c w_c (z_c - m_i)`` for label smoothing) and one collective round combines them:

.. math::
    m = \max_i m_i \;(\texttt{pmax}),\qquad
    \log s = \log \textstyle\sum_i e^{m_i + \log s_i - m} \;(\texttt{psum}),\qquad
    z_y = \textstyle\sum_i z_y^{(i)} \;(\texttt{psum}),

then the loss is the row math's (:mod:`jaxent._rowmath`), with label smoothing over the *full*
vocabulary (PyTorch's definition, not a per-shard one). The backward needs no collective for
the logits: each shard writes ``d loss / d z_c`` for its own classes from the global
``lse = m + log s``; the fused linear version adds one ``psum`` of ``d hidden`` (``[N, D]``)
over the vocabulary axis, and ``d kernel`` stays local. No ``[N, C]`` array is gathered.

Three ways in:

* :func:`cross_entropy` and :func:`linear_cross_entropy` are called *inside* the user's
  ``jax.shard_map`` on local blocks, given the vocabulary ``axis_name`` (and, when tokens are
  sharded too, ``token_axis_name`` so that ``"mean"``/``"sum"`` are global);
* :func:`shard_cross_entropy` and :func:`shard_linear_cross_entropy` take global arrays, a
  ``mesh`` and the axis names, and wrap ``jax.shard_map`` themselves;
* :func:`jaxent.linear_cross_entropy` itself, on arrays whose types carry their sharding
  (a mesh with ``AxisType.Explicit`` axes), reads the split from them
  (:mod:`jaxent.placement.explicit`); on a mesh with ``AxisType.Auto`` axes (shardings
  unknown until compiled) it hands its walks to ``jax.experimental.custom_partitioning``
  calls that the partitioner splits the same way at compile time
  (:mod:`jaxent.placement.auto`).

The RL and distillation heads have the same vocabulary-parallel form, called inside
``jax.shard_map`` with ``axis_name``: :func:`linear_log_probs`,
:func:`linear_soft_cross_entropy`, :func:`linear_distillation_loss` (dense or sparse
teacher), :func:`linear_topk_log_probs` (each shard's top-k candidates gathered and selected
again) and :func:`linear_support_log_probs` (the sampler's support found across shards).

Labels are global class ids, replicated along the vocabulary axis; a label belongs to the
shard whose range ``[i C/k, (i + 1) C/k)`` contains it. Class weights are the full ``[C]``
vector (small), replicated; each shard reads its slice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxent import _checks
from jaxent import _rowmath as rm
from jaxent._options import KernelLayout, Reduction
from jaxent._sharded_rl import linear_distillation_loss as linear_distillation_loss
from jaxent._sharded_rl import linear_log_probs as linear_log_probs
from jaxent._sharded_rl import linear_soft_cross_entropy as linear_soft_cross_entropy
from jaxent._sharded_topk import linear_topk_log_probs as linear_topk_log_probs
from jaxent.impl import rows as _rows
from jaxent.linear import validate as _validate_fused
from jaxent.placement import explicit as _explicit
from jaxent.placement.local import fused_call, reduce_rows
from jaxent.support import sharded_linear_support_log_probs as linear_support_log_probs

AxisName = Hashable  # a mesh axis name, or a tuple of them

__all__ = ["cross_entropy", "linear_cross_entropy", "linear_distillation_loss",
           "linear_log_probs", "linear_soft_cross_entropy", "linear_support_log_probs",
           "linear_topk_log_probs",
           "shard_cross_entropy", "shard_linear_cross_entropy"]


def _vocab_size(local: int, axis_name: AxisName) -> int:
    return local * lax.axis_size(axis_name)


def _real_vocab(vocab_size: int | None, columns: int) -> int:
    """The number of classes of a kernel with ``columns`` vocabulary columns, of which the
    ones from ``vocab_size`` on are padding."""
    if vocab_size is None:
        return columns
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive int or None, got {vocab_size!r}")
    if vocab_size > columns:
        raise ValueError(f"`vocab_size` ({vocab_size}) must be at most the kernel's "
                         f"vocabulary columns ({columns})")
    return vocab_size


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: AxisName,
    token_axis_name: AxisName | None = None,
    axis: int = -1,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | ArrayLike = 1.0,
) -> jax.Array:
    r"""Vocabulary-parallel :func:`jaxent.cross_entropy`, called inside ``jax.shard_map``.

    Each device passes its block of the logits, holding classes
    ``[i C/k, (i + 1) C/k)`` of the ``C`` classes, ``i`` its index along ``axis_name``
    (``k`` devices). The result equals :func:`jaxent.cross_entropy` on the full logits
    (same formula, label smoothing over all ``C`` classes):

    .. math::
        (1-\epsilon)\, w_y (\ell - z_y) + \frac{\epsilon}{C} \sum_c w_c (\ell - z_c)
        + \lambda_z \ell^2,

    with :math:`\ell` and :math:`z_y` combined across shards (``pmax``/``psum`` of ``[N]``
    row statistics). The backward is local to each shard.

    Use it in a ``shard_map`` with ``check_vma=True`` (the default): gradients through the
    token-axis ``psum`` of ``"mean"``/``"sum"`` rely on JAX's varying/invariant typing and
    are wrong under ``check_vma=False``.

    Args:
      logits: this device's float block ``[..., C/k, ...]``, classes along ``axis``.
      labels: integer global class ids, ``logits.shape`` without ``axis`` (the same on every
        shard of ``axis_name``).
      axis_name: the mesh axis (or tuple of axes) the classes are sharded over.
      token_axis_name: the mesh axis (or axes) the tokens are sharded over, if any; then
        ``"mean"`` and ``"sum"`` are over all tokens (``psum``), as on one device.
      axis: the class axis of the block.
      weight: optional full per-class weights ``[C]`` (replicated; each shard reads its slice).
      ignore_index, label_smoothing, reduction, where, z_loss, logit_softcap, temperature:
        as in :func:`jaxent.cross_entropy`.

    Returns:
      A float32 scalar, the same on every device (global over ``token_axis_name``), or for
      ``"none"`` this device's per-element losses shaped like ``labels``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> from jax.sharding import PartitionSpec as P
      >>> from jax.sharding import AxisType
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
      >>> x = jnp.array([[1.5, 0.3, 2.1], [2.0, 1.0, 0.1], [0.1, 2.2, 1.0]])
      >>> y = jnp.array([2, 0, 1])
      >>> loss = jax.shard_map(
      ...     lambda x, y: jaxent.sharded.cross_entropy(x, y, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P())(x, y)
      >>> round(float(loss), 4)
      0.4364
    """
    _checks.disjoint_axes(axis_name, token_axis_name)
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    acc = rm.compute_dtype(x.dtype)
    temp_s, temp = _checks.temperature_array(temperature, batch_shape, acc)
    opts = _checks.options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temp_s, logit_softcap=logit_softcap, ignore_index=ignore_index,
    )
    c = _vocab_size(_checks.num_classes(x, ax), axis_name)
    y = _checks.int_labels(labels, batch_shape, logits_shape=x.shape, axis=ax)
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, c)
    y = _checks.label_values(y, c, ignore_index, mask)
    w = None if w is None else w.astype(acc)
    lab = rm.labels_info(y, c, ignore_index, mask, w, acc, temp)
    rows = jnp.moveaxis(x, ax, -1).reshape(-1, x.shape[ax])
    losses = _rows.label_rows_parallel(rows, lab, w, opts, axis_name)
    return reduce_rows(losses.reshape(batch_shape), lab, opts.reduction, token_axis_name)



def linear_cross_entropy(
    hidden: ArrayLike,
    kernel: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: AxisName,
    token_axis_name: AxisName | None = None,
    bias: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | ArrayLike = 1.0,
    kernel_layout: KernelLayout = "dv",
    block_size: int | None = None,
    return_aux: bool = False,
    vocab_size: int | None = None,
):
    r"""Vocabulary-parallel :func:`jaxent.linear_cross_entropy`, inside ``jax.shard_map``.

    Each device holds the columns ``[i V/k, (i + 1) V/k)`` of the kernel (``[D, V/k]``, or
    ``[V/k, D]`` with ``kernel_layout="vd"``) and of the bias, and the whole ``hidden`` of
    its tokens. The result equals :func:`jaxent.linear_cross_entropy` on the full kernel:

    .. math::
        (1-\epsilon)\, w_y (\ell - z_y) + \frac{\epsilon}{V} \sum_c w_c (\ell - z_c)
        + \lambda_z \ell^2,\qquad z = \mathrm{cap}\,\tanh\!\big((hW + b) / (T\,\mathrm{cap})\big).

    Each shard walks its ``V/k`` classes in blocks of ``block_size`` (extra memory
    ``O(N * block_size)``), the ``[N]`` row statistics are combined with ``pmax``/``psum``,
    and the backward recomputes the local blocks and sums ``d hidden [N, D]`` over
    ``axis_name`` (``psum``); ``d kernel`` and ``d bias`` stay local.
    No ``[N, V]`` array exists anywhere.

    Use it in a ``shard_map`` with ``check_vma=True`` (the default): the kernel gradient is
    summed over the token axis because the kernel is typed as replicated there, and the
    token-axis ``psum`` of the reduction is differentiated through that typing.

    Args:
      hidden: float ``[..., D]``, this device's tokens (the same on every shard of
        ``axis_name``).
      kernel: this device's float ``[D, V/k]`` (``"dv"``) or ``[V/k, D]`` (``"vd"``) block.
      labels: integer global class ids, ``hidden.shape[:-1]``.
      axis_name: the mesh axis (or tuple of axes) the vocabulary is sharded over.
      token_axis_name: the mesh axis (or axes) the tokens are sharded over, if any
        (``"mean"``/``"sum"`` are then over all tokens).
      bias: optional this device's ``[V/k]`` block.
      weight: optional full per-class weights ``[V]`` (replicated).
      ignore_index, label_smoothing, reduction, where, z_loss, logit_softcap, temperature,
        kernel_layout: as in :func:`jaxent.linear_cross_entropy`.
      block_size: local vocabulary columns per block. The default gives each of the ``k``
        shards ``1/k`` of the single-device block budget (:func:`jaxent.linear.
        auto_block_sizes` for ``k N`` rows), so per-device memory shrinks with ``k``.
      return_aux: also return :func:`jaxent.linear_cross_entropy`'s aux dict: this
        device's per-token ``"lse"``, ``"z_loss"`` and ``"argmax"`` (a global class id;
        ties go to the smallest, as on one device) and the ``"accuracy"`` over all tokens.
      vocab_size: the number of real classes when the vocabulary is padded to a multiple
        of the ``axis_name`` size (GPT-2's 50257 classes held as 50264 columns over 8
        shards): the kernel columns and bias entries from ``vocab_size`` on are padding,
        left out of the softmax, the smoothing and the argmax, with zero gradient, and
        ``weight`` has ``vocab_size`` entries. None: every column is a class.

    Returns:
      A float32 scalar, the same on every device, or for ``"none"`` this device's
      per-token losses shaped like ``labels``; with ``return_aux=True`` a pair
      ``(loss, aux)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> from jax.sharding import PartitionSpec as P
      >>> from jax.sharding import AxisType
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
      >>> h = jax.random.normal(jax.random.key(0), (6, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> y = jnp.array([1, 7, 49, 0, -100, 3])
      >>> loss = jax.shard_map(
      ...     lambda h, w, y: jaxent.sharded.linear_cross_entropy(h, w, y, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P())(h, w, y)
      >>> bool(jnp.allclose(loss, jaxent.cross_entropy(h @ w, y), rtol=1e-5))
      True
    """
    _checks.disjoint_axes(axis_name, token_axis_name)
    k = _checks.float_array(kernel, "kernel")
    if k.ndim != 2:
        raise ValueError(
            f"`kernel` must be 2-D, [D, V] for kernel_layout='dv' or [V, D] for 'vd', got "
            f"shape {tuple(k.shape)}")
    local = k.shape[1 if kernel_layout == "dv" else 0]
    columns = _vocab_size(local, axis_name)
    h, k, b, y, w, mask, temp, spec = _validate_fused(
        hidden, k, labels, bias=bias, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, where=where, z_loss=z_loss,
        logit_softcap=logit_softcap, temperature=temperature, kernel_layout=kernel_layout,
        block_size=block_size, token_block_size=None, impl="vocab", return_aux=return_aux,
        num_classes=_real_vocab(vocab_size, columns))
    if b is not None and b.shape != (local,):
        raise ValueError(f"`bias` must be this device's block, shape ({local},), got shape "
                         f"{tuple(b.shape)}")
    return fused_call(spec, h, k, b, y, w, mask, temp=temp, vocab_axis=axis_name,
                      token_axis=token_axis_name)


# ------------------------------------------------------------------- mesh-level wrappers


def _axis_size(mesh: Mesh, names: AxisName | None) -> int:
    if names is None:
        return 1
    names = names if isinstance(names, tuple) else (names,)
    for n in names:
        if n not in mesh.shape:
            raise ValueError(f"mesh axis {n!r} is not in the mesh's axes {tuple(mesh.shape)}")
    return math.prod(mesh.shape[n] for n in names)


def _divisible(size: int, mesh: Mesh, names: AxisName | None, what: str) -> None:
    k = _axis_size(mesh, names)
    if size % k:
        raise ValueError(f"{what} ({size}) must be divisible by the size of mesh axis "
                         f"{names!r} ({k})")


def _spec(ndim: int, **dims) -> P:
    """A PartitionSpec of rank ``ndim`` with the given ``{dim: axis}`` entries."""
    entries = [None] * ndim
    for d, name in dims.items():
        if d is not None:
            entries[int(d[1:])] = name
    return P(*entries)



def shard_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    mesh: Mesh,
    vocab_axis: AxisName = "model",
    token_axis: AxisName | None = None,
    axis: int = -1,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | ArrayLike = 1.0,
) -> jax.Array:
    """:func:`jaxent.cross_entropy` on global arrays, vocabulary-parallel over ``mesh``.

    Wraps ``jax.shard_map`` around :func:`cross_entropy`: the class axis of ``logits`` is
    split over ``vocab_axis``, the first other axis (the tokens) over ``token_axis`` when given
    (a 2-D data x model mesh). Inputs may already be placed with those shardings (no data
    moves then) or anywhere else (JAX reshards them). Values and gradients equal
    :func:`jaxent.cross_entropy`'s; every option of it is supported.

    Args:
      logits: float ``[..., C, ...]`` (global), ``C`` divisible by the ``vocab_axis`` size.
      labels: integer global class ids, ``logits.shape`` without ``axis``.
      mesh: a ``jax.sharding.Mesh`` (e.g. ``jax.make_mesh((2, 4), ("data", "model"))``).
      vocab_axis: mesh axis (or tuple of axes) for the classes.
      token_axis: mesh axis (or axes) for the tokens, or None (tokens replicated).
      axis, weight, ignore_index, label_smoothing, reduction, where, z_loss, logit_softcap,
        temperature: as in :func:`jaxent.cross_entropy`.

    Returns:
      A float32 scalar (replicated), or for ``"none"`` losses shaped like ``labels`` and
      sharded like them.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> x = jnp.array([[1.5, 0.3, 2.1], [2.0, 1.0, 0.1], [0.1, 2.2, 1.0]])
      >>> y = jnp.array([2, 0, 1])
      >>> loss = jaxent.sharded.shard_cross_entropy(x, y, mesh=mesh, token_axis="data")
      >>> round(float(loss), 4)
      0.4364
    """
    _checks.disjoint_axes(vocab_axis, token_axis, "vocab_axis", "token_axis")
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    temp_s, temp = _checks.temperature_array(temperature, batch_shape,
                                             rm.compute_dtype(x.dtype))
    _checks.options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                    temperature=temp_s, logit_softcap=logit_softcap,
                    ignore_index=ignore_index)
    c = _checks.num_classes(x, ax)
    y = _checks.int_labels(labels, batch_shape, logits_shape=x.shape, axis=ax)
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, c)
    y = _checks.label_values(y, c, ignore_index, mask)
    _divisible(c, mesh, vocab_axis, "the number of classes")
    tok_dim = 0 if ax != 0 else 1
    if token_axis is not None:
        if x.ndim < 2:
            raise ValueError("`token_axis` needs logits with a token axis, got rank 1")
        _divisible(x.shape[tok_dim], mesh, token_axis, f"logits.shape[{tok_dim}]")
    kw = dict(axis_name=vocab_axis, token_axis_name=token_axis, axis=ax,
              ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
              z_loss=z_loss, logit_softcap=logit_softcap, temperature=temp_s)
    return _shard_ce(x, y, w, mask, temp, mesh, tuple(sorted(kw.items())))


@functools.partial(jax.jit, static_argnums=(5, 6))
def _shard_ce(x, y, w, mask, temp, mesh, kw):
    kw = dict(kw)
    ax, tok = kw["axis"], kw["token_axis_name"]
    tok_dim = (0 if ax != 0 else 1) if x.ndim > 1 else None
    x_spec = _spec(x.ndim, **{f"d{ax}": kw["axis_name"]},
                   **({} if tok_dim is None else {f"d{tok_dim}": tok}))
    y_spec = _spec(y.ndim, d0=tok) if y.ndim else P()
    out_spec = y_spec if kw["reduction"] == "none" else P()

    def body(x, y, w, mask, temp):
        if temp is not None:  # one per row: replaces the static 1.0
            kw["temperature"] = temp
        return cross_entropy(x, y, weight=w, where=mask, **kw)

    specs = (x_spec, y_spec, P(), None if mask is None else y_spec,
             None if temp is None else y_spec)
    args = _explicit.place(mesh, specs, (x, y, w, mask, temp))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_spec)(*args)



def shard_linear_cross_entropy(
    hidden: ArrayLike,
    kernel: ArrayLike,
    labels: ArrayLike,
    *,
    mesh: Mesh,
    vocab_axis: AxisName = "model",
    token_axis: AxisName | None = None,
    bias: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | ArrayLike = 1.0,
    kernel_layout: KernelLayout = "dv",
    block_size: int | None = None,
    return_aux: bool = False,
    vocab_size: int | None = None,
):
    """:func:`jaxent.linear_cross_entropy` on global arrays, vocabulary-parallel over ``mesh``.

    Wraps ``jax.shard_map`` around :func:`linear_cross_entropy`: the kernel's vocabulary axis
    (and the bias) is split over ``vocab_axis``, the first axis of ``hidden`` and ``labels``
    (the tokens or the batch) over ``token_axis`` when given. Values and gradients (w.r.t.
    ``hidden``, ``kernel``, ``bias``) equal :func:`jaxent.linear_cross_entropy`'s; per device
    the vocabulary is walked in blocks, so no device ever holds more than ``N/d x block_size``
    logits (``d`` the ``token_axis`` size).

    Args:
      hidden: float ``[..., D]`` (global); its first axis divisible by the ``token_axis`` size.
      kernel: float ``[D, V]`` (``"dv"``) or ``[V, D]`` (``"vd"``), ``V`` divisible by the
        ``vocab_axis`` size.
      labels: integer class ids, ``hidden.shape[:-1]``.
      mesh: a ``jax.sharding.Mesh``.
      vocab_axis: mesh axis (or tuple of axes) for the vocabulary.
      token_axis: mesh axis (or axes) for the tokens, or None (replicated).
      bias, weight, ignore_index, label_smoothing, reduction, where, z_loss, logit_softcap,
        temperature, kernel_layout: as in :func:`jaxent.linear_cross_entropy`.
      block_size: vocabulary columns per block on each device (default: ``1/k`` of the
        single-device block budget per device, ``k`` the ``vocab_axis`` size).
      return_aux: also return :func:`jaxent.linear_cross_entropy`'s aux dict (per-token
        arrays sharded like ``labels``, the accuracy replicated).
      vocab_size: the number of real classes of a kernel whose vocabulary axis is padded
        to a multiple of the ``vocab_axis`` size: the padding columns are masked on the
        shards that hold them, nothing is gathered. A kernel whose ``V`` the
        ``vocab_axis`` does not divide is padded inside with zero columns, each device
        filling its own block (its gradient is then put back in the kernel's layout); to
        avoid that, keep the kernel (and bias) padded and pass ``vocab_size``.

    Returns:
      A float32 scalar (replicated), or for ``"none"`` per-token losses shaped like
      ``labels``, sharded like them; with ``return_aux=True`` a pair ``(loss, aux)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> y = jnp.array([[1, 7, 49], [0, -100, 3]])
      >>> loss = jaxent.sharded.shard_linear_cross_entropy(h, w, y, mesh=mesh,
      ...                                                  token_axis="data")
      >>> bool(jnp.allclose(loss, jaxent.linear_cross_entropy(h, w, y), rtol=1e-5))
      True
    """
    _checks.disjoint_axes(vocab_axis, token_axis, "vocab_axis", "token_axis")
    k = _checks.float_array(kernel, "kernel")
    columns = k.shape[1 if kernel_layout == "dv" else 0] if k.ndim == 2 else 0
    k_vocab = _axis_size(mesh, vocab_axis)
    if vocab_size is not None and columns != vocab_size and columns % k_vocab:
        raise ValueError(f"the padded vocabulary (the kernel's columns, {columns}) must be "
                         f"divisible by the size of mesh axis {vocab_axis!r} ({k_vocab})")
    h, k, b, y, w, mask, temp, spec = _validate_fused(
        hidden, k, labels, bias=bias, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, where=where, z_loss=z_loss,
        logit_softcap=logit_softcap, temperature=temperature, kernel_layout=kernel_layout,
        block_size=block_size, token_block_size=None, impl="vocab", return_aux=return_aux,
        num_classes=_real_vocab(vocab_size, columns))

    if token_axis is not None:
        if h.ndim < 2:
            raise ValueError("`token_axis` needs hidden with a token axis, got rank 1")
        _divisible(h.shape[0], mesh, token_axis, "hidden.shape[0]")
    batch = ((token_axis,) + (None,) * (y.ndim - 1)) if y.ndim else ()
    return _explicit.shard_fused(spec, mesh, vocab_axis, batch, h, k, y, b, w, mask, temp)

