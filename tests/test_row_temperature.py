"""Per-row temperature arrays on the cross-entropy losses and the fused head.

Values and gradients (w.r.t. logits, hidden, kernel, bias) against a float64 naive
program that divides each row's logits by its temperature; bad temperatures raise
``ValueError`` naming ``temperature`` when concrete and give ``nan`` when traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

B, T, D, V = 2, 3, 8, 37
OPTIONS = [{}, {"logit_softcap": 3.0}, {"label_smoothing": 0.1, "z_loss": 1e-2}]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, V)) / 2, jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    y = rng.integers(0, V, (B, T))
    y[1, 2] = -100
    temp = jnp.asarray(rng.uniform(0.4, 2.5, (B, T)), jnp.float32)
    return h, k, b, jnp.asarray(y), temp


def _reference(x, y, temp, *, logit_softcap=None, label_smoothing=0.0, z_loss=0.0):
    """Mean cross-entropy of float64 logits ``x [..., V]`` with row temperatures."""
    x = np.asarray(x, np.float64) / np.asarray(temp, np.float64)[..., None]
    if logit_softcap is not None:
        x = logit_softcap * np.tanh(x / logit_softcap)
    x = jnp.asarray(x)
    lse = jax.nn.logsumexp(x, -1)
    lp = x - lse[..., None]
    counted = y != -100
    nll = -jnp.take_along_axis(lp, jnp.where(counted, y, 0)[..., None], -1)[..., 0]
    loss = (1 - label_smoothing) * nll - label_smoothing * lp.mean(-1) + z_loss * lse**2
    return jnp.sum(jnp.where(counted, loss, 0.0)) / counted.sum()


def _ref_grads(h, k, b, y, temp, argnums, **kw):
    def f(h, k, b):
        x = h @ k + (b if b.ndim == 3 else b[None, None, :])
        xt = x / temp.astype(jnp.float64)[..., None]
        if kw.get("logit_softcap") is not None:
            cap = kw["logit_softcap"]
            xt = cap * jnp.tanh(xt / cap)
        lse = jax.nn.logsumexp(xt, -1)
        lp = xt - lse[..., None]
        counted = y != -100
        nll = -jnp.take_along_axis(lp, jnp.where(counted, y, 0)[..., None], -1)[..., 0]
        eps = kw.get("label_smoothing", 0.0)
        loss = (1 - eps) * nll - eps * lp.mean(-1) + kw.get("z_loss", 0.0) * lse**2
        return jnp.sum(jnp.where(counted, loss, 0.0)) / counted.sum()

    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (h, k, b)]
        return jax.value_and_grad(f, argnums=argnums)(*args)


def _close(got, want, rtol=2e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


@pytest.mark.parametrize("kw", OPTIONS)
def test_cross_entropy_row_temperature(kw):
    h, k, b, y, temp = _data()
    x = h @ k + b[None, None, :]
    want, (dx_ref,) = _ref_grads(jnp.zeros((B, T, 0)), jnp.zeros((0, V)), x, y, temp, (2,),
                                 **kw)
    loss, dx = jax.jit(jax.value_and_grad(
        lambda x: jaxent.cross_entropy(x, y, temperature=temp, **kw)))(x)
    _close(loss, want)
    _close(dx, dx_ref)


@pytest.mark.parametrize("kw", OPTIONS)
def test_soft_cross_entropy_row_temperature(kw):
    h, k, b, y, temp = _data(1)
    y = jnp.where(y < 0, 0, y)
    x = h @ k + b[None, None, :]
    want, (dx_ref,) = _ref_grads(jnp.zeros((B, T, 0)), jnp.zeros((0, V)), x, y, temp, (2,),
                                 **kw)
    loss, dx = jax.jit(jax.value_and_grad(lambda x: jaxent.soft_cross_entropy(
        x, jax.nn.one_hot(y, V), temperature=temp, **kw)))(x)
    _close(loss, want)
    _close(dx, dx_ref)


def test_class_axis_and_broadcast_temperature():
    """``axis=1`` logits and a temperature broadcast from one value per sequence."""
    h, k, b, y, _ = _data(2)
    temp = jnp.asarray([[0.7], [1.9]], jnp.float32)  # [B, 1] -> [B, T]
    x = h @ k + b[None, None, :]
    got = jaxent.cross_entropy(jnp.moveaxis(x, -1, 1), y, axis=1, temperature=temp)
    _close(got, _reference(x, y, jnp.broadcast_to(temp, (B, T))))


@pytest.mark.parametrize("impl", ["vocab", "token", "auto", "pallas"])
@pytest.mark.parametrize("kw", OPTIONS)
def test_linear_cross_entropy_row_temperature(impl, kw):
    h, k, b, y, temp = _data(3)
    want, grads = _ref_grads(h, k, b, y, temp, (0, 1, 2), **kw)
    f = lambda h, k, b: jaxent.linear_cross_entropy(  # noqa: E731
        h, k, y, bias=b, temperature=temp, block_size=8, impl=impl,
        interpret=impl == "pallas", **kw)
    loss, got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, k, b)
    _close(loss, want)
    _close(got, grads)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_bad_concrete_temperature_raises(bad):
    h, k, b, y, temp = _data()
    temp = temp.at[1, 0].set(bad)
    for fn in (lambda: jaxent.cross_entropy(h @ k, y, temperature=temp),
               lambda: jaxent.soft_cross_entropy(h @ k, jax.nn.softmax(h @ k),
                                                 temperature=temp),
               lambda: jaxent.linear_cross_entropy(h, k, y, temperature=temp)):
        with pytest.raises(ValueError, match="`temperature`"):
            fn()


def test_bad_traced_temperature_gives_nan():
    h, k, b, y, temp = _data()
    y = jnp.where(y < 0, 0, y)
    bad = temp.at[0, 1].set(-1.0)
    for fn in (lambda t: jaxent.cross_entropy(h @ k, y, temperature=t, reduction="none"),
               lambda t: jaxent.linear_cross_entropy(h, k, y, temperature=t,
                                                     reduction="none")):
        out = np.asarray(jax.jit(fn)(bad))
        assert np.isnan(out[0, 1])
        assert np.isfinite(np.delete(out.reshape(-1), 1)).all()


def test_wrong_shape_refused():
    h, k, b, y, temp = _data()
    with pytest.raises(ValueError, match="`temperature`.*broadcastable"):
        jaxent.cross_entropy(h @ k, y, temperature=jnp.ones((T, B)))
    with pytest.raises(ValueError, match="`temperature`.*broadcastable"):
        jaxent.linear_cross_entropy(h, k, y, temperature=jnp.ones((T, B)), impl="pallas",
                                    interpret=True)
