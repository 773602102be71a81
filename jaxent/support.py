r"""Log-probabilities renormalized over the sampler's support: top-k, top-p, min-p, or a
list of allowed ids per token.

An RL trainer that scores sampled tokens with the full softmax while the sampler drew them
from a truncated one gets biased importance ratios; these heads replay the sampler's mask.
With :math:`z` the temperature-scaled, soft-capped logits (as in
:func:`jaxent.token_log_probs`) and :math:`S` the allowed set of a row:

.. math::
    \log p'_y = z_y - \log\sum_{c\in S} e^{z_c}\ \ (y\in S),\qquad
    \log p'_y = -\infty\ \ (y\notin S),\qquad H' = -\sum_{c\in S} p'_c\log p'_c.

The order of the filters, the ties and the gradient convention are those of
:mod:`jaxent.impl.support` (and ``docs/support.md``); ``max_candidates`` bounds the top-p
nucleus that is found exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxent import _checks, _heads, _rowmath
from jaxent._options import Impl, KernelLayout, Options
from jaxent.impl import support as sup
from jaxent.placement import explicit as _explicit

_FILTERS = ("top_k", "top_p", "min_p")


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer) and (
        not isinstance(x, jax.Array) or x.is_fully_addressable)


def _row_param(value, name: str, batch_shape, dtype, lo, hi, open_lo: bool, what: str):
    """A sampler parameter as a flat ``[N]`` array (None stays None). Concrete values
    outside the range raise ``ValueError`` naming ``name``; traced ones give ``nan`` rows."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number or an array, got {value!r}")
    arr = jnp.asarray(value)
    integer = name == "top_k"
    if integer and not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be an int or an integer array, got dtype {arr.dtype}")
    if not integer and not (jnp.issubdtype(arr.dtype, jnp.floating)
                            or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be a real number or array, got dtype {arr.dtype}")
    try:
        ok = jnp.broadcast_shapes(arr.shape, tuple(batch_shape)) == tuple(batch_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be a number or an array broadcastable to the tokens' "
                         f"shape {tuple(batch_shape)}, got shape {tuple(arr.shape)}")
    if _concrete(arr):
        a = np.asarray(arr, np.float64)
        good = (a > lo if open_lo else a >= lo) & (a <= hi)
        if not good.all():
            shown = ", ".join(str(v) for v in a[~good].ravel()[:8])
            raise ValueError(f"`{name}` must be {what}, got {shown}")
    arr = lax.stop_gradient(arr.astype(jnp.int32 if integer else dtype))
    return jnp.broadcast_to(arr, batch_shape).reshape(-1)


def _sampler_rows(top_k, top_p, min_p, batch_shape, v: int, acc):
    """``(top_k, top_p, min_p)`` as ``[N]`` arrays or None, and the top-k buffer it needs."""
    k = _row_param(top_k, "top_k", batch_shape, acc, 1, v, False,
                   f"an int in [1, {v}] (the vocabulary), per row or for all")
    p = _row_param(top_p, "top_p", batch_shape, acc, 0.0, 1.0, True,
                   "a float in (0, 1] (1 keeps every class)")
    mp = _row_param(min_p, "min_p", batch_shape, acc, 0.0, 1.0, False,
                    "a float in [0, 1] (0 keeps every class)")
    if k is None:
        need = 0
    elif _concrete(top_k):  # (the value given: a Python int stays static under jit)
        need = int(np.max(np.asarray(top_k))) if k.size else 1
    else:
        need = sup.DEFAULT_CANDIDATES
    return k, p, mp, need


def _check_candidates(max_candidates, need: int, k_concrete: bool) -> None:
    if max_candidates is None:
        return
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or (
            max_candidates < 1):
        raise ValueError(f"`max_candidates` must be a positive Python int or None, got "
                         f"{max_candidates!r}")
    if k_concrete and max_candidates < need:
        raise ValueError(f"`max_candidates` ({max_candidates}) must be at least the largest "
                         f"`top_k` ({need})")


def _raise_on_flag(flag) -> None:
    if _concrete(flag) and bool(np.any(np.asarray(flag) > 0)):
        rows = np.argwhere(np.asarray(flag).reshape(-1) > 0)[:8, 0].tolist()
        raise ValueError(
            "the top-p nucleus of some rows needs more than `max_candidates` candidates "
            f"(rows {rows}); raise `max_candidates` (under jit these rows are nan)")


def _allowed(allowed_ids, batch_shape, v: int):
    """``allowed_ids [..., K]`` as ``[N, K]`` int32 (checked when concrete)."""
    ids = jnp.asarray(allowed_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"`allowed_ids` must be an integer array, got dtype {ids.dtype}")
    if ids.ndim != len(batch_shape) + 1 or tuple(ids.shape[:-1]) != tuple(batch_shape):
        raise ValueError(f"`allowed_ids` must have shape tokens.shape + (K,) = "
                         f"{tuple(batch_shape)} + (K,), got shape {tuple(ids.shape)}")
    if ids.shape[-1] == 0:
        raise ValueError("`allowed_ids` must hold at least one id per row (K >= 1)")
    if _concrete(ids):
        a = np.asarray(ids).astype(np.int64)
        bad = (a < -1) | (a >= v)
        if bad.any():
            shown = ", ".join(str(x) for x in a[bad][:8])
            raise ValueError(f"`allowed_ids` must be ids in [0, {v}) or -1 (padding), got "
                             f"{shown}")
    return ids.reshape(math.prod(batch_shape), ids.shape[-1]).astype(jnp.int32)


def _filters_or_ids(allowed_ids, top_k, top_p, min_p) -> None:
    if allowed_ids is not None and any(f is not None for f in (top_k, top_p, min_p)):
        raise ValueError("give either `allowed_ids` or the sampler parameters `top_k`, "
                         "`top_p`, `min_p`, not both")


def _common(tokens, where, temperature, batch_shape, v, acc):
    y = _checks.int_labels(tokens, batch_shape, "tokens")
    mask = _checks.where_mask(where, batch_shape)
    temp_s, temp = _heads.row_temperature(temperature, batch_shape, acc)
    return y, mask, temp_s, temp


def _outputs(lp, ent, batch_shape, return_entropy: bool):
    lp = lp.reshape(batch_shape)
    return (lp, ent.reshape(batch_shape)) if return_entropy else lp


def support_log_probs(
    logits: ArrayLike,
    tokens: ArrayLike,
    *,
    axis: int = -1,
    top_k: int | ArrayLike | None = None,
    top_p: float | ArrayLike | None = None,
    min_p: float | ArrayLike | None = None,
    allowed_ids: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
    max_candidates: int | None = None,
):
    r"""Per-token log-probabilities renormalized over the sampler's support ``S``.

    .. math::
        \log p'_y = z_y - \log\sum_{c\in S} e^{z_c}\ (y\in S;\ -\infty\ \text{else}),
        \qquad H' = -\sum_{c\in S} p'_c\log p'_c

    with :math:`z` the logits divided by ``temperature`` (then soft-capped). ``S`` is
    either ``allowed_ids`` or what the sampler filters keep, applied to the same ``z`` in
    vLLM's order: min-p (``p_c >= min_p * max p``), top-k (``z_c >=`` the ``k``-th largest
    value), then top-p on the distribution renormalized over those (the fewest largest
    values whose mass reaches ``top_p``). Every filter keeps all classes tied with its
    threshold value. Gradients hold ``S`` fixed: :math:`\partial\log p'_y/\partial z_c =
    [c\in S]([c=y] - p'_c)`; a token outside ``S`` has ``-inf`` and no gradient.

    Args:
      logits: float ``[..., C, ...]``, classes along ``axis``.
      tokens: integer, ``logits.shape`` without ``axis``: the sampled tokens.
      axis: the class axis.
      top_k: int in ``[1, C]``, or an integer array broadcastable to ``tokens.shape``.
      top_p: float in ``(0, 1]`` (1: off), or a float array per row.
      min_p: float in ``[0, 1]`` (0: off), or a float array per row.
      allowed_ids: integer ``tokens.shape + (K,)``: the allowed ids of each row, ``-1``
        for padding (repeats count once). Not together with the filters.
      temperature: a number, or an array broadcastable to ``tokens.shape`` (a constant).
      logit_softcap: if given, ``z = cap * tanh(z / cap)``.
      where: optional boolean mask shaped like ``tokens`` (``False``: outputs 0).
      return_entropy: also return ``H'``.
      max_candidates: the largest top-p nucleus (in classes) found exactly (default 1024,
        at least the largest ``top_k``). A longer nucleus raises ``ValueError`` when
        concrete and gives ``nan`` under ``jit``.

    Returns:
      ``log_probs`` float32 shaped like ``tokens``, or ``(log_probs, entropy)``. Bad
      concrete arguments (``top_p`` not in ``(0, 1]``, ``min_p`` not in ``[0, 1]``,
      ``top_k`` not in ``[1, C]``, ids out of range) raise ``ValueError`` naming them;
      traced ones give ``nan`` for their rows.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> x = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
      >>> lp = jaxent.support_log_probs(x, jnp.array([1]), top_p=0.7)
      >>> bool(jnp.allclose(lp, jnp.log(0.3 / 0.8)))  # the nucleus is {0, 1}
      True
      >>> jaxent.support_log_probs(x, jnp.array([2]), top_k=2)
      Array([-inf], dtype=float32)
      >>> lp = jaxent.support_log_probs(x, jnp.array([2]), allowed_ids=jnp.array([[2, 3, -1]]))
      >>> bool(jnp.allclose(lp, jnp.log(0.15 / 0.2)))
      True
    """
    _filters_or_ids(allowed_ids, top_k, top_p, min_p)
    x = _checks.float_array(logits, "logits")
    ax = _checks.normalize_axis(axis, x.ndim)
    cap = _checks.options(reduction="none", logit_softcap=logit_softcap).logit_softcap
    c = _checks.num_classes(x, ax)
    batch_shape = x.shape[:ax] + x.shape[ax + 1:]
    acc = _rowmath.compute_dtype(x.dtype)
    y, mask, temp_s, temp = _common(tokens, where, temperature, batch_shape, c, acc)
    y = _rowmath.class_ids(_checks.token_values(y, c, mask), c).reshape(-1)
    rows = _heads.rows(x, ax)
    n = rows.shape[0]
    counted = _heads.counted(mask, n)
    opts = Options(temperature=temp_s, logit_softcap=cap)
    if allowed_ids is not None:
        ids = _allowed(allowed_ids, batch_shape, c)
        lp, ent = _ids_rows(rows, ids, y, counted, temp, opts=opts,
                            entropy=bool(return_entropy))
        return _outputs(lp, ent, batch_shape, return_entropy)
    k, p, mp, need = _sampler_rows(top_k, top_p, min_p, batch_shape, c, acc)
    _check_candidates(max_candidates, need, k is None or _concrete(top_k))
    stat = sup.Sampler(c, sup.candidates_for(c, need, p is not None, max_candidates),
                       p is not None, bool(return_entropy))
    plan = _heads.plan(opts, c, c, n, max(c, 1))
    lp, ent, flag = _heads.run(stat, plan, ((rows,),),
                               sup.SupportRows(y, counted, temp, k, p, mp), {})
    _raise_on_flag(flag)
    return _outputs(lp, ent, batch_shape, return_entropy)


def linear_support_log_probs(
    hidden: ArrayLike,
    kernel: ArrayLike,
    tokens: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    kernel_layout: KernelLayout = "dv",
    top_k: int | ArrayLike | None = None,
    top_p: float | ArrayLike | None = None,
    min_p: float | ArrayLike | None = None,
    allowed_ids: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
    max_candidates: int | None = None,
    block_size: int | None = None,
    impl: Impl = "auto",
    vocab_size: int | None = None,
    token_block_size: int | None = None,
    interpret: bool = False,
):
    r""":func:`support_log_probs` of ``hidden @ kernel + bias`` without the ``[N, V]``
    logits.

    With the filters, the vocabulary is walked in blocks of ``block_size`` columns
    (:mod:`jaxent.impl.support`): one pass keeps the row max and the top
    ``max_candidates`` logits (``[N, max_candidates]``), one more pass with ``top_p`` sums
    the mass of the min-p/top-k survivors, and the last one sums
    :math:`\sum_{c\in S} e^{z_c}` (and the entropy); the backward recomputes each block,
    so three or four matmuls of the head in all. With ``allowed_ids [..., K]`` only the
    ``K`` columns of each row are computed (``O(N K D)``, in chunks of ``block_size`` ids).

    .. math::
        \log p'_y = z_y - \log\sum_{c\in S} e^{z_c},\qquad
        \frac{\partial\log p'_y}{\partial z_c} = [c\in S]([c=y] - p'_c)

    Args:
      hidden: float ``[..., D]``.
      kernel: float ``[D, V]`` (``"dv"``) or ``[V, D]`` (``"vd"``).
      tokens: integer ``hidden.shape[:-1]``.
      bias: optional float ``[V]``.
      kernel_layout: ``"dv"`` or ``"vd"``.
      top_k, top_p, min_p, allowed_ids, temperature, logit_softcap, where: as in
        :func:`support_log_probs`.
      return_entropy, max_candidates: as in :func:`support_log_probs`.
      block_size: vocabulary columns per block (default: about 16 MB of float32 logits).
      impl: ``"auto"``, ``"xla"`` or ``"vocab"`` (the vocabulary walk), or ``"token"``
        (blocks of ``token_block_size`` whole rows, :mod:`jaxent.impl.stream_token`); with
        ``allowed_ids`` all compute the ``K`` ids' columns alone. ``"pallas"``: the
        statistic kernels (:mod:`jaxent.impl.pallas_stats`) with the candidates merged by
        max extraction (:class:`jaxent.impl.support.SamplerTiles`; NVIDIA GPUs and TPUs, or
        ``interpret``); not with ``allowed_ids`` nor a vocabulary-sharded kernel.
      vocab_size: the real classes when the kernel holds padding columns after them.
      token_block_size: rows per block of ``impl="token"`` (default: its plan's).
      interpret: with ``impl="pallas"``, run the kernels in Pallas's interpret mode.

    Returns:
      ``log_probs`` shaped like ``tokens`` (float32), or ``(log_probs, entropy)``;
      gradients w.r.t. ``hidden``, ``kernel``, ``bias`` in their dtypes.

    On a mesh with ``AxisType.Explicit`` axes the split is read from the inputs' types
    (:mod:`jaxent.placement.explicit`): a kernel sharded along its vocabulary runs the
    vocabulary-parallel head (:func:`sharded_linear_support_log_probs`) in a
    ``jax.shard_map``, the tokens split as ``hidden``'s token axes are; per-row sampler
    parameters and ``allowed_ids`` follow the tokens. The arguments are checked, and the
    candidate buffer sized, from the whole batch first, as on one device.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50))
      >>> y = jnp.argmax(h @ w, axis=-1)  # the most likely token is in every support
      >>> lp = jaxent.linear_support_log_probs(h, w, y, top_k=5, top_p=0.9, block_size=16)
      >>> ref = jaxent.support_log_probs(h @ w, y, top_k=5, top_p=0.9)
      >>> bool(jnp.allclose(lp, ref, atol=1e-5))
      True
    """
    _heads.check_impl(impl, ("auto", "xla", "vocab", "token", "pallas"), "the support head")
    if impl == "pallas" and allowed_ids is not None:
        raise ValueError("impl='pallas' serves the sampler's filters (top_k, top_p, min_p), "
                         "not allowed_ids; use impl='vocab' or 'token'")
    kw = dict(bias=bias, kernel_layout=kernel_layout, top_k=top_k, top_p=top_p, min_p=min_p,
              allowed_ids=allowed_ids, temperature=temperature, logit_softcap=logit_softcap,
              where=where, return_entropy=return_entropy, max_candidates=max_candidates,
              block_size=block_size, vocab_size=vocab_size, impl=impl,
              token_block_size=token_block_size, interpret=bool(interpret))
    if _explicit.head_layout(hidden, kernel, kernel_layout, tokens, bias, top_k, top_p,
                             min_p, allowed_ids, temperature, where) is not None:
        placed = _place(hidden, kernel, tokens, **kw)
        if placed is not None:
            return placed
    return fused_support_log_probs(hidden, kernel, tokens, **kw)


def _place(hidden, kernel, tokens, *, top_k, top_p, min_p, allowed_ids, max_candidates,
           vocab_size, **kw):
    """:func:`linear_support_log_probs` split on an Explicit mesh
    (:func:`jaxent.placement.explicit.run_head`): the arguments checked on the whole batch
    first (in the split they are traced), the candidate buffer sized from them, per-row
    sampler parameters passed as arrays shaped like the tokens, Python numbers as they
    are; a nucleus longer than the buffer raises here as on one device."""
    _filters_or_ids(allowed_ids, top_k, top_p, min_p)
    batch_shape = tuple(jnp.shape(hidden)[:-1])
    v = _heads.vocab(vocab_size, _checks.head_shape(
        _checks.float_array(hidden, "hidden"), _checks.float_array(kernel, "kernel"),
        kw["kernel_layout"], "hidden", "kernel")[1])
    acc = _rowmath.compute_dtype(jnp.result_type(hidden, kernel))
    arrays = {"hidden": hidden, "kernel": kernel, "tokens": tokens, "bias": kw.pop("bias"),
              "where": kw["where"]}
    static = {k: a for k, a in kw.items() if k not in ("where", "temperature")}
    static["vocab_size"] = vocab_size
    if allowed_ids is not None:
        arrays["allowed_ids"] = _allowed(allowed_ids, batch_shape, v).reshape(
            *batch_shape, -1)
        static.update(max_candidates=max_candidates, top_k=None, top_p=None, min_p=None)
    else:
        static["allowed_ids"] = None
        flat = _sampler_rows(top_k, top_p, min_p, batch_shape, v, acc)
        _check_candidates(max_candidates, flat[3], flat[0] is None or _concrete(top_k))
        static["max_candidates"] = sup.candidates_for(v, flat[3], flat[1] is not None,
                                                      max_candidates)
        for name, value, arr in zip(_FILTERS, (top_k, top_p, min_p), flat[:3], strict=True):
            if value is None or isinstance(value, int | float | np.number):
                static[name] = value
            else:
                arrays[name] = arr.reshape(batch_shape)
    ent = bool(kw["return_entropy"])
    placed = _explicit.run_head(_support_shard, arrays, static, kw["temperature"],
                                (("row", "row") if ent else "row", "row"))
    if placed is None:
        return None
    out, flag = placed
    _raise_on_flag(flag)
    return out


def _support_shard(vocab, tok, **kw):
    del tok
    return fused_support_log_probs(**kw, axis_name=vocab, return_flag=True)


def sharded_linear_support_log_probs(
    hidden: ArrayLike,
    kernel: ArrayLike,
    tokens: ArrayLike,
    *,
    axis_name,
    bias: ArrayLike | None = None,
    kernel_layout: KernelLayout = "dv",
    top_k: int | ArrayLike | None = None,
    top_p: float | ArrayLike | None = None,
    min_p: float | ArrayLike | None = None,
    allowed_ids: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
    max_candidates: int | None = None,
    block_size: int | None = None,
):
    r"""Vocabulary-parallel :func:`linear_support_log_probs`, inside ``jax.shard_map``
    (``jaxent.sharded.linear_support_log_probs``).

    Each device holds ``V/k`` columns of the kernel (and bias); the row maxima are merged
    with a ``pmax``, the candidate buffers with an ``all_gather`` and a top-k, the sums with
    ``psum``; with ``allowed_ids`` each device computes the logits of the ids it holds and
    one ``psum`` completes them. Per-row arguments are traced here: bad values give
    ``nan`` rows, and a traced ``top_k`` gets a buffer of ``max_candidates`` (default 1024).

    .. math:: \log p'_y = z_y - \log\sum_{c\in S} e^{z_c}

    Args:
      hidden: float ``[..., D]``, this device's tokens.
      kernel: this device's ``[D, V/k]`` or ``[V/k, D]`` block.
      tokens: integer global ids, ``hidden.shape[:-1]``.
      axis_name: the mesh axis (or axes) the vocabulary is sharded over.
      bias: optional this device's ``[V/k]`` block.
      kernel_layout, top_k, top_p, min_p, allowed_ids, temperature: as in
        :func:`linear_support_log_probs`.
      logit_softcap, where, return_entropy, max_candidates, block_size: as in
        :func:`linear_support_log_probs` (``block_size`` counts local columns).

    Returns:
      This device's ``log_probs`` (the same on every shard of ``axis_name``), or
      ``(log_probs, entropy)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> from jax.sharding import AxisType, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
      >>> h = jax.random.normal(jax.random.key(0), (6, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50))
      >>> y = jnp.argmax(h @ w, axis=-1)
      >>> lp = jax.jit(jax.shard_map(
      ...     lambda h, w, y: jaxent.sharded.linear_support_log_probs(
      ...         h, w, y, top_k=3, axis_name="model"),
      ...     mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P()))(h, w, y)
      >>> bool(jnp.allclose(lp, jaxent.support_log_probs(h @ w, y, top_k=3), atol=1e-5))
      True
    """
    return fused_support_log_probs(
        hidden, kernel, tokens, bias=bias, kernel_layout=kernel_layout, top_k=top_k,
        top_p=top_p, min_p=min_p, allowed_ids=allowed_ids, temperature=temperature,
        logit_softcap=logit_softcap, where=where, return_entropy=return_entropy,
        max_candidates=max_candidates, block_size=block_size, axis_name=axis_name)


def _ids_logits(h, k, b, ids, layout: str, block, offset, local: int, axis_name):
    """Raw logits ``[N, K]`` of ``ids`` (global; this device's columns when vocabulary-
    parallel, summed over ``axis_name``), in chunks of ``block`` ids (rematerialized in the
    backward: no ``[N, K, D]`` residual)."""
    n, kk = ids.shape
    acc = _rowmath.compute_dtype(h.dtype)
    chunks = -(-kk // block)
    pad = chunks * block - kk
    lid = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1) - offset
    lid = jnp.moveaxis(lid.reshape(n, chunks, block), 1, 0)

    @jax.checkpoint
    def one(cid):
        here = (cid >= 0) & (cid < local)
        safe = jnp.clip(cid, 0, local - 1)
        if layout == "dv":
            rows = jnp.moveaxis(jnp.take(k, safe, axis=1), 0, -1)  # [N, B, D]
        else:
            rows = jnp.take(k, safe, axis=0)
        x = jnp.einsum("nd,nbd->nb", h, rows, preferred_element_type=acc)
        if b is not None:
            x = x + jnp.take(b, safe).astype(acc)
        return jnp.where(here, x, 0.0)

    x = jnp.moveaxis(lax.map(one, lid), 0, 1).reshape(n, chunks * block)[:, :kk]
    return x if axis_name is None else lax.psum(x, axis_name)


@functools.partial(jax.jit, static_argnames=("opts", "entropy"))
def _ids_rows(rows, ids, y, counted, temp, *, opts, entropy):
    """The allowed-ids outputs of materialized rows ``[N, C]`` (a gather)."""
    c = rows.shape[1]
    sid, member, bad = sup.unique_ids(ids, c)
    xk = jnp.take_along_axis(rows, jnp.clip(sid, 0, max(c - 1, 0)), axis=1)
    return sup.gathered_log_probs(xk, sid, member, bad, y, counted, c,
                                  _rowmath.row_options(opts, temp), entropy)


@functools.partial(jax.jit, static_argnames=("v", "local", "layout", "block", "opts",
                                             "entropy", "axis_name"))
def _ids_head(h, k, b, ids, y, counted, temp, *, v, local, layout, block, opts, entropy,
              axis_name):
    """The allowed-ids outputs of the head: only the ids' columns are computed."""
    sid, member, bad = sup.unique_ids(ids, v)
    offset = 0 if axis_name is None else lax.axis_index(axis_name) * local
    xk = _ids_logits(h, k, b, sid, layout, block, offset, local, axis_name)
    return sup.gathered_log_probs(xk, sid, member, bad, y, counted, v,
                                  _rowmath.row_options(opts, temp), entropy)


def fused_support_log_probs(hidden, kernel, tokens, *, bias, kernel_layout, top_k, top_p,
                            min_p, allowed_ids, temperature, logit_softcap, where,
                            return_entropy, max_candidates, block_size, vocab_size=None,
                            impl="auto", token_block_size=None, interpret=False,
                            axis_name=None, return_flag=False):
    """:func:`linear_support_log_probs`, vocabulary-parallel over ``axis_name`` when
    given; with ``return_flag`` the pair ``(outputs, flag)``, ``flag`` shaped like the
    tokens and positive where a top-p nucleus overflowed the candidates (not raised)."""
    _filters_or_ids(allowed_ids, top_k, top_p, min_p)
    h, k, b, local, v = _heads.head(hidden, kernel, bias, kernel_layout, axis_name=axis_name)
    v = _heads.vocab(vocab_size, v)
    batch_shape = jnp.shape(hidden)[:-1]
    cap = _checks.options(reduction="none", logit_softcap=logit_softcap).logit_softcap
    acc = _rowmath.compute_dtype(h.dtype)
    y, mask, temp_s, temp = _common(tokens, where, temperature, batch_shape, v, acc)
    if axis_name is None:  # (inside shard_map ids are not checked: out-of-range ones give nan)
        y = _checks.token_values(y, v, mask)
    y = _rowmath.class_ids(y, v).reshape(-1)
    n = h.shape[0]
    counted = _heads.counted(mask, n)
    opts = Options(temperature=temp_s, logit_softcap=cap)
    if allowed_ids is not None:
        ids = _allowed(allowed_ids, batch_shape, v)
        budget = (1 << 22) // max(n * h.shape[1], 1)
        block = _heads.checked_block_size(block_size) or max(1, budget)
        lp, ent = _ids_head(h, k, b, ids, y, counted, temp, v=v, local=local,
                            layout=kernel_layout, block=min(block, ids.shape[1]), opts=opts,
                            entropy=bool(return_entropy), axis_name=axis_name)
        out = _outputs(lp, ent, batch_shape, return_entropy)
        return (out, jnp.zeros(batch_shape, jnp.int32)) if return_flag else out
    kr, p, mp, need = _sampler_rows(top_k, top_p, min_p, batch_shape, v, acc)
    _check_candidates(max_candidates, need, kr is None or _concrete(top_k))
    stat = sup.Sampler(v, sup.candidates_for(v, need, p is not None, max_candidates),
                       p is not None, bool(return_entropy))
    plan = _heads.plan(opts, v, local, n, block_size, kernel_layout, axis_name,
                       token_block_size=token_block_size, interpret=interpret)
    lp, ent, flag = _heads.walk(impl, stat, plan, ((h, k, b),),
                                sup.SupportRows(y, counted, temp, kr, p, mp), {})
    out = _outputs(lp, ent, batch_shape, return_entropy)
    if return_flag:
        return out, flag.reshape(batch_shape).astype(jnp.int32)
    _raise_on_flag(flag)
    return out
