"""The implementations of the softmax cross-entropy, behind one signature, for conformance tests.

Every implementation is called as ``impl(x, labels, **options)`` on logits ``x [N, C]``:
the plain losses with either residual, and the fused walks on ``hidden = I_N`` and
``kernel = x`` (``hidden @ kernel`` is then ``x`` exactly, and the gradient w.r.t. the
kernel is the gradient w.r.t. the logits). Tests parametrized over :data:`IMPLS`
(``tests/test_conformance.py``, ``tests/test_robustness.py``) run the same checks on every
path; ``tests/sharded_cases.py`` runs them again with the vocabulary-parallel placements in
the registry.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

import jaxent


def _fused(impl: str, **fixed) -> Callable:
    def loss(x, labels, **kw):
        eye = jnp.eye(x.shape[0], dtype=x.dtype)
        return jaxent.linear_cross_entropy(eye, x, labels, impl=impl, **fixed, **kw)

    return loss


IMPLS: dict[str, Callable] = {
    "rows-grad": lambda x, y, **kw: jaxent.cross_entropy(x, y, residual="grad", **kw),
    "rows-lse": lambda x, y, **kw: jaxent.cross_entropy(x, y, residual="lse", **kw),
    "vocab": _fused("vocab", block_size=64),
    "vocab-default-blocks": _fused("vocab"),
    "token": _fused("token", token_block_size=3),
    "pallas-rows": lambda x, y, **kw: jaxent.cross_entropy(x, y, impl="pallas", interpret=True,
                                                          **kw),
    "pallas-linear": _fused("pallas", interpret=True),
}


def serves(name: str, dtype, reduction: str = "mean") -> bool:
    """Whether implementation ``name`` serves logits of ``dtype`` with ``reduction`` (the
    token walk: float32/float64 and a scalar reduction only)."""
    if name.startswith("pallas") and jnp.dtype(dtype) == jnp.float64:
        return False
    if name.startswith("token"):
        return jnp.promote_types(dtype, jnp.float32) == jnp.dtype(dtype) and reduction != "none"
    return True


def value_and_grad(fn: Callable, x, *args, cot=None, **kw):
    """``(fn(x, ...), d fn / d x)`` jitted; ``cot`` weights a ``"none"`` result."""

    def scalar(x):
        out = fn(x, *args, **kw)
        return jnp.sum(out * cot) if cot is not None else out

    return jax.jit(jax.value_and_grad(scalar))(x)
