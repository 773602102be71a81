"""``shift=1``: position t scored against label t+1, the last position counting for nothing.

Every loss and head with ``shift=1`` is compared with the program that slices the
activations instead (``logits[:, :-1]`` against ``labels[:, 1:]``): PyTorch CPU for
``cross_entropy``, float64 naive formulas for the rest; values and gradients (the last
position's gradient is zero). Bad ``shift`` values and inputs without a sequence axis raise
``ValueError`` naming ``shift``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxent

B, T, D, V = 3, 5, 8, 23


def _data(rng, dtype=np.float32):
    x = rng.normal(size=(B, T, V)).astype(dtype)
    h = rng.normal(size=(B, T, D)).astype(dtype)
    k = (rng.normal(size=(D, V)) / 2).astype(dtype)
    y = rng.integers(0, V, (B, T))
    y[0, 3] = -100                 # one ignored label inside a sequence
    y[1, 1:] = -100                # a sequence whose every shifted label is ignored
    where = rng.random((B, T)) < 0.8
    return x, h, k, y, where


def _torch_ce(x, y, *, reduction, weight=None, label_smoothing=0.0):
    """``F.cross_entropy(x[:, :-1], y[:, 1:])`` in float64 with its logits' gradient."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        xt[:, :-1].reshape(-1, V), torch.tensor(y[:, 1:]).reshape(-1),
        weight=None if weight is None else torch.tensor(weight, dtype=torch.float64),
        reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.reshape(B, T - 1)
    loss.sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_shift_matches_torch(rng, reduction):
    x, _, _, y, _ = _data(rng)
    w = rng.uniform(0.5, 2.0, V)
    kw = {"weight": w, "label_smoothing": 0.1}
    want, want_dx = _torch_ce(x, y, reduction=reduction, **kw)

    def f(x):
        out = jaxent.cross_entropy(x, jnp.asarray(y), shift=1, reduction=reduction,
                                   weight=jnp.asarray(w, jnp.float32), label_smoothing=0.1)
        return out, out.sum()

    got, vjp = jax.vjp(f, jnp.asarray(x))
    (dx,) = vjp((jnp.zeros_like(got[0]), jnp.float32(1.0)))
    if reduction == "none":
        np.testing.assert_array_equal(got[0][:, -1], 0.0)
        got = (got[0][:, :-1],)
    np.testing.assert_allclose(got[0], want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(dx, want_dx, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(dx[:, -1], 0.0)


def test_cross_entropy_shift_where_and_axis(rng):
    """``where`` is shifted with the labels; PyTorch's ``(N, C, T)`` layout (``axis=1``)
    shifts along the labels' last axis too."""
    x, _, _, y, where = _data(rng)
    yj, wj = jnp.asarray(y), jnp.asarray(where)
    ref = jaxent.cross_entropy(jnp.asarray(x)[:, :-1], yj[:, 1:], where=wj[:, 1:])
    got = jaxent.cross_entropy(jnp.asarray(x), yj, where=wj, shift=1)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    got1 = jax.jit(lambda x: jaxent.cross_entropy(x, yj, axis=1, where=wj, shift=1))(
        jnp.moveaxis(jnp.asarray(x), -1, 1))
    np.testing.assert_allclose(got1, ref, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_shift(rng, reduction):
    _, h, k, y, where = _data(rng)
    h, k, yj, wj = jnp.asarray(h), jnp.asarray(k), jnp.asarray(y), jnp.asarray(where)
    kw = {"reduction": reduction, "z_loss": 1e-2}

    def fused(h, k):
        return jaxent.linear_cross_entropy(h, k, yj, where=wj, shift=1, block_size=8, **kw)

    def naive(h, k):
        out = jaxent.cross_entropy((h @ k)[:, :-1], yj[:, 1:], where=wj[:, 1:], **kw)
        return jnp.pad(out, ((0, 0), (0, 1))) if reduction == "none" else out

    got, ref = fused(h, k), naive(h, k)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    c = jnp.asarray(rng.normal(size=got.shape), jnp.float32)  # a random cotangent
    g = jax.jit(jax.grad(lambda h, k: (fused(h, k) * c).sum(), (0, 1)))(h, k)
    r = jax.grad(lambda h, k: (naive(h, k) * c).sum(), (0, 1))(h, k)
    for a, b in zip(g, r, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g[0][:, -1], 0.0)


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_and_linear_log_probs_shift(rng):
    _, h, k, y, where = _data(rng)
    y = np.where(y < 0, 0, y)  # tokens carry no ignore value
    h, k, yj, wj = jnp.asarray(h), jnp.asarray(k), jnp.asarray(y), jnp.asarray(where)
    x = h @ k
    lsm = _log_softmax64(x)[:, :-1]
    want = np.take_along_axis(lsm, y[:, 1:, None], -1)[..., 0] * where[:, 1:]
    want_ent = -(np.exp(lsm) * lsm).sum(-1) * where[:, 1:]
    lp, ent = jaxent.token_log_probs(x, yj, where=wj, shift=1, return_entropy=True)
    flp, fent = jaxent.linear_log_probs(h, k, yj, where=wj, shift=1, return_entropy=True,
                                        block_size=8)
    for a, e in ((lp, want), (flp, want), (ent, want_ent), (fent, want_ent)):
        np.testing.assert_allclose(a[:, :-1], e, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a[:, -1], 0.0)

    c = jnp.asarray(rng.normal(size=(2, B, T)), jnp.float32)

    def obj(fn):
        return lambda h: sum((o * ci).sum() for o, ci in zip(fn(h), c, strict=True))

    g = jax.grad(obj(lambda h: jaxent.linear_log_probs(
        h, k, yj, where=wj, shift=1, return_entropy=True, block_size=8)))(h)
    r = jax.grad(obj(lambda h: jaxent.token_log_probs(
        h @ k, yj, where=wj, shift=1, return_entropy=True)))(h)
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(g[:, -1], 0.0)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_distillation_shift(rng, divergence):
    x, h, k, y, where = _data(rng)
    ht = jnp.asarray(rng.normal(size=(B, T, 6)), jnp.float32)
    kt = jnp.asarray(rng.normal(size=(6, V)) / 2, jnp.float32)
    h, k, yj, wj = jnp.asarray(h), jnp.asarray(k), jnp.asarray(y), jnp.asarray(where)
    kw = {"divergence": divergence}
    ref = jaxent.distillation_loss((h @ k)[:, :-1], (ht @ kt)[:, :-1], labels=yj[:, 1:],
                                   where=wj[:, 1:], **kw)
    got = jaxent.distillation_loss(h @ k, ht @ kt, labels=yj, where=wj, shift=1, **kw)
    fused = jaxent.linear_distillation_loss(h, k, ht, kt, labels=yj, where=wj, shift=1,
                                            block_size=8, **kw)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(fused, ref, rtol=1e-5)
    g = jax.grad(lambda h: jaxent.linear_distillation_loss(
        h, k, ht, kt, labels=yj, shift=1, block_size=8, **kw))(h)
    r = jax.grad(lambda h: jaxent.distillation_loss(
        (h @ k)[:, :-1], (ht @ kt)[:, :-1], labels=yj[:, 1:], **kw))(h)
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # without labels or where, shift only drops the last position
    none = jaxent.distillation_loss(h @ k, ht @ kt, shift=1, reduction="none", **kw)
    np.testing.assert_array_equal(none[:, -1], 0.0)
    np.testing.assert_allclose(none[:, :-1], jaxent.distillation_loss(
        (h @ k)[:, :-1], (ht @ kt)[:, :-1], reduction="none", **kw), rtol=1e-5)


@pytest.mark.parametrize("bad", [2, -1, 0.5, "1", None])
def test_bad_shift(bad):
    x = jnp.zeros((2, 3, 4))
    y = jnp.zeros((2, 3), jnp.int32)
    for call in (lambda: jaxent.cross_entropy(x, y, shift=bad),
                 lambda: jaxent.linear_cross_entropy(x, jnp.ones((4, 5)), y, shift=bad),
                 lambda: jaxent.linear_log_probs(x, jnp.ones((4, 5)), y, shift=bad),
                 lambda: jaxent.distillation_loss(x, x, shift=bad)):
        with pytest.raises(ValueError, match="`shift` must be 0"):
            call()


def test_shift_needs_a_sequence_axis():
    h, k = jnp.ones((4,)), jnp.ones((4, 5))
    with pytest.raises(ValueError, match="shift=1` needs a sequence axis"):
        jaxent.linear_cross_entropy(h, k, jnp.int32(1), shift=1)
    with pytest.raises(ValueError, match="shift=1` needs a sequence axis"):
        jaxent.cross_entropy(jnp.ones((5,)), jnp.int32(1), shift=1)
    with pytest.raises(ValueError, match="shift=1` needs a sequence axis"):
        jaxent.linear_log_probs(h, k, jnp.int32(1), shift=1)


def test_shift_label_check_still_runs():
    """An out-of-range label is still a ``ValueError`` (concrete) with ``shift=1``."""
    x = jnp.ones((1, 3, 4))
    with pytest.raises(ValueError, match="labels"):
        jaxent.cross_entropy(x, jnp.array([[0, 9, 1]]), shift=1)
