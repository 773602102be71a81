"""Pallas kernels (impl="pallas"): interpret mode on the CPU against the XLA path and float64
references, exports for cuda and tpu, the platform check, and the autotuner's cache."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from jaxent import _autotune
from jaxent import _rowmath as rm
from jaxent._options import Options
from jaxent.impl import pallas as pallas_entry
from jaxent.impl import (
    pallas_common,
    pallas_gpu,
    pallas_stats,
    pallas_stats_gpu,
    pallas_stats_tpu,
    pallas_tpu,
    stats,
)
from tests import reference
from tests.gpu_target import cuda_target


def _counted_rows(y, mask, weight, ignore_index, dtype):
    """``(labels, counted, row_w)`` as the losses pass them to an implementation."""
    lab = rm.labels_info(y, 1 << 30, ignore_index, mask,
                         None if weight is None else weight.astype(dtype), dtype)
    return jnp.where(lab.valid, y, 0).astype(jnp.int32), lab.counted, lab.row_w

N, D, V = 37, 48, 300  # ragged against every block below (D too, for the GPU's block_k)
# The fused CE's kernels (the statistic kernels of stats.CrossEntropy) and plain CE's.
LINEAR = {
    "gpu": (pallas_stats_gpu, pallas_gpu.Config(block_n=16, block_v=64, block_k=32)),
    # the backward in chunks of 2 vocabulary / 1 token tiles, the last one clamped
    "gpu_chunks": (pallas_stats_gpu, pallas_gpu.Config(block_n=16, block_v=64, block_k=16,
                                                       chunk=48 * 128)),
    "tpu": (pallas_stats_tpu, pallas_tpu.Config(block_n=128, block_v=128)),
}
BACKENDS = {
    "gpu": (pallas_gpu, pallas_gpu.Config(block_n=16, block_v=64, block_k=16)),
    "tpu": (pallas_tpu, pallas_tpu.Config(block_n=128, block_v=128)),
}
OPTION_SETS = {
    "plain": {},
    "smooth_weight_where": {"label_smoothing": 0.2, "weight": True, "where": True},
    "zloss_cap_temp": {"z_loss": 1e-2, "logit_softcap": 3.0, "temperature": 1.7},
    "all": {"weight": True, "where": True, "label_smoothing": 0.05, "z_loss": 1e-3,
            "logit_softcap": 5.0, "temperature": 0.8, "ignore_index": 7},
}
TOL = {"float32": (2e-5, 2e-5), "bfloat16": (1e-2, 1e-2)}  # (rtol, atol / max |ref|)


def _data(rng, layout, dtype, c=V):
    h = rng.standard_normal((N, D)).astype(np.float32)
    w = (rng.standard_normal((D, c) if layout == "dv" else (c, D)) / 3).astype(np.float32)
    b = rng.standard_normal((c,)).astype(np.float32)
    y = rng.integers(0, c, (N,)).astype(np.int32)
    y[0], y[5] = -100, 7  # one ignored (default ignore_index), one class 7 ("all" ignores 7)
    weight = rng.uniform(0.5, 2.0, (c,)).astype(np.float32)
    where = rng.random((N,)) < 0.8
    cast = lambda a: jnp.asarray(a).astype(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), jnp.asarray(y), jnp.asarray(weight), jnp.asarray(where)


def _split(opts_set, weight, where):
    """``(loss keywords, Options, weight or None, where or None, ignore_index)``."""
    kw = dict(opts_set)
    w = weight if kw.pop("weight", False) else None
    m = where if kw.pop("where", False) else None
    ignore = kw.get("ignore_index", -100)
    opts = Options(kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0),
                   kw.get("temperature", 1.0), kw.get("logit_softcap"))
    kw = {k: v for k, v in kw.items() if k != "ignore_index"}
    return kw, opts, w, m, ignore


def _relabel(y, ignore):
    """Labels with the data's ignored entry (-100) moved to ``ignore``: no label out of range
    (jaxent gives those nan, the reference clips)."""
    return jnp.where(y == -100, ignore, y)


def _close(a, b, dtype):
    rtol, atol = TOL[jnp.dtype(dtype).name]
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(np.abs(b).max())))


def _f64(*arrays):
    return [jnp.asarray(np.asarray(a, np.float64)) for a in arrays]


def _ref_vjp(fn, args, g):
    """Float64 values and ``vjp(g)`` of a jax.numpy reference."""
    with jax.enable_x64(True):
        out, vjp = jax.vjp(fn, *_f64(*args))
        grads = vjp(jnp.asarray(np.asarray(g, np.float64)))
        return np.asarray(out), [np.asarray(x) for x in grads]


def _jit_vjp(fn, n_args):
    """Jitted ``(out, aux, vjp(g))`` of ``fn(*args) -> (rows, aux)``."""

    def run(g, *args):
        out, vjp, aux = jax.vjp(fn, *args, has_aux=True)
        return out, aux, vjp(g.astype(out.dtype))

    return jax.jit(run)


def _linear_rows(backend, h, w, b, y, weight, where, ignore, opts, layout, aux=True):
    """``(losses, lse, argmax or None)`` of the fused CE's kernels on ``backend`` with its
    test blocks (``[N]`` labels, interpret mode)."""
    mod, cfg = LINEAR[backend]
    lab = rm.labels_info(y, V, ignore, where, weight, jnp.float32)
    return pallas_stats.run_on(mod, cfg, stats.CrossEntropy(V, aux), opts, V, layout,
                               ((h, w, b),), lab, {"weight": weight}, interpret=True)


def _cases():
    names = list(OPTION_SETS)
    yield "gpu_chunks", "all", "vd", "float32"
    yield "gpu_chunks", "smooth_weight_where", "dv", "float32"
    yield "gpu_chunks", "all", "dv", "bfloat16"
    for backend in ("gpu", "tpu"):
        for i, name in enumerate(names):
            yield backend, name, "vd" if i % 2 else "dv", "float32"
        if backend == "gpu":
            yield backend, "all", "dv", "float32"  # "all" in both layouts
        yield backend, "plain", "vd", "bfloat16"
        yield backend, "all", "dv", "bfloat16"


@pytest.mark.parametrize(("backend", "name", "layout", "dtype"), list(_cases()))
def test_linear_matches_references(backend, name, layout, dtype, rng):
    h, w, b, y, weight, where = _data(rng, layout, dtype)
    kw, opts, wt, mask, ignore = _split(OPTION_SETS[name], weight, where)
    y = _relabel(y, ignore)

    def rows(h, w, b):
        loss, lse, arg = _linear_rows(backend, h, w, b, y, wt, mask, ignore, opts, layout)
        return loss, (lse, arg)

    g = jnp.asarray(rng.standard_normal((N,)), jnp.float32)
    loss, (lse, arg), grads = _jit_vjp(rows, 3)(g, h, w, b)
    assert loss.dtype == jnp.float32 and [x.dtype for x in grads] == [h.dtype] * 3

    def ref(h, w, b):
        logits = h @ (w if layout == "dv" else w.T) + b[None, :]
        return reference.cross_entropy(logits, y, weight=wt, where=mask, ignore_index=ignore,
                                       reduction="none", xp=jnp, **kw)

    ref_loss, ref_grads = _ref_vjp(ref, (h, w, b), g)
    _close(loss, ref_loss, dtype)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want, dtype)
    logits = np.asarray(_f64(h)[0] @ (_f64(w)[0] if layout == "dv" else _f64(w)[0].T)
                        + _f64(b)[0][None, :])
    z = logits / opts.temperature
    if opts.logit_softcap is not None:
        z = opts.logit_softcap * np.tanh(z / opts.logit_softcap)
    zmax = z.max(1, keepdims=True)
    _close(lse, (zmax + np.log(np.exp(z - zmax).sum(1, keepdims=True)))[:, 0], dtype)
    if dtype == "float32":
        np.testing.assert_array_equal(arg, logits.argmax(1))
        # The XLA path, same rows and gradients.
        def xla(h, w, b):
            out = jaxent.linear_cross_entropy(
                h, w, y, bias=b, weight=wt, where=mask, ignore_index=ignore,
                reduction="none", kernel_layout=layout, **kw)
            return out, ()

        x_loss, _, x_grads = _jit_vjp(xla, 3)(g, h, w, b)
        _close(loss, x_loss, dtype)
        for got, want in zip(grads, x_grads, strict=True):
            _close(got, want, dtype)


@pytest.mark.parametrize("backend", ["gpu_chunks", "tpu"])
def test_linear_without_bias_and_reduced(backend, rng):
    """No bias, a mean over the rows as the front function forms it, and its gradient."""
    h, w, _, y, _, _ = _data(rng, "dv", jnp.float32)
    _, _, row_w = _counted_rows(y, None, None, -100, jnp.float32)

    def mean(h, w):
        loss, _, arg = _linear_rows(backend, h, w, None, y, None, None, -100, Options(), "dv",
                                    aux=False)
        assert arg is None
        return rm.reduce(loss, row_w.sum(), "mean")

    val, grads = jax.jit(jax.value_and_grad(mean, argnums=(0, 1)))(h, w)
    want, want_grads = jax.value_and_grad(
        lambda h, w: jaxent.linear_cross_entropy(h, w, y), argnums=(0, 1))(h, w)
    _close(val, want, jnp.float32)
    for got, ref in zip(grads, want_grads, strict=True):
        _close(got, ref, jnp.float32)


@pytest.mark.parametrize(("backend", "name", "dtype"), [
    (b, n, d) for b in ("gpu", "tpu") for n, d in
    [("plain", "float32"), ("all", "float32"), ("smooth_weight_where", "bfloat16")]])
def test_ce_rows_match_references(backend, name, dtype, rng):
    mod, cfg = BACKENDS[backend]
    c = 203
    x = jnp.asarray(3 * rng.standard_normal((N, c)), jnp.float32).astype(dtype)
    y = jnp.asarray(rng.integers(0, c, (N,)), jnp.int32).at[0].set(-100).at[5].set(7)
    weight = jnp.asarray(rng.uniform(0.5, 2.0, (c,)), jnp.float32)
    where = jnp.asarray(rng.random((N,)) < 0.8)
    kw, opts, wt, mask, ignore = _split(OPTION_SETS[name], weight, where)
    y = _relabel(y, ignore)
    yf, counted, row_w = _counted_rows(y, mask, wt, ignore, jnp.float32)

    def rows(x):
        return mod.ce_rows(x, yf, row_w, counted, wt, opts=opts, config=cfg,
                           interpret=True), ()

    g = jnp.asarray(rng.standard_normal((N,)), jnp.float32)
    loss, _, (dx,) = _jit_vjp(rows, 1)(g, x)
    assert dx.dtype == x.dtype

    def ref(x):
        return reference.cross_entropy(x, y, weight=wt, where=mask, ignore_index=ignore,
                                       reduction="none", xp=jnp, **kw)

    ref_loss, (ref_dx,) = _ref_vjp(ref, (x,), g)
    _close(loss, ref_loss, dtype)
    _close(dx, ref_dx, dtype)

    def xla(x):
        return jaxent.cross_entropy(x, y, weight=wt, where=mask, ignore_index=ignore,
                                    reduction="none", **kw), ()

    x_loss, _, (x_dx,) = _jit_vjp(xla, 1)(g, x)
    _close(loss, x_loss, dtype)
    _close(dx, x_dx, dtype)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_ce_rows_minus_inf_logits(backend, rng):
    """-inf logits (a masked vocabulary): finite loss and gradient where a class is live; a
    row of only -inf that is not counted gives exactly 0 and 0 (as the XLA path)."""
    mod, cfg = BACKENDS[backend]
    c = 203
    x = np.asarray(rng.standard_normal((N, c)), np.float32)
    x[:, 150:] = -np.inf
    x[3] = -np.inf
    y = jnp.asarray(rng.integers(0, 150, (N,)), jnp.int32).at[3].set(-100)
    weight = jnp.asarray(rng.uniform(0.5, 2.0, (c,)), jnp.float32)
    x = jnp.asarray(x)
    yf, counted, row_w = _counted_rows(y, None, weight, -100, jnp.float32)
    g = jnp.asarray(rng.standard_normal((N,)), jnp.float32)
    rows = lambda x: (mod.ce_rows(x, yf, row_w, counted, weight, opts=Options(),  # noqa: E731
                                  config=cfg, interpret=True), ())
    loss, _, (dx,) = _jit_vjp(rows, 1)(g, x)
    xla = lambda x: (jaxent.cross_entropy(x, y, weight=weight, reduction="none"), ())  # noqa: E731
    want, _, (want_dx,) = _jit_vjp(xla, 1)(g, x)
    assert np.isfinite(loss).all() and np.isfinite(dx).all()
    assert loss[3] == 0 and (dx[3] == 0).all() and (dx[:, 150:] == 0).all()
    _close(loss, want, jnp.float32)
    _close(dx, want_dx, jnp.float32)


# ------------------------------------------------------------------------------ exports

_S = jax.ShapeDtypeStruct
_ALL = Options(label_smoothing=0.1, z_loss=1e-3, temperature=0.7, logit_softcap=5.0)
EXPORTS = [(p, k, layout, dt) for p in ("cuda", "tpu")
           for k, layout, dt in [("linear", "dv", "float32"), ("linear", "vd", "float32"),
                                 ("linear", "dv", "bfloat16"), ("linear", "vd", "bfloat16"),
                                 ("linear-plain", "dv", "float32"),
                                 ("ce", None, "float32"), ("ce", None, "bfloat16")]]


def _export_fn(kind, layout):
    """``value_and_grad`` of a public loss with ``impl="pallas"`` and its gradients' count."""
    if kind == "ce":
        def f(x, y, wt):
            return jaxent.cross_entropy(x, y, weight=wt, impl="pallas", label_smoothing=0.1,
                                        z_loss=1e-3, temperature=0.7, logit_softcap=5.0)

        return jax.value_and_grad(f), 2
    plain = kind == "linear-plain"

    def f(h, w, b, y, wt):
        opts = {} if plain else {"label_smoothing": 0.1, "z_loss": 1e-3, "temperature": 0.7,
                                 "logit_softcap": 5.0, "weight": wt, "bias": b}
        loss, aux = jaxent.linear_cross_entropy(h, w, y, kernel_layout=layout, impl="pallas",
                                                return_aux=True, **opts)
        return loss + aux["lse"].sum() * 0.0

    return jax.value_and_grad(f, argnums=(0, 1, 2)), 3


@pytest.mark.parametrize(("platform", "kind", "layout", "dtype"), EXPORTS)
def test_export(platform, kind, layout, dtype):
    """value_and_grad exports for the device with the kernels' custom calls (fwd + bwd),
    through the public API from this CPU host, with no device and no private context."""
    dt = jnp.dtype(dtype)
    rows = (_S((N,), jnp.int32), _S((V,), jnp.float32))
    if kind == "ce":
        args = (_S((N, V), dt),) + rows
    else:
        wshape = (D, V) if layout == "dv" else (V, D)
        args = (_S((N, D), dt), _S(wshape, dt), _S((V,), dt)) + rows
    fn, n_kernels = _export_fn(kind, layout)
    if platform == "cuda":
        with cuda_target():
            exp = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                    disabled_checks=list(pallas_gpu.EXPORT_CHECKS))(*args)
    else:
        exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    text = exp.mlir_module()
    assert text.count(pallas_gpu.TRITON_TARGET) == (n_kernels if platform == "cuda" else 0)
    assert text.count(pallas_tpu.MOSAIC_TARGET) == (n_kernels if platform == "tpu" else 0)


def test_lowering_for_the_cpu_without_interpret_raises():
    h, w, y = (_S((N, D), jnp.bfloat16), _S((D, V), jnp.bfloat16), _S((N,), jnp.int32))
    fn = jax.jit(jax.value_and_grad(lambda h, w, y: jaxent.linear_cross_entropy(
        h, w, y, impl="pallas"), argnums=(0, 1)))
    with pytest.raises(ValueError, match="interpret=True"):
        fn.lower(h, w, y).compile()


def test_dispatch_interpret_matches_backend(rng):
    x = jnp.asarray(rng.standard_normal((N, 203)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 203, (N,)), jnp.int32)
    yf, counted, row_w = _counted_rows(y, None, None, -100, jnp.float32)
    got = jax.jit(lambda x: pallas_entry.dispatch_ce_rows(
        x, yf, row_w, counted, None, opts=_ALL, interpret=True))(x)
    want = jaxent.cross_entropy(x, y, reduction="none", label_smoothing=0.1, z_loss=1e-3,
                                temperature=0.7, logit_softcap=5.0)
    _close(got, want, jnp.float32)


# ----------------------------------------------------------------------- platform check


def test_cpu_without_interpret_raises():
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_common.check_platform(False, "cpu")
    pallas_common.check_platform(True, "cpu")
    pallas_common.check_platform(False, "tpu")
    h, w = jnp.ones((N, D)), jnp.ones((D, V))
    y, rw, c = jnp.zeros((N,), jnp.int32), jnp.ones((N,)), jnp.ones((N,), bool)
    with pytest.raises(ValueError, match="interpret=True.*GPU or TPU"):
        jax.jit(lambda h, w: jaxent.linear_cross_entropy(h, w, y, impl="pallas"))(h, w)
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_tpu.ce_rows(h, y, rw, c, None, opts=Options(), config=BACKENDS["tpu"][1])


def test_configs_validate_and_default():
    with pytest.raises(ValueError, match="power of two"):
        pallas_gpu.Config(block_n=24)
    with pytest.raises(ValueError, match="`chunk` must be >= 1, got 0"):
        pallas_gpu.Config(chunk=0)
    with pytest.raises(ValueError, match="`v_split` must be >= 1, got 0"):
        pallas_gpu.Config(v_split=0)
    with pytest.raises(ValueError, match="multiple of 128"):
        pallas_tpu.Config(block_v=200)
    for platform in ("cuda", "tpu", "cpu"):
        cfg = pallas_entry.default_config(4096, 2048, 128256, jnp.bfloat16, platform)
        assert cfg.padded(4096, 2048, 128256)[2] >= 128256
    with pytest.raises(ValueError, match="cuda and tpu"):
        pallas_entry.default_config(64, 32, 256, jnp.float32, "rocm")
    for mod in (pallas_gpu, pallas_tpu):
        cands = mod.candidates(4096, 1024, 32000, jnp.bfloat16)
        assert cands[0] == mod.default_config(4096, 1024, 32000, jnp.bfloat16)
        assert len(set(cands)) == len(cands) > 4
        json.dumps([_autotune.encode(c) for c in cands])


# ---------------------------------------------------------------------------- autotune


def test_autotune_caches_xla_block_sizes(tmp_path, monkeypatch):
    cache = tmp_path / "tune.json"
    monkeypatch.setenv(_autotune.ENV_CACHE, str(cache))
    h = jnp.asarray(np.random.default_rng(0).standard_normal((32, 16)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, V)), jnp.float32)
    y = jnp.arange(32, dtype=jnp.int32)
    built = []

    def build(bs):
        built.append(bs)
        return jax.jit(jax.grad(lambda h, w: jaxent.linear_cross_entropy(
            h, w, y, block_size=bs, impl="vocab"), argnums=(0, 1)))

    key = jaxent.autotune_key("xla-vocab", h.dtype, n=32, d=16, v=V)
    assert key == "xla-vocab|float32|d=16,n=32,v=512"
    best = jaxent.autotune(build, [64, 128], (h, w), key, reps=2)
    assert best in (64, 128) and built == [64, 128]
    entry = json.loads(cache.read_text())[f"{_autotune.device_kind()}|{key}"]
    assert entry["choice"] == best and len(entry["timings"]) == 2
    assert jaxent.autotune(build, [64, 128], (h, w), key) == best
    assert built == [64, 128]  # the second call did not time
    assert _autotune.lookup(key, [64, 128]) == best
    assert _autotune.lookup("other|float32|n=1", [64, 128], default=256) == 256
    # Both XLA walks' sizes at once: dict candidates round-trip too.
    pairs = [{"block_size": 64, "token_block_size": 16}, {"block_size": 128,
                                                          "token_block_size": 32}]
    assert jaxent.autotune(lambda c: (lambda: c), pairs, (), key + "|pair") in pairs
    assert _autotune.lookup(key + "|pair", pairs) in pairs
    # A candidate that fails is skipped; a config dataclass round-trips through the cache.
    cfgs = [pallas_gpu.Config(block_n=8 * 4), pallas_gpu.Config(block_n=64)]
    fails = {cfgs[0]}

    def build_cfg(cfg):
        if cfg in fails:
            raise ValueError("infeasible")
        return lambda: 0

    gkey = _autotune.autotune_key("pallas-linear", jnp.bfloat16, n=4096, d=2048, v=128256)
    assert jaxent.autotune(build_cfg, cfgs, (), gkey) == cfgs[1]
    assert pallas_entry.config_for(4096, 2048, 128256, jnp.bfloat16, "cuda") == cfgs[1]
    assert pallas_entry.config_for(8, 16, 32, jnp.float32, "cuda") == \
        pallas_stats_gpu.default_config(8, 16, 32, jnp.float32)


def test_autotune_unreadable_cache_falls_back(tmp_path, monkeypatch):
    cache = tmp_path / "bad.json"
    cache.write_text("{not json")
    monkeypatch.setenv(_autotune.ENV_CACHE, str(cache))
    assert _autotune.lookup("k", [1, 2], default=2) == 2
    assert jaxent.autotune(lambda c: (lambda: c), [1], (), "k") == 1
    assert json.loads(cache.read_text())[f"{_autotune.device_kind()}|k"]["choice"] == 1


@pytest.mark.parametrize("kind", ["linear", "ce"])
def test_every_pallas_call_states_its_cost(kind):
    """Both backends' kernels carry a cost_estimate (flops, bytes, transcendentals from the
    shapes) for XLA's scheduler: a whole value_and_grad program, traced for any platform."""
    dt = jnp.bfloat16
    rows = (_S((N,), jnp.int32), _S((N,), jnp.float32), _S((N,), jnp.bool_), None)
    if kind == "ce":
        fn = jax.value_and_grad(lambda x, *r: pallas_entry.dispatch_ce_rows(
            x, *r, opts=_ALL, interpret=False).sum())
        args = (_S((N, V), dt),) + rows
    else:
        fn = jax.value_and_grad(lambda h, w, y: jaxent.linear_cross_entropy(
            h, w, y, impl="pallas", label_smoothing=0.1, z_loss=1e-3, temperature=0.7,
            logit_softcap=5.0), argnums=(0, 1))
        args = (_S((N, D), dt), _S((D, V), dt), _S((N,), jnp.int32))
    from jax.extend import core as jex_core

    calls = []

    def walk(jx):
        calls.extend(e for e in jx.eqns if e.primitive.name == "pallas_call")
        for sub in jex_core.subjaxprs(jx):
            walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    assert len(calls) == (4 if kind == "ce" else 6)  # fwd + bwd kernels, GPU and TPU
    for eqn in calls:
        est = eqn.params["cost_estimate"]
        assert est is not None and est.flops > 0 and est.bytes_accessed > 0
        assert est.transcendentals > 0
