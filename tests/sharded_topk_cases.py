"""Vocabulary-parallel top-k log-probs and sparse-teacher distillation on 8 simulated CPU
devices.

Run by tests/test_sharded.py in a subprocess of its own (the device count is fixed
when JAX starts): inside ``jax.shard_map`` (``jaxent.sharded``) and on Explicit meshes
(plain ``jaxent`` calls), the ids must equal the single-device ids exactly (ties by
construction across shards included) and the values and gradients must match
(tests/test_topk.py and tests/test_sparse_teacher.py check the single device against the
naive programs).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxent  # noqa: E402
from jaxent import sharded  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

N, V, D, K = 16, 64, 8, 12  # K above the 8 columns of one shard of "model8"
MESHES = {"model8": ((8,), ("model",), None), "data2xmodel4": ((2, 4), ("data", "model"),
                                                                 "data")}


def _close(a, b, rtol=1e-5, atol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(jnp.asarray(u).dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        else:
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _data(layout="dv", seed=0):
    """Integer-valued inputs (exact logits) with kernel columns repeated across shards."""
    rng = np.random.default_rng(seed)
    h = rng.integers(-2, 3, (N, D)).astype(np.float32)
    w = rng.integers(-2, 3, (D, V)).astype(np.float32) / 4
    b = rng.integers(-2, 3, (V,)).astype(np.float32) / 2
    for a, c in ((0, 63), (5, 13), (9, 40), (20, 21), (2, 58)):
        w[:, c], b[c] = w[:, a], b[a]
    w = w if layout == "dv" else w.T
    temp = rng.uniform(0.5, 2.0, (N,)).astype(np.float32)
    where = rng.random(N) < 0.8
    r = rng.normal(size=(N, K)).astype(np.float32)
    rt = rng.normal(size=(N,)).astype(np.float32)
    return rng, *(jnp.asarray(a) for a in (h, w, b, temp, where, r, rt))


def _value_and_grads(fn, args, r, rt):
    """``fn``'s outputs and the gradients of ``sum(lp * r) + sum(tail * rt)``."""
    def f(*a):
        ids, lp, tail = fn(*a)
        return (lp * r).sum() + (tail * rt).sum(), (ids, lp, tail)

    return jax.value_and_grad(f, argnums=tuple(range(len(args))), has_aux=True)(*args)


def _specs(layout, tok):
    kspec = P(None, "model") if layout == "dv" else P("model", None)
    return P(tok, None), kspec, P("model"), P(tok)


@pytest.mark.parametrize("mesh_name,layout,cap", [("model8", "dv", None),
                                                  ("data2xmodel4", "vd", 3.0)])
def test_linear_topk_log_probs_shard_map(mesh_name, layout, cap):
    shape, names, tok = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    _, h, w, b, temp, where, r, rt = _data(layout)
    kw = dict(kernel_layout=layout, logit_softcap=cap, return_tail=True, block_size=3)
    hs, ks, bs, ts = _specs(layout, tok)
    rs = P(tok, None)

    def local(h, w, b, temp, where):
        return sharded.linear_topk_log_probs(h, w, K, bias=b, temperature=temp, where=where,
                                             axis_name="model", **kw)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(hs, ks, bs, ts, ts),
                       out_specs=(rs, rs, ts))
    got = jax.jit(lambda h, w, b: _value_and_grads(
        lambda h, w, b: fn(h, w, b, temp, where), (h, w, b), r, rt))(h, w, b)
    want = _value_and_grads(lambda h, w, b: jaxent.linear_topk_log_probs(
        h, w, K, bias=b, temperature=temp, where=where, **kw), (h, w, b), r, rt)
    _close(got, want)


@pytest.mark.parametrize("mesh_name,hspec,kspec", [
    ("model8", P(), P(None, "model")), ("data2xmodel4", P("data", None), P(None, "model"))])
def test_linear_topk_log_probs_explicit_mesh(mesh_name, hspec, kspec):
    shape, names, _ = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names))
    _, h, w, b, temp, where, r, rt = _data("dv", 1)

    def fn(h, w, b):
        return jaxent.linear_topk_log_probs(h, w, K, bias=b, temperature=temp,
                                            logit_softcap=4.0, return_tail=True,
                                            block_size=4)

    want = _value_and_grads(fn, (h, w, b), r, rt)
    with jax.set_mesh(mesh):
        placed = [jax.device_put(a, NamedSharding(mesh, s))
                  for a, s in zip((h, w, b), (hspec, kspec, P("model")), strict=True)]
        got = jax.jit(lambda *a: _value_and_grads(fn, a, r, rt))(*placed)
    _close(got, want)


@pytest.mark.parametrize("mesh_name,divergence,beta", [
    ("model8", "kl", 0.5), ("data2xmodel4", "jsd", 0.3), ("data2xmodel4", "reverse_kl", 0.5)])
def test_sparse_teacher_distillation_sharded(mesh_name, divergence, beta):
    shape, names, tok = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    rng, h, w, b, temp, where, _, _ = _data("dv", 2)
    h = h + jnp.asarray(rng.normal(size=(N, D)), jnp.float32) / 4
    ids = jnp.asarray(np.stack([rng.permutation(V)[:K] for _ in range(N)]), jnp.int32)
    lq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(N, K + 1)), jnp.float32))
    lq, tail = lq[:, :K], lq[:, K]
    kw = dict(divergence=divergence, beta=beta, temperature=temp, where=where)
    hs, ks, bs, ts = _specs("dv", tok)
    rs = P(tok, None)

    def local(h, w, b, ids, lq, tail, temp, where):
        return sharded.linear_distillation_loss(
            h, w, teacher_topk=(ids, lq), teacher_tail=tail, student_bias=b,
            axis_name="model", token_axis_name=tok, block_size=3, **dict(
                kw, temperature=temp, where=where))

    fn = jax.shard_map(local, mesh=mesh, in_specs=(hs, ks, bs, rs, rs, ts, ts, ts),
                       out_specs=P())
    got = jax.jit(jax.value_and_grad(
        lambda h, w, b: fn(h, w, b, ids, lq, tail, temp, where), (0, 1, 2)))(h, w, b)
    want = jax.value_and_grad(lambda h, w, b: jaxent.linear_distillation_loss(
        h, w, teacher_topk=(ids, lq), teacher_tail=tail, student_bias=b, **kw),
        (0, 1, 2))(h, w, b)
    _close(got, want)
    # the same on an Explicit mesh through the plain call
    emesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names))
    with jax.set_mesh(emesh):
        hh = jax.device_put(h, NamedSharding(emesh, P(tok, None)))
        ww = jax.device_put(w, NamedSharding(emesh, P(None, "model")))
        got = jax.jit(jax.value_and_grad(lambda h, w: jaxent.linear_distillation_loss(
            h, w, teacher_topk=(ids, lq), teacher_tail=tail, student_bias=b, **kw),
            (0, 1)))(hh, ww)
        with pytest.raises(ValueError, match=r"`teacher_topk ids` must be ids in \[0, 64\)"):
            row = int(np.argmax(np.asarray(where)))  # a counted row
            jaxent.linear_distillation_loss(hh, ww, teacher_topk=(ids.at[row, 0].set(V), lq),
                                            **kw)
    _close(got, (want[0], want[1][:2]))
