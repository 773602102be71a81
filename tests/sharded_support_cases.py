"""Vocabulary-parallel support-restricted log-probs on 8 simulated CPU devices.

Run by tests/test_sharded.py in a subprocess of its own (the device count is fixed when
JAX starts): values and gradients (random cotangents) of
``jaxent.sharded.linear_support_log_probs`` inside ``jax.shard_map``, and of plain
``jaxent.linear_support_log_probs`` on Explicit meshes (data-parallel and vocabulary-
parallel), must equal the single-device ``jaxent.linear_support_log_probs``, which
tests/test_support.py checks against a float64 reference.
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

N, V, D = 16, 64, 8
MESHES = {"model8": ((8,), ("model",), None), "data2xmodel4": ((2, 4), ("data", "model"),
                                                                 "data")}


def _close(a, b, rtol=2e-5, atol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _grads(fn, args, cts):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(jax.tree.map(lambda o, c: jnp.asarray(c, o.dtype), out, cts))


@pytest.mark.parametrize("mesh_name,layout,mode", [("model8", "dv", "filters"),
                                                   ("data2xmodel4", "vd", "ids")])
def test_linear_support_log_probs_sharded(mesh_name, layout, mode):
    shape, names, tok = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, V) if layout == "dv" else (V, D)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    x = np.asarray(h @ (k if layout == "dv" else k.T) + b[None, :])
    y = jnp.asarray(np.argsort(-x, axis=1)[np.arange(N), rng.integers(0, 4, N)])
    where = jnp.asarray(rng.random(N) < 0.9)
    temp = jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32)
    if mode == "filters":  # per-row top-p and min-p, traced inside shard_map
        per_row = dict(top_p=jnp.asarray(rng.uniform(0.3, 1.0, N), jnp.float32),
                       min_p=jnp.asarray(rng.uniform(0.0, 0.1, N), jnp.float32))
        static = dict(top_k=7, max_candidates=16)
    else:
        ids = rng.integers(0, V, (N, 6))
        ids[:, -1] = -1
        ids[:, 0] = np.asarray(y)
        per_row = dict(allowed_ids=jnp.asarray(ids))
        static = dict(block_size=4)
    kspec = P(None, "model") if layout == "dv" else P("model", None)
    ts = P(tok)
    pspecs = {n: P(tok, None) if n == "allowed_ids" else ts for n in per_row}
    kw = dict(kernel_layout=layout, logit_softcap=6.0, return_entropy=True, **static)

    def local(h, k, b, y, where, temp, params):
        return sharded.linear_support_log_probs(h, k, y, bias=b, where=where,
                                                temperature=temp, axis_name="model",
                                                **params, **kw)

    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(P(tok, None), kspec, P("model"), ts, ts, ts, pspecs),
                       out_specs=(ts, ts))
    cts = (rng.normal(size=(N,)), rng.normal(size=(N,)))
    got = _grads(jax.jit(lambda h, k, b: fn(h, k, b, y, where, temp, per_row)), (h, k, b),
                 cts)
    want = _grads(lambda h, k, b: jaxent.linear_support_log_probs(
        h, k, y, bias=b, where=where, temperature=temp, **per_row, **kw), (h, k, b), cts)
    assert not np.any(np.isnan(np.asarray(got[0][0])))
    _close(got, want)


@pytest.mark.parametrize("mesh_name,kspec,mode", [
    ("data8", P(), "ids"), ("data2xmodel4", P(None, "model"), "filters")])
def test_linear_support_log_probs_explicit_mesh(mesh_name, kspec, mode):
    """Plain calls on an Explicit mesh: tokens (and the per-row sampler parameters or
    allowed ids) split over "data", the kernel replicated or split over "model"."""
    shape, names = {"data8": ((8,), ("data",)),
                    "data2xmodel4": ((2, 4), ("data", "model"))}[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names))
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    y = jnp.asarray(np.argsort(-np.asarray(h @ k + b[None, :]), axis=1)[np.arange(N),
                                                              rng.integers(0, 4, N)])
    temp = jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32)
    if mode == "filters":
        params = dict(top_k=7, top_p=jnp.asarray(rng.uniform(0.3, 1.0, N), jnp.float32),
                      min_p=jnp.asarray(rng.uniform(0.0, 0.1, N), jnp.float32))
    else:
        ids = rng.integers(0, V, (N, 6))
        ids[:, 0], ids[:, -1] = np.asarray(y), -1
        params = dict(allowed_ids=jnp.asarray(ids))

    def fn(h, k, b):
        return jaxent.linear_support_log_probs(h, k, y, bias=b, temperature=temp,
                                               return_entropy=True, block_size=4, **params)

    cts = (rng.normal(size=(N,)), rng.normal(size=(N,)))
    want = _grads(fn, (h, k, b), cts)
    with jax.set_mesh(mesh):
        placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in
                  zip((h, k, b), (P("data", None), kspec, P(*kspec[1:])), strict=True)]
        assert "shard_map" in str(jax.make_jaxpr(fn)(*placed))
        got = jax.jit(lambda *a: _grads(fn, a, cts))(*placed)
    _close(got, want)
