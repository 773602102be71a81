"""Precision of the ways a bf16 fused head can sum d hidden and d kernel over its blocks.

The soft-CE gradient ``d logits = (softmax(h W^T) - t) / N`` is formed in float32, rounded
to bf16 before each matmul (as the vocabulary walk does, ``jaxent.impl._blocks``), and the
two products are summed in the ways below; the error is ``||got - ref|| / ||ref||`` against
float64 products of the float32 ``d logits``. 501 blocks of 64 columns stand for the Llama
head's 501 blocks of 256. Run: ``python3 benchmarks/dh_precision.py`` (a few seconds).
"""

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
    for g in (2, 4, 8):
        acc = np.zeros((v, d), np.float32)
        rows = n // g
        for i in range(g):
            acc = r(acc + dxb[i * rows:(i + 1) * rows].T @ h[i * rows:(i + 1) * rows])
        out[f"d kernel, bf16 sum over {g} row groups"] = err(acc, dk64)
    for k, e in out.items():
        print(f"{k:72s} {e:.2e}")


if __name__ == "__main__":
    main()
