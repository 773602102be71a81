"""Conformance of the RL and distillation heads: every head x impl x dtype x vocabulary
against the naive materialized program, values and gradients.

Heads: ``linear_log_probs`` (with and without the entropy), ``linear_soft_cross_entropy``,
``linear_distillation_loss`` (``kl``, ``reverse_kl``, ``jsd``), ``linear_topk_log_probs``
(ids, log-probabilities and tail) and ``linear_distillation_loss`` with a sparse teacher
(``jsd`` over the teacher's top-k ids and a tail bin), with a bias, a ``where`` mask, one
temperature per row (and label smoothing for the soft targets), per-token outputs
(``reduction="none"``). Impls: ``vocab`` (blocks of 64 columns), ``token`` (blocks of 5
tokens: 12 tokens make a ragged last block) and ``pallas`` (the Triton kernels in Pallas's
interpreter, blocks of 128 columns; the top-k head and the sparse teacher in their
``tiled()`` forms). Vocabularies: 128 (a whole number of blocks of every impl) and 100
(ragged against both).

The reference forms ``logits = h @ W + b`` in float32 (from the same, possibly bfloat16,
inputs) and writes each loss with ``jax.nn.log_softmax`` (the top-k with ``lax.top_k``;
its ids must be equal); gradients w.r.t. the student's
hidden, kernel and bias are plain autodiff of a random weighted sum of the outputs.
Tolerances (rtol, with atol = rtol * max |reference| for entries near 0): float32 1e-5;
bfloat16 values 1e-5 (they accumulate in float32 from the same inputs) and gradients
2e-2 (the ``dx`` tiles are rounded to bfloat16 before their matmuls and the gradients
are returned in bfloat16).

One program per (impl, dtype) holds every head and vocabulary (few compiles); the test
cases read their part of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

N, D, DT = 12, 24, 16
VOCABS = {"whole": 128, "ragged": 100}
HEADS = ("log_probs", "log_probs_entropy", "soft", "kl", "reverse_kl", "jsd", "topk",
         "sparse")
IMPLS = ("vocab", "token", "pallas")
K, KT = 5, 6  # the top-k head's k; the sparse teacher's ids per row
DTYPES = ("float32", "bfloat16")
BETA, SMOOTH = 0.3, 0.1
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-5, 2e-2)}  # (values, gradients)


def _data(v: int, dtype: str) -> dict:
    rng = np.random.default_rng(v)
    f = lambda *s, scale=1.0: jnp.asarray(  # noqa: E731
        rng.standard_normal(s) * scale, jnp.float32).astype(dtype)
    return {
        "h": f(N, D), "w": f(D, v, scale=0.4), "b": f(v, scale=0.5),
        "ht": f(N, DT), "wt": f(DT, v, scale=0.5), "bt": f(v, scale=0.5),
        "y": jnp.asarray(rng.integers(0, v, N), jnp.int32),
        "t": jax.nn.softmax(jnp.asarray(rng.standard_normal((N, v)) * 2, jnp.float32)),
        "where": jnp.asarray(rng.random(N) < 0.8),
        "temp": jnp.asarray(rng.uniform(0.6, 1.8, N), jnp.float32),
        "c": jnp.asarray(rng.standard_normal((2, N)), jnp.float32),
        "ck": jnp.asarray(rng.standard_normal((N, K)), jnp.float32),
        **_sparse_teacher(f(N, DT), f(DT, v, scale=0.5)),
    }


def _sparse_teacher(ht, wt) -> dict:
    """A sparse teacher in float32: the top ``KT`` ids of ``ht @ wt``, their
    log-probabilities and the log-mass of the other classes."""
    x = ht.astype(jnp.float32) @ wt.astype(jnp.float32)
    ids = jax.lax.top_k(x, KT)[1]
    lq = jax.nn.log_softmax(x, axis=-1)
    out = jnp.ones(x.shape, bool).at[jnp.arange(N)[:, None], ids].set(False)
    tail = jax.nn.logsumexp(jnp.where(out, lq, -jnp.inf), axis=-1)
    return {"tid": ids, "tlq": jnp.take_along_axis(lq, ids, 1), "ttail": tail}


def _head(name: str, impl: str, h, w, b, d: dict):
    """The head's per-token outputs, a tuple of ``[N]`` arrays (the top-k's ids and
    log-probabilities ``[N, K]``)."""
    kw = {"impl": impl, "block_size": 64, "token_block_size": 5, "interpret": True}
    common = {"temperature": d["temp"], "where": d["where"]}
    if name.startswith("log_probs"):
        out = jaxent.linear_log_probs(h, w, d["y"], bias=b, return_entropy=name.endswith(
            "entropy"), **common, **kw)
        return out if isinstance(out, tuple) else (out,)
    if name == "soft":
        return (jaxent.linear_soft_cross_entropy(h, w, d["t"], bias=b, label_smoothing=SMOOTH,
                                                 reduction="none", **common, **kw),)
    if name == "topk":
        return jaxent.linear_topk_log_probs(h, w, K, bias=b, return_tail=True, **common, **kw)
    if name == "sparse":
        return (jaxent.linear_distillation_loss(
            h, w, teacher_topk=(d["tid"], d["tlq"]), teacher_tail=d["ttail"],
            divergence="jsd", beta=BETA, student_bias=b, reduction="none", **common, **kw),)
    return (jaxent.linear_distillation_loss(h, w, d["ht"], d["wt"], divergence=name,
                                            beta=BETA, student_bias=b, teacher_bias=d["bt"],
                                            reduction="none", **common, **kw),)


def _reference(name: str, impl: str, h, w, b, d: dict):
    """The naive program: materialized float32 logits and the textbook formulas."""
    del impl
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    temp, where = d["temp"][:, None], d["where"]
    lp = jax.nn.log_softmax((f32(h) @ f32(w) + f32(b)[None, :]) / temp, axis=-1)
    zero = lambda x: jnp.where(where, x, 0.0)  # noqa: E731
    if name.startswith("log_probs"):
        out = (zero(jnp.take_along_axis(lp, d["y"][:, None], 1)[:, 0]),)
        if name.endswith("entropy"):
            out += (zero(-jnp.sum(jnp.exp(lp) * lp, -1)),)
        return out
    if name == "soft":
        t = (1 - SMOOTH) * d["t"] + SMOOTH / lp.shape[1]
        return (zero(-jnp.sum(t * lp, -1)),)
    if name == "topk":
        _, ids = jax.lax.top_k(lp, K)
        out = jnp.ones(lp.shape, bool).at[jnp.arange(N)[:, None], ids].set(False)
        tail = jax.nn.logsumexp(jnp.where(out, lp, -jnp.inf), axis=-1)
        return (jnp.where(where[:, None], ids, -1),
                jnp.where(where[:, None], jnp.take_along_axis(lp, ids, 1), 0.0), zero(tail))
    if name == "sparse":
        out = jnp.ones(lp.shape, bool).at[jnp.arange(N)[:, None], d["tid"]].set(False)
        lp_bins = jnp.concatenate([jnp.take_along_axis(lp, d["tid"], 1), jax.nn.logsumexp(
            jnp.where(out, lp, -jnp.inf), axis=-1)[:, None]], axis=1)
        lq_bins = jnp.concatenate([d["tlq"], d["ttail"][:, None]], axis=1)
        return (zero(_jsd(lp_bins, lq_bins)),)
    lq = jax.nn.log_softmax((f32(d["ht"]) @ f32(d["wt"]) + f32(d["bt"])[None, :]) / temp,
                           axis=-1)
    p, q = jnp.exp(lp), jnp.exp(lq)
    if name == "kl":
        return (zero(jnp.sum(q * (lq - lp), -1)),)
    if name == "reverse_kl":
        return (zero(jnp.sum(p * (lp - lq), -1)),)
    return (zero(_jsd(lp, lq)),)


def _jsd(lp, lq):
    p, q = jnp.exp(lp), jnp.exp(lq)
    lm = jnp.log(BETA * q + (1 - BETA) * p)
    return BETA * jnp.sum(q * (lq - lm), -1) + (1 - BETA) * jnp.sum(p * (lp - lm), -1)


def _weighted(outs, d: dict):
    """A random weighted sum of the float outputs (``[N]`` and the top-k's ``[N, K]``)."""
    total = 0.0
    for i, o in enumerate(o for o in outs if jnp.issubdtype(o.dtype, jnp.floating)):
        c = d["c"][i % 2]
        total = total + jnp.sum(o * (c if o.ndim == 1 else c[:, None] * d["ck"]))
    return total


def _everything(fn, impl: str, data: dict) -> dict:
    """``{(head, vocab): (outputs, (d hidden, d kernel, d bias))}`` of ``fn``."""
    out = {}
    for vname, d in data.items():
        for head in HEADS:
            def loss(h, w, b, head=head, d=d):
                outs = fn(head, impl, h, w, b, d)
                return _weighted(outs, d), outs

            (_, outs), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
                d["h"], d["w"], d["b"])
            out[head, vname] = (outs, grads)
    return out


@functools.cache
def _compiled(impl: str, dtype: str):
    """The compiled program of every head and vocabulary for ``impl`` (None: the reference)
    and ``dtype``, and its results."""
    data = {k: _data(v, dtype) for k, v in VOCABS.items()}
    fn = _reference if impl is None else _head
    compiled = jax.jit(functools.partial(_everything, fn, impl)).lower(data).compile()
    return compiled, compiled(data)


def _close(got, ref, rtol: float, what: str):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    scale = float(np.max(np.abs(ref))) or 1.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("vocab", list(VOCABS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", HEADS)
def test_head_matches_naive_program(head, impl, dtype, vocab):
    outs, grads = _compiled(impl, dtype)[1][head, vocab]
    ref_outs, ref_grads = _compiled(None, dtype)[1][head, vocab]
    tol_v, tol_g = TOL[dtype]
    assert len(outs) == len(ref_outs)
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        assert o.shape == r.shape and o.shape[0] == N, f"output {i}"
        if jnp.issubdtype(r.dtype, jnp.integer):  # the top-k ids
            assert o.dtype == jnp.int32
            np.testing.assert_array_equal(o, r, err_msg=f"output {i}")
            continue
        assert o.dtype == jnp.float32
        _close(o, r, tol_v, f"output {i}")
    for name, g, r in zip(("hidden", "kernel", "bias"), grads, ref_grads, strict=True):
        assert g.dtype == jnp.dtype(dtype), name
        _close(g, r, tol_g, f"d {name}")


def _signature(head: str, impl: str) -> str:
    """The jaxpr of one head's value and gradient (vocabulary 100, float32)."""
    d = _data(VOCABS["ragged"], "float32")

    def loss(h, w, b):
        return _weighted(_head(head, impl, h, w, b, d), d)

    return str(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(d["h"], d["w"], d["b"]))


@pytest.mark.parametrize("head", HEADS)
def test_each_impl_is_its_own_program(head):
    """``impl`` is honoured: the vocabulary walk loops over ``[N, 64]`` logits blocks, the
    token walk over ``[5, V]`` whole rows, the Pallas program holds the statistic kernels;
    and the compiled programs (every head in one) differ."""
    sig = {impl: _signature(head, impl) for impl in IMPLS}
    assert "pallas_call" in sig["pallas"] and "jaxent_stat_dkernel" in sig["pallas"]
    assert "pallas_call" not in sig["vocab"] and "pallas_call" not in sig["token"]
    assert "f32[12,64]" in sig["vocab"] and "f32[5,100]" not in sig["vocab"]
    assert "f32[5,100]" in sig["token"] and "f32[12,64]" not in sig["token"]
    texts = {impl: _compiled(impl, "float32")[0].as_text() for impl in IMPLS}
    assert len(set(texts.values())) == len(IMPLS)


# ------------------------------------------------------------------------------ return_aux

AUX_HEADS = ("log_probs_entropy", "soft", "kl", "jsd")
Z_LOSS = 1e-3


def _aux_head(name: str, impl: str, h, w, b, d: dict):
    """``(per-token outputs, aux dict)`` of the head with ``return_aux=True``."""
    kw = {"impl": impl, "block_size": 64, "token_block_size": 5, "interpret": True,
          "temperature": d["temp"], "where": d["where"], "return_aux": True}
    if name == "log_probs_entropy":
        return jaxent.linear_log_probs(h, w, d["y"], bias=b, return_entropy=True, **kw)
    if name == "soft":
        loss, aux = jaxent.linear_soft_cross_entropy(
            h, w, d["t"], bias=b, label_smoothing=SMOOTH, z_loss=Z_LOSS, reduction="none", **kw)
        return (loss,), aux
    loss, aux = jaxent.linear_distillation_loss(
        h, w, d["ht"], d["wt"], divergence=name, beta=BETA, student_bias=b,
        teacher_bias=d["bt"], reduction="none", **kw)
    return (loss,), aux


def _aux_reference(name: str, h, w, b, d: dict):
    """The naive program's outputs and aux: ``logsumexp`` and ``argmax`` of the materialized
    float32 logits."""
    x = h @ w + b[None, :]
    lse = jax.nn.logsumexp(x / d["temp"][:, None], axis=-1)
    aux = {"lse": lse, "argmax": jnp.argmax(x, -1).astype(jnp.int32)}
    outs = _reference(name, None, h, w, b, d)
    if name == "soft":
        aux["z_loss"] = jnp.where(d["where"], Z_LOSS * lse**2, 0.0)
        outs = (outs[0] + aux["z_loss"],)
    if name in ("kl", "jsd"):
        xt = d["ht"] @ d["wt"] + d["bt"][None, :]
        aux["teacher_argmax"] = jnp.argmax(xt, -1).astype(jnp.int32)
    return outs, aux


@functools.cache
def _aux_results(impl: str | None):
    """``{head: (outputs, aux, (d hidden, d kernel, d bias))}``, vocabulary 100, float32, in
    one program. The differentiated sum also weighs the aux's ``lse`` for the heads (not for
    the reference): it carries no gradient, so the gradients must be the reference's."""
    def everything(d):
        out = {}
        for head in AUX_HEADS:
            def loss(h, w, b, head=head):
                outs, aux = (_aux_reference(head, h, w, b, d) if impl is None
                             else _aux_head(head, impl, h, w, b, d))
                total = sum(jnp.sum(o * d["c"][i]) for i, o in enumerate(outs))
                if impl is not None:
                    total = total + jnp.sum(aux["lse"] * d["c"][1])
                return total, (outs, aux)

            (_, (outs, aux)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
                d["h"], d["w"], d["b"])
            out[head] = (outs, aux, grads)
        return out

    return jax.jit(everything)(_data(VOCABS["ragged"], "float32"))


@pytest.mark.parametrize("impl", IMPLS)
def test_return_aux_matches_naive_program(impl):
    """``return_aux`` on every head and impl: the outputs and gradients unchanged, ``lse``
    at rtol 1e-5, the argmaxes exact, the z-loss term; the aux's keys are the documented
    ones and carry no gradient."""
    got, ref = _aux_results(impl), _aux_results(None)
    for head in AUX_HEADS:
        outs, aux, grads = got[head]
        r_outs, r_aux, r_grads = ref[head]
        assert set(aux) == set(r_aux), head
        for i, (o, r) in enumerate(zip(outs, r_outs, strict=True)):
            _close(o, r, 1e-5, f"{head} output {i}")
        for name in ("argmax", "teacher_argmax"):
            if name in aux:
                assert aux[name].dtype == jnp.int32 and aux[name].shape == (N,)
                np.testing.assert_array_equal(aux[name], r_aux[name], err_msg=f"{head} {name}")
        for name in ("lse", "z_loss"):
            if name in aux:
                _close(aux[name], r_aux[name], 1e-5, f"{head} {name}")
        for name, g, r in zip(("hidden", "kernel", "bias"), grads, r_grads, strict=True):
            _close(g, r, 1e-5, f"{head} d {name}")
