"""The conformance suite: every implementation, every option, every reduction, one check.

Each entry of :data:`tests.conformance.IMPLS` (both plain-CE residuals, the fused vocabulary
and token walks, the Pallas kernels in interpret mode) is called on the same random logits,
labels (some ignored), class weights, ``where`` mask and cotangent; its value and its VJP
are compared with the float64 formula of ``tests/reference.py`` (NumPy, and JAX autodiff of
the same formula under x64). ``tests/sharded_cases.py`` runs these tests again over the
vocabulary-parallel placements (the same registry, refilled in its 8-device subprocess).
What only one path has stays in its own file: the fused head's hidden and bias gradients
(``tests/test_linear.py``), the kernels' block configurations (``tests/test_pallas.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference as ref
from tests.conformance import IMPLS, serves

N, C = 10, 150  # C: two full 64-column blocks of the "vocab" entry and a ragged tail

OPTION_SETS = {
    "plain": {},
    "weight-ignore-where": {"weight": True, "ignore_index": 7, "where": True},
    "smoothing-weight": {"label_smoothing": 0.15, "weight": True},
    "zloss-softcap-temperature": {"z_loss": 1e-3, "logit_softcap": 5.0, "temperature": 2.0,
                                  "label_smoothing": 0.1, "where": True},
    "low-temperature-weight": {"temperature": 0.7, "weight": True},
}


def _draw(rng, spec: dict):
    """Logits ``[N, C]`` (scale 2), labels with one ignored row, and the call's options."""
    x = rng.normal(scale=2.0, size=(N, C)).astype(np.float32)
    kw = dict(spec)
    ignore = kw.get("ignore_index", -100)
    y = rng.integers(0, C, N).astype(np.int32)
    y[1] = ignore
    y[2] = 7  # a class id that the "ignore_index": 7 set ignores and the others count
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.2, 2.0, C).astype(np.float32)
    if kw.pop("where", False):
        where = rng.random(N) < 0.7
        where[0] = True
        kw["where"] = where
    return x, y, kw


def _check(name, x, y, kw, cot, rtol, atol_rel):
    """Value and VJP of ``IMPLS[name]`` at ``x`` against the float64 formula at ``x``."""
    fn = jax.jit(lambda a: IMPLS[name](a, jnp.asarray(y), **kw))
    out, vjp = jax.vjp(fn, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(cot, out.dtype))
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # the rounded inputs' own truth
    want = ref.cross_entropy(x64, y, **kw)
    want_dx = ref.grad64(lambda a: (ref.cross_entropy(a, y, xp=jnp, **kw) * cot).sum(), x64)
    np.testing.assert_allclose(out, want, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=rtol,
                               atol=atol_rel * float(np.abs(want_dx).max()))
    return out, dx


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spec", OPTION_SETS)
@pytest.mark.parametrize("name", list(IMPLS))
def test_value_and_vjp_match_float64(rng, name, spec, reduction):
    if not serves(name, jnp.float32, reduction):
        pytest.skip(f"{name} does not serve reduction={reduction!r}")
    x, y, kw = _draw(rng, OPTION_SETS[spec])
    kw["reduction"] = reduction
    cot = rng.normal(size=() if reduction != "none" else (N,))
    _check(name, x, y, kw, cot, rtol=2e-5, atol_rel=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", list(IMPLS))
def test_16bit_logits_accumulate_in_float32(rng, name, dtype):
    """16-bit logits: the loss is float32 and as accurate as the float64 formula on the
    rounded inputs; the gradient has the logits' dtype (rounded to it)."""
    if not serves(name, dtype):
        pytest.skip(f"{name} serves float32/float64 only")
    x, y, kw = _draw(rng, OPTION_SETS["zloss-softcap-temperature"])
    x16 = jnp.asarray(x, dtype)
    out, dx = _check(name, x16, y, kw, rng.normal(), rtol=1e-4,
                     atol_rel=1e-2 if dtype == jnp.bfloat16 else 2e-3)
    assert out.dtype == jnp.float32 and dx.dtype == dtype
