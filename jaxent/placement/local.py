"""The per-device program of the fused loss: pick the walk, run it, reduce, build the aux.

The same function serves one device and every device of a split: inside ``jax.shard_map``
``vocab_axis`` names the mesh axis the vocabulary is split over (the walk merges its row
statistics over it) and ``token_axis`` the axes the tokens are split over (the reduction
and the accuracy are summed over them). Each implementation's ``run`` comes from the
registry (:func:`jaxent.impl.implementation`), on a mesh with Auto axes its ``auto_run``
(split by the partitioner, :mod:`jaxent.placement.auto`) where it has one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _platform
from jaxent import _rowmath as rm
from jaxent._options import Options
from jaxent.impl import Request, choices, implementation, select
from jaxent.impl._blocks import vocab_axis as _vocab_axis
from jaxent.impl.plan import make_plan


@dataclasses.dataclass(frozen=True)
class FusedSpec:
    """The static part of one fused call (hashable).

    Attributes:
      opts: the loss options.
      num_classes: the global vocabulary ``V``.
      layout: ``"dv"`` or ``"vd"``.
      block_size, token_block_size: block sizes asked for, or None (from the shapes).
      impl: the implementation asked for.
      aux: ``return_aux``.
      interpret: run Pallas kernels in interpret mode (``impl="pallas"`` on the CPU).
      row_temperature: the temperature comes as one value per token (``temp``).
    """

    opts: Options
    num_classes: int
    layout: str
    block_size: int | None
    token_block_size: int | None
    impl: str
    aux: bool
    interpret: bool = False
    row_temperature: bool = False


def _psum(x, axis: Hashable | None):
    return x if axis is None else lax.psum(x, axis)


def reduce_rows(losses, lab: rm.Labels, reduction: str, token_axis: Hashable | None):
    """The reduction of per-token losses (or their sum), over ``token_axis`` too."""
    if reduction == "none":
        return losses
    total, den, count = losses.sum(), lab.row_w.sum(), lab.counted.sum()
    total, den, count = (_psum(a, token_axis) for a in (total, den, count))
    return rm.reduce(total, den, reduction, count)


def aux_dict(lse, arg, lab: rm.Labels, z_loss: float, batch_shape,
             token_axis: Hashable | None = None) -> dict:
    """``return_aux``'s dict from flat ``[N]`` rows: ``lse``, ``z_loss`` and ``argmax``
    shaped ``batch_shape`` (no gradient), and the accuracy over counted rows."""
    lse = lax.stop_gradient(lse)
    hits = _psum(jnp.sum(lab.counted & (arg == lab.y)), token_axis)
    return {
        "lse": lse.reshape(batch_shape),
        "z_loss": jnp.where(lab.counted, z_loss * jnp.square(lse), 0.0).reshape(batch_shape),
        "argmax": arg.reshape(batch_shape),
        "accuracy": hits / jnp.maximum(_psum(jnp.sum(lab.counted), token_axis), 1),
    }


def choose_walk(spec: FusedSpec, h, *, vocab_parallel: bool, padded: bool = False,
                auto_mesh: bool = False) -> str:
    """The walk :func:`jaxent.impl.select` picks for this device's part of the call."""
    req = Request("linear", h.dtype, spec.opts.reduction, vocab_parallel,
                  isinstance(h.shape[0], int), padded, spec.num_classes,
                  spec.row_temperature, auto_mesh)
    return select(spec.impl, req)


def check_local(spec: FusedSpec, hidden, kernel) -> None:
    """Raise, before any tracing, the registry's refusal of an explicit ``impl`` for a
    one-device call of ``hidden [..., D]`` and ``kernel`` (``"auto"`` never refuses)."""
    if spec.impl in ("auto", "xla"):
        return
    n, d = math.prod(hidden.shape[:-1]), hidden.shape[-1]
    rows = jax.ShapeDtypeStruct((n, d), jnp.result_type(hidden.dtype, kernel.dtype))
    local = kernel.shape[_vocab_axis(spec.layout)]
    choose_walk(spec, rows, vocab_parallel=False, padded=local != spec.num_classes)


def fused_call(spec: FusedSpec, hidden, kernel, bias, labels, weight, where, *,
               temp=None, vocab_axis: Hashable | None = None,
               token_axis: Hashable | None = None, auto_mesh: bool = False):
    """:func:`fused_loss` of validated arrays as the user passed them: ``hidden [..., D]``,
    ``labels [...]``, ``where [...]`` or None, ``temp [...]`` (per-row temperatures) or
    None, the full ``weight [V]`` or None."""
    batch_shape = hidden.shape[:-1]
    n, d = math.prod(batch_shape), hidden.shape[-1]
    dtype = jnp.result_type(hidden.dtype, kernel.dtype)
    acc = rm.compute_dtype(dtype)
    w = None if weight is None else weight.astype(acc)
    lab = rm.labels_info(labels, spec.num_classes, spec.opts.ignore_index, where, w, acc,
                         temp)
    run = functools.partial(fused_loss, spec, batch_shape=batch_shape, vocab_axis=vocab_axis,
                            token_axis=token_axis, auto_mesh=auto_mesh)
    args = (hidden.reshape(n, d).astype(dtype), kernel.astype(dtype),
            None if bias is None else bias.astype(dtype), lab, w)
    if spec.impl in ("auto", "xla"):  # the walk is chosen for the lowering's platform
        return _platform.by_platform(run, *args, distinct=choices("linear"))
    return run(*args)


def fused_loss(spec: FusedSpec, h, kernel, bias, lab: rm.Labels, weight, batch_shape, *,
               vocab_axis: Hashable | None = None, token_axis: Hashable | None = None,
               auto_mesh: bool = False):
    """The fused loss of this device's ``h [N, D]`` and kernel columns: the reduced loss,
    and with ``spec.aux`` the aux dict."""
    n, d = h.shape
    local = kernel.shape[_vocab_axis(spec.layout)]
    shards = 1 if vocab_axis is None else lax.axis_size(vocab_axis)
    name = choose_walk(spec, h, vocab_parallel=vocab_axis is not None,
                       padded=local * shards != spec.num_classes, auto_mesh=auto_mesh)
    plan = make_plan(spec.opts, spec.num_classes, local, n, d, spec.layout, spec.aux,
                     shards=shards, vocab_axis=vocab_axis, block_size=spec.block_size,
                     token_block_size=spec.token_block_size, interpret=spec.interpret)
    impl = implementation("linear", name)
    assert impl.run is not None, f"{name} has no fused run"
    run = impl.run
    # An implementation without a partitioner-split version runs whole on each device.
    if auto_mesh and impl.auto_run is not None:
        run = functools.partial(impl.auto_run, spec)
    with jax.named_scope(f"jaxent_{name}"):  # names the walk in the lowered program
        out, (lse, arg) = run(plan, h, kernel, bias, lab, weight)
    loss = reduce_rows(out.reshape(batch_shape) if impl.per_row else out, lab,
                       spec.opts.reduction, token_axis)
    if not spec.aux:
        return loss
    return loss, aux_dict(lse, arg, lab, spec.opts.z_loss, batch_shape, token_axis)

