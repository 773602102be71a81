"""Property tests of the public heads on hostile inputs (issue 24).

For every drawn input the outcome must be one of: a correct finite result (against a float64
NumPy reference), a ``nan`` that reaches the value and the gradient, or a ``ValueError`` /
``TypeError`` that names the argument (a backquoted name in the message). Never a finite
wrong number, never a ``nan`` turned into 0, never a bare KeyError, ZeroDivisionError,
OverflowError, RecursionError or unnamed TypeError: :func:`_outcome` lets those through, so
they fail the test.

Shapes come from a few fixed sets and every function is jitted once per configuration (the
library's walks are jitted internally), so the suite's time is mostly compilation; keep
``max_examples`` modest.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxent

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64]


def _outcome(call):
    """``("ok", result)`` or ``("error", message)`` for a named ValueError/TypeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # int64 -> int32 truncation warnings
            return "ok", call()
    except (ValueError, TypeError) as e:
        assert re.search(r"`\w+`", str(e)), f"error without an argument name: {e!r}"
        return "error", str(e)


def _log_softmax64(x, temperature=1.0):
    z = np.asarray(x, np.float64) / temperature
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(z, -1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _assert_matches(got, want, rtol=2e-4, atol=2e-5):
    """Finite where the reference is finite and close; never finite where it is nan."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all(), (got, want)
    np.testing.assert_allclose(got[~nan], want[~nan], rtol=rtol, atol=atol)


# ------------------------------------------------- label dtypes at their range's edge


def _v_for(dtype, where: int) -> int:
    """A vocabulary just below / at / above the dtype's largest id (small for wide dtypes)."""
    top = int(np.iinfo(dtype).max)
    if top > 70_000:
        return 5 + where
    return top + where  # top - 1 .. top + 1 classes; ids up to min(top, V - 1)


@SETTINGS
@given(dtype=st.sampled_from(INT_DTYPES), where=st.sampled_from([-1, 0, 1, 2]),
       fn=st.sampled_from(["token_log_probs", "linear_log_probs", "cross_entropy",
                           "linear_cross_entropy", "distillation_loss"]),
       seed=st.integers(0, 2**16))
def test_any_integer_dtype_gives_the_int64_numbers(dtype, where, fn, seed):
    rng = np.random.default_rng(seed)
    v = _v_for(dtype, where)
    n = 3
    top = min(int(np.iinfo(dtype).max), v - 1)
    ids = np.array([top, rng.integers(0, top + 1), 0])
    h = rng.normal(size=(n, 2)).astype(np.float32)
    w = rng.normal(size=(2, v)).astype(np.float32)
    x = (h @ w).astype(np.float32)
    y = ids.astype(dtype)
    lp = _log_softmax64(np.asarray(h, np.float64) @ w)[np.arange(n), ids]
    calls = {
        "token_log_probs": (lambda: jaxent.token_log_probs(x, y), lp),
        "linear_log_probs": (lambda: jaxent.linear_log_probs(h, w, y, block_size=128), lp),
        "cross_entropy": (lambda: jaxent.cross_entropy(x, y, reduction="none"), -lp),
        "linear_cross_entropy": (
            lambda: jaxent.linear_cross_entropy(h, w, y, reduction="none"), -lp),
        "distillation_loss": (lambda: jaxent.distillation_loss(
            x, x, labels=y, reduction="none"), np.zeros(n)),
    }
    call, want = calls[fn]
    kind, got = _outcome(call)
    if kind == "ok":
        _assert_matches(got, want)
    else:  # only uint64 ids that JAX holds as uint32 may be refused, never in-range ones
        pytest.fail(f"{fn} refused in-range ids of dtype {np.dtype(dtype)}: {got}")


@SETTINGS
@given(dtype=st.sampled_from(INT_DTYPES), over=st.sampled_from([1, 2**8, 2**16, 2**31]),
       seed=st.integers(0, 2**16))
def test_out_of_range_ids_are_an_error_or_nan_never_a_class(dtype, over, seed):
    """An id ``V - 1 + over`` (as far as the dtype holds it) never aliases a class."""
    v = 7
    bad = v - 1 + over
    if bad > np.iinfo(dtype).max:
        return
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, v)).astype(np.float32)
    y = np.array([0, bad, 2]).astype(dtype)
    kind, msg = _outcome(lambda: jaxent.token_log_probs(x, y))
    assert kind == "error" and "`tokens`" in msg
    got = jax.jit(jaxent.token_log_probs)(x, jnp.asarray(y) if np.dtype(dtype).itemsize < 8
                                          else jnp.asarray(y.astype(np.int32)))
    if np.dtype(dtype).itemsize < 8 or bad < 2**31:
        assert np.isnan(got[1]) and np.isfinite(np.asarray(got)[[0, 2]]).all()


# ---------------------------------------------------------- degenerate shapes


@SETTINGS
@given(n=st.sampled_from([0, 1, 3]), d=st.sampled_from([0, 1, 3]),
       v=st.sampled_from([0, 1, 3]),
       fn=st.sampled_from(["linear_log_probs", "linear_cross_entropy",
                           "linear_distillation_loss", "linear_soft_cross_entropy",
                           "token_log_probs", "distillation_loss"]),
       seed=st.integers(0, 2**16))
def test_zero_and_one_sized_dimensions(n, d, v, fn, seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    b = rng.normal(size=(v,)).astype(np.float32)
    y = rng.integers(0, max(v, 1), n)
    x = (h @ w + b).astype(np.float32)
    x64 = np.asarray(h, np.float64) @ w + b
    lp = _log_softmax64(x64)[np.arange(n), y] if v else np.zeros(n)
    t = np.full((n, v), 1.0 / max(v, 1), np.float32)
    calls = {
        "linear_log_probs": (lambda: jaxent.linear_log_probs(h, w, y, bias=b), lp),
        "linear_cross_entropy": (
            lambda: jaxent.linear_cross_entropy(h, w, y, bias=b, reduction="sum"), -lp.sum()),
        "linear_distillation_loss": (lambda: jaxent.linear_distillation_loss(
            h, w, h, w, student_bias=b, teacher_bias=b, reduction="sum"), 0.0),
        "linear_soft_cross_entropy": (lambda: jaxent.linear_soft_cross_entropy(
            h, w, t, bias=b, reduction="sum"), -(_log_softmax64(x64) * t).sum() if v else 0.0),
        "token_log_probs": (lambda: jaxent.token_log_probs(x, y), lp),
        "distillation_loss": (lambda: jaxent.distillation_loss(x, x, reduction="sum"), 0.0),
    }
    call, want = calls[fn]
    kind, got = _outcome(call)
    if v == 0:
        assert kind == "error", f"{fn} with V=0 gave {got!r}"
        return
    assert kind == "ok", got
    _assert_matches(got, want)


# ----------------------------------------------------------------- temperatures

TEMPERATURES = [1e-40, 1e-30, 1.0, 1e30, float("nan"), float("inf")]


@SETTINGS
@given(temperature=st.sampled_from(TEMPERATURES), as_array=st.booleans(),
       fn=st.sampled_from(["token_log_probs", "linear_log_probs", "distillation_loss",
                           "linear_distillation_loss", "cross_entropy"]),
       seed=st.integers(0, 2**16))
def test_extreme_temperatures(temperature, as_array, fn, seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(3, 4)).astype(np.float32)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    ht = rng.normal(size=(3, 4)).astype(np.float32)
    y = np.array([0, 5, 2])
    x, xt = h @ w, ht @ w
    temp = np.full((3,), temperature, np.float64) if as_array else temperature
    calls = {
        "token_log_probs": lambda: jaxent.token_log_probs(x, y, temperature=temp),
        "linear_log_probs": lambda: jaxent.linear_log_probs(h, w, y, temperature=temp),
        "distillation_loss": lambda: jaxent.distillation_loss(
            x, xt, temperature=temp, reduction="none"),
        "linear_distillation_loss": lambda: jaxent.linear_distillation_loss(
            h, w, ht, w, temperature=temp, reduction="none"),
        "cross_entropy": lambda: jaxent.cross_entropy(x, y, temperature=temp,
                                                      reduction="none"),
    }
    kind, got = _outcome(calls[fn])
    if not (np.isfinite(temperature) and temperature >= 1e-30):
        assert kind == "error" and "`temperature`" in got, (fn, temperature, got)
        return
    assert kind == "ok", got
    x64 = np.asarray(h, np.float64) @ w
    lp = _log_softmax64(x64, temperature)
    if fn in ("token_log_probs", "linear_log_probs", "cross_entropy"):
        want = lp[np.arange(3), y] * (-1 if fn == "cross_entropy" else 1)
    else:
        lq = _log_softmax64(np.asarray(ht, np.float64) @ w, temperature)
        want = (np.exp(lq) * (lq - lp)).sum(-1)
    # float32 logits divided by 1e-30 keep ~7 digits of ~1e30-sized numbers
    _assert_matches(got, want, rtol=1e-4, atol=1e-5 * max(1.0, 1.0 / temperature))


# ------------------------------------------------------------ nan and inf inputs


@SETTINGS
@given(value=st.sampled_from([np.nan, np.inf, -np.inf]), row=st.integers(0, 3),
       col=st.integers(0, 5), where_bad=st.sampled_from(["student", "teacher"]),
       fn=st.sampled_from(["token_log_probs", "distillation_loss:kl",
                           "distillation_loss:reverse_kl", "distillation_loss:jsd",
                           "cross_entropy"]),
       seed=st.integers(0, 2**16))
def test_nan_and_inf_logits(value, row, col, where_bad, fn, seed):
    """Rows without a bad value keep their numbers; a nan reaches the row's value and
    gradient; an inf gives the true limit or nan, never a finite wrong number."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(4, 6)).astype(np.float32)
    t = rng.normal(size=(4, 6)).astype(np.float32)
    y = rng.integers(0, 6, 4)
    if fn.startswith("distillation") and where_bad == "teacher":
        t[row, col] = value
    else:
        s[row, col] = value
    lp, lq = _log_softmax64(s), _log_softmax64(t)
    name, _, divergence = fn.partition(":")
    if name == "token_log_probs":
        def f(a):
            return jaxent.token_log_probs(a, y)
        with np.errstate(invalid="ignore"):
            want = lp[np.arange(4), y]
    elif name == "cross_entropy":
        def f(a):
            return jaxent.cross_entropy(a, y, reduction="none")
        with np.errstate(invalid="ignore"):
            want = -lp[np.arange(4), y]
    else:
        def f(a):
            return jaxent.distillation_loss(a, t, divergence=divergence, reduction="none")
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            p, q = np.exp(lp), np.exp(lq)
            pq = {"kl": (q, lq, lp), "reverse_kl": (p, lp, lq)}
            if divergence == "jsd":
                lm = np.logaddexp(np.log(0.5) + lq, np.log(0.5) + lp)
                want = 0.5 * np.where(q == 0, 0, q * (lq - lm)).sum(-1) + \
                    0.5 * np.where(p == 0, 0, p * (lp - lm)).sum(-1)
            else:
                a, la, lb = pq[divergence]
                want = np.where(a == 0, 0, a * (la - lb)).sum(-1)
    got, vjp = jax.vjp(f, jnp.asarray(s))
    got = np.asarray(got, np.float64)
    others = np.arange(4) != row
    _assert_matches(got[others], want[others])
    if np.isnan(value):
        assert np.isnan(got[row])
    elif np.isfinite(want[row]):
        np.testing.assert_allclose(got[row], want[row], rtol=2e-4, atol=2e-5)
    else:  # the true value is +-inf or undefined: never a finite number
        assert not np.isfinite(got[row]), (got[row], want[row])
    (g,) = vjp(jnp.asarray(np.eye(4)[row], jnp.float32))
    g = np.asarray(g)
    if np.isnan(got[row]):  # a nan value: its gradient is not a finite (made-up) number
        assert not np.isfinite(g[row]).all(), g[row]
    assert np.isfinite(g[others]).all()


# ----------------------------------------------------------- ignore_index extremes


@SETTINGS
@given(ignore_index=st.sampled_from([-(2**63), 2**63 - 1, -(2**31), 2**31 - 1, -100, 3]),
       fn=st.sampled_from(["cross_entropy", "linear_cross_entropy", "distillation_loss",
                           "linear_distillation_loss", "nll_loss"]),
       seed=st.integers(0, 2**16))
def test_ignore_index_extremes(ignore_index, fn, seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(4, 3)).astype(np.float32)
    w = rng.normal(size=(3, 6)).astype(np.float32)
    ht = rng.normal(size=(4, 3)).astype(np.float32)
    y = np.array([3, 0, 5, 3])
    x, xt = h @ w, ht @ w
    calls = {
        "cross_entropy": lambda: jaxent.cross_entropy(x, y, ignore_index=ignore_index,
                                                      reduction="none"),
        "linear_cross_entropy": lambda: jaxent.linear_cross_entropy(
            h, w, y, ignore_index=ignore_index, reduction="none"),
        "nll_loss": lambda: jaxent.nll_loss(jax.nn.log_softmax(x), y,
                                            ignore_index=ignore_index, reduction="none"),
        "distillation_loss": lambda: jaxent.distillation_loss(
            x, xt, labels=y, ignore_index=ignore_index, reduction="none"),
        "linear_distillation_loss": lambda: jaxent.linear_distillation_loss(
            h, w, ht, w, labels=y, ignore_index=ignore_index, reduction="none"),
    }
    kind, got = _outcome(calls[fn])
    if kind == "error":
        assert "`ignore_index`" in got
        assert not -(2**31) <= ignore_index < 2**31, got  # in-range values must work
        return
    lp = _log_softmax64(np.asarray(h, np.float64) @ w)
    if fn.startswith("distillation") or fn.startswith("linear_distillation"):
        lq = _log_softmax64(np.asarray(ht, np.float64) @ w)
        per_row = (np.exp(lq) * (lq - lp)).sum(-1)
    else:
        per_row = -lp[np.arange(4), y]
    want = np.where(y == ignore_index, 0.0, per_row)
    _assert_matches(got, want)


@SETTINGS
@given(value=st.sampled_from([np.nan, np.inf, -np.inf]), row=st.integers(0, 3),
       col=st.integers(0, 2), target=st.sampled_from(["hidden", "kernel", "teacher"]),
       fn=st.sampled_from(["linear_log_probs", "linear_cross_entropy",
                           "linear_distillation_loss:kl", "linear_distillation_loss:jsd"]),
       seed=st.integers(0, 2**16))
def test_nan_and_inf_in_linear_heads(value, row, col, target, fn, seed):
    """A bad entry of ``hidden`` touches one row, of a kernel every row: those rows are the
    reference's (an inf: the true limit or nan) and a nan value has non-finite gradients."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(4, 3)).astype(np.float32)
    w = rng.normal(size=(3, 6)).astype(np.float32)
    ht = rng.normal(size=(4, 3)).astype(np.float32)
    y = rng.integers(0, 6, 4)
    name, _, divergence = fn.partition(":")
    if target == "teacher" and name != "linear_distillation_loss":
        target = "hidden"
    if target == "hidden":
        h[row, col] = value
    elif target == "kernel":
        w[col, row] = value
    else:
        ht[row, col] = value
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        x64 = np.asarray(h, np.float64) @ w
        lp = _log_softmax64(x64)
        lq = _log_softmax64(np.asarray(ht, np.float64) @ w)
        p, q = np.exp(lp), np.exp(lq)
        if name == "linear_log_probs":
            want = lp[np.arange(4), y]
        elif name == "linear_cross_entropy":
            want = -lp[np.arange(4), y]
        elif divergence == "kl":
            want = np.where(q == 0, 0, q * (lq - lp)).sum(-1)
        else:
            lm = np.logaddexp(np.log(0.5) + lq, np.log(0.5) + lp)
            want = 0.5 * np.where(q == 0, 0, q * (lq - lm)).sum(-1) + \
                0.5 * np.where(p == 0, 0, p * (lp - lm)).sum(-1)

    def f(h, w):
        if name == "linear_log_probs":
            return jaxent.linear_log_probs(h, w, y)
        if name == "linear_cross_entropy":
            return jaxent.linear_cross_entropy(h, w, y, reduction="none")
        return jaxent.linear_distillation_loss(h, w, ht, w, divergence=divergence,
                                               reduction="none")

    got, vjp = jax.vjp(f, jnp.asarray(h), jnp.asarray(w))
    got = np.asarray(got, np.float64)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-5)
    assert not np.isfinite(got[~finite]).any(), (got, want)  # nan or the true inf
    if np.isnan(value):
        assert np.isnan(got[~finite]).all()
    bad_rows = np.flatnonzero(np.isnan(got))
    for r in bad_rows[:1]:
        gh, gw = vjp(jnp.asarray(np.eye(4)[r], jnp.float32))
        assert not np.isfinite(np.asarray(gh)[r]).all() or not np.isfinite(gw).all()
