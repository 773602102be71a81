"""Property tests: random shapes, axes and options against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxent
from tests import reference as ref

CASES = st.fixed_dictionaries({
    "shape": st.lists(st.integers(1, 5), min_size=1, max_size=3),
    "classes": st.integers(2, 9),
    "axis_pos": st.integers(0, 3),
    "smoothing": st.sampled_from([0.0, 0.05, 0.3]),
    "z_loss": st.sampled_from([0.0, 1e-3]),
    "softcap": st.sampled_from([None, 4.0]),
    "temperature": st.sampled_from([1.0, 0.5, 3.0]),
    "weighted": st.booleans(),
    "reduction": st.sampled_from(["mean", "sum", "none"]),
    "seed": st.integers(0, 2**31 - 1),
})


def _setup(case):
    rng = np.random.default_rng(case["seed"])
    batch = tuple(case["shape"])
    axis = min(case["axis_pos"], len(batch))
    shape = batch[:axis] + (case["classes"],) + batch[axis:]
    x = rng.normal(scale=3.0, size=shape).astype(np.float32)
    w = rng.uniform(0.1, 3.0, size=case["classes"]).astype(np.float32) if case["weighted"] else None
    opts = dict(axis=axis, weight=w, label_smoothing=case["smoothing"], z_loss=case["z_loss"],
                logit_softcap=case["softcap"], temperature=case["temperature"],
                reduction=case["reduction"])
    return rng, batch, x, opts


@settings(max_examples=15, deadline=None)
@given(CASES)
def test_cross_entropy_equals_reference(case):
    rng, batch, x, opts = _setup(case)
    y = rng.integers(-1, case["classes"], size=batch)  # -1 plays ignore_index
    got = jaxent.cross_entropy(x, y, ignore_index=-1, **opts)
    want = ref.cross_entropy(x, y, ignore_index=-1, **opts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(CASES)
def test_soft_cross_entropy_equals_reference_and_its_gradient_sums_to_zero(case):
    rng, batch, x, opts = _setup(case)
    t = np.moveaxis(rng.dirichlet(np.ones(case["classes"]), size=batch), -1, opts["axis"])
    got = jaxent.soft_cross_entropy(x, t.astype(np.float32), **opts)
    want = ref.soft_cross_entropy(x, t, **opts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if opts["z_loss"] == 0.0 and opts["logit_softcap"] is None and opts["weight"] is None:
        # Softmax is shift-invariant, so each row's gradient sums to zero.
        g = jax.grad(lambda a: jnp.sum(jaxent.soft_cross_entropy(a, t, **opts)))(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(g).sum(axis=opts["axis"]), 0.0, atol=1e-5)
