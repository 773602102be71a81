r"""Label shift for causal language models: position ``t`` is scored against label ``t + 1``.

``shift=1`` on a loss or head shifts its *labels* (and its ``where`` mask), never the
hidden states or logits: with labels ``y [..., T]`` (the sequence axis is their last axis)

.. math::
    y'_t = y_{t+1} \ (t < T - 1),\qquad \mathrm{where}'_t = \mathrm{where}_{t+1}
    \ (t < T - 1),\qquad \mathrm{where}'_{T-1} = \mathrm{False},

so the last position of each sequence counts for nothing (loss 0, left out of a mean's
count, zero gradient). Only a small integer array and a boolean mask are copied; this is
Apple CCE's ``shift`` and Hugging Face's causal-LM loss (``logits[..., :-1, :]`` against
``labels[..., 1:]``) without slicing the ``[..., T, V]`` activations.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SHIFTS = (0, 1)


def check(shift) -> int:
    """``shift`` as a Python int in :data:`SHIFTS`, else ``ValueError`` naming it."""
    ok = isinstance(shift, int | np.integer) and int(shift) in SHIFTS
    if not ok:
        raise ValueError(
            f"`shift` must be 0 (labels aligned with positions) or 1 (position t scored "
            f"against label t+1, causal-LM style), got {shift!r}")
    return int(shift)


def labels(shift, labels: Any, where: Any, name: str = "labels") -> tuple[Any, Any]:
    """``(labels, where)`` shifted by ``shift`` along the labels' last axis.

    ``shift=0`` returns them unchanged. ``shift=1`` returns ``labels[..., 1:]`` followed by
    a 0 and ``where[..., 1:]`` (all True when ``where`` is None) followed by False: the
    last position is masked out, so its placeholder label is never read or checked.

    >>> y, m = labels(1, jnp.array([[5, 6, 7]]), None)
    >>> y.tolist(), m.tolist()
    ([[6, 7, 0]], [[True, True, False]])
    """
    if check(shift) == 0:
        return labels, where
    y = jnp.asarray(labels)
    if y.ndim == 0:
        raise ValueError(
            f"`shift=1` needs a sequence axis: `{name}` must have shape [..., T] (the "
            "sequence is its last axis), got a scalar")
    if where is None:
        mask = jnp.ones_like(y, dtype=bool)
    else:
        mask = jnp.asarray(where)
        if mask.shape != y.shape:
            raise ValueError(
                f"`where` must have shape {tuple(y.shape)} (shaped like `{name}`), got "
                f"shape {tuple(mask.shape)}")
    if y.shape[-1] == 0:
        return y, mask
    tail = jax.lax.slice_in_dim(y, 0, 1, axis=-1)
    y = jnp.concatenate([y[..., 1:], jnp.zeros_like(tail)], axis=-1)
    mask = jnp.concatenate([mask[..., 1:], jnp.zeros_like(tail, dtype=mask.dtype)], axis=-1)
    return y, mask


def mask(shift, where: Any, shape, name: str = "labels") -> Any:
    """The mask of counted positions ``where`` (None: all) shifted by ``shift`` (for losses
    whose labels only mask, e.g. distillation).

    >>> mask(1, jnp.array([True, False, True]), (3,)).tolist()
    [False, True, False]
    """
    return labels(shift, jnp.zeros(shape, jnp.int32), where, name)[1]


DOC = """\
      shift: 0, or 1 for causal language models: position ``t`` is scored against label
        ``t + 1`` of the same sequence (the labels' last axis) and the last position
        counts for nothing (0, left out of ``"mean"``'s count, zero gradient). ``where``
        marks labels and is shifted with them; the activations are not copied (Apple
        CCE's ``shift``, Hugging Face's causal-LM loss)."""
