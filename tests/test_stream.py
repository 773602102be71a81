"""The streaming walk over row statistics (:mod:`jaxent.impl.stream`): padded vocabularies
of the RL and distillation heads, and a statistic written outside the package."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

N, D, V, PAD = 6, 8, 29, 11


def _data(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return (f(N, D), f(D, V) / 2, f(V), f(N, 2 * D), f(2 * D, V) / 3,
            jnp.asarray(rng.integers(0, V, (N,))),
            jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32))


def _pad(k, b=None):
    kp = jnp.pad(k, ((0, 0), (0, PAD)), constant_values=3.0)  # large logits: must be masked
    return kp if b is None else (kp, jnp.pad(b, (0, PAD), constant_values=5.0))


def _close(a, b, rtol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("cap", [None, 4.0])
def test_log_probs_padded_vocabulary(cap):
    h, k, b, _, _, y, t = _data()
    kw = dict(return_entropy=True, temperature=t, logit_softcap=cap, block_size=8)

    def f(h, k, b, **extra):
        lp, ent = jaxent.linear_log_probs(h, k, y, bias=b, **kw, **extra)
        return jnp.sum(lp * jnp.arange(N)) + jnp.sum(ent)

    want = jax.value_and_grad(f, argnums=(0, 1, 2))(h, k, b)
    kp, bp = _pad(k, b)
    val, (dh, dk, db) = jax.value_and_grad(
        lambda h, k, b: f(h, k, b, vocab_size=V), argnums=(0, 1, 2))(h, kp, bp)
    _close((val, (dh, dk[:, :V], db[:V])), want)
    assert not np.any(np.asarray(dk[:, V:])) and not np.any(np.asarray(db[V:]))


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_distillation_padded_vocabulary(divergence):
    h, k, b, ht, kt, _, t = _data(1)
    kw = dict(divergence=divergence, beta=0.3, temperature=t, block_size=8)
    want = jax.value_and_grad(lambda h, k: jaxent.linear_distillation_loss(
        h, k, ht, kt, **kw), argnums=(0, 1))(h, k)
    val, (dh, dk) = jax.value_and_grad(lambda h, k: jaxent.linear_distillation_loss(
        h, k, ht, _pad(kt), vocab_size=V, **kw), argnums=(0, 1))(h, _pad(k))
    _close((val, (dh, dk[:, :V])), want)


def test_vocab_size_errors():
    h, k, _, _, _, y, _ = _data()
    with pytest.raises(ValueError, match="`vocab_size`"):
        jaxent.linear_log_probs(h, k, y, vocab_size=V + 1)
    with pytest.raises(ValueError, match="`tokens`"):
        jaxent.linear_log_probs(h, _pad(k), y.at[0].set(V + 2), vocab_size=V)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2},
                                {"logit_softcap": 3.0, "label_smoothing": 0.2}])
@pytest.mark.parametrize("pad", [0, PAD])
def test_cross_entropy_statistic_matches_the_fused_loss(kw, pad):
    """Cross-entropy as a statistic on the streaming walk (class weights, row temperatures,
    padding columns) equals plain cross_entropy on the materialized logits: values, grads,
    argmax."""
    from jaxent import _rowmath as rm
    from jaxent.impl import stats, stream
    from jaxent.impl.plan import Options, stream_plan

    h, k, _, _, _, y, t = _data(2)
    y = y.at[3].set(-100)
    w = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, (V,)), jnp.float32)
    opts = Options(kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), 1.0,
                   kw.get("logit_softcap"))

    def mine(h, k):
        kp = jnp.pad(k, ((0, 0), (0, pad)), constant_values=2.0)
        lab = rm.labels_info(y, V, -100, None, w, jnp.float32, t)
        plan = stream_plan(opts, V, V + pad, N, block_size=8)
        losses, _, arg = stream.run(stats.CrossEntropy(V, True), plan, ((h, kp, None),), lab,
                                    {"weight": jnp.pad(w, (0, pad))})
        return losses.sum() / lab.row_w.sum(), arg

    def ref(h, k):
        x = h @ k
        loss = jaxent.cross_entropy(x, y, weight=w, temperature=t, **kw)
        return loss, jnp.argmax(x, axis=-1)

    (got, arg), grads = jax.value_and_grad(mine, argnums=(0, 1), has_aux=True)(h, k)
    (want, arg_ref), grads_ref = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(h, k)
    _close((got, grads), (want, grads_ref))
    np.testing.assert_array_equal(np.asarray(arg), np.asarray(arg_ref))
