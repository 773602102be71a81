"""Throughput of the matmuls behind linear cross-entropy, one jitted ``lax.dot_general`` each.

    python benchmarks/matmul_speed.py [N D V TOKEN_BLOCK DW_SLICE]   (2048 2048 128256 128 1024)

Prints GFLOP/s (median of 3 calls after a warm-up) for the naive path's three full-size
products and for the token schedule's per-block ones: the block's logits, its ``d hidden``,
and its ``d kernel`` written in place in ``[D, DW_SLICE]`` slices (as ``jaxent.linear`` does),
plus torch's forward product for comparison when torch is installed.
"""

import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

N, D, V, NB, BW = (int(a) for a in sys.argv[1:6]) if len(sys.argv) > 5 else (
    2048, 2048, 128256, 128, 1024)


def dot(a, b, ca, cb):
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())))


def report(name, fn, *args, flops):
    f = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    t = sorted(times)[1]
    print(f"{name:44s} {t * 1e3:9.1f} ms {flops / t / 1e9:6.0f} GFLOP/s", flush=True)


def dkernel_slices(dk, hb, dx):
    def add(j, dk):
        s = j * BW
        upd = dot(hb, lax.dynamic_slice_in_dim(dx, s, BW, 1), 0, 0)
        return lax.dynamic_update_slice_in_dim(
            dk, lax.dynamic_slice_in_dim(dk, s, BW, 1) + upd, s, 1)

    return lax.fori_loop(0, V // BW, add, dk)


keys = jax.random.split(jax.random.key(0), 3)
w = jax.random.normal(keys[0], (D, V)) / D**0.5
full = 2 * N * D * V
h = jax.random.normal(keys[1], (N, D))
report(f"naive  h @ W          [{N}, {V}]", lambda a, b: dot(a, b, 1, 0), h, w, flops=full)
dz = jax.random.normal(keys[2], (N, V))
report(f"naive  dz @ W^T       [{N}, {D}]", lambda a, b: dot(a, b, 1, 1), dz, w, flops=full)
report(f"naive  h^T @ dz       [{D}, {V}]", lambda a, b: dot(a, b, 0, 0), h, dz, flops=full)
del dz
block = 2 * NB * D * V
hb, dx = h[:NB], jax.random.normal(keys[2], (NB, V))
report(f"block  h_b @ W        [{NB}, {V}]", lambda a, b: dot(a, b, 1, 0), hb, w, flops=block)
report(f"block  dx @ W^T       [{NB}, {D}]", lambda a, b: dot(a, b, 1, 1), dx, w, flops=block)
report(f"block  dW += h_b^T dx in [{D}, {BW}] slices", dkernel_slices, jnp.zeros((D, V)), hb, dx,
       flops=block * (V // BW * BW) / V)
try:
    import numpy as np
    import torch
except ImportError:
    sys.exit()
ta, tb = torch.from_numpy(np.array(h)), torch.from_numpy(np.array(w))
ta @ tb
times = []
for _ in range(3):
    t0 = time.perf_counter()
    ta @ tb
    times.append(time.perf_counter() - t0)
t = sorted(times)[1]
print(f"{'torch  h @ W (MKL)':44s} {t * 1e3:9.1f} ms {full / t / 1e9:6.0f} GFLOP/s")
