"""Regression cases of the one-engine redesign on 8 simulated CPU devices.

Run by tests/test_sharded.py in a subprocess of its own. Each case compares the split call
with the single-device one (values and gradients for random cotangents), which the
per-module tests check against float64 references:

* an Auto mesh with ``impl="pallas"``: a ``ValueError`` naming ``impl`` (was a bare
  ``KeyError``);
* the gradient of ``linear_log_probs`` with a kernel sharded along the vocabulary on an
  Explicit mesh (was a ``ShardingTypeError``);
* the RL and distillation heads on an Explicit data-parallel mesh with several vocabulary
  blocks (was a scan-carry type mismatch, ``float32[16]`` against ``float32[16@data]``);
* per-row temperatures through the Explicit and Auto placements of the fused CE;
* ``return_aux`` of ``linear_log_probs``, ``linear_soft_cross_entropy`` and the ``"jsd"``
  distillation (lse, argmax) split over the vocabulary;
* the same heads on Auto meshes (the partitioner splits the statistic walk: no kernel
  gathered), ``impl="token"`` there, and ``impl="pallas"`` there refused by a
  ``ValueError`` naming ``impl``.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxent  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

N, D, V = 16, 8, 64
MESHES = {  # name -> (shape, axis names, hidden's spec, kernel's spec ("dv"))
    "data8": ((8,), ("data",), P("data", None), P()),
    "model8": ((8,), ("model",), P(), P(None, "model")),
    "data2xmodel4": ((2, 4), ("data", "model"), P("data", None), P(None, "model")),
}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {"h": f(N, D), "k": f(D, V) / 2, "b": f(V), "ht": f(N, 2 * D), "kt": f(2 * D, V) / 3,
            "y": jnp.asarray(rng.integers(0, V, (N,))),
            "t": jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32),
            "targets": jax.nn.softmax(f(N, V)), "where": jnp.asarray(rng.random(N) < 0.8)}


def _close(a, b, rtol=2e-5, atol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _value_and_grads(fn, args, seed=1):
    out, vjp = jax.vjp(fn, *args)
    rng = np.random.default_rng(seed)
    cts = jax.tree.map(lambda o: jnp.asarray(rng.normal(size=o.shape), o.dtype)
                       if jnp.issubdtype(o.dtype, jnp.floating)
                       else np.zeros(o.shape, jax.dtypes.float0), out)
    return out, vjp(cts)


def _explicit(mesh_name):
    shape, names, hspec, kspec = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names))
    return mesh, hspec, kspec


HEADS = {
    "log_probs": lambda d, h, k, b, ht, kt: jaxent.linear_log_probs(
        h, k, d["y"], bias=b, temperature=d["t"], logit_softcap=5.0, where=d["where"],
        return_entropy=True, block_size=8, return_aux=True),
    "soft": lambda d, h, k, b, ht, kt: jaxent.linear_soft_cross_entropy(
        h, k, d["targets"], bias=b, temperature=d["t"], label_smoothing=0.1, z_loss=1e-3,
        where=d["where"], block_size=8, return_aux=True),
    "soft_none": lambda d, h, k, b, ht, kt: jaxent.linear_soft_cross_entropy(
        h, k, d["targets"], bias=b, reduction="none", block_size=8),
    "kl": lambda d, h, k, b, ht, kt: jaxent.linear_distillation_loss(
        h, k, ht, kt, student_bias=b, temperature=d["t"], where=d["where"], block_size=8),
    "jsd": lambda d, h, k, b, ht, kt: jaxent.linear_distillation_loss(
        h, k, ht, kt, divergence="jsd", beta=0.3, reduction="sum", block_size=8,
        return_aux=True),
}


# Every head on every Explicit mesh; on Auto meshes (the partitioner splits the walks) the
# heads on the two-axis mesh and the log-probs on the one-axis meshes.
MESH_CASES = ([(h, m, AxisType.Explicit) for h in sorted(HEADS) for m in MESHES]
              + [(h, "data2xmodel4", AxisType.Auto) for h in sorted(HEADS) if h != "soft_none"]
              + [("log_probs", m, AxisType.Auto) for m in ("data8", "model8")])


def _placed_value_and_grads(fn, d, mesh_name, axis_type):
    """``fn``'s value and gradients (hidden, kernel, bias) with the inputs placed on the
    mesh ``mesh_name`` of ``axis_type`` axes, under ``jax.jit``."""
    shape, names, hspec, kspec = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
    vocab = kspec[1] if len(kspec) > 1 else None
    args = (d["h"], d["k"], d["b"], d["ht"], d["kt"])
    with jax.set_mesh(mesh):
        placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(
            args, (hspec, kspec, P(vocab), hspec, kspec), strict=True)]
        return jax.jit(lambda *a: _value_and_grads(
            lambda h, k, b: fn(h, k, b, a[3], a[4]), a[:3]))(*placed)


@pytest.mark.parametrize(("head", "mesh_name", "axis_type"), MESH_CASES,
                         ids=[f"{h}-{m}-{t.name}" for h, m, t in MESH_CASES])
def test_rl_heads_on_meshes(head, mesh_name, axis_type):
    """Values and gradients (hidden, kernel, bias) of the RL and distillation heads with
    inputs sharded over an Explicit or Auto mesh, several vocabulary blocks per device."""
    d = _data()
    fn = lambda h, k, b, ht, kt: HEADS[head](d, h, k, b, ht, kt)  # noqa: E731
    want = _value_and_grads(lambda h, k, b: fn(h, k, b, d["ht"], d["kt"]),
                            (d["h"], d["k"], d["b"]))
    _close(_placed_value_and_grads(fn, d, mesh_name, axis_type), want)


def test_rl_heads_token_and_pallas_on_auto_mesh():
    """On an Auto mesh (tokens and vocabulary split) ``impl="token"`` gives the one-device
    values and gradients (with ``return_aux``), and ``impl="pallas"`` raises a
    ``ValueError`` naming ``impl`` and the Auto mesh, for each head."""
    d = _data(5)
    heads = {
        "log_probs": lambda h, k, b, ht, kt, **kw: jaxent.linear_log_probs(
            h, k, d["y"], bias=b, return_entropy=True, return_aux=True, **kw),
        "kl": lambda h, k, b, ht, kt, **kw: jaxent.linear_distillation_loss(
            h, k, ht, kt, student_bias=b, temperature=d["t"], **kw),
        "soft": lambda h, k, b, ht, kt, **kw: jaxent.linear_soft_cross_entropy(
            h, k, d["targets"], bias=b, z_loss=1e-3, return_aux=True, **kw),
    }
    token = lambda h, k, b, ht, kt: tuple(  # noqa: E731
        heads[n](h, k, b, ht, kt, impl="token", token_block_size=4) for n in ("log_probs", "kl"))
    want = _value_and_grads(lambda h, k, b: token(h, k, b, d["ht"], d["kt"]),
                            (d["h"], d["k"], d["b"]))
    _close(_placed_value_and_grads(token, d, "data2xmodel4", AxisType.Auto), want)
    for f in heads.values():
        pallas = lambda h, k, b, ht, kt, f=f: f(  # noqa: E731
            h, k, b, ht, kt, impl="pallas", interpret=True)
        with pytest.raises(ValueError, match="`impl`='pallas'.*Auto"):
            _placed_value_and_grads(pallas, d, "model8", AxisType.Auto)


def test_rl_heads_on_auto_mesh_split_by_the_partitioner():
    """On an Auto mesh the partitioner splits the statistic walk over the vocabulary: the
    compiled values and gradients of the heads gather no array with a vocabulary-sized
    dimension (no ``[D, V]`` kernel, no logits); a second-order derivative is a clear
    ``NotImplementedError``, as for the fused CE there."""
    d = _data(6)

    def heads(h, k, b, ht, kt, t):
        return (HEADS["log_probs"](d, h, k, b, ht, kt),
                jaxent.linear_soft_cross_entropy(h, k, t, bias=b, z_loss=1e-3, block_size=8),
                HEADS["kl"](d, h, k, b, ht, kt))

    shape, names, hspec, kspec = MESHES["data2xmodel4"]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * 2)
    specs = (hspec, kspec, P("model"), hspec, kspec, P("data", "model"))
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(
            (d["h"], d["k"], d["b"], d["ht"], d["kt"], d["targets"]), specs, strict=True)]
        text = jax.jit(lambda *a: _value_and_grads(
            lambda h, k, b: heads(h, k, b, *a[3:]), a[:3])).lower(*args).compile().as_text()
    gathers = re.findall(r"=\s*\(?\w+\[([\d,]*)\][^=]*\ball-gather(?:-start)?\(", text)
    assert not [g for g in gathers if str(V) in g.split(",")], gathers
    grad = jax.grad(lambda h: HEADS["kl"](d, h, args[1], None, args[3], args[4]))
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match="AxisType.Auto"):
        jax.jvp(grad, (d["h"],), (d["h"],))


def test_log_probs_grad_vocab_sharded_kernel_explicit():
    """The ShardingTypeError case: ``jax.grad`` through a vocabulary-sharded kernel."""
    d = _data(2)
    f = lambda h, k: jaxent.linear_log_probs(h, k, d["y"], block_size=8).sum()  # noqa: E731
    want = jax.grad(f, argnums=(0, 1))(d["h"], d["k"])
    mesh, _, _ = _explicit("model8")
    with jax.set_mesh(mesh):
        kk = jax.device_put(d["k"], NamedSharding(mesh, P(None, "model")))
        hh = jax.device_put(d["h"], NamedSharding(mesh, P()))
        got = jax.jit(jax.grad(f, argnums=(0, 1)))(hh, kk)
    _close(got, want)


def test_auto_mesh_pallas_is_a_clear_error():
    d = _data(3)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        hh = jax.device_put(d["h"], NamedSharding(mesh, P("x", None)))
        with pytest.raises(ValueError, match="`impl`='pallas'.*Auto"):
            jax.jit(lambda h: jaxent.linear_cross_entropy(
                h, d["k"], d["y"], impl="pallas", interpret=True))(hh)
        got = jax.jit(lambda h: jaxent.linear_cross_entropy(h, d["k"], d["y"]))(hh)
    _close(got, jaxent.linear_cross_entropy(d["h"], d["k"], d["y"]))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_fused_ce_row_temperature_on_meshes(axis_type):
    d = _data(4)
    kw = dict(bias=None, temperature=d["t"], label_smoothing=0.1, logit_softcap=4.0,
              block_size=8, where=d["where"])
    f = lambda h, k, t: jaxent.linear_cross_entropy(  # noqa: E731
        h, k, d["y"], **{**kw, "temperature": t})
    want = _value_and_grads(lambda h, k: f(h, k, d["t"]), (d["h"], d["k"]))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        hh = jax.device_put(d["h"], NamedSharding(mesh, P("data", None)))
        kk = jax.device_put(d["k"], NamedSharding(mesh, P(None, "model")))
        tt = jax.device_put(d["t"], NamedSharding(mesh, P("data")))
        got = jax.jit(lambda h, k, t: _value_and_grads(
            lambda h, k: f(h, k, t), (h, k)))(hh, kk, tt)
    _close(got, want)


def test_vocab_parallel_plain_ce_row_temperature():
    """Per-row temperatures of ``shard_cross_entropy`` (global arrays, a data x model mesh)
    and of ``sharded.cross_entropy`` inside a caller's ``shard_map``: values and gradients
    equal the 1-device ``cross_entropy``'s."""
    d = _data(5)
    x = d["h"] @ d["k"]
    kw = dict(temperature=d["t"], label_smoothing=0.1, z_loss=1e-3, where=d["where"])
    want = _value_and_grads(lambda x: jaxent.cross_entropy(x, d["y"], reduction="none", **kw),
                            (x,))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x: _value_and_grads(lambda x: jaxent.sharded.shard_cross_entropy(
            x, d["y"], mesh=mesh, token_axis="data", reduction="none", **kw), (x,)))(x)
    _close(got, want)
    mean = jax.value_and_grad(lambda x: jaxent.cross_entropy(x, d["y"], **kw))(x)
    specs = (P("data", "model"), P("data"), P("data"), P("data"))
    inner = jax.shard_map(
        lambda x, y, t, m: jaxent.sharded.cross_entropy(
            x, y, axis_name="model", token_axis_name="data", temperature=t, where=m,
            label_smoothing=0.1, z_loss=1e-3),
        mesh=jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2),
        in_specs=specs, out_specs=P())
    _close(jax.jit(jax.value_and_grad(lambda x: inner(x, d["y"], d["t"], d["where"])))(x), mean)


def test_fused_ce_pallas_on_explicit_data_mesh():
    """``impl="pallas"`` (interpreted) inside the Explicit placement's ``shard_map``: values
    and gradients equal one device's (pallas_call's outputs carry no varying-axes type)."""
    d = _data(6)
    f = lambda h, k: jaxent.linear_cross_entropy(  # noqa: E731
        h, k, d["y"], label_smoothing=0.1, impl="pallas", interpret=True)
    want = _value_and_grads(f, (d["h"], d["k"]))
    mesh, hspec, _ = _explicit("data8")
    with jax.set_mesh(mesh):
        hh = jax.device_put(d["h"], NamedSharding(mesh, hspec))
        got = jax.jit(lambda h, k: _value_and_grads(f, (h, k)))(hh, d["k"])
    _close(got, want)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_compiled_kernels_lower_inside_explicit_placement(platform):
    """The compiled (not interpreted) kernels of the fused CE and of a statistic head inside
    the Explicit data-parallel ``shard_map``, which checks varying mesh axes: their outputs
    carry the operands' varying axes and the replicated kernel's gradient is summed, so the
    value and gradient programs lower for GPUs and TPUs from this host, kernels included."""
    from jax import export

    mesh, hspec, _ = _explicit("data8")
    sh = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    h = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16, sharding=sh(hspec))
    k = jax.ShapeDtypeStruct((32, 512), jnp.bfloat16, sharding=sh(P()))
    y = jax.ShapeDtypeStruct((64,), jnp.int32, sharding=sh(P("data")))
    kernel_call = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    for f in (lambda h, k, y: jaxent.linear_cross_entropy(h, k, y, impl="pallas"),
              lambda h, k, y: jaxent.linear_log_probs(h, k, y, impl="pallas").sum()):
        with jax.set_mesh(mesh):
            text = export.export(
                jax.jit(jax.value_and_grad(f, argnums=(0, 1))), platforms=[platform],
                disabled_checks=[export.DisabledSafetyCheck.custom_call(kernel_call)],
            )(h, k, y).mlir_module()
        assert kernel_call in text
        assert "all_reduce" in text  # the kernel's gradient summed over the data axis
