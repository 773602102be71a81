"""Vocabulary-parallel RL/distillation losses on 8 simulated CPU devices.

Run by tests/test_sharded_rl.py in a subprocess of its own (the device count is fixed when
JAX starts); values and gradients (random cotangents) must equal the single-device fused
losses, which tests/test_rl.py checks against float64 references (and ``return_aux``'s
extras the single-device ones).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxent  # noqa: E402
from jaxent import sharded  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

N, V, D = 16, 64, 8
MESHES = {"model8": ((8,), ("model",), None), "data2xmodel4": ((2, 4), ("data", "model"),
                                                                 "data")}


def _close(a, b, rtol=2e-5, atol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _specs(layout, tok):
    kspec = P(None, "model") if layout == "dv" else P("model", None)
    return P(tok, None), kspec, P("model"), P(tok)


def _grads(fn, args, cts, has_aux=False):
    """``fn``'s value, (with ``has_aux``) its aux, and the vjp of ``cts``."""
    out, vjp, *aux = jax.vjp(fn, *args, has_aux=has_aux)
    return out, *aux, vjp(jax.tree.map(lambda o, c: jnp.asarray(c, o.dtype), out, cts))


@pytest.mark.parametrize("mesh_name,layout", [("model8", "dv"), ("data2xmodel4", "vd")])
def test_linear_log_probs_sharded(mesh_name, layout):
    shape, names, tok = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, V) if layout == "dv" else (V, D)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    y = jnp.asarray(rng.integers(0, V, (N,)))
    where = jnp.asarray(rng.random(N) < 0.8)
    temp = jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32)
    hs, ks, bs, ts = _specs(layout, tok)
    kw = dict(kernel_layout=layout, logit_softcap=4.0, return_entropy=True, block_size=3)

    def local(h, k, b, y, where, temp):
        return sharded.linear_log_probs(h, k, y, bias=b, where=where, temperature=temp,
                                        axis_name="model", **kw)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(hs, ks, bs, ts, ts, ts),
                       out_specs=(ts, ts))
    cts = (rng.normal(size=(N,)), rng.normal(size=(N,)))
    got = _grads(jax.jit(lambda h, k, b: fn(h, k, b, y, where, temp)), (h, k, b), cts)
    want = _grads(lambda h, k, b: jaxent.linear_log_probs(
        h, k, y, bias=b, where=where, temperature=temp, **kw), (h, k, b), cts)
    _close(got, want)


@pytest.mark.parametrize("mesh_name,reduction", [("model8", "mean"), ("data2xmodel4", "none")])
def test_linear_soft_cross_entropy_sharded(mesh_name, reduction):
    shape, names, tok = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    t = jnp.asarray(rng.dirichlet(np.ones(V), N), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, V), jnp.float32)
    aux = reduction == "none"  # with return_aux: lse, z_loss, argmax per token
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction, temperature=1.3,
              return_aux=aux)
    hs, ks, bs, ts = _specs("dv", tok)

    def local(h, k, t, w):
        return sharded.linear_soft_cross_entropy(h, k, t, weight=w, axis_name="model",
                                                 token_axis_name=tok, block_size=3, **kw)

    out = ts if reduction == "none" else P()
    out = (out, dict.fromkeys(("lse", "z_loss", "argmax"), ts)) if aux else out
    fn = jax.shard_map(local, mesh=mesh, in_specs=(hs, ks, P(tok, "model"), bs),
                       out_specs=out)
    ct = rng.normal(size=(N,) if reduction == "none" else ())
    got = _grads(jax.jit(lambda h, k, t: fn(h, k, t, w)), (h, k, t), ct, aux)
    want = _grads(lambda h, k, t: jaxent.linear_soft_cross_entropy(h, k, t, weight=w, **kw),
                  (h, k, t), ct, aux)
    _close(got, want)


@pytest.mark.parametrize("mesh_name,divergence,beta", [
    ("model8", "kl", 0.5), ("data2xmodel4", "reverse_kl", 0.5), ("data2xmodel4", "jsd", 0.3)])
def test_linear_distillation_loss_sharded(mesh_name, divergence, beta):
    shape, names, tok = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(N, 2 * D)), jnp.float32)
    kt = jnp.asarray(rng.normal(size=(V, 2 * D)) / 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, (N,))).at[3].set(-100)
    temp = jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32)
    aux = divergence == "jsd"  # with return_aux: lse, argmax, teacher_argmax per token
    kw = dict(divergence=divergence, beta=beta, kernel_layout="vd", return_aux=aux)
    hs, ks, bs, ts = _specs("vd", tok)

    def local(h, k, ht, kt, labels, temp):
        return sharded.linear_distillation_loss(h, k, ht, kt, labels=labels, temperature=temp,
                                                axis_name="model", token_axis_name=tok,
                                                block_size=3, **kw)

    out = (P(), dict.fromkeys(("lse", "argmax", "teacher_argmax"), ts)) if aux else P()
    fn = jax.shard_map(local, mesh=mesh, in_specs=(hs, ks, hs, ks, ts, ts), out_specs=out)
    ct = rng.normal()
    got = _grads(jax.jit(lambda h, k: fn(h, k, ht, kt, labels, temp)), (h, k), ct, aux)
    want = _grads(lambda h, k: jaxent.linear_distillation_loss(
        h, k, ht, kt, labels=labels, temperature=temp, **kw), (h, k), ct, aux)
    _close(got, want)
