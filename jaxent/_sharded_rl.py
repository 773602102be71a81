r"""Vocabulary-parallel versions of the fused RL and distillation losses (``jax.shard_map``).

Re-exported by :mod:`jaxent.sharded`. Each device holds the columns ``[i V/k, (i + 1) V/k)``
of the kernel(s) (``[D, V/k]``, or ``[V/k, D]`` with ``kernel_layout="vd"``) and of the
biases, and the whole ``hidden`` of its tokens. Each shard walks its ``V/k`` columns in
blocks with the single-device walk (:mod:`jaxent.impl.stream`); the ``[N]`` online
statistics are merged over ``axis_name`` with one ``pmax`` of the raw maxima and ``psum`` of
the rescaled sums, e.g. for the entropy sum ``u = sum e (z - m)``

.. math::
    m = \max_i m_i,\quad s = \sum_i s_i e^{z(m_i) - z(m)},\quad
    u = \sum_i e^{z(m_i) - z(m)} \big(u_i + s_i (z(m_i) - z(m))\big),

and the backward recomputes the local blocks and sums ``d hidden`` over ``axis_name``;
``d kernel`` and ``d bias`` stay local. No ``[N, V]`` array exists anywhere.
"""

from __future__ import annotations

from jax.typing import ArrayLike

from jaxent import _checks, _heads
from jaxent import distill as _distill
from jaxent import rl as _rl
from jaxent._options import KernelLayout, Reduction


def linear_log_probs(
    hidden: ArrayLike,
    kernel: ArrayLike,
    tokens: ArrayLike,
    *,
    axis_name,
    bias: ArrayLike | None = None,
    kernel_layout: KernelLayout = "dv",
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
    block_size: int | None = None,
    return_aux: bool = False,
):
    r"""Vocabulary-parallel :func:`jaxent.linear_log_probs`, inside ``jax.shard_map``.

    .. math:: \log p_y = z_y - \log\sum_c e^{z_c},\qquad H = -\sum_c p_c \log p_c

    over the global vocabulary, each device holding a ``V/k`` slice of the kernel.

    Args:
      hidden: float ``[..., D]``, this device's tokens (the same on every shard of
        ``axis_name``).
      kernel: this device's ``[D, V/k]`` (``"dv"``) or ``[V/k, D]`` (``"vd"``) block.
      tokens: integer global token ids, ``hidden.shape[:-1]``.
      axis_name: the mesh axis (or tuple of axes) the vocabulary is sharded over.
      bias: optional this device's ``[V/k]`` block.
      kernel_layout, temperature, logit_softcap, where, return_entropy, block_size,
        return_aux: as in :func:`jaxent.linear_log_probs` (``block_size`` counts local
        columns; the aux ``"argmax"`` is a global token id).

    Returns:
      This device's ``log_probs`` shaped like ``tokens`` (the same on every shard of
      ``axis_name``), or ``(log_probs, entropy)``; with ``return_aux`` a pair ``(that,
      aux)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
      >>> h = jax.random.normal(jax.random.key(0), (6, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> y = jnp.array([1, 7, 49, 0, 2, 3])
      >>> lp = jax.jit(jax.shard_map(
      ...     lambda h, w, y: jaxent.sharded.linear_log_probs(h, w, y, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P()))(h, w, y)
      >>> bool(jnp.allclose(lp, jaxent.token_log_probs(h @ w, y), atol=1e-5))
      True
    """
    return _heads.aux_dict(_rl.fused_log_probs(
        hidden, kernel, tokens, bias=bias, kernel_layout=kernel_layout,
        temperature=temperature, logit_softcap=logit_softcap, where=where,
        return_entropy=return_entropy, block_size=block_size, return_aux=return_aux,
        axis_name=axis_name), _rl.LOG_PROBS_AUX if return_aux else None)


def linear_soft_cross_entropy(
    hidden: ArrayLike,
    kernel: ArrayLike,
    targets: ArrayLike,
    *,
    axis_name,
    token_axis_name=None,
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
    return_aux: bool = False,
):
    r"""Vocabulary-parallel :func:`jaxent.linear_soft_cross_entropy`, inside ``jax.shard_map``.

    .. math:: \sum_c w_c t'_c (\ell - z_c) + \lambda_z \ell^2,\qquad
        t' = (1-\epsilon) t + \epsilon / V

    over the global vocabulary ``V``.

    Args:
      hidden: float ``[..., D]``, this device's tokens.
      kernel: this device's ``[D, V/k]`` or ``[V/k, D]`` block.
      targets: this device's ``[..., V/k]`` block of the probability targets.
      axis_name: the mesh axis (or axes) the vocabulary is sharded over.
      token_axis_name: the mesh axis (or axes) the tokens are sharded over, if any
        (``"mean"``/``"sum"`` are then over all tokens).
      bias: optional this device's ``[V/k]`` block.
      weight: optional this device's ``[V/k]`` block of the class weights.
      kernel_layout, label_smoothing, reduction, where, z_loss, logit_softcap, temperature,
        block_size, return_aux: as in :func:`jaxent.linear_soft_cross_entropy` (the aux
        ``"argmax"`` is a global class id).

    Returns:
      A float32 scalar, the same on every device, or this device's per-token losses; with
      ``return_aux`` a pair ``(that, aux)``, the aux this device's tokens'.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
      >>> h = jax.random.normal(jax.random.key(0), (6, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> t = jax.nn.softmax(jax.random.normal(jax.random.key(2), (6, 50)))
      >>> loss = jax.jit(jax.shard_map(
      ...     lambda h, w, t: jaxent.sharded.linear_soft_cross_entropy(
      ...         h, w, t, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(), P(None, "model"), P(None, "model")),
      ...     out_specs=P()))(h, w, t)
      >>> bool(jnp.allclose(loss, jaxent.soft_cross_entropy(h @ w, t), rtol=1e-5))
      True
    """
    _checks.disjoint_axes(axis_name, token_axis_name)
    return _heads.aux_dict(_rl.fused_soft_cross_entropy(
        hidden, kernel, targets, bias=bias, kernel_layout=kernel_layout, weight=weight,
        label_smoothing=label_smoothing, reduction=reduction, where=where, z_loss=z_loss,
        logit_softcap=logit_softcap, temperature=temperature, block_size=block_size,
        return_aux=return_aux, axis_name=axis_name, token_axis_name=token_axis_name),
        _rl.SOFT_AUX if return_aux else None)


def linear_distillation_loss(
    student_hidden: ArrayLike,
    student_kernel: ArrayLike,
    teacher_hidden: ArrayLike | None = None,
    teacher_kernel: ArrayLike | None = None,
    *,
    axis_name,
    teacher_topk: tuple[ArrayLike, ArrayLike] | None = None,
    teacher_tail: ArrayLike | None = None,
    token_axis_name=None,
    divergence: _distill.Divergence = "kl",
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
    return_aux: bool = False,
):
    r"""Vocabulary-parallel :func:`jaxent.linear_distillation_loss`, inside ``jax.shard_map``.

    .. math::
        \mathrm{kl} = \sum_c q_c \log\frac{q_c}{p_c},\quad
        \mathrm{reverse\_kl} = \sum_c p_c \log\frac{p_c}{q_c},\quad
        \mathrm{jsd}_\beta = \beta\,\mathrm{KL}(q\|M) + (1-\beta)\,\mathrm{KL}(p\|M)

    (student ``p``, teacher ``q``, ``M = beta q + (1 - beta) p``; see
    :func:`jaxent.linear_distillation_loss`), both kernels sharded over ``axis_name``. The
    teacher is a constant.

    Args:
      student_hidden, teacher_hidden: this device's tokens, ``[..., Ds]`` and ``[..., Dt]``.
      student_kernel, teacher_kernel: this device's vocabulary blocks (same layout).
      axis_name: the mesh axis (or axes) the vocabulary is sharded over.
      token_axis_name: the mesh axis (or axes) the tokens are sharded over, if any.
      teacher_topk, teacher_tail: a sparse teacher instead of ``teacher_hidden`` and
        ``teacher_kernel``: this device's tokens' global ids and log-probabilities
        ``[..., k]`` (the same on every shard of ``axis_name``) and tail ``[...]``, as in
        :func:`jaxent.linear_distillation_loss`.
      divergence, beta, temperature, student_bias, teacher_bias (local ``[V/k]`` blocks),
        kernel_layout, labels, ignore_index, where, reduction, block_size, return_aux: as in
        :func:`jaxent.linear_distillation_loss` (the aux argmaxes are global class ids).

    Returns:
      A float32 scalar, the same on every device, or this device's per-token losses; with
      ``return_aux`` a pair ``(that, aux)``, the aux this device's tokens'.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
      >>> ks = jax.random.split(jax.random.key(0), 4)
      >>> hs, ws = jax.random.normal(ks[0], (6, 8)), jax.random.normal(ks[1], (8, 40)) / 3
      >>> ht, wt = jax.random.normal(ks[2], (6, 4)), jax.random.normal(ks[3], (4, 40))
      >>> loss = jax.jit(jax.shard_map(
      ...     lambda *a: jaxent.sharded.linear_distillation_loss(*a, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(), P(None, "model"), P(), P(None, "model")),
      ...     out_specs=P()))(hs, ws, ht, wt)
      >>> bool(jnp.allclose(loss, jaxent.distillation_loss(hs @ ws, ht @ wt), rtol=1e-5))
      True
    """
    _checks.disjoint_axes(axis_name, token_axis_name)
    ids, lq = _distill.teacher_pair(teacher_topk)
    return _heads.aux_dict(_distill.fused_distillation_loss(
        student_hidden, student_kernel, teacher_hidden, teacher_kernel, divergence=divergence,
        beta=beta, temperature=temperature, student_bias=student_bias,
        teacher_bias=teacher_bias, kernel_layout=kernel_layout, labels=labels,
        ignore_index=ignore_index, where=where, reduction=reduction, block_size=block_size,
        return_aux=return_aux, axis_name=axis_name, token_axis_name=token_axis_name,
        teacher_ids=ids, teacher_log_probs=lq, teacher_tail=teacher_tail),
        _distill.DISTILL_AUX if return_aux else None)
