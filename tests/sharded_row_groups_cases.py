"""The vocabulary walk's backward in row groups (:func:`jaxent.impl.plan.row_groups`) on 8
simulated CPU devices (run by tests/test_sharded.py): tokens over ``data``, the vocabulary
over ``model`` (``d hidden`` summed over the vocabulary shards), 3 groups of a device's 10
rows (the last shifted), against the one-device walk in one group."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxent.impl import stats, stream  # noqa: E402
from jaxent.impl.plan import Options, stream_plan  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_"
    "device_count=8 before JAX starts (tests/test_sharded.py does this)")

N, D, V, SHARDS = 20, 8, 32, 4


@pytest.mark.parametrize("padding", [0, 5])
def test_soft_cross_entropy_vocabulary_sharded(padding):
    """Soft targets (and their gradient, ``[N, V]`` split both ways) with per-row
    temperatures and a row not counted; ``padding`` columns at the vocabulary's end."""
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    real = V - padding
    h, k, b, c = f(N, D), f(D, V) / 2, f(V) / 2, f(N)
    t = jax.nn.softmax(2 * f(N, V) + jnp.where(jnp.arange(V) < real, 0.0, -jnp.inf)[None, :])
    counted = jnp.asarray(np.arange(N) != 3)
    temp = jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32)
    mesh = jax.make_mesh((2, SHARDS), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

    def local(h, k, b, t, counted, temp, *, groups, axis, shards):
        plan = stream_plan(Options(), real, V // shards, h.shape[0], block_size=3,
                           vocab_axis=axis, shards=shards)
        return stream.run(stats.SoftTargets(real), dataclasses.replace(plan, row_groups=groups),
                          ((h, k, b),), stats.Rows(None, counted, temp), {"targets": t})

    specs = (P("data"), P(None, "model"), P("model"), P("data", "model"), P("data"),
             P("data"), P("data"))
    sharded = jax.shard_map(
        lambda *a: local(*a, groups=3, axis="model", shards=SHARDS), mesh=mesh,
        in_specs=specs[:-1], out_specs=P("data"))
    one = lambda *a: local(*a, groups=1, axis=None, shards=1)  # noqa: E731
    args = (h, k, b, t, counted, temp, c)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs,
                                                                          strict=True)]
    grads = [jax.jit(jax.value_and_grad(lambda h, k, b, t, counted, temp, c, fn=fn: jnp.sum(
        fn(h, k, b, t, counted, temp) * c), argnums=(0, 1, 2, 3)))(*a)
        for fn, a in ((sharded, placed), (one, args))]
    for u, v in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-5)
