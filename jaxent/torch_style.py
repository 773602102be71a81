"""PyTorch-style loss objects for people porting ``torch.nn`` code.

They hold the options and call the pure functions; the class axis follows PyTorch
(axis 1 for inputs of rank >= 2, axis 0 for a single unbatched ``(C,)`` input).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxent._options import Reduction
from jaxent.losses import binary_cross_entropy, cross_entropy, nll_loss, soft_cross_entropy


def _class_axis(x: jax.Array) -> int:
    return 1 if x.ndim >= 2 else 0


@dataclasses.dataclass(frozen=True, eq=False)
class CrossEntropyLoss:
    """``torch.nn.CrossEntropyLoss``: integer targets or class probabilities, by dtype.

    **The class axis is 1, as in torch** (``(N, C)``, ``(N, C, d1, ..., dk)``), and 0 for a
    single unbatched ``(C,)`` input. This differs from :func:`jaxent.cross_entropy`, whose
    ``axis`` defaults to -1 as in JAX: for logits ``[2, 7, 7]`` and labels ``[2, 7]`` both
    readings fit the shapes, and ``CrossEntropyLoss()(x, y)`` equals
    ``cross_entropy(x, y, axis=1)``, not ``cross_entropy(x, y)``.

    Args:
      weight: optional per-class weights ``[C]``; ``"mean"`` divides by the summed weights
        of the counted labels (integer targets) or by the number of rows (probabilities).
      ignore_index: target value that counts for nothing (integer targets only).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      label_smoothing: in ``[0, 1]``, PyTorch's definition.

    Calling it with ``(input, target)``: ``input`` is float logits with the classes on axis
    1 (axis 0 if 1-D); an integer ``target`` is class indices shaped like ``input`` without
    that axis (:func:`jaxent.cross_entropy`), a floating ``target`` is probabilities shaped
    like ``input`` (:func:`jaxent.soft_cross_entropy`).

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> loss_fn = jaxent.CrossEntropyLoss(label_smoothing=0.1)
      >>> x = jnp.array([[1.5, 0.3, 2.1], [2.0, 1.0, 0.1]])
      >>> round(float(loss_fn(x, jnp.array([2, 0]))), 4)
      0.5663
      >>> import jax
      >>> x3 = jax.random.normal(jax.random.key(0), (2, 7, 7))      # (N, C, d1)
      >>> y3 = jax.random.randint(jax.random.key(1), (2, 7), 0, 7)
      >>> bool(jaxent.CrossEntropyLoss()(x3, y3) == jaxent.cross_entropy(x3, y3, axis=1))
      True
      >>> bool(jaxent.CrossEntropyLoss()(x3, y3) == jaxent.cross_entropy(x3, y3))
      False
    """

    weight: ArrayLike | None = None
    ignore_index: int = -100
    reduction: Reduction = "mean"
    label_smoothing: float = 0.0

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:  # noqa: A002
        """The loss of ``input`` logits (classes on axis 1) against ``target``."""
        x, t = jnp.asarray(input), jnp.asarray(target)
        axis, reduction = _class_axis(x), self.reduction
        if jnp.issubdtype(t.dtype, jnp.floating):
            if self.ignore_index >= 0:
                raise ValueError(
                    f"`ignore_index`={self.ignore_index} is not supported for probability "
                    "targets (floating-point `target`), as in PyTorch (which refuses "
                    "ignore_index >= 0 there); mask with "
                    "jaxent.soft_cross_entropy(..., where=...) instead"
                )
            return soft_cross_entropy(x, t, axis=axis, weight=self.weight,
                                      reduction=reduction,
                                      label_smoothing=self.label_smoothing)
        return cross_entropy(x, t, axis=axis, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=reduction,
                             label_smoothing=self.label_smoothing)


@dataclasses.dataclass(frozen=True, eq=False)
class NLLLoss:
    """``torch.nn.NLLLoss`` on log-probabilities; the class axis is 1 as in torch (0 for an
    unbatched ``(C,)`` input), unlike :func:`jaxent.nll_loss`'s -1."""

    weight: ArrayLike | None = None
    ignore_index: int = -100
    reduction: Reduction = "mean"

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:  # noqa: A002
        """The loss of ``input`` log-probabilities (classes on axis 1) against ``target``."""
        x = jnp.asarray(input)
        return nll_loss(x, target, axis=_class_axis(x), weight=self.weight,
                        ignore_index=self.ignore_index, reduction=self.reduction)


@dataclasses.dataclass(frozen=True, eq=False)
class BCEWithLogitsLoss:
    """``torch.nn.BCEWithLogitsLoss``."""

    weight: ArrayLike | None = None
    reduction: Reduction = "mean"
    pos_weight: ArrayLike | None = None

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:  # noqa: A002
        """The loss of ``input`` logits against ``target`` probabilities (same shape)."""
        return binary_cross_entropy(input, target, weight=self.weight,
                                    pos_weight=self.pos_weight, reduction=self.reduction)
