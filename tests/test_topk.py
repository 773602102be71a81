"""Tests for jaxent.topk_log_probs and jaxent.linear_topk_log_probs.

Against the naive materialized program (logits, soft-cap and temperature, ``lax.top_k``,
``jax.nn.log_softmax``): the ids exactly (ties included: inputs with integer values make
every dot product exact, and kernels with repeated columns make ties by construction),
the log-probabilities and the tail in float32 (rtol 1e-5), and the gradients of a random
linear functional of the log-probabilities and the tail. Bad ``k`` gets a clear error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

N, D, V = 12, 6, 50


def _z(x, temp=1.0, cap=None):
    t = jnp.asarray(temp, jnp.float32)
    z = x / (t[:, None] if t.ndim else t)
    return z if cap is None else cap * jnp.tanh(z / cap)


def naive(x, k, temp=1.0, cap=None):
    """``(ids, log_probs, tail)`` of materialized logits ``x [N, V]``."""
    z = _z(x.astype(jnp.float32), temp, cap)
    _, ids = jax.lax.top_k(z, k)
    lse = jax.nn.logsumexp(z, axis=-1)
    lp = jnp.take_along_axis(z, ids, -1) - lse[:, None]
    rest = jnp.ones(z.shape, bool).at[jnp.arange(z.shape[0])[:, None], ids].set(False)
    tail = jax.nn.logsumexp(jnp.where(rest, z, -jnp.inf), axis=-1) - lse
    return ids, lp, tail


def _tied_inputs(rng, layout="dv", dtype=jnp.float32, v=V):
    """Integer-valued hidden and kernel (every logit exact in float32), with some kernel
    columns repeated (ties by construction, across blocks too)."""
    h = rng.integers(-2, 3, (N, D)).astype(np.float32)
    w = rng.integers(-2, 3, (D, v)).astype(np.float32) / 4
    for a, b in ((0, 17), (3, 4), (9, 41), (20, v - 1), (5, 33)):
        w[:, b] = w[:, a]
    b = rng.integers(-2, 3, (v,)).astype(np.float32) / 2
    b[17], b[4], b[41], b[v - 1], b[33] = b[0], b[3], b[9], b[20], b[5]
    if layout == "vd":
        w = w.T
    return jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(b, dtype)


def _check_grads(fused, reference, args, rng, k, tail=True, atol=1e-5):
    r = jnp.asarray(rng.normal(size=(N, k)), jnp.float32)
    rt = jnp.asarray(rng.normal(size=(N,)), jnp.float32)

    def functional(fn):
        def f(*a):
            out = fn(*a)
            return (out[1] * r).sum() + ((out[2] * rt).sum() if tail else 0.0)
        return f

    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(functional(fused), argnums=argnums))(*args)
    want = jax.jit(jax.grad(functional(reference), argnums=argnums))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=1e-5, atol=atol)


def _check_values(got, want, rtol=1e-5, atol=1e-6):
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


@pytest.mark.parametrize("block_size,k,layout,impl", [
    (None, 5, "dv", "vocab"), (7, 12, "vd", "vocab"), (16, 1, "dv", "vocab"),
    (50, 50, "vd", "vocab"), (3, 4, "dv", "vocab"), (None, 12, "vd", "token"),
    (None, 12, "vd", "pallas"), (None, 50, "dv", "pallas")])
def test_linear_matches_naive_with_ties(block_size, k, layout, impl):
    rng = np.random.default_rng(block_size or 0)
    h, w, b = _tied_inputs(rng, layout)

    def logits(h, w, b):
        return (h @ w if layout == "dv" else h @ w.T) + b[None, :]

    fused = lambda h, w, b: jaxent.linear_topk_log_probs(  # noqa: E731
        h, w, k, bias=b, kernel_layout=layout, block_size=block_size, return_tail=True,
        impl=impl, token_block_size=3, interpret=True)
    ref = lambda h, w, b: naive(logits(h, w, b), k)  # noqa: E731
    got, want = jax.jit(fused)(h, w, b), jax.jit(ref)(h, w, b)
    _check_values(got, want)
    assert (np.diff(np.asarray(got[1]), axis=1) <= 0).all()
    _check_grads(fused, ref, (h, w, b), rng, k, tail=k < V)


@pytest.mark.parametrize("cap,per_row", [(None, True), (2.0, False), (1.5, True)])
def test_linear_softcap_temperature_where(cap, per_row):
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    temp = (jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32) if per_row else 1.7)
    where = jnp.asarray(rng.random(N) < 0.75)
    k = 6

    def fused(h, w):
        return jaxent.linear_topk_log_probs(h, w, k, temperature=temp, logit_softcap=cap,
                                            where=where, block_size=8, return_tail=True)

    def ref(h, w):
        ids, lp, tail = naive(h @ w, k, temp, cap)
        return (jnp.where(where[:, None], ids, -1), jnp.where(where[:, None], lp, 0.0),
                jnp.where(where, tail, 0.0))

    _check_values(jax.jit(fused)(h, w), jax.jit(ref)(h, w))
    _check_grads(fused, ref, (h, w), rng, k)


def test_materialized_matches_naive_with_ties_and_axis():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.integers(-3, 3, (2, V, 5)) / 2, jnp.float32)  # many ties
    x = x.at[0, 7, 1].set(-jnp.inf).at[1, :, 2].set(-jnp.inf).at[1, 3, 2].set(0.0)
    k = 9
    ids, lp, tail = jaxent.topk_log_probs(x, k, axis=1, return_tail=True)
    assert ids.shape == lp.shape == (2, 5, k) and tail.shape == (2, 5)
    rows = jnp.moveaxis(x, 1, -1).reshape(-1, V)
    want = naive(rows, k)
    _check_values((ids.reshape(-1, k), lp.reshape(-1, k), tail.reshape(-1)), want)
    # the row with one finite logit: the other ids are the lowest ones at -inf
    np.testing.assert_array_equal(np.asarray(ids[1, 2]), [3, 0, 1, 2, 4, 5, 6, 7, 8])
    assert float(tail[1, 2]) == -np.inf


def test_materialized_gradient_and_temperature():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(N, V)), jnp.float32)
    temp = jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32)
    k = 7
    fused = lambda x: jaxent.topk_log_probs(x, k, temperature=temp,  # noqa: E731
                                           logit_softcap=3.0, return_tail=True)
    ref = lambda x: naive(x, k, temp, 3.0)  # noqa: E731
    _check_values(jax.jit(fused)(x), jax.jit(ref)(x))
    _check_grads(fused, ref, (x,), rng, k)


def test_tail_is_stable_when_the_topk_hold_almost_all_mass():
    x = jnp.zeros((1, 10)).at[0, :3].set(40.0)
    ids, lp, tail = jaxent.topk_log_probs(x, 3, return_tail=True)
    # log(7 e^-40 / (3 + 7 e^-40)): 1 - sum(p) would round to 0 in float32
    want = np.log(7.0) - 40.0 - np.log(3.0)
    np.testing.assert_allclose(float(tail[0]), want, rtol=1e-6)
    _, _, full = jaxent.topk_log_probs(x, 10, return_tail=True)
    assert float(full[0]) == -np.inf


def test_padded_vocab_never_chosen():
    rng = np.random.default_rng(6)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32).at[:, 45:].set(100.0)
    got = jaxent.linear_topk_log_probs(h, w, 45, vocab_size=45, block_size=16,
                                       logit_softcap=5.0, return_tail=True)
    want = naive(h @ w[:, :45], 45, cap=5.0)
    _check_values(got, want)


def test_bf16_within_bound():
    """bf16 inputs: the logits accumulate in float32, so the log-probabilities are those
    of the bf16 values' exact logits up to float32 rounding (bound: 1e-5 absolute)."""
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(V, D)), jnp.bfloat16)
    ids, lp, tail = jaxent.linear_topk_log_probs(h, w, 5, kernel_layout="vd", block_size=16,
                                                 return_tail=True)
    assert ids.dtype == jnp.int32 and lp.dtype == jnp.float32
    x = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-x, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(x, np.asarray(ids), 1)
                               - lse[:, None], atol=1e-5)
    g = jax.grad(lambda h, w: jaxent.linear_topk_log_probs(
        h, w, 5, kernel_layout="vd", block_size=16)[1].sum(), argnums=(0, 1))(h, w)
    assert g[0].dtype == g[1].dtype == jnp.bfloat16


def test_vmap_and_jit():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(3, N, V)), jnp.float32)
    got = jax.jit(jax.vmap(lambda x: jaxent.topk_log_probs(x, 4)))(x)
    for i in range(3):
        _check_values((got[0][i], got[1][i]), naive(x[i], 4)[:2])


@pytest.mark.parametrize("k,err,match", [
    (0, ValueError, r"`k` must be in \[1, V\] = \[1, 50\]"),
    (-3, ValueError, "`k` must be in"),
    (51, ValueError, "got 51"),
    (2.0, TypeError, "`k` must be a Python int"),
    (True, TypeError, "`k` must be a Python int"),
    (np.array([3]), TypeError, "`k` must be a Python int"),
])
def test_bad_k(k, err, match):
    x = jnp.zeros((2, V))
    with pytest.raises(err, match=match):
        jaxent.topk_log_probs(x, k)
    with pytest.raises(err, match=match):
        jaxent.linear_topk_log_probs(jnp.zeros((2, D)), jnp.zeros((D, V)), k)


def test_bad_impl_and_k_above_real_vocab():
    with pytest.raises(ValueError, match="`impl`"):
        jaxent.linear_topk_log_probs(jnp.zeros((2, D)), jnp.zeros((D, V)), 3, impl="tpu")
    with pytest.raises(ValueError, match=r"\[1, 40\]"):
        jaxent.linear_topk_log_probs(jnp.zeros((2, D)), jnp.zeros((D, V)), 41, vocab_size=40)
    assert jaxent.topk_log_probs(jnp.zeros((2, V)), np.int64(3))[0].shape == (2, 3)


def test_memory_is_blocked():
    """Fused top-k keeps at most 5 % of the naive program's compiled temporaries at
    8192 x 2048 x 128256 (bf16, value and gradient; compiled only, never run)."""
    n, d, v, k = 8192, 2048, 128256, 64
    args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((v, d), jnp.bfloat16))
    r = jnp.linspace(-1.0, 1.0, k)

    def fused(h, w):
        _, lp, tail = jaxent.linear_topk_log_probs(h, w, k, kernel_layout="vd",
                                                   return_tail=True)
        return (lp * r[None, :]).sum() + tail.sum()

    def materialized(h, w):
        x = jnp.einsum("nd,vd->nv", h, w).astype(jnp.float32)
        _, lp, tail = naive(x, k)
        return (lp * r[None, :]).sum() + tail.sum()

    def temp(f):
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp(fused) <= 0.05 * temp(materialized)
