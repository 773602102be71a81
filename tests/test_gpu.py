"""Checks that need a GPU (``pytest -m gpu``; skipped elsewhere): jaxent's fused loss on the
GPU against float64 references, and every contender of the GPU benchmark suite (jaxent's
walks, tokamax, Liger, Apple CCE, torch on CUDA) against the same references, so the GPU
benchmark never times a wrong implementation. ``benchmarks/gpu/run.sh`` runs this file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from jaxent import bench
from tests import reference
from tests.test_bench import _check_against_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX sees none)"),
]

# Small enough to compile fast, large enough for Liger's and CCE's block sizes; bf16 only,
# as the GPU suite (float32 GPU matmuls may run as tf32, beyond the float32 tolerance).
GPU_TINY = [
    bench.Case(bench.LINEAR, bench.FWD_BWD, "bfloat16", 256, 4096, 128),
    bench.Case(bench.CE, bench.FWD_BWD, "bfloat16", 256, 4096),
]


@pytest.mark.parametrize("case", GPU_TINY, ids=lambda c: c.name)
def test_gpu_suite_contenders_match_the_reference(case):
    cons, notes = bench.default_contenders(gpu=True)
    print("\n".join(notes))
    assert _check_against_reference(cons, case) >= 3


@pytest.mark.parametrize("impl", ["auto", "vocab", "token"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_cross_entropy_on_the_gpu(impl, dtype, rng):
    n, d, v = 512, 256, 8192
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((d, v), dtype=np.float32) / np.sqrt(d)
    y = rng.integers(0, v, size=(n,), dtype=np.int32)
    hj, wj = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
    f = jax.jit(jax.value_and_grad(
        lambda h, w: jaxent.linear_cross_entropy(h, w, jnp.asarray(y), impl=impl),
        argnums=(0, 1)))
    loss, (dh, dw) = f(hj, wj)
    assert dh.dtype == hj.dtype and dw.dtype == wj.dtype
    h64 = np.asarray(hj.astype(jnp.float32), np.float64)
    w64 = np.asarray(wj.astype(jnp.float32), np.float64)
    ref = reference.cross_entropy(h64 @ w64, y)
    g_h, g_w = reference.grad64(lambda h, w: reference.cross_entropy(h @ w, y, xp=jnp),
                                h64, w64, argnums=(0, 1))
    tol = 1e-2 if dtype == "bfloat16" else 1e-3  # GPU float32 matmuls may run as tf32
    np.testing.assert_allclose(float(loss), ref, rtol=tol)
    for got, want in ((dh, g_h), (dw, g_w)):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3 * tol


def test_peak_memory_is_reported_on_the_gpu():
    case = GPU_TINY[0]
    inputs = bench.make_inputs(case)
    cons, _ = bench.default_contenders(gpu=True)
    for con in cons:
        runner = con.build(case, inputs)
        if runner is None:
            continue
        runner.call()
        assert runner.peak_bytes is not None and runner.peak_bytes > 0, con.name
