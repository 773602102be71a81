"""Regression tests of the second adversarial review (issue 24), on the public API.

One test per reproduction: narrow token dtypes in the RL and distillation heads (class 1),
nan swallowed by distillation (4), out-of-range ids under jit (5), degenerate shapes and
extreme options (7). The sharded classes (2, 9) are in tests/sharded_reliability_cases.py,
the autotune cache (6) in tests/test_autotune_cache.py. References are float64 NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

V = 300  # beyond int8/uint8; two whole blocks of 128 and a partial one of 44


def _log_softmax64(x):
    z = np.asarray(x, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _logp_ref(x, y):
    """float64 log p_y and d(sum log p_y)/dx."""
    lp = _log_softmax64(x)
    rows = np.arange(len(y))
    onehot = np.zeros_like(lp)
    onehot[rows, y] = 1.0
    return lp[rows, y], onehot - np.exp(lp)


def _kl_ref(s, t):
    lp, lq = _log_softmax64(s), _log_softmax64(t)
    return (np.exp(lq) * (lq - lp)).sum(-1)


@pytest.fixture
def head(rng):
    h = rng.normal(size=(6, 8)).astype(np.float32)
    w = (rng.normal(size=(8, V)) / 3).astype(np.float32)
    return h, w


# ---------------------------------------------------------- 1. narrow token dtypes

NARROW = [jnp.int8, jnp.uint8, jnp.int16, jnp.uint16]


def _fitting_ids(dtype):
    hi = min(int(jnp.iinfo(dtype).max), V - 1)
    return np.array([0, hi, hi // 2, 5, hi - 1, 7])


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("jit", [False, True])
def test_token_log_probs_narrow_ids_equal_int64_numbers(rng, dtype, jit):
    x = rng.normal(size=(6, V)).astype(np.float32)
    y = _fitting_ids(dtype)
    f = jaxent.token_log_probs
    g = jax.grad(lambda x, y: f(x, y).sum())
    if jit:
        f, g = jax.jit(f), jax.jit(g)
    want, dwant = _logp_ref(x, y)
    np.testing.assert_allclose(f(x, jnp.asarray(y, dtype)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g(x, jnp.asarray(y, dtype)), dwant, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", NARROW)
def test_linear_log_probs_narrow_ids_in_a_partial_block(head, dtype):
    """block_size=128 over V=300: ids in the partial last block must not wrap."""
    h, w = head
    y = np.array([0, 255, 156, 299, 200, 130]) if jnp.iinfo(dtype).max >= 299 else \
        _fitting_ids(dtype)

    def f(h, w):
        return jaxent.linear_log_probs(h, w, jnp.asarray(y, dtype), block_size=128).sum()

    want, dx = _logp_ref(h @ w, y)
    v, (gh, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(v, want.sum(), rtol=1e-5)
    np.testing.assert_allclose(gh, dx @ np.asarray(w, np.float64).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, np.asarray(h, np.float64).T @ dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("linear", [False, True])
def test_distillation_uint8_labels_keep_label_156(head, rng, linear):
    """-100 wraps to 156 in uint8: label 156 must still be counted."""
    h, w = head
    ht = rng.normal(size=(6, 8)).astype(np.float32)
    labels = jnp.asarray([156, 3, 156, 7, 0, 255], jnp.uint8)
    if linear:
        got = jaxent.linear_distillation_loss(h, w, ht, w, labels=labels, reduction="none",
                                              block_size=128)
    else:
        got = jaxent.distillation_loss(h @ w, ht @ w, labels=labels, reduction="none")
    np.testing.assert_allclose(got, _kl_ref(h @ w, ht @ w), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------- 4. distillation keeps nan

DIVERGENCES = ["kl", "reverse_kl", "jsd"]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("where_nan", ["student", "teacher"])
def test_distillation_nan_rows_stay_nan(rng, divergence, where_nan):
    s = rng.normal(size=(4, 10)).astype(np.float32)
    t = rng.normal(size=(4, 10)).astype(np.float32)
    (s if where_nan == "student" else t)[1, 3] = np.nan
    got = np.asarray(jaxent.distillation_loss(s, t, divergence=divergence, reduction="none"))
    assert np.isnan(got[1])
    assert np.isfinite(got[[0, 2, 3]]).all()
    assert np.isnan(jaxent.distillation_loss(s, t, divergence=divergence))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear_jsd_nan_hidden_stays_nan(head, rng, divergence):
    h, w = head
    ht = rng.normal(size=(6, 8)).astype(np.float32)
    ht[2, 0] = np.nan
    got = np.asarray(jaxent.linear_distillation_loss(h, w, ht, w, divergence=divergence,
                                                     reduction="none", block_size=128))
    assert np.isnan(got[2]) and np.isfinite(np.delete(got, 2)).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_nan_temperature_under_jit_is_nan(rng, divergence):
    s = rng.normal(size=(4, 10)).astype(np.float32)
    t = rng.normal(size=(4, 10)).astype(np.float32)
    temp = jnp.asarray([1.0, jnp.nan, 2.0, 1.0])
    got = jax.jit(lambda T: jaxent.distillation_loss(s, t, divergence=divergence,
                                                     temperature=T, reduction="none"))(temp)
    assert np.isnan(got[1]) and np.isfinite(np.asarray(got)[[0, 2, 3]]).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_nan_student_gives_nan_gradient(rng, divergence):
    s = rng.normal(size=(4, 10)).astype(np.float32)
    t = rng.normal(size=(4, 10)).astype(np.float32)
    s[1, 3] = np.nan
    g = np.asarray(jax.grad(lambda s: jaxent.distillation_loss(s, t, divergence=divergence,
                                                               reduction="sum"))(s))
    assert np.isnan(g[1]).all()
    assert np.isfinite(g[[0, 2, 3]]).all()


# ----------------------------------------- 5. out-of-range ids under jit: nan gradients


def test_token_log_probs_bad_id_under_jit_gives_nan_value_and_gradient(rng):
    x = rng.normal(size=(4, V)).astype(np.float32)
    y = jnp.asarray([0, 1, V, 2])
    f = jax.value_and_grad(lambda x, y: jaxent.token_log_probs(x, y).sum())
    v, g = jax.jit(f)(x, y)
    assert np.isnan(v)
    g = np.asarray(g)
    assert np.isnan(g[2]).all() and np.isfinite(g[[0, 1, 3]]).all()


@pytest.mark.parametrize("bad", [-1, V, 2**31 - 1])
def test_linear_log_probs_bad_id_under_jit_gives_nan_gradients(head, bad):
    h, w = head
    y = jnp.asarray([0, 1, bad, 2, 3, 4])
    f = jax.jit(jax.value_and_grad(
        lambda h, w, y: jaxent.linear_log_probs(h, w, y, block_size=128)[2], argnums=(0, 1)))
    v, (gh, gw) = f(h, w, y)
    assert np.isnan(v) and np.isnan(np.asarray(gh)[2]).all() and np.isnan(gw).all()


def test_int64_ids_beyond_int32_do_not_alias_a_class(rng):
    """2**32 + 3 is not token 3: concrete ids raise, traced ones (x64) give nan."""
    x = rng.normal(size=(4, V)).astype(np.float32)
    y = np.array([0, 1, 2**32 + 3, 2], np.int64)
    for fn in (jaxent.token_log_probs, lambda x, y: jaxent.cross_entropy(x, y)):
        with pytest.raises(ValueError, match="tokens|labels"):
            fn(x, y)
    with jax.enable_x64(True):
        got = jax.jit(jaxent.token_log_probs)(x, jnp.asarray(y))
        assert np.isnan(got[2]) and np.isfinite(np.asarray(got)[[0, 1, 3]]).all()
        ce = jax.jit(lambda y: jaxent.cross_entropy(x, y, reduction="none"))(jnp.asarray(y))
        assert np.isnan(ce[2])


@pytest.mark.parametrize("linear", [False, True])
def test_pallas_ce_bad_label_gives_nan_gradient_as_xla(rng, linear):
    x = rng.normal(size=(4, 40)).astype(np.float32)
    h, w = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(8, 40)).astype(
        np.float32)
    y = jnp.asarray([0, 1, 40, 2])
    for impl in ("xla", "pallas"):
        kw = {"impl": impl, **({"interpret": True} if impl == "pallas" else {})}
        if linear:
            def f(h, y, kw=kw):
                return jaxent.linear_cross_entropy(h, w, y, **kw)
            g = jax.jit(jax.grad(f))(h, y)
        else:
            def f(x, y, kw=kw):
                return jaxent.cross_entropy(x, y, **kw)
            g = jax.jit(jax.grad(f))(x, y)
        g = np.asarray(g)
        assert np.isnan(g[2]).all(), impl
        assert np.isnan(g).all() or np.isfinite(g[[0, 1, 3]]).all(), impl


# ------------------------------------------------ 7. degenerate shapes, extreme options


@pytest.mark.parametrize("call", [
    lambda: jaxent.token_log_probs(jnp.zeros((3, 0)), jnp.zeros(3, int)),
    lambda: jaxent.token_log_probs(jnp.zeros((0, 0)), jnp.zeros(0, int)),
    lambda: jaxent.linear_log_probs(jnp.zeros((2, 4)), jnp.zeros((4, 0)), jnp.zeros(2, int)),
    lambda: jaxent.linear_cross_entropy(jnp.zeros((0, 4)), jnp.zeros((4, 0)),
                                        jnp.zeros(0, int)),
    lambda: jaxent.linear_soft_cross_entropy(jnp.zeros((2, 4)), jnp.zeros((4, 0)),
                                             jnp.zeros((2, 0))),
    lambda: jaxent.distillation_loss(jnp.zeros((3, 0)), jnp.zeros((3, 0))),
    lambda: jaxent.linear_distillation_loss(jnp.zeros((2, 4)), jnp.zeros((4, 0)),
                                            jnp.zeros((2, 4)), jnp.zeros((4, 0))),
], ids=["tlp", "tlp-n0", "llp", "lce-n0", "lsce", "dl", "ldl"])
def test_zero_classes_is_a_named_value_error(call):
    with pytest.raises(ValueError, match="`(logits|kernel|student_logits|student_kernel)`"):
        call()


def test_zero_width_heads_give_the_bias_softmax(rng):
    """D = 0: the logits are the bias (or 0): correct values and gradients."""
    b = rng.normal(size=(5,)).astype(np.float32)
    h, k, y = jnp.zeros((3, 0)), jnp.zeros((0, 5)), jnp.asarray([0, 4, 2])
    want, dz = _logp_ref(np.broadcast_to(b, (3, 5)), np.asarray(y))
    lp, gb = jax.value_and_grad(
        lambda b: jaxent.linear_log_probs(h, k, y, bias=b).sum())(jnp.asarray(b))
    np.testing.assert_allclose(lp, want.sum(), rtol=1e-5)
    np.testing.assert_allclose(gb, dz.sum(0), atol=1e-6)
    ent = jaxent.linear_log_probs(h, k, y, return_entropy=True)[1]
    np.testing.assert_allclose(ent, np.log(5.0), rtol=1e-6)
    np.testing.assert_allclose(
        jaxent.linear_distillation_loss(h, k, h, k, student_bias=b, teacher_bias=b), 0.0,
        atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-40, 0.0, -1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("fn", ["tlp", "llp", "dl", "ldl"])
def test_bad_temperatures_are_named_errors(head, fn, temperature):
    h, w = head
    y = jnp.zeros(6, int)
    calls = {
        "tlp": lambda T: jaxent.token_log_probs(h @ w, y, temperature=T),
        "llp": lambda T: jaxent.linear_log_probs(h, w, y, temperature=T),
        "dl": lambda T: jaxent.distillation_loss(h @ w, h @ w, temperature=T),
        "ldl": lambda T: jaxent.linear_distillation_loss(h, w, h, w, temperature=T),
    }
    for t in (temperature, np.full((6,), temperature, np.float32)):
        if np.ndim(t) and float(np.float32(temperature)) == 0.0 and temperature != 0.0:
            t = np.full((6,), temperature, np.float64)  # 1e-40 flushes to 0 in float32
        with pytest.raises(ValueError, match="`temperature`"):
            calls[fn](t)


@pytest.mark.parametrize("ignore_index", [2**40, -(2**63), 2**63 - 1])
@pytest.mark.parametrize("linear", [False, True])
def test_ignore_index_beyond_int32_is_a_named_error(head, linear, ignore_index):
    h, w = head
    y = jnp.zeros(6, int)
    with pytest.raises(ValueError, match="`ignore_index`"):
        if linear:
            jaxent.linear_distillation_loss(h, w, h, w, labels=y, ignore_index=ignore_index)
        else:
            jaxent.distillation_loss(h @ w, h @ w, labels=y, ignore_index=ignore_index)


def test_linear_distillation_ignore_index_without_labels_is_an_error(head):
    h, w = head
    with pytest.raises(ValueError, match="`ignore_index`.*`labels`"):
        jaxent.linear_distillation_loss(h, w, h, w, ignore_index=3)


# --------------------------------------------------- 9. second order, one device


@pytest.mark.parametrize("impl", ["xla", "token", "pallas"])
def test_second_order_works_or_is_a_clear_not_implemented(rng, impl):
    """The walks give the float64 reference's grad-of-grad; the Pallas kernels (no
    differentiation rule) say so, while their first order still works."""
    h = rng.normal(size=(8, 4)).astype(np.float32)
    w = rng.normal(size=(4, 32)).astype(np.float32)
    y = jnp.asarray(rng.integers(0, 32, 8))
    kw = {"impl": impl, **({"interpret": True} if impl == "pallas" else {})}

    def loss(h):
        return jaxent.linear_cross_entropy(h, w, y, **kw)

    def ref(h):
        return jaxent.cross_entropy(h @ w, y)

    def gg(f):
        return jax.grad(lambda h: jnp.sum(jax.grad(f)(h) ** 2))(h)

    np.testing.assert_allclose(jax.grad(loss)(h), jax.grad(ref)(h), rtol=1e-5, atol=1e-7)
    if impl == "pallas":
        with pytest.raises(NotImplementedError, match="impl='pallas'"):
            gg(loss)
    else:
        np.testing.assert_allclose(gg(loss), gg(ref), rtol=1e-4, atol=1e-7)
