"""Values and gradients of the public losses against PyTorch and float64 references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from jax.experimental import checkify

import jaxent
from tests import reference as ref

SHAPES = {"2d": ((7, 5), -1), "kdim": ((3, 5, 4, 2), 1)}  # (logits shape, class axis)


def _draw(rng, layout, *, ignore_index=-100):
    shape, axis = SHAPES[layout]
    c = shape[axis]
    logits = rng.normal(scale=2.0, size=shape).astype(np.float32)
    label_shape = shape[:axis % len(shape)] + shape[axis % len(shape) + 1 :]
    labels = rng.integers(0, c, size=label_shape)
    flat = labels.reshape(-1)
    flat[rng.choice(flat.size, size=2, replace=False)] = ignore_index  # some ignored
    return logits, labels.astype(np.int32), axis, c


def _torch_value_and_grad(fn, x, cotangent):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = fn(xt)
    (out * torch.tensor(cotangent, dtype=torch.float64)).sum().backward()
    return out.detach().numpy(), xt.grad.numpy()


def _jax_value_and_grad(fn, x, cotangent):
    out, vjp = jax.vjp(jax.jit(fn), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(cotangent, out.dtype))
    return np.asarray(out), np.asarray(dx)


GRID = list(itertools.product(SHAPES, [False, True], ["default", "class"], [0.0, 0.15],
                              ["mean", "sum", "none"]))


@pytest.mark.parametrize("layout,weighted,ignore,smoothing,reduction", GRID)
def test_cross_entropy_matches_torch(rng, layout, weighted, ignore, smoothing, reduction):
    ignore_index = -100 if ignore == "default" else 2
    x, y, axis, c = _draw(rng, layout, ignore_index=ignore_index)
    w = rng.uniform(0.2, 2.0, size=c).astype(np.float32) if weighted else None
    opts = dict(ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    tw = None if w is None else torch.tensor(w, dtype=torch.float64)
    cot = rng.normal(size=() if reduction != "none" else y.shape)
    t_out, t_dx = _torch_value_and_grad(
        lambda xt: F.cross_entropy(xt, torch.tensor(y, dtype=torch.long), weight=tw, **opts),
        x, cot)
    j_out, j_dx = _jax_value_and_grad(
        lambda a: jaxent.cross_entropy(a, jnp.asarray(y), axis=axis, weight=w, **opts), x, cot)
    np.testing.assert_allclose(j_out, t_out, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(j_dx, t_dx, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("layout,weighted,smoothing,reduction",
                         list(itertools.product(SHAPES, [False, True], [0.0, 0.15],
                                                ["mean", "sum", "none"])))
def test_soft_cross_entropy_matches_torch(rng, layout, weighted, smoothing, reduction):
    shape, axis = SHAPES[layout]
    c = shape[axis]
    x = rng.normal(scale=2.0, size=shape).astype(np.float32)
    t = np.moveaxis(rng.dirichlet(np.full(c, 0.5), size=np.prod(shape) // c)
                    .reshape(*np.moveaxis(x, axis, -1).shape), -1, axis).astype(np.float32)
    w = rng.uniform(0.2, 2.0, size=c).astype(np.float32) if weighted else None
    opts = dict(label_smoothing=smoothing, reduction=reduction)
    out_shape = () if reduction != "none" else np.moveaxis(x, axis, -1).shape[:-1]
    cot = rng.normal(size=out_shape)

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    wt = None if w is None else torch.tensor(w, dtype=torch.float64)
    t_out = F.cross_entropy(xt, tt, weight=wt, **opts)
    (t_out * torch.tensor(cot)).sum().backward()

    fn = jax.jit(lambda a, b: jaxent.soft_cross_entropy(a, b, axis=axis, weight=w, **opts))
    j_out, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(t))
    j_dx, j_dt = vjp(jnp.asarray(cot, j_out.dtype))
    np.testing.assert_allclose(j_out, t_out.detach().numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(j_dx, xt.grad.numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(j_dt, tt.grad.numpy(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("layout,weighted,reduction",
                         list(itertools.product(SHAPES, [False, True], ["mean", "sum", "none"])))
def test_nll_loss_matches_torch(rng, layout, weighted, reduction):
    x, y, axis, c = _draw(rng, layout)
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(x), axis=axis))
    w = rng.uniform(0.2, 2.0, size=c).astype(np.float32) if weighted else None
    cot = rng.normal(size=() if reduction != "none" else y.shape)
    t_out, t_dx = _torch_value_and_grad(
        lambda a: F.nll_loss(a, torch.tensor(y, dtype=torch.long), reduction=reduction,
                             weight=None if w is None else torch.tensor(w, dtype=torch.float64)),
        lp, cot)
    j_out, j_dx = _jax_value_and_grad(
        lambda a: jaxent.nll_loss(a, jnp.asarray(y), axis=axis, weight=w, reduction=reduction),
        lp, cot)
    np.testing.assert_allclose(j_out, t_out, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(j_dx, t_dx, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("weighted,pos_weighted,reduction",
                         list(itertools.product([False, True], [False, True],
                                                ["mean", "sum", "none"])))
def test_binary_cross_entropy_matches_torch(rng, weighted, pos_weighted, reduction):
    x = rng.normal(scale=3.0, size=(6, 4)).astype(np.float32)
    t = rng.uniform(size=(6, 4)).astype(np.float32)
    w = rng.uniform(0.2, 2.0, size=(6, 4)).astype(np.float32) if weighted else None
    pw = rng.uniform(0.5, 3.0, size=(4,)).astype(np.float32) if pos_weighted else None
    cot = rng.normal(size=() if reduction != "none" else x.shape)
    tw = None if w is None else torch.tensor(w, dtype=torch.float64)
    tpw = None if pw is None else torch.tensor(pw, dtype=torch.float64)
    t_out, t_dx = _torch_value_and_grad(
        lambda a: F.binary_cross_entropy_with_logits(a, torch.tensor(t, dtype=torch.float64),
                                                     weight=tw, pos_weight=tpw,
                                                     reduction=reduction), x, cot)
    j_out, j_dx = _jax_value_and_grad(
        lambda a: jaxent.binary_cross_entropy(a, jnp.asarray(t), weight=w, pos_weight=pw,
                                              reduction=reduction), x, cot)
    np.testing.assert_allclose(j_out, t_out, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(j_dx, t_dx, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(
        j_out, ref.binary_cross_entropy(x, t, weight=w, pos_weight=pw, reduction=reduction),
        rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------- options PyTorch does not have
# (integer labels on every implementation: tests/test_conformance.py)

EXTRA = [
    dict(z_loss=1e-2),
    dict(logit_softcap=3.0),
    dict(temperature=0.7),
    dict(z_loss=1e-3, logit_softcap=5.0, temperature=2.0, label_smoothing=0.1),
]


@pytest.mark.parametrize("extra", EXTRA, ids=lambda d: ",".join(d))
def test_soft_cross_entropy_extras_match_float64(rng, extra):
    x = rng.normal(scale=2.0, size=(6, 9)).astype(np.float32)
    t = rng.dirichlet(np.full(9, 0.3), size=6).astype(np.float32)
    w = rng.uniform(0.2, 2.0, size=9).astype(np.float32)
    where = np.array([True, False, True, True, False, True])
    opts = dict(weight=w, where=where, **extra)
    fn = jax.jit(lambda a, b: jaxent.soft_cross_entropy(a, b, **opts))
    out, (dx, dt) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(out, ref.soft_cross_entropy(x, t, **opts), rtol=2e-5)
    ex, et = ref.grad64(lambda a, b: ref.soft_cross_entropy(a, b, xp=jnp, **opts), x, t,
                        argnums=(0, 1))
    np.testing.assert_allclose(dx, ex, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(dt, et, rtol=2e-5, atol=1e-7)


def test_where_equals_slicing(rng):
    x, y, _, _ = _draw(rng, "2d")
    keep = rng.uniform(size=y.shape) < 0.6
    keep[0] = True
    masked = jax.jit(lambda a: jaxent.cross_entropy(a, y, where=keep, label_smoothing=0.1))
    sliced = jax.jit(lambda a: jaxent.cross_entropy(a, y[keep], label_smoothing=0.1))
    np.testing.assert_allclose(masked(x), sliced(x[keep]), rtol=1e-6)
    g_masked = jax.grad(masked)(jnp.asarray(x))
    np.testing.assert_allclose(g_masked[keep], jax.grad(sliced)(x[keep]), rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(g_masked[~keep], 0.0)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_axis_equals_moveaxis(rng, axis):
    x = rng.normal(size=(4, 6, 5)).astype(np.float32)
    c = x.shape[axis]
    moved = np.moveaxis(x, axis, -1)
    y = rng.integers(0, c, size=moved.shape[:-1])
    got = jaxent.cross_entropy(x, y, axis=axis, reduction="none")
    want = jaxent.cross_entropy(moved, y, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    t = rng.dirichlet(np.ones(c), size=moved.shape[:-1]).astype(np.float32)
    np.testing.assert_allclose(
        jaxent.soft_cross_entropy(x, np.moveaxis(t, -1, axis), axis=axis),
        jaxent.soft_cross_entropy(moved, t), rtol=1e-6)


# ------------------------------------------------------------------- worked examples


@pytest.mark.parametrize("logits,labels,weight,expected", [
    ([[0.5, 0.2, 0.3], [0.1, 0.8, 0.1]], [0, 1], None, 0.8148),
    ([[2.0, 1.0, 0.1]], [0], None, 0.4170),
    ([[1.5, 0.3, 2.1], [2.0, 1.0, 0.1], [0.1, 2.2, 1.0]], [2, 0, 1], None, 0.4364),
    ([[1.5, 0.3, 2.1], [2.0, 1.0, 0.1], [0.1, 2.2, 1.0]], [2, 0, 1], [1.0, 2.0, 3.0], 0.4567),
])
def test_tutorial_examples(logits, labels, weight, expected):
    x, y = jnp.asarray(logits), jnp.asarray(labels)
    w = None if weight is None else jnp.asarray(weight)
    ce = jaxent.cross_entropy(x, y, weight=w)
    assert round(float(ce), 4) == expected
    nll = jaxent.nll_loss(jax.nn.log_softmax(x), y, weight=w)
    onehot = jax.nn.one_hot(y, x.shape[1])
    rows = -(onehot * jax.nn.log_softmax(x)).sum(1)
    wy = jnp.ones(len(labels)) if w is None else w[y]
    np.testing.assert_allclose(nll, ce, rtol=1e-6)
    np.testing.assert_allclose((wy * rows).sum() / wy.sum(), ce, rtol=1e-6)
    if weight is None:
        np.testing.assert_allclose(jaxent.soft_cross_entropy(x, onehot), ce, rtol=1e-6)


# ------------------------------------------------------------ transformations


def test_vmap_grad_gives_per_example_gradients(rng):
    x = rng.normal(size=(5, 7)).astype(np.float32)
    y = rng.integers(0, 7, size=5)
    w = rng.uniform(0.5, 2.0, size=7).astype(np.float32)

    def loss(row, label):
        return jaxent.cross_entropy(row, label, weight=w, label_smoothing=0.1, z_loss=1e-2)

    per_example = jax.jit(jax.vmap(jax.grad(loss)))(x, y)
    for i in range(len(y)):
        np.testing.assert_allclose(per_example[i], jax.grad(loss)(x[i], y[i]), rtol=1e-6)
        expected = ref.grad64(lambda a, i=i: ref.cross_entropy(
            a, y[i], weight=w, label_smoothing=0.1, z_loss=1e-2, xp=jnp), x[i])
        np.testing.assert_allclose(per_example[i], expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.2, z_loss=1e-2),
                                  dict(logit_softcap=4.0, temperature=1.5)],
                         ids=["plain", "smooth_zloss", "softcap_temp"])
def test_hessian_matches_float64(rng, opts):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    y = np.array([1, 3, 0])
    hess = jax.jit(jax.jacrev(jax.grad(lambda a: jaxent.cross_entropy(a, y, **opts))))(x)
    with jax.enable_x64(True):
        want = jax.hessian(lambda a: ref.cross_entropy(a, y, xp=jnp, **opts))(
            jnp.asarray(x, jnp.float64))
    np.testing.assert_allclose(hess, want, rtol=1e-4, atol=1e-6)


def test_soft_hessian_matches_float64(rng):
    x = rng.normal(size=(2, 4)).astype(np.float32)
    t = rng.dirichlet(np.ones(4), size=2).astype(np.float32)
    hess = jax.jacrev(jax.grad(lambda a: jaxent.soft_cross_entropy(a, t, z_loss=0.1)))(x)
    with jax.enable_x64(True):
        t64 = jnp.asarray(t, jnp.float64)
        want = jax.hessian(lambda a: ref.soft_cross_entropy(a, t64, xp=jnp, z_loss=0.1))(
            jnp.asarray(x, jnp.float64))
    np.testing.assert_allclose(hess, want, rtol=1e-4, atol=1e-6)


def test_check_grads_second_order(rng):
    from jax.test_util import check_grads

    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    t = jnp.asarray(rng.dirichlet(np.ones(6), size=4), jnp.float32)
    y = jnp.asarray(rng.integers(0, 6, size=4))
    check_grads(jax.jit(lambda a: jaxent.cross_entropy(
        a, y, label_smoothing=0.1, z_loss=0.01, logit_softcap=5.0)), (x,), order=2,
        modes=("rev",), atol=5e-2, rtol=5e-2)
    check_grads(jax.jit(lambda a, b: jaxent.soft_cross_entropy(a, b, temperature=2.0)), (x, t),
                order=2, modes=("rev",), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.2, z_loss=1e-2),
                                  dict(logit_softcap=3.0, temperature=0.5, reduction="none")],
                         ids=["plain", "smooth_zloss", "softcap_temp_none"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_residual_modes_agree(rng, opts, dtype):
    """The gradient-in-forward default and the lse-residual mode give the same numbers."""
    x = jnp.asarray(rng.normal(scale=3.0, size=(6, 9)), dtype)
    y = rng.integers(0, 9, size=6)
    y[2] = -100
    t = jnp.asarray(rng.dirichlet(np.ones(9), size=6), dtype)
    w = rng.uniform(0.5, 2.0, size=9).astype(np.float32)
    cot = jnp.asarray(rng.normal(size=() if "reduction" not in opts else (6,)), jnp.float32)
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=2e-3)
    for fn, target in [(jaxent.cross_entropy, y), (jaxent.soft_cross_entropy, t)]:
        results = []
        for residual in ("grad", "lse"):
            f = jax.jit(lambda a, b, fn=fn, r=residual: fn(a, b, weight=w, residual=r, **opts))
            out, vjp = jax.vjp(f, x, target)
            grads = vjp(cot)
            results.append([out, grads[0]] + ([grads[1]] if target is t else []))
        for a, b in zip(*results, strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       **tol)


# ----------------------------------------------------------------- dtypes and memory


def test_bf16_large_vocabulary_is_accurate(rng):
    n, c = 64, 32000
    x = jnp.asarray(rng.normal(scale=3.0, size=(n, c)), jnp.bfloat16)
    y = rng.integers(0, c, size=n)
    exact = ref.cross_entropy(np.asarray(x.astype(jnp.float32)), y)
    ours = jax.jit(jaxent.cross_entropy)(x, y)
    theirs = optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()
    err, optax_err = abs(float(ours) / exact - 1), abs(float(theirs) / exact - 1)
    assert ours.dtype == jnp.float32
    assert err < 1e-3, f"jaxent relative error {err:.2e}, optax {optax_err:.2e}"
    grad = jax.grad(jaxent.cross_entropy)(x, y)
    assert grad.dtype == jnp.bfloat16
    expected = ref.grad64(lambda a: ref.cross_entropy(a, y, xp=jnp), x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(grad, np.float32), expected, rtol=1e-2, atol=1e-7)
    print(f"bf16 C={c}: jaxent rel. error {err:.1e}, optax {optax_err:.1e}")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_dtypes(rng, dtype):
    x = jnp.asarray(rng.normal(size=(8, 11)), dtype)
    t = jnp.asarray(rng.dirichlet(np.ones(11), size=8), dtype)
    y = rng.integers(0, 11, size=8)
    for fn, target in [(jaxent.cross_entropy, y), (jaxent.soft_cross_entropy, t)]:
        loss, g = jax.value_and_grad(fn)(x, target)
        assert loss.dtype == jnp.float32 and g.dtype == dtype
    assert jaxent.binary_cross_entropy(x, t).dtype == jnp.float32


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("residual", ["auto", "grad", "lse"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_memory_no_more_than_optax(dtype, residual):
    """value_and_grad at N=4096, C=32000 on abstract inputs (nothing is allocated)."""
    x = jax.ShapeDtypeStruct((4096, 32000), jnp.dtype(dtype))
    y = jax.ShapeDtypeStruct((4096,), jnp.int32)
    ours = _temp_bytes(jax.value_and_grad(
        lambda a, b: jaxent.cross_entropy(a, b, residual=residual)), x, y)
    theirs = _temp_bytes(jax.value_and_grad(
        lambda a, b: optax.losses.softmax_cross_entropy_with_integer_labels(a, b).mean()), x, y)
    bound = theirs if dtype == "float32" else theirs / 2
    assert ours <= bound, f"jaxent {ours / 1e6:.1f} MB, optax {theirs / 1e6:.1f} MB"


@pytest.mark.parametrize("shape", [(4096, 32000), (2048, 128256)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_keeps_no_logits_sized_temporaries(shape, dtype):
    """The loss alone (and value_and_grad in both residual modes) at LM vocabularies needs
    well under 1% of the logits' bytes of temporaries: no upcast copy, no probabilities."""
    x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    y = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    logits_bytes = shape[0] * shape[1] * jnp.dtype(dtype).itemsize
    for fn in [jaxent.cross_entropy,
               jax.value_and_grad(jaxent.cross_entropy),
               jax.value_and_grad(lambda a, b: jaxent.cross_entropy(a, b, residual="lse"))]:
        assert _temp_bytes(fn, x, y) < 0.01 * logits_bytes


@pytest.mark.parametrize("residual", ["grad", "lse"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_donated_logits_take_the_gradient_in_place(dtype, residual):
    """With the logits donated, the gradient is written over them: no copy of the logits
    (XLA inserts one when a read of the logits is not ordered before the write)."""
    x = jax.ShapeDtypeStruct((4096, 32000), jnp.dtype(dtype))
    y = jax.ShapeDtypeStruct((4096,), jnp.int32)
    f = jax.jit(jax.value_and_grad(lambda a, b: jaxent.cross_entropy(a, b, residual=residual)),
                donate_argnums=0)
    ma = f.lower(x, y).compile().memory_analysis()
    logits_bytes = 4096 * 32000 * jnp.dtype(dtype).itemsize
    assert ma.alias_size_in_bytes == logits_bytes
    assert ma.temp_size_in_bytes < 0.01 * logits_bytes


# ------------------------------------------------------------------- numerical safety


def test_huge_logits_are_finite(rng):
    x = jnp.asarray(rng.choice([-1e4, 1e4], size=(6, 8)) + rng.normal(size=(6, 8)), jnp.float32)
    y = rng.integers(0, 8, size=6)
    t = rng.dirichlet(np.ones(8), size=6).astype(np.float32)
    for fn, target in [(jaxent.cross_entropy, y), (jaxent.soft_cross_entropy, t)]:
        loss, g = jax.value_and_grad(lambda a, fn=fn, target=target: fn(
            a, target, label_smoothing=0.1, z_loss=1e-4))(x)
        assert np.isfinite(loss) and np.isfinite(g).all()
    np.testing.assert_allclose(jaxent.cross_entropy(x, y), ref.cross_entropy(x, y), rtol=1e-5)


def test_masked_vocabulary_is_finite(rng):
    """-inf on non-target classes (vocabulary masking): finite loss and gradient."""
    x = rng.normal(size=(5, 10)).astype(np.float32)
    y = np.array([0, 3, 3, 7, 1])
    banned = np.zeros((5, 10), bool)
    banned[:, [2, 5, 9]] = True
    x[banned] = -np.inf
    t = rng.dirichlet(np.ones(10), size=5).astype(np.float32)
    t[banned] = 0.0
    t /= t.sum(1, keepdims=True)
    for fn, target in [(jaxent.cross_entropy, y), (jaxent.soft_cross_entropy, t)]:
        loss, g = jax.value_and_grad(lambda a, fn=fn, target=target: fn(a, target, z_loss=1e-3))(
            jnp.asarray(x))
        assert np.isfinite(loss) and np.isfinite(g).all()
        np.testing.assert_array_equal(np.asarray(g)[banned], 0.0)
    np.testing.assert_allclose(jaxent.soft_cross_entropy(x, t), ref.soft_cross_entropy(x, t),
                               rtol=1e-5)
    # Positive mass on a -inf logit is the true, infinite cross-entropy.
    t_bad = t.copy()
    t_bad[0] = 0.0
    t_bad[0, 2] = 1.0
    assert jaxent.soft_cross_entropy(x, t_bad) == np.inf


def test_fully_masked_ignored_rows_stay_out(rng):
    x = rng.normal(size=(4, 6)).astype(np.float32)
    x[1] = -np.inf
    y = np.array([2, -100, 5, 0])
    loss, g = jax.value_and_grad(lambda a: jaxent.cross_entropy(a, y, label_smoothing=0.1))(
        jnp.asarray(x))
    assert np.isfinite(loss) and np.isfinite(g).all() and (np.asarray(g)[1] == 0).all()


@pytest.mark.parametrize("fn", ["cross_entropy", "soft_cross_entropy", "nll_loss",
                                "binary_cross_entropy"])
def test_mean_over_nothing_is_zero(rng, fn):
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    if fn == "cross_entropy" or fn == "nll_loss":
        target, kw = jnp.full((3,), -100), {}
    elif fn == "soft_cross_entropy":
        target, kw = jnp.asarray(rng.dirichlet(np.ones(4), size=3), jnp.float32), dict(
            where=jnp.zeros(3, bool))
    else:
        target, kw = jnp.asarray(rng.uniform(size=(3, 4)), jnp.float32), dict(
            where=jnp.zeros((3, 4), bool))
    loss, g = jax.value_and_grad(lambda a: getattr(jaxent, fn)(a, target, **kw))(x)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(g, 0.0)


# ------------------------------------------------------------------- label values


def test_out_of_range_labels_concrete_raise():
    x = jnp.broadcast_to(jnp.arange(4.0), (2, 3, 4))
    y = jnp.array([[0, 4, 1], [-1, 2, -100]])
    with pytest.raises(ValueError, match=r"labels\[0, 1\]=4.*labels\[1, 0\]=-1"):
        jaxent.cross_entropy(x, y)
    with pytest.raises(ValueError, match=r"labels"):
        jaxent.nll_loss(x, y)


def test_out_of_range_labels_under_jit_are_nan(rng):
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    y = jnp.array([0, 5, -1, -100])
    none = jax.jit(lambda a, b: jaxent.cross_entropy(a, b, reduction="none"))(x, y)
    assert np.isfinite(none[0]) and np.isnan(none[1]) and np.isnan(none[2]) and none[3] == 0
    loss, g = jax.jit(jax.value_and_grad(jaxent.cross_entropy))(x, y)
    assert np.isnan(loss) and np.isnan(g[1]).all() and np.isfinite(g[0]).all()
    assert np.isnan(jax.jit(jaxent.nll_loss)(x, y))


def test_out_of_range_labels_reported_by_checkify(rng):
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    checked = jax.jit(checkify.checkify(jaxent.cross_entropy, errors=checkify.user_checks))
    err, _ = checked(x, jnp.array([0, 1, 2, -100]))
    assert err.get() is None
    err, _ = checked(x, jnp.array([0, 7, 2, 3]))
    assert "outside [0, 5)" in err.get()


def test_cross_entropy_and_grad_donates_and_matches(rng):
    x_np = rng.normal(size=(16, 40)).astype(np.float32)
    y = jnp.asarray(rng.integers(0, 40, size=16))
    want = jax.value_and_grad(lambda a: jaxent.cross_entropy(a, y, label_smoothing=0.1))(
        jnp.asarray(x_np))
    x = jnp.asarray(x_np)
    loss, grad = jaxent.cross_entropy_and_grad(x, y, label_smoothing=0.1)
    np.testing.assert_allclose(loss, want[0], rtol=1e-6)
    np.testing.assert_allclose(grad, want[1], rtol=1e-6, atol=1e-8)
    assert x.is_deleted(), "the logits were not donated"
    lowered = jaxent.inplace._donated.lower(
        jnp.asarray(x_np), y, axis=-1, weight=None, ignore_index=-100, label_smoothing=0.0,
        reduction="mean", where=None, z_loss=0.0, logit_softcap=None, temperature=1.0,
        residual="auto")
    assert lowered.compile().memory_analysis().temp_size_in_bytes < x_np.nbytes
