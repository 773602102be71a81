"""Issue 24's sharded classes on 8 simulated CPU devices (run by tests/test_sharded.py).

* overlapping token and vocabulary axes: a named ``ValueError``, never a wrong loss (2);
* out-of-range ids inside ``shard_map``: ``nan`` values and ``nan`` gradients (5);
* second order: shard_map and Explicit-mesh placements give the single-device Hessian-vector
  products; the Auto-mesh placement raises a clear ``NotImplementedError`` (9).
"""

from __future__ import annotations

import contextlib
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

N, D, V = 8, 4, 32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(24)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    y = rng.integers(0, V, N).astype(np.int32)
    return h, w, y


def _mesh(kind=AxisType.Auto):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))


# ------------------------------------------------------------- 2. overlapping axes


@pytest.mark.parametrize("token_axis", ["model", ("data", "model")])
@pytest.mark.parametrize("fn", ["ce", "lce", "lsce", "ldl"])
def test_overlapping_axes_inside_shard_map_are_a_named_error(data, fn, token_axis):
    h, w, y = data
    mesh = _mesh()
    t = jax.nn.softmax(jnp.asarray(h @ w), -1)
    calls = {
        "ce": (lambda x, w, y: sharded.cross_entropy(
            x, y, axis_name="model", token_axis_name=token_axis), (h @ w, w, y)),
        "lce": (lambda h, w, y: sharded.linear_cross_entropy(
            h, w, y, axis_name="model", token_axis_name=token_axis), (h, w, y)),
        "lsce": (lambda h, w, t: sharded.linear_soft_cross_entropy(
            h, w, t, axis_name="model", token_axis_name=token_axis), (h, w, t)),
        "ldl": (lambda h, w, _: sharded.linear_distillation_loss(
            h, w, h, w, axis_name="model", token_axis_name=token_axis), (h, w, y)),
    }
    body, args = calls[fn]
    specs = (P("data", "model") if fn == "ce" else P("data", None), P(None, "model"),
             P("data", "model") if fn == "lsce" else P("data"))
    f = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())
    with pytest.raises(ValueError, match="`token_axis_name`.*`axis_name`"):
        f(*args)


@pytest.mark.parametrize("fn", ["shard_ce", "shard_lce"])
def test_overlapping_axes_of_the_mesh_api_are_a_named_error(data, fn):
    h, w, y = data
    mesh = _mesh(AxisType.Auto)
    with pytest.raises(ValueError, match="`token_axis`.*`vocab_axis`"):
        if fn == "shard_ce":
            sharded.shard_cross_entropy(h @ w, y, mesh=mesh, vocab_axis="model",
                                        token_axis="model")
        else:
            sharded.shard_linear_cross_entropy(h, w, y, mesh=mesh, vocab_axis="model",
                                               token_axis="model")


# ------------------------------------------------- 5. bad ids inside shard_map: nan


def test_shard_map_log_probs_bad_id_gives_nan_value_and_gradients(data):
    h, w, _ = data
    y = np.array([0, 1, V, 3, -1, 5, 6, 2**31 - 1], np.int32)
    mesh = _mesh()

    def loss(h, w, y):
        f = jax.shard_map(lambda h, w, y: sharded.linear_log_probs(h, w, y, axis_name="model"),
                          mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P())
        return f(h, w, y)

    lp = np.asarray(jax.jit(loss)(h, w, y))
    bad = np.array([2, 4, 7])
    assert np.isnan(lp[bad]).all() and np.isfinite(np.delete(lp, bad)).all()
    gh, gw = jax.jit(jax.grad(lambda h, w, y: loss(h, w, y)[2], argnums=(0, 1)))(h, w, y)
    assert np.isnan(np.asarray(gh)[2]).all() and np.isnan(gw).all()


# ------------------------------------------------------------------ 9. second order


def _hvp(loss, h, v):
    return jax.jvp(jax.grad(loss), (h,), (v,))[1]


def _grad_of_grad(loss, h):
    return jax.grad(lambda h: jnp.sum(jax.grad(loss)(h) ** 2))(h)


def _reference(h, w, y):
    def loss(h):
        return jaxent.cross_entropy(h @ w, y)
    return loss


@pytest.mark.parametrize("placement", ["shard_map", "shard_map_ce", "shard_api", "explicit"])
def test_second_order_on_sharded_placements(data, placement):
    h, w, y = data
    mesh = _mesh()
    if placement == "shard_map":
        f = jax.shard_map(lambda h, w, y: sharded.linear_cross_entropy(
            h, w, y, axis_name="model", token_axis_name="data"), mesh=mesh,
            in_specs=(P("data", None), P(None, "model"), P("data")), out_specs=P())

        def loss(h):
            return f(h, w, y)
    elif placement == "shard_map_ce":
        f = jax.shard_map(lambda x, y: sharded.cross_entropy(
            x, y, axis_name="model", token_axis_name="data"), mesh=mesh,
            in_specs=(P("data", "model"), P("data")), out_specs=P())

        def loss(h):
            return f(h @ w, y)
    elif placement == "shard_api":
        def loss(h):
            return sharded.shard_linear_cross_entropy(h, w, y, mesh=_mesh(AxisType.Auto),
                                                      token_axis="data")
    else:
        mesh = _mesh(AxisType.Explicit)
        ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))

        def loss(h):
            return jaxent.linear_cross_entropy(h, ws, y)
    v = np.random.default_rng(1).normal(size=h.shape).astype(np.float32)
    ref = _reference(h, w, y)
    with contextlib.nullcontext() if placement != "explicit" else jax.set_mesh(mesh):
        hvp, gg = jax.jit(lambda h, v: (_hvp(loss, h, v), _grad_of_grad(loss, h)))(h, v)
    np.testing.assert_allclose(hvp, _hvp(ref, h, v), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gg, _grad_of_grad(ref, h), rtol=1e-4, atol=1e-7)


def test_second_order_of_sharded_log_probs(data):
    h, w, y = data
    f = jax.shard_map(lambda h, w, y: sharded.linear_log_probs(h, w, y, axis_name="model"),
                      mesh=_mesh(), in_specs=(P(), P(None, "model"), P()), out_specs=P())

    def loss(h):
        return f(h, w, y).sum()

    def ref(h):
        return jaxent.token_log_probs(h @ w, y).sum()

    v = np.random.default_rng(2).normal(size=h.shape).astype(np.float32)
    np.testing.assert_allclose(jax.jit(lambda h, v: _hvp(loss, h, v))(h, v), _hvp(ref, h, v),
                               rtol=1e-4, atol=1e-6)


def test_second_order_on_an_auto_mesh_is_a_clear_not_implemented(data):
    h, w, y = data
    mesh = _mesh(AxisType.Auto)
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))

    def loss(h):
        return jaxent.linear_cross_entropy(h, ws, y)

    with jax.set_mesh(mesh):
        np.testing.assert_allclose(jax.grad(loss)(h), jax.grad(_reference(h, w, y))(h),
                                   rtol=1e-4, atol=1e-7)  # first order works
        with pytest.raises(NotImplementedError, match="AxisType.Auto.*Explicit"):
            _grad_of_grad(loss, h)
