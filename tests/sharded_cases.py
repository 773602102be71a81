"""Vocabulary-parallel losses on 8 simulated CPU devices (run by tests/test_sharded.py).

This module needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts,
so it is not collected with the rest of the suite (its name does not match ``test_*.py``);
``tests/test_sharded.py`` runs it in a subprocess of its own:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/sharded_cases.py``.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxent  # noqa: E402
from jaxent import sharded  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_"
    "device_count=8 before JAX starts (tests/test_sharded.py does this in a subprocess)")

N, V, D = 16, 64, 8  # tokens, vocabulary (8 per shard at 8 shards), hidden width
MESHES = {
    "model8": ((8,), ("model",), None),  # 1-D: vocabulary over 8 devices, tokens replicated
    "data2xmodel4": ((2, 4), ("data", "model"), "data"),  # 2-D: tokens x vocabulary
}
REDUCTIONS = ["mean", "sum", "none"]
# Option sets covering every option of the core (weight, ignore_index as a valid class id,
# PyTorch label smoothing over the full vocabulary, z-loss, soft-cap, temperature, where).
OPTIONS = {
    "plain": {},
    "weight_ignore_smooth": {"weight": True, "ignore_index": 2, "label_smoothing": 0.15},
    "zloss_cap_temp": {"z_loss": 1e-3, "logit_softcap": 3.0, "temperature": 1.3,
                       "label_smoothing": 0.1},
    "where_weight": {"where": True, "weight": True},
}


def _mesh(name, axis_types=None):
    shape, names, tok = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=axis_types), tok


def _draw(rng, opts, *, shape=(N, V)):
    c = shape[-1]
    x = rng.normal(scale=2.0, size=shape).astype(np.float32)
    y = rng.integers(0, c, size=shape[:-1]).astype(np.int32)
    flat = y.reshape(-1)
    flat[rng.choice(flat.size, size=2, replace=False)] = opts.get("ignore_index", -100)
    kw = {k: v for k, v in opts.items() if k not in ("weight", "where")}
    if opts.get("weight"):
        kw["weight"] = jnp.asarray(rng.uniform(0.2, 2.0, size=c).astype(np.float32))
    if opts.get("where"):
        kw["where"] = jnp.asarray(rng.random(size=y.shape) > 0.3)
    return x, jnp.asarray(y), kw


def _value_and_grads(fn, args, cot):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(jax.tree.map(lambda o, c: jnp.asarray(c, o.dtype), out, cot))


def _close(a, b, rtol=2e-5, atol=2e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# --------------------------------------------------------------------- cross-entropy


def _all_reductions(fn, **kw):
    """``fn`` evaluated for every reduction at once (one compilation covers all three)."""
    return lambda *args: tuple(fn(*args, reduction=r, **kw) for r in REDUCTIONS)


def _cotangents(rng, labels_shape):
    return tuple(rng.normal(size=() if r != "none" else labels_shape) for r in REDUCTIONS)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("opt_name", list(OPTIONS))
def test_cross_entropy_matches_single_device(rng, mesh_name, opt_name):
    """Values and gradients of every reduction (one vjp over the three of them)."""
    mesh, tok = _mesh(mesh_name)
    x, y, kw = _draw(rng, OPTIONS[opt_name])
    cot = _cotangents(rng, y.shape)
    ref = _value_and_grads(
        jax.jit(_all_reductions(lambda a, **o: jaxent.cross_entropy(a, y, **o), **kw)),
        (jnp.asarray(x),), cot)
    got = _value_and_grads(
        jax.jit(_all_reductions(lambda a, **o: sharded.shard_cross_entropy(
            a, y, mesh=mesh, token_axis=tok, **o), **kw)),
        (jnp.asarray(x),), cot)
    _close(got, ref)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_cross_entropy_class_axis_1(rng, mesh_name):
    """PyTorch's (N, C, d) layout: the class axis is 1, tokens (axis 0) over the data axis."""
    mesh, tok = _mesh(mesh_name)
    x, y, kw = _draw(rng, {"label_smoothing": 0.1}, shape=(4, 3, V))
    x = np.moveaxis(x, -1, 1)
    ref = _value_and_grads(lambda a: jaxent.cross_entropy(a, y, axis=1, **kw), (x,), 1.0)
    got = _value_and_grads(lambda a: sharded.shard_cross_entropy(
        a, y, mesh=mesh, token_axis=tok, axis=1, **kw), (x,), 1.0)
    _close(got, ref)


def test_cross_entropy_shard_with_only_minus_inf(rng):
    """A shard whose logits are all -inf for some rows (a masked vocabulary range)."""
    mesh, _ = _mesh("model8")
    x, y, kw = _draw(rng, {})
    x[:4, : V // 8] = -np.inf  # rows 0..3: the first shard holds only -inf
    y = jnp.where(jnp.arange(N) < 4, V - 1, y)
    ref = _value_and_grads(lambda a: jaxent.cross_entropy(a, y, z_loss=1e-3), (x,), 1.0)
    got = _value_and_grads(lambda a: sharded.shard_cross_entropy(a, y, mesh=mesh, z_loss=1e-3),
                           (x,), 1.0)
    _close(got, ref)


def test_cross_entropy_bf16(rng):
    mesh, tok = _mesh("data2xmodel4")
    x, y, kw = _draw(rng, {"label_smoothing": 0.1})
    xb = jnp.asarray(x, jnp.bfloat16)
    ref = _value_and_grads(lambda a: jaxent.cross_entropy(a, y, **kw), (xb,), 1.0)
    got = _value_and_grads(
        lambda a: sharded.shard_cross_entropy(a, y, mesh=mesh, token_axis=tok, **kw), (xb,), 1.0)
    assert got[0].dtype == jnp.float32 and got[1][0].dtype == jnp.bfloat16
    _close(got, ref, rtol=1e-2, atol=1e-3)


def test_out_of_range_labels():
    """Concrete labels: the core's ValueError; traced labels: nan, as in the core."""
    mesh, tok = _mesh("data2xmodel4")
    x = jnp.zeros((N, V))
    y = jnp.zeros((N,), jnp.int32).at[5].set(V)
    with pytest.raises(ValueError) as ref_err:
        jaxent.cross_entropy(x, y)
    with pytest.raises(ValueError) as err:
        sharded.shard_cross_entropy(x, y, mesh=mesh, token_axis=tok)
    assert str(err.value) == str(ref_err.value)
    out = jax.jit(lambda x, y: sharded.shard_cross_entropy(
        x, y, mesh=mesh, token_axis=tok, reduction="none"))(x, y)
    out = np.asarray(out)
    assert np.isnan(out[5]) and np.isfinite(np.delete(out, 5)).all()
    h, k = jnp.zeros((N, D)), jnp.zeros((D, V))
    with pytest.raises(ValueError) as ref_err:
        jaxent.linear_cross_entropy(h, k, y)
    with pytest.raises(ValueError) as err:
        sharded.shard_linear_cross_entropy(h, k, y, mesh=mesh, token_axis=tok)
    assert str(err.value) == str(ref_err.value)


def test_bad_arguments_same_errors_as_core():
    mesh, _ = _mesh("model8")
    x, y = jnp.zeros((N, V)), jnp.zeros((N,), jnp.int32)
    for kw in ({"reduction": "avg"}, {"label_smoothing": 2.0}, {"weight": jnp.ones(3)}):
        with pytest.raises(ValueError) as ref_err:
            jaxent.cross_entropy(x, y, **kw)
        with pytest.raises(ValueError) as err:
            sharded.shard_cross_entropy(x, y, mesh=mesh, **kw)
        assert str(err.value) == str(ref_err.value)
    with pytest.raises(ValueError, match="divisible"):
        sharded.shard_cross_entropy(jnp.zeros((N, 60)), y, mesh=mesh)
    with pytest.raises(ValueError) as ref_err:
        jaxent.linear_cross_entropy(jnp.zeros((N, D)), jnp.zeros((V, D)), y)
    with pytest.raises(ValueError) as err:
        sharded.shard_linear_cross_entropy(jnp.zeros((N, D)), jnp.zeros((V, D)), y, mesh=mesh)
    assert str(err.value) == str(ref_err.value)


def test_inside_user_shard_map_auto_mesh(rng):
    """The per-shard function in the user's own jitted shard_map on an Auto-typed 2-D mesh."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    x, y, kw = _draw(rng, {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3})
    w = kw.pop("weight")

    def loss(x, y, w):
        return sharded.cross_entropy(x, y, axis_name="model", token_axis_name="data",
                                     weight=w, **kw)

    fn = jax.jit(jax.value_and_grad(jax.shard_map(
        loss, mesh=mesh, in_specs=(P("data", "model"), P("data"), P()), out_specs=P())))
    got = fn(x, y, w)
    ref = jax.value_and_grad(lambda a: jaxent.cross_entropy(a, y, weight=w, **kw))(x)
    _close(got, ref)


# ----------------------------------------------------------------- fused linear


def _draw_linear(rng, opts, layout):
    x, y, kw = _draw(rng, opts)
    h = rng.normal(size=(N, D)).astype(np.float32)
    k = (rng.normal(size=(D, V)) / 2).astype(np.float32)
    if layout == "vd":
        k = k.T.copy()
    b = rng.normal(size=(V,)).astype(np.float32)
    return h, k, b, y, kw


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("opt_name", list(OPTIONS))
def test_linear_matches_single_device(rng, mesh_name, opt_name):
    """Values and gradients (hidden, kernel, bias) of every reduction."""
    mesh, tok = _mesh(mesh_name)
    layout = "vd" if opt_name == "zloss_cap_temp" else "dv"
    h, k, b, y, kw = _draw_linear(rng, OPTIONS[opt_name], layout)
    kw["kernel_layout"] = layout
    cot = _cotangents(rng, y.shape)
    ref = _value_and_grads(jax.jit(_all_reductions(
        lambda h, k, b, **o: jaxent.linear_cross_entropy(h, k, y, bias=b, block_size=16, **o),
        **kw)), (h, k, b), cot)
    got = _value_and_grads(jax.jit(_all_reductions(
        lambda h, k, b, **o: sharded.shard_linear_cross_entropy(
            h, k, y, bias=b, mesh=mesh, token_axis=tok, block_size=4, **o), **kw)),
        (h, k, b), cot)
    _close(got, ref, rtol=2e-5, atol=5e-6)


def test_linear_batch_layout_no_bias(rng):
    """``hidden [B, T, D]`` with the batch over the data axis, default block sizes."""
    mesh, tok = _mesh("data2xmodel4")
    h = rng.normal(size=(4, 4, D)).astype(np.float32)
    k = (rng.normal(size=(D, V)) / 2).astype(np.float32)
    y = jnp.asarray(rng.integers(0, V, size=(4, 4)), jnp.int32)
    ref = _value_and_grads(lambda h, k: jaxent.linear_cross_entropy(h, k, y), (h, k), 1.0)
    got = _value_and_grads(lambda h, k: sharded.shard_linear_cross_entropy(
        h, k, y, mesh=mesh, token_axis=tok), (h, k), 1.0)
    _close(got, ref, atol=5e-6)


# ------------------------------------------------------------- compiled programs


def _all_gathers(text: str) -> list[tuple[int, ...]]:
    """Result shapes of the all-gathers in an HLO module's text."""
    shapes = []
    for line in text.splitlines():
        m = re.search(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*\ball-gather(-start)?\(", line)
        if m:
            shapes.append(tuple(int(s) for s in m.group(2).split(",") if s))
    return shapes


def _all_reduces(text: str) -> list[tuple[int, ...]]:
    """Result shapes of the all-reduces in an HLO module's text (tuple results: each)."""
    shapes = []
    for line in text.splitlines():
        m = re.search(r"=\s*(\(?[^=]*?\)?)\s*all-reduce(-start)?\(", line)
        if m:
            for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
                shapes.append(tuple(int(s) for s in dims.split(",") if s))
    return shapes


def _no_full_logits_gather(text: str, n: int, v: int) -> None:
    for shape in _all_gathers(text):
        assert not (n in shape and v in shape), f"all-gather of logits-sized {shape}"
        assert v not in shape, f"all-gather along the vocabulary: {shape}"


def test_hlo_has_no_logits_all_gather():
    """Neither the sharded losses nor their gradients gather [N, V] (or any vocab-sized) data."""
    n, v, d = 64, 1024, 32
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sh = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    x = jax.ShapeDtypeStruct((n, v), jnp.float32, sharding=sh("data", "model"))
    y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh("data"))
    h = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sh("data"))
    k = jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=sh(None, "model"))
    ce = jax.jit(jax.value_and_grad(lambda x, y: sharded.shard_cross_entropy(
        x, y, mesh=mesh, token_axis="data", label_smoothing=0.1, z_loss=1e-4)))
    _no_full_logits_gather(ce.lower(x, y).compile().as_text(), n, v)
    lin = jax.jit(jax.value_and_grad(lambda h, k, y: sharded.shard_linear_cross_entropy(
        h, k, y, mesh=mesh, token_axis="data", label_smoothing=0.1), argnums=(0, 1)))
    text = lin.lower(h, k, y).compile().as_text()
    _no_full_logits_gather(text, n, v)
    assert "all-reduce" in text  # the [N] statistics and d hidden are reduced, nothing else


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_gspmd_plain_jit_cross_entropy(rng, axis_type):
    """jaxent.cross_entropy under plain jit on logits sharded (tokens x vocabulary), on an
    Auto-typed mesh (GSPMD propagation) and on an Explicit one (sharding in types): no
    gather of the logits either way."""
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(getattr(AxisType, axis_type),) * 2)
    x, y, kw = _draw(rng, {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3})
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    fn = jax.jit(jax.value_and_grad(lambda a, b: jaxent.cross_entropy(a, b, **kw)))
    with jax.set_mesh(mesh):
        _no_full_logits_gather(fn.lower(xs, ys).compile().as_text(), N, V)
        got = fn(xs, ys)
    assert got[1].sharding.spec == P("data", "model")
    _close(got, jax.value_and_grad(lambda a: jaxent.cross_entropy(a, y, **kw))(x))


# ------------------------------------ plain jit of the fused loss, explicit and auto meshes

# (mesh, kernel layout, kernel sharded along V?, options): the vocabulary-parallel walk on 1-D
# and 2-D meshes in both layouts; a replicated kernel with tokens over "data" (the
# single-device function per token shard) or with everything replicated on the mesh.
# Explicit axes: the split is read from the types when tracing (a shard_map); Auto axes: the
# partitioner proposes it when compiling (custom_partitioning).
PLAIN_JIT_CASES = {
    "model8-dv": ("model8", "dv", True, "weight_ignore_smooth"),
    "model8-vd": ("model8", "vd", True, "where_weight"),
    "data2xmodel4-dv": ("data2xmodel4", "dv", True, "zloss_cap_temp"),
    "data2xmodel4-vd": ("data2xmodel4", "vd", True, "weight_ignore_smooth"),
    "data2xmodel4-kernel-replicated": ("data2xmodel4", "dv", False, "zloss_cap_temp"),
    "model8-all-replicated": ("model8", "vd", False, "where_weight"),
}


def _all_reductions_with_aux(h, k, b, y, cot, **kw):
    """A scalar mixing every reduction (``cot`` weights) and, as aux, the three losses and
    the ``"mean"`` call's aux dict."""
    outs = [jaxent.linear_cross_entropy(h, k, y, bias=b, reduction=r, return_aux=True, **kw)
            for r in REDUCTIONS]
    value = sum(jnp.sum(c * o[0]) for c, o in zip(cot, outs, strict=True))
    return value, (tuple(o[0] for o in outs), outs[0][1])


# Each placement on each mesh axis type, both layouts on each, the 2-D dv case on both types.
PLAIN_JIT_PLACED = [("model8-dv", "Auto"), ("model8-vd", "Explicit"),
                    ("data2xmodel4-dv", "Explicit"), ("data2xmodel4-dv", "Auto"),
                    ("data2xmodel4-vd", "Auto"), ("data2xmodel4-kernel-replicated", "Explicit"),
                    ("model8-all-replicated", "Auto")]


@pytest.mark.parametrize(("case", "axis_type"), PLAIN_JIT_PLACED)
def test_plain_jit_linear_on_mesh(rng, case, axis_type):
    """Plain jax.jit(jax.value_and_grad(jaxent.linear_cross_entropy)) on inputs placed on an
    Explicit- or Auto-axes mesh: values, aux and gradients (hidden, kernel, bias) of every
    reduction (both block schedules: "mean"/"sum" walk token blocks, "none" vocabulary
    blocks) equal the single-device function's on unplaced arrays; gradients come back
    sharded like their inputs."""
    mesh_name, layout, vocab_sharded, opt_name = PLAIN_JIT_CASES[case]
    mesh, tok = _mesh(mesh_name,
                      axis_types=(getattr(AxisType, axis_type),) * len(MESHES[mesh_name][0]))
    h, k, b, y, kw = _draw_linear(rng, OPTIONS[opt_name], layout)
    cot = tuple(jnp.asarray(c, jnp.float32) for c in _cotangents(rng, y.shape))
    kw["kernel_layout"] = layout

    def fn(kw):
        return jax.jit(jax.value_and_grad(
            lambda h, k, b, y: _all_reductions_with_aux(h, k, b, y, cot, **kw),
            argnums=(0, 1, 2), has_aux=True))

    ref = fn(kw)(h, k, b, y)
    vocab = "model" if vocab_sharded else None
    k_spec = P(None, vocab) if layout == "dv" else P(vocab, None)
    place = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731
    args = (place(h, tok), place(k, *k_spec), place(b, vocab), place(y, tok))
    kw = {n: place(a, tok) if n == "where" else a for n, a in kw.items()}
    got = fn(kw)(*args)
    _close(got, ref, rtol=2e-5, atol=5e-6)
    for g, a in zip(got[1], args, strict=False):
        assert g.sharding.is_equivalent_to(a.sharding, a.ndim), (g.sharding, a.sharding)
    none = got[0][1][0][2]  # reduction="none": the tokens stay split like the labels
    assert none.sharding.is_equivalent_to(args[3].sharding, none.ndim)


def _mesh_of_type(mesh_name, axis_type):
    """The named mesh with all axes of ``axis_type``; Auto 2-D as ``Mesh(devices, names)``
    (the constructor older code uses), otherwise ``jax.make_mesh``."""
    shape, names, tok = MESHES[mesh_name]
    if axis_type == "Auto" and len(shape) == 2:
        return Mesh(np.asarray(jax.devices()[:8]).reshape(shape), names), tok
    return _mesh(mesh_name, axis_types=(getattr(AxisType, axis_type),) * len(shape))


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_plain_jit_linear_hlo_on_mesh(axis_type):
    """The compiled value and gradients (on Auto meshes: the value alone too, and both block
    schedules) of plain-jitted jaxent.linear_cross_entropy on a vocabulary-sharded kernel
    gather nothing (neither [N, V] logits nor the kernel): only all-reduces of [N]
    statistics, d hidden [N, D] and the kernel's gradient block. Without the split (the
    single-device walk left to the partitioner) the Auto programs all-gather the kernel or
    [N, V] logits rows."""
    n, v, d = 64, 1024, 32
    seen = {}
    for mesh_name, layout in (("model8", "vd"), ("data2xmodel4", "dv")):
        mesh, tok = _mesh_of_type(mesh_name, axis_type)
        sh = lambda *spec, mesh=mesh: NamedSharding(mesh, P(*spec))  # noqa: E731
        kshape, kspec = ((d, v), (None, "model")) if layout == "dv" else ((v, d), ("model",))
        h = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sh(tok))
        k = jax.ShapeDtypeStruct(kshape, jnp.float32, sharding=sh(*kspec))
        b = jax.ShapeDtypeStruct((v,), jnp.float32, sharding=sh("model"))
        y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh(tok))
        seen[mesh_name] = set()
        # Explicit axes split the vocabulary when tracing: the token walk cannot serve that.
        programs = (("auto", False), ("token", True), ("vocab", True))
        if axis_type == "Explicit":
            programs = (("vocab", True),)
            with pytest.raises(ValueError, match=r"`impl`='token' cannot serve"):
                jax.jit(lambda h, k, b, y, layout=layout: jaxent.linear_cross_entropy(
                    h, k, y, bias=b, kernel_layout=layout, impl="token")).lower(h, k, b, y)
        for impl, grad in programs:
            def f(h, k, b, y, layout=layout, impl=impl):
                return jaxent.linear_cross_entropy(
                    h, k, y, bias=b, kernel_layout=layout, label_smoothing=0.1, z_loss=1e-4,
                    block_size=32, impl=impl)

            fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)) if grad else f)
            text = fn.lower(h, k, b, y).compile().as_text()
            assert _all_gathers(text) == [], (impl, grad, _all_gathers(text))
            seen[mesh_name] |= set(_all_reduces(text))
        for shape in seen[mesh_name]:
            assert v not in shape and shape != (n, v), f"vocabulary-sized all-reduce {shape}"
    assert (n,) in seen["model8"] and (n, d) in seen["model8"]  # statistics, d hidden
    # tokens over 2: [N/2] statistics, d hidden [N/2, D], d kernel [D, V/4] over "data"
    assert {(n // 2,), (n // 2, d), (d, v // 4)} <= seen["data2xmodel4"], seen


def test_auto_partitioned_loss_under_vmap_checkpoint_and_uncommitted(rng):
    """With 8 devices the fused loss is a custom_partitioning call: under jax.vmap (no
    batching rule: the single-device function runs instead), jax.checkpoint and on
    unplaced arrays (one device: the call is inlined) it still equals the reference."""
    h, k, _, y, _ = _draw_linear(rng, {}, "vd")
    h, y = h.reshape(4, N // 4, D), y.reshape(4, N // 4)
    mesh, tok = _mesh("data2xmodel4", axis_types=(AxisType.Auto,) * 2)
    hs = jax.device_put(h, NamedSharding(mesh, P(tok)))
    ks = jax.device_put(k, NamedSharding(mesh, P("model")))

    def f(h, k, y):
        return jaxent.linear_cross_entropy(h, k, y, kernel_layout="vd", z_loss=1e-3)

    def ref(h, k, y):
        return jaxent.cross_entropy(h @ k.T, y, z_loss=1e-3)

    per_example = jax.vmap(jax.grad(ref, argnums=(0, 1)), in_axes=(0, None, 0))(h, k, y)
    for hh, kk in ((h, k), (hs, ks)):
        got = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(0, None, 0)))(hh, kk, y)
        _close(got, per_example, atol=5e-6)
    full = jax.value_and_grad(ref, argnums=(0, 1))(h, k, y)
    _close(jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, k, y), full, atol=5e-6)
    _close(jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1)))(hs, ks, y), full[1],
           atol=5e-6)


# ------------------------------------------------------------------------- memory


def test_linear_temp_memory_per_device_at_8_shards():
    """Per-device temporaries of the vocabulary-parallel linear loss (value and gradients) at
    8 vocabulary shards are at most 1/6 of the single-device token walk's at the same shape,
    and below the single-device default (the vocabulary walk at this V, itself leaner: the
    [N, D] float32 partial d hidden that every shard holds is 4 of its 6.5 MiB)."""
    n, d, v = 2048, 512, 131072  # 2K tokens, a 128K vocabulary (Llama 3 sized)
    mesh = jax.make_mesh((8,), ("model",))
    sh = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    k = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    def single(impl):
        return jax.jit(jax.value_and_grad(lambda h, k, y: jaxent.linear_cross_entropy(
            h, k, y, impl=impl), argnums=(0, 1))).lower(h, k, y).compile()

    ref = single("token").memory_analysis().temp_size_in_bytes
    default = single("auto").memory_analysis().temp_size_in_bytes
    hs = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sh())
    ks = jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=sh(None, "model"))
    ys = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh())
    par = jax.jit(jax.value_and_grad(
        lambda h, k, y: sharded.shard_linear_cross_entropy(h, k, y, mesh=mesh), argnums=(0, 1)))
    got = par.lower(hs, ks, ys).compile().memory_analysis().temp_size_in_bytes
    print(f"temp bytes: single device {ref / 2**20:.1f} MiB (token walk), "
          f"{default / 2**20:.1f} MiB (default), per device at 8 shards "
          f"{got / 2**20:.1f} MiB, ratio {got / ref:.3f}")
    assert got <= ref / 6 and got <= default / 4


def test_linear_inside_data_parallel_shard_map(rng):
    """The single-device jaxent.linear_cross_entropy on local tokens in a data-parallel
    shard_map (kernel replicated): its custom_vjp returns the kernel gradient summed over
    the data axis, typed like the kernel, for both block schedules."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    h, k, b, y, _ = _draw_linear(rng, {}, "dv")

    for impl in ("vocab", "token"):
        def loss(h, k, b, y, impl=impl):
            part = jaxent.linear_cross_entropy(h, k, y, bias=b, reduction="sum", impl=impl,
                                               block_size=16)
            return jax.lax.psum(part, "data")

        fn = jax.jit(jax.value_and_grad(jax.shard_map(
            loss, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")), out_specs=P()),
            argnums=(0, 1, 2)))
        ref = jax.value_and_grad(lambda h, k, b: jaxent.linear_cross_entropy(
            h, k, y, bias=b, reduction="sum"), argnums=(0, 1, 2))(h, k, b)
        _close(fn(h, k, b, y), ref, atol=2e-5)


def test_example_script_trains_on_a_2x4_mesh(capsys):
    """examples/sharded_lm_head.py: all three entry points equal the single-device loss and
    the loss falls under optax (the script asserts both)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sharded_lm_head.py"
    spec = importlib.util.spec_from_file_location("sharded_lm_head", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    assert capsys.readouterr().out.count("(single device") == 3


# ------------------------------------------------- the host's device count does not matter

# Every public loss, unsharded: (loss of the inputs, input names, differentiated argnums).
_UNSHARDED = {
    "cross_entropy": (lambda x, y: jaxent.cross_entropy(x, y, label_smoothing=0.1,
                                                        z_loss=1e-3), ("x", "y"), (0,)),
    "soft_cross_entropy": (lambda x, t: jaxent.soft_cross_entropy(x, t), ("x", "t"), (0,)),
    "nll_loss": (lambda x, y: jaxent.nll_loss(jax.nn.log_softmax(x), y), ("x", "y"), (0,)),
    "binary_cross_entropy": (lambda x, t: jaxent.binary_cross_entropy(x, t), ("x", "t"),
                             (0,)),
    "linear_cross_entropy": (lambda h, k, y: jaxent.linear_cross_entropy(
        h, k, y, z_loss=1e-3, block_size=16), ("h", "k", "y"), (0, 1)),
}


def _unsharded_inputs(rng):
    return {"x": jnp.asarray(rng.normal(size=(N, V)), jnp.float32),
            "t": jax.nn.softmax(jnp.asarray(rng.normal(size=(N, V)), jnp.float32)),
            "y": jnp.asarray(rng.integers(0, V, N), jnp.int32),
            "h": jnp.asarray(rng.normal(size=(N, D)), jnp.float32),
            "k": jnp.asarray(rng.normal(size=(D, V)) / 3, jnp.float32)}


@pytest.mark.parametrize("name", list(_UNSHARDED))
def test_unsharded_call_is_the_one_device_program(rng, name):
    """With 8 devices, an unplaced call compiles to one device's program (no partitioner
    callback), and jax.hessian, jax.vmap and export round trips work as on one device."""
    from jax import export

    fn, names, argnums = _UNSHARDED[name]
    inp = _unsharded_inputs(rng)
    args = [inp[n] for n in names]
    text = jax.jit(jax.value_and_grad(fn, argnums=argnums)).lower(*args).as_text()
    assert "CustomSPMDPartitioning" not in text and "sharding" not in text
    # reverse-over-reverse on a small slice (hessian of the first input)
    small = [a[:4] if a.shape[0] == N and n != "k" else a for n, a in zip(names, args,
                                                                        strict=True)]
    if name == "linear_cross_entropy":
        hess = jax.jit(jax.hessian(fn, argnums=0))(*small)
        ref = jax.jit(jax.hessian(
            lambda h, k, y: jaxent.cross_entropy(h @ k, y, z_loss=1e-3)))(*small)
    else:
        hess = jax.jit(jax.hessian(fn))(*small)
        ref = None
    assert np.isfinite(np.asarray(hess)).all()
    if ref is not None:
        np.testing.assert_allclose(hess, ref, rtol=1e-4, atol=1e-6)
    per_row = jax.vmap(lambda *a: fn(*(b if n == "k" else b[None]
                                       for n, b in zip(names, a, strict=True))),
                       in_axes=tuple(None if n == "k" else 0 for n in names))(*args)
    loop = jnp.stack([fn(*(a[i:i + 1] if n != "k" else a for n, a in zip(names, args,
                                                                          strict=True)))
                      for i in range(N)])
    np.testing.assert_allclose(per_row, loop, rtol=1e-5, atol=1e-6)
    for grad in (False, True):
        f = jax.value_and_grad(fn, argnums=argnums) if grad else fn
        back = export.deserialize(export.export(jax.jit(f))(*args).serialize())
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     back.call(*args), jax.jit(f)(*args))


@pytest.mark.parametrize("grad", [False, True])
def test_sharded_losses_export_round_trip(rng, grad):
    """The mesh API's programs serialize and run again with the same value on 8 devices."""
    from jax import export

    mesh, tok = _mesh("data2xmodel4")
    inp = _unsharded_inputs(rng)
    ce = lambda x, y: sharded.shard_cross_entropy(  # noqa: E731
        x, y, mesh=mesh, token_axis=tok, label_smoothing=0.1)
    lin = lambda h, k, y: sharded.shard_linear_cross_entropy(  # noqa: E731
        h, k, y, mesh=mesh, token_axis=tok, z_loss=1e-3)
    for fn, args, argnums in ((ce, (inp["x"], inp["y"]), (0,)),
                              (lin, (inp["h"], inp["k"], inp["y"]), (0, 1))):
        with jax.set_mesh(mesh):
            f = jax.value_and_grad(fn, argnums=argnums) if grad else fn
            back = export.deserialize(export.export(jax.jit(f))(*args).serialize())
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         back.call(*args), jax.jit(f)(*args))


# ------------------------------------------ robustness on the vocabulary-parallel losses

from tests import conformance  # noqa: E402

# Only in the subprocess of tests/test_sharded.py: the one-process suite imports this module
# too (collecting doctests) and must keep its own implementations.
if os.environ.get("JAXENT_SHARDED_SUBPROCESS") == "1":
    _PAIR = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    conformance.IMPLS.clear()
    conformance.IMPLS.update({
        "sharded-ce": lambda x, y, **kw: sharded.shard_cross_entropy(x, y, mesh=_PAIR, **kw),
        "sharded-linear": lambda x, y, **kw: sharded.shard_linear_cross_entropy(
            jnp.eye(x.shape[0], dtype=x.dtype), x, y, mesh=_PAIR, block_size=32, **kw),
    })
# The conformance suite and the checks of tests/test_robustness.py, parametrized over the
# two entries above.
from tests.test_conformance import (  # noqa: E402,F401
    test_16bit_logits_accumulate_in_float32,
    test_value_and_vjp_match_float64,
)
from tests.test_robustness import (  # noqa: E402,F401
    test_class_weights_summing_to_zero,
    test_every_logit_far_below_zero,
    test_narrow_label_dtypes_do_not_wrap,
    test_tiny_temperatures,
)


def test_shard_cross_entropy_unbatched_logits(rng):
    x = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    mesh, _ = _mesh("model8")
    with jax.set_mesh(mesh):
        got = jax.value_and_grad(lambda x: sharded.shard_cross_entropy(x, jnp.array(3),
                                                                       mesh=mesh))(x)
    want = jax.value_and_grad(lambda x: jaxent.cross_entropy(x, jnp.array(3)))(x)
    _close(got, want)


def test_nll_loss_on_explicitly_sharded_log_probs(rng):
    mesh, tok = _mesh("data2xmodel4", axis_types=(AxisType.Explicit,) * 2)
    lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(N, V)), jnp.float32))
    y = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    lps = jax.device_put(lp, NamedSharding(mesh, P("data", "model")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    got = jax.jit(jax.value_and_grad(lambda a, b: jaxent.nll_loss(a, b)))(lps, ys)
    _close(got, jax.value_and_grad(lambda a, b: jaxent.nll_loss(a, b))(lp, y))
