"""``capacity=``: the fused heads walk only their counted rows, with the same results.

Values and gradients (hidden, kernel, bias) with ``capacity`` against ``capacity=None``
and against the naive materialized program, for random masks with all-ignored and
all-counted sequences, per-row temperatures, every reduction and ``shift=1``; overflow is
a ``ValueError`` eagerly and ``nan`` (reported by ``checkify``) under ``jit``; bad
capacities raise ``ValueError`` naming ``capacity``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxent

B, T, D, V = 4, 6, 8, 29
RTOL, ATOL = 1e-5, 1e-6


def _data(rng):
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, V)) / 2, jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)) / 2, jnp.float32)
    y = rng.integers(0, V, (B, T))
    y[rng.random((B, T)) < 0.4] = -100
    y[0] = -100                      # an all-ignored sequence
    y[1] = rng.integers(0, V, T)     # an all-counted one
    where = rng.random((B, T)) < 0.8
    where[1] = True
    temp = jnp.asarray(rng.uniform(0.5, 2.0, (B, T)), jnp.float32)
    return h, k, b, jnp.asarray(y), jnp.asarray(where), temp


def _close(got, want):
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL)


def _cotangent(rng, out):
    return jax.tree.map(lambda o: jnp.asarray(rng.normal(size=o.shape), o.dtype), out)


def _vjp(f, cot, *args):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(cot)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(rng, reduction):
    h, k, b, y, where, temp = _data(rng)
    counted = int(((y != -100) & where).sum())
    kw = {"where": where, "temperature": temp, "reduction": reduction, "z_loss": 1e-3,
          "label_smoothing": 0.1, "block_size": 8}

    def fused(cap):
        return lambda h, k, b: jaxent.linear_cross_entropy(h, k, y, bias=b, capacity=cap,
                                                           **kw)

    def naive(h, k, b):
        return jaxent.cross_entropy(h @ k + b[None, None], y, **{n: v for n, v in kw.items()
                                                     if n != "block_size"})

    cot = _cotangent(rng, naive(h, k, b))
    want = jax.jit(lambda *a: _vjp(naive, cot, *a))(h, k, b)
    _close(jax.jit(lambda *a: _vjp(fused(None), cot, *a))(h, k, b), want)
    got = jax.jit(lambda *a: _vjp(fused(counted), cot, *a))(h, k, b)
    _close(got, want)
    np.testing.assert_array_equal(got[1][0][0], 0.0)  # the all-ignored sequence
    _close(fused(counted + 3)(h, k, b), want[0])      # eager, a buffer with empty slots


def test_linear_cross_entropy_shift_then_compact(rng):
    h, k, b, y, where, _ = _data(rng)
    counted = int(((y[:, 1:] != -100) & where[:, 1:]).sum())

    def fused(h, k):
        return jaxent.linear_cross_entropy(h, k, y, where=where, shift=1, capacity=counted,
                                           block_size=8)

    def naive(h, k):
        return jaxent.cross_entropy((h @ k)[:, :-1], y[:, 1:], where=where[:, 1:])

    _close(jax.jit(jax.value_and_grad(fused, (0, 1)))(h, k),
           jax.value_and_grad(naive, (0, 1))(h, k))


def test_linear_cross_entropy_aux(rng):
    h, k, _, y, where, _ = _data(rng)
    counted = (y != -100) & where
    loss, aux = jaxent.linear_cross_entropy(h, k, y, where=where, return_aux=True,
                                            capacity=int(counted.sum()))
    ref, raux = jaxent.linear_cross_entropy(h, k, y, where=where, return_aux=True)
    _close(loss, ref)
    np.testing.assert_allclose(aux["accuracy"], raux["accuracy"], rtol=RTOL)
    for name in ("lse", "z_loss", "argmax"):
        np.testing.assert_allclose(aux[name], jnp.where(counted, raux[name], 0), rtol=RTOL)


def test_linear_log_probs(rng):
    h, k, b, y, where, temp = _data(rng)
    y = jnp.where(y < 0, 3, y)
    cap = int(where.sum())

    def fused(cap):
        return lambda h, k, b: jaxent.linear_log_probs(
            h, k, y, bias=b, where=where, temperature=temp, return_entropy=True,
            block_size=8, capacity=cap)

    def naive(h, k, b):
        return jaxent.token_log_probs(h @ k + b[None, None], y, where=where, temperature=temp,
                                      return_entropy=True)

    cot = _cotangent(rng, naive(h, k, b))
    want = jax.jit(lambda *a: _vjp(naive, cot, *a))(h, k, b)
    _close(jax.jit(lambda *a: _vjp(fused(cap), cot, *a))(h, k, b), want)
    _close(fused(None)(h, k, b), want[0])


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_linear_distillation(rng, divergence):
    h, k, b, y, where, temp = _data(rng)
    ht = jnp.asarray(rng.normal(size=(B, T, 5)), jnp.float32)
    kt = jnp.asarray(rng.normal(size=(5, V)), jnp.float32)
    cap = int(((y[:, 1:] != -100) & where[:, 1:]).sum())
    kw = {"labels": y, "where": where, "temperature": temp, "divergence": divergence}

    def fused(h, k):
        return jaxent.linear_distillation_loss(h, k, ht, kt, shift=1, capacity=cap,
                                               block_size=8, **kw)

    def naive(h, k):
        return jaxent.distillation_loss(h @ k, ht @ kt, shift=1, **kw)

    _close(jax.jit(jax.value_and_grad(fused, (0, 1)))(h, k),
           jax.value_and_grad(naive, (0, 1))(h, k))


def test_linear_soft_cross_entropy(rng):
    h, k, _, _, where, temp = _data(rng)
    t = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32))

    def fused(h, k, t):
        return jaxent.linear_soft_cross_entropy(h, k, t, where=where, temperature=temp,
                                                capacity=int(where.sum()), block_size=8)

    def naive(h, k, t):
        return jaxent.soft_cross_entropy(h @ k, t, where=where, temperature=temp)

    _close(jax.value_and_grad(fused, (0, 1, 2))(h, k, t),
           jax.value_and_grad(naive, (0, 1, 2))(h, k, t))


def test_nothing_counted(rng):
    h, k, _, _, _, _ = _data(rng)
    y = jnp.full((B, T), -100)
    loss, dh = jax.value_and_grad(lambda h: jaxent.linear_cross_entropy(h, k, y,
                                                                       capacity=1))(h)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(dh, 0.0)


def test_overflow(rng):
    h, k, _, y, where, _ = _data(rng)
    counted = int(((y != -100) & where).sum())
    with pytest.raises(ValueError, match=rf"`capacity`={counted - 1} .* {counted} counted"):
        jaxent.linear_cross_entropy(h, k, y, where=where, capacity=counted - 1)
    with pytest.raises(ValueError, match="`capacity`=2"):
        jaxent.linear_log_probs(h, k, jnp.zeros((B, T), jnp.int32), capacity=2)

    def f(h, k, y, where):
        return jaxent.linear_cross_entropy(h, k, y, where=where, capacity=counted - 1,
                                           reduction="none")

    out = jax.jit(f)(h, k, y, where)
    dh, dk = jax.jit(jax.grad(lambda h, k: f(h, k, y, where).sum(), (0, 1)))(h, k)
    assert bool(jnp.isnan(out).all()) and bool(jnp.isnan(dh).all())
    assert bool(jnp.isnan(dk).all())
    err, _ = checkify.checkify(jax.jit(f), errors=checkify.user_checks)(h, k, y, where)
    with pytest.raises(checkify.JaxRuntimeError, match="`capacity`"):
        err.throw()
    err, _ = checkify.checkify(jax.jit(f), errors=checkify.user_checks)(h, k, y, where & False)
    err.throw()  # no overflow: no error


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "4"])
def test_bad_capacity(rng, bad):
    h, k, _, y, _, _ = _data(rng)
    t = jnp.full((B, T, V), 1.0 / V)
    for call in (lambda: jaxent.linear_cross_entropy(h, k, y, capacity=bad),
                 lambda: jaxent.linear_log_probs(h, k, jnp.abs(y), capacity=bad),
                 lambda: jaxent.linear_soft_cross_entropy(h, k, t, capacity=bad),
                 lambda: jaxent.linear_distillation_loss(h, k, h, k, capacity=bad)):
        with pytest.raises(ValueError, match="`capacity` must be"):
            call()


def test_bench_suite_runs_tiny(capsys):
    """``--suite compaction`` at a tiny shape: both variants agree (no timing asserted)."""
    from jaxent import bench  # noqa: PLC0415

    data = bench.main(["--suite", "compaction", "64", "8", "40", "25", "--rounds", "1"])
    assert data["agree"] and data["capacity"] == 16
    assert "ratio of minima" in capsys.readouterr().out


def test_log_probs_aux_with_capacity_matches_on_counted_rows():
    """``return_aux`` through the compaction: the counted rows' lse and argmax equal the
    uncompacted call's (float64 reference of the lse), the others are 0; the token walk
    gives the same aux."""
    h = jax.random.normal(jax.random.key(0), (7, 8))
    w = jax.random.normal(jax.random.key(1), (8, 20))
    y = jax.random.randint(jax.random.key(2), (7,), 0, 20)
    keep = jnp.array([True, False, True, True, False, False, True])
    (lp, aux) = jaxent.linear_log_probs(h, w, y, where=keep, capacity=4, return_aux=True)
    (lp0, aux0) = jaxent.linear_log_probs(h, w, y, where=keep, return_aux=True)
    x64 = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    lse = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
    np.testing.assert_allclose(lp, lp0, rtol=1e-6)
    np.testing.assert_allclose(aux["lse"], np.where(keep, lse, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aux["argmax"], np.where(keep, x64.argmax(1), 0))
    np.testing.assert_array_equal(aux0["argmax"], x64.argmax(1))
    _, aux_t = jaxent.linear_log_probs(h, w, y, where=keep, capacity=4, return_aux=True,
                                       impl="token")
    np.testing.assert_array_equal(aux_t["argmax"], aux["argmax"])
    np.testing.assert_allclose(aux_t["lse"], aux["lse"], rtol=1e-6)
