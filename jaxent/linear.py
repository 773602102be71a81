r"""Fused linear + cross-entropy: ``cross_entropy(hidden @ kernel + bias, labels)`` in blocks.

The front function validates its arguments once (:func:`validate`), then places the call
(:mod:`jaxent.placement`): on one device, split as explicitly sharded inputs say, or split
by the partitioner on an Auto mesh. Each placement runs the same walks (the statistic walk
:mod:`jaxent.impl.linear_ce`, the token walk :mod:`jaxent.impl.token`, the Pallas kernels),
picked from the registry by :func:`jaxent.impl.select`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxent import _checks, _compact, _shift
from jaxent import _rowmath as rm
from jaxent._options import Impl, KernelLayout, Reduction
from jaxent.impl.plan import positive_int
from jaxent.placement import auto as _auto
from jaxent.placement import explicit as _explicit
from jaxent.placement.local import FusedSpec, check_local, fused_call


def validate(hidden, kernel, labels, *, bias, weight, ignore_index, label_smoothing,
             reduction, where, z_loss, logit_softcap, temperature, kernel_layout, block_size,
             token_block_size, impl, return_aux, num_classes=None, interpret=False):
    """Validated ``(hidden, kernel, bias, labels, weight, where, temp, spec)`` of a fused
    call (``temp``: per-row temperatures shaped like ``labels``, or None when static).

    ``num_classes`` is the global vocabulary when ``kernel`` holds one shard of it (then
    ``bias`` may be the shard's too); by default it is the kernel's.
    """
    h = _checks.float_array(hidden, "hidden")
    k = _checks.float_array(kernel, "kernel")
    layout = _checks.kernel_layout(kernel_layout)
    if not isinstance(impl, str):
        raise TypeError(f"`impl` must be a string, got {impl!r}")
    d, v_local = _checks.head_shape(h, k, layout)
    v = v_local if num_classes is None else num_classes
    b = None
    if bias is not None:
        b = _checks.float_array(bias, "bias")
        if b.shape not in ((v,), (v_local,)):
            raise ValueError(
                f"`bias` must have shape ({v},) (one per class, V from `kernel`), got shape "
                f"{tuple(b.shape)}")
    batch_shape = h.shape[:-1]
    temp_s, temp = _checks.temperature_array(
        temperature, batch_shape, rm.compute_dtype(jnp.result_type(h.dtype, k.dtype)))
    opts = _checks.options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        temperature=temp_s, logit_softcap=logit_softcap, ignore_index=ignore_index)
    y = _checks.int_labels(labels, batch_shape, what="hidden.shape[:-1]")
    mask = _checks.where_mask(where, batch_shape)
    w = _checks.class_weight(weight, v)
    y = _checks.label_values(y, v, ignore_index, mask)
    bs = None if block_size is None else positive_int(block_size, "block_size")
    tbs = None if token_block_size is None else positive_int(token_block_size,
                                                             "token_block_size")
    spec = FusedSpec(opts, v, layout, bs, tbs, impl, bool(return_aux), bool(interpret),
                     temp is not None)
    return h, k, b, y, w, mask, temp, spec


def linear_cross_entropy(
    hidden: ArrayLike,
    kernel: ArrayLike,
    labels: ArrayLike,
    *,
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
    token_block_size: int | None = None,
    impl: Impl = "auto",
    return_aux: bool = False,
    interpret: bool = False,
    shift: int = 0,
    capacity: int | None = None,
) -> jax.Array | tuple[jax.Array, dict]:
    r"""``cross_entropy(hidden @ kernel + bias, labels)`` without materializing the logits.

    With :math:`x = h W + b` accumulated in float32,
    :math:`z = \mathrm{cap}\,\tanh(x / (T\,\mathrm{cap}))` (the cap optional) and
    :math:`\ell = \log\sum_c e^{z_c}` over the :math:`V` classes, each counted token
    contributes

    .. math::
        (1-\epsilon)\, w_y (\ell - z_y) + \frac{\epsilon}{V} \sum_c w_c (\ell - z_c)
        + \lambda_z \ell^2 ,

    exactly :func:`jaxent.cross_entropy` on the product. The vocabulary (and, for
    float32 ``"mean"``/``"sum"`` under differentiation, the tokens) is walked in blocks
    with a hand-written ``jax.custom_vjp``: extra memory is ``O(N * block_size)`` (or
    ``O(token_block_size * V)``), never ``O(N * V)``.

    **Sharded inputs.** When the inputs' types carry shardings over a mesh with explicit axes
    (``jax.make_mesh``'s default, ``AxisType.Explicit``), the loss splits as they say, under
    plain ``jax.jit`` or eagerly: a kernel sharded along its vocabulary axis dispatches to
    the vocabulary-parallel walk of :func:`jaxent.sharded.linear_cross_entropy` in a
    ``jax.shard_map`` (tokens split over the mesh axes of ``hidden``'s leading axes; ``[N]``
    row statistics and ``d hidden`` are all-reduced, no ``[N, V]`` array or whole kernel
    is gathered); a kernel not sharded along the vocabulary runs this function on each
    device's tokens. Values and gradients are the single-device ones. On meshes with
    ``AxisType.Auto`` axes (``Mesh(devices, names)``, or ``jax.make_mesh(...,
    axis_types=(AxisType.Auto, ...))``) the placement of traced values is only known when
    compiling: with more than one device the per-token work is a
    ``jax.experimental.custom_partitioning`` call that the partitioner splits the same way
    once it knows the shardings (when an input is placed on such a mesh, or the mesh is set
    with ``jax.set_mesh``; an unplaced call is the one-device program): vocabulary-parallel
    over the kernel's vocabulary axis, token-parallel over ``hidden``'s first axis; no
    ``[N, V]`` logits or whole kernel gathered. Axes that do not divide ``V`` or ``N``, a
    kernel sharded along ``D`` or shardings without a mesh are gathered first; under
    ``jax.vmap`` the single-device walk runs (and is partitioned by XLA as it sees fit).

    Args:
      hidden: float ``[..., D]`` (e.g. ``[batch, seq, D]``); bf16/f16 accumulate in float32.
      kernel: float ``[D, V]`` (Flax ``nnx.Linear``/``Dense``, ``kernel_layout="dv"``) or
        ``[V, D]`` (a tied ``nnx.Embed`` table, ``kernel_layout="vd"``).
      labels: integer ``[...]``, ``hidden.shape[:-1]``.
      bias: optional float ``[V]``.
      weight: optional per-class weights ``[V]`` (constants, no gradient).
      ignore_index: label value that counts for nothing.
      label_smoothing: in ``[0, 1]``, PyTorch's definition over all ``V`` classes.
      reduction: ``"mean"`` (divides by the summed weights of counted labels; with
        ``shift=1`` the last positions are not counted), ``"sum"`` or ``"none"`` (shape of
        ``labels``).
      where: optional boolean mask shaped like ``labels``.
      z_loss: coefficient of ``logsumexp(z)**2`` per counted token.
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)``.
      temperature: logits are divided by it first: a number, or an array broadcastable to
        ``labels.shape`` (one temperature per row; a constant). Values must be finite and
        > 0: concrete ones that are not raise ``ValueError``, traced ones give ``nan``.
      kernel_layout: ``"dv"`` for ``[D, V]`` kernels, ``"vd"`` for ``[V, D]`` tables.
      block_size: vocabulary columns per block (default: from the shapes, about 16 MB of
        float32 temporaries per block); also the slice width of the token schedule's
        kernel-gradient update. Per device when split over devices (above).
      token_block_size: tokens per block of the token schedule (default: from the shapes).
      impl: ``"auto"`` (the platform's choice, :mod:`jaxent._platform`), ``"xla"`` (the
        XLA walks' choice), ``"vocab"`` (vocabulary blocks, recompute in the backward) or
        ``"token"`` (gradient made in the forward; float32/float64, ``"mean"``/``"sum"``,
        whole vocabulary rows on each device) or ``"pallas"`` (Pallas kernels built from the
        cross-entropy's row statistic, as every fused head's: Triton on NVIDIA GPUs,
        Mosaic on TPUs; one device or token-parallel). An ``impl`` that
        cannot serve the call raises ``ValueError`` saying why (on Auto meshes, where the
        split is only known when compiling, ``"token"`` makes the gradient in the forward
        from a vocabulary walk on vocabulary shards).
      return_aux: also return a dict of per-token extras computed in the same pass, shaped
        like ``labels`` and carrying no gradient: ``"lse"`` (log-sum-exp of ``z``),
        ``"z_loss"`` (``z_loss * lse**2``, 0 where not counted), ``"argmax"`` (predicted
        class, int32) and the scalar ``"accuracy"`` over counted tokens.
      interpret: with ``impl="pallas"``, run the kernels in Pallas's interpret mode (on
        the CPU; without it a CPU program raises ``ValueError`` when compiled).
{shift}
{capacity}
        With ``return_aux``, the per-token extras of rows not counted are 0.

    Returns:
      float32 (float64 for float64 inputs) scalar, or ``labels.shape`` for ``"none"``;
      with ``return_aux=True`` a pair ``(loss, aux)``. Gradients w.r.t. ``hidden``,
      ``kernel`` and ``bias`` come back in their dtypes. Labels outside ``[0, V)`` raise
      ``ValueError`` when concrete; under ``jit`` their losses are ``nan``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxent
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 8))     # [batch, seq, D]
      >>> w = jax.random.normal(jax.random.key(1), (8, 50)) / 4   # [D, V]
      >>> y = jnp.array([[1, 7, 49], [0, -100, 3]])
      >>> loss = jaxent.linear_cross_entropy(h, w, y, block_size=16)
      >>> ref = jaxent.cross_entropy(h @ w, y)
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True
      >>> dh, dw = jax.grad(jaxent.linear_cross_entropy, argnums=(0, 1))(h, w, y)
      >>> dh.shape, dw.shape
      ((2, 3, 8), (8, 50))

      Causal-LM labels (``shift=1``: position t against token t+1) with only the counted
      tokens walked (``capacity``; here 3 of the 6 rows are counted):

      >>> y = jnp.array([[4, 9, -100], [-100, 2, 5]])
      >>> loss = jaxent.linear_cross_entropy(h, w, y, shift=1, capacity=4)
      >>> ref = jaxent.cross_entropy((h @ w)[:, :-1], y[:, 1:])
      >>> bool(jnp.allclose(loss, ref, rtol=1e-5))
      True

      A Flax NNX language-model head with tied embeddings (the table is ``[V, D]``)::

        class LM(nnx.Module):
            def __init__(self, vocab, dim, *, rngs):
                self.embed = nnx.Embed(vocab, dim, rngs=rngs)
                ...

            def loss(self, tokens, labels):
                h = self.body(self.embed(tokens))                  # [B, T, D]
                return jaxent.linear_cross_entropy(
                    h, self.embed.embedding[...], labels, kernel_layout="vd",
                    z_loss=1e-4)

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024),
      https://arxiv.org/abs/2411.09009;
      Hsu et al., "Liger Kernel" (2024), https://arxiv.org/abs/2410.10989.
    """
    cap = _compact.check(capacity)
    h, k, b, y, w, mask, temp, spec = validate(
        hidden, kernel, labels, bias=bias, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, where=where, z_loss=z_loss,
        logit_softcap=logit_softcap, temperature=temperature, kernel_layout=kernel_layout,
        block_size=block_size, token_block_size=token_block_size, impl=impl,
        return_aux=return_aux, interpret=interpret)
    y, mask = _shift.labels(shift, y, mask)
    layout = _explicit.layout_of(h, k, b, y, w, mask, spec.layout)
    if cap is not None:
        _compact.refuse_placed(layout is not None or _auto.applies(h, k, b, y, w, mask, temp),
                               "linear_cross_entropy")
        return _compact.run(
            lambda valid, hidden, labels, temp: fused_call(spec, hidden, k, b, labels, w, valid,
                                                           temp=temp),
            cap, _compact.counted_labels(y, spec.opts.ignore_index, mask),
            {"hidden": h, "labels": y, "temp": temp})
    if layout is not None:
        return _explicit.run(spec, layout, h, k, b, y, w, mask, temp)
    if _auto.applies(h, k, b, y, w, mask, temp):
        return fused_call(spec, h, k, b, y, w, mask, temp=temp, auto_mesh=True)
    check_local(spec, h, k)
    return _local(spec, h, k, b, y, w, mask, temp)


@functools.partial(jax.jit, static_argnums=0)
def _local(spec: FusedSpec, h, k, b, y, w, mask, temp):
    """The one-device program, compiled once per configuration (an eager call runs it
    whole, not op by op)."""
    return fused_call(spec, h, k, b, y, w, mask, temp=temp)


linear_cross_entropy.__doc__ = (linear_cross_entropy.__doc__ or "").replace(
    "{shift}", _shift.DOC).replace("{capacity}", _compact.DOC)
