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

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> loss_fn = jaxent.CrossEntropyLoss(label_smoothing=0.1)
      >>> x = jnp.array([[1.5, 0.3, 2.1], [2.0, 1.0, 0.1]])
      >>> round(float(loss_fn(x, jnp.array([2, 0]))), 4)
      0.5663
    """

    weight: ArrayLike | None = None
    ignore_index: int = -100
    reduction: Reduction = "mean"
    label_smoothing: float = 0.0

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:  # noqa: A002
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
    """``torch.nn.NLLLoss`` on log-probabilities."""

    weight: ArrayLike | None = None
    ignore_index: int = -100
    reduction: Reduction = "mean"

    def __call__(self, input: ArrayLike, target: ArrayLike) -> jax.Array:  # noqa: A002
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
        return binary_cross_entropy(input, target, weight=self.weight,
                                    pos_weight=self.pos_weight, reduction=self.reduction)
