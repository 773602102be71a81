"""Tests for jaxent.linear_cross_entropy against jaxent.cross_entropy on the product and torch."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxent
from jaxent import _platform
from jaxent.impl import plan as plan_mod

D, V, LEAD = 16, 203, (3, 5)  # V is not a multiple of any block size used below
BLOCK, TOKEN_BLOCK = 64, 4


def _data(dtype=jnp.float32, layout="dv", lead=LEAD, v=V, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(k[0], (*lead, D), jnp.float32)
    kernel = jax.random.normal(k[1], (D, v) if layout == "dv" else (v, D), jnp.float32) / 2
    b = jax.random.normal(k[2], (v,), jnp.float32)
    y = jax.random.randint(k[3], lead, 0, v)
    y = y.at[(0,) * len(lead)].set(-100)  # one ignored label
    weight = jax.random.uniform(k[4], (v,), minval=0.5, maxval=2.0)
    where = jax.random.bernoulli(k[5], 0.8, lead)
    return h.astype(dtype), kernel.astype(dtype), b.astype(dtype), y, weight, where


def _product(h, kernel, b, layout):
    hf, kf, bf = (a.astype(jnp.float32) for a in (h, kernel, b))
    logits = hf @ (kf if layout == "dv" else kf.T)
    return logits + bf.reshape((1,) * (logits.ndim - 1) + (-1,))


OPTION_SETS = {
    "plain": {},
    "smooth_weight_where": {"label_smoothing": 0.2, "weight": True, "where": True},
    "zloss_cap_temp": {"z_loss": 1e-2, "logit_softcap": 3.0, "temperature": 1.7},
    "all": {"weight": True, "where": True, "label_smoothing": 0.05, "z_loss": 1e-3,
            "logit_softcap": 5.0, "temperature": 0.8, "ignore_index": 7},
}


def _kwargs(opts, weight, where):
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = weight
    if kw.pop("where", False):
        kw["where"] = where
    return kw


def _assert_close(a, b, rtol, atol_scale):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    atol = atol_scale * max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _value_and_vjp(f, cot):
    """Jitted ``(f(*args), vjp(cot))`` in one compile."""

    def run(*args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(jnp.broadcast_to(cot, out.shape).astype(out.dtype))

    return jax.jit(run)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_matches_cross_entropy_of_product(name, reduction):
    names = list(OPTION_SETS)
    layout = "vd" if names.index(name) % 2 else "dv"
    # "none" needs the vocabulary schedule; alternate the schedules for the others
    impl = "vocab" if (names.index(name) + (reduction == "sum")) % 2 else "token"
    impl = "vocab" if reduction == "none" else impl
    h, kernel, b, y, weight, where = _data(layout=layout)
    kw = _kwargs(OPTION_SETS[name], weight, where)
    if "ignore_index" in kw:
        y = jnp.where(y == -100, kw["ignore_index"], y)

    def ours(h, kernel, b):
        return jaxent.linear_cross_entropy(
            h, kernel, y, bias=b, reduction=reduction, kernel_layout=layout, impl=impl,
            block_size=BLOCK, token_block_size=TOKEN_BLOCK, **kw)

    def ref(h, kernel, b):
        return jaxent.cross_entropy(_product(h, kernel, b, layout), y, reduction=reduction, **kw)

    cot = jax.random.normal(jax.random.key(9), LEAD) if reduction == "none" else 1.0
    val, grads = _value_and_vjp(ours, cot)(h, kernel, b)
    rval, rgrads = _value_and_vjp(ref, cot)(h, kernel, b)
    _assert_close(val, rval, 1e-5, 1e-6)
    for g, r in zip(grads, rgrads, strict=True):
        assert g.dtype == r.dtype == jnp.float32
        _assert_close(g, r, 1e-5, 1e-6)


@pytest.mark.parametrize(("layout", "impl"), [("dv", "auto"), ("vd", "vocab")])
def test_default_blocks_no_bias(layout, impl):
    h, kernel, _, y, _, _ = _data(layout=layout, lead=(37,), v=1000)
    f = functools.partial(jaxent.linear_cross_entropy, kernel_layout=layout, impl=impl)
    ref = lambda h, k: jaxent.cross_entropy(h @ (k if layout == "dv" else k.T), y)  # noqa: E731
    val, grads = jax.jit(jax.value_and_grad(lambda h, k: f(h, k, y), argnums=(0, 1)))(h, kernel)
    rval, rgrads = jax.value_and_grad(ref, argnums=(0, 1))(h, kernel)
    _assert_close(val, rval, 1e-5, 1e-6)
    for g, r in zip(grads, rgrads, strict=True):
        _assert_close(g, r, 1e-5, 1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_torch(reduction):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    h, kernel, b, y, weight, _ = _data(lead=(24,))
    kw = {"weight": weight, "label_smoothing": 0.1, "reduction": reduction}

    def ours(h, kernel, b):
        return jaxent.linear_cross_entropy(h, kernel, y, bias=b, block_size=BLOCK, **kw)

    val = jax.jit(ours)(h, kernel, b)
    cot = np.ones(24, np.float32) if reduction == "none" else np.float32(1.0)
    grads = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2))(h, kernel, b)

    th, tk, tb = (torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)
                  for a in (h, kernel, b))
    tl = tf.cross_entropy(th @ tk + tb, torch.tensor(np.asarray(y)).long(),
                          weight=torch.tensor(np.asarray(weight), dtype=torch.float64),
                          label_smoothing=0.1, reduction=reduction)
    (tl * torch.tensor(cot, dtype=torch.float64)).sum().backward()
    _assert_close(val, tl.detach().numpy(), 1e-5, 1e-6)
    for g, t in zip(grads, (th, tk, tb), strict=True):
        _assert_close(g, t.grad.numpy(), 1e-5, 1e-6)


@pytest.mark.parametrize(("dtype", "layout", "small_slices"), [
    (jnp.bfloat16, "dv", False), (jnp.bfloat16, "vd", True), (jnp.float16, "vd", False)])
def test_half_precision(dtype, layout, small_slices, monkeypatch):
    """bf16 ``d kernel`` goes through stages of whole blocks (the last one shifted to end at
    V: 203 = 3 * 64 + 11); ``small_slices`` also splits the ``d hidden`` update into row
    slices (8 rows for 15 tokens, the last slice shifted)."""
    if small_slices:
        small = dataclasses.replace(_platform.TABLE["cpu"], block_elems=256)
        monkeypatch.setitem(_platform.TABLE, "cpu", small)
    h, kernel, b, y, weight, _ = _data(dtype=dtype, layout=layout)

    def ours(h, kernel, b):
        return jaxent.linear_cross_entropy(h, kernel, y, bias=b, weight=weight, z_loss=1e-3,
                                           kernel_layout=layout, block_size=BLOCK)

    def ref(h, kernel, b):  # float32 product of the same (rounded) inputs
        return jaxent.cross_entropy(_product(h, kernel, b, layout), y, weight=weight,
                                    z_loss=1e-3)

    val, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(h, kernel, b)
    assert val.dtype == jnp.float32
    up = [a.astype(jnp.float32) for a in (h, kernel, b)]
    rval, rgrads = jax.value_and_grad(ref, argnums=(0, 1, 2))(*up)
    _assert_close(val, rval, 1e-2, 1e-3)
    for g, r, a in zip(grads, rgrads, (h, kernel, b), strict=True):
        assert g.dtype == a.dtype
        _assert_close(g.astype(jnp.float32), r, 2e-2, 1e-2)


def test_check_grads():
    h, kernel, b, y, weight, _ = _data(lead=(6,), v=40)
    f = functools.partial(jaxent.linear_cross_entropy, labels=y, weight=weight,
                          label_smoothing=0.1, z_loss=1e-2, logit_softcap=4.0, block_size=16,
                          token_block_size=4)
    check_grads(lambda h, k, b: f(h, k, bias=b), (h, kernel, b), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)


def test_jit_vmap_checkpoint():
    h, kernel, b, y, _, _ = _data()
    f = functools.partial(jaxent.linear_cross_entropy, block_size=BLOCK)
    per_seq = jax.jit(jax.vmap(lambda h, y: f(h, kernel, y, bias=b)))(h, y)
    ref = jnp.stack([jaxent.cross_entropy(_product(h[i], kernel, b, "dv"), y[i])
                     for i in range(h.shape[0])])
    _assert_close(per_seq, ref, 1e-5, 1e-6)
    # per-example gradients
    dk = jax.jit(jax.vmap(jax.grad(lambda h, y: f(h, kernel, y, bias=b)), in_axes=(0, 0)))(h, y)
    rdk = jax.vmap(jax.grad(lambda h, y: jaxent.cross_entropy(_product(h, kernel, b, "dv"), y)))(
        h, y)
    _assert_close(dk, rdk, 1e-5, 1e-6)
    g = jax.jit(jax.grad(jax.checkpoint(lambda k: f(h, k, y, bias=b))))(kernel)
    rg = jax.grad(lambda k: jaxent.cross_entropy(_product(h, k, b, "dv"), y))(kernel)
    _assert_close(g, rg, 1e-5, 1e-6)


def test_all_ignored_mean_is_zero_with_zero_grad():
    h, kernel, b, _, _, _ = _data()
    y = jnp.full(LEAD, -100)
    for impl in ("vocab", "token"):
        f = lambda h, k, impl=impl: jaxent.linear_cross_entropy(h, k, y, impl=impl)  # noqa: E731
        val, (dh, dk) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, kernel)
        assert float(val) == 0.0
        assert not jnp.any(dh) and not jnp.any(dk)


@pytest.mark.parametrize("impl", ["vocab", "token"])
def test_return_aux(impl):
    h, kernel, b, y, _, where = _data()
    loss, aux = jax.jit(lambda h: jaxent.linear_cross_entropy(
        h, kernel, y, bias=b, where=where, z_loss=1e-2, return_aux=True, impl=impl,
        block_size=BLOCK, token_block_size=TOKEN_BLOCK))(h)
    logits = _product(h, kernel, b, "dv")
    lse = jax.nn.logsumexp(logits, axis=-1)
    counted = (y != -100) & where
    _assert_close(loss, jaxent.cross_entropy(logits, y, where=where, z_loss=1e-2), 1e-5, 1e-6)
    _assert_close(aux["lse"], lse, 1e-5, 1e-6)
    _assert_close(aux["z_loss"], jnp.where(counted, 1e-2 * lse**2, 0.0), 1e-5, 1e-6)
    np.testing.assert_array_equal(aux["argmax"], jnp.argmax(logits, axis=-1))
    acc = jnp.sum(counted & (jnp.argmax(logits, axis=-1) == y)) / jnp.sum(counted)
    _assert_close(aux["accuracy"], acc, 1e-6, 1e-7)


def test_out_of_range_labels():
    h, kernel, _, y, _, _ = _data()
    bad = y.at[1, 2].set(V).at[2, 0].set(-3)
    with pytest.raises(ValueError, match=r"labels\[1, 2\]=203.*labels\[2, 0\]=-3"):
        jaxent.linear_cross_entropy(h, kernel, bad)
    out = jax.jit(lambda y: jaxent.linear_cross_entropy(
        h, kernel, y, reduction="none", impl="vocab", block_size=BLOCK))(bad)
    assert np.isnan(out[1, 2]) and np.isnan(out[2, 0])
    assert np.isfinite(np.delete(np.asarray(out).ravel(), [7, 10])).all()
    total, grads = jax.jit(jax.value_and_grad(lambda h, y: jaxent.linear_cross_entropy(
        h, kernel, y, reduction="sum", impl="token", token_block_size=TOKEN_BLOCK)))(h, bad)
    assert np.isnan(total) and np.isnan(grads[1, 2]).all() and np.isfinite(grads[0]).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "pattern"),
    [
        (((4, 16), (15, 30), (4,)), {}, ValueError, r"`kernel`.*D = hidden.shape\[-1\] = 16"),
        (((4, 16), (30, 16), (4,)), {}, ValueError, r"`kernel`.*kernel_layout='vd'"),
        (((4, 16), (16, 30), (4,)), {"kernel_layout": "vd"}, ValueError, r"kernel_layout='dv'"),
        (((4, 16), (16, 30), (4,)), {"kernel_layout": "VD"}, ValueError, r"`kernel_layout`"),
        (((4, 16), (16, 30), (5,)), {}, ValueError, r"`labels`.*\(4,\)"),
        (((4, 16), (16, 30), (4, 1)), {}, ValueError, r"`labels`"),
        (((4, 16), (16, 30, 1), (4,)), {}, ValueError, r"`kernel` must be 2-D"),
        (((4, 16), (16, 30), (4,)), {"bias": np.zeros(29, np.float32)}, ValueError,
         r"`bias` must have shape \(30,\)"),
        (((4, 16), (16, 30), (4,)), {"weight": np.ones(29, np.float32)}, ValueError,
         r"`weight`.*30"),
        (((4, 16), (16, 30), (4,)), {"block_size": 0}, ValueError, r"`block_size`"),
        (((4, 16), (16, 30), (4,)), {"reduction": "avg"}, ValueError, r"`reduction`"),
        (((4, 16), (16, 30), (4,)), {"impl": "fast"}, ValueError, r"`impl` must be one of"),
    ],
)
def test_bad_input(args, kwargs, exc, pattern):
    hs, ks, ys = args
    h = np.zeros(hs, np.float32)
    k = np.zeros(ks, np.float32)
    y = np.zeros(ys, np.int32)
    with pytest.raises(exc, match=pattern):
        jaxent.linear_cross_entropy(h, k, y, **kwargs)


def test_bad_dtypes():
    with pytest.raises(TypeError, match="`hidden`"):
        jaxent.linear_cross_entropy(np.zeros((4, 16), np.int32), np.zeros((16, 30)), np.zeros(4,
                                                                                      np.int32))
    with pytest.raises(TypeError, match="`kernel`"):
        jaxent.linear_cross_entropy(np.zeros((4, 16)), np.zeros((16, 30), np.int32),
                                    np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="`labels`"):
        jaxent.linear_cross_entropy(np.zeros((4, 16)), np.zeros((16, 30)), np.zeros(4))


def _temp_bytes(f, n, d, v, dtype, layout="dv"):
    args = (jax.ShapeDtypeStruct((n, d), dtype),
            jax.ShapeDtypeStruct((d, v) if layout == "dv" else (v, d), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _naive(h, k, y):
    return jaxent.cross_entropy(h @ k, y)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_memory_is_blocked(dtype):
    """Temporaries are a few percent of the naive path's and grow with N * block, not N * V."""
    d, v = 256, 32000

    def ours(block_size, token_block_size):
        return lambda h, k, y: jaxent.linear_cross_entropy(
            h, k, y, block_size=block_size, token_block_size=token_block_size)

    n = 2048
    naive = _temp_bytes(_naive, n, d, v, dtype)
    small = _temp_bytes(ours(256, 16), n, d, v, dtype)
    # float32: a few [16, V] token blocks; bf16: the float32 d hidden, [N, 256] blocks and
    # a [D, 256 * 2N / D] stage of the kernel gradient (see jaxent.linear).
    assert small <= 0.02 * naive, (small, naive)
    # linear in N and in the block, not N * V
    double_n = _temp_bytes(ours(256, 16), 2 * n, d, v, dtype)
    assert double_n <= small + 0.02 * naive
    double_block = _temp_bytes(ours(512, 32), n, d, v, dtype)
    assert double_block <= 4 * small and double_block <= 0.1 * naive


def test_auto_block_sizes():
    bv, bn, bw = plan_mod.auto_block_sizes(8192, 2048, 128256)
    assert bv * 8192 <= 8 * 2**20 and bn * 128256 <= 32 * 2**20 and bw * 2048 <= 8 * 2**20
    assert plan_mod.auto_block_sizes(4, 8, 50) == (50, 4, 50)
