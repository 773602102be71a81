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

then the loss is the core's (:mod:`jaxent._core`), with label smoothing over the *full*
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
  (:func:`explicit_layout`) and calls the ``shard_map`` wrapper (:func:`linear_on_explicit_mesh`);
  on a mesh with ``AxisType.Auto`` axes (shardings unknown until compiled) it hands its
  per-token work to ``jax.experimental.custom_partitioning`` calls (:func:`auto_rows`,
  :func:`auto_token_sum`) that the partitioner splits the same way at compile time.

Labels are global class ids, replicated along the vocabulary axis; a label belongs to the
shard whose range ``[i C/k, (i + 1) C/k)`` contains it. Class weights are the full ``[C]``
vector (small), replicated; each shard reads its slice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxent import _checks, _core
from jaxent import linear as _linear

AxisName = Hashable  # a mesh axis name, or a tuple of them


@dataclasses.dataclass(frozen=True)
class _Shard:
    """Static configuration of a vocabulary-parallel loss (hashable, a nondiff argument)."""

    opts: _core.Options
    axis_name: AxisName  # the vocabulary axis (or axes)
    num_classes: int  # the global vocabulary size C


# ------------------------------------------------------------------------ shard helpers


def _shard_offset(axis_name: AxisName, local: int) -> jax.Array:
    """First global class id held by this shard: ``axis_index * local``."""
    return lax.axis_index(axis_name).astype(jnp.int32) * local


def _local_weight(weight: jax.Array | None, offset, local: int) -> jax.Array | None:
    """This shard's slice ``weight[offset:offset + local]`` of the full ``[C]`` weights."""
    return None if weight is None else lax.dynamic_slice_in_dim(weight, offset, local)


def _class_weight_sum(weight: jax.Array | None, local: int) -> jax.Array | float:
    return float(local) if weight is None else jnp.sum(weight)


def combine_stats(
    m: jax.Array,
    log_s: jax.Array,
    zy: jax.Array,
    wz: jax.Array | None,
    wsum,
    axis_name: AxisName,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    r"""Merge per-shard row statistics into the global ones with one ``pmax`` and ``psum``.

    Each shard has ``m_i`` (its finite row max, 0 where none), ``log s_i = log sum_c
    exp(z_c - m_i)`` (``-inf`` when all its logits are ``-inf``), its part ``zy_i`` of the
    label's logit (0 when the label is elsewhere) and, for smoothing, ``wz_i = sum_c w_c
    (z_c - m_i)`` over its classes with ``wsum_i = sum_c w_c``. With ``m = max_i m_i`` over
    shards that have a finite logit (0 if none):

    .. math::
        \log s = \log \sum_i e^{m_i + \log s_i - m},\qquad
        wz = \sum_i \left(wz_i - wsum_i (m - m_i)\right),\qquad zy = \sum_i zy_i .

    Args:
      m, log_s, zy: ``[N]`` local statistics (accumulation dtype).
      wz: ``[N]`` or None (no smoothing).
      wsum: scalar, this shard's class-weight sum (used only with ``wz``).
      axis_name: the vocabulary mesh axis.

    Returns:
      ``(m, log_s, zy, wz)`` over the full vocabulary, identical on every shard.
    """
    has = log_s > -jnp.inf
    m_glob = lax.pmax(jnp.where(has, m, -jnp.inf), axis_name)
    m_glob = jnp.where(jnp.isfinite(m_glob), m_glob, 0.0)
    # m_i + log s_i - m <= log(local classes): never overflows; empty shards add exp(-inf) = 0.
    log_s_glob = jnp.log(lax.psum(jnp.exp(m + log_s - m_glob), axis_name))
    wz_glob = None
    if wz is not None:
        wz_glob = lax.psum(wz - wsum * (m_glob - m), axis_name)
    return m_glob, log_s_glob, lax.psum(zy, axis_name), wz_glob


def _local_label_logit(z: jax.Array, y_local: jax.Array) -> jax.Array:
    """``z[r, y_local[r]]`` where ``0 <= y_local < local``, else 0 (a masked sum, no gather)."""
    cols = lax.broadcasted_iota(y_local.dtype, z.shape, 1)
    return _core.row_sum(jnp.where(cols == y_local[:, None], z, 0.0))


# ------------------------------------------------------------------ cross-entropy rows


def _ce_local_stats(x, labels, weight, cfg: _Shard):
    """Local ``(m, log_s, zy, wz, wsum)`` of this shard's logits ``x [N, C/k]``."""
    local = x.shape[1]
    off = _shard_offset(cfg.axis_name, local)
    m, log_s = _core.shifted_stats(x, cfg.opts)
    z = _core.transform(x, cfg.opts)
    zy = _local_label_logit(z, labels - off)
    wz = wsum = None
    if cfg.opts.label_smoothing > 0.0:
        w_loc = _local_weight(weight, off, local)
        zs = z - m[:, None]
        wz = _core.row_sum(zs if w_loc is None else zs * w_loc[None, :])
        wsum = _class_weight_sum(w_loc, local)
    return m, log_s, zy, wz, wsum


def _ce_fwd(x, labels, row_w, counted, weight, cfg: _Shard):
    m, log_s, zy, wz, wsum = _ce_local_stats(x, labels, weight, cfg)
    m, log_s, zy, wz = combine_stats(m, log_s, zy, wz, wsum, cfg.axis_name)
    loss = _linear.row_losses(m, log_s, zy, wz, labels, row_w, counted, weight, cfg.opts,
                              cfg.num_classes)
    return loss, (x, labels, row_w, counted, weight, m + log_s)


def _ce_bwd(cfg: _Shard, res, g):
    x, labels, row_w, counted, weight, lse = res
    local = x.shape[1]
    off = _shard_offset(cfg.axis_name, local)
    coefs = _linear.grad_coefs(g, lse, labels, row_w, counted, weight, cfg.opts,
                               cfg.num_classes)
    z = _core.transform(x, cfg.opts)
    dx = _linear.block_dlogits(z, lse, labels - off, coefs, counted,
                               _local_weight(weight, off, local), cfg.opts)
    dw = None if weight is None else jnp.zeros_like(weight)
    return dx.astype(x.dtype), None, jnp.zeros_like(row_w), None, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ce_rows(x, labels, row_w, counted, weight, cfg: _Shard):
    """Per-row losses ``[N]`` of this shard's logits ``x [N, C/k]`` over the full vocabulary.

    ``labels [N]`` are global class ids, ``row_w [N]`` is ``w[y]`` on counted rows (0 else),
    ``weight`` the full ``[C]`` class weights (or None). The result is the same on every
    shard of ``cfg.axis_name``; the backward is local (no collective).
    """
    return _ce_fwd(x, labels, row_w, counted, weight, cfg)[0]


_ce_rows.defvjp(_ce_fwd, _ce_bwd)


# --------------------------------------------------------------------- shared front end


def _reduce(losses, row_w, reduction, token_axis_name):
    """The core's reduction; ``"mean"``/``"sum"`` summed over ``token_axis_name`` too."""
    if reduction == "none" or token_axis_name is None:
        return _core.reduce(losses, row_w.sum(), reduction)
    total = lax.psum(losses.sum(), token_axis_name)
    return _core.reduce(total, lax.psum(row_w.sum(), token_axis_name), reduction)


def _token_total(token_axis_name: AxisName | None):
    """Sum over the token shards (``psum``), or None when the tokens are not sharded."""
    if token_axis_name is None:
        return None
    return lambda c: lax.psum(c, token_axis_name)


def _vocab_size(local: int, axis_name: AxisName) -> int:
    return local * lax.axis_size(axis_name)


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
    reduction: str = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
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
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    eps, zl, temp, cap = _checks.options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temperature, logit_softcap=logit_softcap,
    )
    c = _vocab_size(x.shape[ax], axis_name)
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    y = _checks.int_labels(labels, batch_shape)
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, c)
    _checks.label_values(y, c, ignore_index, mask)

    cfg = _Shard(_core.Options(eps, zl, temp, cap), axis_name, c)
    rows = jnp.moveaxis(x, ax, -1).reshape(-1, x.shape[ax])
    y, counted, row_w = _core.counted_rows(y, mask, w, ignore_index,
                                           _core.compute_dtype(x.dtype))
    losses = _ce_rows(rows, y, row_w, counted, w, cfg)
    return _reduce(losses.reshape(batch_shape), row_w, reduction, token_axis_name)


# --------------------------------------------------------------- fused linear rows


@dataclasses.dataclass(frozen=True)
class _LinearShard:
    """Static configuration of the vocabulary-parallel linear loss."""

    shard: _Shard  # global options, vocabulary axis and global vocabulary size
    plan: _linear._Plan  # this shard's block walk (num_classes = local vocabulary)


def _global_argmax(m_loc, log_s_loc, arg_loc, m_glob, axis_name: AxisName) -> jax.Array:
    """The first global class id with the row's largest logit: the smallest (``pmin``) of the
    shards' argmaxes among the shards that hold the global max (0 when a row is all -inf,
    as on one device)."""
    none = jnp.iinfo(jnp.int32).max
    holds = (log_s_loc > -jnp.inf) & (m_loc == m_glob)
    arg = lax.pmin(jnp.where(holds, arg_loc, none), axis_name)
    return jnp.where(arg == none, 0, arg)


def _lin_fwd(sp: _LinearShard, h, kernel, bias, labels, row_w, counted, weight):
    cfg, local = sp.shard, sp.plan.num_classes
    off = _shard_offset(cfg.axis_name, local)
    w_loc = _local_weight(weight, off, local)
    m_loc, log_s_loc, zy, wz, arg = _linear._vocab_forward(sp.plan, h, kernel, bias,
                                                           labels - off, w_loc)
    wsum = None if wz is None else _class_weight_sum(w_loc, local)
    m, log_s, zy, wz = combine_stats(m_loc, log_s_loc, zy, wz, wsum, cfg.axis_name)
    if arg is not None:
        arg = _global_argmax(m_loc, log_s_loc, arg + off, m, cfg.axis_name)
    loss = _linear.row_losses(m, log_s, zy, wz, labels, row_w, counted, weight, cfg.opts,
                              cfg.num_classes)
    lse = m + log_s
    return (loss, (lse, arg)), (h, kernel, bias, labels, row_w, counted, weight, lse)


def _lin_bwd(sp: _LinearShard, res, cts):
    h, kernel, bias, labels, row_w, counted, weight, lse = res
    g = cts[0]
    cfg, local = sp.shard, sp.plan.num_classes
    off = _shard_offset(cfg.axis_name, local)
    coefs = _linear.grad_coefs(g, lse, labels, row_w, counted, weight, cfg.opts,
                               cfg.num_classes)
    dh, dk, db = _linear._vocab_backward(sp.plan, h, kernel, bias, labels - off, counted,
                                         _local_weight(weight, off, local), lse, coefs)
    # Every shard holds a partial d hidden (its classes' share): the one collective, [N, D].
    dh = lax.psum(dh, cfg.axis_name)
    # Inputs replicated over other axes (the kernel over the token axis) sum their partials.
    dh, dk, db = (_linear.psum_to_type(ct, ref) for ct, ref in ((dh, h), (dk, kernel), (db, bias)))
    dw = None if weight is None else jnp.zeros_like(weight)
    return dh.astype(h.dtype), dk, db, None, jnp.zeros_like(row_w), None, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lin_rows(sp: _LinearShard, h, kernel, bias, labels, row_w, counted, weight):
    """Per-token losses ``[N]`` of ``h [N, D] @ kernel`` (this shard's ``V/k`` columns) and
    ``(lse [N], argmax [N] or None)`` over the full vocabulary.

    The forward walks the local vocabulary in blocks (:mod:`jaxent.linear`'s online
    statistics) and combines the ``[N]`` statistics across shards; the backward recomputes
    each local block with the global ``lse`` and sums ``d hidden`` over the axis (``psum``).
    """
    return _lin_fwd(sp, h, kernel, bias, labels, row_w, counted, weight)[0]


_lin_rows.defvjp(_lin_fwd, _lin_bwd)


def _check_linear_like_core(hidden, kernel_shape, labels, **kw) -> None:
    """Run :func:`jaxent.linear_cross_entropy`'s own validation on the global shapes.

    Tracing it abstractly (``jax.eval_shape``: nothing is computed) raises exactly its errors
    for shapes, layouts, dtypes and options; concrete ``labels`` get its value check.
    """
    spec = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    kw = {k: spec(v) if k in ("bias", "weight", "where") else v for k, v in kw.items()}
    k = jax.ShapeDtypeStruct(kernel_shape[0], kernel_shape[1])
    jax.eval_shape(
        lambda h, k, b, w, m: _linear.linear_cross_entropy(
            h, k, labels, **{**kw, "bias": b, "weight": w, "where": m}),
        spec(hidden), k, kw.get("bias"), kw.get("weight"), kw.get("where"))


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
    reduction: str = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    kernel_layout: str = "dv",
    block_size: int | None = None,
    return_aux: bool = False,
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
    h = _checks.float_array(hidden, "hidden")
    k = _checks.float_array(kernel, "kernel")
    if kernel_layout not in _linear.LAYOUTS:
        raise ValueError(f"`kernel_layout` must be one of {_linear.LAYOUTS}, got "
                         f"{kernel_layout!r}")
    if k.ndim != 2:
        raise ValueError(
            f"`kernel` must be 2-D, [D, V] for kernel_layout='dv' or [V, D] for 'vd', got "
            f"shape {tuple(k.shape)}")
    vax = 1 if kernel_layout == "dv" else 0
    local = k.shape[vax]
    v = _vocab_size(local, axis_name)
    kshape = tuple(v if i == vax else s for i, s in enumerate(k.shape))
    b = None if bias is None else _checks.float_array(bias, "bias")
    if b is not None and b.ndim == 1 and b.shape[0] == local:
        b_global = jax.ShapeDtypeStruct((v,), b.dtype)
    else:
        b_global = b
    _check_linear_like_core(
        h, (kshape, k.dtype), labels, bias=b_global, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, where=where, z_loss=z_loss,
        logit_softcap=logit_softcap, temperature=temperature, kernel_layout=kernel_layout)
    eps, zl, temp, cap = _checks.options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temperature, logit_softcap=logit_softcap,
    )
    batch_shape = h.shape[:-1]
    y = jnp.asarray(labels).reshape(-1)
    mask = None if where is None else jnp.asarray(where)
    w = _checks.class_weight(weight, v)
    n, d = math.prod(batch_shape), h.shape[-1]
    # The single-device block budget split over the k vocabulary shards: per-device
    # work-space shrinks with k (as if each shard walked k times more rows).
    bv = _linear.auto_block_sizes(n * lax.axis_size(axis_name), d, local)[0]
    if block_size is not None:
        bv = min(_linear._positive_int(block_size, "block_size"), local)
    dtype = jnp.result_type(h.dtype, k.dtype)
    acc = _core.compute_dtype(dtype)
    opts = _core.Options(eps, zl, temp, cap)
    plan = _linear._Plan(opts, local, kernel_layout, bv, 1, bv, bool(return_aux))
    sp = _LinearShard(_Shard(opts, axis_name, v), plan)
    y, counted, row_w = _core.counted_rows(y, mask, w, ignore_index, acc)
    wc = None if w is None else w.astype(acc)
    losses, (lse, arg) = _lin_rows(sp, h.reshape(n, d).astype(dtype), k.astype(dtype),
                                   None if b is None else b.astype(dtype), y, row_w, counted,
                                   wc)
    loss = _reduce(losses.reshape(batch_shape), row_w, reduction, token_axis_name)
    if not return_aux:
        return loss
    return loss, _linear.aux_dict(lse, arg, y, counted, zl, batch_shape,
                                  _token_total(token_axis_name))


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


def _place(mesh: Mesh, specs, args):
    """Reshard ``args`` to ``specs`` on a mesh with explicit axes (auto axes need nothing:
    ``shard_map`` reshards its inputs itself)."""
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return args
    return tuple(a if a is None else jax.reshard(a, NamedSharding(mesh, s))
                 for a, s in zip(args, specs, strict=True))


def _spec(ndim: int, **dims) -> P:
    """A PartitionSpec of rank ``ndim`` with the given ``{dim: axis}`` entries."""
    entries = [None] * ndim
    for d, name in dims.items():
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
    reduction: str = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
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
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    _checks.options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                    temperature=temperature, logit_softcap=logit_softcap)
    c = x.shape[ax]
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    y = _checks.int_labels(labels, batch_shape)
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, c)
    _checks.label_values(y, c, ignore_index, mask)
    _divisible(c, mesh, vocab_axis, "the number of classes")
    tok_dim = 0 if ax != 0 else 1
    if token_axis is not None:
        if x.ndim < 2:
            raise ValueError("`token_axis` needs logits with a token axis, got rank 1")
        _divisible(x.shape[tok_dim], mesh, token_axis, f"logits.shape[{tok_dim}]")
    kw = dict(axis_name=vocab_axis, token_axis_name=token_axis, axis=ax,
              ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
              z_loss=z_loss, logit_softcap=logit_softcap, temperature=temperature)
    return _shard_ce(x, y, w, mask, mesh, tuple(sorted(kw.items())))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _shard_ce(x, y, w, mask, mesh, kw):
    kw = dict(kw)
    ax, tok = kw["axis"], kw["token_axis_name"]
    tok_dim = 0 if ax != 0 else 1
    x_spec = _spec(x.ndim, **{f"d{ax}": kw["axis_name"], f"d{tok_dim}": tok})
    y_spec = _spec(y.ndim, d0=tok) if y.ndim else P()
    out_spec = y_spec if kw["reduction"] == "none" else P()

    def body(x, y, w, mask):
        return cross_entropy(x, y, weight=w, where=mask, **kw)

    specs = (x_spec, y_spec, P(), None if mask is None else y_spec)
    args = _place(mesh, specs, (x, y, w, mask))
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
    reduction: str = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    kernel_layout: str = "dv",
    block_size: int | None = None,
    return_aux: bool = False,
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
    h = _checks.float_array(hidden, "hidden")
    k = _checks.float_array(kernel, "kernel")
    b = None if bias is None else _checks.float_array(bias, "bias")
    w = None if weight is None else _checks.float_array(weight, "weight")
    mask = None if where is None else jnp.asarray(where)
    y = jnp.asarray(labels)
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
              z_loss=z_loss, logit_softcap=logit_softcap, temperature=temperature,
              kernel_layout=kernel_layout)
    _check_linear_like_core(h, (k.shape, k.dtype), y, bias=b, weight=w, where=mask, **kw)
    vax = 1 if kernel_layout == "dv" else 0
    _divisible(k.shape[vax], mesh, vocab_axis, "the vocabulary size V")
    if token_axis is not None:
        if h.ndim < 2:
            raise ValueError("`token_axis` needs hidden with a token axis, got rank 1")
        _divisible(h.shape[0], mesh, token_axis, "hidden.shape[0]")
    kw.update(axis_name=vocab_axis, token_axis_name=token_axis, block_size=block_size,
              return_aux=return_aux)
    return _shard_lin(h, k, y, b, w, mask, mesh, tuple(sorted(kw.items())))


@functools.partial(jax.jit, static_argnums=(6, 7))
def _shard_lin(h, k, y, b, w, mask, mesh, kw):
    """``jax.shard_map`` of the per-device linear loss. ``kw`` holds its keywords plus, from
    :func:`linear_on_explicit_mesh`, ``batch_spec`` (the spec of the token axes; default:
    the first over ``token_axis_name``). ``axis_name=None`` (vocabulary not sharded) runs
    the single-device function on each device's tokens."""
    kw = dict(kw)
    tok, vocab = kw["token_axis_name"], kw["axis_name"]
    batch = kw.pop("batch_spec", None)
    if batch is None:
        batch = (tok,) + (None,) * (y.ndim - 1) if y.ndim else ()
    y_spec, h_spec = P(*batch), P(*batch, None)
    k_spec = P(None, vocab) if kw["kernel_layout"] == "dv" else P(vocab, None)
    specs = (h_spec, k_spec, y_spec, None if b is None else P(vocab), None if w is None else P(),
             None if mask is None else y_spec)
    out_spec = y_spec if kw["reduction"] == "none" else P()
    if kw["return_aux"]:
        out_spec = (out_spec, {"lse": y_spec, "z_loss": y_spec, "argmax": y_spec,
                               "accuracy": P()})
    if vocab is None:
        per_device = _token_parallel_linear
    else:
        per_device = linear_cross_entropy
        kw.pop("impl", None)  # the vocabulary walk only
        kw.pop("token_block_size", None)

    def body(h, k, y, b, w, mask):
        return per_device(h, k, y, bias=b, weight=w, where=mask, **kw)

    args = _place(mesh, specs, (h, k, y, b, w, mask))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_spec)(*args)


def _token_parallel_linear(hidden, kernel, labels, *, axis_name, token_axis_name, reduction,
                           return_aux, ignore_index, weight, where, **kw):
    """:func:`jaxent.linear_cross_entropy` on this device's tokens with the whole kernel
    (its custom_vjp sums ``d kernel`` over the token axes), reduced over ``token_axis_name``."""
    del axis_name
    if token_axis_name is None:
        return _linear.linear_cross_entropy(
            hidden, kernel, labels, weight=weight, where=where, ignore_index=ignore_index,
            reduction=reduction, return_aux=return_aux, **kw)
    out = _linear.linear_cross_entropy(
        hidden, kernel, labels, weight=weight, where=where, ignore_index=ignore_index,
        reduction="none" if reduction == "none" else "sum", return_aux=return_aux, **kw)
    loss, aux = out if return_aux else (out, None)
    acc = _core.compute_dtype(jnp.result_type(hidden.dtype, kernel.dtype))
    y, counted, row_w = _core.counted_rows(labels, where, weight, ignore_index, acc)
    total = _token_total(token_axis_name)
    if reduction != "none":
        loss = _core.reduce(total(loss), total(row_w.sum()), reduction)
    if aux is None:
        return loss
    hits = jnp.sum(counted & (aux["argmax"].reshape(-1) == y))
    aux["accuracy"] = total(hits) / jnp.maximum(total(jnp.sum(counted)), 1)
    return loss, aux


# ----------------------------------------------------- plain jit on an explicit mesh


@dataclasses.dataclass(frozen=True)
class ExplicitLayout:
    """How explicitly sharded inputs split :func:`jaxent.linear_cross_entropy`."""

    mesh: jax.sharding.AbstractMesh
    vocab: AxisName | None  # mesh axis (or axes) of the kernel's vocabulary axis
    batch: tuple  # PartitionSpec entries of the token axes of ``hidden`` and ``labels``


def _axes(entry) -> tuple:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(axes: tuple):
    """Inverse of :func:`_axes`."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _typed_sharding(x):
    """``(abstract mesh, spec entries as tuples of axis names)`` from ``x``'s type; the mesh
    is None when ``x`` carries none (no mesh, or an array created without one)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None or not mesh.axis_names:
        return None, ((),) * x.ndim
    entries = tuple(_axes(e) for e in spec)
    return mesh, entries + ((),) * (x.ndim - len(entries))


def explicit_layout(hidden, kernel, bias, labels, weight, where,
                    kernel_layout: str) -> ExplicitLayout | None:
    """The split of :func:`jaxent.linear_cross_entropy` that its inputs' sharding types ask
    for, or None when no input is typed over a mesh with explicit axes.

    Only meshes with ``AxisType.Explicit`` axes put shardings in the types of traced values;
    under ``AxisType.Auto`` axes a value traced by ``jax.jit`` reads as replicated (GSPMD
    decides the layout later, at compile time), so this returns None there (and the split
    is made by :func:`auto_rows` / :func:`auto_token_sum` when compiling). Inside a
    ``shard_map`` (some mesh axis manual) it also returns None: the caller chose the split.
    Inputs typed as replicated over an explicit mesh also get a layout (everything
    replicated): the blockwise walk cannot mix them with the mesh-less arrays it creates.
    """
    typed = [(mesh, entries) for x in (hidden, kernel, bias, labels, weight, where)
             if x is not None for mesh, entries in [_typed_sharding(x)]]
    meshes = {mesh for mesh, _ in typed
              if mesh is not None and AxisType.Explicit in mesh.axis_types}
    if not meshes:
        return None
    if len(meshes) != 1:
        raise ValueError("the inputs of `linear_cross_entropy` are typed over different "
                         f"meshes: {sorted(map(str, meshes))}")
    mesh = meshes.pop()
    if AxisType.Manual in mesh.axis_types or jax.sharding.get_abstract_mesh().manual_axes:
        return None
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    vax = 1 if kernel_layout == "dv" else 0
    vocab = _typed_sharding(kernel)[1][vax]
    if vocab and kernel.shape[vax] % size(vocab):
        vocab = ()  # uneven: the kernel is gathered (shard_map needs equal blocks)
    batch = []
    for dim, axes in zip(hidden.shape[:-1], _typed_sharding(hidden)[1][:-1], strict=True):
        axes = tuple(a for a in axes if a not in vocab)
        batch.append(_entry(axes if axes and dim % size(axes) == 0 else ()))
    return ExplicitLayout(mesh, _entry(vocab), tuple(batch))


def linear_on_explicit_mesh(h, k, y, b, w, mask, layout: ExplicitLayout, **kw):
    """:func:`jaxent.linear_cross_entropy` (already validated arguments) split as ``layout``
    says: vocabulary-parallel (:func:`linear_cross_entropy`) over ``layout.vocab`` when the
    kernel's vocabulary is sharded, tokens over the axes of ``hidden``'s token axes; inputs
    laid out otherwise are resharded to that (e.g. a kernel sharded along ``D``)."""
    tok = tuple(a for e in layout.batch for a in _axes(e))
    kw.update(axis_name=layout.vocab, token_axis_name=_entry(tok), batch_spec=layout.batch)
    return _shard_lin(h, k, y, b, w, mask, layout.mesh, tuple(sorted(kw.items())))


# -------------------------------------------------- plain jit on an auto mesh (GSPMD)
#
# Under ``AxisType.Auto`` axes the shardings of traced values are unknown at trace time: XLA's
# partitioner (Shardy) picks them when compiling. ``jax.experimental.custom_partitioning``
# defers the split to that moment: the per-row work of :func:`jaxent.linear_cross_entropy`
# (forward statistics and losses, the token schedule's loss-and-gradient, the backward) is
# one custom call each, whose partition rule receives the operands' shardings and lowers, per
# device, the shard_map-free local functions above (``_lin_fwd``/``_lin_bwd`` over the
# kernel's vocabulary axes, the single-device walk on each token shard otherwise), with
# ``pmax``/``psum`` over the mesh axes the rule was given. Unpartitioned (one device), under
# ``jax.vmap`` and eagerly, each custom call is the single-device function itself.


@dataclasses.dataclass(frozen=True)
class AutoPlan:
    """Static configuration of the auto-partitioned linear loss (a nondiff argument)."""

    plan: _linear._Plan  # the single-device plan (global vocabulary and token count)
    auto_v: bool  # block_v / block_dw were picked from the shapes: re-picked per device
    auto_n: bool  # block_n likewise
    has_bias: bool
    has_weight: bool


def auto_partitioning() -> bool:
    """Whether :func:`jaxent.linear_cross_entropy` defers its split to the partitioner: with
    more than one device, outside ``shard_map`` (whose manual axes already split it)."""
    return jax.device_count() > 1 and not jax.sharding.get_abstract_mesh().manual_axes


def _auto_split(ap: AutoPlan, h_sharding: NamedSharding, k_sharding: NamedSharding,
                n: int, v: int) -> tuple[tuple, tuple]:
    """``(token axes, vocabulary axes)`` from the shardings the partitioner proposes: the
    kernel's vocabulary axis and ``hidden``'s token axis, each kept only if it divides the
    global size (an axis on both goes to the vocabulary)."""
    mesh = k_sharding.mesh

    def axes(sharding, dim):
        spec = tuple(sharding.spec)
        return _axes(spec[dim]) if dim < len(spec) else ()

    def fits(axes, size):
        return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else ()

    vocab = fits(axes(k_sharding, 1 if ap.plan.layout == "dv" else 0), v)
    tok = fits(tuple(a for a in axes(h_sharding, 0) if a not in vocab), n)
    return tok, vocab


def _auto_plan(ap: AutoPlan, n_local: int, d: int, v_local: int, k: int) -> _linear._Plan:
    """The plan of one device's block: ``v_local`` classes of ``k`` vocabulary shards and
    ``n_local`` tokens. Block sizes picked from the shapes are re-picked as
    :func:`linear_cross_entropy` does (``1/k`` of the single-device budget); given ones are
    kept (clipped to the block). Nothing split: the single-device plan itself."""
    plan = ap.plan
    bv, bn, bw = _linear.auto_block_sizes(n_local * k, d, v_local)
    return dataclasses.replace(
        plan, num_classes=v_local,
        block_v=bv if ap.auto_v else min(plan.block_v, v_local),
        block_dw=bw if ap.auto_v else min(plan.block_dw, v_local),
        block_n=bn if ap.auto_n else min(plan.block_n, max(n_local, 1)))


def _vocab_plan(ap: AutoPlan, vocab: tuple, h, k) -> _LinearShard:
    """The :class:`_LinearShard` of one device's block over the vocabulary axes ``vocab``."""
    vax = 1 if ap.plan.layout == "dv" else 0
    size = lax.axis_size(_entry(vocab))
    plan = _auto_plan(ap, h.shape[0], h.shape[1], k.shape[vax], size)
    return _LinearShard(_Shard(ap.plan.opts, _entry(vocab), ap.plan.num_classes), plan)


def _local_ap(ap: AutoPlan, h, k) -> AutoPlan:
    vax = 1 if ap.plan.layout == "dv" else 0
    return dataclasses.replace(ap, plan=_auto_plan(ap, h.shape[0], h.shape[1], k.shape[vax], 1))


def _psum_over(x, axes: tuple):
    return x if x is None or not axes else lax.psum(x, _entry(axes))


# The three custom calls: the single-device function (what runs unpartitioned) and its
# per-device version for token axes ``tok`` and vocabulary axes ``vocab``.


def _rows_forward(ap: AutoPlan, h, k, b, y, row_w, counted, w):
    """Per-token losses, lse and argmax (vocabulary schedule's forward)."""
    (loss, (lse, arg)), _ = _linear._rows_fwd(ap.plan, h, k, b, y, row_w, counted, w)
    return loss, lse, arg


def _rows_forward_shard(ap, tok, vocab, h, k, b, y, row_w, counted, w):
    if not vocab:
        return _rows_forward(_local_ap(ap, h, k), h, k, b, y, row_w, counted, w)
    (loss, (lse, arg)), _ = _lin_fwd(_vocab_plan(ap, vocab, h, k), h, k, b, y, row_w,
                                     counted, w)
    return loss, lse, arg


def _rows_backward(ap: AutoPlan, h, k, b, y, row_w, counted, w, lse, g):
    """``(d hidden, d kernel, d bias)`` for the cotangent ``g [N]`` of the per-token losses."""
    res = (h, k, b, y, row_w, counted, w, lse)
    return _linear._rows_bwd(ap.plan, res, (g,))[:3]


def _rows_backward_shard(ap, tok, vocab, h, k, b, y, row_w, counted, w, lse, g):
    res = (h, k, b, y, row_w, counted, w, lse)
    if vocab:  # d hidden summed over the vocabulary shards inside
        dh, dk, db = _lin_bwd(_vocab_plan(ap, vocab, h, k), res, (g,))[:3]
    else:
        dh, dk, db = _rows_backward(_local_ap(ap, h, k), h, k, b, y, row_w, counted, w, lse, g)
    return dh, _psum_over(dk, tok), _psum_over(db, tok)


def _token_forward(ap: AutoPlan, h, k, b, y, row_w, counted, w):
    """Token schedule: loss sum, lse, argmax and the gradients for a unit cotangent."""
    (total, (lse, arg)), (dh, dk, db, *_) = _linear._token_fwd(ap.plan, h, k, b, y, row_w,
                                                               counted, w)
    return total, lse, arg, dh, dk, db


def _token_forward_shard(ap, tok, vocab, h, k, b, y, row_w, counted, w):
    if vocab:  # whole rows exist on no device: the vocabulary walk, forward and backward
        sp = _vocab_plan(ap, vocab, h, k)
        (loss, (lse, arg)), res = _lin_fwd(sp, h, k, b, y, row_w, counted, w)
        dh, dk, db = _lin_bwd(sp, res, (jnp.ones_like(loss),))[:3]
        total = jnp.sum(loss)
    else:
        total, lse, arg, dh, dk, db = _token_forward(_local_ap(ap, h, k), h, k, b, y, row_w,
                                                     counted, w)
    return _psum_over(total, tok), lse, arg, dh, _psum_over(dk, tok), _psum_over(db, tok)


def _rule_operands(ap: AutoPlan, extra: int) -> str:
    kernel = "d v" if ap.plan.layout == "dv" else "v d"
    ops = ["n d", kernel] + ["v"] * ap.has_bias + ["n"] * 3 + ["c"] * ap.has_weight
    return ", ".join(ops + ["n"] * extra)


def _grads_rule(ap: AutoPlan) -> str:
    return ", ".join(["n d", "d v" if ap.plan.layout == "dv" else "v d"] + ["v"] * ap.has_bias)


_RULES = {  # Shardy sharding rules (factors: n tokens, d width, v vocabulary, c weight)
    "rows_forward": lambda ap: f"{_rule_operands(ap, 0)} -> n, n" + ", n" * ap.plan.aux,
    "rows_backward": lambda ap: f"{_rule_operands(ap, 2)} -> {_grads_rule(ap)}",
    "token_forward": lambda ap: (f"{_rule_operands(ap, 0)} -> , n" + ", n" * ap.plan.aux
                                 + f", {_grads_rule(ap)}"),
}


def _auto_specs(ap: AutoPlan, arg_shapes) -> tuple:
    """``(mesh, token axes, vocabulary axes, {layout kind: PartitionSpec})`` for operands
    sharded as ``arg_shapes`` say (``hidden`` and ``kernel`` first)."""
    h, k = arg_shapes[0], arg_shapes[1]
    if isinstance(h.sharding, NamedSharding) and isinstance(k.sharding, NamedSharding):
        mesh = k.sharding.mesh
        vax = 1 if ap.plan.layout == "dv" else 0
        tok, vocab = _auto_split(ap, h.sharding, k.sharding, h.shape[0], k.shape[vax])
    else:  # shardings not over mesh axes (no mesh known): everything replicated
        mesh = Mesh(np.asarray(h.sharding._device_assignment), ("jaxent_devices",))
        tok, vocab = (), ()
    t, v = _entry(tok), _entry(vocab)
    specs = {"row": P(t), "hidden": P(t, None), "bias": P(v), "replicated": P(),
             "kernel": P(None, v) if ap.plan.layout == "dv" else P(v, None)}
    return mesh, tok, vocab, specs


def _custom_partitioned(name: str, fun, per_shard, out_kinds):
    """``fun(ap, *args)`` as a ``custom_partitioning`` op lowered per device by ``per_shard``;
    ``out_kinds`` names each output's layout (``"row"``, ``"hidden"``, ``"kernel"``,
    ``"bias"``, ``"replicated"``)."""
    from jax.experimental.custom_partitioning import custom_partitioning

    op = custom_partitioning(fun, static_argnums=(0,))

    def out_shardings(mesh, specs, result_shape):
        return tuple(None if r is None else NamedSharding(mesh, specs[kind])
                     for r, kind in zip(result_shape, out_kinds, strict=True))

    def partition(ap, mesh, arg_shapes, result_shape):
        mesh, tok, vocab, specs = _auto_specs(ap, arg_shapes)
        in_kinds = ("hidden", "kernel", "bias", "row", "row", "row", "replicated")
        in_kinds += ("row",) * (len(arg_shapes) - len(in_kinds))
        in_shardings = tuple(None if a is None else NamedSharding(mesh, specs[kind])
                             for a, kind in zip(arg_shapes, in_kinds, strict=True))

        def lower(*args):
            return per_shard(ap, tok, vocab, *args)

        return mesh, lower, out_shardings(mesh, specs, result_shape), in_shardings

    def infer(ap, mesh, arg_shapes, result_shape):  # GSPMD (Shardy off) only
        mesh, _, _, specs = _auto_specs(ap, arg_shapes)
        return out_shardings(mesh, specs, result_shape)

    op.def_partition(partition, infer_sharding_from_operands=infer,
                     sharding_rule=lambda ap, mesh, ins, outs: _RULES[name](ap))

    def call(ap: AutoPlan, *args):
        # custom_partitioning has no batching rule: under vmap, the single-device function.
        @jax.custom_batching.custom_vmap
        def run(*args):
            return op(ap, *args)

        @run.def_vmap
        def _vmapped(axis_size, in_batched, *args):
            del axis_size
            out = jax.vmap(functools.partial(fun, ap), in_axes=tuple(
                0 if batched else None for batched in in_batched))(*args)
            return out, jax.tree.map(lambda _: True, out)

        return run(*args)

    return call


_rows_forward_op = _custom_partitioned(
    "rows_forward", _rows_forward, _rows_forward_shard, ("row", "row", "row"))
_rows_backward_op = _custom_partitioned(
    "rows_backward", _rows_backward, _rows_backward_shard, ("hidden", "kernel", "bias"))
_token_forward_op = _custom_partitioned(
    "token_forward", _token_forward, _token_forward_shard,
    ("replicated", "row", "row", "hidden", "kernel", "bias"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def auto_rows(ap: AutoPlan, h, kernel, bias, labels, row_w, counted, weight):
    """:func:`jaxent.linear._rows` (per-token losses and ``(lse, argmax)``) split by the
    partitioner as the operands are sharded."""
    loss, lse, arg = _rows_forward_op(ap, h, kernel, bias, labels, row_w, counted, weight)
    return loss, (lse, arg)


def _auto_rows_fwd(ap: AutoPlan, h, kernel, bias, labels, row_w, counted, weight):
    loss, lse, arg = _rows_forward_op(ap, h, kernel, bias, labels, row_w, counted, weight)
    return (loss, (lse, arg)), (h, kernel, bias, labels, row_w, counted, weight, lse)


def _auto_rows_bwd(ap: AutoPlan, res, cts):
    h, kernel, bias, labels, row_w, counted, weight, lse = res
    dh, dk, db = _rows_backward_op(ap, h, kernel, bias, labels, row_w, counted, weight, lse,
                                   cts[0])
    dw = None if weight is None else jnp.zeros_like(weight)
    return dh, dk, db, None, jnp.zeros_like(row_w), None, dw


auto_rows.defvjp(_auto_rows_fwd, _auto_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def auto_token_sum(ap: AutoPlan, h, kernel, bias, labels, row_w, counted, weight):
    """:func:`jaxent.linear._token_sum` (loss sum and ``(lse, argmax)``, the gradient made in
    the forward) split by the partitioner as the operands are sharded."""
    loss, lse, arg = _rows_forward_op(ap, h, kernel, bias, labels, row_w, counted, weight)
    return loss.sum(), (lse, arg)


def _auto_token_fwd(ap: AutoPlan, h, kernel, bias, labels, row_w, counted, weight):
    total, lse, arg, dh, dk, db = _token_forward_op(ap, h, kernel, bias, labels, row_w,
                                                    counted, weight)
    return (total, (lse, arg)), (dh, dk, db, row_w, weight)


def _auto_token_bwd(ap: AutoPlan, res, cts):
    dh, dk, db, row_w, weight = res
    g = cts[0]
    scale = lambda a: None if a is None else a * g.astype(a.dtype)  # noqa: E731
    dw = None if weight is None else jnp.zeros_like(weight)
    return scale(dh), scale(dk), scale(db), None, jnp.zeros_like(row_w), None, dw


auto_token_sum.defvjp(_auto_token_fwd, _auto_token_bwd)


# Vocabulary-parallel RL and distillation losses (jaxent/_sharded_rl.py).
from jaxent._sharded_rl import linear_distillation_loss as linear_distillation_loss  # noqa: E402
from jaxent._sharded_rl import linear_log_probs as linear_log_probs  # noqa: E402
from jaxent._sharded_rl import linear_soft_cross_entropy as linear_soft_cross_entropy  # noqa: E402,E501
