r"""Top-k log-probabilities, plain and fused: the ``k`` most likely classes of each row, their
log-probabilities and the log-mass of the rest, without a ``[N, V]`` array in the fused
head.

The top-k candidates are merged block by block across the vocabulary walk and across
vocabulary shards (:class:`jaxent.impl.topk.TopK`); the log-probabilities and the tail are
differentiable (``jax.custom_vjp``, ``O(N k)`` residuals), the ids are integers (no
gradient).
"""

from __future__ import annotations

import operator

import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxent import _checks, _heads, _rowmath
from jaxent._options import Impl, KernelLayout, Options
from jaxent.impl import stats
from jaxent.impl import topk as _topk
from jaxent.placement import explicit as _explicit

# The implementations that serve the top-k statistic (the Pallas kernels through its tiled
# form, jaxent.impl.topk).
WALKS = ("auto", "xla", "vocab", "token", "pallas")


def check_k(k, num_classes: int, name: str = "k") -> int:
    """``k`` as a Python int in ``[1, num_classes]``, else ``ValueError``/``TypeError``
    naming ``name``."""
    if isinstance(k, bool) or not hasattr(k, "__index__") or getattr(k, "ndim", 0) != 0:
        raise TypeError(f"`{name}` must be a Python int (how many classes to keep), got "
                        f"{k!r} of type {type(k).__name__}")
    k = operator.index(k)
    if not 1 <= k <= num_classes:
        raise ValueError(f"`{name}` must be in [1, V] = [1, {num_classes}] (the vocabulary "
                         f"size), got {k}")
    return k


def _outputs(outs, batch_shape, k: int, return_tail: bool):
    ids, lp, tail = outs
    ids, lp = ids.reshape(*batch_shape, k), lp.reshape(*batch_shape, k)
    return (ids, lp, tail.reshape(batch_shape)) if return_tail else (ids, lp)


_DOC = r"""
    With :math:`z = \mathrm{cap}\tanh(x / (T\,\mathrm{cap}))` (the cap optional) and
    :math:`i_1, \dots, i_k` the ``k`` classes of largest :math:`z`:

    .. math::
        \log p_{i_j} = z_{i_j} - \log\sum_c e^{z_c},\qquad
        \mathrm{tail} = \log\Big(1 - \sum_j p_{i_j}\Big)
          = \log\sum_{c \notin \{i_j\}} e^{z_c} - \log\sum_c e^{z_c},

    the tail formed from the classes outside the top-k (no cancellation; ``-inf`` when the
    top-k hold all the mass). **Order:** what ``jax.lax.top_k(z, k)`` of the materialized
    logits gives: ``z`` descending, equal ``z`` by the lower class id first (classes at
    ``-inf`` come last, by id; they tie with classes at ``finfo.min``). The order is by
    ``z``, the logits after
    the temperature and the soft-cap, so two logits that the soft-cap rounds to the same
    value tie. Gradients: :math:`\partial \log p_{i_j} / \partial z_c = [c = i_j] - p_c`
    and :math:`\partial\,\mathrm{tail} / \partial z_c = [c \notin \{i_j\}]\, p_c /
    p_\mathrm{tail} - p_c`; the ids get none (the top-k set is held fixed)."""


def topk_log_probs(
    logits: ArrayLike,
    k: int,
    *,
    axis: int = -1,
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_tail: bool = False,
):
    r"""The ``k`` most likely classes of each row, their log-probabilities and, optionally,
    the log-mass of the others.
    {doc}

    Args:
      logits: float ``[..., V, ...]``, classes along ``axis``; 16-bit logits accumulate in
        float32.
      k: a Python int in ``[1, V]``.
      axis: the class axis.
      temperature: a number, or an array broadcastable to the rows' shape (``logits.shape``
        without ``axis``): one temperature per row. A constant.
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)``.
      where: optional boolean mask shaped like the rows; ``False`` rows give ids ``-1``
        and log-probabilities (and tail) 0, with zero gradient.
      return_tail: also return the tail log-mass.

    Returns:
      ``(ids, log_probs)``: int32 and float32 (float64 for float64 logits), each
      ``rows' shape + (k,)``; with ``return_tail`` also the tail ``[rows' shape]``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> x = jnp.array([[1.0, 3.0, 3.0, -2.0, 0.5]])
      >>> ids, lp, tail = jaxent.topk_log_probs(x, 3, return_tail=True)
      >>> ids
      Array([[1, 2, 0]], dtype=int32)
      >>> ref = jax.nn.log_softmax(x)
      >>> bool(jnp.allclose(lp, ref[0, ids[0]][None], atol=1e-6))
      True
      >>> bool(jnp.allclose(jnp.exp(tail), 1 - jnp.exp(lp).sum(-1), atol=1e-6))
      True
    """
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    v = _checks.num_classes(x, ax)
    k = check_k(k, v)
    cap = _checks.options(reduction="none", logit_softcap=logit_softcap).logit_softcap
    batch_shape = x.shape[:ax] + x.shape[ax + 1:]
    mask = _checks.where_mask(where, batch_shape)
    acc = _rowmath.compute_dtype(x.dtype)
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    rows = _heads.rows(x, ax)
    n = rows.shape[0]
    plan = _heads.plan(Options(temperature=temp_s, logit_softcap=cap), v, v, n, v)
    outs = _heads.run(_topk.TopK(k, bool(return_tail)), plan, ((rows,),),
                      stats.Rows(None, _heads.counted(mask, n), temp), {})
    return _outputs(outs, batch_shape, k, return_tail)


def linear_topk_log_probs(
    hidden: ArrayLike,
    kernel: ArrayLike,
    k: int,
    *,
    bias: ArrayLike | None = None,
    kernel_layout: KernelLayout = "dv",
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_tail: bool = False,
    block_size: int | None = None,
    impl: Impl = "auto",
    vocab_size: int | None = None,
    token_block_size: int | None = None,
    interpret: bool = False,
):
    r""":func:`topk_log_probs` of ``hidden @ kernel + bias`` without materializing logits.
    {doc}

    The vocabulary is walked in blocks of ``block_size`` columns; each block's candidates
    are merged into the running top-k of every row (``lax.top_k`` of ``k + block_size``
    candidates), with an online max and the sum of the evicted candidates' mass. The
    backward recomputes each block. Extra memory ``O(N * (block_size + k))``. With
    ``impl="token"`` the tokens are walked in blocks of ``token_block_size`` rows instead,
    each block's whole vocabulary row at once (``lax.top_k`` of ``k + V`` candidates per
    row; extra memory ``O(token_block_size * V)``).

    Args:
      hidden: float ``[..., D]``.
      kernel: float ``[D, V]`` (``kernel_layout="dv"``) or ``[V, D]`` (``"vd"``).
      k: a Python int in ``[1, V]``.
      bias: optional float ``[V]``.
      kernel_layout: ``"dv"`` or ``"vd"``.
      temperature: a number or an array broadcastable to ``hidden.shape[:-1]``.
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)``.
      where: optional boolean mask ``hidden.shape[:-1]`` (``False``: ids ``-1``, values 0).
      return_tail: also return the tail log-mass.
      block_size: vocabulary columns per block (default: about 16 MB of float32 logits).
      impl: ``"auto"``, ``"xla"`` or ``"vocab"`` (the vocabulary walk), ``"token"``
        (token blocks, each with its whole vocabulary row) or ``"pallas"`` (the statistic
        kernels of :mod:`jaxent.impl.pallas_stats` with the merge of
        :mod:`jaxent.impl.topk`: NVIDIA GPUs and TPUs, or ``interpret``); the last
        two not with a vocabulary split over a mesh axis.
      vocab_size: the number of real classes when the kernel's vocabulary axis holds
        padding columns after them (never chosen; ``k <= vocab_size``).
      token_block_size: ``impl="token"``: tokens per block (default: about 64 MB of
        float32 logits).
      interpret: with ``impl="pallas"``, run the kernels in Pallas's interpret mode.

    Returns:
      ``(ids, log_probs)``, each ``hidden.shape[:-1] + (k,)`` (int32; float32, float64 for
      float64 inputs), and with ``return_tail`` the tail ``hidden.shape[:-1]``. Gradients
      w.r.t. ``hidden``, ``kernel``, ``bias`` come back in their dtypes.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4
      >>> ids, lp = jaxent.linear_topk_log_probs(h, w, 4, block_size=16)
      >>> ref_ids, ref_lp = jaxent.topk_log_probs(h @ w, 4)
      >>> bool((ids == ref_ids).all()), bool(jnp.allclose(lp, ref_lp, atol=1e-5))
      (True, True)
    """
    _heads.check_impl(impl)
    arrays = {"hidden": hidden, "kernel": kernel, "bias": bias, "where": where}
    static = {"k": k, "kernel_layout": kernel_layout, "logit_softcap": logit_softcap,
              "return_tail": bool(return_tail), "block_size": block_size,
              "vocab_size": vocab_size, "impl": impl, "token_block_size": token_block_size,
              "interpret": bool(interpret)}
    placed = _explicit.run_head(_topk_shard, arrays, static, temperature,
                                ("row",) * (3 if return_tail else 2))
    if placed is not None:
        return placed
    return fused_topk_log_probs(**arrays, **static, temperature=temperature)


def _topk_shard(vocab, tok, **kw):
    del tok
    return fused_topk_log_probs(**kw, axis_name=vocab)


def fused_topk_log_probs(hidden, kernel, k, *, bias, kernel_layout, temperature,
                         logit_softcap, where, return_tail, block_size, vocab_size=None,
                         impl="auto", token_block_size=None, interpret=False,
                         axis_name=None):
    """:func:`linear_topk_log_probs`, vocabulary-parallel over ``axis_name`` when given."""
    h, kr, b, local, v = _heads.head(hidden, kernel, bias, kernel_layout,
                                     axis_name=axis_name)
    v = _heads.vocab(vocab_size, v)
    k = check_k(k, v)
    batch_shape = tuple(jnp.shape(hidden)[:-1])
    cap = _checks.options(reduction="none", logit_softcap=logit_softcap).logit_softcap
    mask = _checks.where_mask(where, batch_shape)
    acc = _rowmath.compute_dtype(h.dtype)
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    n = h.shape[0]
    plan = _heads.plan(Options(temperature=temp_s, logit_softcap=cap), v, local, n,
                       block_size, kernel_layout, axis_name,
                       token_block_size=token_block_size, interpret=interpret)
    outs = _heads.walk(impl, _topk.TopK(k, bool(return_tail)), plan, ((h, kr, b),),
                       stats.Rows(None, _heads.counted(mask, n), temp), {})
    return _outputs(outs, batch_shape, k, return_tail)


topk_log_probs.__doc__ = (topk_log_probs.__doc__ or "").replace("{doc}", _DOC)
linear_topk_log_probs.__doc__ = (linear_topk_log_probs.__doc__ or "").replace("{doc}", _DOC)
