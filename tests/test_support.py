"""Support-restricted log-probs (jaxent.support_log_probs, jaxent.linear_support_log_probs)
against the naive materialized program of tests/support_reference.py: the set by sorting
in float64, values f32 rtol 1e-5, gradients of a JAX program with that set held fixed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from tests import support_reference as sr

N, V, D = 6, 50, 8


def _close(a, b, rtol=1e-5, atol=1e-5):
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=rtol, atol=atol)


def _logits(seed, n=N, v=V, ties=True):
    """Random logits with ties at the top-k / top-p boundaries of every row."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, v)) * 2.0
    if ties:
        order = np.argsort(-x, axis=1)
        for i in range(n):  # the 3rd..5th and 8th..9th largest values tie
            x[i, order[i, 3:5]] = x[i, order[i, 2]]
            x[i, order[i, 8]] = x[i, order[i, 7]]
    return jnp.asarray(x, jnp.float32), rng


def _tokens(keep, rng):
    """One token per row from the support, and one outside it where it can be."""
    y = np.array([rng.choice(np.flatnonzero(k)) for k in keep])
    outside = np.flatnonzero(~keep[0])
    if outside.size:
        y[0] = outside[0]
    return jnp.asarray(y)


def _check(fn_got, x, y, keep, temperature=1.0, cap=None, rng=None):
    """Values vs float64, gradients (random cotangents) vs the fixed-set JAX program."""
    lp, ent = fn_got(x)
    z = sr.transform64(x, np.broadcast_to(np.asarray(temperature), (x.shape[0],)), cap)
    want_lp, want_ent = sr.values64(z, np.asarray(y), keep)
    np.testing.assert_allclose(np.asarray(lp), want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=1e-5)
    prog, inside = sr.jax_program(keep, y, temperature, cap)
    ct = (jnp.asarray(rng.normal(size=lp.shape), jnp.float32),
          jnp.asarray(rng.normal(size=lp.shape), jnp.float32))
    g_got = jax.vjp(fn_got, x)[1](ct)
    g_want = jax.vjp(prog, x)[1](ct)
    _close(g_got, g_want)


CASES = {
    "top_k": dict(top_k=4),  # the 4th largest ties with the 5th: past a buffer of 4
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.08),
    "k_p_minp": dict(top_k=8, top_p=0.9, min_p=0.02),
    "per_row": dict(top_k=np.array([1, 3, 4, 9, 50, 2]),
                    top_p=np.array([0.5, 1.0, 0.95, 0.3, 0.7, 0.99], np.float32),
                    temperature=np.array([0.7, 1.0, 1.3, 2.0, 0.9, 1.1], np.float32)),
    "softcap": dict(top_p=0.6, min_p=0.01, temperature=1.5, logit_softcap=3.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_filters_match_reference(name):
    kw = dict(CASES[name])
    x, rng = _logits(list(CASES).index(name))
    temp = kw.get("temperature", 1.0)
    cap = kw.get("logit_softcap")
    z = sr.transform64(x, np.broadcast_to(np.asarray(temp), (N,)), cap)
    keep = sr.support_mask(z, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))
    y = _tokens(keep, rng)
    _check(lambda x: jaxent.support_log_probs(x, y, return_entropy=True, **kw), x, y, keep,
           temp, cap, rng)


def test_ties_are_kept_by_value():
    x = jnp.log(jnp.array([[0.3, 0.2, 0.2, 0.2, 0.1],
                           [0.4, 0.2, 0.2, 0.1, 0.1]], jnp.float32))
    y = jnp.array([3, 2])
    # top-2 of row 0 keeps the three tied 0.2s; top-p 0.5 on row 1 reaches the tied 0.2s.
    np.testing.assert_allclose(jaxent.support_log_probs(x[:1], y[:1], top_k=2),
                               [np.log(0.2 / 0.9)], rtol=1e-5)
    np.testing.assert_allclose(jaxent.support_log_probs(x[1:], y[1:], top_p=0.5),
                               [np.log(0.2 / 0.8)], rtol=1e-5)


def _head(seed, layout="dv", v=V):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, v) if layout == "dv" else (v, D)) * 0.8, jnp.float32)
    b = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
    return h, k, b, rng


@pytest.mark.parametrize("impl", ["vocab", "token", "pallas"])
@pytest.mark.parametrize("layout,kw", [
    ("dv", dict(top_k=6, top_p=0.85, min_p=0.01, temperature=1.3, max_candidates=20)),
    ("vd", dict(top_p=np.array([0.5, 0.9, 1.0, 0.2, 0.75, 0.6], np.float32),
                temperature=np.array([0.7, 1.0, 1.3, 2.0, 0.9, 1.1], np.float32))),
])
def test_linear_matches_reference(layout, kw, impl):
    h, k, b, rng = _head(3, layout)
    logits = lambda h, k, b: h @ (k if layout == "dv" else k.T) + b[None, :]  # noqa: E731
    x = logits(h, k, b)
    temp = kw.get("temperature", 1.0)
    z = sr.transform64(x, np.broadcast_to(np.asarray(temp), (N,)))
    keep = sr.support_mask(z, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))
    y = _tokens(keep, rng)

    def got(h, k, b):  # V = 50 in blocks of 16, or N = 6 in blocks of 4: ragged last blocks
        return jaxent.linear_support_log_probs(h, k, y, bias=b, kernel_layout=layout,
                                               return_entropy=True, block_size=16, impl=impl,
                                               token_block_size=4,
                                               interpret=impl == "pallas", **kw)

    lp, ent = got(h, k, b)
    want = sr.values64(z, np.asarray(y), keep)
    _close((lp, ent), want)
    prog = sr.jax_program(keep, y, temp)[0]
    ct = tuple(jnp.asarray(rng.normal(size=(N,)), jnp.float32) for _ in range(2))
    _close(jax.vjp(got, h, k, b)[1](ct),
           jax.vjp(lambda h, k, b: prog(logits(h, k, b)), h, k, b)[1](ct), rtol=1e-5,
           atol=2e-5)


def _allowed(rng, v=V):
    ids = rng.integers(0, v, (N, 7))
    ids[:, -2:] = -1  # padding
    ids[1, 1] = ids[1, 0]  # a repeat counts once
    return ids


@pytest.mark.parametrize("fused", [False, True])
def test_allowed_ids(fused):
    h, k, b, rng = _head(5)
    ids = _allowed(rng)
    keep = np.zeros((N, V), bool)
    for i in range(N):
        keep[i, ids[i][ids[i] >= 0]] = True
    y = _tokens(keep, rng)
    x = h @ k + b[None, :]
    if fused:
        def got(h, k, b):
            return jaxent.linear_support_log_probs(
                h, k, y, bias=b, allowed_ids=ids, temperature=0.8, logit_softcap=5.0,
                return_entropy=True, block_size=3)
        args = (h, k, b)
        prog = sr.jax_program(keep, y, 0.8, 5.0)[0]
        want_fn = lambda h, k, b: prog(h @ k + b[None, :])  # noqa: E731
    else:
        def got(x):
            return jaxent.support_log_probs(x, y, allowed_ids=ids, temperature=0.8,
                                            logit_softcap=5.0, return_entropy=True)
        args = (x,)
        want_fn = sr.jax_program(keep, y, 0.8, 5.0)[0]
    out = got(*args)
    _close(out, sr.values64(sr.transform64(x, np.full((N,), 0.8), 5.0), np.asarray(y), keep))
    assert np.isneginf(np.asarray(out[0])[0])  # the token outside its row's set
    ct = tuple(jnp.asarray(rng.normal(size=(N,)), jnp.float32) for _ in range(2))
    _close(jax.vjp(got, *args)[1](ct), jax.vjp(want_fn, *args)[1](ct), atol=2e-5)


def test_where_and_outside_token_gradients():
    x, rng = _logits(7, ties=False)
    keep = sr.support_mask(np.asarray(x, np.float64), top_k=4)
    y = _tokens(keep, rng)
    where = jnp.array([True, True, False, True, True, True])
    g = jax.grad(lambda x: jnp.sum(jnp.where(where, jaxent.support_log_probs(
        x, y, top_k=4, where=where), 0.0)))(x)
    assert np.isneginf(np.asarray(jaxent.support_log_probs(x, y, top_k=4))[0])
    assert np.all(np.asarray(g)[[0, 2]] == 0.0)  # outside the set; not counted
    assert np.all(np.isfinite(np.asarray(g)))


def test_bf16_head_within_bound():
    h, k, b, rng = _head(9)
    hb, kb = h.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    x = hb.astype(jnp.float32) @ kb.astype(jnp.float32)
    keep = sr.support_mask(np.asarray(x, np.float64), top_k=8)
    y = _tokens(keep, rng)[1:]
    keep = keep[1:]
    lp = jaxent.linear_support_log_probs(hb[1:], kb, y, top_k=8, block_size=16)
    want = sr.values64(np.asarray(x, np.float64)[1:], np.asarray(y), keep)[0]
    # Accumulated in float32: only the order of the products differs from the reference.
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-3, atol=1e-3)
    dh = jax.grad(lambda h: jaxent.linear_support_log_probs(h, kb, y, top_k=8).sum())(hb[1:])
    assert dh.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(dh, np.float32)))


def test_nucleus_beyond_candidates():
    x, rng = _logits(11, ties=False)
    x = x / 8.0  # flat rows: a 0.95 nucleus holds most of the vocabulary
    y = jnp.zeros((N,), jnp.int32)
    with pytest.raises(ValueError, match="max_candidates"):
        jaxent.support_log_probs(x, y, top_p=0.95, max_candidates=8)
    lp = jax.jit(lambda x: jaxent.support_log_probs(x, y, top_p=0.95, max_candidates=8))(x)
    assert np.all(np.isnan(np.asarray(lp)))
    keep = sr.support_mask(np.asarray(x, np.float64), top_p=0.95)
    need = int(keep.sum(1).max())
    got = jaxent.support_log_probs(x, y, top_p=0.95, max_candidates=need)
    want = sr.values64(np.asarray(x, np.float64), np.zeros(N, int), keep)[0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=-0.2), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=float("inf")), "top_p"),
    (dict(top_p=np.array([0.5, 0.5, 0.5, 0.5, 0.5, -1.0])), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.01), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=V + 1), "top_k"), (dict(top_k=-3), "top_k"),
    (dict(allowed_ids=np.full((N, 2), V)), "allowed_ids"),
    (dict(allowed_ids=np.full((N, 2), -2)), "allowed_ids"),
    (dict(allowed_ids=np.zeros((N, 2), int), top_k=2), "allowed_ids"),
])
def test_bad_concrete_input_raises(kw, name):
    x, _ = _logits(0, ties=False)
    y = jnp.zeros((N,), jnp.int32)
    with pytest.raises(ValueError, match=name):
        jaxent.support_log_probs(x, y, **kw)


def test_pallas_refuses_allowed_ids_by_name():
    h, w = jnp.ones((2, 3)), jnp.ones((3, 5))
    with pytest.raises(ValueError, match="impl='pallas'.*allowed_ids"):
        jaxent.linear_support_log_probs(h, w, jnp.zeros((2,), jnp.int32),
                                        allowed_ids=jnp.zeros((2, 2), jnp.int32),
                                        impl="pallas", interpret=True)


def test_token_impl_is_its_own_program():
    """``impl="token"`` walks blocks of whole rows (``[4, 50]`` logits), the vocabulary walk
    blocks of columns (``[6, 16]``)."""
    h, k, b, rng = _head(3, "dv")
    y = jnp.asarray(rng.integers(0, V, N))

    def jaxpr(impl):
        return str(jax.make_jaxpr(lambda h: jaxent.linear_support_log_probs(
            h, k, y, top_k=6, block_size=16, impl=impl, token_block_size=4))(h))

    tok, voc = jaxpr("token"), jaxpr("vocab")
    assert "f32[4,50]" in tok and "f32[6,16]" not in tok
    assert "f32[6,16]" in voc and "f32[4,50]" not in voc


@pytest.mark.parametrize("kw", [
    dict(top_p=np.array([0.5, np.nan, 0.0, 1.5, np.inf, 0.5], np.float32)),
    dict(min_p=np.array([0.1, -0.1, 1.5, np.nan, 0.1, 0.1], np.float32)),
    dict(top_k=np.array([2, 0, -1, V + 1, 3, 2])),
    dict(allowed_ids=np.array([[1, 2]] + [[1, V], [-2, 1], [3, 4], [1, 0], [5, 5]])),
])
def test_bad_traced_input_is_nan(kw):
    """Under jit a bad per-row value gives nan for its row (and only its row): never a
    finite wrong number."""
    h, k, _, _ = _head(1)
    y = jnp.ones((N,), jnp.int32)
    name, arr = next(iter(kw.items()))

    @jax.jit
    def run(h, arr):
        return jaxent.linear_support_log_probs(h, k, y, block_size=16, **{name: arr})

    lp = np.asarray(run(h, jnp.asarray(arr)))
    bad = {"top_p": [1, 2, 3, 4], "min_p": [1, 2, 3], "top_k": [1, 2, 3],
           "allowed_ids": [1, 2]}[name]
    assert np.all(np.isnan(lp[bad]))
    good = np.setdiff1d(np.arange(N), bad)
    assert not np.any(np.isnan(lp[good]))


def test_fused_holds_no_logits():
    """The compiled value-and-gradient programs of the fused head (a static top-k under
    jit sizes the candidate buffer; top-p with a buffer of 64) keep temporaries well under
    one [N, V] float32 array."""
    n, v, d = 64, 4096, 16
    h = jnp.zeros((n, d), jnp.float32)
    k = jnp.zeros((d, v), jnp.float32)
    y = jnp.zeros((n,), jnp.int32)

    for kw in (dict(top_k=32), dict(top_k=32, top_p=0.9, min_p=0.01, max_candidates=64)):
        def loss(h, k, kw=kw):
            return jaxent.linear_support_log_probs(h, k, y, block_size=256, **kw).sum()

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, k).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < n * v * 4 / 4, (kw, temp)
