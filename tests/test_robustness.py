"""No finite wrong number, no nan where the answer is finite: on every implementation.

Each finding of the adversarial review has a test run on the plain-CE residuals and both
fused walks (tests/conformance.py); the vocabulary-parallel losses get the same checks in
tests/sharded_cases.py. References are float64 NumPy formulas.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxent
from tests.conformance import IMPLS, serves, value_and_grad


def _ref(x, y, temperature=1.0, weight=None):
    """float64 per-row loss and gradient of the mean (no ignored rows)."""
    z = np.asarray(x, np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    picked = z[np.arange(len(y)), np.asarray(y)]
    w = np.ones(z.shape[1]) if weight is None else np.asarray(weight, np.float64)
    wy = w[np.asarray(y)]
    p = np.exp(z - lse[:, None])
    onehot = np.eye(z.shape[1])[np.asarray(y)]
    grad = wy[:, None] * (p - onehot) / temperature / wy.sum()
    return (wy * (lse - picked)).sum() / wy.sum(), grad


NAMES = list(IMPLS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.uint16, jnp.uint32])
def test_narrow_label_dtypes_do_not_wrap(rng, name, dtype):
    """C = 300 does not fit int8/uint8: labels that do fit give the int32 numbers."""
    x = jnp.asarray(rng.normal(size=(6, 300)), jnp.float32)
    y = np.array([0, 100, 120, 5, 127, 64])
    v, g = value_and_grad(IMPLS[name], x, jnp.asarray(y, dtype))
    rv, rg = _ref(x, y)
    np.testing.assert_allclose(v, rv, rtol=1e-5)
    np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-7)
    # ignore_index=-100 cannot be held by an unsigned dtype: nothing is ignored, no error.
    assert np.isfinite(jax.jit(lambda y: IMPLS[name](x, y))(jnp.asarray(y, dtype)))


@pytest.mark.parametrize("name", NAMES)
def test_every_logit_far_below_zero(rng, name):
    """A constant bias of -100 (all exps underflow against 0) changes nothing, evaluated,
    differentiated, and in return_aux's log-sum-exp."""
    x = jnp.asarray(rng.normal(size=(5, 130)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 130, 5))
    rv, rg = _ref(x, y)
    for shift in (-100.0, -1e4):
        xs = x + shift
        np.testing.assert_allclose(jax.jit(IMPLS[name])(xs, y), rv, rtol=2e-4)
        v, g = value_and_grad(IMPLS[name], xs, y)
        np.testing.assert_allclose(v, rv, rtol=2e-4)
        np.testing.assert_allclose(g, rg, rtol=2e-3, atol=1e-6)
    if name.startswith(("vocab", "token", "pallas-linear")):
        eye = jnp.eye(5)
        _, aux = jaxent.linear_cross_entropy(eye, x - 100.0, y, return_aux=True,
                                             block_size=64)
        assert np.isfinite(aux["lse"]).all()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "vocab" and "pallas" not in n])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_16bit_small_mass_is_kept_under_differentiation(name, dtype):
    """One logit at 17.5 and 999999 at 0: every class is ~17.5 nats below the max and
    together they carry 2.5 % of the mass (a 16-bit exp would store each as 0)."""
    if not serves(name, dtype):
        pytest.skip("the token walk is float32/float64 only")
    c = 1_000_000
    x = jnp.zeros((1, c), dtype).at[0, 7].set(17.5)
    y = jnp.array([7])
    true = np.log1p((c - 1) * np.exp(-17.5))  # 0.0248
    primal = jax.jit(IMPLS[name])(x, y)
    v, g = value_and_grad(IMPLS[name], x, y)
    np.testing.assert_allclose(primal, true, rtol=1e-4)
    np.testing.assert_allclose(v, primal, rtol=1e-6)
    # the gradient has the logits' dtype: bf16 rounds it to 3 significant digits
    np.testing.assert_allclose(float(g[0, 7]), -(1 - np.exp(-true)), rtol=5e-3)  # -0.0245


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("offset", [1e4, 1e5, 1e7, -1e7])
def test_gradient_at_large_logit_offsets(rng, name, offset):
    """The shift is kept apart from log s: the gradient at any offset is the offset-free one."""
    x = jnp.asarray(rng.normal(size=(4, 50)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 50, 4))
    _, rg = _ref(x, y)
    big = x + jnp.float32(offset)
    rg_big = _ref(np.asarray(big, np.float64), y)[1]  # the rounded inputs' own truth
    _, g = value_and_grad(IMPLS[name], big, y)
    np.testing.assert_allclose(g, rg_big, rtol=1e-4, atol=1e-6)
    row = jnp.full((1, 3), offset, jnp.float32)
    _, g = value_and_grad(IMPLS[name], row, jnp.array([0]))
    np.testing.assert_allclose(g, [[-2 / 3, 1 / 3, 1 / 3]], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_class_weights_summing_to_zero(rng, name):
    """Counted labels whose weights sum to 0: nan (as torch), not the unnormalized sum;
    no counted label at all: 0.0 with zero gradient."""
    x = jnp.asarray(rng.normal(size=(4, 130)), jnp.float32)
    y = jnp.array([3, 7, 7, 100])
    w = jnp.ones(130).at[jnp.array([3, 7, 100])].set(0.0)
    assert np.isnan(jax.jit(lambda x: IMPLS[name](x, y, weight=w))(x))
    v, g = value_and_grad(IMPLS[name], x, jnp.full((4,), -100))
    assert float(v) == 0.0 and not np.asarray(g).any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1e-8, 1e-10, 1e-20])
def test_tiny_temperatures(rng, name, temperature):
    """The max element's shifted logit is exactly 0 at any temperature."""
    x = jnp.asarray(rng.normal(size=(4, 40)), jnp.float32)
    top = jnp.argmax(x, axis=1)
    v = jax.jit(lambda x: IMPLS[name](x, top, temperature=temperature))(x)
    assert float(v) == 0.0
    other = (top + 1) % 40
    got = jax.jit(lambda x: IMPLS[name](x, other, temperature=temperature))(x)
    want = float(np.mean((np.max(np.asarray(x, np.float64), 1)
                          - np.asarray(x, np.float64)[np.arange(4), other]) / temperature))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("name", ["rows-grad", "rows-lse"])
def test_plus_inf_logit_on_another_class(name):
    """A +inf logit on a non-target class: the loss is +inf (the limit; torch gives nan).
    (The fused losses get no +inf logit from finite hidden states and kernels.)"""
    x = jnp.array([[0.5, jnp.inf, -1.0], [0.1, 0.2, 0.3]], jnp.float32)
    v = jax.jit(lambda x: IMPLS[name](x, jnp.array([0, 1]), reduction="sum"))(x)
    assert float(v) == np.inf


def test_result_dtype_follows_the_logits_under_x64(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
        w = jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float64)
        y = jnp.array([0, 4, 2])
        assert jaxent.cross_entropy(x, y, weight=w).dtype == jnp.float32
        assert jaxent.nll_loss(x, y, weight=w).dtype == jnp.float32
        assert jaxent.linear_cross_entropy(jnp.eye(3, dtype=jnp.float32), x, y,
                                           weight=w).dtype == jnp.float32


@pytest.mark.parametrize(("call", "pattern"), [
    (lambda: jaxent.cross_entropy(jnp.zeros((3, 0)), jnp.zeros(3, int)), r"`logits`.*class"),
    (lambda: jaxent.cross_entropy(jnp.zeros((3, 4)), jnp.zeros(3, int), ignore_index=2**40),
     r"`ignore_index`.*int32"),
    (lambda: jaxent.cross_entropy(jnp.zeros((3, 4)), jnp.zeros(3, int), logit_softcap=1e-40),
     r"`logit_softcap`"),
    (lambda: jaxent.cross_entropy_and_grad(jnp.zeros((3, 4)), jnp.zeros(3, int),
                                           reduction="none"), r"`reduction`.*scalar"),
])
def test_clear_errors_for_edge_options(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_cross_entropy_and_grad_takes_residual(rng):
    x = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 9, 4))
    want = jax.value_and_grad(lambda x: jaxent.cross_entropy(x, y))(x)
    for residual in ("grad", "lse"):
        got = jaxent.cross_entropy_and_grad(jnp.array(x), y, residual=residual)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7)


def test_cross_entropy_loss_negative_ignore_index_with_probabilities(rng):
    """torch refuses only ignore_index >= 0 with probability targets."""
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    t = jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 5)), jnp.float32))
    np.testing.assert_allclose(jaxent.CrossEntropyLoss(ignore_index=-1)(x, t),
                               jaxent.soft_cross_entropy(x, t, axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="ignore_index"):
        jaxent.CrossEntropyLoss(ignore_index=0)(x, t)


# --------------------------------------------------------------------------- properties

_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


@_SETTINGS
@given(dtype=st.sampled_from(["int8", "uint8", "int16", "uint16", "int32", "uint32"]),
       name=st.sampled_from(NAMES), seed=st.integers(0, 2**16))
def test_label_dtypes_agree_when_labels_fit(dtype, name, seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 400))
    x = jnp.asarray(rng.normal(size=(5, c)), jnp.float32)
    hi = min(c, int(np.iinfo(dtype).max) + 1)
    y = rng.integers(0, hi, 5)
    v, g = value_and_grad(IMPLS[name], x, jnp.asarray(y, dtype))
    v0, g0 = value_and_grad(IMPLS[name], x, jnp.asarray(y, jnp.int32))
    assert float(v) == float(v0)
    np.testing.assert_array_equal(g, g0)


@_SETTINGS
@given(name=st.sampled_from(NAMES), shift=st.sampled_from([1e4, -1e4]),
       opts=st.sampled_from([{}, {"label_smoothing": 0.1}, {"z_loss": 0.0},
                             {"temperature": 0.7}]),
       x=hnp.arrays(np.float32, (4, 37), elements=st.floats(-5, 5, width=32)))
def test_constant_shift_leaves_loss_and_gradient(name, shift, opts, x):
    y = jnp.arange(4) * 7
    v, g = value_and_grad(IMPLS[name], jnp.asarray(x), y, **opts)
    vs, gs = value_and_grad(IMPLS[name], jnp.asarray(x) + jnp.float32(shift), y, **opts)
    # the shifted inputs are rounded to ulp(1e4) ~ 1e-3: compare at that precision
    np.testing.assert_allclose(vs, v, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(gs, g, rtol=2e-2, atol=2e-4)
    exact = jnp.asarray(np.round(np.asarray(x) * 64) / 64)  # multiples of 1/64: shift exact
    v, g = value_and_grad(IMPLS[name], exact, y, **opts)
    vs, gs = value_and_grad(IMPLS[name], exact + jnp.float32(shift), y, **opts)
    np.testing.assert_allclose(vs, v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gs, g, rtol=1e-4, atol=1e-6)


@_SETTINGS
@given(name=st.sampled_from(NAMES),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
def test_loss_under_value_and_grad_equals_primal(name, dtype, reduction, seed):
    if not serves(name, dtype, reduction):
        return
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(6, 70)) * 3, dtype)
    y = jnp.asarray(rng.integers(0, 70, 6))
    kw = {"reduction": reduction, "z_loss": 1e-3, "label_smoothing": 0.05}
    primal = jax.jit(lambda x: IMPLS[name](x, y, **kw))(x)
    cot = jnp.asarray(rng.normal(size=6), jnp.float32) if reduction == "none" else None
    v, _ = value_and_grad(IMPLS[name], x, y, cot=cot, **kw)
    want = float(jnp.sum(primal * cot)) if cot is not None else float(primal)
    np.testing.assert_allclose(float(v), want, rtol=1e-6, atol=1e-6)
