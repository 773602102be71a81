"""Programs that use jaxent export, serialize and run again; accelerator programs are clean.

``jax.export`` round trips (serialize, deserialize, call: the same value) for every public
loss, with and without gradients, with a concrete and with a symbolic batch size. Programs
exported for cuda and tpu carry none of the CPU's detours (``jaxent._platform``), while the
CPU's own program keeps them. ``checkify`` still reports out-of-range traced labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import checkify

import jaxent

N, C, D = 6, 10, 8


def _inputs():
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (N, C))
    return {
        "x": x,
        "y": jax.random.randint(ks[1], (N,), 0, C).at[0].set(-100),
        "t": jax.nn.softmax(jax.random.normal(ks[2], (N, C))),
        "b": jax.random.bernoulli(ks[3], 0.5, (N, C)).astype(jnp.float32),
        "h": jax.random.normal(ks[4], (N, D)),
        "k": jax.random.normal(ks[0], (D, C)) / 3,
        "w": jnp.linspace(0.5, 2.0, C),
    }


# name -> (loss of the named inputs, names of its inputs, names differentiated)
LOSSES = {
    "cross_entropy": (lambda x, y, w: jaxent.cross_entropy(
        x, y, weight=w, label_smoothing=0.1, z_loss=1e-3), ("x", "y", "w"), (0,)),
    "soft_cross_entropy": (lambda x, t: jaxent.soft_cross_entropy(
        x, t, logit_softcap=5.0), ("x", "t"), (0, 1)),
    "nll_loss": (lambda x, y: jaxent.nll_loss(jax.nn.log_softmax(x), y), ("x", "y"), (0,)),
    "binary_cross_entropy": (lambda x, b: jaxent.binary_cross_entropy(x, b), ("x", "b"),
                             (0,)),
    "linear_cross_entropy": (lambda h, k, y: jaxent.linear_cross_entropy(
        h, k, y, temperature=0.7, block_size=4), ("h", "k", "y"), (0, 1)),
    "linear_cross_entropy_aux": (lambda h, k, y: jaxent.linear_cross_entropy(
        h, k, y, return_aux=True)[1]["lse"].sum(), ("h", "k", "y"), (0, 1)),
    "CrossEntropyLoss": (lambda x, y: jaxent.CrossEntropyLoss(label_smoothing=0.1)(x, y),
                         ("x", "y"), (0,)),
    "NLLLoss": (lambda x, y: jaxent.NLLLoss()(jax.nn.log_softmax(x), y), ("x", "y"), (0,)),
    "BCEWithLogitsLoss": (lambda x, b: jaxent.BCEWithLogitsLoss()(x, b), ("x", "b"), (0,)),
    "token_log_probs": (lambda x, y: jnp.sum(jnp.stack(jaxent.token_log_probs(
        x, jnp.maximum(y, 0), return_entropy=True))), ("x", "y"), (0,)),
    "linear_log_probs": (lambda h, k, y: jnp.sum(jnp.stack(jaxent.linear_log_probs(
        h, k, jnp.maximum(y, 0), return_entropy=True))), ("h", "k", "y"), (0, 1)),
    "linear_soft_cross_entropy": (lambda h, k, t: jaxent.linear_soft_cross_entropy(
        h, k, t, label_smoothing=0.1), ("h", "k", "t"), (0, 1)),
    "distillation_loss": (lambda x, t: jaxent.distillation_loss(x, t * 3.0, divergence="jsd"),
                          ("x", "t"), (0,)),
    "linear_distillation_loss": (lambda h, k: jaxent.linear_distillation_loss(
        h, k, h * 0.5, k, divergence="reverse_kl"), ("h", "k"), (0, 1)),
}


def _program(name: str, grad: bool):
    fn, names, argnums = LOSSES[name]
    return (jax.value_and_grad(fn, argnums=argnums) if grad else fn), names


def _round_trip(fn, args, specs=None):
    exp = export.export(jax.jit(fn))(*(args if specs is None else specs))
    back = export.deserialize(exp.serialize())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 back.call(*args), jax.jit(fn)(*args))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_serialize_round_trip(name, grad):
    fn, names = _program(name, grad)
    inp = _inputs()
    _round_trip(fn, [inp[n] for n in names])


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_symbolic_batch_size(name, grad):
    fn, names = _program(name, grad)
    inp = _inputs()
    args = [inp[n] for n in names]
    (b,) = export.symbolic_shape("b")
    specs = [jax.ShapeDtypeStruct(((b,) + a.shape[1:]) if n != "k" and n != "w" else a.shape,
                                  a.dtype) for n, a in zip(names, args, strict=True)]
    _round_trip(fn, args, specs)


def test_cross_entropy_and_grad_round_trip():
    inp = _inputs()
    fn = lambda x, y: jaxent.cross_entropy_and_grad(x, y, z_loss=1e-3)  # noqa: E731
    exp = export.export(jax.jit(fn))(inp["x"], inp["y"])
    back = export.deserialize(exp.serialize())
    got = back.call(jnp.array(inp["x"]), inp["y"])
    want = jax.value_and_grad(lambda x: jaxent.cross_entropy(x, inp["y"], z_loss=1e-3))(
        inp["x"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got,
                 want)


def _mlir(fn, specs, platform: str) -> str:
    return export.export(jax.jit(fn), platforms=[platform])(*specs).mlir_module()


def _specs(names, dtype):
    inp = _inputs()
    return [jax.ShapeDtypeStruct(inp[n].shape, dtype if n in "xhkt" else inp[n].dtype)
            for n in names]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_programs_carry_no_cpu_detours(platform, name, dtype):
    """No optimization barrier and no uint16 staging in value_and_grad for cuda or tpu."""
    fn, names = _program(name, grad=True)
    text = _mlir(fn, _specs(names, dtype), platform)
    assert "optimization_barrier" not in text
    assert "ui16" not in text


def test_cpu_program_keeps_its_detours():
    """The same bf16 program lowered for the CPU does stage bits (the test above can fail)."""
    fn, names = _program("linear_cross_entropy", grad=True)
    text = _mlir(fn, _specs(names, jnp.bfloat16), "cpu")
    assert "optimization_barrier" in text and "ui16" in text


def test_multi_platform_export_picks_per_platform():
    fn, names = _program("linear_cross_entropy", grad=True)
    exp = export.export(jax.jit(fn), platforms=["cpu", "cuda"])(*_specs(names, jnp.bfloat16))
    assert exp.platforms == ("cpu", "cuda")
    inp = _inputs()
    args = [inp[n].astype(jnp.bfloat16) if n in "hk" else inp[n] for n in names]
    got = export.deserialize(exp.serialize()).call(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=1e-3),
        got, jax.jit(fn)(*args))


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss", "linear_cross_entropy"])
def test_checkify_reports_traced_out_of_range_labels(name):
    fn, names, _ = LOSSES[name]
    inp = _inputs()
    inp["y"] = inp["y"].at[2].set(C + 3)
    checked = jax.jit(checkify.checkify(fn, errors=checkify.user_checks))
    err, out = checked(*[inp[n] for n in names])
    assert np.isnan(out)
    with pytest.raises(checkify.JaxRuntimeError, match=r"`labels` has values outside"):
        err.throw()
    inp["y"] = inp["y"].at[2].set(1)
    err, out = checked(*[inp[n] for n in names])
    assert err.get() is None and np.isfinite(out)


@pytest.mark.parametrize(("platform", "walk"), [("cpu", "token"), ("cuda", "vocab"),
                                                ("tpu", "vocab")])
def test_auto_picks_the_walk_of_the_lowering_platform(platform, walk):
    """impl="auto" chooses for the platform the program is lowered for, not the host: from
    this CPU host, float32 at V = 1000 is the token walk for the CPU and the vocabulary walk
    for cuda and tpu (jaxent._platform.TABLE). Each walk names itself in the program."""
    f = jax.jit(jax.value_and_grad(
        lambda h, k, y: jaxent.linear_cross_entropy(h, k, y, kernel_layout="vd"),
        argnums=(0, 1)))
    specs = (jax.ShapeDtypeStruct((64, 16), jnp.float32),
             jax.ShapeDtypeStruct((1000, 16), jnp.float32),
             jax.ShapeDtypeStruct((64,), jnp.int32))
    text = export.export(f, platforms=[platform])(*specs).mlir_module()
    assert {w for w in ("token", "vocab") if f"jaxent_{w}" in text} == {walk}


# A [D, V] kernel's d-kernel blocks; with a [V, D] kernel only the soft targets' blocks.
PINNED = {
    "d kernel": _program("linear_cross_entropy", grad=True),
    "targets": (jax.value_and_grad(lambda h, k, t: jaxent.linear_soft_cross_entropy(
        h, k.T, t, kernel_layout="vd", impl="vocab"), argnums=(0, 1, 2)), ("h", "k", "t")),
}


@pytest.mark.parametrize("blocks", sorted(PINNED))
@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_tpu_programs_pin_the_walk_blocks_row_major(platform, blocks):
    """Lowered for tpu with ``jax.jit`` (not for export), the vocabulary walk pins the
    ``d kernel`` blocks of a ``[D, V]`` kernel and the soft targets' blocks row-major
    (``jaxent._platform.Quirks`` ``pin_row_major``: XLA:TPU's layout assignment would copy
    the whole array); cpu and cuda programs carry no pin, and a program exported for tpu
    none either (``test_accelerator_programs_carry_no_cpu_detours`` serializes one)."""
    fn, names = PINNED[blocks]
    lowered = jax.jit(fn).trace(*_specs(names, jnp.bfloat16)).lower(
        lowering_platforms=(platform,))
    assert ("LayoutConstraint" in lowered.as_text()) == (platform == "tpu")


def test_row_major_pin_keeps_values_and_derivatives():
    """The pin is the identity under jit, grad, jvp and vmap (lowered for this CPU as a
    layout constraint)."""
    from jaxent import _platform  # noqa: PLC0415

    x = jax.random.normal(jax.random.key(3), (4, 6))
    pin = lambda a: _platform.row_major(a, _platform.TPU)  # noqa: E731
    f = lambda a: jnp.sum(jnp.sin(pin(a * 2.0)) ** 2)  # noqa: E731
    ref = lambda a: jnp.sum(jnp.sin(a * 2.0) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(x), ref(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(ref)(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jvp(f, (x,), (x,))[1], jax.jvp(ref, (x,), (x,))[1],
                               rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x), jax.vmap(ref)(x), rtol=1e-6)
    assert "LayoutConstraint" in jax.jit(f).lower(x).as_text()
