r"""Token compaction: walk only the counted rows of a fused head.

Prompt tokens and padding are often most of an RL or fine-tuning batch, yet a fused head
walks every row. With ``capacity=K`` (a static Python int) the fronts gather the counted
rows (label not ``ignore_index``, ``where`` True) into a buffer of ``K`` rows, run the
head on that buffer alone, and scatter its per-row results back (0 on rows not counted):

.. math::
    \mathrm{idx} = \mathrm{nonzero}(\mathrm{counted}, \mathrm{size}=K),\quad
    \mathrm{out}[\mathrm{idx}_j] = f(h[\mathrm{idx}_j]) \ (j < \#\mathrm{counted}).

Time and memory of the walk scale with ``K``, not with the number of rows. Values and
gradients are those of the uncompacted call: the gather's transpose sends the rows'
gradients back to ``hidden`` (zeros on rows not counted), the kernel and bias get theirs
in full, and a ``"mean"`` divides by the number of counted rows (the buffer's mask), not
by ``K``.

**Overflow** (more counted rows than ``K``): with concrete inputs a ``ValueError`` naming
``capacity`` and both counts; under ``jit`` every float result and every gradient is
``nan`` (the rows are multiplied by ``nan`` before the gather), never a silently wrong number, and
``jax.experimental.checkify.checkify`` reports it (through
:data:`jaxent._checks.label_check_p`, which costs nothing in programs that do not ask).

Compaction is for the single-device, token-local path (inside a caller's own
``shard_map`` too); the fronts refuse ``capacity`` when they would place the call on a mesh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxent import _checks, _heads, _rowmath
from jaxent.placement import auto as _auto
from jaxent.placement import explicit as _explicit


def check(capacity) -> int | None:
    """``capacity`` as a Python int ``>= 1`` (or None), else ``ValueError`` naming it."""
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer):
        raise ValueError(
            f"`capacity` must be None or a static Python int >= 1 (rows of the compaction "
            f"buffer), got {type(capacity).__name__} {capacity!r}")
    if capacity < 1:
        raise ValueError(f"`capacity` must be a Python int >= 1 (rows of the compaction "
                         f"buffer), got {int(capacity)}")
    return int(capacity)


def refuse_placed(placed: bool, what: str) -> None:
    """``ValueError``: ``capacity`` is for the single-device, token-local path."""
    if placed:
        raise ValueError(
            f"`capacity` is for the single-device (token-local) path of `{what}`, but the "
            "inputs are placed on a mesh of several devices; pass capacity=None there, or "
            "call it inside your own jax.shard_map on each device's tokens")


def counted_labels(labels: jax.Array, ignore_index: int, where: jax.Array | None):
    """The rows a label loss counts: label not ``ignore_index`` and ``where`` True."""
    keep = ~_rowmath.equals(labels, ignore_index)
    return keep if where is None else keep & where


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer) and (
        not isinstance(x, jax.Array) or x.is_fully_addressable)


def run(fn: Callable[..., Any], capacity: int, counted: jax.Array,
        rows: Mapping[str, ArrayLike | None]):
    """``fn(valid, **rows)`` on the counted rows only, its per-row results scattered back.

    Args:
      fn: the head on a buffer: ``fn(valid [K], **{name: x [K, ...]})``, returning a pytree
        of scalars (reductions over the buffer; ``valid`` is the buffer's ``where``) and
        per-row ``[K, ...]`` arrays.
      capacity: ``K``, a Python int ``>= 1`` (:func:`check`); at most the number of rows
        is used.
      counted: boolean ``batch_shape``, the rows that count.
      rows: arrays with leading shape ``batch_shape`` (None passes through), gathered.

    Returns:
      ``fn``'s pytree with per-row leaves shaped ``batch_shape + [...]`` (0 on rows not
      counted); on overflow under ``jit`` every float leaf is ``nan``.
    """
    batch_shape = tuple(counted.shape)
    for name, x in rows.items():
        if x is not None and tuple(jnp.shape(x)[:len(batch_shape)]) != batch_shape:
            raise ValueError(
                f"`{name}` must have leading shape {batch_shape} (one row per token), got "
                f"shape {tuple(jnp.shape(x))}")
    n = math.prod(batch_shape)
    if n == 0:
        return fn(counted, **rows)
    cap = min(capacity, n)
    flat = counted.reshape(n)
    count = jnp.sum(flat, dtype=jnp.int32)
    if _concrete(flat) and int(count) > cap:
        raise ValueError(
            f"`capacity`={capacity} holds fewer rows than the {int(count)} counted ones (label "
            f"not ignore_index, `where` True) of {n}: raise `capacity` to at least "
            f"{int(count)}, or pass capacity=None")
    idx = jnp.nonzero(flat, size=cap, fill_value=0)[0].astype(jnp.int32)
    valid = jnp.arange(cap, dtype=jnp.int32) < count
    overflow = count > cap
    scale = _checks.label_check_p.bind(
        jnp.where(overflow, jnp.nan, 1.0).astype(jnp.float32), overflow,
        message=f"`capacity`={capacity} holds fewer rows than are counted (label not "
                "ignore_index, `where` True); the results are nan")

    def gather(x):  # float rows times nan on overflow: every value and gradient is nan
        x = jnp.asarray(x)
        x = x * scale.astype(x.dtype) if _floating(x) else x
        return jnp.take(x.reshape((n,) + x.shape[len(batch_shape):]), idx, axis=0)

    out = fn(valid, **{k: None if x is None else gather(x) for k, x in rows.items()})
    back = jnp.where(valid, idx, n)  # empty slots point past the end and are dropped

    def scatter(y):
        if y.ndim == 0:
            return jnp.where(overflow, jnp.nan, y) if _floating(y) else y
        full = jnp.zeros((n,) + y.shape[1:], y.dtype).at[back].set(y, mode="drop")
        full = full.reshape(batch_shape + y.shape[1:])
        return jnp.where(overflow, jnp.nan, full) if _floating(full) else full

    return jax.tree.map(scatter, out)


# The array arguments of the RL and distillation heads that hold one row per token.
_ROWS = ("hidden", "tokens", "targets", "labels", "student_hidden", "teacher_hidden",
         "teacher_ids", "teacher_log_probs", "teacher_tail")


def head(fn: Callable[..., Any], capacity: int, counted, arrays: dict, static: dict,
         temperature, what: str):
    """:func:`run` of a per-token head ``fn(**arrays, **static, temperature=...)`` (the
    ``fused_*`` functions of :mod:`jaxent.rl` and :mod:`jaxent.distill`).

    ``counted`` is the head's validated mask of counted rows; the row arrays (:data:`_ROWS`)
    and an array ``temperature`` are gathered, ``where`` becomes the buffer's mask. A call
    placed on a mesh raises ``ValueError`` (:func:`refuse_placed`).
    """
    hn = next(n for n in arrays if n.endswith("hidden"))
    kn, bn = hn.replace("hidden", "kernel"), hn.replace("hidden", "bias")
    layout = static["kernel_layout"]
    h, _, _, _, _ = _heads.head(arrays[hn], arrays[kn], arrays[bn], layout, (hn, kn, bn))
    refuse_placed(_explicit.head_layout(arrays[hn], arrays[kn], layout, *arrays.values(),
                                        temperature) is not None
                  or _auto.applies(*(a for a in (*arrays.values(), temperature)
                                     if isinstance(a, jax.Array))), what)
    temp_s, temp = _checks.temperature_array(temperature, counted.shape,
                                             _rowmath.compute_dtype(h.dtype))
    rows = {n: a for n, a in arrays.items() if n in _ROWS}

    def body(valid, temperature=None, **gathered):
        return fn(**{**arrays, **gathered, "where": valid}, **static,
                  temperature=temp_s if temperature is None else temperature)

    return run(body, capacity, counted, {**rows, "temperature": temp})


def _floating(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


DOC = """\
      capacity: None, or a static Python int ``K >= 1``: only the counted rows (label not
        ignored, ``where`` True) are gathered into a ``K``-row buffer and walked, the
        per-row results scattered back (0 elsewhere); same values and gradients. More
        counted rows than ``K``: ``ValueError`` with concrete inputs, ``nan`` results and
        gradients under ``jit`` (``checkify`` reports it). Single-device / token-local
        path only (``ValueError`` when the call would be placed on a mesh)."""
