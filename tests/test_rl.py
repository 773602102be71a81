"""Tests for jaxent.rl: per-token log-probs/entropy, fused soft targets, distillation.

Values and gradients (random cotangents on every output) are checked against float64
formulas on materialized logits (tests/reference.py), for every option, divergence, both
kernel layouts and per-row temperatures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from tests import reference as ref

N_LEAD, D, V, BLOCK = (3, 4), 8, 37, 8  # V ragged against BLOCK


def _to64(tree):
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a, np.float64))
        if a is not None and jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
        else a, tree)


def _close(a, b, rtol=2e-5, atol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(1.0, float(np.max(np.abs(y)))) if y.size else 1.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale)


def _check(fn, reference, args, argnums, rng, rtol=2e-5, atol=2e-5):
    """``fn(*args)`` (jitted) against ``reference(*args64)`` (float64, jax.numpy): values
    and the VJPs w.r.t. ``args[argnums]`` for one random cotangent on every output."""

    def put(base, diff):
        out = list(base)
        for i, d in zip(argnums, diff, strict=True):
            out[i] = d
        return out

    diff = [args[i] for i in argnums]
    shapes = jax.eval_shape(lambda *d: fn(*put(args, d)), *diff)
    cts = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), shapes)

    @jax.jit
    def value_and_vjp(diff, cts):  # one compilation for the values and the gradients
        out, vjp = jax.vjp(lambda *d: fn(*put(args, d)), *diff)
        return out, vjp(cts)

    out, grads = value_and_vjp(diff, cts)
    with jax.enable_x64(True):
        a64 = _to64(args)
        out64, vjp64 = jax.vjp(lambda *d: reference(*put(a64, d)), *[a64[i] for i in argnums])
        grads64 = vjp64(_to64(cts))
    _close(out, out64, rtol, atol)
    _close(grads, grads64, rtol, atol)
    return out, grads


def _temps(kind, rng, lead):
    """(jaxent temperature, reference temperature broadcasting against [..., V])."""
    if kind == "scalar":
        return 0.7, 0.7
    if kind == "one":
        return 1.0, 1.0
    t = rng.uniform(0.5, 2.0, lead[:1] + (1,) * (len(lead) - 1)).astype(np.float32)
    return jnp.asarray(t), np.asarray(t, np.float64)[..., None]


def _head_logits(h, k, b, layout):
    x = h @ (k if layout == "dv" else k.T)
    return x if b is None else x + b.reshape((1,) * (x.ndim - 1) + (-1,))


# ----------------------------------------------------------------------- token_log_probs


@pytest.mark.parametrize("temp,cap,masked", [
    ("one", None, False), ("scalar", None, True), ("rows", 2.5, True), ("rows", None, False)])
def test_token_log_probs(rng, temp, cap, masked):
    x = jnp.asarray(rng.normal(size=N_LEAD + (V,)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, V, N_LEAD))
    where = jnp.asarray(rng.random(N_LEAD) < 0.7) if masked else None
    t, t_ref = _temps(temp, rng, N_LEAD)

    def fn(x):
        return jaxent.token_log_probs(x, y, temperature=t, logit_softcap=cap, where=where,
                                      return_entropy=True)

    def reference(x):
        return ref.token_log_probs(x, y, temperature=t_ref, logit_softcap=cap, where=where,
                                   xp=jnp)

    (lp, ent), _ = _check(fn, reference, [x], [0], rng)
    if masked:
        assert np.all(np.asarray(lp)[~np.asarray(where)] == 0)
    lp_only = jax.jit(lambda x: jaxent.token_log_probs(
        x, y, temperature=t, logit_softcap=cap, where=where))(x)
    _close(lp_only, lp)


def test_token_log_probs_axis_and_large_offsets(rng):
    x = rng.normal(size=(2, V, 3)).astype(np.float32) * 3 + 1e4  # classes on axis 1
    y = rng.integers(0, V, (2, 3))

    def fn(x):
        return jaxent.token_log_probs(x, y, axis=1, return_entropy=True)

    def reference(x):
        return ref.token_log_probs(jnp.moveaxis(x, 1, -1), y, xp=jnp)

    _check(fn, reference, [jnp.asarray(x)], [0], rng, atol=1e-4)


def test_token_log_probs_neg_inf_logits(rng):
    x = rng.normal(size=(4, 6)).astype(np.float32)
    x[:, :2] = -np.inf  # a masked-out vocabulary part: p = 0, 0 log 0 = 0
    y = np.array([2, 3, 4, 5])
    lp, ent = jaxent.token_log_probs(x, y, return_entropy=True)
    g = jax.grad(lambda x: sum(jnp.sum(o) for o in jaxent.token_log_probs(
        x, y, return_entropy=True)))(jnp.asarray(x))
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(ent)) and np.all(np.isfinite(g))
    rlp, rent = ref.token_log_probs(x[:, 2:], y - 2)
    _close(lp, rlp)
    _close(ent, rent)


def test_token_log_probs_bf16(rng):
    x = jnp.asarray(rng.normal(size=(6, V)), jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, V, (6,)))
    lp, ent = jaxent.token_log_probs(x, y, return_entropy=True)
    assert lp.dtype == jnp.float32
    rlp, rent = ref.token_log_probs(np.asarray(x.astype(jnp.float32)), y)
    _close(lp, rlp, rtol=1e-5)
    _close(ent, rent, rtol=1e-5)
    g = jax.grad(lambda x: jaxent.token_log_probs(x, y).sum())(x)
    assert g.dtype == jnp.bfloat16


# ---------------------------------------------------------------------- linear_log_probs


@pytest.mark.parametrize("layout,options", [
    ("dv", {}),
    ("vd", {"bias": True, "temp": "rows", "where": True}),
    ("dv", {"bias": True, "cap": 3.0, "temp": "scalar"}),
    ("vd", {"cap": 2.0, "temp": "rows", "where": True, "block": 64}),
])
def test_linear_log_probs(rng, layout, options):
    h = jnp.asarray(rng.normal(size=N_LEAD + (D,)), jnp.float32)
    kshape = (D, V) if layout == "dv" else (V, D)
    k = jnp.asarray(rng.normal(size=kshape) / 2, jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)), jnp.float32) if options.get("bias") else None
    y = jnp.asarray(rng.integers(0, V, N_LEAD))
    where = jnp.asarray(rng.random(N_LEAD) < 0.7) if options.get("where") else None
    t, t_ref = _temps(options.get("temp", "one"), rng, N_LEAD)
    cap, block = options.get("cap"), options.get("block", BLOCK)

    def fn(h, k, b):
        return jaxent.linear_log_probs(h, k, y, bias=b, kernel_layout=layout, temperature=t,
                                       logit_softcap=cap, where=where, return_entropy=True,
                                       block_size=block)

    def reference(h, k, b):
        return ref.token_log_probs(_head_logits(h, k, b, layout), y, temperature=t_ref,
                                   logit_softcap=cap, where=where, xp=jnp)

    argnums = [0, 1, 2] if b is not None else [0, 1]
    _check(fn, reference, [h, k, b], argnums, rng)


def test_linear_log_probs_without_entropy_and_bf16(rng):
    h = jnp.asarray(rng.normal(size=(5, D)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(V, D)) / 2, jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, V, (5,)))
    lp, aux = jaxent.linear_log_probs(h, k, y, kernel_layout="vd", block_size=BLOCK,
                                      return_aux=True)
    x64 = np.asarray(h, np.float64) @ np.asarray(k, np.float64).T
    rlp, _ = ref.token_log_probs(x64, y)
    _close(lp, rlp, rtol=1e-5)
    lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
    _close(aux["lse"], lse, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["argmax"]), x64.argmax(-1))
    dh, dk = jax.grad(lambda h, k: jaxent.linear_log_probs(
        h, k, y, kernel_layout="vd", block_size=BLOCK).sum(), argnums=(0, 1))(h, k)
    assert dh.dtype == dk.dtype == jnp.bfloat16
    rdh, rdk = ref.grad64(lambda h, k: ref.token_log_probs(h @ k.T, y, xp=jnp)[0].sum(),
                          h.astype(jnp.float32), k.astype(jnp.float32), argnums=(0, 1))
    _close(dh, rdh, rtol=2e-2, atol=2e-2)
    _close(dk, rdk, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------- linear_soft_cross_entropy


def _soft_ref(h, k, b, t, layout, opts, t_ref, weight, where, reduction):
    return ref.soft_cross_entropy(
        _head_logits(h, k, b, layout), t, weight=weight, where=where, reduction=reduction,
        temperature=t_ref, label_smoothing=opts.get("label_smoothing", 0.0),
        z_loss=opts.get("z_loss", 0.0), logit_softcap=opts.get("logit_softcap"), xp=jnp)


@pytest.mark.parametrize("layout,reduction,opts", [
    ("dv", "mean", {}),
    ("vd", "none", {"label_smoothing": 0.1, "weight": True, "where": True, "bias": True}),
    ("dv", "none", {"z_loss": 1e-2, "logit_softcap": 3.0, "temp": "rows", "bias": True}),
    ("vd", "mean", {"label_smoothing": 0.05, "temp": "scalar", "where": True, "zeros": True,
                    "z_loss": 1e-3, "weight": True}),
    ("vd", "none", {"temp": "rows", "where": True, "logit_softcap": 4.0}),
])
def test_linear_soft_cross_entropy(rng, layout, reduction, opts):
    h = jnp.asarray(rng.normal(size=N_LEAD + (D,)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, V) if layout == "dv" else (V, D)) / 2, jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)), jnp.float32) if opts.get("bias") else None
    tgt = rng.dirichlet(np.ones(V) * 0.5, N_LEAD)
    if opts.get("zeros"):
        tgt[..., :5] = 0.0  # no mass on some classes
        tgt /= tgt.sum(-1, keepdims=True)
    tgt = jnp.asarray(tgt, jnp.float32)
    weight = jnp.asarray(rng.uniform(0.5, 2, V), jnp.float32) if opts.get("weight") else None
    where = jnp.asarray(rng.random(N_LEAD) < 0.7) if opts.get("where") else None
    t, t_ref = _temps(opts.get("temp", "one"), rng, N_LEAD)
    kw = {n: opts[n] for n in ("label_smoothing", "z_loss", "logit_softcap") if n in opts}

    def fn(h, k, b, tgt):
        return jaxent.linear_soft_cross_entropy(
            h, k, tgt, bias=b, kernel_layout=layout, weight=weight, where=where,
            reduction=reduction, temperature=t, block_size=BLOCK, **kw)

    def reference(h, k, b, tgt):
        return _soft_ref(h, k, b, tgt, layout, opts, t_ref, weight, where, reduction)

    argnums = [0, 1, 3] + ([2] if b is not None else [])
    _check(fn, reference, [h, k, b, tgt], argnums, rng)


def _torch_cases():
    """Probability-target samples in the style of torch's OpInfo for linear_cross_entropy:
    with and without bias, class weights, label smoothing and each reduction."""
    cases = []
    for bias in (False, True):
        for weight in (False, True):
            for smoothing in (0.0, 0.25):
                for reduction in ("mean", "sum", "none"):
                    cases.append((bias, weight, smoothing, reduction))
    return [cases[0], (True, True, 0.1, "none")]  # the OpInfo samples below cover the rest


@pytest.mark.parametrize("bias,weight,smoothing,reduction", _torch_cases())
def test_linear_soft_cross_entropy_against_torch(rng, bias, weight, smoothing, reduction):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    n = 7
    h = rng.normal(size=(n, D)).astype(np.float32)
    k = rng.normal(size=(V, D)).astype(np.float32) / 2  # torch's [out, in] = "vd"
    b = rng.normal(size=(V,)).astype(np.float32) if bias else None
    w = rng.uniform(0.5, 2.0, V).astype(np.float32) if weight else None
    tgt = rng.dirichlet(np.ones(V), n).astype(np.float32)
    th, tk, tt = (torch.tensor(a, requires_grad=True) for a in (h, k, tgt))
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    fn = getattr(F, "linear_cross_entropy", None)
    kw = dict(weight=None if w is None else torch.tensor(w), reduction=reduction,
              label_smoothing=smoothing)
    if fn is not None:
        out = fn(th, tk, tt, linear_bias=tb, **kw)
    else:
        out = F.cross_entropy(F.linear(th, tk, tb), tt, **kw)
    ct = rng.normal(size=tuple(out.shape)).astype(np.float32)
    out.backward(torch.tensor(ct))

    def jfn(h, k, b, t):
        return jaxent.linear_soft_cross_entropy(h, k, t, bias=b, kernel_layout="vd", weight=w,
                                                label_smoothing=smoothing, reduction=reduction,
                                                block_size=BLOCK)

    args = [jnp.asarray(h), jnp.asarray(k), None if b is None else jnp.asarray(b),
            jnp.asarray(tgt)]
    argnums = [0, 1, 3] + ([2] if bias else [])
    got, vjp = jax.vjp(lambda *d: jfn(*[dict(zip(argnums, d, strict=True)).get(i, a)
                                        for i, a in enumerate(args)]),
                       *[args[i] for i in argnums])
    grads = vjp(jnp.asarray(ct))
    _close(got, out.detach().numpy(), rtol=1e-5, atol=1e-5)
    expect = [th.grad, tk.grad, tt.grad] + ([tb.grad] if bias else [])
    _close(grads, [g.numpy() for g in expect], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ distillation


DIVERGENCES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0),
               ("jsd", 1.0)]


@pytest.mark.parametrize("divergence,beta,temp", [
    (div, beta, "rows" if i % 2 else "scalar") for i, (div, beta) in enumerate(DIVERGENCES)])
def test_distillation_loss(rng, divergence, beta, temp):
    xs = jnp.asarray(rng.normal(size=N_LEAD + (V,)) * 2, jnp.float32)
    xt = jnp.asarray(rng.normal(size=N_LEAD + (V,)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, N_LEAD)).at[0, 0].set(-100)
    where = jnp.asarray(rng.random(N_LEAD) < 0.8)
    t, t_ref = _temps(temp, rng, N_LEAD)
    counted = where & (labels != -100)

    def fn(xs, xt):
        return jaxent.distillation_loss(xs, xt, divergence=divergence, beta=beta,
                                        temperature=t, labels=labels, where=where,
                                        reduction="none")

    def reference(xs, xt):
        return ref.distillation(xs, jax.lax.stop_gradient(xt), divergence=divergence,
                                beta=beta, temperature=t_ref, where=counted,
                                reduction="none", xp=jnp)

    _, (gs, gt) = _check(fn, reference, [xs, xt], [0, 1], rng)
    assert np.all(np.asarray(gt) == 0)  # the teacher is a constant
    mean = jaxent.distillation_loss(xs, xt, divergence=divergence, beta=beta, temperature=t,
                                    labels=labels, where=where)
    _close(mean, ref.distillation(xs, xt, divergence=divergence, beta=beta,
                                  temperature=t_ref, where=counted))


def test_distillation_loss_axis_sum_and_identical(rng):
    xs = rng.normal(size=(2, V, 3)).astype(np.float32)
    xt = rng.normal(size=(2, V, 3)).astype(np.float32)
    got = jaxent.distillation_loss(xs, xt, axis=1, reduction="sum", divergence="reverse_kl")
    want = ref.distillation(np.moveaxis(xs, 1, -1), np.moveaxis(xt, 1, -1),
                            divergence="reverse_kl", reduction="sum")
    _close(got, want)
    for div in ("kl", "reverse_kl", "jsd"):
        same = jaxent.distillation_loss(xs, xs, axis=1, divergence=div)
        assert abs(float(same)) < 1e-6


def test_distillation_empty_mean_is_zero(rng):
    xs = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
    xt = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
    none = jnp.zeros((4,), bool)
    val, g = jax.value_and_grad(lambda x: jaxent.distillation_loss(x, xt, where=none))(xs)
    assert float(val) == 0.0 and np.all(np.asarray(g) == 0)
    k = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
    val, g = jax.value_and_grad(lambda h: jaxent.linear_distillation_loss(
        h, k, h, k, labels=jnp.full((4,), -100)))(h)
    assert float(val) == 0.0 and np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("divergence,beta,layout,bias,temp", [
    ("kl", 0.5, "dv", False, "one"), ("reverse_kl", 0.5, "vd", True, "rows"),
    ("jsd", 0.5, "dv", True, "scalar"), ("jsd", 0.2, "vd", True, "rows")])
def test_linear_distillation_loss(rng, divergence, beta, layout, bias, temp):
    dt = 12  # the teacher is wider
    hs = jnp.asarray(rng.normal(size=N_LEAD + (D,)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=N_LEAD + (dt,)), jnp.float32)
    ks = jnp.asarray(rng.normal(size=(D, V) if layout == "dv" else (V, D)) / 2, jnp.float32)
    kt = jnp.asarray(rng.normal(size=(dt, V) if layout == "dv" else (V, dt)) / 2, jnp.float32)
    bs = jnp.asarray(rng.normal(size=(V,)), jnp.float32) if bias else None
    bt = jnp.asarray(rng.normal(size=(V,)), jnp.float32) if bias else None
    labels = jnp.asarray(rng.integers(0, V, N_LEAD)).at[1, 2].set(-100)
    where = jnp.asarray(rng.random(N_LEAD) < 0.8)
    t, t_ref = _temps(temp, rng, N_LEAD)
    counted = where & (labels != -100)

    def fn(hs, ks, bs, ht, kt, bt):
        return jaxent.linear_distillation_loss(
            hs, ks, ht, kt, divergence=divergence, beta=beta, temperature=t, student_bias=bs,
            teacher_bias=bt, kernel_layout=layout, labels=labels, where=where,
            reduction="none", block_size=BLOCK)

    def reference(hs, ks, bs, ht, kt, bt):
        teacher = jax.lax.stop_gradient(_head_logits(ht, kt, bt, layout))
        return ref.distillation(_head_logits(hs, ks, bs, layout), teacher,
                                divergence=divergence, beta=beta, temperature=t_ref,
                                where=counted, reduction="none", xp=jnp)

    argnums = [0, 1, 3, 4] + ([2] if bias else [])  # the teacher's gradients are 0
    _, grads = _check(fn, reference, [hs, ks, bs, ht, kt, bt], argnums, rng)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)
    mean = jaxent.linear_distillation_loss(
        hs, ks, ht, kt, divergence=divergence, beta=beta, temperature=t, student_bias=bs,
        teacher_bias=bt, kernel_layout=layout, labels=labels, where=where, block_size=BLOCK)
    _close(mean, ref.distillation(
        np.asarray(_head_logits(hs, ks, bs, layout)), np.asarray(_head_logits(ht, kt, bt,
                                                                              layout)),
        divergence=divergence, beta=beta, temperature=t_ref, where=counted))


# ---------------------------------------------------------------------------- errors


def _calls(temperature):
    x = jnp.zeros((3, 4, V))
    y = jnp.zeros((3, 4), jnp.int32)
    h, k = jnp.zeros((3, 4, D)), jnp.zeros((D, V))
    return [
        lambda: jaxent.token_log_probs(x, y, temperature=temperature),
        lambda: jaxent.linear_log_probs(h, k, y, temperature=temperature),
        lambda: jaxent.linear_soft_cross_entropy(h, k, x, temperature=temperature),
        lambda: jaxent.distillation_loss(x, x, temperature=temperature),
        lambda: jaxent.linear_distillation_loss(h, k, h, k, temperature=temperature),
    ]


@pytest.mark.parametrize("bad", [np.ones((4, 3)), np.ones((3, 4, 2)), np.ones((5,))])
def test_wrong_shape_temperature_raises(bad):
    for call in _calls(jnp.asarray(bad)):
        with pytest.raises(ValueError, match="`temperature`"):
            call()


def test_bad_temperature_values_and_broadcasts():
    for call in _calls(jnp.asarray([1.0, 0.0, 2.0])[:, None]):
        with pytest.raises(ValueError, match="`temperature`"):
            call()
    for call in _calls(-1.0):
        with pytest.raises(ValueError, match="`temperature`"):
            call()
    for call in _calls(jnp.full((3, 1), 2.0)):  # broadcastable: fine
        call()


def test_argument_errors():
    x = jnp.zeros((3, V))
    h, k = jnp.zeros((3, D)), jnp.zeros((D, V))
    y = jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="`divergence`"):
        jaxent.distillation_loss(x, x, divergence="js")
    with pytest.raises(ValueError, match="`beta`"):
        jaxent.distillation_loss(x, x, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="`impl`"):
        jaxent.linear_log_probs(h, k, y, impl="fused")
    with pytest.raises(ValueError, match="interpret=True"):  # compiled kernels: GPU, TPU
        jaxent.linear_log_probs(h, k, y, impl="pallas")
    with pytest.raises(ValueError, match="`tokens`"):
        jaxent.token_log_probs(x, jnp.array([0, V, 1]))
    with pytest.raises(ValueError, match="`teacher_logits`"):
        jaxent.distillation_loss(x, jnp.zeros((3, V + 1)))
    with pytest.raises(ValueError, match="`ignore_index`"):
        jaxent.distillation_loss(x, x, ignore_index=0)
    with pytest.raises(ValueError, match="`teacher_kernel`"):
        jaxent.linear_distillation_loss(h, k, h, jnp.zeros((D, V + 1)))
    with pytest.raises(ValueError, match="`targets`"):
        jaxent.linear_soft_cross_entropy(h, k, jnp.zeros((3, V + 1)))
    with pytest.raises(ValueError, match="`kernel`.*transposed"):
        jaxent.linear_log_probs(h, k.T, y)
    # traced out-of-range tokens: nan, not a silently wrong number
    lp = jax.jit(lambda y: jaxent.linear_log_probs(h, k, y))(jnp.array([0, V, 1]))
    assert np.isnan(lp[1]) and not np.isnan(lp[0])


# ---------------------------------------------------------------------------- memory


def temp_bytes(fn, *shapes):
    """Compiled temporary memory of ``jit(value_and_grad(fn, argnums=(0, 1)))``."""
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_temp_memory_against_naive():
    n, d, v = 256, 64, 32768
    y = jnp.zeros((n,), jnp.int32)

    def fused_lp(h, k):
        lp, ent = jaxent.linear_log_probs(h, k, y, return_entropy=True, block_size=256)
        return (lp + 0.1 * ent).sum()

    def naive_lp(h, k):
        logp = jax.nn.log_softmax(h @ k)
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        return (jnp.take_along_axis(logp, y[:, None], -1)[:, 0] + 0.1 * ent).sum()

    def fused_kd(h, k, ht, kt):
        return jaxent.linear_distillation_loss(h, k, ht, kt, block_size=256)

    def naive_kd(h, k, ht, kt):
        lq = jax.nn.log_softmax(jax.lax.stop_gradient(ht @ kt))
        return jnp.mean(jnp.sum(jnp.exp(lq) * (lq - jax.nn.log_softmax(h @ k)), -1))

    for fused, naive, shapes in ((fused_lp, naive_lp, [(n, d), (d, v)]),
                                 (fused_kd, naive_kd, [(n, d), (d, v)] * 2)):
        f = temp_bytes(fused, *shapes)
        r = temp_bytes(naive, *shapes)
        assert f <= 0.03 * r, (fused.__name__, f, r)


def test_linear_soft_cross_entropy_torch_opinfo_samples():
    """torch's own OpInfo samples of ``F.linear_cross_entropy`` with probability targets
    (2-D weights: jaxent's kernels are ``[V, D]`` with ``kernel_layout="vd"``)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.linear_cross_entropy"
              and not o.variant_test_name)
    rng = np.random.default_rng(0)
    seen, done = 0, set()
    for s in op.sample_inputs("cpu", torch.float64, requires_grad=True):
        x, w, t = s.input, s.args[0], s.args[1]
        # Probability targets and 2-D weights; one sample per option set (batched inputs) and
        # one unbatched sample, to bound the compile time.
        key = "unbatched" if x.ndim == 1 else (tuple(sorted(s.kwargs)),
                                               s.kwargs.get("reduction"))
        if not t.is_floating_point() or w.ndim != 2 or key in done:
            continue
        done.add(key)
        kw = dict(s.kwargs)
        out = torch.nn.functional.linear_cross_entropy(x, w, t, **kw)
        ct = torch.tensor(rng.normal(size=tuple(out.shape)))
        leaves = [x, w, t] + ([kw["linear_bias"]] if "linear_bias" in kw else [])
        want = torch.autograd.grad(out, leaves, ct)
        weight = kw.get("weight")

        def fn(*a, kw=kw, weight=weight):
            return jaxent.linear_soft_cross_entropy(
                a[0], a[1], a[2], bias=a[3] if len(a) > 3 else None, kernel_layout="vd",
                weight=None if weight is None else np.asarray(weight.detach(), np.float32),
                reduction=kw.get("reduction", "mean"))

        args = [jnp.asarray(a.detach().numpy(), jnp.float32) for a in leaves]
        got, vjp = jax.vjp(jax.jit(fn), *args)
        _close(got, out.detach().numpy(), rtol=1e-5, atol=1e-5)
        _close(vjp(jnp.asarray(ct.numpy(), jnp.float32)), [g.numpy() for g in want],
               rtol=1e-4, atol=1e-5)
        seen += 1
    assert seen >= 8


def test_reverse_over_reverse_and_vmap(rng):
    """Hessian-vector products (grad of grad) through the walks, and per-example vmap."""
    h = jnp.asarray(rng.normal(size=(5, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, V)) / 2, jnp.float32)
    ht = jnp.asarray(rng.normal(size=(5, D)), jnp.float32)
    y = jnp.asarray(rng.integers(0, V, (5,)))
    v = jnp.asarray(rng.normal(size=h.shape), jnp.float32)

    def fused(h):
        lp, ent = jaxent.linear_log_probs(h, k, y, return_entropy=True, block_size=BLOCK)
        kd = jaxent.linear_distillation_loss(h, k, ht, k, divergence="jsd", block_size=BLOCK)
        return (lp + 0.3 * ent).sum() + kd

    def naive(h):
        lp, ent = ref.token_log_probs(h @ k, y, xp=jnp)
        kd = ref.distillation(h @ k, jax.lax.stop_gradient(ht @ k), divergence="jsd", xp=jnp)
        return (lp + 0.3 * ent).sum() + kd

    def hvp(f):
        return jax.jit(jax.grad(lambda h: jnp.vdot(jax.grad(f)(h), v)))(h)

    _close(hvp(fused), hvp(naive), rtol=1e-4, atol=1e-4)
    per_example = jax.jit(jax.vmap(jax.grad(
        lambda h1, y1: jaxent.linear_log_probs(h1[None], k, y1[None], block_size=BLOCK)[0])))
    want = jax.vmap(jax.grad(lambda h1, y1: ref.token_log_probs(h1 @ k, y1, xp=jnp)[0]))
    _close(per_example(h, y), want(h, y))
