"""Precision of the ways a bf16 fused head can sum d hidden and d kernel over its blocks.

The soft-CE gradient ``d logits = (softmax(h W^T) - t) / N`` is formed in float32, rounded
to bf16 before each matmul (as the vocabulary walk does, ``jaxent.impl._blocks``), and the
two products are summed in the ways below; the error is ``||got - ref|| / ||ref||`` against
float64 products of the float32 ``d logits``. 501 blocks of 64 columns stand for the Llama
head's 501 blocks of 256. The naive program's bf16 gradient rounds the logits and ``d
logits`` to bf16 and its products once.

``--programs`` also runs the float32 programs at this shape on the CPU and gives their
``d kernel`` and ``d hidden`` errors against float64: jaxent's vocabulary walk
(:func:`jaxent.impl.stream.run`, blocks of 64) in 1 and in 8 row groups
(``Plan.row_groups``), and the naive program (materialized logits, autodiff).
Run: ``python3 benchmarks/dh_precision.py [--programs]`` (a few seconds; a minute with
``--programs``).
"""

import argparse
import dataclasses

import ml_dtypes
import numpy as np


def r(a):
    """Round float32 to bf16 and back."""
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def err(a, ref):
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def main():
    rng = np.random.default_rng(0)
    n, d, v, b = 1024, 256, 32064, 64
    h = r(rng.standard_normal((n, d), np.float32))
    w = r(rng.standard_normal((v, d), np.float32) * 0.05)
    t = rng.random((n, v), np.float32)
    t = r(t / t.sum(1, keepdims=True))
    z = h @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dx = ((p - t) / n).astype(np.float32)
    dxb = r(dx)
    dh64 = dx.astype(np.float64) @ w.astype(np.float64)
    dk64 = dx.astype(np.float64).T @ h.astype(np.float64)
    out = {"d hidden, float32 sum, one rounding (the walk now; also per row slice)":
           err(r(dxb @ w), dh64)}
    acc = np.zeros((n, d), np.float32)
    for s in range(0, v, b):
        acc = r(acc + dxb[:, s:s + b] @ w[s:s + b])
    out[f"d hidden, bf16 carry ({-(-v // b)} roundings)"] = err(acc, dh64)
    out["d kernel, float32 sum, one rounding (the walk now)"] = err(r(dxb.T @ h), dk64)
    zn = r(z)
    pn = np.exp(zn - zn.max(1, keepdims=True))
    pn /= pn.sum(1, keepdims=True)
    dxn = r(((pn - t) / n).astype(np.float32))
    out["d kernel, naive program (bf16 logits and d logits, one rounding)"] = err(
        r(dxn.T @ h), dk64)
    for g in (2, 4, 8):
        acc = np.zeros((v, d), np.float32)
        rows = n // g
        for i in range(g):
            acc = r(acc + dxb[i * rows:(i + 1) * rows].T @ h[i * rows:(i + 1) * rows])
        out[f"d kernel, bf16 sum over {g} row groups"] = err(acc, dk64)
    for k, e in out.items():
        print(f"{k:72s} {e:.2e}")
    return h, w, t


def programs(h, w, t, block=64, groups=(1, 8)):
    """float32 ``d kernel`` / ``d hidden`` errors of the walk in row groups and of the naive
    program, against float64 autodiff of the same loss."""
    import jax
    import jax.numpy as jnp

    from jaxent.impl import stats, stream
    from jaxent.impl.plan import Options, stream_plan

    n, v = t.shape
    rows = stats.Rows(None, jnp.ones((n,), bool))

    def naive(h, w, t):
        return -jnp.sum(t * jax.nn.log_softmax(h @ w.T, axis=1)) / n

    with jax.enable_x64(True):
        ref = jax.grad(naive, (0, 1))(*(jnp.asarray(a, jnp.float64) for a in (h, w, t)))
        ref = [np.asarray(a) for a in ref]
    args = [jnp.asarray(a, jnp.float32) for a in (h, w, t)]
    got = {"naive program": jax.jit(jax.grad(naive, (0, 1)))(*args)}
    plan = stream_plan(Options(), v, v, n, layout="vd", block_size=block)
    for g in groups:
        p = dataclasses.replace(plan, row_groups=g)

        def walk(h, w, t, p=p):
            return jnp.sum(stream.run(stats.SoftTargets(v), p, ((h, w, None),), rows,
                                      {"targets": t})) / n
        got[f"walk, {g} row group(s)"] = jax.jit(jax.grad(walk, (0, 1)))(*args)
    print(f"float32 programs, {n} x {h.shape[1]} x {v}, blocks of {block}:")
    for k, (dh, dk) in got.items():
        print(f"  {k:30s} d kernel {err(np.asarray(dk), ref[1]):.2e}   "
              f"d hidden {err(np.asarray(dh), ref[0]):.2e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", action="store_true")
    data = main()
    if ap.parse_args().programs:
        programs(*data)
