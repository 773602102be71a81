r"""Vocabulary-parallel :func:`jaxent.linear_topk_log_probs` (``jax.shard_map``).

Re-exported by :mod:`jaxent.sharded`. Each device walks its ``V/k`` columns of the kernel
in blocks, keeping each row's top-k candidates; the shards' candidates are then gathered
over ``axis_name`` (``[N, shards * k]``, in shard order, so in class-id order) and the top-k
of them taken again, with the mass of the candidates left out added to the tail:

.. math::
    m = \max_i m_i,\quad s_\mathrm{out} = \sum_i s_{\mathrm{out},i}\, e^{z(m_i) - z(m)}
      + \sum_{\text{gathered, not kept}} e^{z_c - z(m)}.

The backward recomputes the local blocks and sums ``d hidden`` over ``axis_name``.
"""

from __future__ import annotations

from jax.typing import ArrayLike

from jaxent import topk as _topk
from jaxent._options import KernelLayout


def linear_topk_log_probs(
    hidden: ArrayLike,
    kernel: ArrayLike,
    k: int,
    *,
    axis_name,
    bias: ArrayLike | None = None,
    kernel_layout: KernelLayout = "dv",
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_tail: bool = False,
    block_size: int | None = None,
    vocab_size: int | None = None,
):
    r"""Vocabulary-parallel :func:`jaxent.linear_topk_log_probs`, inside ``jax.shard_map``.

    .. math:: \log p_{i_j} = z_{i_j} - \log\sum_c e^{z_c},\qquad
        \mathrm{tail} = \log\sum_{c \notin \{i_j\}} e^{z_c} - \log\sum_c e^{z_c}

    over the global vocabulary, the ``k`` ids global and in ``lax.top_k`` order (``z``
    descending, ties by the lower id).

    Args:
      hidden: float ``[..., D]``, this device's tokens (the same on every shard of
        ``axis_name``).
      kernel: this device's ``[D, V/k]`` (``"dv"``) or ``[V/k, D]`` (``"vd"``) block.
      k: a Python int in ``[1, V]`` (it may exceed ``V/k``).
      axis_name: the mesh axis (or tuple of axes) the vocabulary is sharded over.
      bias: optional this device's ``[V/k]`` block.
      kernel_layout, temperature, logit_softcap, where, return_tail, block_size,
        vocab_size: as in :func:`jaxent.linear_topk_log_probs` (``block_size`` counts
        local columns, ``vocab_size`` the global real classes).

    Returns:
      ``(ids, log_probs)`` (``hidden.shape[:-1] + (k,)``) and with ``return_tail`` the
      tail, the same on every shard of ``axis_name``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
      >>> h = jax.random.normal(jax.random.key(0), (6, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> ids, lp = jax.jit(jax.shard_map(
      ...     lambda h, w: jaxent.sharded.linear_topk_log_probs(h, w, 3, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(), P(None, "model")), out_specs=P()))(h, w)
      >>> ref_ids, ref_lp = jaxent.topk_log_probs(h @ w, 3)
      >>> bool((ids == ref_ids).all()), bool(jnp.allclose(lp, ref_lp, atol=1e-5))
      (True, True)
    """
    return _topk.fused_topk_log_probs(
        hidden, kernel, k, bias=bias, kernel_layout=kernel_layout, temperature=temperature,
        logit_softcap=logit_softcap, where=where, return_tail=return_tail,
        block_size=block_size, vocab_size=vocab_size, axis_name=axis_name)
