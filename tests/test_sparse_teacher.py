"""Tests for the sparse teacher of jaxent.distillation_loss / linear_distillation_loss.

A dense teacher written as a sparse one with ``k = V`` (ids in a random order) gives the
dense loss, values and gradients (float32, rtol 1e-5); with ``k < V`` the loss is checked
against the naive program over the ``k + 1`` bins (the student's materialized
log-probabilities at the ids and ``log(1 - sum)`` for the tail). Bad teachers get clear
errors; traced bad ids give ``nan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

N, D, V = 10, 6, 37
DIVS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _inputs(seed, k):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) / 2, jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)) / 2, jnp.float32)
    t = jnp.asarray(rng.normal(size=(N, V)) * 2, jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(V)[:k] for _ in range(N)]), jnp.int32)
    return rng, h, w, b, t, ids


def _close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def naive_bins(lp_all, ids, lq, lqt, kind, beta):
    """Per-row divergence over the teacher's ids plus the tail bin."""
    lp = jnp.take_along_axis(lp_all, ids, -1)
    lpt = jnp.log1p(-jnp.exp(lp).sum(-1))
    p_log = jnp.concatenate([lp, lpt[:, None]], 1)
    q_log = jnp.concatenate([lq, lqt[:, None]], 1)
    p, q = jnp.exp(p_log), jnp.exp(q_log)
    if kind == "kl":
        return jnp.sum(q * (q_log - p_log), 1)
    if kind == "reverse_kl":
        return jnp.sum(p * (p_log - q_log), 1)
    m = jnp.log(beta * q + (1 - beta) * p)
    return beta * jnp.sum(q * (q_log - m), 1) + (1 - beta) * jnp.sum(p * (p_log - m), 1)


@pytest.mark.parametrize("kind,beta", DIVS)
def test_dense_teacher_as_sparse_equals_dense(kind, beta):
    rng, h, w, b, t, ids = _inputs(0, V)
    temp = jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32)
    where = jnp.asarray(rng.random(N) < 0.8)
    lq = jnp.take_along_axis(jax.nn.log_softmax(t / temp[:, None]), ids, -1)
    kw = dict(divergence=kind, beta=beta, temperature=temp, where=where)

    def dense(h, w, b):
        return jaxent.distillation_loss(h @ w + b[None, :], t, **kw)

    def sparse_linear(h, w, b):
        return jaxent.linear_distillation_loss(h, w, teacher_topk=(ids, lq), student_bias=b,
                                               block_size=8, **kw)

    def sparse(h, w, b):
        return jaxent.distillation_loss(h @ w + b[None, :], teacher_topk=(ids, lq), **kw)

    want = jax.jit(jax.value_and_grad(dense, (0, 1, 2)))(h, w, b)
    for fn in (sparse_linear, sparse):
        _close(jax.jit(jax.value_and_grad(fn, (0, 1, 2)))(h, w, b), want)


@pytest.mark.parametrize("kind,beta", DIVS)
@pytest.mark.parametrize("given_tail", [False, True])
def test_partial_support_matches_naive_bins(kind, beta, given_tail):
    k = 6
    rng, h, w, b, t, ids = _inputs(1, k)
    lq_all = jax.nn.log_softmax(t)
    lq = jnp.take_along_axis(lq_all, ids, -1)
    rest = jnp.ones((N, V), bool).at[jnp.arange(N)[:, None], ids].set(False)
    lqt = jax.nn.logsumexp(jnp.where(rest, lq_all, -jnp.inf), -1)
    tail = lqt if given_tail else None
    ct = jnp.asarray(rng.normal(size=(N,)), jnp.float32)

    def fused(h, w):
        losses = jaxent.linear_distillation_loss(
            h, w, teacher_topk=(ids, lq), teacher_tail=tail, divergence=kind, beta=beta,
            temperature=1.4, block_size=5, reduction="none")
        return (losses * ct).sum()

    def ref(h, w):
        lp = jax.nn.log_softmax(h @ w / 1.4)
        return (naive_bins(lp, ids, lq, lqt, kind, beta) * ct).sum()

    _close(jax.jit(jax.value_and_grad(fused, (0, 1)))(h, w),
           jax.jit(jax.value_and_grad(ref, (0, 1)))(h, w), atol=2e-6)


def test_materialized_axis_labels_and_ignore():
    k = 4
    rng, h, w, b, t, ids = _inputs(2, k)
    s = jnp.asarray(rng.normal(size=(2, V, 5)), jnp.float32)       # classes on axis 1
    tq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 5, V)), jnp.float32))
    ids = jnp.asarray(rng.permutation(V)[:k])[None, None, :].repeat(2, 0).repeat(5, 1)
    lq = jnp.take_along_axis(tq, ids, -1)
    labels = jnp.asarray(rng.integers(0, V, (2, 5))).at[0, 1].set(-100)
    got = jaxent.distillation_loss(s, teacher_topk=(ids, lq), axis=1, labels=labels,
                                   reduction="none")
    assert got.shape == (2, 5) and float(got[0, 1]) == 0.0
    lp = jax.nn.log_softmax(jnp.moveaxis(s, 1, -1)).reshape(-1, V)
    lqt = jnp.log1p(-jnp.exp(lq).sum(-1)).reshape(-1)
    want = naive_bins(lp, ids.reshape(-1, k), lq.reshape(-1, k), lqt, "kl", 0.5)
    want = jnp.where(labels.reshape(-1) == -100, 0.0, want)
    _close(got.reshape(-1), want)


def test_topk_head_feeds_a_sparse_teacher():
    """The teacher's own top-k and tail (jaxent.linear_topk_log_probs) give the KL over the
    bins, 0 when the student is the teacher."""
    _, h, w, _, _, _ = _inputs(3, 1)
    ids, lq, tail = jaxent.linear_topk_log_probs(h, w, 5, return_tail=True)
    loss = jaxent.linear_distillation_loss(h, w, teacher_topk=(ids, lq), teacher_tail=tail)
    assert abs(float(loss)) < 1e-6


def test_bad_teachers():
    _, h, w, _, t, ids = _inputs(4, 3)
    lq = jnp.full((N, 3), -2.0)
    with pytest.raises(ValueError, match="not both"):
        jaxent.distillation_loss(h @ w, t, teacher_topk=(ids, lq))
    with pytest.raises(ValueError, match="not both"):
        jaxent.linear_distillation_loss(h, w, h, w, teacher_topk=(ids, lq))
    with pytest.raises(ValueError, match="pass a teacher"):
        jaxent.distillation_loss(h @ w)
    with pytest.raises(ValueError, match="pass a teacher"):
        jaxent.linear_distillation_loss(h, w, h)
    with pytest.raises(ValueError, match="`teacher_tail` goes with a sparse teacher"):
        jaxent.distillation_loss(h @ w, t, teacher_tail=jnp.zeros(N))
    with pytest.raises(ValueError, match="`teacher_bias`"):
        jaxent.linear_distillation_loss(h, w, teacher_topk=(ids, lq),
                                        teacher_bias=jnp.zeros(V))
    with pytest.raises(ValueError, match="`return_aux` is served with a dense teacher"):
        jaxent.linear_distillation_loss(h, w, teacher_topk=(ids, lq), return_aux=True)
    with pytest.raises(TypeError, match="`teacher_topk` must be a pair"):
        jaxent.distillation_loss(h @ w, teacher_topk=ids)
    with pytest.raises(ValueError, match="`teacher_topk log_probs`"):
        jaxent.distillation_loss(h @ w, teacher_topk=(ids, lq[:, :2]))
    with pytest.raises(ValueError, match="`teacher_topk` ids must have shape"):
        jaxent.distillation_loss(h @ w, teacher_topk=(ids[:3], lq))
    with pytest.raises(ValueError, match=r"k in \[1, V\]"):
        jaxent.distillation_loss(h[:, :2] @ w[:2, :2], teacher_topk=(ids[:, :3], lq))
    with pytest.raises(TypeError, match="`teacher_topk ids` must be integer"):
        jaxent.distillation_loss(h @ w, teacher_topk=(lq, lq))
    with pytest.raises(ValueError, match="`teacher_tail`"):
        jaxent.distillation_loss(h @ w, teacher_topk=(ids, lq), teacher_tail=jnp.zeros(3))
    bad = ids.at[2, 1].set(V)
    with pytest.raises(ValueError, match=r"`teacher_topk ids` must be ids in \[0, 37\)"):
        jaxent.distillation_loss(h @ w, teacher_topk=(bad, lq))
    with pytest.raises(ValueError, match=r"`teacher_topk ids`.*\[0, 37\)"):
        jaxent.linear_distillation_loss(h, w, teacher_topk=(ids.at[0, 0].set(-1), lq))
    dup = ids.at[4, 2].set(ids[4, 0])
    with pytest.raises(ValueError, match="distinct ids in each row; row \\(4,\\)"):
        jaxent.linear_distillation_loss(h, w, teacher_topk=(dup, lq))
    # masked-out rows are not checked
    where = jnp.ones(N, bool).at[2].set(False)
    assert np.isfinite(float(jaxent.distillation_loss(h @ w, teacher_topk=(bad, lq),
                                                      where=where)))


@pytest.mark.parametrize("bad_kind", ["range", "duplicate"])
def test_traced_bad_ids_give_nan(bad_kind):
    _, h, w, _, _, ids = _inputs(5, 3)
    lq = jnp.full((N, 3), -2.0)
    bad = ids.at[2, 1].set(V + 3) if bad_kind == "range" else ids.at[2, 1].set(ids[2, 0])

    @jax.jit
    def f(h, w, ids):
        return jaxent.linear_distillation_loss(h, w, teacher_topk=(ids, lq),
                                               reduction="none", block_size=8)

    out = f(h, w, bad)
    assert np.isnan(float(out[2])) and np.isfinite(np.asarray(out[:2])).all()
    g = jax.grad(lambda h: jax.jit(jaxent.linear_distillation_loss)(
        h, w, teacher_topk=(bad, lq)))
    assert np.isnan(np.asarray(g(h))).any()


def test_sparse_teacher_with_capacity_on_every_impl():
    """A sparse teacher's rows are gathered with the student's under ``capacity`` (same
    value as without it and as the materialized loss), on the vocabulary and the token
    walk and the Pallas kernels (interpreted)."""
    h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 20))
    ids, lq, tail = jaxent.linear_topk_log_probs(jax.random.normal(jax.random.key(2), (2, 5, 8)),
                                                 w, 4, return_tail=True)
    keep = jax.random.bernoulli(jax.random.key(3), 0.6, (2, 5))
    kw = dict(teacher_topk=(ids, lq), teacher_tail=tail, where=keep)
    want = jaxent.distillation_loss(h @ w, **kw)
    np.testing.assert_allclose(jaxent.linear_distillation_loss(h, w, capacity=10, **kw), want,
                               rtol=1e-5)
    np.testing.assert_allclose(jaxent.linear_distillation_loss(h, w, **kw), want, rtol=1e-5)
    np.testing.assert_allclose(jaxent.linear_distillation_loss(
        h, w, capacity=10, impl="token", token_block_size=3, **kw), want, rtol=1e-5)
    np.testing.assert_allclose(jaxent.linear_distillation_loss(
        h, w, capacity=10, impl="pallas", interpret=True, **kw), want, rtol=1e-5)
