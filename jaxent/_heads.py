"""What the per-token RL and distillation fronts share: validation of a head, the walk's
plan, per-row temperatures and the reduction of per-token losses.

Private to the package (:mod:`jaxent.rl` and :mod:`jaxent.distill` call it); the formulas are
the statistics' (:mod:`jaxent.impl.stats`), walked by :func:`jaxent.impl.stream.run`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxent import _checks
from jaxent._options import LAYOUTS, Options
from jaxent.impl import Request, implementation, select, stream
from jaxent.impl.plan import Plan, positive_int, stream_plan
from jaxent.placement import auto as _auto
from jaxent.placement import explicit

IMPLS = ("auto", "xla", "vocab", "token", "pallas")


def rows(x: jax.Array, axis: int) -> jax.Array:
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (-1 fails for 0 classes)


def reduce(losses: jax.Array, counted: jax.Array, reduction: str,
            token_axis_name=None) -> jax.Array:
    """``"none"``: as is; ``"sum"``; ``"mean"``: sum / count of ``counted``, 0.0 when
    nothing is counted; with ``token_axis_name`` summed over the shards of the tokens."""
    if reduction == "none":
        return losses
    total, count = losses.sum(), counted.sum()
    if token_axis_name is not None:
        total, count = lax.psum(total, token_axis_name), lax.psum(count, token_axis_name)
    if reduction == "sum":
        return total
    return total / jnp.maximum(count, 1).astype(total.dtype)


def check_reduction(value) -> None:
    if value not in ("mean", "sum", "none"):
        raise ValueError(f"`reduction` must be one of ('mean', 'sum', 'none'), got {value!r}")


def check_impl(value, served: tuple[str, ...] = IMPLS, what: str = "",
               why: str = "only the vocabulary walk does") -> None:
    """``value`` is an implementation name; ``served`` the ones this call runs (``what``
    names the call and ``why`` says why in the error for one it does not)."""
    if value not in IMPLS:
        raise ValueError(f"`impl` must be one of {IMPLS}, got {value!r}")
    if value not in served:
        raise ValueError(f"`impl`={value!r} cannot serve {what}: {why}; implementations "
                         f"that can: {served}")


def place(fused, shard, arrays: dict, static: dict, temperature, impl, out):
    """The one entry of a fused RL or distillation head: ``impl`` checked, then the call
    split as the inputs' Explicit-mesh shardings say (``shard(vocab_axes, token_axes,
    **kwargs)`` per device, :func:`jaxent.placement.explicit.run_head`; ``out`` the
    outputs' layouts), else ``fused(**arrays, **static, temperature=temperature)``."""
    check_impl(impl)
    placed = explicit.run_head(shard, arrays, static, temperature, out)
    if placed is not None:
        return placed
    return fused(**arrays, **static, temperature=temperature)


def aux_dict(result, names: tuple[str, ...] | None):
    """A fused head's ``(out, aux tuple)`` as ``(out, {name: aux})`` (``names`` in the aux's
    order), or ``result`` itself when ``names`` is None (no ``return_aux``)."""
    if names is None:
        return result
    out, aux = result
    return out, dict(zip(names, aux, strict=True))


def checked_block_size(block_size) -> int | None:
    if block_size is not None and (isinstance(block_size, bool)
                                   or not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"`block_size` must be a positive Python int or None, got "
                         f"{block_size!r}")
    return block_size


def vocab(vocab_size, columns: int, kernel_name: str = "kernel") -> int:
    """The real vocabulary: ``vocab_size`` (at most the kernel's ``columns``, the rest
    padding) or ``columns``."""
    if vocab_size is None:
        return columns
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            0 < vocab_size <= columns):
        raise ValueError(f"`vocab_size` must be a Python int in [1, {columns}] (the columns "
                         f"of `{kernel_name}`), got {vocab_size!r}")
    return vocab_size


def head(hidden, kernel, bias, layout, names=("hidden", "kernel", "bias"), axis_name=None):
    """Validate a head ``hidden [..., D] @ kernel (+ bias)``; ``(h, k, b, V_local, V)``.

    With ``axis_name`` (inside ``jax.shard_map``) the kernel and bias are this device's
    block of ``V_local = V / k`` columns; else ``V_local = V``.
    """
    hn, kn, bn = names
    if layout not in LAYOUTS:
        raise ValueError(f"`kernel_layout` must be one of {LAYOUTS}, got {layout!r}")
    h = _checks.float_array(hidden, hn)
    k = _checks.float_array(kernel, kn)
    d, local = _checks.head_shape(h, k, layout, hn, kn)
    b = None
    if bias is not None:
        b = _checks.float_array(bias, bn)
        if b.shape != (local,):
            what = "V from" if axis_name is None else "this device's V/k columns of"
            raise ValueError(f"`{bn}` must have shape ({local},) (one per class, {what} "
                             f"`{kn}`), got shape {tuple(b.shape)}")
    dtype = jnp.result_type(h.dtype, k.dtype)
    h = h.reshape(math.prod(h.shape[:-1]), d).astype(dtype)  # (-1 fails for D = 0)
    v = local if axis_name is None else local * lax.axis_size(axis_name)
    return h, k.astype(dtype), None if b is None else b.astype(dtype), local, v


# The walks, jitted with their static plan: eager calls compile once instead of running the
# walk op by op (inside an outer jit these are inlined).
run = jax.jit(stream.run, static_argnums=(0, 1))


def plan(opts: Options, num_classes: int, local: int, n, block_size=None,
          layout: str = "dv", axis_name=None, streams: int = 1, token_block_size=None,
          interpret: bool = False) -> Plan:
    """The walk's plan: ``local`` columns on this device, the first ``num_classes`` of all
    shards real classes (the rest padding); ``token_block_size`` (the token walk's rows per
    block, None: its default) and ``interpret`` (Pallas's interpreter) for the impls that
    use them."""
    shards = 1 if axis_name is None else lax.axis_size(axis_name)
    p = stream_plan(opts, num_classes, local, n, layout=layout,
                    block_size=checked_block_size(block_size), vocab_axis=axis_name,
                    shards=shards, streams=streams)
    if token_block_size is not None:
        p = dataclasses.replace(p, block_n=positive_int(token_block_size, "token_block_size"))
    return dataclasses.replace(p, interpret=bool(interpret))


@functools.cache
def _jitted(fn):
    return jax.jit(fn, static_argnums=(0, 1))


def walk(impl: str, stat, plan: Plan, streams: tuple, rows, cols: dict):
    """``stat`` over linear-head ``streams`` by the implementation ``impl`` selects from the
    registry (:func:`jaxent.impl.select`, kind ``"stat"``: ``"vocab"``, the vocabulary walk
    of :func:`jaxent.impl.stream.run`, for ``"auto"``/``"xla"``; ``"token"``,
    :func:`jaxent.impl.stream_token.run`; ``"pallas"``, the statistic kernels); one that
    cannot serve the call raises ``ValueError`` saying why."""
    h = streams[0][0]
    arrays = [a for ops in streams for a in ops]
    req = Request("stat", h.dtype, "none", vocab_parallel=plan.vocab_axis is not None,
                  static_tokens=isinstance(h.shape[0], int), padded=plan.padded,
                  num_classes=plan.num_classes, row_temperature=rows.temp is not None,
                  auto_mesh=_auto.applies(*arrays))
    entry = implementation("stat", select(impl, req))
    # On an Auto mesh the version the partitioner splits, where the implementation has one.
    run = entry.auto_run if req.auto_mesh and entry.auto_run is not None else entry.run
    return _jitted(run)(stat, plan, streams, rows, cols)


def row_temperature(temperature, batch_shape, acc):
    """``(static T, flat [N] per-row temperatures or None)`` (see
    :func:`jaxent._checks.temperature_array`)."""
    temp_s, temp = _checks.temperature_array(temperature, batch_shape, acc)
    return temp_s, None if temp is None else temp.reshape(-1)


def counted(mask, n):
    return jnp.ones((n,), bool) if mask is None else mask.reshape(-1)
