"""The options object every loss is configured by, and the ``Literal`` types of its strings.

A public call validates its arguments once (:mod:`jaxent._checks`) and builds one frozen,
hashable :class:`Options`; every lower layer (row math, implementations, placements) reads
it, as a ``nondiff_argnums`` argument of the ``jax.custom_vjp`` functions.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import jax

Reduction = Literal["mean", "sum", "none"]
Residual = Literal["auto", "grad", "lse"]
KernelLayout = Literal["dv", "vd"]
Impl = Literal["auto", "xla", "vocab", "token", "pallas"]

REDUCTIONS: tuple[str, ...] = get_args(Reduction)
RESIDUALS: tuple[str, ...] = get_args(Residual)
LAYOUTS: tuple[str, ...] = get_args(KernelLayout)
IMPLS: tuple[str, ...] = get_args(Impl)


@dataclasses.dataclass(frozen=True)
class Options:
    """Static configuration of a softmax loss (hashable; a ``nondiff_argnums`` argument).

    Attributes:
      label_smoothing: ``epsilon`` in ``[0, 1]`` (PyTorch's definition).
      z_loss: coefficient of ``logsumexp(z)**2`` per counted row.
      temperature: logits are divided by it first. A float here; inside a walk the row
        math may see one temperature per row (:func:`jaxent._rowmath.row_options`).
      logit_softcap: ``cap`` of ``cap * tanh(x / cap)``, or None.
      residual: what a plain-CE forward keeps for its backward (``"auto"``, ``"grad"``,
        ``"lse"``).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      ignore_index: the label value that counts for nothing.
    """

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    temperature: float | jax.Array = 1.0
    logit_softcap: float | None = None
    residual: Residual = "auto"
    reduction: Reduction = "mean"
    ignore_index: int = -100

    @property
    def smoothing(self) -> bool:
        """Whether label smoothing needs the (weighted) sum of the logits."""
        return self.label_smoothing > 0.0


# Docstring fragments shared by the public functions' Args sections.
DOC_OPTIONS = """\
      weight: optional per-class weights ``[C]`` (constants: no gradient flows into them).
      ignore_index: label value that counts for nothing (may be a valid class id).
      label_smoothing: in ``[0, 1]``, PyTorch's definition including ``weight``.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape of ``labels``).
      where: optional boolean mask shaped like ``labels``; ``False`` is excluded like
        an ignored label.
      z_loss: coefficient of ``logsumexp(z)**2`` per counted element (PaLM).
      logit_softcap: if given, logits become ``cap * tanh(logits / cap)`` (Gemma 2).
      temperature: logits are divided by it before everything else."""
