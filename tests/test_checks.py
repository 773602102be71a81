"""Bad input gets a clear error that names the argument, what was expected and what was given."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

X = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
Y = np.array([0, 1, 4, 2])
T = np.full((4, 5), 0.2, np.float32)


@pytest.mark.parametrize("call,exc,pattern", [
    # label dtype: float labels point to soft_cross_entropy
    (lambda: jaxent.cross_entropy(X, Y.astype(np.float32)), TypeError,
     r"`labels`.*float32.*soft_cross_entropy"),
    (lambda: jaxent.cross_entropy(X, Y.astype(bool)), TypeError, r"`labels`.*bool"),
    (lambda: jaxent.nll_loss(X, Y.astype(np.float32)), TypeError,
     r"`labels`.*float32.*soft_cross_entropy on the logits.*log_probs"),
    (lambda: jaxent.cross_entropy(X.astype(np.int32), Y), TypeError, r"`logits`.*int32"),
    (lambda: jaxent.soft_cross_entropy(X, Y), TypeError, r"`targets`.*cross_entropy"),
    (lambda: jaxent.binary_cross_entropy(X, T.astype(np.int32)), TypeError, r"`targets`"),
    # shapes
    (lambda: jaxent.cross_entropy(X, Y[:3]), ValueError, r"`labels`.*\(4,\).*\(3,\)"),
    (lambda: jaxent.cross_entropy(X, Y[:, None]), ValueError, r"`labels`.*\(4,\).*\(4, 1\)"),
    (lambda: jaxent.cross_entropy(X, Y, axis=0), ValueError, r"`labels`.*\(5,\).*\(4,\)"),
    (lambda: jaxent.soft_cross_entropy(X, T[:, :4]), ValueError, r"`targets`.*\(4, 5\).*\(4, 4\)"),
    (lambda: jaxent.binary_cross_entropy(X, T[:2]), ValueError, r"`targets`.*\(4, 5\)"),
    (lambda: jaxent.cross_entropy(X, Y, where=np.ones(3, bool)), ValueError,
     r"`where`.*\(4,\).*\(3,\)"),
    (lambda: jaxent.cross_entropy(X, Y, where=np.ones(4)), TypeError, r"`where`.*bool"),
    (lambda: jaxent.soft_cross_entropy(X, T, where=np.ones((4, 5), bool)), ValueError,
     r"`where`.*\(4,\).*\(4, 5\)"),
    # axis
    (lambda: jaxent.cross_entropy(X, Y, axis=2), ValueError, r"`axis`.*\[-2, 2\).*got 2"),
    (lambda: jaxent.cross_entropy(X, Y, axis=-3), ValueError, r"`axis`.*got -3"),
    (lambda: jaxent.soft_cross_entropy(X, T, axis=1.0), TypeError, r"`axis`.*float"),
    (lambda: jaxent.cross_entropy(np.float32(1.0), np.int32(0)), ValueError, r"`logits`.*scalar"),
    # weight
    (lambda: jaxent.cross_entropy(X, Y, weight=np.ones(4)), ValueError,
     r"`weight`.*length 5.*\(4,\)"),
    (lambda: jaxent.soft_cross_entropy(X, T, weight=np.ones((5, 1))), ValueError,
     r"`weight`.*length 5.*\(5, 1\)"),
    (lambda: jaxent.nll_loss(X, Y, weight=np.ones(6)), ValueError, r"`weight`.*length 5"),
    (lambda: jaxent.binary_cross_entropy(X, T, pos_weight=np.ones(3)), ValueError,
     r"`pos_weight`.*\(4, 5\).*\(3,\)"),
    (lambda: jaxent.binary_cross_entropy(X, T, weight=np.ones((2, 4, 5))), ValueError,
     r"`weight`.*\(2, 4, 5\)"),
    # options
    (lambda: jaxent.cross_entropy(X, Y, label_smoothing=1.5), ValueError,
     r"`label_smoothing`.*\[0, 1\].*1.5"),
    (lambda: jaxent.soft_cross_entropy(X, T, label_smoothing=-0.1), ValueError,
     r"`label_smoothing`.*-0.1"),
    (lambda: jaxent.cross_entropy(X, Y, reduction="avg"), ValueError, r"`reduction`.*'avg'"),
    (lambda: jaxent.binary_cross_entropy(X, T, reduction="batchmean"), ValueError,
     r"`reduction`.*'batchmean'"),
    (lambda: jaxent.nll_loss(X, Y, reduction=None), ValueError, r"`reduction`.*None"),
    (lambda: jaxent.cross_entropy(X, Y, temperature=0.0), ValueError, r"`temperature`.*> 0.*0.0"),
    (lambda: jaxent.soft_cross_entropy(X, T, temperature=-2), ValueError, r"`temperature`.*-2"),
    (lambda: jaxent.cross_entropy(X, Y, logit_softcap=0.0), ValueError,
     r"`logit_softcap`.*> 0.*0.0"),
    (lambda: jaxent.cross_entropy(X, Y, logit_softcap=-30.0), ValueError, r"`logit_softcap`"),
    (lambda: jaxent.cross_entropy(X, Y, z_loss=-1e-4), ValueError, r"`z_loss`.*>= 0"),
    (lambda: jaxent.cross_entropy(X, Y, ignore_index=1.0), TypeError, r"`ignore_index`"),
    (lambda: jaxent.soft_cross_entropy(X, T, residual="probs"), ValueError,
     r"`residual`.*'probs'"),
    # label values (concrete)
    (lambda: jaxent.cross_entropy(X, np.array([0, 5, 1, -1])), ValueError,
     r"`labels`.*\[0, 5\).*labels\[1\]=5.*labels\[3\]=-1"),
])
def test_bad_input_names_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_traced_static_option_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"`logit_softcap`.*concrete"):
        jax.jit(lambda x, c: jaxent.cross_entropy(x, Y, logit_softcap=c))(X, 2.0)


def test_traced_temperature_is_a_row_temperature():
    """A traced temperature is an array (one value for every row), not static config."""
    got = jax.jit(lambda x, t: jaxent.cross_entropy(x, Y, temperature=t))(X, 2.0)
    np.testing.assert_allclose(got, jaxent.cross_entropy(X, Y, temperature=2.0), rtol=1e-6)


def test_masked_out_labels_are_not_checked():
    where = np.array([True, False, True, True])
    loss = jaxent.cross_entropy(X, np.array([0, 99, 1, 2]), where=where)
    np.testing.assert_allclose(loss, jaxent.cross_entropy(X[where], np.array([0, 1, 2])),
                               rtol=1e-6)


def test_ignore_index_may_be_a_valid_class():
    y = np.array([0, 3, 3, 1])
    loss = jaxent.cross_entropy(X, y, ignore_index=3)
    np.testing.assert_allclose(loss, jaxent.cross_entropy(X[[0, 3]], y[[0, 3]]), rtol=1e-6)
    assert jnp.isfinite(loss)
