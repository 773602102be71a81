"""``shift`` and ``capacity`` on 8 simulated CPU devices.

Run by tests/test_sharded.py in a subprocess of its own:

* ``shift=1`` through the Explicit-mesh placements (tokens over ``data``, vocabulary over
  ``model``) equals the single-device call, values and gradients;
* ``capacity`` on a call jaxent would place on a mesh (Explicit or Auto) is a
  ``ValueError`` saying it is for the single-device / token-local path;
* ``capacity`` inside the caller's own ``jax.shard_map`` over tokens compacts each
  device's tokens and gives the single-device result.
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

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

B, T, D, V = 4, 6, 8, 64


def _data(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    y = rng.integers(0, V, (B, T))
    y[rng.random((B, T)) < 0.3] = -100
    return {"h": f(B, T, D), "k": f(D, V) / 2, "ht": f(B, T, D), "kt": f(D, V) / 3,
            "y": jnp.asarray(y), "where": jnp.asarray(rng.random((B, T)) < 0.8)}


def _close(a, b, rtol=2e-5, atol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


HEADS = {
    "ce": lambda d, h, k: jaxent.linear_cross_entropy(h, k, d["y"], where=d["where"],
                                                      shift=1, block_size=8),
    "log_probs": lambda d, h, k: jaxent.linear_log_probs(
        h, k, jnp.maximum(d["y"], 0), where=d["where"], shift=1, block_size=8).sum(),
    "distill": lambda d, h, k: jaxent.linear_distillation_loss(
        h, k, d["ht"], d["kt"], labels=d["y"], shift=1, block_size=8),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_shift_on_explicit_mesh(head):
    d = _data()
    f = lambda h, k: HEADS[head](d, h, k)  # noqa: E731
    want = jax.value_and_grad(f, (0, 1))(d["h"], d["k"])
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        hh = jax.device_put(d["h"], NamedSharding(mesh, P("data", None, None)))
        kk = jax.device_put(d["k"], NamedSharding(mesh, P(None, "model")))
        got = jax.jit(jax.value_and_grad(f, (0, 1)))(hh, kk)
    _close(got, want)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_capacity_refused_on_meshes(axis_type):
    d = _data(1)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        hh = jax.device_put(d["h"].reshape(B * T, D)[:16], NamedSharding(mesh, P("data")))
        y = d["y"].reshape(-1)[:16]
        for call in (lambda: jaxent.linear_cross_entropy(hh, d["k"], y, capacity=8),
                     lambda: jaxent.linear_log_probs(hh, d["k"], jnp.maximum(y, 0), capacity=16)):
            with pytest.raises(ValueError, match="`capacity` is for the single-device"):
                call()


def test_capacity_inside_shard_map():
    d = _data(2)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    h, y = d["h"].reshape(B * T, D), d["y"].reshape(-1)
    cap = int(jnp.sum(y.reshape(2, -1) != -100, axis=1).max())  # per device's 12 tokens

    def local(h, k, y):
        loss = jaxent.linear_cross_entropy(h, k, y, capacity=cap, reduction="sum")
        return jax.lax.psum(loss, "data")

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P())
    want = jax.value_and_grad(lambda h, k: jaxent.linear_cross_entropy(
        h, k, y, reduction="sum"), (0, 1))(h, d["k"])
    got = jax.jit(jax.value_and_grad(lambda h, k: f(h, k, y), (0, 1)))(h, d["k"])
    _close(got, want)
