"""Loss and gradient with the gradient written into the logits' own buffer.

For callers who compute logits outside a jitted train step (or hand them between programs)
and no longer need them once the gradient exists: donating the logits lets XLA write the
gradient over them instead of allocating (and page-faulting) a fresh ``[N, C]`` buffer.
Inside a single jitted train step this is automatic: XLA reuses the logits' buffer, an
intermediate, on its own.
"""

from __future__ import annotations

import functools

import jax
from jax.typing import ArrayLike

from jaxent._options import Reduction, Residual
from jaxent.losses import cross_entropy

_STATIC = ("axis", "ignore_index", "label_smoothing", "reduction", "z_loss", "logit_softcap",
           "temperature", "residual")


def cross_entropy_and_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
    where: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    residual: Residual = "auto",
) -> tuple[jax.Array, jax.Array]:
    """``jax.value_and_grad(cross_entropy)`` that **donates** ``logits`` to the gradient.

    Same options and numbers as :func:`jaxent.cross_entropy` (``reduction`` must give a
    scalar: ``"mean"`` or ``"sum"``). After the call ``logits`` is deleted: its buffer now
    holds the gradient. Label values are not range-checked here (the function is jitted):
    out-of-range labels give ``nan``, as under ``jit``.

    Returns:
      ``(loss, dlogits)``: float32 scalar, gradient shaped and typed like ``logits``.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> logits = jnp.array([[2.0, 1.0, 0.1]])
      >>> loss, dlogits = jaxent.cross_entropy_and_grad(logits, jnp.array([0]))
      >>> round(float(loss), 4), dlogits.shape
      (0.417, (1, 3))
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`reduction` must be 'mean' or 'sum' (a scalar loss to "
                         f"differentiate), got {reduction!r}")
    return _donated(logits, labels, axis=axis, weight=weight, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, reduction=reduction, where=where,
                    z_loss=z_loss, logit_softcap=logit_softcap, temperature=temperature,
                    residual=residual)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=_STATIC)
def _donated(logits, labels, **kw):
    return jax.value_and_grad(functools.partial(cross_entropy, **kw))(logits, labels)
