"""Temporary bytes of value_and_grad at N=8192, D=2048, V=128256 (abstract inputs).

    python benchmarks/linear_memory.py [N D V]
"""

import sys

import jax
import jax.numpy as jnp
import jax_cce

import jaxent

N, D, V = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (8192, 2048, 128256)

CASES = {
    "naive": (lambda h, w, y: jaxent.cross_entropy(h @ w, y), "dv"),
    "jaxent dv": (lambda h, w, y: jaxent.linear_cross_entropy(h, w, y), "dv"),
    "jaxent vd": (lambda h, w, y: jaxent.linear_cross_entropy(h, w, y, kernel_layout="vd"), "vd"),
    "jax-cce 0.1.0": (jax_cce.linear_cross_entropy, "vd"),
}

for dtype in (jnp.bfloat16, jnp.float32):
    temp = {}
    for name, (f, layout) in CASES.items():
        args = (jax.ShapeDtypeStruct((N, D), dtype),
                jax.ShapeDtypeStruct((D, V) if layout == "dv" else (V, D), dtype),
                jax.ShapeDtypeStruct((N,), jnp.int32))
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    for name, t in temp.items():
        print(f"{jnp.dtype(dtype).name:9s} {name:14s} {t / 1e6:9.1f} MB "
              f"{100 * t / temp['naive']:6.2f}% of naive", flush=True)
